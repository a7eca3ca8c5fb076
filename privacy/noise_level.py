"""A site's scanner noise level, released under differential privacy.

The autoencoder denoises: a cohort decoded from it is smoother than any scanner's images, and the radiomics features
that score fidelity read exactly that texture (docs/PERFORMANCE.md: on public data, adding the protocol's Rician noise
back to the decoded images lifts precision / coverage from 0.48 / 0.12 to 0.90 / 0.71). The noise level is a
property of each site's protocol, which public data does not carry, so a site releases its own, under DP:

- each training patient's level is estimated from the background of their images (air outside the head, where a
  magnitude image is pure noise and Rayleigh distributed: `background_sigma`), averaged over the patient's images
  (the privacy unit is the patient, however many images they have), and clipped to [0, clip];
- the clipped levels are summed, the sum gets Gaussian noise of standard deviation `noise_multiplier * clip` (one
  patient moves the sum by at most `clip`), and the noisy sum is divided by the patient count (a count the site's
  DP-SGD plan already treats as public: its sampling rate is a function of it).

That is one Gaussian mechanism over every training patient: `release_step(noise_multiplier)` =
MechanismStep(noise_multiplier, sample_rate=1, steps=1), charged to those patients in the site's ledger and
composed with their DP-SGD steps by the same accountant. The noise is drawn from a generator seeded with the site's
OS entropy (privacy.dp.entropy_generator): nothing the server sends decides it. A patient whose images show no
usable background contributes 0 (inside the clip range, so the bound holds; the count of such patients is
reported, never used to rescale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq

from privacy.accounting import MechanismStep
from privacy.dp import entropy_generator

# Background: pixels of the outer frame of the image (a 1/8 border on every side) that are darker than this share
# of the full intensity range; a head is centred in the field of view, so the frame is air.
BACKGROUND_THRESHOLD = 0.1
FRAME = 1 / 8
MIN_BACKGROUND_PIXELS = 50
_RAYLEIGH_MEDIAN = math.sqrt(2 * math.log(2))  # median of Rayleigh(sigma) / sigma


def _frame(image: np.ndarray) -> np.ndarray:
    """The pixels of the outer border (a FRAME share of each spatial side) of one image (C, *spatial)."""
    spatial = image.shape[1:]
    inner = tuple(slice(max(1, int(n * FRAME)), n - max(1, int(n * FRAME))) for n in spatial)
    mask = np.ones(spatial, dtype=bool)
    mask[inner] = False
    return image[:, mask].ravel()


def background_sigma(image: np.ndarray, threshold: float = BACKGROUND_THRESHOLD) -> float:
    """The Rician noise sigma of one magnitude image (C, *spatial) in [0, 1], from its background; NaN when the
    frame has fewer than MIN_BACKGROUND_PIXELS pixels below `threshold`, or when their median is too close to it
    to tell the noise from the cut (noise of the order of the threshold).

    In air the magnitude is Rayleigh(sigma); keeping only pixels below `threshold` truncates it, so sigma is the
    one whose truncated median is the observed median m: F(m) = F(threshold) / 2 with F(x) = 1 - exp(-x^2 / 2s^2),
    solved with scipy's brentq (without the cut, sigma = m / sqrt(2 ln 2))."""
    pixels = _frame(np.asarray(image, dtype=np.float64))
    background = pixels[pixels < threshold]
    if background.size < MIN_BACKGROUND_PIXELS:
        return math.nan
    m = float(np.median(background))
    if m <= 0:
        return 0.0

    # F(m) - F(t)/2 falls from 1/2 (s -> 0) towards 0, and drops below 0 only when m < t / sqrt(2); the root lies
    # above the uncut solution m / sqrt(2 ln 2)
    def excess(s: float) -> float:
        return -math.expm1(-(m * m) / (2 * s * s)) + 0.5 * math.expm1(-(threshold**2) / (2 * s * s))

    lo, hi = 0.5 * m / _RAYLEIGH_MEDIAN, 50.0 * threshold
    if excess(hi) > 0:  # no sigma explains it: the cut decides the median
        return math.nan
    return float(brentq(excess, lo, hi, xtol=1e-12))


def patient_noise_levels(
    images: np.ndarray, groups: Sequence[Sequence[int]]
) -> tuple[np.ndarray, int]:
    """(each patient's noise level: the mean of their images' `background_sigma`, 0 for a patient with no usable
    image; the number of such patients). `groups`: each patient's record indices (SiteData.records_by_patient)."""
    per_image = np.array([background_sigma(im) for im in images])
    levels, unusable = np.zeros(len(groups)), 0
    for i, records in enumerate(groups):
        usable = per_image[list(records)]
        usable = usable[np.isfinite(usable)]
        if usable.size:
            levels[i] = usable.mean()
        else:
            unusable += 1
    return levels, unusable


def add_rician_noise(images: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """What a scanner's magnitude image carries: |image + complex Gaussian noise of std sigma|, clipped to [0, 1]
    (the phantoms' noise model, common/phantoms.py)."""
    images = np.asarray(images, dtype=np.float64)
    real = images + rng.normal(0.0, sigma, images.shape)
    imaginary = rng.normal(0.0, sigma, images.shape)
    return np.clip(np.hypot(real, imaginary), 0.0, 1.0).astype(np.float32)


def release_step(noise_multiplier: float) -> MechanismStep:
    """The release as the ledger and the accountant see it: one Gaussian mechanism over every training patient."""
    return MechanismStep(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)


@dataclass(frozen=True)
class NoiseLevelRelease:
    """What a site releases: the DP noise level and how it was made (all of it may leave the site)."""

    sigma: float  # the released level (clipped at 0: post-processing)
    n_patients: int
    clip: float
    noise_multiplier: float

    @property
    def std(self) -> float:
        """Standard deviation of the DP noise on the released level."""
        return self.noise_multiplier * self.clip / self.n_patients


def release_noise_level(
    levels: np.ndarray,
    clip: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> NoiseLevelRelease:
    """The Gaussian mechanism on the patients' clipped levels. `generator`: tests only; a site draws from
    privacy.dp.entropy_generator() (OS entropy), never from a seed it was sent. A noise multiplier of 0 (a site
    without DP, experiments) gives the exact mean of the clipped levels."""
    if not (clip > 0 and noise_multiplier >= 0):
        raise ValueError(
            f"a noise-level release needs clip > 0 and noise_multiplier >= 0 (got {clip}, {noise_multiplier})"
        )
    levels = np.asarray(levels, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0:
        raise ValueError("one noise level per patient, at least one patient")
    total = float(np.clip(np.nan_to_num(levels, nan=0.0), 0.0, clip).sum())
    noise = 0.0
    if noise_multiplier > 0:
        gen = generator or entropy_generator()
        noise = float(
            torch.normal(0.0, noise_multiplier * clip, (1,), generator=gen, dtype=torch.float64)
        )
    return NoiseLevelRelease(
        sigma=max(0.0, (total + noise) / levels.size),
        n_patients=int(levels.size),
        clip=float(clip),
        noise_multiplier=float(noise_multiplier),
    )
