"""The auditor is itself tested: an overfit generator must be caught, a DP-trained one must not be over-claimed,
and what a site sends back holds aggregates only."""

import json

import numpy as np
import pytest
import torch

from client import canaries, reference
from client.audit import audit_site
from client.task import load_training_data, run_training_round
from common.config import SiteConfig, model_config
from common.model import build_autoencoder, build_unet, ddpm_scheduler, diffusion_loss, encode
from common.phantoms import make_phantom_sites
from privacy.power import holdout_power
from privacy.verdict import build_audit
from tests.client.conftest import tiny_plan

pytestmark = pytest.mark.slow
# The image utility CNNs (privacy/utility.py, 500 steps each by default) are trained by every audit_site call, and
# none of these tests reads their figures: a site's utility-cnn-steps keeps them short (tests/privacy/test_utility.py
# tests the classifiers themselves).
UTILITY_CNN_STEPS = 20


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    return make_phantom_sites(
        tmp_path_factory.mktemp("ph"), n_sites=1, n_subjects=56, size=32, seed=5
    )[0]


def overfit(cfg, ae, train, steps=200):
    """A diffusion UNet trained without DP on a handful of records until it memorises them."""
    torch.manual_seed(0)
    unet = build_unet(cfg)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    mu, _ = encode(ae, torch.from_numpy(train.images))
    labels = torch.from_numpy(train.labels)
    sched = ddpm_scheduler(cfg)
    for _ in range(steps):
        loss = diffusion_loss(
            unet, sched, mu, labels, timesteps=torch.randint(0, 500, (len(mu),))
        ).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


def test_overfit_generator_is_caught(tmp_path, site_dir):
    # Half the patients held out: the matched member set is then all members, as in a well-sized audit.
    site = SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(tmp_path / "s"),
        dp=False,
        holdout_fraction=0.5,
        utility_cnn_steps=UTILITY_CNN_STEPS,
    )
    cfg = model_config("tiny")
    train, holdout = load_training_data(site, cfg)
    assert len(train) >= 25 and len(holdout) >= 25
    torch.manual_seed(0)
    ae = build_autoencoder(cfg).eval()
    unet = overfit(cfg, ae, train)
    # The cohort of a generator that memorised: its samples are its training images, barely perturbed.
    rng = np.random.default_rng(0)
    synthetic = np.clip(
        train.images[:20] + rng.normal(0, 0.002, train.images[:20].shape), 0, 1
    ).astype(np.float32)
    ids = [f"synth-{i:03d}" for i in range(20)]
    result = audit_site(
        site, cfg, synthetic, ids, train.labels[:20], ae.state_dict(), unet.state_dict(), 1.0
    )

    assert result["memorization"]["n_near_copies"] >= 18
    assert set(result["memorization"]["flagged_ids"]) <= set(ids)
    assert result["memorization"]["pixel"]["share_closer_to_member"] > 0.9
    black = result["membership"]["black_box"]
    assert black["auc"] > 0.7
    assert (
        black["epsilon_lower_bound"]["epsilon_lower_bound"] > 0.2
    )  # clearly above 0 with 28 + 28 records
    assert result["membership"]["white_box"]["auc"] > 0.75
    assert result["claimed_privacy"]["protection"] == "none"
    # where the audit's time went, stage by stage (the site's log says it as each ends)
    assert list(result["seconds"]) == [
        "data",
        "memorization",
        "extraction",
        "membership",
        "fidelity",
        "utility",
    ]
    assert all(v >= 0 for v in result["seconds"].values())
    audit = build_audit(
        {site.name: json.loads(json.dumps(result, default=float))}, cohort={"n_images": 20}
    )
    assert audit["verdict"]["status"] in ("review", "fail")


