"""Privacy accounting over a site's whole history of DP-SGD steps, with Opacus' accountants.

A site's spend is the composition of every mechanism it ever ran on the same patients, across rounds, runs and
restarts. We keep that history ourselves (privacy/ledger.py) and hand it to a fresh Opacus accountant each time,
so nothing depends on an accountant object surviving in memory (a new PrivacyEngine per round would forget).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


@dataclass(frozen=True)
class MechanismStep:
    """`steps` consecutive DP-SGD steps with one noise multiplier and Poisson sampling rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _check_step(step: MechanismStep) -> None:
    if not 0 < step.sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {step.sample_rate} in {step}")
    if step.steps < 0 or int(step.steps) != step.steps:
        raise ValueError(f"steps must be a non-negative integer, got {step.steps} in {step}")
    if not step.noise_multiplier >= 0:  # also refuses NaN
        raise ValueError(f"noise_multiplier must be >= 0, got {step.noise_multiplier} in {step}")


def _merged(history: Sequence[MechanismStep]) -> list[tuple[float, float, int]]:
    """Opacus' (sigma, q, steps) history, with runs of equal (sigma, q) added up wherever they occur.

    Composition is commutative, so this changes no epsilon; it keeps the accountant's work proportional to the
    number of distinct mechanisms, not of rounds (PRV in particular is slow per distinct mechanism).
    """
    steps: dict[tuple[float, float], int] = {}
    for s in history:
        if s.steps > 0:
            key = (float(s.noise_multiplier), float(s.sample_rate))
            steps[key] = steps.get(key, 0) + int(s.steps)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _accountant(history: Sequence[MechanismStep], accountant: str):
    """A fresh Opacus accountant whose history (Opacus' own (sigma, q, steps) format) is `history`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
    acc = ACCOUNTANTS[accountant]()
    acc.history = _merged(history)
    return acc


def epsilon_for(history: Sequence[MechanismStep], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of the composition of every step in `history` (0 for an empty history).

    A step without noise (sigma 0) has no finite guarantee: the result is then inf.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {sorted(ACCOUNTANTS)}")
    for s in history:
        _check_step(s)
    steps = [s for s in history if s.steps > 0]
    if not steps:
        return 0.0
    if any(s.noise_multiplier == 0 for s in steps):
        return math.inf
    with _quiet():
        try:
            eps = float(_accountant(steps, accountant).get_epsilon(delta=delta))
        except (OverflowError, FloatingPointError):
            return math.inf  # so little noise that the bound overflows: no useful guarantee
    return eps if math.isfinite(eps) else math.inf


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Opacus' notes on the alpha grid / PRV domain and numpy overflow: the value is still a bound."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _rdp_epsilon_after(
    prior: Sequence[MechanismStep], sample_rate: float, steps: int, delta: float
) -> Callable[[float], float]:
    """sigma -> RDP epsilon of prior + (sigma, sample_rate, steps), with the prior's RDP curve computed once.

    The same arithmetic as RDPAccountant.get_privacy_spent (a calibration search asks for it many times).
    """
    orders = RDPAccountant.DEFAULT_ALPHAS
    with _quiet():
        prior_rdp = sum(
            rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=n, orders=orders)
            for sigma, q, n in _merged(prior)
        )

    def eps(sigma: float) -> float:
        with _quiet():
            try:
                rdp = prior_rdp + rdp_analysis.compute_rdp(
                    q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders
                )
                value = float(
                    rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]
                )
            except (OverflowError, FloatingPointError):
                return math.inf
        return value if math.isfinite(value) else math.inf

    return eps


def _smallest_feasible(
    feasible: Callable[[float], bool],
    eps_of: Callable[[float], float],
    target: float,
    guess: float,
    max_noise: float,
    rel_tol: float,
) -> float | None:
    """Smallest sigma (within rel_tol, from above) with feasible(sigma); None if max_noise is not feasible.

    Bracket the threshold from `guess` with extrapolating steps, then Illinois false position on log(eps) against
    log(sigma), which is nearly linear, so it needs a handful of accountant calls. The returned sigma was itself
    checked feasible.
    """

    def jump(
        sigma: float,
    ) -> float:  # where eps would meet target if eps ~ 1/sigma (it falls at least as fast)
        f = eps_of(sigma)
        return min(max(f / target, 2.0) if math.isfinite(f) else 2.0, 1e3)

    def log_ratio(sigma: float) -> float:  # log(eps / target), <= 0 where feasible
        f = eps_of(sigma)
        return math.log(f / target) if 0 < f < math.inf else (math.inf if f > 0 else -math.inf)

    if feasible(guess):
        hi, lo = (
            guess,
            guess * 0.9,
        )  # a good guess (PRV starts from RDP's answer) is usually within 10 %
        while feasible(lo):
            # secant through the last two feasible points (log-log), overshooting a little to get below
            slope = (log_ratio(lo) - log_ratio(hi)) / math.log(hi / lo)
            step = math.exp(log_ratio(lo) / slope) * 0.97 if 0 < slope < math.inf else 0.5
            hi, lo = lo, lo * min(max(step, 0.5), 0.97)
            if lo < 1e-6:
                return hi
    else:
        lo, hi = guess, min(guess * jump(guess), max_noise)
        while not feasible(hi):
            if hi >= max_noise:
                return None
            lo, hi = hi, min(hi * jump(hi), max_noise)
    y_lo, y_hi = log_ratio(lo), log_ratio(hi)  # cached: no new accountant calls
    side = 0
    for _ in range(100):
        if hi <= lo * (1 + rel_tol):
            break
        a, b = math.log(lo), math.log(hi)
        t = (
            y_lo / (y_lo - y_hi)
            if math.isfinite(y_lo) and math.isfinite(y_hi) and y_lo > y_hi
            else 0.5
        )
        x = math.exp(a + min(max(t, 0.05), 0.95) * (b - a))
        y = log_ratio(x)
        if not feasible(x):
            lo, y_lo = x, y
            if side == -1:
                y_hi /= 2  # Illinois: the kept end was kept twice, pull the secant towards it
            side = -1
        else:
            hi, y_hi = x, y
            if side == 1:
                y_lo /= 2
            side = 1
    return hi


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence[MechanismStep] = (),
    max_noise: float = 1e3,
    rel_tol: float = 5e-3,
) -> float:
    """Smallest noise multiplier (rounded up) with which `prior` + `steps` more steps stay within `target_epsilon`.

    The result is always one the accountant was asked about and found within budget, so the bound holds; it is
    within `rel_tol` of the exact threshold. Raises ValueError if no noise multiplier up to `max_noise` fits
    (typically: `prior` already spent the budget).
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    prior = list(prior)
    _check_step(MechanismStep(1.0, sample_rate, steps))
    cache: dict[float, float] = {}

    def exact(sigma: float) -> float:
        return epsilon_for(prior + [MechanismStep(sigma, sample_rate, steps)], delta, accountant)

    search = _rdp_epsilon_after(prior, sample_rate, steps, delta) if accountant == "rdp" else exact

    def eps_of(sigma: float) -> float:
        if sigma not in cache:
            cache[sigma] = search(sigma)
        return cache[sigma]

    def feasible(sigma: float) -> bool:
        return eps_of(sigma) <= target_epsilon

    spent = epsilon_for(prior, delta, accountant)
    guess = 1.0
    if accountant == "prv" and spent < target_epsilon:
        # PRV calls are slow at small sigma; RDP's answer (an upper bound on PRV's, usually close) is a cheap start
        try:
            guess = calibrate_noise_multiplier(
                target_epsilon, delta, sample_rate, steps, "rdp", prior, max_noise, rel_tol=0.05
            )
        except ValueError:
            guess = 1.0
    sigma = (
        None
        if spent >= target_epsilon
        else _smallest_feasible(feasible, eps_of, target_epsilon, guess, max_noise, rel_tol)
    )
    if sigma is None:
        raise ValueError(
            f"no noise multiplier <= {max_noise:g} keeps epsilon <= {target_epsilon:g} at delta={delta:.2e} "
            f"({accountant.upper()}) for {steps} more steps at sample rate {sample_rate:.4g}; "
            f"already spent: epsilon {spent:.3f}"
        )
    for _ in range(
        100
    ):  # the search's shortcut can differ from epsilon_for in the last bits: settle on the safe side
        if (exact(sigma) if accountant == "rdp" else eps_of(sigma)) <= target_epsilon:
            return sigma
        sigma *= 1 + rel_tol / 10
    raise ValueError(
        f"calibration did not converge for target epsilon {target_epsilon:g} (sigma {sigma:g})"
    )


def default_delta(n_patients: int) -> float:
    """min(1e-5, 1 / (10 x patients)): far below 1/n (a delta near 1/n would allow leaking one patient outright;
    1/(10 n) alone is about 1e-3 at a site of 100 patients, far from the usual 1e-5). The release gate holds every
    site to the same limit (privacy/policy.py)."""
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    return min(1e-5, 1.0 / (10 * n_patients))
