"""Accounting: epsilon from a composed history matches Opacus, and calibrated noise never overspends."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy.accounting import MechanismStep, calibrate_noise_multiplier, default_delta, epsilon_for

REFERENCE = MechanismStep(noise_multiplier=1.5, sample_rate=0.04, steps=2250)


def _opacus_stepped(steps: list[MechanismStep], accountant) -> float:
    """Epsilon from an Opacus accountant driven the ordinary way: one .step() per DP-SGD step."""
    for s in steps:
        for _ in range(s.steps):
            accountant.step(noise_multiplier=s.noise_multiplier, sample_rate=s.sample_rate)
    return accountant.get_epsilon(delta=1e-5)


@pytest.mark.parametrize(
    "name, cls, published", [("rdp", RDPAccountant, 7.33), ("prv", PRVAccountant, 6.78)]
)
def test_reference_run_matches_opacus_and_published_values(name, cls, published):
    eps = epsilon_for([REFERENCE], 1e-5, name)
    assert eps == pytest.approx(_opacus_stepped([REFERENCE], cls()), rel=1e-9)
    assert eps == pytest.approx(published, abs=0.05)


def test_empty_history_spends_nothing():
    assert epsilon_for([], 1e-5) == 0.0
    assert epsilon_for([MechanismStep(1.0, 0.1, 0)], 1e-5) == 0.0


@pytest.mark.parametrize("name, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_history_composes_like_one_accountant_stepped_through_it(name, cls):
    a, b = MechanismStep(1.2, 0.05, 300), MechanismStep(2.0, 0.1, 200)
    composed = epsilon_for([a, b], 1e-5, name)
    assert composed == pytest.approx(_opacus_stepped([a, b], cls()), rel=1e-6)
    # composing is not taking the worst round: the whole history costs more than either part alone
    assert composed > max(epsilon_for([a], 1e-5, name), epsilon_for([b], 1e-5, name))
    # and one run of N steps equals the same N steps recorded as several rounds
    split = [MechanismStep(1.2, 0.05, 100)] * 3
    assert epsilon_for(split, 1e-5, "rdp") == pytest.approx(epsilon_for([a], 1e-5, "rdp"), rel=1e-9)


def test_more_steps_never_lower_epsilon():
    values = [
        epsilon_for([MechanismStep(1.0, 0.02, n)], 1e-5) for n in (1, 10, 100, 500, 1000, 3000)
    ]
    assert all(x < y for x, y in zip(values, values[1:], strict=False)), values
    base = [MechanismStep(1.0, 0.02, 500)]
    assert epsilon_for(base + [MechanismStep(5.0, 0.001, 1)], 1e-5) >= epsilon_for(base, 1e-5)


def test_no_noise_means_no_guarantee_and_bad_input_is_refused():
    assert epsilon_for([MechanismStep(0.0, 0.1, 5)], 1e-5) == math.inf
    with pytest.raises(ValueError, match="sample_rate"):
        epsilon_for([MechanismStep(1.0, 1.5, 5)], 1e-5)
    with pytest.raises(ValueError, match="delta"):
        epsilon_for([REFERENCE], 0.0)
    with pytest.raises(ValueError, match="accountant"):
        epsilon_for([REFERENCE], 1e-5, "gdp-ish")


def test_calibration_refuses_a_spent_budget():
    prior = [MechanismStep(0.8, 0.1, 1000)]
    spent = epsilon_for(prior, 1e-5)
    with pytest.raises(ValueError, match="already spent"):
        calibrate_noise_multiplier(spent * 0.9, 1e-5, 0.05, 10, prior=prior)


def test_prv_calibration_on_the_reference_run():
    sigma = calibrate_noise_multiplier(6.78, 1e-5, 0.04, 2250, accountant="prv")
    assert epsilon_for([MechanismStep(sigma, 0.04, 2250)], 1e-5, "prv") <= 6.78
    assert sigma == pytest.approx(1.5, rel=0.01)
    assert epsilon_for([MechanismStep(sigma * 0.97, 0.04, 2250)], 1e-5, "prv") > 6.78


def test_default_delta_is_below_one_over_ten_n():
    assert default_delta(1000) <= 1 / (10 * 1000)
    assert default_delta(90) == 1e-5  # not 1/(10 n) = 1.1e-3 at a demo-sized site
    assert default_delta(10**6) == 1e-7
    with pytest.raises(ValueError):
        default_delta(0)


# q log-uniform over [0.001, 0.5]: large q makes every accountant call slow, so draw it less often
_rates = st.floats(math.log(0.001), math.log(0.5)).map(math.exp)
_priors = st.one_of(
    st.none(), st.tuples(st.floats(0.5, 5.0), st.floats(0.001, 0.2), st.integers(1, 1000))
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    target=st.floats(0.5, 20.0),
    delta_exp=st.integers(3, 8),
    q=_rates,
    steps=st.integers(1, 3000),
    prior=_priors,
)
def test_calibrated_noise_never_exceeds_the_target_and_is_tight(target, delta_exp, q, steps, prior):
    delta = 10.0**-delta_exp
    history = [MechanismStep(*prior)] if prior else []
    try:
        sigma = calibrate_noise_multiplier(target, delta, q, steps, prior=history)
    except ValueError:
        # infeasible must really be infeasible: even the largest noise allowed overspends
        assert epsilon_for(history + [MechanismStep(1e3, q, steps)], delta) > target
        return
    assert epsilon_for(history + [MechanismStep(sigma, q, steps)], delta) <= target
    assert epsilon_for(history + [MechanismStep(sigma * 0.97, q, steps)], delta) > target


def test_calibration_against_a_multi_round_prior_holds_under_both_accountants():
    prior = [
        MechanismStep(1.0 + 0.2 * r, 0.05, 50) for r in range(3)
    ]  # three rounds, each calibrated anew
    for name in ("rdp", "prv"):
        spent = epsilon_for(prior, 1e-5, name)
        sigma = calibrate_noise_multiplier(
            spent + 1.0, 1e-5, 0.05, 50, accountant=name, prior=prior
        )
        assert (
            spent < epsilon_for(prior + [MechanismStep(sigma, 0.05, 50)], 1e-5, name) <= spent + 1.0
        )


def test_rounds_with_the_same_mechanism_compose_in_any_order():
    a, b = MechanismStep(1.0, 0.05, 100), MechanismStep(2.0, 0.02, 300)
    assert epsilon_for([a, b, a], 1e-5) == pytest.approx(
        epsilon_for([MechanismStep(1.0, 0.05, 200), b], 1e-5)
    )
