"""Site canaries: drawn from the site's entropy, kept in its state, rendered identically for training and audit."""

import json
import random

import numpy as np
import pytest
import torch

from client import canaries
from common.config import SiteConfig, model_config
from common.site import SiteData
from privacy.power import canary_power


@pytest.fixture
def site(tmp_path):
    return SiteConfig(
        site_dir=str(tmp_path / "site"), state_dir=str(tmp_path / "state"), canaries=40
    )


def test_inclusion_is_drawn_from_os_entropy_and_persisted(tmp_path, site):
    # whatever the seeds a server could set, two sites (or two fresh states) draw different inclusion sets
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    a = canaries.load_or_create(site, n_patients=100, delta=1e-5)
    other = SiteConfig(site_dir=site.site_dir, state_dir=str(tmp_path / "other"), canaries=40)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    b = canaries.load_or_create(other, n_patients=100, delta=1e-5)
    assert a.included != b.included and a.render_seed != b.render_seed
    assert canaries.load_or_create(site, 100, 1e-5) == a  # kept for the site's lifetime
    assert json.loads(canaries.state_path(site).read_text())["n"] == 40


def test_fair_coin(tmp_path):
    site = SiteConfig(site_dir=str(tmp_path), state_dir=str(tmp_path / "s"), canaries=4000)
    state = canaries.load_or_create(site, 10, 1e-5)
    assert abs(state.n_included - 2000) < 4 * np.sqrt(1000)  # Binomial(4000, 1/2): sd 31.6


def test_changed_count_and_corrupt_state_are_refused_with_what_to_do(site):
    canaries.load_or_create(site, 100, 1e-5)
    changed = SiteConfig(site_dir=site.site_dir, state_dir=site.state_dir, canaries=41)
    with pytest.raises(ValueError, match="holds 40 canaries.*canaries=40"):
        canaries.load_or_create(changed, 100, 1e-5)
    auto = SiteConfig(site_dir=site.site_dir, state_dir=site.state_dir, canaries=-1)
    assert canaries.load_or_create(auto, 100, 1e-5).n == 40  # auto keeps the drawn set
    path = canaries.state_path(site)
    path.write_text(json.dumps({"format_version": 1, "n": 3, "render_seed": 1, "included": [1]}))
    with pytest.raises(ValueError, match="canaries.json.*3.*move it away"):
        canaries.load_or_create(site, 100, 1e-5)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable canary state"):
        canaries.load_or_create(site, 100, 1e-5)


def test_auto_count_sizes_for_the_claim_within_the_overhead_cap(tmp_path):
    cfg = SiteConfig(site_dir=str(tmp_path), epsilon=10.0)
    big = canaries.auto_count(cfg, n_patients=10_000, delta=1e-5)
    assert canary_power(big, 1e-5) >= 5.0 > canary_power(big - 1, 1e-5)  # half the claim, no more
    small = canaries.auto_count(cfg, n_patients=90, delta=1e-5)
    assert small == 36 and small / 2 <= 0.2 * 90  # the included half adds <= 20 % records
    no_dp = SiteConfig(site_dir=str(tmp_path), dp=False)
    assert canaries.auto_count(no_dp, 10_000, 1e-5) == 0
    with pytest.raises(ValueError, match="canaries"):
        SiteConfig(site_dir=str(tmp_path), canaries=-2)


