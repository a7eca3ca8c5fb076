"""The DP release of a site's scanner noise level (privacy/noise_level.py): each test is an attack on a claim, and
fails on the broken implementation named in it."""

import numpy as np
import pytest
import torch

from common.phantoms import default_site_specs, make_phantom_sites
from common.site import load_site
from privacy.accounting import epsilon_for
from privacy.noise_level import (
    add_rician_noise,
    background_sigma,
    patient_noise_levels,
    release_noise_level,
    release_step,
)

CLIP, Z = 0.1, 4.0


@pytest.fixture(scope="module")
def phantom_sites(tmp_path_factory):
    """Phantom hospitals of the quietest and the noisiest default protocol (sigma 0.015 and 0.045), as sites read
    them (common/site.py: resized, percentile-scaled to [0, 1])."""
    specs = [default_site_specs(3)[i] for i in (0, 2)]
    sites = make_phantom_sites(
        tmp_path_factory.mktemp("noise"), n_sites=2, n_subjects=10, size=64, seed=3, specs=specs
    )
    return [(spec.protocol.noise_sigma, load_site(d)) for spec, d in zip(specs, sites, strict=True)]


def test_a_head_on_black_gives_its_rician_noise_level_back():
    yy, xx = np.mgrid[:64, :64]
    head = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 24**2, 0.7, 0.0)[None, None]
    for sigma in (0.005, 0.02, 0.045):  # the default protocols' range (0.012-0.045)
        # the cut at the threshold is corrected for: a plain Rayleigh median reads 6 % low at 0.045
        estimates = [
            background_sigma(add_rician_noise(head, sigma, np.random.default_rng(i))[0])
            for i in range(10)
        ]
        assert abs(np.mean(estimates) / sigma - 1) < 0.03, (sigma, estimates)


def test_each_patient_level_is_the_site_protocols_noise(phantom_sites):
    for sigma, data in phantom_sites:
        levels, unusable = patient_noise_levels(data.images, data.records_by_patient())
        assert unusable == 0
        # the site's scaling to [0, 1] (0.5 / 99.5 percentiles, not the noiseless maximum) moves it a little
        assert abs(levels.mean() / sigma - 1) < 0.1, (sigma, levels)
        assert np.all(np.abs(levels / sigma - 1) < 0.15), (sigma, levels)


def test_a_noiseless_or_backgroundless_image_gives_zero_or_no_estimate():
    yy, xx = np.mgrid[:64, :64]
    head = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 24**2, 0.7, 0.0)[None]
    assert background_sigma(head) == 0.0
    assert np.isnan(background_sigma(np.full((1, 64, 64), 0.5)))  # no air in the frame: no estimate


def test_one_patient_moves_the_release_by_at_most_clip_over_n():
    """Attack: a patient whose images are bright noise (a level of 0.4, or 1e6 from a forged file). Without the clip
    the release would move by (level - clip) / n more."""
    levels = np.full(50, 0.02)
    outlier = levels.copy()
    outlier[0] = 1e6
    same = lambda: torch.Generator().manual_seed(7)  # noqa: E731  (the same noise draw for both)
    a = release_noise_level(levels, CLIP, Z, same()).sigma
    b = release_noise_level(outlier, CLIP, Z, same()).sigma
    assert 0 < b - a <= CLIP / 50 + 1e-12
    removed = release_noise_level(levels[1:], CLIP, Z, same())
    assert removed.n_patients == 49


def test_a_patient_with_many_images_counts_once(phantom_sites):
    """Attack: one patient's images copied 30 times. Averaged per record instead of per patient, their level
    would weigh 30 times; per patient, the levels are the same list."""
    _, data = phantom_sites[1]
    groups = data.records_by_patient()
    once, _ = patient_noise_levels(data.images, groups)
    images = np.concatenate([data.images] + [data.images[groups[0]]] * 30)
    extra = list(range(len(data.images), len(images)))
    many, _ = patient_noise_levels(images, [groups[0] + extra] + groups[1:])
    assert many.shape == once.shape
    np.testing.assert_allclose(many, once)


def test_the_noise_is_not_decided_by_any_seed_the_server_can_set():
    """Attack: the server sends a seed and the site seeds torch and numpy with it (round seeds do exactly that for
    data order). A release drawn from the global generators would then repeat; one drawn from OS entropy does not."""
    levels = np.full(
        400, 0.03
    )  # noise std 0.001: never clipped at 0, so distinct draws stay distinct
    draws = set()
    for _ in range(5):
        torch.manual_seed(0)
        np.random.seed(0)
        draws.add(release_noise_level(levels, CLIP, Z).sigma)
    assert len(draws) == 5


def test_the_noise_has_the_mechanisms_standard_deviation():
    levels = np.full(40, 0.03)
    gen = torch.Generator().manual_seed(0)
    draws = np.array([release_noise_level(levels, CLIP, Z, gen).sigma for _ in range(4000)])
    release = release_noise_level(levels, CLIP, Z, gen)
    assert release.std == pytest.approx(Z * CLIP / 40)
    kept = draws[draws > 0]  # the clip at 0 is post-processing; far from it the draws are Gaussian
    assert abs(np.median(kept) - 0.03) < 0.1 * release.std
    assert np.std(draws) == pytest.approx(release.std, rel=0.08)


def test_the_release_is_one_gaussian_mechanism_for_the_accountant():
    step = release_step(Z)
    assert (step.sample_rate, step.steps) == (1.0, 1)
    # a Gaussian mechanism of multiplier z is (eps, delta)-DP with delta = Phi(1/2z - eps z) - e^eps Phi(-1/2z - eps z)
    # (Balle & Wang 2018); the accountant's epsilon is an upper bound of the exact one, and not far above it
    from scipy.stats import norm

    eps = epsilon_for([step], 1e-5, "prv")
    exact_delta = norm.cdf(1 / (2 * Z) - eps * Z) - np.exp(eps) * norm.cdf(-1 / (2 * Z) - eps * Z)
    assert exact_delta <= 1e-5 * 1.01
    assert eps < 1.5


def test_bad_parameters_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="clip > 0"):
        release_noise_level(np.ones(3), 0.0, Z)
    with pytest.raises(ValueError, match="noise_multiplier >= 0"):
        release_noise_level(np.ones(3), CLIP, -1.0)
    with pytest.raises(ValueError, match="at least one patient"):
        release_noise_level(np.array([]), CLIP, Z)


def test_the_release_costs_the_dp_sgd_the_noise_the_readme_states():
    """README (site config): planned into the run, the release (multiplier 10) raises the DP-SGD noise calibrated for
    40 steps at q = 1/4 by 9 % at epsilon 1, 0.4 % at 4 and 0.1 % at 10 (RDP, delta 1e-5)."""
    from privacy.accounting import calibrate_noise_multiplier

    for eps, share in ((1.0, 0.087), (4.0, 0.0037), (10.0, 0.0009)):
        plain = calibrate_noise_multiplier(eps, 1e-5, 0.25, 40)
        planned = calibrate_noise_multiplier(eps, 1e-5, 0.25, 40, prior=[release_step(10.0)])
        assert planned / plain - 1 == pytest.approx(share, abs=0.006 if eps == 1 else 0.002), eps
