"""The privacy unit is the patient, whatever changes at the site: attacks on the per-patient ledger.

Each test is an attack that worked when the ledger was keyed by a fingerprint of the site name and the exact
training ids: a changed patient set, name or hold-out fraction started an empty history.
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest

from client.task import (
    load_training_data,
    open_ledger,
    run_privacy_claim,
    run_training_round,
)
from common.config import SiteConfig, model_config
from common.model import build_autoencoder
from common.phantoms import make_phantom_sites
from tests.client.conftest import tiny_plan

# tiny_plan is a one-round run: its noise is calibrated to spend (almost) the whole budget in that round
BUDGET = 3.0
AE = build_autoencoder(model_config("tiny")).state_dict()


@pytest.fixture(scope="module")
def spent(tmp_path_factory):
    """A site (data + state folders) whose one-round run "run-a" spent (almost) its whole budget of 3."""
    root = tmp_path_factory.mktemp("spent")
    site_dir = make_phantom_sites(root / "data", n_sites=1, n_subjects=12, size=32, seed=11)[0]
    site = SiteConfig(site_dir=str(site_dir), state_dir=str(root / "state"), epsilon=BUDGET)
    first = run_training_round(site, tiny_plan(run_id="run-a", batch_size=4), AE)
    assert not first.refused and first.privacy["epsilon"] > 0.9 * BUDGET
    trained, _ = load_training_data(site, model_config("tiny"))
    return root, first, set(trained.subject_ids)


@pytest.fixture
def site_dir(tmp_path):
    return make_phantom_sites(tmp_path / "data", n_sites=1, n_subjects=12, size=32, seed=11)[0]


def copy_of(spent, tmp_path, **config) -> SiteConfig:
    """The spent site's data and ledger, copied so that each attack starts from the same state."""
    root, _, _ = spent
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copytree(root / "state", tmp_path / "state")
    return SiteConfig(
        site_dir=str(tmp_path / "data" / "site-0"),
        state_dir=str(tmp_path / "state"),
        epsilon=BUDGET,
        **config,
    )


def add_scan(site_dir, new_id: str, copy_of: str, cls: str, patient: str | None = None) -> None:
    site_dir = Path(site_dir)
    shutil.copy(site_dir / "images" / f"{copy_of}.nii.gz", site_dir / "images" / f"{new_id}.nii.gz")
    with open(site_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows.append({"subject_id": new_id, "class": cls, "site": rows[0].get("site", "")})
    if patient is not None:
        for r in rows:
            r.setdefault("patient_id", r["subject_id"])
        rows[-1]["patient_id"] = patient
    with open(site_dir / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[-1].keys()))
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in rows[-1]} for r in rows)


def test_adding_a_patient_does_not_reset_the_budget(tmp_path, spent):
    site = copy_of(spent, tmp_path)
    for i in range(3):
        add_scan(site.site_dir, f"newcomer{i}", "site0-sub0001", "healthy")
    train, _ = load_training_data(site, model_config("tiny"))
    assert any(s.startswith("newcomer") for s in train.subject_ids)  # the training set did change
    second = run_training_round(site, tiny_plan(run_id="run-b", batch_size=4), AE)
    assert second.refused and "budget" in second.refused and second.state_dict is None
    # the original patients' spend, at the delta it was claimed at, stays within the budget
    assert open_ledger(site).epsilon(spent[1].privacy["delta"]) <= BUDGET + 1e-9


def test_renaming_the_site_keeps_the_history(tmp_path, spent):
    site = copy_of(spent, tmp_path, site_name="renamed-hospital")
    second = run_training_round(site, tiny_plan(run_id="run-b", batch_size=4), AE)
    assert second.refused and "budget" in second.refused
    assert second.privacy["epsilon"] == pytest.approx(spent[1].privacy["epsilon"])


def test_an_unreadable_file_does_not_reset_the_budget(tmp_path, spent):
    site = copy_of(spent, tmp_path)
    victim = sorted(spent[2])[0]
    (Path(site.site_dir) / "images" / f"{victim}.nii.gz").write_bytes(b"broken")
    second = run_training_round(site, tiny_plan(run_id="run-b", batch_size=4), AE)
    assert second.refused and "budget" in second.refused


@pytest.mark.parametrize("fraction", [0.6, 0.9, 0.05])
def test_a_trained_patient_is_never_a_non_member_when_the_holdout_fraction_changes(
    tmp_path, spent, fraction
):
    site = copy_of(spent, tmp_path, holdout_fraction=fraction)
    _, holdout = load_training_data(site, model_config("tiny"))
    assert not spent[2] & set(holdout.subject_ids)
    assert run_training_round(site, tiny_plan(run_id="run-b", batch_size=4), AE).refused


