"""Fidelity of a synthetic cohort to a site's real data, from radiomics-style features.

`radiomics_features` describes each image by intensity statistics, grey-level co-occurrence (GLCM) texture from
scikit-image (`skimage.feature.graycomatrix` / `graycoprops`) and tissue proportions (names and definitions in
`FEATURE_DEFINITIONS`). A site compares its real images with the cohort locally and sends only summary numbers: the
Frechet distance between Gaussian fits of the two feature sets (`feature_moments` is the aggregate a site may send:
n, mean, covariance), and improved precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et
al. 2020) from the `prdc` reference implementation (Naeem et al.'s own package), which need the real features and
are therefore computed at the site.

pyradiomics (the IBSI-aligned reference) does not install here (3.1.0's sdist declares version 3.0.1a1 and pip
discards it; 3.0.1's setup.py fails on Python 3.11), so texture comes from scikit-image with IBSI's conventions
made explicit: fixed bin width (16 bins on [0, 1]), symmetric matrices, only pairs of two region-of-interest
voxels counted. Volumes: in-plane co-occurrences of every slice (last two axes) summed over the slices per
direction, features averaged over the 4 in-plane directions (a 2.5-D aggregation; no through-plane pairs, so
anisotropic slice spacing does not mix into the texture).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from prdc import compute_prdc
from skimage.feature import graycomatrix, graycoprops

FOREGROUND_LEVEL = 0.1  # intensity above which a voxel is tissue (images are in [0, 1])
DARK_MID_BRIGHT = (0.35, 0.65)
HIST_BINS = 32
GLCM_LEVELS = 16
GLCM_DISTANCES = (1, 2)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)  # skimage's convention: 0 = along a row
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "entropy")
CHUNK = 256

FEATURE_DEFINITIONS = {
    "mean": "mean intensity of the foreground (the mask, else voxels above 0.1)",
    "std": "standard deviation of foreground intensity",
    "skewness": "skewness of foreground intensity (0 for a symmetric distribution)",
    "kurtosis": "excess kurtosis of foreground intensity (0 for a Gaussian)",
    "p10": "10th percentile of foreground intensity",
    "p50": "median foreground intensity",
    "p90": "90th percentile of foreground intensity",
    "histogram_entropy": "Shannon entropy (nats) of the 32-bin foreground intensity histogram on [0, 1]",
    **{
        f"glcm_{m}_d{d}": f"grey-level co-occurrence {m} (scikit-image graycoprops) of neighbours at distance {d} "
        "(16 levels on [0, 1], symmetric, foreground pairs only, in-plane, mean of 4 directions; volumes: "
        "matrices summed over slices)"
        for d in GLCM_DISTANCES
        for m in GLCM_PROPS
    },
    "foreground_fraction": "fraction of the image that is foreground",
    "dark_fraction": "fraction of the image with intensity in (0.1, 0.35]",
    "mid_fraction": "fraction of the image with intensity in (0.35, 0.65]",
    "bright_fraction": "fraction of the image with intensity above 0.65",
}


def feature_names() -> list[str]:
    return list(FEATURE_DEFINITIONS)


def glcm(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """(levels, levels, distances, directions) co-occurrence counts (directions: along rows, along columns, the
    two diagonals) of one 2-D image or 3-D volume (slices on the first
    axis), symmetric, counting only pairs of two foreground voxels. Foreground voxels get levels 1..16 and the
    background level 0 (dropped afterwards); slices of a volume are stacked with background rows between them, so
    no pair straddles two slices and the result is the sum of the per-slice matrices."""
    q = np.where(
        foreground, 1 + np.clip((image * GLCM_LEVELS).astype(np.int64), 0, GLCM_LEVELS - 1), 0
    ).astype(np.uint8)
    if q.ndim == 3:
        gap = np.zeros((len(q), max(GLCM_DISTANCES), q.shape[2]), np.uint8)
        q = np.concatenate([q, gap], axis=1).reshape(-1, q.shape[2])
    # IBSI's Chebyshev distance: the diagonal neighbour at distance d is (d, d) away. skimage rounds
    # (d sin a, d cos a), so diagonals are asked at distance d sqrt(2).
    axis, diagonal = (
        graycomatrix(q, dist, angles, levels=GLCM_LEVELS + 1, symmetric=True, normed=False)
        for dist, angles in (
            (GLCM_DISTANCES, GLCM_ANGLES[0::2]),
            (np.sqrt(2) * np.asarray(GLCM_DISTANCES, float), GLCM_ANGLES[1::2]),
        )
    )
    return np.concatenate([axis, diagonal], axis=3)[1:, 1:]


def glcm_features(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """GLCM_PROPS x GLCM_DISTANCES features (distance-major, as in FEATURE_DEFINITIONS), each averaged over the
    directions; a matrix with no foreground pair gives 0 rather than NaN."""
    p = glcm(image, foreground).astype(np.float64)
    props = []
    for m in GLCM_PROPS:
        v = graycoprops(p, m)  # (distances, angles); skimage normalises each matrix
        empty = p.sum((0, 1)) == 0
        props.append(np.where(empty, 0.0, np.nan_to_num(v)).mean(1))
    return np.stack(props, 1).ravel()  # (distances, props) -> d1 props, d2 props


def _chunk_features(x: np.ndarray, masks: np.ndarray | None) -> np.ndarray:
    n = len(x)
    img = x[:, 0]
    v = img.reshape(n, -1).astype(np.float64)
    fg_img = (masks[:, 0] > 0) if masks is not None else img > FOREGROUND_LEVEL
    fg = fg_img.reshape(n, -1).copy()
    fg[~fg.any(1)] = True  # no foreground: describe the whole image
    w = fg.astype(np.float64)
    cnt = w.sum(1)
    mean = (w * v).sum(1) / cnt
    c = v - mean[:, None]
    var = (w * c**2).sum(1) / cnt
    std = np.sqrt(var)
    safe = np.where(std > 1e-12, std, 1.0)
    skew = np.where(std > 1e-12, (w * c**3).sum(1) / cnt / safe**3, 0.0)
    kurt = np.where(std > 1e-12, (w * c**4).sum(1) / cnt / safe**4 - 3.0, 0.0)
    pct = np.nanpercentile(np.where(fg, v, np.nan), [10, 50, 90], axis=1).T
    bins = np.clip((v * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    hist = (
        np.bincount(
            (np.arange(n)[:, None] * HIST_BINS + bins).ravel(),
            weights=w.ravel(),
            minlength=n * HIST_BINS,
        ).reshape(n, HIST_BINS)
        / cnt[:, None]
    )
    entropy = -(hist * np.log(np.where(hist > 0, hist, 1.0))).sum(1)
    fg_full = fg.reshape(fg_img.shape)
    texture = np.stack([glcm_features(img[i], fg_full[i]) for i in range(n)])
    lo, hi = DARK_MID_BRIGHT
    tissue = np.stack(
        [
            fg_img.reshape(n, -1).mean(1),
            ((v > FOREGROUND_LEVEL) & (v <= lo)).mean(1),
            ((v > lo) & (v <= hi)).mean(1),
            (v > hi).mean(1),
        ],
        1,
    )
    return np.concatenate(
        [np.stack([mean, std, skew, kurt], 1), pct, entropy[:, None], texture, tissue], 1
    )


def radiomics_features(images, masks=None) -> tuple[np.ndarray, list[str]]:
    """(N, F) features of images (N, 1, H, W) or volumes (N, 1, D, H, W) in [0, 1], and their names (see
    `FEATURE_DEFINITIONS`). `masks` (optional, same shape, > 0 = region of interest) replaces the intensity
    threshold as the foreground for intensity statistics and texture. For volumes, texture pairs are taken
    in-plane (last two axes) on every slice and the slices' matrices summed."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim not in (4, 5) or x.shape[1] != 1:
        raise ValueError(
            f"radiomics_features: expected images (N, 1, H, W) or (N, 1, D, H, W), got {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("radiomics_features: images contain NaN or infinite values")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != x.shape:
            raise ValueError(
                f"radiomics_features: masks have shape {masks.shape}, images {x.shape}"
            )
    rows = [
        _chunk_features(x[s : s + CHUNK], None if masks is None else masks[s : s + CHUNK])
        for s in range(0, len(x), CHUNK)
    ]
    names = feature_names()
    return (np.concatenate(rows) if rows else np.zeros((0, len(names)))), names


def feature_moments(features) -> dict:
    """The aggregate a site may send for a Frechet distance: {"n", "mean" (list), "cov" (list of lists)},
    JSON-serialisable. The covariance is the unbiased sample covariance (zeros for one record)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) == 0:
        raise ValueError(
            f"feature_moments: expected a non-empty (N, F) matrix, got shape {f.shape}"
        )
    cov = (
        np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])
        if len(f) > 1
        else np.zeros((f.shape[1],) * 2)
    )
    return {"n": int(len(f)), "mean": f.mean(0).tolist(), "cov": cov.tolist()}


def pool_moments(parts: list[dict]) -> dict:
    """Moments of the union of several sets from their moments alone (e.g. all sites' real data, server side)."""
    parts = [p for p in parts if p["n"] > 0]
    if not parts:
        raise ValueError("pool_moments: no non-empty moments to pool")
    n = sum(p["n"] for p in parts)
    means = [np.asarray(p["mean"], float) for p in parts]
    mean = sum(p["n"] * m for p, m in zip(parts, means, strict=False)) / n
    scatter = sum(
        (p["n"] - 1) * np.asarray(p["cov"], float) + p["n"] * np.outer(m - mean, m - mean)
        for p, m in zip(parts, means, strict=False)
    )
    return {"n": n, "mean": mean.tolist(), "cov": (scatter / max(n - 1, 1)).tolist()}


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(moments_a: dict, moments_b: dict) -> float:
    """Frechet distance between Gaussians N(mu_a, S_a) and N(mu_b, S_b):
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2).
    The trace term is computed from symmetric eigendecompositions (tr sqrt(S_a S_b) equals it), which stays real
    and stable for the singular covariances of small sets; tiny negative results from rounding become 0."""
    mu1, mu2 = np.asarray(moments_a["mean"], float), np.asarray(moments_b["mean"], float)
    s1, s2 = (
        np.atleast_2d(np.asarray(moments_a["cov"], float)),
        np.atleast_2d(np.asarray(moments_b["cov"], float)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"frechet_distance: moments do not match (means {mu1.shape} vs {mu2.shape}, covariances "
            f"{s1.shape} vs {s2.shape})"
        )
    r1 = _psd_sqrt(s1)
    eig = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    fd = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    scale = np.trace(s1) + np.trace(s2) + 1e-12
    return float(fd) if fd > 1e-9 * scale else 0.0


def precision_recall_coverage(real_feats, synth_feats, k: int = 5) -> dict:
    """Improved precision / recall (Kynkaanniemi et al. 2019) and density / coverage (Naeem et al. 2020) with
    k-nearest-neighbour balls, from the `prdc` reference implementation, in features standardised on the real set
    (so that no feature's unit dominates the distances). Computed at the site (it needs the real features);
    returns only the four numbers:
    precision: share of synthetic samples inside some real sample's k-NN ball;
    recall: share of real samples inside some synthetic sample's k-NN ball;
    density: mean number of real k-NN balls containing a synthetic sample, divided by k (about 1 when matched);
    coverage: share of real samples whose k-NN ball contains at least one synthetic sample.
    prdc counts a sample strictly inside a ball (distance < radius)."""
    real, syn = np.asarray(real_feats, float), np.asarray(synth_feats, float)
    if real.ndim != 2 or syn.ndim != 2 or real.shape[1] != syn.shape[1]:
        raise ValueError(
            f"precision_recall_coverage: feature matrices must be (N, F) with equal F, got {real.shape} "
            f"and {syn.shape}"
        )
    if not 1 <= k <= min(len(real), len(syn)) - 2:
        raise ValueError(
            f"precision_recall_coverage: need 1 <= k <= number of records - 2 (prdc) (k={k}, {len(real)} real, "
            f"{len(syn)} synthetic)"
        )
    mu, sd = real.mean(0), real.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = compute_prdc((real - mu) / sd, (syn - mu) / sd, nearest_k=k)
    return {key: float(out[key]) for key in ("precision", "recall", "density", "coverage")}
