"""How a site's DP fine-tuning of the diffusion UNet is set up, from public facts only.

`dp_recipe(epsilon, delta, n_patients, ...)` returns the expected Poisson batch size, the epochs and steps, the
clipping norm, the learning rate and the trainable parameter set. Its inputs are the site's budget (public: it is
in the privacy claim), its patient count (revealed to within a batch anyway by the sampling rate 1 / ceil(N / B)
that the ledger and the privacy claim carry) and the model preset. Nothing here looks at a patient: choosing
hyper-parameters on the sensitive data would void the guarantee (DPImageBench 2025).

The constants below were chosen by a short experiment on PUBLIC phantoms only (`python -m bench.bench_recipe`,
docs/RECIPE.md): public pretraining on healthy subjects of one protocol, then DP fine-tuning at epsilon 10 on a
second public phantom set with another protocol and simulated lesions, scored on public validation phantoms.

Why these shapes (DP-SGD folklore, checked in that experiment):
- Large expected batches (DP-LDM: about 2,000): the clipped signal grows with B while the noise std sigma x C does
  not, and at fixed epsilon sigma grows more slowly than the sampling rate. We sample a fixed share of the patients
  per step (`BATCH_FRACTION`), capped at `MAX_BATCH`.
- With Adam and every per-sample gradient clipped, the update does not depend on C (Adam divides out the scale), so
  C only sets which gradients are clipped; a C below the typical per-sample norm clips all of them.
- Steps: a fixed number of DP-SGD steps (`TARGET_STEPS`), at most `MAX_EPOCHS` passes over the data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from common.config import AE_TRAINABLE, DP_TRAINABLE, PRESETS
from privacy.accounting import calibrate_noise_multiplier

BATCH_FRACTION = 0.25  # expected share of a site's patients in each DP-SGD step
MIN_BATCH = 16
MAX_BATCH = 2048  # DP-LDM's scale
TARGET_STEPS = 40  # DP-SGD steps over the whole run at a site
MAX_EPOCHS = 100
MAX_GRAD_NORM = 1.0
LEARNING_RATE = (
    3e-3  # measured best for attention-conditioning (docs/RECIPE.md); "all" diverged at 3e-3
)
DP_TRAINABLE_SET = "attention-conditioning"
# The autoencoder rounds' trainable set and learning rate: chosen by bench/bench_ae_recipe.py on public stand-in
# phantoms at a site's size, never on a site (docs/RECIPE.md: lowest Frechet distance of 5 settings; 3e-4 ties it)
AE_TRAINABLE_SET = "all"
AE_LEARNING_RATE = 1e-3
CLASS_DROPOUT = 0.1
GUIDANCE_SCALE = 3.0
LESION_WEIGHT = (
    20.0  # the lesion region's extra loss weight (docs/RECIPE.md: public tuning phantoms)
)


@dataclass(frozen=True)
class DPRecipe:
    """RunConfig keys (batch-size, local-epochs, lr-diffusion, dp-trainable, class-dropout, guidance-scale,
    lesion-weight) and the
    site's max-grad-norm, plus what the site will then calibrate (for information: the site decides)."""

    batch_size: int
    local_epochs: int  # per diffusion round
    diffusion_rounds: int
    steps: int  # DP-SGD steps at the site over the run (its autoencoder rounds, if any, and diffusion rounds)
    sample_rate: float
    noise_multiplier: float  # what a fresh site calibrates for this plan at (epsilon, delta)
    max_grad_norm: float
    lr: float
    dp_trainable: str
    class_dropout: float
    guidance_scale: float
    lesion_weight: float
    # DP rounds of the public autoencoder at the sites before the diffusion rounds, and their RunConfig keys
    # (lr-autoencoder, dp-trainable-autoencoder)
    autoencoder_rounds: int
    lr_autoencoder: float
    dp_trainable_autoencoder: str

    def as_dict(self) -> dict:
        return asdict(self)


def dp_recipe(
    epsilon: float,
    delta: float,
    n_patients: int,
    preset: str = "small",
    diffusion_rounds: int = 1,
    target_steps: int = TARGET_STEPS,
    autoencoder_rounds: int = 0,
) -> DPRecipe:
    """The recipe for a site with `n_patients` training patients and budget (epsilon, delta) over the run.

    `autoencoder_rounds` DP rounds of the public autoencoder come first (AE_TRAINABLE_SET at AE_LEARNING_RATE); they
    run the diffusion rounds' batch and epochs (a run has one of each), so they add their steps to the run's and the
    noise is calibrated over all of them.

    `n_patients` may be approximate (the server knows it to within a batch); with several sites of different
    sizes, pass the smallest (its batch is the smallest and its noise the largest)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r}; choose one of {sorted(PRESETS)}")
    if not (epsilon > 0 and 0 < delta < 1 and n_patients >= 1 and diffusion_rounds >= 1):
        raise ValueError("need epsilon > 0, 0 < delta < 1, n_patients >= 1, diffusion_rounds >= 1")
    if autoencoder_rounds < 0:
        raise ValueError("autoencoder_rounds must be >= 0")
    if DP_TRAINABLE_SET not in DP_TRAINABLE:  # pragma: no cover - a constant edited by hand
        raise ValueError(f"DP_TRAINABLE_SET {DP_TRAINABLE_SET!r} is not one of {DP_TRAINABLE}")
    if AE_TRAINABLE_SET not in AE_TRAINABLE:  # pragma: no cover - a constant edited by hand
        raise ValueError(f"AE_TRAINABLE_SET {AE_TRAINABLE_SET!r} is not one of {AE_TRAINABLE}")
    batch = min(MAX_BATCH, max(MIN_BATCH, round(BATCH_FRACTION * n_patients)), n_patients)
    per_epoch = math.ceil(
        n_patients / batch
    )  # the site's steps per epoch (client/task.py steps_per_round)
    epochs = max(1, min(MAX_EPOCHS, math.ceil(target_steps / (per_epoch * diffusion_rounds))))
    steps = per_epoch * epochs * (diffusion_rounds + autoencoder_rounds)
    q = 1.0 / per_epoch
    sigma = calibrate_noise_multiplier(epsilon, delta, q, steps, max_noise=1e3)
    return DPRecipe(
        batch_size=batch,
        local_epochs=epochs,
        diffusion_rounds=diffusion_rounds,
        steps=steps,
        sample_rate=q,
        noise_multiplier=sigma,
        max_grad_norm=MAX_GRAD_NORM,
        lr=LEARNING_RATE,
        dp_trainable=DP_TRAINABLE_SET,
        class_dropout=CLASS_DROPOUT,
        guidance_scale=GUIDANCE_SCALE,
        lesion_weight=LESION_WEIGHT,
        autoencoder_rounds=autoencoder_rounds,
        lr_autoencoder=AE_LEARNING_RATE,
        dp_trainable_autoencoder=AE_TRAINABLE_SET,
    )
