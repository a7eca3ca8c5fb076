"""Where the demo's time goes: the cost of one example in each stage's inner loop, and the work the default demo
plan (server/demo.py DEMO_PLANS) gives each stage, side by side on this machine.

    python -m bench.bench_demo_stages [--preset small] [--threads 1] [--repeats 3] [--out docs/PERFORMANCE.md]

Per-example costs, measured interleaved on the same process: an autoencoder training step, a UNet training step
(public pretraining; a DP-SGD step costs about 1 / 0.66 of it in bookkeeping mode, docs/PERFORMANCE.md bench_dp),
and a UNet forward pass (synthesis: 2 per image per DDIM step with guidance; the audit's white-box attack: 20 per
patient or canary). The work per stage is counted from the plan; time = work x cost. It is a model of the demo,
not a timing of it: round overheads, data loading, radiomics and the TLS set-up come on top.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.bench_precision import loops
from bench.report import write_block
from common.config import model_config
from server.demo import DEMO_PLANS, DemoOptions, demo_recipe

DP_OVERHEAD = 1 / 0.66  # bookkeeping DP-SGD vs a plain step (docs/PERFORMANCE.md, bench_dp)
# gradient canaries (client/canaries.py) are added to the noised sum: about 1 ms per DP-SGD step, ~2 % of one
CANARY_SHARE = 0.02
WHITE_BOX_PASSES = 20  # client/audit.py: 5 timesteps x 4 noise draws per record


def _per_example(fn, batch: int, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats / batch


def measure(preset: str, repeats: int) -> dict[str, float]:
    """Seconds per example of each of the demo's inner loops (bench_precision's loops, in plain float32)."""
    return {
        name: _per_example(lambda fn=fn: fn("float32"), batch, repeats)
        for name, (batch, fn) in loops(preset).items()
    }


def stage_work(preset: str) -> list[tuple[str, str, float, str]]:
    """(stage, what, examples, cost kind) for the default demo plan of `preset`."""
    opts = DemoOptions(preset=preset)
    plan = DEMO_PLANS[preset]
    sites = opts.sites
    train = round(plan.subjects * (1 - plan.holdout))
    holdout = plan.subjects - train
    rounds = plan.rounds - plan.ae_rounds
    if plan.recipe:
        r = demo_recipe(opts, plan)
        dp_steps, dp_batch = r.steps, r.batch_size
    else:
        dp_steps, dp_batch = plan.local_epochs * rounds, plan.batch_size
    images = 2 * plan.per_class
    ddim = model_config(preset).ddim_steps
    return [
        (
            "public pretraining: autoencoder",
            f"{plan.ae_steps} steps x {plan.pretrain_batch}",
            plan.ae_steps * plan.pretrain_batch,
            "autoencoder train",
        ),
        (
            "public pretraining: UNet",
            f"{plan.unet_steps} steps x {plan.pretrain_batch}",
            plan.unet_steps * plan.pretrain_batch,
            "UNet train",
        ),
        (
            "DP fine-tuning",
            f"{dp_steps} steps x {dp_batch} x {sites} sites, +{CANARY_SHARE:.0%} gradient canaries, "
            f"x{DP_OVERHEAD:.2f} DP",
            dp_steps * dp_batch * sites * (1 + CANARY_SHARE) * DP_OVERHEAD,
            "UNet train",
        ),
        (
            "synthesis",
            f"{images} images x {ddim} DDIM steps x 2 (guidance)",
            images * ddim * 2,
            "UNet forward",
        ),
        (
            "audit (white-box attack)",
            f"({train} + {holdout} patients) x {WHITE_BOX_PASSES} x {sites} sites (canaries: no forward pass)",
            (train + holdout) * WHITE_BOX_PASSES * sites,
            "UNet forward",
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cost = measure(args.preset, args.repeats)
    rows = stage_work(args.preset)
    total = sum(n * cost[kind] for _, _, n, kind in rows)
    lines = [
        f"Where the demo's time goes (`python -m bench.bench_demo_stages --preset {args.preset} --threads "
        f"{args.threads}`): per-example costs measured here, times the work of the default demo plan "
        "(server/demo.py). A model of the demo, not a timing: round overheads, loading, radiomics and the TLS "
        "set-up come on top; on a loaded machine every figure grows, the shares much less.",
        "",
        "| per example | seconds |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in cost.items()),
        "",
        "| stage | work | examples | seconds | share |",
        "|---|---|---|---|---|",
        *(
            f"| {stage} | {what} | {n:,.0f} | {n * cost[kind]:.0f} | {n * cost[kind] / total:.0%} |"
            for stage, what, n, kind in rows
        ),
    ]
    block = write_block(Path(args.out), "bench_demo_stages", lines)
    print(block)


if __name__ == "__main__":
    main()
