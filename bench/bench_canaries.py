"""What the one-run audit's canaries cost a site's training: one real DP training round (client.task) on a phantom
site, without canaries and with them, side by side in interleaved pairs (the machine is shared, so its load drifts
between pairs, not within one); reported: median seconds per round of each, and the median, min and max of the
per-pair ratio (with / without), against the issue's limit of 1.20.

    python -m bench.bench_canaries [--preset tiny] [--patients 80] [--canaries -1] [--repeats 3] [--threads 1]
                                   [--out docs/PERFORMANCE.md]

--canaries -1 is the site default (client/canaries.py auto_count: at most 40 % of the patients, so the included
half adds at most 20 % records per DP-SGD step). Each repeat uses fresh site state (a new ledger), the same plan.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.report import write_block
from client import canaries
from client.task import run_training_round
from common.config import SiteConfig, model_config
from common.messages import RoundPlan
from common.model import build_autoencoder, build_unet
from common.phantoms import make_phantom_sites


def one_round(site_dir: Path, state: Path, n_canaries: int, preset: str, threads: int):
    site = SiteConfig(
        site_dir=str(site_dir), state_dir=str(state), canaries=n_canaries, threads=threads
    )
    cfg = model_config(preset)
    plan = RoundPlan(
        run_id="bench",
        server_round=1,
        phase="diffusion",
        num_server_rounds=1,
        federated_autoencoder_rounds=0,
        preset=preset,
        local_epochs=2,
        batch_size=8,
        lr=1e-3,
        kl_weight=1e-6,
        latent_scale=1.0,
        proximal_mu=0.0,
        seed=0,
    )
    t0 = time.perf_counter()
    result = run_training_round(
        site, plan, build_unet(cfg).state_dict(), build_autoencoder(cfg).state_dict()
    )
    seconds = time.perf_counter() - t0
    if result.refused:
        raise SystemExit(f"the site refused the round: {result.refused}")
    return seconds, canaries.load(site)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--patients", type=int, default=80)
    ap.add_argument("--canaries", type=int, default=-1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.preset)
    times: dict[str, list[float]] = {"none": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        site_dir = make_phantom_sites(
            Path(tmp) / "ph", n_sites=1, n_subjects=args.patients, size=cfg.image_size, seed=1
        )[0]
        state = None
        included: list[int] = []
        n_train = round(args.patients * 0.75)  # the default hold-out fraction keeps a quarter out
        for r in range(args.repeats):
            for kind, n in (("none", 0), ("with", args.canaries)):
                seconds, s = one_round(
                    site_dir, Path(tmp) / f"{kind}{r}", n, args.preset, args.threads
                )
                times[kind].append(seconds)
                state = s if kind == "with" else state
                if (
                    kind == "with"
                ):  # each repeat draws its own inclusion (fresh state): keep each draw's count
                    included.append(s.n_included if s else 0)
    none, with_ = (statistics.median(times[k]) for k in ("none", "with"))
    ratios = [w / n for n, w in zip(times["none"], times["with"], strict=True)]
    pairs = ", ".join(
        f"{k} included ({k / max(1, n_train):.0%} more records): {r:.2f}"
        for k, r in zip(included, ratios, strict=True)
    )
    ratio = statistics.median(ratios)
    m, m_in = (state.n, state.n_included) if state else (0, 0)
    lines = [
        f"### Canary overhead (`python -m bench.bench_canaries --preset {args.preset} --patients "
        f"{args.patients} --canaries {args.canaries} --repeats {args.repeats} --threads {args.threads}`)",
        "",
        f"Machine: CPU {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, shared with "
        f"other jobs. One diffusion-phase DP round (2 local epochs, batch 8), {args.patients} phantom patients "
        f"(a quarter held out); {m} canaries, {m_in} of them included (drawn from OS entropy). Median of "
        f"{args.repeats} interleaved pairs (the round includes loading and encoding the site's data); the ratio "
        "is taken within each pair, then its median.",
        "",
        "| canaries | s/round (median) | ratio with / without, per pair: median (min-max) | limit |",
        "|---|---|---|---|",
        f"| none | {none:.2f} | 1.00 | |",
        f"| {m} (Binomial({m}, 1/2) included per draw; last draw {m_in}) | {with_:.2f} | "
        f"{ratio:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | 1.20: {'met' if ratio <= 1.2 else 'NOT met'} |",
        "",
        f"Each pair's own inclusion draw and ratio: {pairs}.",
    ]
    print(write_block(args.out, "bench_canaries", lines))


if __name__ == "__main__":
    main()
