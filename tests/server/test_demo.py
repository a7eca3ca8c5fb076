"""The demo's release policy keeps every privacy limit; it relaxes only fidelity and utility figures."""

from dataclasses import asdict

from privacy.policy import DEFAULT_POLICY
from server.demo import demo_policy


def test_demo_policy_keeps_every_privacy_limit_of_the_default():
    """Attack (issue 9 item 8): the demo's policy used to relax delta to 2e-3 and let TPR at 1 % FPR pass
    unmeasured. It may relax only fidelity and utility figures (labelled in the gate table)."""
    demo, default = asdict(demo_policy(DEFAULT_POLICY)), asdict(DEFAULT_POLICY)
    changed = {k for k in default if demo[k] != default[k]}
    assert changed <= {
        "min_precision",
        "min_coverage",
        "min_tstr_balanced_accuracy",
        "allow_unmeasured",
        "required_approvals",
    }
    assert set(demo["allow_unmeasured"]) <= {
        "min_precision",
        "min_coverage",
        "min_tstr_balanced_accuracy",
    }
    for key in (
        "max_epsilon",
        "max_delta",
        "max_membership_auc",
        "max_tpr_at_1pct_fpr",
        "max_near_copies",
        "withhold_near_copies",
        "max_withheld_share",
        "allow_inconclusive",
        "min_attack_records",
    ):
        assert demo[key] == default[key], key
