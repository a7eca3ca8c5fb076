"""Site canaries: gradient-space (Dirac) canaries drawn from the site's entropy, kept in its state, trained on like
one more patient (same rate, clipping norm and noise) and scored by how far their coordinates moved; the one-run
audit on them never over-claims a DP run and catches one whose noise is weaker than claimed."""

import json
import random

import numpy as np
import pytest
import torch
from opacus.optimizers.optimizer import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

from client import canaries, reference
from common.config import SiteConfig, model_config
from common.model import build_autoencoder, build_unet, trainable_names
from privacy.power import canary_power
from tests.client.conftest import tiny_plan


@pytest.fixture
def site(tmp_path):
    return SiteConfig(
        site_dir=str(tmp_path / "site"), state_dir=str(tmp_path / "state"), canaries=40
    )


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet(model_config("tiny"))


def test_inclusion_is_drawn_from_os_entropy_and_persisted(tmp_path, site):
    # whatever the seeds a server could set, two sites (or two fresh states) draw different sets
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    a = canaries.load_or_create(site, n_patients=100, delta=1e-5)
    other = SiteConfig(site_dir=site.site_dir, state_dir=str(tmp_path / "other"), canaries=40)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    b = canaries.load_or_create(other, n_patients=100, delta=1e-5)
    assert a.included != b.included and a.seed != b.seed
    assert canaries.load_or_create(site, 100, 1e-5) == a  # kept for the site's lifetime
    assert json.loads(canaries.state_path(site).read_text())["n"] == 40


def test_fair_coin(tmp_path):
    site = SiteConfig(site_dir=str(tmp_path), state_dir=str(tmp_path / "s"), canaries=4000)
    state = canaries.load_or_create(site, 10, 1e-5)
    assert abs(state.n_included - 2000) < 4 * np.sqrt(1000)  # Binomial(4000, 1/2): sd 31.6


def test_changed_count_and_corrupt_or_old_state_are_refused_with_what_to_do(site):
    canaries.load_or_create(site, 100, 1e-5)
    changed = SiteConfig(site_dir=site.site_dir, state_dir=site.state_dir, canaries=41)
    with pytest.raises(ValueError, match="holds 40 canaries.*canaries=40"):
        canaries.load_or_create(changed, 100, 1e-5)
    auto = SiteConfig(site_dir=site.site_dir, state_dir=site.state_dir, canaries=-1)
    assert canaries.load_or_create(auto, 100, 1e-5).n == 40  # auto keeps the drawn set
    path = canaries.state_path(site)
    path.write_text(json.dumps({"format_version": 2, "n": 3, "seed": 1, "included": [1]}))
    with pytest.raises(ValueError, match="canaries.json.*3.*move it away"):
        canaries.load_or_create(site, 100, 1e-5)
    path.write_text(json.dumps({"format_version": 1, "n": 1, "render_seed": 1, "included": [1]}))
    with pytest.raises(ValueError, match="image canaries.*move it away"):
        canaries.load_or_create(site, 100, 1e-5)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable canary state"):
        canaries.load_or_create(site, 100, 1e-5)


def test_auto_count_is_sized_by_the_power_the_claim_needs(tmp_path):
    cfg = SiteConfig(site_dir=str(tmp_path), epsilon=10.0)
    m = canaries.auto_count(cfg, n_patients=90, delta=1e-5)
    assert canary_power(m, 1e-5) >= 5.0 > canary_power(m - 1, 1e-5)  # half the claim, no more
    assert canaries.auto_count(cfg, n_patients=10_000, delta=1e-5) == m  # patients cost nothing
    # a large delta caps the power whatever m: the ceiling, and the audit then says it is underpowered
    small = SiteConfig(site_dir=str(tmp_path), epsilon=5.0)
    assert canaries.auto_count(small, n_patients=15, delta=1 / 150) == canaries.MAX_CANARIES
    assert canaries.auto_count(SiteConfig(site_dir=str(tmp_path), dp=False), 10_000, 1e-5) == 0
    with pytest.raises(ValueError, match="canaries"):
        SiteConfig(site_dir=str(tmp_path), canaries=-2)
    # the ceiling fits the smallest UNet
    big = canaries.CanaryState(canaries.MAX_CANARIES, 1, (True,) * canaries.MAX_CANARIES)
    canaries.coordinates(big, build_unet(model_config("tiny")))


