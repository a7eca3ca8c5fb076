"""The demo's release policy keeps every privacy limit of the default policy (attack: it used to relax delta to
2e-3 and let TPR at 1 % FPR pass unmeasured); it may relax only fidelity and utility figures."""

import dataclasses

from privacy.policy import DEFAULT_POLICY
from server.demo import demo_policy

PRIVACY_LIMITS = (
    "max_epsilon",
    "max_delta",
    "max_membership_auc",
    "max_tpr_at_1pct_fpr",
    "min_attack_records",
    "max_near_copies",
    "withhold_near_copies",
    "max_withheld_share",
    "allow_inconclusive",
)
UTILITY_FIGURES = {"min_precision", "min_coverage", "min_tstr_balanced_accuracy"}


def test_demo_policy_does_not_relax_privacy_limits():
    demo = demo_policy(DEFAULT_POLICY)
    for name in PRIVACY_LIMITS:
        assert getattr(demo, name) == getattr(DEFAULT_POLICY, name), name
    assert set(demo.allow_unmeasured) <= UTILITY_FIGURES
    changed = {
        f.name
        for f in dataclasses.fields(demo)
        if getattr(demo, f.name) != getattr(DEFAULT_POLICY, f.name)
    }
    assert changed <= UTILITY_FIGURES | {"allow_unmeasured", "required_approvals"}