def test_dp_model_is_not_over_claimed(tmp_path, site_dir):
    site = SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(tmp_path / "s"),
        epsilon=1.0,
        utility_cnn_steps=UTILITY_CNN_STEPS,
    )
    cfg = model_config("tiny")
    torch.manual_seed(0)
    ae, start = build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()
    reference.keep_for_round(site, "dp", "diffusion", start)  # as client_app does before the round
    plan = tiny_plan(
        run_id="dp",
        phase="diffusion",
        federated_autoencoder_rounds=0,
        local_epochs=20,
        batch_size=8,
        lr=2e-3,
    )
    trained = run_training_round(site, plan, start, ae)
    assert not trained.refused and 0 < trained.privacy["epsilon"] <= 1.0
    train, _ = load_training_data(site, cfg)
    synthetic = np.random.default_rng(1).random((12, 1, 32, 32)).astype(np.float32)
    result = audit_site(
        site,
        cfg,
        synthetic,
        [f"s{i}" for i in range(12)],
        np.zeros(12, dtype=np.int64),
        ae,
        trained.state_dict,
        1.0,
        run_id="dp",
    )
    claimed = result["claimed_privacy"]["epsilon"]
    assert claimed == pytest.approx(trained.privacy["epsilon"])
    for kind in ("white_box", "black_box"):
        lb = result["membership"][kind]["epsilon_lower_bound"]
        assert lb["epsilon_lower_bound"] <= claimed
        # every bound carries the largest one its record counts allow (privacy/power.py)
        assert (
            lb["epsilon_lower_bound"]
            <= lb["power"]
            == pytest.approx(holdout_power(len(train), result["n_nonmembers"], lb["delta"]))
        )
    # the one-run canary audit: the site's auto gradient canaries, scored against the run's start, never over-claimed
    can = result["membership"]["canaries"]
    assert can["n_canaries"] == canaries.load(site).n > 0
    assert can["epsilon_lower_bound"] <= min(claimed, can["power"])
    audit = build_audit(
        {site.name: json.loads(json.dumps(result, default=float))}, cohort={"n_images": 12}
    )
    assert not audit["verdict"]["dp_suspect"]


def test_site_reply_holds_aggregates_only(tmp_path, site_dir):
    """No real image, feature vector or per-patient value crosses the network: every list in the reply is short
    (ROC points, histogram bins, synthetic ids), and no number equals a real record's pixel vector or score."""
    site = SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(tmp_path / "s"),
        dp=False,
        utility_cnn_steps=UTILITY_CNN_STEPS,
    )
    cfg = model_config("tiny")
    train, holdout = load_training_data(site, cfg)
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    synthetic = np.random.default_rng(2).random((6, 1, 32, 32)).astype(np.float32)
    ids = [f"s{i}" for i in range(6)]
    result = audit_site(
        site,
        cfg,
        synthetic,
        ids,
        np.array([0, 1] * 3),
        ae.state_dict(),
        unet.state_dict(),
        1.0,
        noise_level=0.02,  # the level the site released under DP in the run, as the server sends it back
    )
    ref = result["fidelity"][
        "reference"
    ]  # real hold-out images and their autoencoder reconstructions, for scale
    assert set(ref) == {
        "holdout_patients",
        "holdout_through_autoencoder",
        "holdout_through_autoencoder_with_site_noise",  # the site's own scanner noise added back
        "synthetic_with_site_noise",
    }
    assert (
        ref["holdout_patients"]["precision"] > 0.8 > result["fidelity"]["overall"]["precision"]
    )  # noise is not
    assert (
        ref["holdout_patients"]["frechet_distance"]
        < result["fidelity"]["overall"]["frechet_distance"]
    )
    # the CNNs ran, with the site's steps, and the reply says so
    assert f"{UTILITY_CNN_STEPS} steps" in result["utility"]["cnn"]["classifier"]
    assert "balanced_accuracy" in result["utility"]["cnn"]["train_synthetic_test_real"]
    payload = json.dumps(result, default=float)
    for sid in train.subject_ids + holdout.subject_ids:
        assert sid not in payload  # no patient id
    n_real = len(train) + len(holdout)

    def walk(x, path=""):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            numeric = [v for v in x if isinstance(v, (int, float))]
            # ROC curves are downsampled and histograms binned: never one value per patient or per pixel
            assert len(x) <= 201, f"{path} has {len(x)} entries"
            assert not (
                len(numeric) in (len(train), len(holdout), n_real)
                and path.endswith(("scores", "distances"))
            )
            for v in x:
                walk(v, path)

    walk(json.loads(payload))
    pixels = set(np.round(train.images.ravel()[:2000], 6).tolist()) - {0.0, 1.0}
    numbers = {round(v, 6) for v in _numbers(json.loads(payload))}
    assert len(pixels & numbers) < 5  # coincidences only; no image is in the payload


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, float):
        yield x
