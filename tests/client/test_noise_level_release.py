"""The scanner noise-level release in a site's rounds (client/task.py, privacy/noise_level.py): planned into the
run's budget from its first round, made once, in the site's first diffusion round, charged to every training patient
before it leaves, and answered again (never made again) when that round is asked for again."""

import dataclasses

import pytest

from client.task import NOISE_LEVEL_PHASE, load_training_data, open_ledger, run_training_round
from common.config import SiteConfig, model_config
from common.model import build_autoencoder, build_unet
from tests.client.conftest import tiny_plan

PLAN = tiny_plan(
    run_id="run-noise",
    num_server_rounds=3,
    federated_autoencoder_rounds=1,
    release_noise_level=True,
)
DIFFUSION = dataclasses.replace(PLAN, server_round=2, phase="diffusion")
EPSILON, MULTIPLIER = 4.0, 5.0


@pytest.fixture(scope="module")
def site_dir(make_site_dir):
    return make_site_dir(n_subjects=24, seed=8)


@pytest.fixture(scope="module")
def models():
    cfg = model_config("tiny")
    return build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()


def _site(site_dir, state) -> SiteConfig:
    return SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(state),
        epsilon=EPSILON,
        noise_level_multiplier=MULTIPLIER,
        threads=1,
    )


def test_the_release_is_planned_from_the_first_round_made_once_and_within_the_budget(
    tmp_path, site_dir, models
):
    ae, unet = models
    site = _site(site_dir, tmp_path / "state")
    ledger = open_ledger(site)
    first = run_training_round(site, PLAN, ae)
    assert not first.refused and "noise-level" not in first.metrics
    # the same round of a run that asks for no release: the release's share of the budget is reserved from round 1,
    # so the DP-SGD noise is larger with it (without the reserve the last rounds would find the budget spent)
    plain = _site(site_dir, tmp_path / "plain")
    run_training_round(plain, dataclasses.replace(PLAN, release_noise_level=False), ae)
    [with_release], [without] = ledger.entries(), open_ledger(plain).entries()
    assert with_release["noise_multiplier"] > without["noise_multiplier"]

    second = run_training_round(site, DIFFUSION, unet, ae)
    assert not second.refused
    train, _ = load_training_data(site, model_config("tiny"), ledger)
    n = len(train.patients)
    assert second.metrics["noise-level-std"] == pytest.approx(MULTIPLIER * 0.1 / n)
    assert 0.0 <= second.metrics["noise-level"] < 0.1 + 5 * second.metrics["noise-level-std"]
    releases = [e for e in ledger.entries() if e["phase"] == NOISE_LEVEL_PHASE]
    assert len(releases) == 1
    [r] = releases
    # one Gaussian mechanism over every training patient, with the site's own clip and multiplier
    assert (r["server_round"], r["sample_rate"], r["steps"]) == (2, 1.0, 1)
    assert (r["noise_multiplier"], r["clipping_norm"]) == (MULTIPLIER, 0.1)
    assert ledger.patients_of("run-noise") == set(train.patients) and r["n_patients"] == n
    # the reported spend includes it
    assert second.privacy["epsilon"] == pytest.approx(
        ledger.epsilon(second.privacy["delta"], "rdp"), rel=1e-9
    )

    # the same round asked again: the same level, from the kept reply; nothing made or charged again
    again = run_training_round(site, DIFFUSION, unet, ae)
    assert again.replayed and again.metrics["noise-level"] == second.metrics["noise-level"]
    assert len(ledger.entries()) == 3

    # the next diffusion round: no second release of the same patients' level
    third = run_training_round(site, dataclasses.replace(DIFFUSION, server_round=3), unet, ae)
    assert not third.refused and "noise-level" not in third.metrics
    assert [e["phase"] for e in ledger.entries()].count(NOISE_LEVEL_PHASE) == 1
    # the whole run, release included, within every patient's budget
    assert third.privacy["epsilon"] <= EPSILON


def test_a_release_the_budget_cannot_pay_for_refuses_the_round(tmp_path, site_dir, models):
    """Attack: the run asks for the release from a site whose release alone (a multiplier of 0.5: epsilon above 10)
    costs more than its budget, while its DP-SGD would fit. Planned together, the round is refused with the reason:
    nothing is trained, released or charged. Without the release the same round trains."""
    ae, unet = models
    site = dataclasses.replace(_site(site_dir, tmp_path / "state"), noise_level_multiplier=0.5)
    result = run_training_round(site, DIFFUSION, unet, ae)
    assert result.refused.startswith("privacy budget"), result.refused
    assert result.state_dict is None and open_ledger(site).entries() == []
    plain = dataclasses.replace(site, state_dir=str(tmp_path / "plain"))
    trained = run_training_round(
        plain, dataclasses.replace(DIFFUSION, release_noise_level=False), unet, ae
    )
    assert not trained.refused


def test_a_site_without_dp_releases_its_exact_level_recorded_without_a_guarantee(
    tmp_path, site_dir, models
):
    ae, unet = models
    site = dataclasses.replace(_site(site_dir, tmp_path / "state"), dp=False)
    result = run_training_round(site, DIFFUSION, unet, ae)
    assert result.metrics["noise-level-std"] == 0.0 and result.metrics["noise-level"] > 0
    [release] = [e for e in open_ledger(site).entries() if e["phase"] == NOISE_LEVEL_PHASE]
    assert (release["noise_multiplier"], release["accountant"]) == (0.0, "none")