def test_new_patients_get_a_side_on_arrival_and_keep_it(tmp_path, site_dir):
    site = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"))
    cfg = model_config("tiny")
    train, holdout = load_training_data(site, cfg)
    for i in range(6):
        add_scan(site_dir, f"late{i}", "site0-sub0002", "healthy")
    train2, holdout2 = load_training_data(site, cfg)
    assert set(train.subject_ids) <= set(train2.subject_ids)
    assert set(holdout.subject_ids) <= set(holdout2.subject_ids)
    more = SiteConfig(
        site_dir=str(site_dir), state_dir=str(tmp_path / "state"), holdout_fraction=0.9
    )
    train3, holdout3 = load_training_data(more, cfg)
    assert (train3.subject_ids, holdout3.subject_ids) == (train2.subject_ids, holdout2.subject_ids)


def test_two_scans_of_one_patient_are_one_privacy_unit(tmp_path, site_dir):
    """Every patient gets a second scan (labels.csv patient_id): the split keeps them together and DP-SGD
    samples patients (the sampling rate is per patient, not per scan)."""
    with open(site_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        add_scan(site_dir, f"{r['subject_id']}-scan2", r["subject_id"], r["class"], r["subject_id"])
    site = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), epsilon=BUDGET)
    train, holdout = load_training_data(site, model_config("tiny"))
    assert len(train) + len(holdout) == 2 * len(rows)
    for part in (train, holdout):
        for sid in part.subject_ids:
            base = sid.removesuffix("-scan2")
            assert {base, f"{base}-scan2"} <= set(part.subject_ids)
    n_patients = len(train) // 2
    result = run_training_round(
        site,
        tiny_plan(run_id="run-a", batch_size=2),
        build_autoencoder(model_config("tiny")).state_dict(),
    )
    assert not result.refused
    assert result.metrics["steps"] == math.ceil(n_patients / 2)
    assert result.privacy["sample_rate"] == pytest.approx(1 / math.ceil(n_patients / 2))


@pytest.mark.slow
def test_the_round_runs_exactly_the_steps_the_ledger_records(tmp_path):
    """ceil(N / B) = 93: Opacus' loader ran 92 steps, the ledger said 93, the site raised after paying."""
    site_dir = make_phantom_sites(tmp_path / "data", n_sites=1, n_subjects=95, size=32, seed=2)[0]
    site = SiteConfig(
        site_dir=str(site_dir), state_dir=str(tmp_path / "state"), holdout_fraction=0.01, epsilon=50
    )
    train, _ = load_training_data(site, model_config("tiny"))
    assert len(train) == 93
    result = run_training_round(site, tiny_plan(run_id="run-a", batch_size=1), AE)
    assert not result.refused and result.metrics["steps"] == 93


def test_the_audit_time_claim_is_the_runs_patients_spend(tmp_path, spent):
    site = copy_of(spent, tmp_path)
    for i in range(3):
        add_scan(site.site_dir, f"newcomer{i}", "site0-sub0001", "healthy")
    load_training_data(site, model_config("tiny"))  # the newcomers arrive; they trained in no run
    claim = run_privacy_claim(site, open_ledger(site), "run-a")
    assert "formal" in claim["protection"]
    assert claim["epsilon"] == pytest.approx(spent[1].privacy["epsilon"])  # what privacy.json said
    assert claim["delta"] == pytest.approx(spent[1].privacy["delta"])
    unknown = run_privacy_claim(site, open_ledger(site), "some-other-run")
    assert unknown["protection"] == "none" and unknown["epsilon"] == math.inf


def test_a_run_without_dp_is_never_claimed_as_dp(tmp_path, site_dir):
    """Trained with dp=false, audited with dp=true: the claim is "none", not "formal DP, epsilon 0"."""
    no_dp = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), dp=False)
    assert not run_training_round(no_dp, tiny_plan(run_id="run-plain", batch_size=4), AE).refused
    dp_on = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), dp=True)
    claim = run_privacy_claim(dp_on, open_ledger(dp_on), "run-plain")
    assert claim["protection"] == "none" and claim["epsilon"] == math.inf
    # and those patients cannot be given a DP claim by a later DP run
    later = run_training_round(dp_on, tiny_plan(run_id="run-dp", batch_size=4), AE)
    assert later.refused and "without DP" in later.refused
