"""The power of an audit: the bound a perfect attack reaches, computed through the real bound functions."""

import numpy as np
import pytest

from privacy import one_run
from privacy.audit_stats import empirical_epsilon_lower_bound
from privacy.power import annotate, canary_power, holdout_power, is_underpowered


@pytest.mark.parametrize("n,k,expected", [(90, 30, 2.3), (900, 300, 4.8)])
def test_holdout_power_reproduces_the_issue_figures(n, k, expected):
    assert holdout_power(n, k, delta=1e-5) == pytest.approx(expected, abs=0.05)


@pytest.mark.parametrize("n,k", [(90, 30), (41, 17), (900, 300), (4, 4)])
def test_holdout_power_equals_a_perfect_attack_through_the_real_bound(n, k):
    """A perfect attack never exceeds the power, and reaches it when the threshold chosen on the selection half
    (some member's score there) lets every evaluation member through: members' scores sorted so it does."""
    rng = np.random.default_rng(n + k)
    bounds = [
        empirical_epsilon_lower_bound(
            rng.normal(100, 1, n), rng.normal(0, 1, k), delta=1e-5, seed=s
        )["epsilon_lower_bound"]
        for s in range(10)
    ]
    assert max(bounds) <= holdout_power(n, k, 1e-5) + 1e-12
    # all members tied: any member threshold flags them all
    tied = empirical_epsilon_lower_bound(np.full(n, 100.0), rng.normal(0, 1, k), delta=1e-5)
    assert tied["epsilon_lower_bound"] == pytest.approx(holdout_power(n, k, 1e-5))


def test_no_attack_beats_the_power():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m, n = rng.normal(rng.uniform(0, 8), 1, 60), rng.normal(0, 1, 40)
        lb = empirical_epsilon_lower_bound(m, n, 1e-5, seed=int(rng.integers(1000)))
        assert lb["epsilon_lower_bound"] <= holdout_power(60, 40, 1e-5) + 1e-12
    assert holdout_power(3, 100, 1e-5) == 0.0  # below the bound's own minimum


def test_canary_power_matches_the_audit_with_its_correction():
    included = np.random.default_rng(1).random(500) < 0.5
    out = one_run.audit(included.astype(float), included, delta=1e-5)
    assert out["power"] == pytest.approx(canary_power(500, 1e-5))
    assert canary_power(500, 1e-5) < one_run.power(500, 1e-5)  # Bonferroni costs power


def test_underpowered_rule():
    # the demo-sized hold-out cannot speak about a claim of 10
    assert is_underpowered(holdout_power(90, 30, 1e-5), claimed_epsilon=10.0)
    assert not is_underpowered(canary_power(1000, 1e-5), claimed_epsilon=10.0)
    assert is_underpowered(0.0, float("inf")) and not is_underpowered(0.5, float("inf"))
    row = annotate({"epsilon_lower_bound": 0.0}, 2.3, 10.0)
    assert row["underpowered"] and row["range_of_interest"] == 5.0 and row["power"] == 2.3


def _site(n_members, n_nonmembers, claimed=10.0, canaries=None, delta=1e-5):
    roc = {"n_members": n_members, "n_nonmembers": n_nonmembers, "epsilon_lower_bound": {}}
    mem = {"white_box": dict(roc), "black_box": dict(roc)}
    if canaries is not None:
        mem["canaries"] = canaries
    return {"claimed_privacy": {"epsilon": claimed, "delta": delta}, "membership": mem}


def test_verdict_notes_underpowered_site_and_powered_one():
    from privacy.power import site_power, verdict_notes

    small = _site(
        90, 30
    )  # the issue's demo-sized site: a perfect attack reaches 2.3 of a claim of 10
    powered = _site(90, 30, canaries={"n_canaries": 1000, "epsilon_lower_bound": 0.4})
    findings, under, per_site = verdict_notes({"small": small, "powered": powered})
    assert findings == []
    assert len(under) == 1 and under[0].startswith("underpowered: small") and "2.30" in under[0]
    assert per_site["small"]["power"] == pytest.approx(holdout_power(90, 30, 1e-5))
    assert per_site["powered"]["power"] == pytest.approx(canary_power(1000, 1e-5))
    assert per_site["powered"]["power"] > 5.0 and not per_site["powered"]["underpowered"]
    # a site without DP has no range of interest: not judged underpowered
    assert site_power(_site(90, 30, claimed=None))["underpowered"] is None


def test_verdict_notes_canary_bound_above_the_claim_is_a_finding():
    from privacy.power import verdict_notes

    broken = _site(90, 30, claimed=2.0, canaries={"n_canaries": 1000, "epsilon_lower_bound": 3.1})
    findings, under, _ = verdict_notes({"broken": broken})
    assert len(findings) == 1 and "3.10 exceeds the claimed epsilon 2.00" in findings[0]
    assert under == []
