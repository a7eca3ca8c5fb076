"""Where the sites' fine-tuning takes the public model, WITHOUT DP: the ceiling the DP recipe works under.

    python -m bench.bench_finetune_sites --work bench-results/utility-2400/work \
        --checkpoint bench-results/utility-2400/public-demo.pt [--variants public recipe-fedavg ...]

The privacy-utility curve (bench_utility) found the cohort no closer to the sites with DP than without, and far
from two of the three. This bench separates the causes on the same sites (a finished `bench_utility --work`
folder: its phantom hospitals and their hold-out assignment) and the same public checkpoint. It is a diagnosis,
not a tuning loop: nothing here may choose a recipe (that must come from public data, docs/RECIPE.md); it says
which part of the pipeline a better recipe would have to change. Each variant fine-tunes the public UNet without
noise or clipping (plain Adam on the site's diffusion loss with the recipe's lesion weighting and class dropout),
draws `--per-class` images per class with the recipe's guidance, and scores them against each site's training
patients as the audit does (radiomics Frechet distance, prdc precision and coverage):
- `public`: no fine-tuning at all;
- `recipe-fedavg`: the recipe's plan (attention and conditioning layers, lr 3e-3, batches of 450, 2 rounds of 20
  local steps at each site, plain FedAvg): the no-DP run of the curve, replayed;
- `recipe-pooled`: the same 40 steps on the three sites' patients pooled (no federation: is it client drift?);
- `pooled-no-lesion-weight`: the same without the lesion weighting;
- `site-conditioned`: pooled, with one class embedding per (site, class) (the new ones start at the public
  class's), each site's images drawn under its own: can a label per site separate the protocols?
- `site-conditioned-all-400`: the same, every parameter, 400 steps of 64 at lr 1e-3 (ten times the recipe's
  steps: what a much larger budget could buy).
Two reference rows come first: each site's real hold-out patients (what a perfect generator would score) and the
same patients through the public autoencoder (the best any generator in its latent space can score). With
`--site-noise`, every row of decoded images is scored a second time with Rician noise added at the site's own level
(its training patients' mean level, privacy/noise_level.py: what a site releases under DP with `release-noise-levels`):
the autoencoder denoises, and the radiomics features read the scanner's noise. With `--autoencoder-steps N` the
public autoencoder is first fine-tuned N steps on the three sites' pooled training images without DP (what DP
autoencoder rounds at the sites could at best buy; `--variants` with no name scores the references only).
A figure (`--out`/finetune-sites.png) shows each variant's images beside each site's real ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_autoencoder_texture import fidelity_row, rician
from bench.bench_utility import draw_images
from bench.report import figure
from client.audit import autoencoder_reconstructions
from client.task import lesion_weights, load_training_data
from common.config import SiteConfig
from common.model import (
    autoencoder_loss,
    ddpm_scheduler,
    diffusion_loss,
    drop_labels,
    encode,
    select_trainable,
)
from privacy.fidelity import feature_names, radiomics_features
from privacy.noise_level import patient_noise_levels
from privacy.recipe import CLASS_DROPOUT, GUIDANCE_SCALE, LEARNING_RATE, LESION_WEIGHT
from server.checkpoint import Checkpoint
from server.pretrain import PretrainConfig, lr_scheduler

VARIANTS = (
    "public",
    "recipe-fedavg",
    "recipe-pooled",
    "pooled-no-lesion-weight",
    "site-conditioned",
    "site-conditioned-all-400",
)


class Sites:
    """The phantom hospitals' training patients as latents of the public autoencoder (or of that autoencoder
    fine-tuned on them without DP for `autoencoder_steps`)."""

    def __init__(self, work: Path, ckpt: Checkpoint, autoencoder_steps: int = 0):
        self.cfg = ckpt.model_config
        self.ae, self.unet = ckpt.models()
        self.scale = ckpt.run_state.latent_scale
        self.data, self.holdout, self.real_features = [], [], {}
        loaded = []
        for d in sorted((work / "sites").glob("site-*")):
            site = SiteConfig(site_dir=str(d), state_dir=str(work / "scoring" / d.name))
            loaded.append((d, site, *load_training_data(site, self.cfg)))
        if autoencoder_steps:
            pooled = torch.from_numpy(np.concatenate([train.images for *_, train, _ in loaded]))
            finetune_autoencoder(self.ae, pooled, autoencoder_steps)
        for d, site, train, holdout in loaded:
            mu, sigma = encode(self.ae, torch.from_numpy(train.images))
            weights = lesion_weights(site, train, self.cfg, LESION_WEIGHT)
            labels = torch.from_numpy(train.labels).long()
            self.data.append((d.name, train, mu, sigma, labels, weights))
            self.holdout.append(holdout)
            self.real_features[d.name] = radiomics_features(train.images)[0]  # once per site

    def label(self, site: int, cls: int) -> int:
        """(site, class) -> embedding row: site 0 keeps the class rows, the null class keeps its row, the other
        sites' rows follow it."""
        k = self.cfg.num_classes
        return cls if site == 0 else k + 1 + (site - 1) * k + cls

    def pooled(self, per_site_labels: bool) -> tuple:
        cat = lambda i: torch.cat([d[i] for d in self.data])  # noqa: E731
        labels = (
            torch.cat([self.label(s, 0) + d[4] for s, d in enumerate(self.data)])
            if per_site_labels
            else cat(4)
        )
        return cat(2), cat(3), labels, cat(5)


