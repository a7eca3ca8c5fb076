"""One-run audit (Steinke et al. 2023) against mechanisms with a known epsilon, and its published anchor figures."""

import math

import numpy as np
import pytest

from privacy import one_run


def _randomised_response(rng, m: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Canaries included with probability 1/2; the 'model' reveals each inclusion bit through eps-DP randomised
    response (exactly eps-DP per canary, and nothing more)."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    return np.where(truthful, included, ~included).astype(float), included


def _laplace(rng, m: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Graded scores, so abstention has something to rank: inclusion (+1/-1) plus Laplace noise of scale 2/eps
    (sensitivity 2), exactly eps-DP per canary."""
    included = rng.random(m) < 0.5
    return np.where(included, 1.0, -1.0) + rng.laplace(0, 2 / eps, m), included


@pytest.mark.parametrize("m,expected", [(100, 3.5), (1000, 5.8), (5000, 7.3)])
def test_power_reproduces_the_published_anchors(m, expected):
    """shared/README.md section 6: all-correct guesses certify about 3.5 / 5.8 / 7.3 at 95 % and delta 1e-5."""
    assert one_run.power(m, delta=1e-5, alpha=0.05) == pytest.approx(expected, abs=0.05)


def test_p_value_matches_the_paper_example_and_pure_dp_tail():
    # Appendix D's example: 75 of 100 right under eps = log 3 (randomised response at 75 %) is unremarkable.
    assert one_run.p_value(100, 100, 75, math.log(3), 0.0) == pytest.approx(0.5535, abs=1e-3)
    # delta = 0: exactly the binomial tail; all r right has probability q^r
    q = 1 / (1 + math.exp(-2.0))
    assert one_run.p_value(50, 40, 40, 2.0, 0.0) == pytest.approx(q**40)
    # delta only ever raises the p-value, so it only lowers the bound
    assert one_run.p_value(1000, 1000, 990, 4.0, 1e-5) > one_run.p_value(1000, 1000, 990, 4.0, 0)
    assert one_run.epsilon_lower_bound(5000, 5000, 5000, 1e-5) < one_run.epsilon_lower_bound(
        5000, 5000, 5000, 0.0
    )


def test_no_signal_gives_zero_and_bad_input_is_refused():
    assert one_run.epsilon_lower_bound(1000, 1000, 500, 1e-5) == 0.0
    assert one_run.epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0  # abstained on everything
    with pytest.raises(ValueError, match="correct"):
        one_run.epsilon_lower_bound(10, 5, 6, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        one_run.p_value(10, 5, 3, 1.0, 1.5)
    with pytest.raises(ValueError, match="scores"):
        one_run.audit([1.0, 2.0], [True], 1e-5)


@pytest.mark.parametrize("eps", [1.0, 3.0])
def test_bound_holds_at_its_confidence_over_many_runs(eps):
    """The theorem's promise, checked by simulation: with randomised response at a known eps, the bound exceeds
    eps in at most alpha of the runs (here: 300 runs, no more than 5 % plus three standard errors)."""
    rng = np.random.default_rng(12)
    m, runs = 300, 300
    over = 0
    for _ in range(runs):
        scores, included = _randomised_response(rng, m, eps)
        v = int((scores.astype(bool) == included).sum())
        over += one_run.epsilon_lower_bound(m, m, v, delta=0.0, alpha=0.05) > eps
    assert over / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_audit_with_abstention_never_over_claims_a_laplace_mechanism():
    rng = np.random.default_rng(3)
    eps, over = 2.0, 0
    for _ in range(60):
        scores, included = _laplace(rng, 500, eps)
        out = one_run.audit(scores, included, delta=1e-5)
        over += out["epsilon_lower_bound"] > eps
        assert out["epsilon_lower_bound"] <= out["power"]
    assert over <= 6  # alpha = 5 % of 60 runs is 3; Bonferroni makes it rarer still


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_bound_approaches_the_true_epsilon_with_enough_canaries(eps):
    """A typical run (the expected number of correct guesses of randomised response) certifies close to eps;
    single draws scatter around it (the coverage test above checks how often they exceed it)."""
    m = 20_000
    v = round(m * math.exp(eps) / (1 + math.exp(eps)))
    lb = one_run.epsilon_lower_bound(m, m, v, delta=1e-5)
    assert 0.85 * eps < lb < eps
    # and with few canaries it cannot: the power caps it
    assert one_run.power(20, 1e-5) < eps + 1.5


def test_audit_catches_a_mechanism_weaker_than_claimed():
    """A run that is really eps = 6 but claims 2: a few thousand canaries certify more than the claim."""
    rng = np.random.default_rng(7)
    scores, included = _laplace(rng, 3000, 6.0)
    out = one_run.audit(scores, included, delta=1e-5)
    assert out["epsilon_lower_bound"] > 2.0
    assert out["n_canaries"] == 3000 and out["n_included"] == int(included.sum())


def test_perfect_attack_reaches_the_power_and_abstention_helps_a_weak_one():
    rng = np.random.default_rng(9)
    # the power is reached exactly when half the canaries were included (guesses are split half "in", half "out")
    balanced = rng.permutation(np.arange(800) < 400)
    perfect = one_run.audit(np.where(balanced, 1.0, 0.0), balanced, delta=1e-5)
    assert perfect["epsilon_lower_bound"] == pytest.approx(perfect["power"])
    assert perfect["guesses"] == 800 and perfect["correct"] == 800
    included = rng.random(800) < 0.5  # otherwise a perfect attack comes close to it, never above
    near = one_run.audit(np.where(included, 1.0, 0.0), included, delta=1e-5)
    assert 0.8 * near["power"] < near["epsilon_lower_bound"] <= near["power"]
    # a few canaries leak loudly, the rest not at all: guessing only on the extremes certifies more
    scores = rng.normal(0, 1, 800)
    loud = np.flatnonzero(included)[:60]
    scores[loud] += 20
    out = one_run.audit(scores, included, delta=1e-5)
    by_fraction = {row["guess_fraction"]: row["epsilon_lower_bound"] for row in out["levels"]}
    assert by_fraction[0.1] > by_fraction[1.0]
    assert out["epsilon_lower_bound"] == max(by_fraction.values())


def test_guesses_rank_and_abstain():
    g = one_run.guesses([0.1, 5.0, -3.0, 0.2, 7.0], k_in=2, k_out=1)
    assert g.tolist() == [0, 1, -1, 0, 1]
    with pytest.raises(ValueError, match="cannot make"):
        one_run.guesses([1.0, 2.0], 2, 1)


def test_canaries_for_power_is_the_smallest_sufficient_count():
    m = one_run.canaries_for_power(5.0, delta=1e-5)
    assert one_run.power(m, 1e-5) >= 5.0 > one_run.power(m - 1, 1e-5)


def test_canaries_for_power_respects_its_limit_and_a_large_delta():
    with pytest.raises(ValueError, match="cannot certify"):
        one_run.canaries_for_power(5.0, delta=1e-5, limit=100)
    # a large delta (1 / (10 n) at a 15-patient site) caps the power whatever m: refused, not looped forever
    with pytest.raises(ValueError, match="cannot certify"):
        one_run.canaries_for_power(2.5, delta=1 / 150, limit=10_000)
