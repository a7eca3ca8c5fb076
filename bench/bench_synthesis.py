"""Synthesis and training throughput per device, 2-D and 3-D presets, measured side by side in one run.

    python -m bench.bench_synthesis [--presets small tiny3d] [--batch 16] [--ddim-steps 10 25 50]
                                    [--ddpm-timed-steps 100] [--cohort-per-class 0] [--out docs/PERFORMANCE.md]

On every visible GPU (bf16 autocast), else on the CPU (float32), for each preset:
- synthesis images/s for DDIM-k (k in --ddim-steps) and DDPM-1000, same model, same batch, decoding included, and
  DDIM's speed-up over DDPM. DDPM-1000 takes 1000 identical UNet calls: with --ddpm-timed-steps k < 1000 only the
  first k are timed and the time is scaled by 1000 / k (the table says so); 0 times all 1000;
- the model's FLOPs per image (torch.utils.flop_counter.FlopCounterMode: one UNet call, one decode), hence the
  model TFLOP/s reached and, on a GPU whose bf16 peak is known, the fraction of that peak;
- training samples/s of the autoencoder and the diffusion UNet (plain Adam steps, no DP: see bench_dp.py for DP);
- with --cohort-per-class N: `server.synthesis.synthesize_cohort` end to end (all devices, images written to disk).
Weights are random: speed does not depend on them. Results are printed and written into --out between markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.report import write_block
from common.config import ModelConfig, RunConfig, model_config
from common.model import (
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    ddim_scheduler,
    ddpm_scheduler,
    decode,
    diffusion_loss,
)

# Dense bf16 tensor-core peaks (TFLOP/s, vendor figures, SXM parts) to report a fraction of peak.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return (
        f"CPU {platform.processor() or platform.machine()} ({threads} thread{'s' * (threads != 1)})"
    )


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1, warmup: bool = True) -> float:
    if warmup:
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def model_flops(cfg: ModelConfig, ae, unet, device: torch.device) -> tuple[float, float]:
    """FLOPs of one UNet call and of one decode, per image."""
    z = torch.randn(1, *cfg.latent_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(
            z,
            timesteps=torch.tensor([10], device=device),
            class_labels=torch.tensor([0], device=device),
        )
    with torch.no_grad(), FlopCounterMode(display=False) as fd:
        decode(ae, z, 1.0)
    return float(fc.get_total_flops()), float(fd.get_total_flops())


def denoise(
    unet, cfg, labels, sampler: str, steps: int, timed_steps: int, autocast, device
) -> None:
    """The first `timed_steps` of a `steps`-step DDIM / DDPM chain (the same loop as common.model.sample_latents)."""
    scheduler = ddim_scheduler(cfg) if sampler == "ddim" else ddpm_scheduler(cfg)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn((len(labels),) + cfg.latent_shape, device=device)
    with torch.no_grad(), autocast:
        for t in scheduler.timesteps[:timed_steps]:
            pred = unet(
                x, timesteps=torch.full((len(labels),), int(t), device=device), class_labels=labels
            )
            x = scheduler.step(pred.float(), int(t), x)[0]


def bench_device(cfg: ModelConfig, device: torch.device, args) -> dict:
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    torch.manual_seed(0)
    ae, unet = build_autoencoder(cfg).to(device).eval(), build_unet(cfg).to(device).eval()
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    unet_flops, decode_flops = model_flops(cfg, ae, unet, device)
    z = torch.randn(args.batch, *cfg.latent_shape, device=device)

    def run_decode():
        with torch.no_grad(), autocast:
            decode(ae, z, 1.0)

    decode_s = timed(run_decode, device)
    step_plan = [(f"DDIM-{k}", "ddim", k, k) for k in args.ddim_steps]
    ddpm_timed = args.ddpm_timed_steps or args.ddpm_steps
    step_plan.append(
        (f"DDPM-{args.ddpm_steps}", "ddpm", args.ddpm_steps, min(ddpm_timed, args.ddpm_steps))
    )
    rows, ips = [], {}
    peak = bf16_peak(device)
    denoise(unet, cfg, labels, "ddim", 2, 2, autocast, device)  # warm-up: the same calls, once
    for name, sampler, steps, timed_steps in step_plan:
        seconds = timed(
            lambda s=sampler, k=steps, m=timed_steps: denoise(
                unet, cfg, labels, s, k, m, autocast, device
            ),
            device,
            warmup=False,
        )
        seconds = seconds * steps / timed_steps + decode_s
        ips[name] = args.batch / seconds
        tflops = (unet_flops * steps + decode_flops) * args.batch / seconds / 1e12
        note = (
            ""
            if timed_steps == steps
            else f" (first {timed_steps} steps timed, x{steps / timed_steps:g})"
        )
        rows.append(
            {
                "sampler": name + note,
                "steps": steps,
                "seconds": seconds,
                "ips": ips[name],
                "tflops": tflops,
                "peak": f"{100 * tflops / peak:.1f} %" if peak else "n/a",
            }
        )
        print(f"{cfg.name} {device}: {rows[-1]}", flush=True)

    ae.train()
    unet.train()
    x = torch.rand(args.train_batch or args.batch, *cfg.image_shape, device=device)
    lat = torch.randn(len(x), *cfg.latent_shape, device=device)
    train_labels = torch.arange(len(x), device=device) % cfg.num_classes
    opt_ae, opt_unet = torch.optim.Adam(ae.parameters()), torch.optim.Adam(unet.parameters())
    sched = ddpm_scheduler(cfg)

    def ae_step():
        with autocast:
            loss = autoencoder_loss(ae, x, 1e-6).mean()
        opt_ae.zero_grad()
        loss.backward()
        opt_ae.step()

    def unet_step():
        with autocast:
            loss = diffusion_loss(unet, sched, lat, train_labels).mean()
        opt_unet.zero_grad()
        loss.backward()
        opt_unet.step()

    return {
        "device": device_name(device),
        "unet_gflop": unet_flops / 1e9,
        "decode_gflop": decode_flops / 1e9,
        "unet_params": sum(p.numel() for p in unet.parameters()) / 1e6,
        "rows": rows,
        "ratios": {
            k: v / ips[f"DDPM-{args.ddpm_steps}"] for k, v in ips.items() if k.startswith("DDIM")
        },
        "ae_sps": len(x) / timed(ae_step, device, args.train_steps),
        "unet_sps": len(x) / timed(unet_step, device, args.train_steps),
        "train_batch": len(x),
    }


def bench_cohort(cfg: ModelConfig, args) -> str:
    """synthesize_cohort end to end on every device (sampling, decoding, NIfTI writing, hashing, manifest)."""
    from server.checkpoint import Checkpoint, RunState
    from server.synthesis import SynthesisRequest, resolve_devices, synthesize_cohort

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpoint(
            cfg,
            dataclasses.asdict(RunConfig(preset=cfg.name)),
            RunState(run_id="bench", completed_round=0, latent_scale=1.0),
            build_autoencoder(cfg).state_dict(),
            build_unet(cfg).state_dict(),
        ).save(Path(tmp) / "run")
        req = SynthesisRequest(
            ckpt,
            Path(tmp) / "cohort",
            per_class=args.cohort_per_class,
            batch_size=args.batch,
            workers=args.workers,
        )
        devices = resolve_devices(req.device, req.workers)
        t0 = time.perf_counter()
        synthesize_cohort(req)
        seconds = time.perf_counter() - t0
    n = args.cohort_per_class * cfg.num_classes
    return (
        f"`synthesize_cohort` end to end, preset `{cfg.name}`, DDIM-{cfg.ddim_steps}: {n} images on "
        f"{len(devices)} device(s) ({', '.join(devices)}) in {seconds:.1f} s = {n / seconds:.2f} images/s "
        "(worker start-up, sampling, NIfTI writing, hashing and the manifest included)."
    )


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--presets",
        nargs="+",
        default=["small", "base2d", "tiny3d", "base3d"] if gpu else ["small", "tiny3d"],
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train-batch", type=int, default=0, help="training batch (default: --batch)")
    ap.add_argument("--ddim-steps", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--ddpm-steps", type=int, default=1000)
    ap.add_argument("--ddpm-timed-steps", type=int, default=0 if gpu else 100)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--cohort-per-class", type=int, default=0)
    ap.add_argument(
        "--workers", type=int, default=0, help="CPU worker processes for --cohort-per-class"
    )
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())] or [
        torch.device("cpu")
    ]
    lines = [
        "### Synthesis and training throughput per device (`python -m bench.bench_synthesis "
        f"--presets {' '.join(args.presets)} --batch {args.batch} --ddim-steps {' '.join(map(str, args.ddim_steps))} "
        f"--ddpm-timed-steps {args.ddpm_timed_steps} --threads {args.threads}`)",
        "",
        f"torch {torch.__version__}; {'bf16 autocast' if gpu else 'float32'}; "
        f"load average before: {os.getloadavg()[0]:.1f}. Images/s include decoding; TFLOP/s count the UNet calls "
        "and the decode (FlopCounterMode). Random weights: speed does not depend on them.",
        "",
        "| preset | device | sampler | steps | s / batch | images/s | model TFLOP/s | % of bf16 peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes, cohort_lines = [], []
    for preset in args.presets:
        cfg = model_config(preset)
        for device in devices:
            r = bench_device(cfg, device, args)
            for row in r["rows"]:
                lines.append(
                    f"| `{preset}` ({cfg.image_size}^{cfg.spatial_dims}) | {r['device']} | {row['sampler']} | "
                    f"{row['steps']} | {row['seconds']:.2f} | {row['ips']:.3g} | {row['tflops']:.3g} | {row['peak']} |"
                )
            notes.append(
                f"- `{preset}` on {r['device']}: latents {'x'.join(map(str, cfg.latent_shape))}, UNet "
                f"{r['unet_params']:.2f} M params, {r['unet_gflop']:.3g} GFLOP per UNet call and "
                f"{r['decode_gflop']:.3g} GFLOP per decode per image; DDIM over DDPM-{args.ddpm_steps}: "
                + ", ".join(f"{k} {v:.1f}x" for k, v in r["ratios"].items())
                + f"; training (no DP, batch {r['train_batch']}): autoencoder {r['ae_sps']:.3g} samples/s, "
                f"UNet {r['unet_sps']:.3g} samples/s."
            )
        if args.cohort_per_class:
            cohort_lines.append(bench_cohort(cfg, args))
            print(cohort_lines[-1], flush=True)
    lines += ["", *notes]
    if cohort_lines:
        lines += ["", *cohort_lines]
    if not gpu:
        lines += [
            "",
            "No GPU was available for this run: the bf16 / several-GPU path (one worker process per visible GPU, "
            "bf16 autocast) is exercised by code paths only; rerun on a GPU machine to fill in GPU rows.",
        ]
    block = write_block(args.out, "bench_synthesis", lines)
    print(block)


if __name__ == "__main__":
    main()
