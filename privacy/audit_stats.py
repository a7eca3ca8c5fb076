"""Statistics of membership-inference audits: exact binomial intervals, ROC summaries and an empirical epsilon
lower bound.

Scores: higher means "more likely a member". Every summary here is an aggregate (counts, rates, intervals, TPR at
fixed FPR points chosen in advance); per-record scores, thresholds and full ROC curves (whose steps pin down every
record's rank) never leave the function that has them.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta, norm
from sklearn.metrics import roc_auc_score, roc_curve

# The ROC curve is summarised at these false-positive rates only (fixed in advance, not taken from the data).
ROC_FPR_POINTS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5)
# Non-members an attack needs before its TPR at a false-positive rate x can be measured at all (1 / x): with fewer,
# the lowest non-zero false-positive rate it can show is 1 / n_nonmembers > x.
NONMEMBERS_NEEDED = {"tpr_at_fpr_1pct": 100, "tpr_at_fpr_0_1pct": 1000}


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) confidence interval for a binomial proportion k / n (Clopper-Pearson).

    Each end is a one-sided bound at confidence 1 - alpha/2. n = 0 gives the vacuous interval (0, 1)."""
    if not 0 < alpha < 1:
        raise ValueError(f"clopper_pearson: alpha must be in (0, 1), got {alpha}")
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"clopper_pearson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def _scores(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(a).all():
        raise ValueError(
            f"{what}: scores must be finite numbers ({int((~np.isfinite(a)).sum())} are not)"
        )
    return a


