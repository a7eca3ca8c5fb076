"""An experiment's cohort (the positive control, server/control.py) is labelled in both reports and is never
releasable: the gate refuses it even when every other rule passes."""

from privacy.policy import evaluate_policy, gate_table
from privacy.report import render_officer_report, render_partner_report
from privacy.verdict import build_audit
from tests.privacy.test_policy import LENIENT, gate_of, make_audit, privacy_json

LABEL = "EXPERIMENT: positive control, trained WITHOUT DP on purpose; NEVER releasable"


def experiment_audit() -> dict:
    clean = make_audit()
    return build_audit(clean["sites"], cohort={**clean["cohort"], "experiment": LABEL})


def test_the_gate_refuses_an_experiment_that_passes_every_other_rule():
    assert gate_of(LENIENT, make_audit()).passed  # the same audit without the label passes
    gate = evaluate_policy(LENIENT, experiment_audit(), server_privacy=privacy_json(make_audit()))
    assert not gate.passed
    refused = [r for r in gate.rules if not r.passed]
    assert [r.rule for r in refused] == ["not_an_experiment"]
    assert LABEL in refused[0].note and "never releasable" in refused[0].note
    assert "not_an_experiment" in gate_table(gate)
    assert "not_an_experiment" not in {r.rule for r in gate_of(LENIENT, make_audit()).rules}


def test_both_reports_carry_the_label_and_the_canary_and_power_section():
    audit = experiment_audit()
    gate = evaluate_policy(LENIENT, audit, server_privacy=privacy_json(make_audit()))
    officer = render_officer_report(audit)
    partner = render_partner_report(
        audit,
        gate={"passed": gate.passed, "rules": [r.__dict__ for r in gate.rules]},
        released_images=None,
    )
    for page in (officer, partner):
        assert page.count("EXPERIMENT: NOT A RELEASE CANDIDATE") == 2  # top and bottom
        assert LABEL in page
        assert "One-run canary audit and the power of every bound" in page
    plain = render_officer_report(make_audit())
    assert "NOT A RELEASE CANDIDATE" not in plain
    assert "One-run canary audit" in plain