def finetune_autoencoder(ae: torch.nn.Module, images: torch.Tensor, steps: int) -> None:
    """`steps` of the autoencoder's own loss on `images` (batches of 16, Adam at a quarter of pretraining's peak
    learning rate, one-cycle), without DP, in place: can the public autoencoder learn the sites' protocols at all?"""
    pre = PretrainConfig(public_dir="-", out="-", autoencoder_steps=steps)
    lr = pre.lr_autoencoder / 4
    ae.train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    schedule = lr_scheduler(opt, pre.lr_schedule, lr, steps)
    for _ in range(steps):
        batch = images[torch.randint(0, len(images), (pre.batch_size,))]
        loss = autoencoder_loss(ae, batch, pre.kl_weight).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    ae.eval()


def site_conditioned(sites: Sites) -> torch.nn.Module:
    unet = copy.deepcopy(sites.unet)
    old = unet.class_embedding.weight.data
    k = sites.cfg.num_classes
    emb = torch.nn.Embedding(k + 1 + (len(sites.data) - 1) * k, old.shape[1])
    with torch.no_grad():
        emb.weight[: k + 1] = old
        for s in range(1, len(sites.data)):
            for c in range(k):
                emb.weight[sites.label(s, c)] = old[c]
    unet.class_embedding = emb
    return unet


def train(sites, unet, data, steps, lr, batch, which, lesion_weighting=True):
    """Plain Adam on the diffusion loss (no clipping, no noise), batches drawn with replacement."""
    select_trainable(unet, which)
    opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=lr)
    scheduler = ddpm_scheduler(sites.cfg)
    mu, sigma, labels, weights = data
    for _ in range(steps):
        idx = torch.randint(0, len(mu), (batch,))
        z = (mu[idx] + sigma[idx] * torch.randn_like(mu[idx])) * sites.scale
        y = drop_labels(labels[idx], CLASS_DROPOUT, sites.cfg.null_class)
        w = weights[idx] if lesion_weighting else torch.ones_like(weights[idx])
        loss = diffusion_loss(unet, scheduler, z, y, weight=w).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet


def fedavg(sites, rounds, local_steps):
    model = copy.deepcopy(sites.unet)
    for _ in range(rounds):
        states = [
            train(
                sites,
                copy.deepcopy(model),
                (d[2], d[3], d[4], d[5]),
                local_steps,
                LEARNING_RATE,
                450,
                "attention-conditioning",
            ).state_dict()
            for d in sites.data
        ]
        model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return model


