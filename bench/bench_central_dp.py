"""What central (client-level) DP costs: the same short federation with central DP off and on, side by side.

    python -m bench.bench_central_dp [--sites 3] [--rounds 6] [--noise 1.0] [--clip 0] [--preset tiny]

Runs the real server loop (server.training.Federation) and the real ClientApp handler + its central-DP clipping
mod in-process (no deployment: the TLS path is tested in tests/integration), with sample-level DP-SGD at every site
in both arms. Reports, per run: each round's model-update norms (measured before clipping, server side of this
script only), the norm of the noise the server adds to the aggregate (sigma x C / n x sqrt(parameters)), their ratio,
the client-level epsilon, and the final models' losses on held-out public phantoms (never trained on).
--clip 0 takes the median update norm of the run without central DP (clipping then hardly changes the updates,
so what the comparison shows is the noise).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from flwr.supercore.task_identity import TaskIdentity

from bench.report import write_block
from client.client_app import central_dp_clipping_mod, train
from common.config import RunConfig, model_config
from common.messages import ARRAYS, CONFIG
from common.model import (
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    diffusion_loss,
    encode,
)
from common.phantoms import make_phantom_sites
from server.central_dp import update_norm
from server.checkpoint import Checkpoint
from server.run_folder import RunFolder
from server.training import Federation


def public_phantoms(cfg, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` phantom images (three default sites, a seed no site here uses) through the sites' loader, and labels."""
    from common.site import load_site

    with tempfile.TemporaryDirectory() as tmp:
        sites = make_phantom_sites(
            Path(tmp),
            n_sites=3,
            n_subjects=max(2, -(-n // 3)),
            dims=cfg.spatial_dims,
            size=cfg.image_size,
            seed=seed,
        )
        data = [
            load_site(
                s,
                class_names=cfg.class_names,
                spatial_dims=cfg.spatial_dims,
                image_size=cfg.image_size,
            )
            for s in sites
        ]
    images = torch.from_numpy(np.concatenate([d.images for d in data]))
    labels = torch.from_numpy(np.concatenate([d.labels for d in data]))
    return images, labels


class InProcessGrid:
    """The sites answer in this process, through the ClientApp's train handler and its central-DP mod."""

    def __init__(self, node_configs: list[dict]):
        self.contexts = {i + 1: SimpleNamespace(node_config=c) for i, c in enumerate(node_configs)}
        self.norms: dict[int, list[float]] = {}  # round -> update norms before clipping

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            sent = m.content[ARRAYS].to_numpy_ndarrays()
            r = int(m.content[CONFIG]["server-round"])

            def measured(msg, ctx, sent=sent, r=r):
                reply = train(msg, ctx)
                if "arrays" in reply.content:
                    self.norms.setdefault(r, []).append(
                        update_norm(reply.content[ARRAYS].to_numpy_ndarrays(), sent)
                    )
                return reply

            replies.append(
                central_dp_clipping_mod(m, self.contexts[m.metadata.dst_node_id], measured)
            )
        return replies


@torch.no_grad()
def held_out_losses(checkpoint: Path, preset: str) -> dict[str, float]:
    """Autoencoder reconstruction loss and diffusion loss of the final model on public phantoms (fixed noise)."""
    ckpt = Checkpoint.load(checkpoint)
    cfg = model_config(preset, latent_scale=ckpt.run_state.latent_scale)
    images, labels = public_phantoms(cfg, 60, seed=2_000_003)
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    ae.load_state_dict(ckpt.autoencoder)
    unet.load_state_dict(ckpt.unet)
    ae.eval(), unet.eval()
    torch.manual_seed(0)
    rec = float(autoencoder_loss(ae, images, 0.0).mean())
    mu, sigma = encode(ae, images)
    z = mu * ckpt.run_state.latent_scale
    torch.manual_seed(0)
    diff = float(
        np.mean([diffusion_loss(unet, ddpm_scheduler(cfg), z, labels).mean() for _ in range(8)])
    )
    return {"autoencoder_mse": rec, "diffusion_loss": diff}


def one_run(work: Path, name: str, sites: list[Path], args, **central) -> dict:
    torch.manual_seed(0)
    np.random.seed(0)
    node_configs = [
        {
            "site-dir": str(s),
            "site-name": s.name,
            "state-dir": str(work / name / "state" / s.name),
            "epsilon": args.epsilon,
            "threads": 1,
        }
        for s in sites
    ]
    run = RunConfig(
        preset=args.preset,
        num_server_rounds=args.rounds,
        autoencoder_rounds=args.ae_rounds,
        batch_size=8,
        min_sites=len(sites),
        run_dir=str(work / name / "run"),
        synthesize_per_class=0,
        seed=0,
        **central,
    )
    grid = InProcessGrid(node_configs)
    t0 = time.time()
    ckpt = Federation(grid, run, progress=lambda m: None).run_rounds()
    privacy = RunFolder(Path(run.run_dir)).read_privacy()
    cfg = model_config(args.preset)
    params = {
        "autoencoder": sum(v.numel() for v in build_autoencoder(cfg).state_dict().values()),
        "diffusion": sum(v.numel() for v in build_unet(cfg).state_dict().values()),
    }
    rounds = []
    for r in sorted(grid.norms):
        phase = run.phase(r)
        row = {"round": r, "phase": phase, "update_norms": [round(x, 4) for x in grid.norms[r]]}
        if run.central_dp != "off":
            c, n = run.central_dp_clipping_norm, len(sites)
            noise_norm = run.central_dp_noise_multiplier * c / n * math.sqrt(params[phase])
            mean_update = min(statistics.mean(grid.norms[r]), c)  # at most C after clipping
            row |= {
                "noise_norm": round(noise_norm, 3),
                "noise_to_update": round(noise_norm / mean_update, 1),
            }
        rounds.append(row)
    return {
        "name": name,
        "seconds": round(time.time() - t0, 1),
        "rounds": rounds,
        "client_level": privacy["client_level"],
        "held_out": held_out_losses(ckpt, args.preset),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--subjects", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--ae-rounds", type=int, default=2)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument(
        "--clip",
        type=float,
        default=0.0,
        help="0: the median update norm of the run without central DP",
    )
    ap.add_argument("--epsilon", type=float, default=8.0, help="each site's sample-level budget")
    ap.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md")
    )
    args = ap.parse_args()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        1,
        0,
        1,
    )  # no deployment: stamp messages
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = model_config(args.preset).image_size
        sites = make_phantom_sites(
            work / "sites", n_sites=args.sites, n_subjects=args.subjects, size=size, seed=7
        )
        off = one_run(work, "central-dp-off", sites, args)
        clip = args.clip or statistics.median(x for r in off["rounds"] for x in r["update_norms"])
        on = one_run(
            work,
            "central-dp-on",
            sites,
            args,
            central_dp="client-side-fixed",
            central_dp_noise_multiplier=args.noise,
            central_dp_clipping_norm=round(clip, 4),
        )
    print(
        json.dumps(
            {"args": vars(args), "clipping_norm": clip, "runs": [off, on]}, indent=1, default=str
        )
    )
    print(write_block(args.out, "bench_central_dp", report_lines(args, clip, off, on)))