def test_render_is_deterministic_marked_and_unlike_patients(site):
    cfg = model_config("tiny")
    state = canaries.load_or_create(site, 100, 1e-5)
    a, b = canaries.render(state, cfg), canaries.render(state, cfg)
    assert np.array_equal(a.images, b.images) and a.images.shape == (40, 1) + cfg.image_shape[1:]
    assert a.images.min() >= 0 and a.images.max() <= 1
    # every canary carries a checkerboard (adjacent pixels alternating exactly 0 / 1) ...
    side = max(2, cfg.image_size // 8)
    for img in a.images[:, 0]:
        hits = np.argwhere(
            (img[:-1, :] + img[1:, :] == 1) & ((img[:-1, :] == 0) | (img[:-1, :] == 1))
        )
        assert len(hits) >= side * (side - 1)
    # ... and the canaries are distinct records
    flat = a.images.reshape(len(a.images), -1)
    assert len({row.tobytes() for row in flat}) == 40


def test_training_records_add_only_included_canaries(site):
    cfg = model_config("tiny")
    state = canaries.load_or_create(site, 100, 1e-5)
    train = SiteData(
        subject_ids=["p1", "p2"],
        images=np.full((2, 1) + cfg.image_shape[1:], 0.5, dtype=np.float32),
        labels=np.array([1, 0]),
        class_names=tuple(cfg.class_names),
    )
    images, labels = canaries.training_records(train, state, cfg)
    assert len(images) == 2 + state.n_included and len(labels) == len(images)
    assert np.array_equal(images[:2], train.images)
    rendered = canaries.render(state, cfg).images
    assert np.array_equal(images[2:], rendered[np.array(state.included)])


def test_audit_canaries_with_a_perfect_and_a_blind_attack(site):
    cfg = model_config("tiny")
    state = canaries.load_or_create(site, 100, 1e-5)
    included = {r.tobytes() for r in canaries.render(state, cfg).images[np.array(state.included)]}

    def perfect(data):  # knows exactly which images were trained on
        return np.array([float(img.tobytes() in included) for img in data.images])

    out = canaries.audit_canaries(state, cfg, perfect, delta=1e-5, claimed_epsilon=10.0)
    # Inclusion is a fair coin per canary (site entropy), so "in" and "out" are rarely 20/20: a perfect attack is
    # right on every guess at each level whose "in" and "out" guesses fit the drawn counts (the 100 % level may
    # then still win with a few forced errors).
    n_in = out["n_included"]
    for row in out["levels"]:
        k_in, k_out = (row["guesses"] + 1) // 2, row["guesses"] // 2
        if k_in <= n_in and k_out <= 40 - n_in:
            assert row["correct"] == row["guesses"] > 0, row
    assert out["epsilon_lower_bound"] > 0
    assert out["epsilon_lower_bound"] <= out["power"] == pytest.approx(canary_power(40, 1e-5))
    assert out["underpowered"] and out["range_of_interest"] == 5.0  # 40 canaries cannot speak to 10
    # only counts leave: no per-canary list (scores, flags, guesses) of length m in the result
    assert not any(isinstance(v, list) and len(v) == 40 for v in out.values())


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory):
    from common.phantoms import make_phantom_sites

    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_sites(out, n_sites=1, n_subjects=20, size=32, seed=3)[0]


def _round(tmp_path, phantom_site, monkeypatch, n_canaries):
    """One real DP training round; the real training loop is called, and what it was given is recorded."""
    from client import task
    from common.model import build_autoencoder

    seen = {}
    real = (
        task._train_loop.__wrapped__
        if hasattr(task._train_loop, "__wrapped__")
        else task._train_loop
    )

    def recording(module, dataset, plan, dp, loss_fn, device, mode="bookkeeping", groups=None):
        seen.update(n_records=len(dataset), groups=groups, dp=dp)
        return real(module, dataset, plan, dp, loss_fn, device, mode, groups)

    recording.__wrapped__ = real
    monkeypatch.setattr(task, "_train_loop", recording)
    site = SiteConfig(
        site_dir=str(phantom_site), state_dir=str(tmp_path / f"s{n_canaries}"), canaries=n_canaries
    )
    plan = task.RoundPlan(
        run_id="r", server_round=1, phase="autoencoder", num_server_rounds=1,
        federated_autoencoder_rounds=1, preset="tiny", local_epochs=1, batch_size=5, lr=1e-3,
        kl_weight=1e-6, latent_scale=1.0, proximal_mu=0.0, seed=0,
    )  # fmt: skip
    result = task.run_training_round(
        site, plan, build_autoencoder(model_config("tiny")).state_dict()
    )
    assert not result.refused
    return site, result, seen


def test_training_adds_included_canaries_as_extra_units_without_touching_patients_privacy(
    tmp_path, phantom_site, monkeypatch
):
    from client.task import open_ledger

    site0, r0, seen0 = _round(tmp_path, phantom_site, monkeypatch, 0)
    site, r, seen = _round(tmp_path, phantom_site, monkeypatch, 12)
    state = canaries.load_or_create(site, 15, 1e-5)
    assert seen["n_records"] == seen0["n_records"] + state.n_included
    assert seen["groups"][: len(seen0["groups"])] == seen0["groups"]  # patients' units unchanged
    assert seen["groups"][len(seen0["groups"]) :] == [
        [seen0["n_records"] + j] for j in range(state.n_included)
    ]  # one unit per included canary, nothing for the excluded ones
    # the patients' mechanism is the same with and without canaries; the ledger knows only patients
    for key in ("sample_rate", "steps", "noise_multiplier", "delta"):
        assert getattr(seen["dp"], key) == getattr(seen0["dp"], key)
    assert r.privacy["epsilon"] == pytest.approx(r0.privacy["epsilon"])
    assert r.metrics["num-examples"] == r0.metrics["num-examples"] == 15
    assert open_ledger(site).patients_of("r") == open_ledger(site0).patients_of("r")
    assert not any("canary" in p for p in open_ledger(site).patients_of("r"))
    assert (
        not canaries.state_path(site0).exists() or canaries.load_or_create(site0, 15, 1e-5).n == 0
    )


def test_auto_count_at_a_tiny_site_with_a_large_delta(tmp_path):
    cfg = SiteConfig(site_dir=str(tmp_path), epsilon=5.0)
    assert (
        canaries.auto_count(cfg, n_patients=15, delta=1 / 150) == 6
    )  # the overhead cap, not an error
    assert canaries.auto_count(cfg, n_patients=2, delta=1 / 20) == 0
