"""Synthesis and training throughput, measured side by side in one run.

    python -m bench.bench_synthesis [--preset small] [--batch 16] [--ddim-steps 10 25 50] [--out docs/PERFORMANCE.md]

Measures, on whatever device is present (GPU with bf16 autocast if there is one, else CPU):
- synthesis images/s for DDIM-k (k in --ddim-steps) and DDPM-1000, same model, same batch, and their ratio;
- training samples/s of the autoencoder and the diffusion UNet (plain SGD steps, no DP: see bench_dp.py for DP);
- model FLOPs per image (torch.utils.flop_counter) to report throughput as a fraction of peak where known.
Weights are random: speed does not depend on them. Results are printed and written into --out between markers.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.report import write_block
from common.config import model_config
from common.model import (
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    decode,
    diffusion_loss,
    sample_latents,
)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--ddpm-steps", type=int, default=1000)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    cfg = model_config(args.preset)
    torch.manual_seed(0)
    ae, unet = build_autoencoder(cfg).to(device).eval(), build_unet(cfg).to(device).eval()
    labels = torch.arange(args.batch, device=device) % cfg.num_classes

    with FlopCounterMode(display=False) as fc:
        z = torch.randn(1, *cfg.latent_shape, device=device)
        unet(z, timesteps=torch.tensor([10], device=device), class_labels=labels[:1])
    unet_flops = fc.get_total_flops()

    rows = []
    results: dict[str, float] = {}
    for name, sampler, steps in [(f"DDIM-{k}", "ddim", k) for k in args.ddim_steps] + [
        (f"DDPM-{args.ddpm_steps}", "ddpm", args.ddpm_steps)
    ]:

        def run(steps=steps, sampler=sampler):
            with torch.no_grad(), autocast:
                lat = sample_latents(
                    unet,
                    cfg,
                    labels,
                    steps=steps,
                    sampler=sampler,
                    generator=torch.Generator().manual_seed(0),
                )
                decode(ae, lat.float(), 1.0)

        seconds = timed(run)
        ips = args.batch / seconds
        results[name] = ips
        tflops = unet_flops * steps * args.batch / seconds / 1e12
        rows.append(f"| {name} | {steps} | {seconds:.2f} | {ips:.2f} | {tflops:.3f} |")
        print(rows[-1], flush=True)

    ae.train()
    unet.train()
    x = torch.rand(args.batch, *cfg.image_shape, device=device)
    opt_ae = torch.optim.Adam(ae.parameters())
    opt_unet = torch.optim.Adam(unet.parameters())
    sched = ddpm_scheduler(cfg)
    lat = torch.randn(args.batch, *cfg.latent_shape, device=device)

    def ae_step():
        with autocast:
            loss = autoencoder_loss(ae, x, 1e-6).mean()
        opt_ae.zero_grad()
        loss.backward()
        opt_ae.step()

    def unet_step():
        with autocast:
            loss = diffusion_loss(unet, sched, lat, labels).mean()
        opt_unet.zero_grad()
        loss.backward()
        opt_unet.step()

    ae_sps = args.batch / timed(ae_step, args.train_steps)
    unet_sps = args.batch / timed(unet_step, args.train_steps)

    ddpm_key = f"DDPM-{args.ddpm_steps}"
    lines = [
        f"### Synthesis and training throughput (`bench/bench_synthesis.py --preset {args.preset} --batch {args.batch}`)",
        "",
        f"Machine: {machine()}. Preset `{cfg.name}`: {cfg.image_size}^{cfg.spatial_dims} images, latents "
        f"{'x'.join(map(str, cfg.latent_shape))}, UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
        f"{unet_flops / 1e9:.2f} GFLOP per UNet call per image.",
        "",
        "| sampler | steps | seconds / batch | images/s | UNet TFLOP/s |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Speed-up of DDIM over DDPM, measured in this run: "
        + ", ".join(
            f"{k}: {v / results[ddpm_key]:.1f}x" for k, v in results.items() if k != ddpm_key
        )
        + ".",
        "",
        f"Training (no DP), batch {args.batch}: autoencoder {ae_sps:.1f} samples/s, diffusion UNet {unet_sps:.1f} samples/s.",
    ]
    block = write_block(args.out, "bench_synthesis", lines)
    print(block)


if __name__ == "__main__":
    main()
