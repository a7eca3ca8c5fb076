"""One-run privacy auditing (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1) training run").

m canaries are each included in training independently with probability 1/2. After training, an attack guesses
"in" (+1), "out" (-1) or abstains (0) for each canary, looking only at the trained model. If the training run is
(eps, delta)-DP, the number of correct guesses v among r guesses is, up to a delta term, no larger than a
Binomial(r, e^eps / (1 + e^eps)) draw (their Corollary 5.4). Inverting that test gives an epsilon lower bound at
confidence 1 - alpha: the largest eps whose p-value for the observed (r, v) is below alpha. `p_value` and
`epsilon_lower_bound` are their Appendix D algorithm, vectorised.

Only counts leave these functions: which canary was included, and each canary's score, stay with the caller.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

# Guesses are made on the top and bottom of the score ranking, at these fractions of the canaries (half "in" at
# the top, half "out" at the bottom). Several abstention levels are tried; a Bonferroni correction over them keeps
# the reported bound valid at the stated confidence (choosing the best of several by looking at the outcome would
# not be).
DEFAULT_GUESS_FRACTIONS = (0.1, 0.2, 0.5, 1.0)
_BISECTION_STEPS = 40


def _check(m: int, r: int, v: int, delta: float) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer))):
        raise TypeError(f"one-run audit: m and r must be integers, got m={m!r}, r={r!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"one-run audit: need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})"
        )
    if not 0 <= delta < 1:
        raise ValueError(f"one-run audit: delta must be in [0, 1), got {delta}")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, under the hypothesis that training is (epsilon, delta)-DP, of at least v correct guesses out
    of r, with m canaries (Steinke et al. 2023, Corollary 5.4 / Appendix D)."""
    _check(m, r, v, delta)
    if epsilon < 0:
        raise ValueError(f"one-run audit: epsilon must be >= 0, got {epsilon}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, for i = 1..v
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf at v-1, v-2, ..., 0
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """The largest epsilon rejected at level alpha by v correct guesses out of r (m canaries): training is not
    (epsilon, delta)-DP for any smaller epsilon, at confidence 1 - alpha. Bisection returns the low (safe) end."""
    _check(m, r, v, delta)
    if not 0 < alpha < 1:
        raise ValueError(f"one-run audit: alpha must be in (0, 1), got {alpha}")
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 1e3:  # only reachable with absurd m; never report infinity
            return lo
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def power(m: int, delta: float, alpha: float = 0.05, n_tests: int = 1) -> float:
    """The largest epsilon a one-run audit with m canaries can certify: a perfect attack guessing every canary
    correctly. `n_tests`: the number of abstention levels the audit corrects for (Bonferroni, alpha / n_tests)."""
    if m <= 0:
        return 0.0
    return epsilon_lower_bound(int(m), int(m), int(m), delta, alpha / max(1, n_tests))


def canaries_for_power(
    target: float, delta: float, alpha: float = 0.05, n_tests: int = 1, limit: int = 100_000
) -> int:
    """The fewest canaries (at most `limit`) whose perfect attack certifies at least `target`, by bisection.
    Raises ValueError when `limit` canaries do not reach it (a large delta caps the power: its term grows with m)."""
    if target <= 0:
        return 1
    if power(limit, delta, alpha, n_tests) < target:
        raise ValueError(
            f"{limit} canaries cannot certify epsilon {target} at delta {delta} (at most "
            f"{power(limit, delta, alpha, n_tests):.2f})"
        )
    lo, hi = 0, 1
    while power(hi, delta, alpha, n_tests) < target:
        lo, hi = hi, min(2 * hi, limit)
    while hi - lo > 1:  # invariant: power(hi) >= target
        mid = (lo + hi) // 2
        if power(mid, delta, alpha, n_tests) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def guesses(scores, k_in: int, k_out: int) -> np.ndarray:
    """Guess +1 ("included") for the k_in highest scores, -1 for the k_out lowest, 0 (abstain) for the rest.
    Ties are broken by position (stable sort), which is independent of inclusion."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(s).all():
        raise ValueError("one-run audit: canary scores must be finite")
    if k_in < 0 or k_out < 0 or k_in + k_out > len(s):
        raise ValueError(
            f"one-run audit: cannot make {k_in} + {k_out} guesses on {len(s)} canaries"
        )
    order = np.argsort(s, kind="stable")
    g = np.zeros(len(s), dtype=np.int8)
    g[order[len(s) - k_in :]] = 1
    g[order[:k_out]] = -1
    return g


def audit(
    scores,
    included,
    delta: float,
    alpha: float = 0.05,
    guess_fractions: tuple[float, ...] = DEFAULT_GUESS_FRACTIONS,
) -> dict:
    """One-run audit from per-canary attack scores (higher = "more likely included") and the true inclusion.

    For each guess fraction f, the attack guesses on round(f m) canaries (half "in" at the top of the ranking,
    half "out" at the bottom) and abstains on the rest; each level is tested at alpha / len(guess_fractions)
    (Bonferroni), so the largest of their bounds holds at confidence 1 - alpha. Returns counts and bounds only,
    with the power (the bound a perfect attack would reach under the same correction) beside the bound."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    inc = np.asarray(included, dtype=bool).ravel()
    if len(s) != len(inc):
        raise ValueError(f"one-run audit: {len(s)} scores for {len(inc)} canaries")
    if not guess_fractions or not all(0 < f <= 1 for f in guess_fractions):
        raise ValueError(f"one-run audit: guess fractions must be in (0, 1], got {guess_fractions}")
    m, n_tests = len(s), len(guess_fractions)
    level = alpha / n_tests
    truth = np.where(inc, 1, -1)
    levels, best = [], None
    for f in guess_fractions:
        r = min(m, int(round(f * m)))
        g = guesses(s, (r + 1) // 2, r // 2) if m else np.zeros(0, dtype=np.int8)
        v = int((g * truth == 1).sum())
        eps = epsilon_lower_bound(m, r, v, delta, level) if m else 0.0
        row = {"guess_fraction": float(f), "guesses": r, "correct": v, "epsilon_lower_bound": eps}
        levels.append(row)
        if best is None or eps > best["epsilon_lower_bound"]:
            best = row
    return {
        "method": "one-run audit (Steinke, Nasr & Jagielski 2023, Corollary 5.4), guesses with "
        f"abstention at {n_tests} levels, Bonferroni-corrected",
        "n_canaries": int(m),
        "n_included": int(inc.sum()),
        "confidence": 1 - alpha,
        "delta": float(delta),
        "epsilon_lower_bound": best["epsilon_lower_bound"] if best else 0.0,
        "guesses": best["guesses"] if best else 0,
        "correct": best["correct"] if best else 0,
        "levels": levels,
        "power": power(m, delta, alpha, n_tests),
    }
