"""DP-SGD vs non-private training of the diffusion UNet: throughput and peak memory, side by side in one run.

    python -m bench.bench_dp [--preset small] [--batch 32] [--threads 1 2] [--repeats 9] [--steps 3]
                             [--modes nondp hooks ghost bookkeeping] [--out docs/PERFORMANCE.md]

Modes (the DP ones through privacy.dp.make_private, as a site trains; all exact DP-SGD):
- nondp:       plain Adam steps;
- hooks:       Opacus' per-sample gradients with hooks (a gradient per sample per parameter, clipped, summed);
- hooks-fast:  the same with privacy.grad_samplers' Conv2d / Linear samplers (not run by default);
- ghost:       Opacus' ghost clipping (per-sample norms, then a second backward pass with the clip factors);
- bookkeeping: privacy/bookkeeping.py (per-sample norms from the layers' inputs and backprops, then one
               weight-gradient computation with the clip factors; no weight gradient in the backward pass).

The machine is shared, so timings drift by tens of percent within a minute. Each mode therefore lives in its own
worker process (its own peak memory: max RSS, or max CUDA allocation on a GPU), built once, and the parent
interleaves them: in each repeat every worker times `--steps` steps, in a rotated order. Reported: the median
over repeats of each mode's s/step, and its throughput relative to non-DP as the median of the per-repeat ratios
(each ratio taken between measurements seconds apart). The same UNet, latents, batch and seed in every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

from bench.report import write_block

DEFAULT_MODES = ["nondp", "hooks", "ghost", "bookkeeping"]


def worker(mode: str, preset: str, batch: int, threads: int) -> None:
    """Build one mode's training step, then time `run K` requests from stdin until `quit` (JSON lines out)."""
    from torch.utils.data import DataLoader, TensorDataset

    from common.config import model_config
    from common.model import build_unet, ddpm_scheduler, diffusion_loss
    from privacy.dp import batch_loss, make_private

    warnings.filterwarnings(
        "ignore", message="(Full backward hook|Secure RNG)"
    )  # Opacus' own, every step
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(preset)
    unet = build_unet(cfg).to(device).train()
    params_m = sum(p.numel() for p in unet.parameters()) / 1e6
    sched = ddpm_scheduler(cfg)
    n = batch * 8
    data = TensorDataset(torch.randn(n, *cfg.latent_shape), torch.randint(0, cfg.num_classes, (n,)))
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    if mode == "hooks-fast":
        from privacy.grad_samplers import install_fast_grad_samplers

        install_fast_grad_samplers()
    if mode != "nondp":
        unet, opt, _ = make_private(
            unet,
            opt,
            DataLoader(data, batch_size=batch),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode="hooks" if mode == "hooks-fast" else mode,
        )
    x, y = data[
        :batch
    ]  # one fixed batch: identical work in every mode (the Poisson loader is not drawn from)
    x, y = x.to(device), y.to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        batch_loss(opt, diffusion_loss(unet, sched, x, y)).backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(), step()  # warm-up: allocator, oneDNN primitives
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({"ready": mode}), flush=True)
    for line in sys.stdin:
        if line.startswith("run"):
            wall, cpu = [], []
            for _ in range(int(line.split()[1])):
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                sync()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
        else:
            break
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({"peak_mb": peak_mb, "params_m": params_m, "device": str(device)}), flush=True)


class Worker:
    def __init__(self, mode: str, args: argparse.Namespace, threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.mode = mode
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.bench_dp",
                "--worker",
                mode,
                "--preset",
                args.preset,
                "--batch",
                str(args.batch),
                "--threads",
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.mode} died (exit code {self.proc.wait()})")
        return json.loads(line)

    def ready(self) -> None:
        self._reply()

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        info = self._reply()
        self.proc.wait()
        return info


