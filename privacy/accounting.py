"""Privacy accounting over a site's whole history of DP-SGD steps, with Opacus' accountants.

A site's spend is the composition of every mechanism it ever ran on the same patients, across rounds, runs and
restarts. We keep that history ourselves (privacy/ledger.py) and hand it to a fresh Opacus accountant each time,
so nothing depends on an accountant object surviving in memory (a new PrivacyEngine per round would forget).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


@dataclass(frozen=True)
class MechanismStep:
    """`steps` consecutive DP-SGD steps with one noise multiplier and Poisson sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _accountant(history: Sequence[MechanismStep], accountant: str):
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
    acc = ACCOUNTANTS[accountant]()
    acc.history = [(float(s.noise_multiplier), float(s.sample_rate), int(s.steps)) for s in history if s.steps > 0]
    return acc


def epsilon_for(history: Sequence[MechanismStep], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the composition of every step in `history` (0 for an empty history)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    steps = [s for s in history if s.steps > 0]
    if not steps:
        return 0.0
    if any(s.noise_multiplier <= 0 for s in steps):
        return math.inf  # a step without noise has no finite guarantee
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # Opacus' notes on the alpha grid / PRV domain; the value is still a bound
        eps = float(_accountant(steps, accountant).get_epsilon(delta=delta))
    return eps if math.isfinite(eps) else math.inf


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence[MechanismStep] = (),
    max_noise: float = 1e3,
    rel_tol: float = 2e-3,
) -> float:
    """Smallest noise multiplier (rounded up) with which `prior` + `steps` more steps stay within `target_epsilon`.

    Raises ValueError if no noise multiplier up to `max_noise` fits (typically: `prior` already spent the budget).
    """
    prior = list(prior)

    def eps(sigma: float) -> float:
        return epsilon_for(prior + [MechanismStep(sigma, sample_rate, steps)], delta, accountant)

    spent = epsilon_for(prior, delta, accountant)

    def infeasible() -> ValueError:
        return ValueError(
            f"no noise multiplier <= {max_noise:g} keeps epsilon <= {target_epsilon:g} for {steps} more steps at "
            f"sample rate {sample_rate:.4g} (already spent: {spent:.3f})"
        )

    if spent >= target_epsilon:
        raise infeasible()
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:  # grow until it fits: invariant eps(lo) > target (or lo = 0)
        lo, hi = hi, hi * 2
        if hi > max_noise:
            raise infeasible()
    while hi - lo > rel_tol * hi:  # bisection keeps eps(hi) <= target: the answer errs on the safe side
        mid = (lo + hi) / 2
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def default_delta(n_patients: int) -> float:
    """At most 1 / (10 x patients): a delta near 1/n would allow leaking one patient outright."""
    return 1.0 / (10 * max(1, n_patients))