def test_coordinates_are_distinct_fixed_by_the_seed_and_always_trained(site, unet):
    state = canaries.load_or_create(site, 100, 1e-5)
    a, b = canaries.coordinates(state, unet), canaries.coordinates(state, unet)
    assert a.names == b.names and np.array_equal(a.index, b.index)
    assert a.index.shape == a.signs.shape == (40, canaries.DIMENSIONS)
    pairs = {
        (n, int(k))
        for row, idx in zip(a.names, a.index, strict=True)
        for n, k in zip(row, idx, strict=True)
    }
    assert len(pairs) == 40 * canaries.DIMENSIONS  # no two canaries share a coordinate
    # on parameters trained under every dp-trainable choice
    assert {n for row in a.names for n in row} <= set(
        trainable_names(unet, "attention-conditioning")
    )
    other = canaries.CanaryState(40, state.seed + 1, state.included)
    assert canaries.coordinates(other, unet).names != a.names
    huge = canaries.CanaryState(10**6, 1, (True,) * 10**6)
    with pytest.raises(ValueError, match="coordinates.*canaries <="):
        canaries.coordinates(huge, unet)


def test_included_canaries_move_their_coordinates_by_exactly_their_gradient(site, unet):
    """One plain SGD step (no loss): each included canary's coordinates move by -lr C s / (sqrt(d) B), nothing
    else moves."""
    state = canaries.load_or_create(site, 100, 1e-5)
    start = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.SGD(unet.parameters(), lr=1.0)
    assert canaries.attach(opt, unet, state, 1.0, max_grad_norm=2.0, expected_batch_size=4) == (
        state.n_included
    )
    opt.zero_grad()
    opt.step()
    after = unet.state_dict()
    coords = canaries.coordinates(state, unet)
    step = 2.0 / np.sqrt(canaries.DIMENSIONS) / 4
    moved = 0
    for i, inc in enumerate(state.included):
        for name, k, s in zip(coords.names[i], coords.index[i], coords.signs[i], strict=True):
            delta = float(after[name].reshape(-1)[k] - start[name].reshape(-1)[k])
            assert delta == pytest.approx(-s * step if inc else 0.0, abs=1e-6)
            moved += inc
    total = sum(float((after[k] - start[k]).abs().gt(0).sum()) for k in start)
    assert total == moved
    scores = canaries.scores(state, unet, after, start)
    assert np.allclose(scores[np.array(state.included)], step / 1.0 * 1.0, rtol=1e-4)
    assert np.all(scores[~np.array(state.included)] == 0)
    unet.load_state_dict(start)


def test_the_per_step_canary_draws_are_the_sites_not_the_seeds_the_server_can_set(site, unet):
    """Attack: a server that could reproduce which canaries were drawn at which step (by fixing torch's, numpy's
    and Python's global seeds, as its plan's seed does) would know each included canary's exact contribution.
    The same attach + steps under the same global seeds must draw different canaries."""
    state = canaries.load_or_create(site, 100, 1e-5)
    start = {k: v.detach().clone() for k, v in unet.state_dict().items()}

    def moved_after_steps() -> np.ndarray:
        unet.load_state_dict(start)
        torch.manual_seed(1234)
        np.random.seed(1234)
        random.seed(1234)
        opt = torch.optim.SGD(unet.parameters(), lr=1.0)
        canaries.attach(opt, unet, state, 0.5, max_grad_norm=1.0, expected_batch_size=4)
        for _ in range(3):
            opt.zero_grad()
            opt.step()
        return canaries.scores(state, unet, unet.state_dict(), start)

    first, second = moved_after_steps(), moved_after_steps()
    unet.load_state_dict(start)
    included = np.array(state.included)
    assert np.all(first[~included] == 0) and np.all(second[~included] == 0)
    # ~50 included canaries x 3 steps at rate 1/2: equal draws by chance with probability 2^-150
    assert not np.allclose(first[included], second[included])


