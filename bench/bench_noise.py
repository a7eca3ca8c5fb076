"""What Opacus' floating-point-safe noise would cost a site: one DP-SGD step's Gaussian noise for the diffusion UNet,
drawn as sites draw it (privacy.dp.entropy_generator) and as Opacus' secure mode draws it (mean of four).

    python -m bench.bench_noise [--preset small] [--threads 1] [--repeats 15] [--out docs/PERFORMANCE.md]

privacy/dp.py's docstring explains why the four-Gaussian draw is off; this measures the cost side of that choice.
Plain and secure draws alternate within each repeat (the machine is shared); reported: the median s/step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from opacus.optimizers.optimizer import _generate_noise

from bench.report import write_block
from common.config import model_config
from common.model import build_unet
from privacy.dp import entropy_generator


def noise_seconds(params: list[torch.Tensor], secure: bool, generator: torch.Generator) -> float:
    t0 = time.perf_counter()
    for p in params:
        _generate_noise(1.0, p, generator=generator, secure_mode=secure)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = [p.detach() for p in build_unet(model_config(args.preset)).parameters()]
    n = sum(p.numel() for p in params) / 1e6
    generator = entropy_generator()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for secure in (False, True):
            times[secure].append(noise_seconds(params, secure, generator))
    plain, secure = (statistics.median(times[s]) for s in (False, True))
    lines = [
        f"### DP noise per step (`python -m bench.bench_noise --preset {args.preset} "
        f"--threads {args.threads} --repeats {args.repeats}`)",
        "",
        f"Machine: CPU {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}. "
        f"Diffusion UNet {n:.2f} M params (preset `{args.preset}`); median of {args.repeats} "
        "interleaved repeats.",
        "",
        "| noise | s/step | vs plain |",
        "|---|---|---|",
        f"| plain Gaussian (the sites' draw, `privacy.dp.SECURE_NOISE = False`) | {plain:.3f} | 1.00 |",
        f"| Opacus secure mode's mean of four Gaussians | {secure:.3f} | {secure / plain:.2f} |",
    ]
    print(write_block(args.out, "bench_noise", lines))


if __name__ == "__main__":
    main()