def tpr_lower_bound(tpr: float, n_members: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound of a TPR measured on `n_members` members."""
    x = round(tpr * n_members)
    return 0.0 if x <= 0 else float(beta.ppf(alpha, x, n_members - x + 1))


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    ok = fpr <= target
    return float(tpr[ok].max()) if ok.any() else 0.0


def _hanley_mcneil_sd(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUC (Hanley and McNeil 1982), at the observed AUC."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    return math.sqrt(max(var, 0.0))


def auc_interval(auc: float, n_pos: int, n_neg: int, alpha: float) -> list[float]:
    """Hanley-McNeil (1982) normal-approximation interval for the AUC, clipped to [0, 1]."""
    half = norm.ppf(1 - alpha / 2) * _hanley_mcneil_sd(auc, n_pos, n_neg)
    # a perfect or empty-looking AUC still has sampling error: never report a zero-width interval
    half = max(half, 1.0 / math.sqrt(n_pos * n_neg))
    return [max(0.0, auc - half), min(1.0, auc + half)]


def auc_p_value(auc: float, n_pos: int, n_neg: int) -> float:
    """One-sided p-value of "the AUC is above chance (0.5)" by the same Hanley-McNeil approximation as
    `auc_interval`: below alpha / 2 exactly when that function's (1 - alpha) interval excludes 0.5 (the interval's
    floor on its half-width included), so Holm or Bonferroni over these p-values corrects that very rule."""
    excess, sd = auc - 0.5, _hanley_mcneil_sd(auc, n_pos, n_neg)
    p = float(norm.sf(excess / sd)) if sd > 0 else (0.0 if excess > 0 else 1.0)
    if excess <= 1.0 / math.sqrt(n_pos * n_neg):  # inside the interval's floor: never significant
        p = max(p, 0.5)
    return p


def roc_summary(member_scores, nonmember_scores, alpha: float = 0.05) -> dict:
    """AUC (with a Hanley-McNeil interval), TPR at 1 % and 0.1 % FPR, counts, and the TPR at each of the fixed
    false-positive rates `ROC_FPR_POINTS` (`roc_at_fpr`); no curve, no threshold, no score.

    TPR at FPR x is only resolvable with at least 1/x non-members; `resolvable` says which ones are (below that
    it is the TPR at zero false positives and should not be read as "at 1 %")."""
    m, n = (
        _scores(member_scores, "roc_summary members"),
        _scores(nonmember_scores, "roc_summary non-members"),
    )
    out = {
        "n_members": int(len(m)),
        "n_nonmembers": int(len(n)),
        "confidence": 1 - alpha,
        "resolvable": {k: len(n) >= need for k, need in NONMEMBERS_NEEDED.items()},
        "nonmembers_needed": dict(NONMEMBERS_NEEDED),
    }
    if len(m) == 0 or len(n) == 0:
        return {
            **out,
            "auc": float("nan"),
            "auc_ci": [0.0, 1.0],
            "tpr_at_fpr_1pct": float("nan"),
            "tpr_at_fpr_0_1pct": float("nan"),
            "roc_at_fpr": {
                "fpr": list(ROC_FPR_POINTS),
                "tpr": [float("nan")] * len(ROC_FPR_POINTS),
                "resolvable": [False] * len(ROC_FPR_POINTS),
            },
        }
    y = np.r_[np.ones(len(m)), np.zeros(len(n))]
    s = np.r_[m, n]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    auc = float(roc_auc_score(y, s))
    return {
        **out,
        "auc": auc,
        "auc_ci": auc_interval(auc, len(m), len(n), alpha),
        "tpr_at_fpr_1pct": _tpr_at(fpr, tpr, 0.01),
        "tpr_at_fpr_0_1pct": _tpr_at(fpr, tpr, 0.001),
        "roc_at_fpr": {
            "fpr": list(ROC_FPR_POINTS),
            "tpr": [_tpr_at(fpr, tpr, x) for x in ROC_FPR_POINTS],
            "resolvable": [len(n) >= math.ceil(1 / x - 1e-9) for x in ROC_FPR_POINTS],
        },
    }


def epsilon_from_counts(tp, n_pos: int, fp, n_neg: int, delta: float, alpha: float = 0.05):
    """Epsilon lower bound of threshold tests from their counts (vectorised over tp, fp).

    TPR_lo is the Clopper-Pearson lower bound of tp / n_pos and FPR_hi the upper bound of fp / n_neg, each
    one-sided at 1 - alpha/2, so both hold jointly at 1 - alpha (union bound). (eps, delta)-DP implies
    TPR <= e^eps FPR + delta and 1 - FPR <= e^eps (1 - TPR) + delta, hence
    eps_lb = max(ln((TPR_lo - delta) / FPR_hi), ln((1 - FPR_hi - delta) / (1 - TPR_lo))), floored at 0;
    a term whose numerator is <= 0 or whose denominator is 0 contributes nothing.
    Returns (eps_lb, tpr_lo, fpr_hi) as arrays (or floats for scalar input)."""
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    if n_pos <= 0 or n_neg <= 0:
        zero = np.zeros(np.broadcast(tp, fp).shape)
        return zero, zero, zero + 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr_lo = np.where(tp > 0, beta.ppf(alpha / 2, np.maximum(tp, 1), n_pos - tp + 1), 0.0)
        fpr_hi = np.where(
            fp < n_neg, beta.ppf(1 - alpha / 2, fp + 1, np.maximum(n_neg - fp, 1)), 1.0
        )
        a_num, b_num = tpr_lo - delta, 1 - fpr_hi - delta
        term_a = np.where(
            (a_num > 0) & (fpr_hi > 0),
            np.log(np.maximum(a_num, 1e-300) / np.maximum(fpr_hi, 1e-300)),
            0.0,
        )
        term_b = np.where(
            (b_num > 0) & (tpr_lo < 1),
            np.log(np.maximum(b_num, 1e-300) / np.maximum(1 - tpr_lo, 1e-300)),
            0.0,
        )
    eps = np.maximum(0.0, np.maximum(term_a, term_b))
    if eps.ndim == 0:
        return float(eps), float(tpr_lo), float(fpr_hi)
    return eps, tpr_lo, fpr_hi


def _threshold_counts(m: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every candidate threshold t (all observed scores): #members >= t, #non-members >= t."""
    t = np.unique(np.r_[m, n])
    ms, ns = np.sort(m), np.sort(n)
    return (
        t,
        len(m) - np.searchsorted(ms, t, side="left"),
        len(n) - np.searchsorted(ns, t, side="left"),
    )