def test_audit_canaries_with_a_perfect_and_a_blind_attack(site, unet):
    state = canaries.load_or_create(site, 100, 1e-5)
    start = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    coords = canaries.coordinates(state, unet)
    trained = {k: v.clone() for k, v in start.items()}
    for i in np.flatnonzero(
        state.included
    ):  # a model that moved every included canary's coordinates
        for name, k, s in zip(coords.names[i], coords.index[i], coords.signs[i], strict=True):
            trained[name].view(-1)[k] -= 0.01 * s
    out = canaries.audit_canaries(state, unet, trained, start, delta=1e-5, claimed_epsilon=10.0)
    # Inclusion is a fair coin per canary (site entropy), so "in" and "out" are rarely 20/20: a perfect attack is
    # right on every guess at each level whose "in" and "out" guesses fit the drawn counts.
    n_in = out["n_included"]
    for row in out["levels"]:
        k_in, k_out = (row["guesses"] + 1) // 2, row["guesses"] // 2
        if k_in <= n_in and k_out <= 40 - n_in:
            assert row["correct"] == row["guesses"] > 0, row
    assert 0 < out["epsilon_lower_bound"] <= out["power"] == pytest.approx(canary_power(40, 1e-5))
    assert out["underpowered"] and out["range_of_interest"] == 5.0  # 40 canaries cannot speak to 10
    assert out["attack"] == canaries.ATTACK
    # only counts leave: no per-canary list (scores, flags, guesses) of length m in the result
    assert not any(isinstance(v, list) and len(v) == 40 for v in out.values())
    # a model that moved nothing the canaries' way, and a missing starting model: no bound, and why
    assert (
        canaries.audit_canaries(state, unet, start, start, 1e-5, 10.0)["epsilon_lower_bound"] == 0
    )
    none = canaries.audit_canaries(state, unet, trained, None, 1e-5, 10.0)
    assert none["n_canaries"] == 0 and "no starting UNet" in none["note"]


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory):
    from common.phantoms import make_phantom_sites

    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_sites(out, n_sites=1, n_subjects=24, size=32, seed=3)[0]


def _dp_round(tmp_path, phantom_site, n_canaries, name, epsilon=1.0, epochs=4):
    """One real DP diffusion round at a site (the run's start kept as its reference, as client_app does)."""
    from client import task

    cfg = model_config("tiny")
    torch.manual_seed(0)
    ae, start = build_autoencoder(cfg).state_dict(), build_unet(cfg).state_dict()
    site = SiteConfig(
        site_dir=str(phantom_site),
        state_dir=str(tmp_path / name),
        canaries=n_canaries,
        epsilon=epsilon,
        threads=1,
    )
    reference.keep_for_round(site, "r", "diffusion", start)
    plan = tiny_plan(
        run_id="r", phase="diffusion", federated_autoencoder_rounds=0, local_epochs=epochs, batch_size=6,
        lr=2e-3,
    )  # fmt: skip
    result = task.run_training_round(site, plan, start, ae)
    assert not result.refused
    state = canaries.load(site)
    out = canaries.audit_canaries(
        state, build_unet(cfg), result.state_dict, reference.load(site, "r"), result.privacy["delta"],
        result.privacy["epsilon"],
    )  # fmt: skip
    return site, result, out


