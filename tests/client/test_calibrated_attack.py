"""The calibrated membership attack at a site: its reference is the UNet the run started from (kept before the
site's first diffusion round, never after), and on a DP-trained model it never over-claims, for the patients nor
for the canaries."""

import json

import numpy as np
import pytest
import torch

from client import canaries, reference
from client.audit import audit_site
from client.task import run_training_round
from common.config import SiteConfig, model_config
from common.model import build_autoencoder, build_unet
from privacy.verdict import build_audit
from tests.client.conftest import tiny_plan
from tests.conftest import record_spend

# audit_site trains the image utility CNNs (500 steps each by default); these tests read none of their figures
UTILITY_CNN_STEPS = 20


@pytest.fixture(scope="module")
def site_dir(make_site_dir):
    return make_site_dir(n_subjects=48, seed=6)


def test_the_reference_is_the_model_the_run_started_from_and_is_never_replaced(tmp_path):
    site = SiteConfig(site_dir=str(tmp_path / "d"), state_dir=str(tmp_path / "s"))
    first = {"w": torch.ones(3)}
    assert reference.keep_for_round(site, "r/1", "autoencoder", first) is None  # not the UNet
    assert reference.keep_for_round(site, "r/1", "diffusion", first) == reference.path_of(
        site, "r/1"
    )
    assert reference.keep_for_round(site, "r/1", "diffusion", {"w": torch.zeros(3)}) is None
    assert torch.equal(reference.load(site, "r/1")["w"], first["w"])
    # a site that already trained the UNet in a run receives weights that carry its own records: never kept
    record_spend(site, "r2", ["p1"], sample_rate=0.1, steps=1)
    assert reference.keep_for_round(site, "r2", "diffusion", first) is None
    assert reference.load(site, "r2") is None
    reference.path_of(site, "r3").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="r3.pt: unreadable reference model.*move it away"):
        reference.load(site, "r3")


@pytest.mark.slow
def test_calibrated_attack_on_a_dp_model_never_over_claims(tmp_path, site_dir):
    site = SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(tmp_path / "s"),
        epsilon=1.0,
        canaries=40,
        utility_cnn_steps=UTILITY_CNN_STEPS,
    )
    cfg = model_config("tiny")
    torch.manual_seed(0)
    ae, start = build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()
    assert reference.keep_for_round(site, "dp", "diffusion", start) is not None
    plan = tiny_plan(
        run_id="dp",
        phase="diffusion",
        federated_autoencoder_rounds=0,
        local_epochs=2,
        batch_size=8,
        lr=2e-3,
    )
    trained = run_training_round(site, plan, start, ae)
    assert not trained.refused and 0 < trained.privacy["epsilon"] <= 1.0
    synthetic = np.random.default_rng(1).random((8, 1, 32, 32)).astype(np.float32)
    result = audit_site(
        site,
        cfg,
        synthetic,
        [f"s{i}" for i in range(8)],
        np.zeros(8, dtype=np.int64),
        ae,
        trained.state_dict,
        1.0,
        run_id="dp",
    )
    claimed = result["claimed_privacy"]["epsilon"]
    # no noise level in the request: no noise-added rows (the site never scores with its own exact level, which
    # would be one more undisturbed aggregate of its patients)
    assert set(result["fidelity"]["reference"]) == {
        "holdout_patients",
        "holdout_through_autoencoder",
    }
    membership = result["membership"]
    cal = membership["calibrated"]
    assert "calibrated_unavailable" not in membership
    assert cal["epsilon_lower_bound"]["epsilon_lower_bound"] <= claimed
    assert cal["per_member"]["n_members"] == result["n_members"]
    assert cal["nonmembers_needed"]["tpr_at_fpr_1pct"] == 100
    assert not cal["resolvable"][
        "tpr_at_fpr_1pct"
    ]  # 12 non-members cannot measure it, and it says so
    can = membership["canaries"]
    assert can["attack"] == canaries.ATTACK and can["n_canaries"] == 40
    assert can["epsilon_lower_bound"] <= min(claimed, can["power"])
    audit = build_audit({site.name: json.loads(json.dumps(result, default=float))}, cohort={})
    assert not audit["verdict"]["dp_suspect"]
    assert any(kind == "calibrated" for _, kind, _ in _attacks(audit, site.name))


def test_without_a_reference_the_audit_says_why_there_is_no_calibrated_attack(tmp_path, site_dir):
    site = SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(tmp_path / "s"),
        dp=False,
        canaries=0,
        utility_cnn_steps=UTILITY_CNN_STEPS,
    )
    cfg = model_config("tiny")
    ae, unet = build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()
    synthetic = np.random.default_rng(2).random((4, 1, 32, 32)).astype(np.float32)
    result = audit_site(
        site, cfg, synthetic, ["a", "b", "c", "d"], np.zeros(4, dtype=np.int64), ae, unet, 1.0
    )
    assert "calibrated" not in result["membership"]
    assert "no reference model" in result["membership"]["calibrated_unavailable"]


def _attacks(audit, name):
    from privacy.audit_schema import attacks

    return attacks(audit["sites"][name])