def measure(args: argparse.Namespace, threads: int) -> dict[str, dict]:
    workers = [Worker(mode, args, threads) for mode in args.modes]
    for w in workers:  # built one after the other would be fairer to the build, but it is not timed
        w.ready()
    per_repeat: dict[str, list[float]] = {m: [] for m in args.modes}
    cpu: dict[str, list[float]] = {m: [] for m in args.modes}
    for r in range(args.repeats):
        for w in workers[r % len(workers) :] + workers[: r % len(workers)]:  # rotate who goes first
            out = w.run(args.steps)
            per_repeat[w.mode].append(statistics.median(out["wall"]))
            cpu[w.mode].append(statistics.median(out["cpu"]))
        print(
            f"threads={threads} repeat {r + 1}/{args.repeats}: "
            + ", ".join(f"{m} {per_repeat[m][-1]:.3f}s" for m in args.modes),
            flush=True,
        )
    results = {}
    base = per_repeat[args.modes[0]]
    for w in workers:
        info = w.close()
        s = per_repeat[w.mode]
        results[w.mode] = {
            "seconds_per_step": statistics.median(s),
            "cpu_seconds_per_step": statistics.median(cpu[w.mode]),
            "samples_per_s": args.batch / statistics.median(s),
            "ratio": statistics.median(
                b / t for b, t in zip(base, s, strict=False)
            ),  # paired: same repeat, seconds apart
            "ratio_range": (
                min(b / t for b, t in zip(base, s, strict=False)),
                max(b / t for b, t in zip(base, s, strict=False)),
            ),
            "spread": max(s) / min(s),  # > 1.5: other jobs competed for the cores during this run
            **info,
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode per repeat")
    ap.add_argument("--modes", nargs="+", default=DEFAULT_MODES)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.preset, args.batch, args.threads[0])
        return
    if args.modes[0] != "nondp":
        args.modes = ["nondp"] + [m for m in args.modes if m != "nondp"]

    load_before = os.getloadavg()
    table = {t: measure(args, t) for t in args.threads}
    load_after = os.getloadavg()
    rows = []
    for t, results in table.items():
        base = results["nondp"]
        for m, r in results.items():
            lo, hi = r["ratio_range"]
            rows.append(
                f"| {m} | {t} | {r['seconds_per_step']:.3f} | {r['samples_per_s']:.1f} | **{r['ratio']:.2f}** "
                f"({lo:.2f}-{hi:.2f}) | {r['cpu_seconds_per_step']:.3f} | {r['peak_mb']:.0f} "
                f"| {r['peak_mb'] / base['peak_mb']:.2f} |"
            )
    noisy = [
        f"threads={t}: s/step of some mode varied {max(r['spread'] for r in res.values()):.1f}x between repeats"
        for t, res in table.items()
        if max(r["spread"] for r in res.values()) > 1.5
    ]
    first = next(iter(table.values()))["nondp"]
    device = first["device"]
    machine = (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"CPU {platform.machine()} ({os.cpu_count()} cores)"
    )
    block = write_block(
        args.out,
        "bench_dp",
        [
            f"### DP-SGD vs non-private training (`python -m bench.bench_dp --preset {args.preset} --batch {args.batch}"
            f" --threads {' '.join(map(str, args.threads))} --repeats {args.repeats} --steps {args.steps}`)",
            "",
            f"Machine: {machine}, torch {torch.__version__}. Diffusion UNet {first['params_m']:.2f} M params on latents of "
            f"preset `{args.preset}`; batch {args.batch}; Adam; noise multiplier 1, clipping norm 1. Every DP mode is "
            "exact DP-SGD through `privacy.dp.make_private`. Modes run in separate processes, interleaved: "
            f"{args.repeats} repeats x {args.steps} steps each; s/step is the median over repeats, throughput vs "
            "non-DP the median of per-repeat ratios (range in brackets). Peak memory: the process's max RSS "
            f"({'CUDA max allocated' if device.startswith('cuda') else 'includes Python and libraries'}). "
            f"Load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f} (shared machine).",
            "",
            "| mode | threads | s/step | samples/s | throughput vs non-DP | CPU s/step | peak MB | memory vs non-DP |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            *(
                [""]
                + [
                    f"**Unreliable rows** ({'; '.join(noisy)}): other jobs competed for the cores; re-run on a quieter "
                    "machine."
                ]
                if noisy
                else []
            ),
            "",
            "`bookkeeping` (privacy/bookkeeping.py, the site's default `grad-sample-mode`): the backward pass computes no "
            "weight gradient; per-sample gradient norms come from each layer's input and backprop (ghost norms where "
            "the feature map is small, per-sample gradients where it is large); then one weight-gradient computation "
            "per layer with each sample's clip factor. `hooks` stores a gradient per sample per parameter; `ghost` "
            "runs a second backward pass.",
        ],
    )
    print(block)


if __name__ == "__main__":
    main()
