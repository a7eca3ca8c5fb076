"""The power of a privacy audit: the largest epsilon it could certify, whatever the attack.

An epsilon lower bound of 0 means "no leak found" only if the audit could have found one. A perfect attack (every
member and non-member, or every canary, guessed right) gives the largest bound an audit of that size can reach;
when that is below the claim's range of interest, the audit is underpowered and its bound says nothing about the
claim. Every lower bound in a report carries this figure beside it.
"""

from __future__ import annotations

import math

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


def _finite(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def site_power(site: dict, alpha: float = 0.05) -> dict:
    """What one site's audit (privacy/audit_schema.py's site block) could have certified: the power of its
    all-records hold-out bounds (recomputed from their counts, so audits written before power was reported are
    judged too) and of its canary audit, the best of them, and whether that reaches the claim's range of interest.
    A site without a finite claim has no range: `underpowered` is then None (not judged)."""
    cp = site.get("claimed_privacy") or {}
    claimed = _finite(cp.get("epsilon"))
    delta = _finite(cp.get("delta")) or 0.0
    mem = site.get("membership") or {}
    holdout = max(
        (
            holdout_power(
                int(res.get("n_members") or 0), int(res.get("n_nonmembers") or 0), delta, alpha
            )
            for kind, res in mem.items()
            if kind in ("white_box", "black_box") and isinstance(res, dict)
        ),
        default=0.0,
    )
    can = mem.get("canaries") or {}
    n_canaries = int(can.get("n_canaries") or 0)
    canaries = canary_power(n_canaries, delta, alpha) if n_canaries else 0.0
    best = max(holdout, canaries)
    return {
        "claimed_epsilon": claimed,
        "range_of_interest": range_of_interest(claimed) if claimed is not None else None,
        "holdout_power": holdout,
        "canary_power": canaries,
        "n_canaries": n_canaries,
        "power": best,
        "underpowered": is_underpowered(best, claimed) if claimed is not None else None,
    }


def verdict_notes(site_results: dict[str, dict]) -> tuple[list[str], list[str], dict[str, dict]]:
    """For the verdict: (findings, underpowered reasons, power per site).

    Findings: a canary epsilon lower bound above the site's claimed epsilon (the DP implementation is suspect).
    Underpowered: a site whose best audit could not certify the claim's range of interest even with a perfect
    attack; its "no finding" says nothing, so the verdict must not be "pass"."""
    findings, underpowered, per_site = [], [], {}
    for name, site in site_results.items():
        p = site_power(site)
        per_site[name] = p
        claimed = p["claimed_epsilon"]
        can = (site.get("membership") or {}).get("canaries") or {}
        lb = _finite(can.get("epsilon_lower_bound")) or 0.0
        if claimed is not None and lb > claimed:
            findings.append(
                f"{name} (one-run canary audit, {can.get('n_canaries')} canaries): epsilon lower bound "
                f"{lb:.2f} exceeds the claimed epsilon {claimed:.2f}: the DP implementation is suspect"
            )
        if p["underpowered"]:
            underpowered.append(
                f"underpowered: {name} claims epsilon {claimed:.2f}, but a perfect attack could certify at most "
                f"{p['power']:.2f} (hold-out {p['holdout_power']:.2f}, {p['n_canaries']} canaries "
                f"{p['canary_power']:.2f}), below the range of interest {p['range_of_interest']:.2f}: "
                "'no finding' cannot be told from 'could not have seen it' (more canaries, node config "
                "canaries=N, or more patients)"
            )
    return findings, underpowered, per_site