def empirical_epsilon_lower_bound(
    member_scores, nonmember_scores, delta: float, alpha: float = 0.05, seed: int = 0
) -> dict:
    """A statistically valid lower bound, at confidence 1 - alpha, on the epsilon of the mechanism that produced
    these scores (the training run, as seen through this attack).

    For one threshold test "member if score >= t" fixed in advance, `epsilon_from_counts` is a valid bound. Taking
    the best of many thresholds on the same data would over-claim (multiple comparisons). Correction used here:
    SAMPLE SPLITTING. Members and non-members are each split at random (seeded) into a selection half and an
    evaluation half. On the selection half every observed score is tried as a threshold, in both directions
    ("score >= t" and its mirror "score <= t"), and the one with the largest Clopper-Pearson bound is chosen;
    the bound is then computed once, on the evaluation half only, which the choice never saw. The cost is half the
    records; the benefit is that the reported figure keeps its 1 - alpha guarantee.

    Returns the bound and the counts it rests on (TP, FN, FP, TN on the evaluation half, TPR_lo, FPR_hi); no
    score or threshold value is returned (a threshold is some patient's score)."""
    if not 0 <= delta < 1:
        raise ValueError(f"empirical_epsilon_lower_bound: delta must be in [0, 1), got {delta}")
    m = _scores(member_scores, "empirical_epsilon_lower_bound members")
    n = _scores(nonmember_scores, "empirical_epsilon_lower_bound non-members")
    result = {
        "epsilon_lower_bound": 0.0,
        "confidence": 1 - alpha,
        "delta": float(delta),
        "method": "sample splitting: threshold chosen on a random half of members and non-members, "
        "Clopper-Pearson bounds on the other half",
        "n_members": int(len(m)),
        "n_nonmembers": int(len(n)),
    }
    if len(m) < 4 or len(n) < 4:
        return {**result, "note": "too few members or non-members (need 4 of each) for a bound"}
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(m)), rng.permutation(len(n))
    m_sel, m_eval = m[pm[: len(m) // 2]], m[pm[len(m) // 2 :]]
    n_sel, n_eval = n[pn[: len(n) // 2]], n[pn[len(n) // 2 :]]
    best = (-1.0, 0.0, 1)
    for direction in (1, -1):
        t, tp, fp = _threshold_counts(direction * m_sel, direction * n_sel)
        eps, _, _ = epsilon_from_counts(tp, len(m_sel), fp, len(n_sel), delta, alpha)
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), float(t[i]), direction)
    _, t, direction = best
    tp = int((direction * m_eval >= t).sum())
    fp = int((direction * n_eval >= t).sum())
    eps, tpr_lo, fpr_hi = epsilon_from_counts(tp, len(m_eval), fp, len(n_eval), delta, alpha)
    return {
        **result,
        "epsilon_lower_bound": eps,
        "threshold_direction": "higher score = member" if direction > 0 else "lower score = member",
        "true_positives": tp,
        "false_negatives": int(len(m_eval) - tp),
        "false_positives": fp,
        "true_negatives": int(len(n_eval) - fp),
        "tpr_lower": tpr_lo,
        "fpr_upper": fpr_hi,
        "n_members_evaluated": int(len(m_eval)),
        "n_nonmembers_evaluated": int(len(n_eval)),
    }


def paired_calibrated_scores(target_losses, reference_losses) -> np.ndarray:
    """Per-record calibrated membership scores (LiRA / RMIA style, offline, one reference model).

    `target_losses` and `reference_losses` are (records, draws) arrays: each record's diffusion loss under the audited
    model and under a reference model that never saw the site's records, for the SAME draws (timestep and noise) in
    the same column. The score is the mean over draws of reference loss minus target loss: under the diffusion
    ELBO a weighted loss is minus a log-likelihood bound, so this is a log-likelihood ratio between the two models,
    per record. Pairing removes what the draw contributes to both losses (an easy or hard noise draw), and the
    reference removes what the record contributes to both (an image that is easy or hard to denoise for any
    model), which an uncalibrated loss attack confuses with membership. Higher = more likely a member."""
    t = np.asarray(target_losses, dtype=np.float64)
    r = np.asarray(reference_losses, dtype=np.float64)
    if t.shape != r.shape or t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(
            f"paired_calibrated_scores: need two (records, draws) arrays of the same shape, got {t.shape} "
            f"and {r.shape}"
        )
    return _scores((r - t).mean(axis=1), "paired_calibrated_scores")


def per_member_tests(member_scores, nonmember_scores, alpha: float = 0.05) -> dict:
    """One test per member: is this member's score above what non-members get? Counts only.

    Each member's p-value is its rank among the non-members, (1 + #non-members scoring >= it) / (1 + n_nonmembers),
    exact and distribution-free under the null "this record is exchangeable with the non-members". Over all members:
    how many are rejected under Benjamini-Hochberg (false discovery rate alpha) and under Holm (family-wise alpha).
    The smallest p-value a member can get is 1 / (1 + n_nonmembers); with few non-members no member can pass Holm
    (it needs alpha / n_members), which `holm_possible` says. Per-member p-values never leave this function."""
    m = _scores(member_scores, "per_member_tests members")
    n = _scores(nonmember_scores, "per_member_tests non-members")
    out = {
        "method": "per-member empirical p-value against the non-members' scores; Benjamini-Hochberg (FDR) and "
        "Holm (FWER) over the members",
        "alpha": float(alpha),
        "n_members": int(len(m)),
        "n_nonmembers": int(len(n)),
        "smallest_possible_p": 1.0 / (1 + len(n)),
        "holm_possible": bool(len(m) > 0 and 1.0 / (1 + len(n)) <= alpha / max(1, len(m))),
        "n_rejected_bh": 0,
        "n_rejected_holm": 0,
    }
    if len(m) == 0 or len(n) == 0:
        return out
    ns = np.sort(n)
    p = (1 + len(n) - np.searchsorted(ns, m, side="left")) / (1 + len(n))
    ps = np.sort(p)
    k = np.arange(1, len(p) + 1)
    below = np.flatnonzero(ps <= alpha * k / len(p))
    out["n_rejected_bh"] = int(below[-1] + 1) if len(below) else 0
    holm_ok = ps <= alpha / (len(p) - k + 1)
    out["n_rejected_holm"] = int(len(p) if holm_ok.all() else np.argmin(holm_ok))
    return out


def worst_case(summaries: dict[str, dict], min_records: int = 10) -> dict:
    """Worst case across sites of membership summaries {site: roc_summary (+ "epsilon_lower_bound")}: the largest
    AUC, TPR at 1 % FPR and epsilon lower bound, each with the site it comes from. Sites with fewer than
    `min_records` members or non-members are skipped (one record each gives an AUC of 0 or 1 by chance)."""
    out: dict[str, dict] = {}
    for site, s in summaries.items():
        if min(s.get("n_members", 0), s.get("n_nonmembers", 0)) < min_records:
            continue
        values = {
            "auc": s.get("auc"),
            "tpr_at_fpr_1pct": s.get("tpr_at_fpr_1pct"),
            "epsilon_lower_bound": (s.get("epsilon_lower_bound") or {}).get("epsilon_lower_bound"),
        }
        for key, v in values.items():
            if v is not None and math.isfinite(v) and (key not in out or v > out[key]["value"]):
                out[key] = {"value": float(v), "site": site}
    return out
