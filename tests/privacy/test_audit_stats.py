"""Membership-audit statistics against reference implementations and mechanisms with a known epsilon."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from privacy.audit_stats import (
    ROC_FPR_POINTS,
    clopper_pearson,
    empirical_epsilon_lower_bound,
    epsilon_from_counts,
    roc_summary,
    worst_case,
)


@pytest.mark.parametrize(
    "k,n", [(0, 10), (3, 10), (10, 10), (57, 200), (1, 1000), (999, 1000), (0, 1)]
)
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.01])
def test_clopper_pearson_matches_scipy_exact(k, n, alpha):
    ci = binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    assert clopper_pearson(k, n, alpha) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_clopper_pearson_matches_statsmodels_if_installed():
    proportion = pytest.importorskip("statsmodels.stats.proportion")
    for k, n in [(0, 10), (4, 17), (30, 30)]:
        assert clopper_pearson(k, n) == pytest.approx(
            proportion.proportion_confint(k, n, 0.05, "beta"), abs=1e-9
        )


def test_clopper_pearson_rejects_bad_input():
    with pytest.raises(ValueError, match="k <= n"):
        clopper_pearson(5, 3)
    with pytest.raises(ValueError, match="alpha"):
        clopper_pearson(1, 3, alpha=1.5)
    assert clopper_pearson(0, 0) == (0.0, 1.0)


def test_roc_summary_separable_and_identical():
    rng = np.random.default_rng(0)
    sep = roc_summary(rng.normal(10, 1, 300), rng.normal(0, 1, 300))
    assert sep["auc"] > 0.99 and sep["tpr_at_fpr_1pct"] > 0.95 and sep["auc_ci"][0] > 0.9
    same = roc_summary(rng.normal(0, 1, 3000), rng.normal(0, 1, 3000))
    assert abs(same["auc"] - 0.5) < 0.03 and same["auc_ci"][0] < 0.5 < same["auc_ci"][1]
    assert same["tpr_at_fpr_1pct"] < 0.05 and same["resolvable"] == {
        "tpr_at_fpr_1pct": True,
        "tpr_at_fpr_0_1pct": True,
    }
    pts = same["roc_at_fpr"]
    assert pts["fpr"] == list(ROC_FPR_POINTS) and all(pts["resolvable"])
    tpr = np.array(pts["tpr"])
    assert (np.diff(tpr) >= 0).all() and np.allclose(tpr, ROC_FPR_POINTS, atol=0.05)  # chance
    assert pts["tpr"][1] == same["tpr_at_fpr_1pct"]
    assert same["n_members"] == 3000 and same["n_nonmembers"] == 3000


def test_roc_summary_holds_no_curve_only_fixed_fpr_points():
    """Attack (issue 9 item 4): a downsampled ROC curve of a small site has one step per record, which pins
    every patient's rank. The summary has rates at fixed FPR points only, whatever the data."""
    rng = np.random.default_rng(3)
    for n in (7, 50, 400):
        out = roc_summary(rng.normal(1, 1, n), rng.normal(0, 1, n))
        assert "roc" not in out and out["roc_at_fpr"]["fpr"] == list(ROC_FPR_POINTS)
        lists = [v for v in out["roc_at_fpr"].values()] + [out["auc_ci"]]
        assert all(len(v) <= len(ROC_FPR_POINTS) for v in lists)
        assert out["roc_at_fpr"]["resolvable"] == [n >= round(1 / x) for x in ROC_FPR_POINTS]


def test_roc_summary_marks_unresolvable_low_fpr_and_rejects_nan():
    small = roc_summary([1, 2, 3], [0, 1, 2])
    assert small["resolvable"]["tpr_at_fpr_1pct"] is False
    with pytest.raises(ValueError, match="finite"):
        roc_summary([1.0, float("nan")], [0.0, 1.0])


