"""Attack (issue 14, the SuperLink restart): the same round (run id, server round) reaches a site twice, as when a
run in flight is submitted again after a crash and resumes from its last checkpoint, or when a server replays a
round on purpose. The site's ledger must charge every mechanism it ran exactly once: the second delivery trains
again and is a second mechanism (its update is a second release, so it costs), never folded into the first (a
ledger keyed on (run id, round) would under-charge it) and never recorded twice."""

import pytest

from client.task import open_ledger, run_training_round
from common.config import SiteConfig, model_config
from common.messages import RoundPlan
from common.model import build_autoencoder
from common.phantoms import make_phantom_sites
from privacy.accounting import MechanismStep, epsilon_for


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_sites(out, n_sites=1, n_subjects=20, size=32, seed=5)[0]


def _plan() -> RoundPlan:
    return RoundPlan(
        run_id="run-restarted",
        server_round=1,
        phase="autoencoder",
        num_server_rounds=2,
        federated_autoencoder_rounds=1,
        preset="tiny",
        local_epochs=1,
        batch_size=5,
        lr=1e-3,
        kl_weight=1e-6,
        latent_scale=1.0,
        proximal_mu=0.0,
        seed=0,
    )


def test_a_round_delivered_twice_is_charged_once_per_training_never_less(tmp_path, site_dir):
    site = SiteConfig(site_dir=str(site_dir), state_dir=str(tmp_path / "state"), epsilon=20.0)
    ae = build_autoencoder(model_config("tiny")).state_dict()
    first = run_training_round(site, _plan(), ae)
    second = run_training_round(site, _plan(), ae)  # the same run id and round, again
    assert not first.refused and not second.refused

    ledger = open_ledger(site)
    entries = ledger.entries()
    assert [(e["run_id"], e["server_round"]) for e in entries] == [("run-restarted", 1)] * 2
    steps = [MechanismStep(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    for result, n in ((first, 1), (second, 2)):
        assert result.privacy["noise_multiplier"] == entries[n - 1]["noise_multiplier"]
        delta, accountant = result.privacy["delta"], result.privacy["accountant"]
        # what the site reports after each delivery is the composition of exactly the mechanisms it ran so far
        assert result.metrics["epsilon"] == pytest.approx(
            epsilon_for(steps[:n], delta, accountant), rel=1e-9
        )
    # the second delivery cost something (not folded into the first) and was counted once (not twice)
    assert second.metrics["epsilon"] > first.metrics["epsilon"]
    assert ledger.epsilon(delta, accountant) == pytest.approx(
        epsilon_for(steps, delta, accountant), rel=1e-9
    )
