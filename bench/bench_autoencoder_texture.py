"""What the autoencoder loses: radiomics fidelity of real images passed through it, measured on PUBLIC data only.

    python -m bench.bench_autoencoder_texture [--preset small] [--public 300] [--valid 200] [--steps 800 3200]
        [--adversarial 0.05 0.01] [--noise 0.01 0.02 0.03]

The audit's fidelity ceiling (docs/PERFORMANCE.md, bench_sampler_steps) says that real images through the
`fedsynth pretrain` autoencoder score radiomics precision / coverage of about 0.08 / 0.02: no generator in that
latent space can do better. This bench asks why and what helps, side by side in one run, on public phantoms only
(healthy subjects of the public protocol: a training set and a validation set of other subjects):
- the autoencoder exactly as `fedsynth pretrain` trains it (server.pretrain.train_autoencoder: squared error + KL),
  for each `--steps` (the one-cycle schedule stretched over them);
- the same with an adversarial term (MONAI's PatchDiscriminator with a least-squares GAN loss, as MONAI's latent
  diffusion tutorials add to their autoencoders; no perceptual network, which would need downloaded weights), at
  each `--adversarial` weight, switched on after `--warmup` of the steps;
- the first plain autoencoder's reconstructions with Rician noise added at each `--noise` sigma (the public protocol's
  own noise level is 0.02 of the image maximum, common/phantoms.py): how much of the gap is the noise the
  autoencoder removes.
Each row: pixel MSE on the validation images, radiomics Frechet distance and prdc precision / recall / coverage of
the reconstructions against the same validation images (privacy/fidelity.py, as the audit scores a cohort), which
features move most (in standard deviations of the real images), and the training seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.config import model_config
from common.model import build_autoencoder, decode, encode
from common.phantoms import PROTOCOLS, PUBLIC_PROTOCOL, make_public_phantoms
from privacy.fidelity import (
    feature_moments,
    frechet_distance,
    precision_recall_coverage,
    radiomics_features,
)
from privacy.noise_level import add_rician_noise
from server.pretrain import PretrainConfig, load_public, lr_scheduler, train_autoencoder


def reconstruct(ae, images: torch.Tensor) -> np.ndarray:
    ae.eval()
    with torch.no_grad():
        return torch.cat([decode(ae, encode(ae, c)[0], 1.0) for c in images.split(100)]).numpy()


def train_adversarial(cfg, pre: PretrainConfig, images: torch.Tensor, weight: float, warmup: float):
    """`train_autoencoder`'s loop plus a patch discriminator's least-squares adversarial term after the warm-up."""
    from monai.losses import PatchAdversarialLoss
    from monai.networks.nets import PatchDiscriminator

    torch.manual_seed(pre.seed)
    ae = build_autoencoder(cfg)
    disc = PatchDiscriminator(
        spatial_dims=cfg.spatial_dims, num_layers_d=2, channels=32, in_channels=1
    )
    opt = torch.optim.Adam(ae.parameters(), lr=pre.lr_autoencoder)
    dopt = torch.optim.Adam(disc.parameters(), lr=5e-4, betas=(0.5, 0.999))
    schedule = lr_scheduler(opt, pre.lr_schedule, pre.lr_autoencoder, pre.autoencoder_steps)
    adv = PatchAdversarialLoss(criterion="least_squares")
    start = int(warmup * pre.autoencoder_steps)
    for step in range(pre.autoencoder_steps):
        x = images[torch.randint(0, len(images), (min(pre.batch_size, len(images)),))]
        recon, mu, sigma = ae(x)
        dims = tuple(range(1, x.ndim))
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1).sum(dim=dims)
        loss = ((recon - x).pow(2).mean(dim=dims) + pre.kl_weight * kl).mean()
        if step >= start:
            loss = loss + weight * adv(
                disc(recon)[-1], target_is_real=True, for_discriminator=False
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        if step >= start:
            fake, real = disc(recon.detach())[-1], disc(x)[-1]
            d_loss = 0.5 * (
                adv(fake, target_is_real=False, for_discriminator=True)
                + adv(real, target_is_real=True, for_discriminator=True)
            )
            dopt.zero_grad()
            d_loss.backward()
            dopt.step()
    return ae


def rician(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (privacy/noise_level.py), clipped to [0, 1]; seeded."""
    return add_rician_noise(images, sigma, np.random.default_rng(seed))