def test_epsilon_from_counts_formula_and_zeros():
    eps, tpr_lo, fpr_hi = epsilon_from_counts(90, 100, 10, 100, delta=0.0, alpha=0.05)
    assert tpr_lo == pytest.approx(clopper_pearson(90, 100)[0]) and fpr_hi == pytest.approx(
        clopper_pearson(10, 100)[1]
    )
    expected = max(math.log(tpr_lo / fpr_hi), math.log((1 - fpr_hi) / (1 - tpr_lo)))
    assert eps == pytest.approx(expected)
    assert epsilon_from_counts(0, 100, 0, 100, 0.0)[0] == 0.0  # no detections: nothing learnt
    assert epsilon_from_counts(100, 100, 0, 100, 0.0)[0] == pytest.approx(
        math.log(clopper_pearson(100, 100)[0] / clopper_pearson(0, 100)[1])
    )
    assert epsilon_from_counts(50, 100, 50, 100, 0.0)[0] == 0.0
    assert (
        epsilon_from_counts(90, 100, 10, 100, delta=0.95)[0] == 0.0
    )  # a huge delta explains everything


def test_epsilon_lower_bound_never_over_claims_without_signal():
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        lb = empirical_epsilon_lower_bound(
            rng.normal(0, 1, 600), rng.normal(0, 1, 600), delta=1e-5, seed=seed
        )
        assert lb["true_positives"] + lb["false_negatives"] == lb["n_members_evaluated"] == 300
        assert lb["false_positives"] + lb["true_negatives"] == lb["n_nonmembers_evaluated"] == 300
        bounds.append(lb["epsilon_lower_bound"])
    assert max(bounds) < 0.3
    assert np.mean(np.array(bounds) > 0) <= 0.15  # at 95 % confidence, rarely above 0 at all


def test_epsilon_lower_bound_detects_a_clear_leak():
    rng = np.random.default_rng(1)
    lb = empirical_epsilon_lower_bound(rng.normal(5, 1, 1000), rng.normal(0, 1, 1000), delta=1e-5)
    assert lb["epsilon_lower_bound"] > 2.5 and lb["threshold_direction"] == "higher score = member"
    flipped = empirical_epsilon_lower_bound(
        -rng.normal(5, 1, 1000), rng.normal(0, 1, 1000), delta=1e-5
    )
    assert (
        flipped["epsilon_lower_bound"] > 2.5
        and flipped["threshold_direction"] == "lower score = member"
    )


@pytest.mark.parametrize("eps", [0.5, 1.0, 2.0, 4.0])
def test_epsilon_lower_bound_respects_randomised_response(eps):
    """Randomised response is exactly eps-DP: members answer 1 w.p. e^eps/(1+e^eps), non-members w.p. 1/(1+e^eps)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    for seed in range(8):
        rng = np.random.default_rng(seed)
        m = (rng.random(4000) < p).astype(float)
        n = (rng.random(4000) < 1 - p).astype(float)
        lb = empirical_epsilon_lower_bound(m, n, delta=0.0, seed=seed)["epsilon_lower_bound"]
        assert lb <= eps
        assert lb > 0.5 * eps  # and not vacuous with this many records


def test_epsilon_lower_bound_too_few_records():
    out = empirical_epsilon_lower_bound([1, 2], [0, 1], delta=1e-5)
    assert out["epsilon_lower_bound"] == 0.0 and "too few" in out["note"]
    with pytest.raises(ValueError, match="delta"):
        empirical_epsilon_lower_bound([1] * 10, [0] * 10, delta=1.0)


def test_worst_case_across_sites_skips_tiny_sites():
    rng = np.random.default_rng(2)
    a = {
        **roc_summary(rng.normal(1, 1, 50), rng.normal(0, 1, 50)),
        "epsilon_lower_bound": empirical_epsilon_lower_bound(
            rng.normal(3, 1, 50), rng.normal(0, 1, 50), 1e-5
        ),
    }
    b = roc_summary(rng.normal(0, 1, 50), rng.normal(0, 1, 50))
    tiny = roc_summary([5.0, 6.0], [0.0, 1.0])  # AUC 1 by chance
    w = worst_case({"a": a, "b": b, "tiny": tiny})
    assert w["auc"]["site"] == "a" and w["auc"]["value"] == pytest.approx(a["auc"])
    assert w["epsilon_lower_bound"]["site"] == "a"
