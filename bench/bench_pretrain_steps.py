"""How long public pretraining must run: samples of `fedsynth pretrain`'s model against real public images.

    python -m bench.bench_pretrain_steps [--preset small] [--public 300] [--valid 200] [--unet-steps 1200 4800]
        [--autoencoder-steps 800]

The privacy-utility curve (docs/PERFORMANCE.md) found the cohort's images far from every site's, with or without DP:
tilted, distorted heads with blurred ventricles. A DP fine-tuning can only move a pretrained model so far, so this
bench asks, on PUBLIC data only (healthy subjects of the public protocol: a training set and a validation set of
other subjects), how good the public model itself is and what more pretraining buys. For each `--unet-steps` it
runs `fedsynth pretrain` (server.pretrain.pretrain: the autoencoder, then the UNet, one-cycle schedules, the same
seed, so every row has the same autoencoder) and draws `--samples` healthy images as a cohort would be drawn
(server.synthesis.generate, the preset's DDIM steps, guidance 1: the public data has one class). Each row scores
the images against the validation images as the audit scores a cohort (privacy/fidelity.py: radiomics Frechet
distance, prdc precision / recall / coverage), beside two references: the validation images through the same
autoencoder (the best any sample in this latent space can be) and, since the autoencoder denoises (see
bench_autoencoder_texture), both with the public protocol's Rician noise added back. A figure of samples per row
goes to `--out`. The checkpoints are kept there, for `bench_utility --checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_autoencoder_texture import fidelity_row, reconstruct, rician
from bench.bench_utility import draw_images
from bench.report import figure
from common.config import model_config
from common.phantoms import PROTOCOLS, PUBLIC_PROTOCOL, make_public_phantoms
from privacy.fidelity import radiomics_features
from server.checkpoint import Checkpoint
from server.pretrain import PretrainConfig, load_public, pretrain


def draw(ckpt_path: Path, n: int, seed: int = 0) -> np.ndarray:
    """`n` healthy-class images of the checkpoint, as `fedsynth synthesize` draws them (guidance 1)."""
    ckpt = Checkpoint.load(ckpt_path)
    ae, unet = ckpt.models()
    labels = torch.zeros(n, dtype=torch.long)
    return draw_images(ckpt.model_config, ae, unet, labels, ckpt.run_state.latent_scale, 1.0, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument(
        "--public", type=int, default=300, help="public training subjects (the demo's count)"
    )
    ap.add_argument("--valid", type=int, default=200, help="public validation subjects (others)")
    ap.add_argument("--unet-steps", type=int, nargs="+", default=[1200, 4800])
    ap.add_argument("--autoencoder-steps", type=int, default=800)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-results/pretrain-steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sigma = PROTOCOLS[PUBLIC_PROTOCOL].noise_sigma
    train_dir, valid_dir = out / f"public-{args.public}", out / f"valid-{args.valid}"
    if not train_dir.exists():
        make_public_phantoms(train_dir, args.public, cfg.spatial_dims, cfg.image_size, seed=0)
    if not valid_dir.exists():
        make_public_phantoms(valid_dir, args.valid, cfg.spatial_dims, cfg.image_size, seed=1)
    valid = load_public(valid_dir, cfg).images.astype(np.float32)
    f_real, names = radiomics_features(valid)
    results, pictures = [], [("public validation images (real)", valid)]

    def score(name: str, images: np.ndarray, **extra) -> None:
        row = {"images": name, **fidelity_row(f_real, names, images), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)

    for steps in args.unet_steps:
        pre = PretrainConfig(
            public_dir=str(train_dir),
            out=str(out / f"{args.preset}-ae{args.autoencoder_steps}-unet{steps}.pt"),
            preset=args.preset,
            autoencoder_steps=args.autoencoder_steps,
            unet_steps=steps,
            threads=args.threads,
        )
        t = time.perf_counter()
        if not Path(pre.out).exists():
            pretrain(pre, say=print)
        seconds = round(time.perf_counter() - t)
        if steps == args.unet_steps[0]:
            ae, _ = Checkpoint.load(pre.out).models()
            recon = reconstruct(ae, torch.from_numpy(valid))
            score("validation images through the autoencoder (the ceiling)", recon)
            score(f"the same + Rician noise {sigma:g}", rician(recon, sigma))
            pictures.append(("through the autoencoder", recon))
        t = time.perf_counter()
        samples = draw(Path(pre.out), args.samples)
        score(
            f"samples, UNet {steps} steps",
            samples,
            pretrain_seconds=seconds,
            sample_seconds=round(time.perf_counter() - t),
        )
        score(f"samples, UNet {steps} steps + Rician noise {sigma:g}", rician(samples, sigma))
        pictures.append((f"samples, UNet pretrained {steps} steps", samples))
    (out / "result.json").write_text(json.dumps(results, indent=1))
    figure(pictures, out / "samples.png")
    print(f"wrote {out / 'result.json'} and {out / 'samples.png'}")


if __name__ == "__main__":
    main()
