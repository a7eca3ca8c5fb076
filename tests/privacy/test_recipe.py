"""The DP fine-tuning recipe: large batches from the patient count, the planned steps, a noise the site's own
calibration reproduces; only public inputs."""

import inspect
import math

import pytest

from client.task import steps_per_round
from common.config import DP_TRAINABLE
from common.messages import RoundPlan
from privacy.accounting import MechanismStep, epsilon_for
from privacy.recipe import dp_recipe


@pytest.mark.parametrize("n", [40, 300, 1000, 20_000])
def test_the_recipe_samples_a_large_share_and_plans_what_the_site_runs(n):
    r = dp_recipe(10.0, 1e-5, n, "small")
    assert r.batch_size == min(2048, max(16, round(0.25 * n)), n)
    plan = RoundPlan(
        run_id="r", server_round=1, phase="diffusion", num_server_rounds=1,
        federated_autoencoder_rounds=0, preset="small", local_epochs=r.local_epochs,
        batch_size=r.batch_size, lr=r.lr, kl_weight=1e-6, latent_scale=1.0, proximal_mu=0.0,
        seed=0, class_dropout=r.class_dropout, dp_trainable=r.dp_trainable,
    )  # fmt: skip
    q, steps = steps_per_round(n, plan)  # what the site will plan and record
    assert math.isclose(q, r.sample_rate) and steps == r.steps
    eps = epsilon_for([MechanismStep(r.noise_multiplier, q, steps)], 1e-5)
    assert eps == pytest.approx(10.0, rel=0.02)
    assert r.dp_trainable in DP_TRAINABLE and r.max_grad_norm > 0 and r.lr > 0


def test_a_smaller_budget_means_more_noise_and_the_inputs_are_public():
    assert (
        dp_recipe(1.0, 1e-5, 1000).noise_multiplier > dp_recipe(10.0, 1e-5, 1000).noise_multiplier
    )
    assert list(inspect.signature(dp_recipe).parameters) == [
        "epsilon", "delta", "n_patients", "preset", "diffusion_rounds", "target_steps",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="preset"):
        dp_recipe(10.0, 1e-5, 100, "huge")
