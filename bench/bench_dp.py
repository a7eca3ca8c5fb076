"""DP-SGD vs non-private training of the diffusion UNet: throughput and peak memory, side by side in one run.

    python -m bench.bench_dp [--preset small] [--batch 32] [--steps 6] [--out docs/PERFORMANCE.md]

Modes, each in its own subprocess so peak memory (max RSS, or max CUDA allocation on a GPU) is its own:
- nondp:  plain Adam steps;
- hooks:  Opacus per-sample gradients with hooks (materialises a gradient per sample per parameter);
- hooks-fast: the same, with privacy.grad_samplers.install_fast_grad_samplers() (exact, faster Conv2d / GroupNorm /
          Linear per-sample gradients) called before make_private;
- ghost:  Opacus ghost clipping (per-sample gradient NORMS without materialising per-sample gradients; the loss is
          reduced per sample first, then Opacus' criterion wrapper does the second backward pass).
The same UNet, latents, batch and seed in every mode. Results are printed and written into --out between markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.report import write_block


class PerSampleLoss(torch.nn.Module):
    """Opacus' ghost clipping wants a criterion; ours is already per sample, so reduction is all it does."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, per_sample: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return per_sample
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


def worker(mode: str, preset: str, batch: int, steps: int) -> dict:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from common.config import model_config
    from common.model import build_unet, ddpm_scheduler, diffusion_loss

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(preset)
    unet = build_unet(cfg).to(device).train()
    sched = ddpm_scheduler(cfg)
    n = batch * 8
    data = TensorDataset(torch.randn(n, *cfg.latent_shape), torch.randint(0, cfg.num_classes, (n,)))
    loader = DataLoader(data, batch_size=batch)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    criterion = PerSampleLoss()
    if mode == "hooks-fast":
        from privacy.grad_samplers import install_fast_grad_samplers

        install_fast_grad_samplers()
    if mode != "nondp":
        engine = PrivacyEngine(accountant="rdp")
        kwargs = dict(module=unet, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                      poisson_sampling=False,  # fixed batches: identical work per mode
                      grad_sample_mode="hooks" if mode == "hooks-fast" else mode)
        if mode == "ghost":
            unet, opt, criterion, loader = engine.make_private(criterion=criterion, **kwargs)
        else:
            unet, opt, loader = engine.make_private(**kwargs)
    x, y = next(iter(loader))
    x, y = x.to(device), y.to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = criterion(diffusion_loss(unet, sched, x, y))
        loss.backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"mode": mode, "seconds_per_step": seconds, "samples_per_s": batch / seconds, "peak_mb": peak_mb,
            "params_m": sum(p.numel() for p in build_unet(cfg).parameters()) / 1e6, "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--modes", nargs="+", default=["nondp", "hooks", "hooks-fast", "ghost"])
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.preset, args.batch, args.steps)))
        return

    results = {}
    for mode in args.modes:
        proc = subprocess.run([sys.executable, "-m", "bench.bench_dp", "--worker", mode, "--preset", args.preset,
                               "--batch", str(args.batch), "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(results[mode], flush=True)
    base = results["nondp"]
    rows = [
        f"| {m} | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base['samples_per_s']:.2f} "
        f"| {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |"
        for m, r in results.items()
    ]
    device = base["device"]
    machine = (torch.cuda.get_device_name(0) if device.startswith("cuda")
               else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    block = write_block(args.out, "bench_dp", [
        f"### DP-SGD vs non-private training (`bench/bench_dp.py --preset {args.preset} --batch {args.batch}`)",
        "",
        f"Machine: {machine}, torch {torch.__version__}. Diffusion UNet {base['params_m']:.2f} M params on latents of "
        f"preset `{args.preset}`; batch {args.batch}; peak memory is the process's max RSS "
        f"({'CUDA max allocated' if device.startswith('cuda') else 'includes Python and libraries'}).",
        "",
        "| mode | s/step | samples/s | throughput vs non-DP | peak MB | memory vs non-DP |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(block)


if __name__ == "__main__":
    main()
