"""Set-up shared by the site-side tests: a tiny round plan and a phantom hospital's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.messages import RoundPlan
from common.phantoms import make_phantom_sites

TINY_PLAN = dict(
    run_id="run-a",
    server_round=1,
    phase="autoencoder",
    num_server_rounds=1,
    federated_autoencoder_rounds=1,
    preset="tiny",
    local_epochs=1,
    batch_size=5,
    lr=1e-3,
    kl_weight=1e-6,
    latent_scale=1.0,
    proximal_mu=0.0,
    seed=0,
)


def tiny_plan(**overrides) -> RoundPlan:
    """A round plan on the tiny preset: run "run-a", round 1 of 1, the autoencoder phase, one local epoch, batch 5,
    lr 1e-3; a test names what it needs otherwise as `overrides` (RoundPlan fields)."""
    return RoundPlan(**{**TINY_PLAN, **overrides})


@pytest.fixture(scope="session")
def make_site_dir(tmp_path_factory):
    """make_site_dir(n_subjects, seed): a new folder holding one phantom hospital of 32 x 32 slices; its path."""

    def make(n_subjects: int, seed: int) -> Path:
        out = tmp_path_factory.mktemp("phantoms")
        return make_phantom_sites(out, n_sites=1, n_subjects=n_subjects, size=32, seed=seed)[0]

    return make