def make(sites: Sites, variant: str) -> tuple[torch.nn.Module, bool]:
    """(fine-tuned UNet, whether it is conditioned per site)."""
    recipe = dict(lr=LEARNING_RATE, batch=450, which="attention-conditioning")
    if variant == "public":
        return copy.deepcopy(sites.unet), False
    if variant == "recipe-fedavg":
        return fedavg(sites, 2, 20), False
    if variant == "recipe-pooled":
        return train(sites, copy.deepcopy(sites.unet), sites.pooled(False), 40, **recipe), False
    if variant == "pooled-no-lesion-weight":
        unet = copy.deepcopy(sites.unet)
        return train(sites, unet, sites.pooled(False), 40, **recipe, lesion_weighting=False), False
    if variant == "site-conditioned":
        return train(sites, site_conditioned(sites), sites.pooled(True), 40, **recipe), True
    if variant == "site-conditioned-all-400":
        unet = site_conditioned(sites)
        return train(sites, unet, sites.pooled(True), 400, 1e-3, 64, "all"), True
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def score(real_features: np.ndarray, images: np.ndarray) -> dict:
    """Frechet distance / precision / coverage against a site's training patients, as the audit scores a cohort."""
    row = fidelity_row(real_features, feature_names(), images)
    return {key: row[key] for key in ("frechet", "precision", "coverage")}


def draw(sites: Sites, unet, labels: list[int]) -> np.ndarray:
    return draw_images(sites.cfg, sites.ae, unet, labels, sites.scale, GUIDANCE_SCALE, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="a finished bench_utility --work folder")
    ap.add_argument("--checkpoint", required=True, help="the public checkpoint that run used")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument(
        "--autoencoder-steps",
        type=int,
        default=0,
        help="first fine-tune the public autoencoder on the sites' pooled training images, without DP (a "
        "diagnosis of the autoencoder's ceiling; the UNet variants then run on its latents)",
    )
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--site-noise",
        action="store_true",
        help="also score every decoded row with the site's own Rician noise level added",
    )
    ap.add_argument("--out", default="bench-results/finetune-sites")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sites = Sites(Path(args.work), Checkpoint.load(args.checkpoint), args.autoencoder_steps)
    k, n = sites.cfg.num_classes, args.per_class
    results, pictures = {}, []
    for name, train_set, *_ in sites.data:
        real = np.concatenate([train_set.images[train_set.labels == c][:4] for c in range(k)])
        pictures.append((f"{name}: real patients", real))
    references: dict[str, dict] = {
        "real hold-out patients": {},
        "hold-out through the autoencoder": {},
    }
    sigma = {
        name: float(
            patient_noise_levels(train_set.images, train_set.records_by_patient())[0].mean()
        )
        for name, train_set, *_ in sites.data
    }
    if args.site_noise:
        print("the sites' noise levels (background):", json.dumps(sigma), flush=True)
        references["the same + the site's noise"] = {}
    for (name, *_), holdout in zip(sites.data, sites.holdout, strict=True):
        recon = autoencoder_reconstructions(sites.ae, holdout, sites.scale, torch.device("cpu"))
        scored = [holdout.images, recon] + ([rician(recon, sigma[name])] if args.site_noise else [])
        for ref, images in zip(references, scored, strict=True):
            references[ref][name] = score(sites.real_features[name], images)
    for ref, row in references.items():
        results[ref] = row
        print(ref, json.dumps(row), flush=True)
    for variant in args.variants:
        torch.manual_seed(0)
        t = time.perf_counter()
        unet, per_site = make(sites, variant)
        row = {"train_seconds": round(time.perf_counter() - t)}
        shared = None if per_site else draw(sites, unet, [c for c in range(k) for _ in range(n)])
        for s, (name, *_) in enumerate(sites.data):
            labels = [sites.label(s, c) if per_site else c for c in range(k) for _ in range(n)]
            images = draw(sites, unet, labels) if per_site else shared
            row[name] = score(sites.real_features[name], images)
            if args.site_noise:
                noisy = rician(images, sigma[name], seed=s)
                row[f"{name} + noise"] = score(sites.real_features[name], noisy)
            if per_site or s == 0:
                shown = np.concatenate([images[c * n : c * n + 4] for c in range(k)])
                where = f", {name}'s condition" if per_site else ""
                pictures.append((f"{variant}{where}", shown))
        results[variant] = row
        print(variant, json.dumps(row), flush=True)
        (out / "result.json").write_text(json.dumps(results, indent=1))
        figure(pictures, out / "finetune-sites.png")
    print(f"wrote {out / 'result.json'} and {out / 'finetune-sites.png'}")


if __name__ == "__main__":
    main()
