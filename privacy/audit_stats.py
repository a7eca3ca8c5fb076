"""Statistics of membership-inference audits: ROC summaries and an empirical epsilon lower bound.

Scores: higher means "more likely a member". Every summary here is an aggregate (counts, rates, a downsampled
curve); per-record scores never leave the function that has them.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) confidence interval for a binomial proportion k / n."""
    if n <= 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_summary(member_scores, nonmember_scores, max_points: int = 200) -> dict:
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    out = {"n_members": int(len(m)), "n_nonmembers": int(len(n))}
    if len(m) == 0 or len(n) == 0:
        return {**out, "auc": float("nan"), "tpr_at_fpr_1pct": float("nan"), "tpr_at_fpr_0_1pct": float("nan"),
                "roc": {"fpr": [], "tpr": []}}
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, _ = roc_curve(y, s)
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr))).round().astype(int))
    return {
        **out,
        "auc": float(roc_auc_score(y, s)),
        "tpr_at_fpr_1pct": _tpr_at(fpr, tpr, 0.01),
        "tpr_at_fpr_0_1pct": _tpr_at(fpr, tpr, 0.001),
        "roc": {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()},
    }


def _eps_from_counts(tp: int, n_pos: int, fp: int, n_neg: int, delta: float, alpha: float) -> float:
    """Epsilon lower bound of one threshold test from its counts, with one-sided Clopper-Pearson bounds
    (TPR lower, FPR upper, each at 1 - alpha/2 so both hold jointly at 1 - alpha)."""
    tpr_lo = clopper_pearson(tp, n_pos, alpha)[0]
    fpr_hi = clopper_pearson(fp, n_neg, alpha)[1]
    cands = []
    if fpr_hi > 0 and tpr_lo - delta > 0:
        cands.append(math.log((tpr_lo - delta) / fpr_hi))
    if tpr_lo < 1 and 1 - fpr_hi - delta > 0:
        cands.append(math.log((1 - fpr_hi - delta) / (1 - tpr_lo)))
    return max([0.0, *cands])


def empirical_epsilon_lower_bound(member_scores, nonmember_scores, delta: float, alpha: float = 0.05,
                                  seed: int = 0) -> dict:
    """A statistically valid lower bound on the epsilon of whatever produced these scores.

    For (eps, delta)-DP, any test "score >= t" satisfies TPR <= e^eps FPR + delta (and the mirror inequality), so
    eps >= ln((TPR - delta) / FPR). With confidence bounds on TPR and FPR this is a lower bound at confidence
    1 - alpha — for ONE threshold fixed in advance. Choosing the best of many thresholds on the same data would
    over-claim, so: the threshold is selected on a random half of members and non-members (maximising the point
    estimate), and the bound is computed on the other half only. Returns the bound with the counts it rests on.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    result = {"epsilon_lower_bound": 0.0, "confidence": 1 - alpha, "delta": delta, "method":
              "threshold chosen on a random half, Clopper-Pearson bounds on the other half"}
    if len(m) < 4 or len(n) < 4:
        return {**result, "note": "too few members or non-members for a bound"}
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(m)), rng.permutation(len(n))
    m_sel, m_eval = m[pm[: len(m) // 2]], m[pm[len(m) // 2:]]
    n_sel, n_eval = n[pn[: len(n) // 2]], n[pn[len(n) // 2:]]
    best_t, best = None, -1.0
    for t in np.unique(np.r_[m_sel, n_sel]):
        for direction in (1, -1):  # "member if score >= t" or its mirror
            tp = int(((direction * m_sel) >= direction * t).sum())
            fp = int(((direction * n_sel) >= direction * t).sum())
            tpr, fpr = tp / len(m_sel), max(fp / len(n_sel), 1 / (2 * len(n_sel)))
            est = math.log(max(tpr - delta, 1e-12) / fpr)
            if est > best:
                best, best_t = est, (t, direction)
    t, direction = best_t
    tp = int(((direction * m_eval) >= direction * t).sum())
    fp = int(((direction * n_eval) >= direction * t).sum())
    eps = _eps_from_counts(tp, len(m_eval), fp, len(n_eval), delta, alpha)
    return {**result, "epsilon_lower_bound": eps, "threshold_direction": "higher" if direction > 0 else "lower",
            "true_positives": tp, "n_members_evaluated": int(len(m_eval)), "false_positives": fp,
            "n_nonmembers_evaluated": int(len(n_eval))}
