"""How many DDIM steps a preset's sampler needs, measured on PUBLIC data only, side by side in one run.

    python -m bench.bench_sampler_steps CHECKPOINT PUBLIC_FOLDER [--steps 50 25 10] [--samples 200] [--guidance 3]

CHECKPOINT is a public pretrained checkpoint (`fedsynth pretrain`, e.g. the demo's `fedsynth-demo/pretrained/*.pt`)
and PUBLIC_FOLDER the public images it was trained on (a site-format folder). For each step count the same starting
noise is sampled (healthy class, classifier-free guidance as the recipe's), decoded, and scored as the audit scores
a cohort (privacy/fidelity.py: radiomics Frechet distance, precision / recall / density / coverage against the
public images); the public images' own reconstructions through the autoencoder are scored too (the ceiling), and the
RMS pixel difference of each step count's images from the most steps' (same noise). No site data is read, so the
step count chosen from it (common/config.py) costs no privacy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common.model import build_autoencoder, build_unet, decode, encode, sample_latents
from common.site import load_site
from privacy.fidelity import (
    feature_moments,
    frechet_distance,
    precision_recall_coverage,
    radiomics_features,
)
from server.checkpoint import Checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("public")
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 25, 10])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = Checkpoint.load(args.checkpoint)
    cfg = ckpt.model_config
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    ae.load_state_dict(ckpt.autoencoder)
    unet.load_state_dict(ckpt.unet)
    ae.eval()
    unet.eval()
    scale = float(ckpt.run_state.latent_scale)
    real = load_site(
        Path(args.public), spatial_dims=cfg.spatial_dims, image_size=cfg.image_size
    ).images.astype(np.float32)
    f_real, _ = radiomics_features(real)

    def score(name: str, images: np.ndarray, seconds: float | None = None) -> None:
        f, _ = radiomics_features(images)
        row = {
            "images": name,
            "frechet": round(frechet_distance(feature_moments(f_real), feature_moments(f)), 3),
            **{k: round(v, 3) for k, v in precision_recall_coverage(f_real, f).items()},
        }
        if seconds is not None:
            row["seconds"] = round(seconds, 1)
        print(json.dumps(row), flush=True)

    with torch.no_grad():
        recon = torch.cat(
            [decode(ae, encode(ae, c)[0] * scale, scale) for c in torch.from_numpy(real).split(100)]
        )
    score(f"{len(real)} public images through the autoencoder (the ceiling)", recon.numpy())
    noise = torch.randn(
        (args.samples,) + cfg.latent_shape, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.zeros(args.samples, dtype=torch.long)  # healthy: the class the public data shows
    samples: dict[int, np.ndarray] = {}
    for steps in sorted(args.steps, reverse=True):
        t = time.perf_counter()
        with torch.no_grad():
            z = torch.cat(
                [
                    sample_latents(unet, cfg, labels[i : i + 50], steps=steps, noise=noise[i : i + 50],
                                   guidance_scale=args.guidance)
                    for i in range(0, args.samples, 50)
                ]
            )  # fmt: skip
            samples[steps] = torch.cat([decode(ae, c, scale) for c in z.split(100)]).numpy()
        score(f"DDIM {steps}", samples[steps], time.perf_counter() - t)
    most = max(samples)
    size = float(np.sqrt((samples[most] ** 2).mean()))
    for steps, images in samples.items():
        if steps != most:
            rms = float(np.sqrt(((images - samples[most]) ** 2).mean()))
            print(
                f"DDIM {steps} vs DDIM {most}, same noise: RMS pixel difference {rms:.4f} "
                f"({100 * rms / size:.1f} % of the images' RMS {size:.3f})"
            )


if __name__ == "__main__":
    main()
