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
        "epsilon", "delta", "n_patients", "preset", "diffusion_rounds", "target_steps", "autoencoder_rounds",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="preset"):
        dp_recipe(10.0, 1e-5, 100, "huge")


def test_autoencoder_rounds_add_their_steps_to_the_budget_and_carry_their_own_settings():
    """An autoencoder round runs the diffusion rounds' batch and epochs (plan_privacy plans every round alike), so
    the recipe's noise must be calibrated over its steps too: a recipe that left them out would promise a noise
    the sites then cannot keep."""
    from common.config import AE_TRAINABLE
    from privacy.accounting import calibrate_noise_multiplier

    plain = dp_recipe(10.0, 1e-5, 1800, diffusion_rounds=2)
    with_ae = dp_recipe(10.0, 1e-5, 1800, diffusion_rounds=2, autoencoder_rounds=1)
    assert (with_ae.batch_size, with_ae.local_epochs) == (plain.batch_size, plain.local_epochs)
    assert with_ae.steps == plain.steps * 3 // 2
    assert with_ae.noise_multiplier > plain.noise_multiplier
    assert with_ae.noise_multiplier == pytest.approx(
        calibrate_noise_multiplier(10.0, 1e-5, with_ae.sample_rate, with_ae.steps, max_noise=1e3)
    )
    assert with_ae.dp_trainable_autoencoder in AE_TRAINABLE and with_ae.lr_autoencoder > 0
    with pytest.raises(ValueError, match="autoencoder_rounds"):
        dp_recipe(10.0, 1e-5, 1800, autoencoder_rounds=-1)