def fidelity_row(f_real: np.ndarray, names: list[str], images: np.ndarray) -> dict:
    """`images` against the real images' features `f_real` as the audit scores a cohort: Frechet distance, prdc
    precision / recall / density / coverage, and the three features that moved most (in real SDs)."""
    f, _ = radiomics_features(images)
    shift = (f.mean(0) - f_real.mean(0)) / (f_real.std(0) + 1e-12)
    top = np.argsort(-np.abs(shift))[:3]
    return {
        "frechet": round(frechet_distance(feature_moments(f_real), feature_moments(f)), 3),
        **{k: round(v, 3) for k, v in precision_recall_coverage(f_real, f).items()},
        "largest_shifts_sd": {names[i]: round(float(shift[i]), 2) for i in top},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument(
        "--public", type=int, default=300, help="public training subjects (the demo's count)"
    )
    ap.add_argument("--valid", type=int, default=200, help="public validation subjects (others)")
    ap.add_argument(
        "--steps", type=int, nargs="+", default=[800], help="autoencoder steps (800: the demo's)"
    )
    ap.add_argument("--adversarial", type=float, nargs="*", default=[0.05, 0.01])
    ap.add_argument(
        "--warmup", type=float, default=0.5, help="share of the steps before the adversarial term"
    )
    ap.add_argument("--noise", type=float, nargs="*", default=[0.01, 0.02, 0.03])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--figure", default="", help="a PNG of validation images and reconstructions")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        size = cfg.image_size
        make_public_phantoms(Path(tmp) / "train", args.public, cfg.spatial_dims, size, seed=0)
        make_public_phantoms(Path(tmp) / "valid", args.valid, cfg.spatial_dims, size, seed=1)
        train = torch.from_numpy(load_public(Path(tmp) / "train", cfg).images.astype(np.float32))
        valid = load_public(Path(tmp) / "valid", cfg).images.astype(np.float32)
    pre = PretrainConfig(public_dir="-", out="-", preset=args.preset)
    f_real, names = radiomics_features(valid)

    def score(name: str, images: np.ndarray, seconds: float | None = None) -> None:
        row = {
            "autoencoder": name,
            "mse": round(float(((images - valid) ** 2).mean()), 5),
            **fidelity_row(f_real, names, images),
            "train_seconds": None if seconds is None else round(seconds),
        }
        print(json.dumps(row), flush=True)

    plain, pictures = None, [("public validation images (real)", valid)]
    for steps in args.steps:
        t = time.perf_counter()
        torch.manual_seed(pre.seed)
        ae = build_autoencoder(cfg)
        ae.load_state_dict(train_autoencoder(cfg, replace(pre, autoencoder_steps=steps), train))
        seconds = time.perf_counter() - t
        recon = reconstruct(ae, torch.from_numpy(valid))
        score(f"fedsynth pretrain ({steps} steps, {args.public} public images)", recon, seconds)
        plain = recon if plain is None else plain
        pictures.append((f"through the autoencoder trained {steps} steps", recon))
    for sigma in args.noise:
        score(f"the same + Rician noise sigma {sigma:g}", rician(plain, sigma))
    for weight in args.adversarial:
        t = time.perf_counter()
        adv_ae = train_adversarial(
            cfg, replace(pre, autoencoder_steps=args.steps[0]), train, weight, args.warmup
        )
        score(
            f"+ adversarial {weight:g} from {args.warmup:.0%} of the steps",
            reconstruct(adv_ae, torch.from_numpy(valid)),
            time.perf_counter() - t,
        )
    print(f"public protocol noise sigma: {PROTOCOLS[PUBLIC_PROTOCOL].noise_sigma}")
    if args.figure:
        from bench.report import figure

        figure(pictures, Path(args.figure))


if __name__ == "__main__":
    main()
