"""The audit's positive control over a real deployment (SuperLink + SuperNodes over TLS with node authentication):
a deliberately memorising NON-DP federation whose cohort carries planted exact copies of training patients. The
audit must fail, flag every planted copy, certify epsilon >= 3 with the one-run canary audit at every site, and the
experiment must be labelled everywhere and refused by the release gate."""

import io
import json

import pytest

from client import canaries
from privacy.policy import DEFAULT_POLICY, evaluate_policy
from server.control import CANARY_TARGET, LABEL, ControlOptions, run_control
from server.terminal import QUIET, Console

pytestmark = pytest.mark.slow


def test_memorising_control_fails_its_audit_and_every_planted_copy_is_flagged(tmp_path):
    out = tmp_path / "control"
    opts = ControlOptions(
        out=out,
        subjects=12,
        canaries=1000,
        rounds=1,
        local_epochs=10,
        public_steps=5,
        planted_per_site=2,
        utility_cnn_steps=20,  # the image utility CNNs: this test reads none of their figures
    )
    console = Console(QUIET, stream=io.StringIO(), tty=False)
    rc = run_control(opts, console)
    record = json.loads((out / "control.json").read_text())
    assert rc == 0, record
    assert record["verdict"] == "fail" and record["verdict_is_fail"]
    assert record["every_planted_copy_flagged"] and not record["sites_not_answering"]
    assert record["canary_target_met"] and record["canary_lower_bound_min"] >= CANARY_TARGET
    assert set(record["sites"]) == {"site-0", "site-1"}
    for site in record["sites"].values():
        assert len(site["planted"]) == 2 and site["planted_missed"] == []
        # the one-run audit of the site's gradient canaries certifies the 3, and never more than its size
        # allows (a perfect attack on 1,000 canaries: 5.37)
        assert site["n_canaries"] == 1000 and site["canary_attack"] == canaries.ATTACK
        assert CANARY_TARGET <= site["canary_epsilon_lower_bound"] <= site["canary_power"]
        assert {"white_box", "calibrated", "black_box"} <= set(site["attacks"])
    assert record["releasable"] is False and record["experiment"] == LABEL

    audit = json.loads((out / "planted" / "audit" / "audit.json").read_text())
    assert audit["cohort"]["experiment"] == LABEL
    manifest = json.loads((out / "planted" / "cohort" / "manifest.json").read_text())
    assert manifest["run_config"]["experiment"] == LABEL
    assert json.loads((out / "run" / "run.json").read_text())["run_config"]["experiment"] == LABEL
    page = (out / "planted" / "audit" / "audit.html").read_text()
    assert "EXPERIMENT: NOT A RELEASE CANDIDATE" in page and LABEL in page
    gate = evaluate_policy(DEFAULT_POLICY, audit)
    refused = {r.rule for r in gate.rules if not r.passed}
    assert not gate.passed and "not_an_experiment" in refused and "audit_verdict" in refused
