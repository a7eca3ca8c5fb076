"""A site's training round, without Flower: data in, DP-SGD, ledger, update and spend out."""

import math

import pytest
import torch

from client.task import (
    load_training_data,
    open_ledger,
    run_training_round,
)
from common.config import SiteConfig, model_config
from common.model import build_autoencoder, build_unet
from tests.client.conftest import tiny_plan


@pytest.fixture(scope="module")
def site_dir(make_site_dir):
    return make_site_dir(n_subjects=20, seed=3)


def test_autoencoder_round_trains_records_spend_and_stays_in_budget(tmp_path, site_dir):
    site = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), epsilon=5.0)
    cfg = model_config("tiny")
    ae = build_autoencoder(cfg).state_dict()
    result = run_training_round(site, tiny_plan(num_server_rounds=2), ae)
    assert not result.refused
    assert result.state_dict.keys() == ae.keys()
    assert any(not torch.equal(result.state_dict[k], ae[k]) for k in ae)
    m = result.metrics
    assert m["num-examples"] == 15  # 20 patients, a quarter held out for the audits
    assert m["steps"] == 3  # ceil(15 / 5) Poisson steps per epoch
    assert 0 < m["epsilon"] <= 5.0
    p = result.privacy
    assert "formal sample-level DP" in p["protection"] and p["accountant"] == "rdp"
    assert p["noise_multiplier"] > 0 and math.isclose(p["sample_rate"], 1 / 3)
    assert math.isclose(p["delta"], min(1e-5, 1 / (10 * 15)))


def test_whole_planned_run_fits_the_budget_and_the_ledger_keeps_counting(tmp_path, site_dir):
    site = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), epsilon=3.0)
    cfg = model_config("tiny")
    ae, unet = build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()
    r1 = run_training_round(site, tiny_plan(num_server_rounds=2), ae)
    r2 = run_training_round(
        site, tiny_plan(phase="diffusion", server_round=2, num_server_rounds=2), unet, r1.state_dict
    )
    assert r1.metrics["epsilon"] < r2.metrics["epsilon"] <= 3.0 + 1e-9
    # The whole planned run used (almost) the whole budget: the noise was calibrated for it, not per round.
    assert r2.metrics["epsilon"] > 0.9 * 3.0
    # A new run on the same patients keeps counting: nothing is left, so the site refuses and says why.
    again = run_training_round(site, tiny_plan(run_id="run-b", num_server_rounds=2), ae)
    assert again.refused and "budget" in again.refused
    assert again.state_dict is None
    train, _ = load_training_data(site, cfg)
    ledger = open_ledger(site)
    assert len(ledger.entries()) == 2
    assert ledger.patients_of("run-a") == set(train.patients)
    assert ledger.epsilon(r2.privacy["delta"], "rdp") == pytest.approx(r2.metrics["epsilon"])


def test_a_replayed_round_is_not_reproducible_under_dp(tmp_path, site_dir):
    """Attack (issue 9, item 1): the server sends the same plan (seed, round) twice to the same patients. Under DP
    the two updates must differ (the noise and the batches are the site's own); without DP the seed reproduces
    the round, as experiments need."""
    cfg = model_config("tiny")
    ae = build_autoencoder(cfg).state_dict()

    def replay(dp: bool, name: str) -> dict:
        site = SiteConfig(
            site_dir=str(site_dir), state_dir=str(tmp_path / name), epsilon=5.0, dp=dp
        )
        result = run_training_round(site, tiny_plan(num_server_rounds=2), ae)
        assert not result.refused
        return result.state_dict

    a, b = replay(True, "a"), replay(True, "b")
    assert any(not torch.equal(a[k], b[k]) for k in a), "a replayed DP round reproduced the update"
    c, d = replay(False, "c"), replay(False, "d")
    assert all(torch.equal(c[k], d[k]) for k in c), "without DP the seed should reproduce the round"


def test_the_lesion_weights_come_from_each_patients_own_mask(tmp_path, site_dir, caplog):
    """Lesion-class records with a mask get weights above 1 exactly where their lesion is; healthy records and
    records without a mask train with the plain loss (weights 1), and a missing or broken mask is reported."""
    import shutil

    import numpy as np

    from client.task import lesion_weights
    from common.site import load_lesion_masks

    cfg = model_config("tiny")
    site = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), epsilon=5.0)
    train, _ = load_training_data(site, cfg)
    w = lesion_weights(site, train, cfg, 20.0)
    assert w.shape == (len(train), 1, cfg.latent_size, cfg.latent_size)
    lesion = torch.from_numpy(train.labels == cfg.class_names.index("lesion"))
    assert lesion.any() and (~lesion).any()
    assert (w[~lesion] == 1).all() and (w[lesion].amax(dim=(1, 2, 3)) > 1).all()
    masks, _ = load_lesion_masks(
        site_dir, train.subject_ids, spatial_dims=2, image_size=cfg.image_size
    )
    i = int(lesion.nonzero()[0])  # where the weight is above 1, the record's own mask has lesion
    grid = torch.nn.functional.adaptive_max_pool2d(
        torch.from_numpy(masks[i]).float(), cfg.latent_size
    )
    assert torch.equal(w[i] > 1, grid > 0)
    assert torch.equal(lesion_weights(site, train, cfg, 0.0), torch.ones_like(w))

    copy = tmp_path / "site"
    shutil.copytree(site_dir, copy)
    lesion_ids = [s for s, y in zip(train.subject_ids, lesion.tolist(), strict=True) if y]
    (copy / "masks" / f"{lesion_ids[0]}.nii.gz").unlink()  # one mask missing
    (copy / "masks" / f"{lesion_ids[1]}.nii.gz").write_bytes(b"not a nifti")  # one broken
    site = SiteConfig(site_dir=str(copy), state_dir=str(tmp_path / "state"), epsilon=5.0)
    with caplog.at_level("WARNING"):
        w2 = lesion_weights(site, train, cfg, 20.0)
    gone = [train.subject_ids.index(s) for s in lesion_ids[:2]]
    assert (w2[gone] == 1).all()
    assert np.array_equal(w2[~lesion].numpy(), w[~lesion].numpy())
    assert f"{lesion_ids[1]}.nii.gz" in caplog.text  # the broken file, named
    assert "2 lesion-class records have no lesion mask" in caplog.text


def test_a_diffusion_round_trains_on_the_lesion_weighted_loss(tmp_path, site_dir):
    """Same draws (a site without DP: the plan's seed), lesion weight 200 vs 0: the reported training loss is the
    weighted one, larger (weights >= 1, and above 1 on the lesions)."""
    cfg = model_config("tiny")
    ae, unet = build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()
    losses = {}
    for weight in (0.0, 200.0):
        site = SiteConfig(
            site_dir=str(site_dir), state_dir=str(tmp_path / f"w{weight}"), dp=False, threads=1
        )
        plan = tiny_plan(phase="diffusion", lesion_weight=weight, batch_size=15)
        result = run_training_round(site, plan, unet, ae)
        assert not result.refused
        losses[weight] = result.metrics["loss"]
    assert losses[200.0] > 1.2 * losses[0.0]