@pytest.mark.slow
def test_canaries_leave_the_patients_mechanism_alone_and_a_dp_run_is_never_over_claimed(
    tmp_path, phantom_site
):
    from client.task import open_ledger

    site0, r0, _ = _dp_round(tmp_path, phantom_site, 0, "none")
    site, r, audit = _dp_round(tmp_path, phantom_site, 1000, "with")
    # the patients' mechanism and spend are the same with and without canaries; the ledger knows only patients
    for key in ("sample_rate", "steps_total", "noise_multiplier", "delta", "epsilon"):
        assert r.privacy[key] == pytest.approx(r0.privacy[key])
    assert r.metrics["num-examples"] == r0.metrics["num-examples"]
    assert open_ledger(site).patients_of("r") == open_ledger(site0).patients_of("r")
    # the audit ran on all 1000 (a perfect attack could certify 5.37) and stays below the claim of 1
    assert audit["n_canaries"] == 1000 and audit["power"] > 5
    assert audit["epsilon_lower_bound"] <= r.privacy["epsilon"] <= 1.0


@pytest.mark.slow
def test_a_dp_run_whose_noise_is_weaker_than_claimed_is_caught(tmp_path, phantom_site, monkeypatch):
    """The attack the audit exists for: a DP-SGD implementation that adds 1/100 of the noise it accounts for.
    The same round as above, claiming epsilon 1, must certify more than 1 (so the test above is not vacuous)."""
    for cls in (DPOptimizer, DPOptimizerFastGradientClipping):
        real = cls.add_noise

        def weak(self, real=real):
            sigma = self.noise_multiplier
            self.noise_multiplier = sigma / 100
            try:
                real(self)
            finally:
                self.noise_multiplier = sigma

        monkeypatch.setattr(cls, "add_noise", weak)
    _, r, audit = _dp_round(tmp_path, phantom_site, 1000, "weak")
    assert r.privacy["epsilon"] <= 1.0  # what the broken site would claim
    assert audit["epsilon_lower_bound"] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bookkeeping", "hooks", "ghost"])
def test_under_dp_sgd_the_canaries_join_the_noised_sum_with_the_patients_divisor(site, mode):
    """Two identical DP-SGD steps (same noise and sampling seeds, plain SGD), with and without the canaries: the
    only difference is each included canary's gradient C s / sqrt(d) divided by Opacus' expected batch size."""
    from torch.utils.data import TensorDataset

    from common.model import ddpm_scheduler, diffusion_loss
    from privacy.dp import batch_loss, make_private
    from privacy.sampling import patient_loader

    cfg = model_config("tiny")
    state = canaries.load_or_create(site, 100, 1e-5)
    torch.manual_seed(1)
    start = build_unet(cfg).state_dict()
    data = TensorDataset(torch.randn((6,) + cfg.latent_shape), torch.tensor([0, 1] * 3))
    sched = ddpm_scheduler(cfg)
    after = []
    for with_canaries in (False, True):
        unet = build_unet(cfg)
        unet.load_state_dict(start)
        unet.train()
        opt = torch.optim.SGD(unet.parameters(), lr=1.0)
        loader = patient_loader(data, [[i] for i in range(6)], 0.5, 1)
        module, opt, loader = make_private(
            unet, opt, loader, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
            test_seed=3,
        )  # fmt: skip
        if with_canaries:
            canaries.attach(opt, unet, state, 1.0, 1.0, expected_batch_size=99)
        torch.manual_seed(2)
        for z, y in loader:
            opt.zero_grad(set_to_none=True)
            batch_loss(opt, diffusion_loss(module, sched, z, y)).backward()
            opt.step()
        after.append({k: v.detach().clone() for k, v in unet.state_dict().items()})
    coords = canaries.coordinates(state, unet)
    step = (
        1.0 / np.sqrt(canaries.DIMENSIONS) / opt.expected_batch_size
    )  # Opacus' divisor: 3, not 99
    expected = {k: torch.zeros_like(v) for k, v in start.items()}
    for i in np.flatnonzero(state.included):
        for name, k, s in zip(coords.names[i], coords.index[i], coords.signs[i], strict=True):
            expected[name].view(-1)[k] = -s * step
    for k in start:
        assert torch.allclose(after[1][k] - after[0][k], expected[k], atol=1e-5), k
