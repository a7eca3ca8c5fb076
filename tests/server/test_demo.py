"""The demo's release policy relaxes only what the demo's size makes unreachable or unmeasurable."""

from dataclasses import asdict

from privacy.policy import ALLOWED_UNMEASURED, DEFAULT_POLICY
from server.demo import demo_policy


def test_demo_policy_keeps_every_privacy_limit_of_the_default():
    demo, default = asdict(demo_policy(DEFAULT_POLICY)), asdict(DEFAULT_POLICY)
    changed = {k for k in default if demo[k] != default[k]}
    assert changed == {
        "max_delta",
        "min_precision",
        "min_coverage",
        "min_tstr_balanced_accuracy",
        "allow_unmeasured",
        "required_approvals",
    }
    assert demo["max_delta"] <= 2e-3  # 1 / (10 x ~90 training patients) fits, nothing looser
    assert set(demo["allow_unmeasured"]) <= set(ALLOWED_UNMEASURED)
    for key in (
        "max_epsilon",
        "max_membership_auc",
        "max_tpr_at_1pct_fpr",
        "max_near_copies",
        "withhold_near_copies",
        "max_withheld_share",
        "allow_inconclusive",
        "min_attack_records",
    ):
        assert demo[key] == default[key], key
