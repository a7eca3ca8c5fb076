"""The training arithmetic on this CPU: float32, float32 with channels-last convolutions, bfloat16 autocast.

    python -m bench.bench_precision [--preset small] [--threads 2] [--repeats 5] [--out docs/PERFORMANCE.md]
        [--quality-seeds 0 1] [--ae-steps 800]

For each inner loop of the demo (an autoencoder training step, a UNet training step, a UNet forward pass), the
three variants run interleaved in one process on copies of the same weights and inputs, `repeats` times each; the
table gives the median seconds per example and each variant's speed-up over plain float32. Channels-last is the
same float32 arithmetic in another memory order (oneDNN's preferred one for 2D convolutions). bfloat16 autocast
(torch.autocast on the CPU, here channels-last too) runs the convolutions and matmuls in bfloat16 and keeps the
weights, the optimiser and the reductions in float32; it pays only on a CPU with bfloat16 units (AVX512-BF16 or
AMX), which torch reports as `_is_mkldnn_bf16_supported`.

With `--quality-seeds`, what it costs: the demo's public pretraining of the autoencoder (server.pretrain's
train_autoencoder, `--ae-steps` one-cycle steps on 300 public phantoms) in each precision for each seed, and its
reconstructions of 200 other public subjects scored as the audit scores a cohort (pixel MSE, radiomics Frechet
distance, prdc precision / coverage; privacy/fidelity.py), with the training seconds. Public data only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import write_block
from common.config import model_config
from common.model import (
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    diffusion_loss,
)

VARIANTS = ("float32", "float32 channels-last", "bfloat16 channels-last")


def _context(variant: str):
    if variant.startswith("bfloat16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _layout(variant: str) -> torch.memory_format:
    return torch.channels_last if "channels-last" in variant else torch.contiguous_format


def loops(preset: str) -> dict[str, tuple[int, object]]:
    """name -> (examples per call, a function of the variant running one call). Each variant trains its own copy
    of the same initial weights."""
    cfg = model_config(preset)
    torch.manual_seed(0)
    ae0, unet0 = build_autoencoder(cfg), build_unet(cfg)
    scheduler = ddpm_scheduler(cfg)
    x = torch.rand(16, *cfg.image_shape)
    z = torch.randn(16, *cfg.latent_shape)
    y = torch.zeros(16, dtype=torch.long)
    zf, yf = torch.randn(64, *cfg.latent_shape), torch.zeros(64, dtype=torch.long)
    models = {}
    for v in VARIANTS:
        ae, unet = copy.deepcopy(ae0), copy.deepcopy(unet0)
        ae, unet = ae.to(memory_format=_layout(v)), unet.to(memory_format=_layout(v))
        models[v] = (
            ae,
            torch.optim.Adam(ae.parameters()),
            unet,
            torch.optim.Adam(unet.parameters()),
        )

    def ae_step(v: str) -> None:
        ae, opt, _, _ = models[v]
        with _context(v):
            loss = autoencoder_loss(ae, x.contiguous(memory_format=_layout(v)), 1e-6).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def unet_step(v: str) -> None:
        _, _, unet, opt = models[v]
        with _context(v):
            loss = diffusion_loss(unet, scheduler, z.contiguous(memory_format=_layout(v)), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    @torch.no_grad()
    def forward(v: str) -> None:
        unet = models[v][2]
        with _context(v):
            unet(
                zf.contiguous(memory_format=_layout(v)),
                timesteps=torch.full((64,), 100),
                class_labels=yf,
            )

    return {
        "autoencoder train": (16, ae_step),
        "UNet train": (16, unet_step),
        "UNet forward": (64, forward),
    }


def measure(preset: str, repeats: int) -> dict[str, dict[str, float]]:
    """name -> variant -> seconds per example (median over `repeats` interleaved calls)."""
    out: dict[str, dict[str, float]] = {}
    for name, (batch, fn) in loops(preset).items():
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for v in VARIANTS:
            fn(v)  # warm-up (oneDNN picks its kernels on the first call)
        for _ in range(repeats):
            for v in VARIANTS:
                t = time.perf_counter()
                fn(v)
                times[v].append((time.perf_counter() - t) / batch)
        out[name] = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
        print(
            f"{name}: " + ", ".join(f"{v} {s * 1e3:.2f} ms" for v, s in out[name].items()),
            flush=True,
        )
    return out


def quality(preset: str, seeds: list[int], ae_steps: int, out: Path) -> list[dict]:
    from bench.bench_autoencoder_texture import fidelity_row, reconstruct
    from common.phantoms import make_public_phantoms
    from privacy.fidelity import radiomics_features
    from server.pretrain import PretrainConfig, load_public, train_autoencoder

    cfg = model_config(preset)
    train_dir, valid_dir = out / "public-300", out / "valid-200"
    if not train_dir.exists():
        make_public_phantoms(train_dir, 300, cfg.spatial_dims, cfg.image_size, seed=0)
    if not valid_dir.exists():
        make_public_phantoms(valid_dir, 200, cfg.spatial_dims, cfg.image_size, seed=1)
    images = torch.from_numpy(load_public(train_dir, cfg).images)
    valid = load_public(valid_dir, cfg).images.astype(np.float32)
    f_real, names = radiomics_features(valid)
    rows = []
    for seed in seeds:
        for precision in ("float32", "bfloat16"):  # both channels-last, as server.pretrain trains
            pre = PretrainConfig(
                public_dir=str(train_dir),
                out="unused.pt",
                preset=preset,
                autoencoder_steps=ae_steps,
                seed=seed,
            )
            torch.manual_seed(seed)
            t = time.perf_counter()
            # autocast acts on the forward ops on its lists only (convolutions, matmuls): not on Adam's
            with _context(precision):
                state = train_autoencoder(cfg, pre, images)
            seconds = time.perf_counter() - t
            ae = build_autoencoder(cfg)
            ae.load_state_dict(state)
            recon = reconstruct(ae, torch.from_numpy(valid))
            row = {
                "seed": seed,
                "arithmetic": precision,
                "seconds": round(seconds),
                "mse": round(float(((recon - valid) ** 2).mean()), 5),
                **fidelity_row(f_real, names, recon),
            }
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    ap.add_argument("--quality-seeds", type=int, nargs="*", default=[])
    ap.add_argument("--ae-steps", type=int, default=800)
    ap.add_argument(
        "--work", default="bench-results/precision", help="the quality run's public phantoms"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    cost = measure(args.preset, args.repeats)
    lines = [
        f"The training arithmetic (`python -m bench.bench_precision --preset {args.preset} --threads "
        f"{args.threads} --repeats {args.repeats} --quality-seeds {' '.join(map(str, args.quality_seeds))}`): "
        "the variants interleaved in one process, median milliseconds per example, and the speed-up over plain "
        f"float32. This CPU: torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
        f"bfloat16 units {'yes' if bf16 else 'no'}.",
        "",
        "| loop | " + " | ".join(f"{v} ms (speed-up)" for v in VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
        *(
            f"| {k} | "
            + " | ".join(f"{c[v] * 1e3:.2f} ({c['float32'] / c[v]:.2f}x)" for v in VARIANTS)
            + " |"
            for k, c in cost.items()
        ),
    ]
    if args.quality_seeds:
        rows = quality(args.preset, args.quality_seeds, args.ae_steps, Path(args.work))
        lines += [
            "",
            f"The demo's autoencoder pretraining ({args.ae_steps} one-cycle steps, 300 public phantoms; "
            "server.pretrain's loop, channels-last), its reconstructions of 200 other public subjects scored as "
            "the audit scores a cohort:",
            "",
            "| seed | arithmetic | train s | pixel MSE | radiomics Frechet | prdc precision | prdc coverage |",
            "|---|---|---|---|---|---|---|",
            *(
                f"| {r['seed']} | {r['arithmetic']} | {r['seconds']} | {r['mse']:.5f} | {r['frechet']:.3f} | "
                f"{r['precision']:.3f} | {r['coverage']:.3f} |"
                for r in rows
            ),
        ]
    print(write_block(Path(args.out), "bench_precision", lines))


if __name__ == "__main__":
    main()