def report_lines(args, clip: float, off: dict, on: dict) -> list[str]:
    """The side-by-side table for docs/PERFORMANCE.md."""
    lines = [
        f"### What client-level (central) DP costs with {args.sites} sites (`python -m bench.bench_central_dp "
        f"--preset {args.preset} --sites {args.sites} --rounds {args.rounds} --noise {args.noise}`)",
        "",
        f"{args.sites} phantom sites x {args.subjects} patients, {args.ae_rounds} autoencoder + "
        f"{args.rounds - args.ae_rounds} diffusion rounds, sample-level DP-SGD (epsilon {args.epsilon}) at every "
        f"site in both runs; central DP: sigma {args.noise}, clipping norm C = {clip:.4g} (the median update "
        "norm without central DP). Held-out losses on public phantoms never trained on (lower is better; "
        "predicting nothing scores about 1).",
        "",
        "| run | autoencoder MSE | diffusion loss | noise / mean update (autoencoder, diffusion rounds) | "
        "client-level epsilon |",
        "|---|---|---|---|---|",
    ]
    for run in (off, on):
        ratios = [r["noise_to_update"] for r in run["rounds"] if "noise_to_update" in r]
        eps = run["client_level"].get("epsilon")
        lines.append(
            f"| {run['name']} | {run['held_out']['autoencoder_mse']:.4g} | "
            f"{run['held_out']['diffusion_loss']:.4g} | {', '.join(f'{x:g}' for x in ratios) or '-'} | "
            f"{f'{eps:.2f}' if isinstance(eps, (int, float)) else 'none'} |"
        )
    return lines


if __name__ == "__main__":
    main()
