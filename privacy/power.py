"""The power of a privacy audit: the largest epsilon it could certify, whatever the attack.

An epsilon lower bound of 0 means "no leak found" only if the audit could have found one. A perfect attack (every
member and non-member, or every canary, guessed right) gives the largest bound an audit of that size can reach;
when that is below the claim's range of interest, the audit is underpowered and its bound says nothing about the
claim. Every lower bound in a report carries this figure beside it.
"""

from __future__ import annotations

from privacy import one_run
from privacy.audit_stats import epsilon_from_counts

# The claim's range of interest: an audit is powered when a perfect attack would certify at least this fraction
# of the claimed epsilon. One-run audits top out near 7.3 with 5,000 canaries at 95 % and delta 1e-5, so requiring
# the full claim (10 is common) would make every feasible audit "underpowered"; half of it is the neighbourhood
# where a broken implementation (a clipping or noise bug typically multiplies the true epsilon) becomes visible.
RANGE_OF_INTEREST_FRACTION = 0.5


def holdout_power(n_members: int, n_nonmembers: int, delta: float, alpha: float = 0.05) -> float:
    """Largest bound `privacy.audit_stats.empirical_epsilon_lower_bound` can return for n members and k
    non-members: a perfect attack on its evaluation half (it splits each side in two, evaluating on
    n - n // 2 members and k - k // 2 non-members), i.e. every member flagged and no non-member."""
    if n_members < 4 or n_nonmembers < 4:  # the bound's own minimum: below it, always 0
        return 0.0
    m_eval, n_eval = n_members - n_members // 2, n_nonmembers - n_nonmembers // 2
    eps, _, _ = epsilon_from_counts(m_eval, m_eval, 0, n_eval, delta, alpha)
    return float(eps)


def canary_power(
    n_canaries: int,
    delta: float,
    alpha: float = 0.05,
    guess_fractions: tuple[float, ...] = one_run.DEFAULT_GUESS_FRACTIONS,
) -> float:
    """Largest bound `privacy.one_run.audit` can return with n canaries (same Bonferroni correction)."""
    return one_run.power(n_canaries, delta, alpha, len(guess_fractions))


def range_of_interest(
    claimed_epsilon: float, fraction: float = RANGE_OF_INTEREST_FRACTION
) -> float:
    """The smallest epsilon an audit must be able to certify to say anything about this claim."""
    if not 0 < fraction <= 1:
        raise ValueError(f"range-of-interest fraction must be in (0, 1], got {fraction}")
    return float(claimed_epsilon) * fraction


def is_underpowered(
    power: float, claimed_epsilon: float, fraction: float = RANGE_OF_INTEREST_FRACTION
) -> bool:
    """True when even a perfect attack could not reach the claim's range of interest. An infinite claim (no DP)
    has no range: any audit can show it is not private, so only an audit with no power at all is underpowered."""
    if claimed_epsilon == float("inf"):
        return power <= 0
    return power < range_of_interest(claimed_epsilon, fraction)


def annotate(bound: dict, power: float, claimed_epsilon: float) -> dict:
    """A lower-bound record with its power and the underpowered flag beside it (a new dict)."""
    return {
        **bound,
        "power": float(power),
        "range_of_interest": range_of_interest(claimed_epsilon)
        if claimed_epsilon != float("inf")
        else 0.0,
        "underpowered": is_underpowered(power, claimed_epsilon),
    }
