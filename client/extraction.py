"""Extraction by many samples, at the site: draw many more samples from the audited model than were released and
search them, with the released cohort, for copies of this site's training patients (privacy/extraction.py).

Who draws: the SITE, not the server. Samples the server drew could be cherry-picked (copies dropped before they
reach the search); the site draws them itself from the weights it was sent, with its own OS entropy
(privacy.dp.entropy_generator), so nothing the server chooses decides which samples are searched, and the samples
never leave the site. Class labels are balanced (the rare class is searched as much as the common one). How many:
the audit request's `extraction_samples` (the server's run config `audit-oversample` x the cohort size), capped
by the site's `max-extraction-samples` (the server cannot make a site sample for hours); the audit says how many
were asked for and drawn, and an audit that drew none never passes (privacy/verdict.py).
What the site cannot check: that the weights it was sent are those the cohort came from (client/audit_admission.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.config import ModelConfig, SiteConfig
from common.model import decode, encode, sample_latents
from common.site import SiteData, load_lesion_masks
from privacy.dp import entropy_generator
from privacy.extraction import Views, extraction_audit

BATCH = 64


@torch.no_grad()
def draw_samples(
    ae,
    unet,
    cfg: ModelConfig,
    latent_scale: float,
    n: int,
    device: torch.device,
    *,
    steps: int = 0,
    guidance_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """n samples (images in [0, 1], their latents) from the model, class-balanced, from the site's entropy, with
    the cohort's sampler (DDIM `steps`, 0: the preset's; classifier-free `guidance_scale`)."""
    gen = entropy_generator("cpu")
    per_class = math.ceil(n / cfg.num_classes)
    labels = torch.arange(cfg.num_classes).repeat_interleave(per_class)[:n]
    labels = labels[torch.randperm(len(labels), generator=gen)]
    images, latents = [], []
    for s in range(0, n, BATCH):
        y = labels[s : s + BATCH].to(device)
        z = sample_latents(
            unet, cfg, y, generator=gen, steps=steps or None, guidance_scale=guidance_scale
        )
        latents.append((z / latent_scale).cpu().numpy())  # the autoencoder's own latent units
        images.append(decode(ae, z, latent_scale).cpu().numpy())
    return np.concatenate(images), np.concatenate(latents)


@torch.no_grad()
def patient_views(ae, data: SiteData, device: torch.device, masks=None) -> Views:
    """Patients as the search sees them: images, reconstructions through the autoencoder, latent means."""
    mu, _ = encode(ae, torch.from_numpy(data.images).to(device))
    rec = ae.decode(mu).clamp(0.0, 1.0).cpu().numpy()
    return Views(data.images, rec, mu.cpu().numpy(), masks=masks)


@torch.no_grad()
def sample_views(ae, images: np.ndarray, device: torch.device, latents=None) -> Views:
    """Generated images as the search sees them: the image itself (against the patients' reconstructions) and
    its latent (the sampler's, else the encoder's mean)."""
    if latents is None:
        latents = encode(ae, torch.from_numpy(images).to(device))[0].cpu().numpy()
    return Views(images, images, latents)


def site_extraction(
    site: SiteConfig,
    cfg: ModelConfig,
    ae,
    unet,
    latent_scale: float,
    device: torch.device,
    released: np.ndarray,
    released_ids: list[str],
    train: SiteData,
    holdout: SiteData,
    samples_requested: int,
    *,
    steps: int = 0,
    guidance_scale: float = 1.0,
) -> dict:
    """The extraction search of one site (aggregates; flagged ids of released images only)."""
    n = max(0, min(int(samples_requested), site.max_extraction_samples))
    masks, problems = load_lesion_masks(
        site.site_dir, train.subject_ids, spatial_dims=cfg.spatial_dims, image_size=cfg.image_size
    )
    drawn = None
    if n:
        images, latents = draw_samples(
            ae, unet, cfg, latent_scale, n, device, steps=steps, guidance_scale=guidance_scale
        )
        drawn = sample_views(ae, images, device, latents)
    out = extraction_audit(
        sample_views(ae, released, device),
        released_ids,
        drawn,
        patient_views(ae, train, device, masks),
        patient_views(ae, holdout, device),
        samples_requested=samples_requested,
    )
    out["max_extraction_samples"] = site.max_extraction_samples
    out["sampler"] = {"steps": steps or cfg.ddim_steps, "guidance_scale": guidance_scale}
    out["lesion_regions"]["mask_problems"] = len(problems)
    return out
