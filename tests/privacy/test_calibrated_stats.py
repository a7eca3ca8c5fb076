"""Calibrated membership scores and per-member tests (privacy/audit_stats.py), on simulations with known truth."""

import numpy as np
import pytest

from privacy.audit_stats import (
    NONMEMBERS_NEEDED,
    paired_calibrated_scores,
    per_member_tests,
    roc_summary,
)


def _losses(rng, n_members, n_nonmembers, draws=16, gap=0.05):
    """Records whose difficulty varies a lot (what any model finds hard), draws that are easy or hard for both
    models alike, and a small memorisation gap on members under the target model only."""
    n = n_members + n_nonmembers
    difficulty = rng.lognormal(0.0, 0.8, size=(n, 1))
    draw = rng.lognormal(0.0, 0.5, size=(n, draws))
    member = np.r_[np.ones(n_members), np.zeros(n_nonmembers)][:, None]
    reference = difficulty * draw
    target = reference * (1 - gap * member) + rng.normal(0, 0.002, size=(n, draws))
    return target, reference


def test_calibration_removes_record_difficulty_that_the_plain_loss_attack_confuses_with_membership():
    rng = np.random.default_rng(0)
    target, reference = _losses(rng, 300, 1000)
    plain = -target.mean(axis=1)
    calibrated = paired_calibrated_scores(target, reference)
    p = roc_summary(plain[:300], plain[300:])
    c = roc_summary(calibrated[:300], calibrated[300:])
    assert p["auc"] < 0.65 and p["tpr_at_fpr_1pct"] < 0.1  # the plain attack barely sees the gap
    assert c["auc"] > 0.95 and c["tpr_at_fpr_1pct"] > 0.5  # the calibrated one sees most members
    assert c["resolvable"] == {"tpr_at_fpr_1pct": True, "tpr_at_fpr_0_1pct": True}
    assert (
        c["nonmembers_needed"]
        == NONMEMBERS_NEEDED
        == {
            "tpr_at_fpr_1pct": 100,
            "tpr_at_fpr_0_1pct": 1000,
        }
    )


def test_calibrated_scores_refuse_unpaired_draws():
    with pytest.raises(ValueError, match="same shape"):
        paired_calibrated_scores(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        paired_calibrated_scores(np.full((2, 2), np.nan), np.ones((2, 2)))


def test_per_member_tests_find_members_and_keep_their_error_rate_under_the_null():
    rng = np.random.default_rng(1)
    out = per_member_tests(rng.normal(5, 1, 50), rng.normal(0, 1, 1000))
    assert out["n_rejected_bh"] >= 45 and out["n_rejected_holm"] >= 40 and out["holm_possible"]
    # exchangeable members: at FDR / FWER 5 %, almost never any rejection (a few at most over many tries)
    rejected = [
        per_member_tests(rng.normal(0, 1, 50), rng.normal(0, 1, 500))["n_rejected_holm"]
        for _ in range(40)
    ]
    assert sum(r > 0 for r in rejected) <= 6
    assert set(per_member_tests([1.0], [0.0])) >= {"n_rejected_bh", "smallest_possible_p"}


def test_per_member_tests_say_when_too_few_nonmembers_make_them_blind():
    out = per_member_tests(np.full(30, 10.0), np.zeros(30))  # perfect separation, 30 non-members
    assert out["smallest_possible_p"] == pytest.approx(1 / 31)
    assert not out["holm_possible"] and out["n_rejected_holm"] == 0
    assert out["n_rejected_bh"] == 30  # BH: 1/31 <= 0.05 * 30 / 30 for every member
    assert "p_values" not in out and all(not isinstance(v, list) for v in out.values())
