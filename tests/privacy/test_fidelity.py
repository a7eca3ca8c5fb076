"""Radiomics features against hand-computed values; Frechet distance and precision/recall on known cases."""

import json

import numpy as np
import pytest
from scipy import stats
from skimage.feature import graycoprops

from privacy.fidelity import (
    FEATURE_DEFINITIONS,
    feature_moments,
    frechet_distance,
    glcm,
    glcm_features,
    pool_moments,
    precision_recall_coverage,
    radiomics_features,
)
from tests.privacy.conftest import blobs


def test_names_match_columns_and_are_documented():
    rng = np.random.default_rng(0)
    f, names = radiomics_features(blobs(rng, 5))
    assert f.shape == (5, len(names)) == (5, len(FEATURE_DEFINITIONS)) and names == list(
        FEATURE_DEFINITIONS
    )
    assert np.isfinite(f).all()
    vol, vnames = radiomics_features(rng.random((3, 1, 4, 10, 10)))
    assert vol.shape == (3, len(vnames)) and np.isfinite(vol).all()
    flat, _ = radiomics_features(
        np.zeros((2, 1, 8, 8))
    )  # no foreground, no texture: finite, not NaN
    assert np.isfinite(flat).all()


def test_intensity_statistics_match_scipy():
    rng = np.random.default_rng(1)
    img = rng.uniform(0.2, 1.0, (1, 1, 16, 16)).astype(np.float32) ** 2
    f, names = radiomics_features(img)
    row = dict(zip(names, f[0], strict=False))
    fg = img[img > 0.1].astype(np.float64)
    assert row["mean"] == pytest.approx(fg.mean()) and row["std"] == pytest.approx(fg.std())
    assert row["skewness"] == pytest.approx(stats.skew(fg)) and row["kurtosis"] == pytest.approx(
        stats.kurtosis(fg)
    )
    assert row["p50"] == pytest.approx(np.median(fg))
    assert row["foreground_fraction"] == pytest.approx((img > 0.1).mean())


def test_glcm_of_stripes_is_hand_computable():
    """Vertical stripes 0.2 / 0.8 (levels 3 and 12): horizontal and diagonal neighbours differ by 9 grey levels,
    vertical neighbours are equal; at distance 2 every neighbour is equal."""
    img = np.tile(np.array([0.2, 0.8], np.float32), (16, 8))[None, None]
    f, names = radiomics_features(img)
    row = dict(zip(names, f[0], strict=False))
    assert row["glcm_contrast_d1"] == pytest.approx(81 * 3 / 4)
    assert row["glcm_contrast_d2"] == pytest.approx(0.0)
    assert row["glcm_homogeneity_d2"] == pytest.approx(1.0)
    # two equally frequent (level, level) pairs: ASM 0.5, energy (skimage: sqrt of ASM) sqrt(0.5)
    assert row["glcm_energy_d2"] == pytest.approx(np.sqrt(0.5))
    assert row["glcm_entropy_d2"] == pytest.approx(np.log(2))


def test_glcm_matches_scikit_image_documented_case():
    """The 4x4 example of skimage's graycomatrix documentation (levels 0..3 as intensities (level + 0.5) / 16, all
    foreground): the distance-1, angle-0 matrix and its contrast are the documented ones."""
    levels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 2, 2, 2], [2, 2, 3, 3]])
    p = glcm((levels + 0.5) / 16, np.ones((4, 4), bool))
    documented = np.array([[2, 2, 1, 0], [0, 2, 0, 0], [0, 0, 3, 1], [0, 0, 0, 1]])
    assert (p[:4, :4, 0, 0] == documented + documented.T).all() and p[4:].sum() == 0
    assert graycoprops(p[..., :1], "contrast")[0, 0] == pytest.approx(0.58333333)


def test_glcm_counts_only_foreground_pairs_and_sums_slices():
    rng = np.random.default_rng(5)
    img = rng.random((8, 8))
    img[:, :4] = 0.5
    fg = np.zeros((8, 8), bool)
    fg[:, :4] = True
    row = glcm_features(img, fg)
    names = [n for n in FEATURE_DEFINITIONS if n.startswith("glcm_")]
    f = dict(zip(names, row, strict=True))
    assert f["glcm_contrast_d1"] == 0.0 and f["glcm_energy_d1"] == pytest.approx(1.0)
    vol, fgv = rng.random((3, 8, 8)), rng.random((3, 8, 8)) > 0.3
    assert (glcm(vol, fgv) == sum(glcm(vol[i], fgv[i]) for i in range(3))).all()


def test_mask_restricts_the_statistics():
    img = np.full((1, 1, 8, 8), 0.5, np.float32)
    img[..., :4] = 0.9
    mask = np.zeros_like(img)
    mask[..., :4] = 1
    f, names = radiomics_features(img, mask)
    row = dict(zip(names, f[0], strict=False))
    assert row["mean"] == pytest.approx(0.9) and row["foreground_fraction"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="masks"):
        radiomics_features(img, mask[..., :4])
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        radiomics_features(np.zeros((2, 8, 8)))


def test_frechet_distance_zero_for_same_and_grows_with_shift():
    rng = np.random.default_rng(2)
    a = blobs(rng, 40)
    fa, _ = radiomics_features(a)
    ma = feature_moments(fa)
    json.dumps(ma)  # a site can send it as is
    assert frechet_distance(ma, ma) == pytest.approx(0.0, abs=1e-6)
    fds = [
        frechet_distance(ma, feature_moments(radiomics_features(np.clip(a * s, 0, 1))[0]))
        for s in (0.95, 0.8, 0.6)
    ]
    assert 0 < fds[0] < fds[1] < fds[2]


def test_frechet_distance_closed_form_and_pooling():
    a = {"n": 10, "mean": [1.0, 0.0], "cov": [[4.0, 0.0], [0.0, 1.0]]}
    b = {"n": 10, "mean": [0.0, 0.0], "cov": [[1.0, 0.0], [0.0, 1.0]]}
    assert frechet_distance(a, b) == pytest.approx(
        1 + (2 - 1) ** 2
    )  # |dmu|^2 + (sd_a - sd_b)^2 per axis
    singular = {"n": 2, "mean": [0.0, 0.0], "cov": [[1.0, 1.0], [1.0, 1.0]]}
    assert np.isfinite(frechet_distance(singular, b))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(a, {"n": 1, "mean": [0.0], "cov": [[1.0]]})
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 3)), rng.normal(2, 1, size=(20, 3))
    pooled = pool_moments([feature_moments(x), feature_moments(y)])
    whole = feature_moments(np.concatenate([x, y]))
    assert (
        pooled["n"] == 50
        and np.allclose(pooled["mean"], whole["mean"])
        and np.allclose(pooled["cov"], whole["cov"])
    )


def test_precision_recall_density_coverage():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(200, 4))
    same = precision_recall_coverage(real, real, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0 and same["density"] >= 1.0
    fresh = precision_recall_coverage(real, rng.normal(size=(200, 4)), k=5)
    assert fresh["precision"] > 0.8 and fresh["recall"] > 0.8 and 0.7 < fresh["density"] < 1.3
    far = precision_recall_coverage(real, rng.normal(10, 1, size=(200, 4)), k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    collapsed = precision_recall_coverage(
        real, np.zeros((200, 4)) + rng.normal(0, 0.01, (200, 4)), k=5
    )
    assert (
        collapsed["precision"] > 0.9 and collapsed["recall"] < 0.2 and collapsed["coverage"] < 0.2
    )
    with pytest.raises(ValueError, match="k"):
        precision_recall_coverage(real[:3], real[:3], k=5)


def test_prdc_on_a_hand_computed_case():
    """1-D, k = 1: real 0, 1, 3 (radii 1, 1, 2); synthetic 0.5, 5.2, 3.1 (radii 2.6, 2.1, 2.1). Precision: 0.5
    and 3.1 lie in a real ball, 5.2 does not (2.2 from 3); recall and coverage: every real point has a synthetic
    one within its ball; density: 0.5 is in 2 real balls, 3.1 in 1, 5.2 in none: 3 / 3."""
    out = precision_recall_coverage([[0.0], [1.0], [3.0]], [[0.5], [5.2], [3.1]], k=1)
    assert out == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "density": 1.0, "coverage": 1.0}
    )
