"""Fidelity of a synthetic cohort to a site's real data, from radiomics-style features.

`radiomics_features` describes each image by intensity statistics, GLCM texture and tissue proportions (names
returned alongside). A site compares its real images with the cohort locally and sends only summary numbers:
the Frechet distance between Gaussian fits of the two feature sets, and precision / recall (Kynkaanniemi et al.
2019) and density / coverage (Naeem et al. 2020) in the standardised feature space.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg, stats

GLCM_LEVELS = 16
GLCM_OFFSETS = ((0, 1), (1, 0), (1, 1), (0, 2))


def _glcm_features(img: np.ndarray) -> list[float]:
    q = np.clip((img * GLCM_LEVELS).astype(int), 0, GLCM_LEVELS - 1)
    i_idx, j_idx = np.meshgrid(np.arange(GLCM_LEVELS), np.arange(GLCM_LEVELS), indexing="ij")
    feats = []
    for dy, dx in GLCM_OFFSETS:
        a = q[: q.shape[0] - dy, : q.shape[1] - dx].ravel()
        b = q[dy:, dx:].ravel()
        p = np.bincount(a * GLCM_LEVELS + b, minlength=GLCM_LEVELS**2).reshape(GLCM_LEVELS, GLCM_LEVELS).astype(float)
        p = p + p.T
        p /= max(p.sum(), 1.0)
        mu_i, mu_j = (i_idx * p).sum(), (j_idx * p).sum()
        sd_i = np.sqrt(((i_idx - mu_i) ** 2 * p).sum())
        sd_j = np.sqrt(((j_idx - mu_j) ** 2 * p).sum())
        feats += [
            float(((i_idx - j_idx) ** 2 * p).sum()),  # contrast
            float((p / (1.0 + np.abs(i_idx - j_idx))).sum()),  # homogeneity
            float((p**2).sum()),  # energy
            float(((i_idx - mu_i) * (j_idx - mu_j) * p).sum() / (sd_i * sd_j + 1e-12)),  # correlation
        ]
    return feats


def feature_names() -> list[str]:
    names = ["mean", "std", "skewness", "kurtosis", "p10", "p50", "p90", "histogram_entropy"]
    for dy, dx in GLCM_OFFSETS:
        names += [f"glcm_{m}_d{dy}{dx}" for m in ("contrast", "homogeneity", "energy", "correlation")]
    names += ["foreground_fraction", "dark_fraction", "mid_fraction", "bright_fraction"]
    return names


def radiomics_features(images, masks=None) -> tuple[np.ndarray, list[str]]:
    """(N, F) features of images (N, 1, H, W) or (N, 1, D, H, W) in [0, 1]; a volume is described by its middle
    axial slice for texture. `masks` (optional, same shape) restricts intensity statistics to the foreground."""
    images = np.asarray(images, dtype=np.float32)
    rows = []
    for k, img in enumerate(images[:, 0]):
        fg_mask = (masks[k, 0] > 0) if masks is not None else img > 0.1
        fg = img[fg_mask] if fg_mask.any() else img.ravel()
        hist = np.histogram(fg, bins=32, range=(0, 1))[0].astype(float)
        hist /= max(hist.sum(), 1)
        slice2d = img if img.ndim == 2 else img[:, :, img.shape[2] // 2]
        rows.append([
            float(fg.mean()), float(fg.std()), float(np.nan_to_num(stats.skew(fg))),
            float(np.nan_to_num(stats.kurtosis(fg))), *np.percentile(fg, [10, 50, 90]).astype(float).tolist(),
            float(-(hist[hist > 0] * np.log(hist[hist > 0])).sum()),
            *_glcm_features(slice2d),
            float(fg_mask.mean()), float(((img > 0.1) & (img <= 0.35)).mean()),
            float(((img > 0.35) & (img <= 0.65)).mean()), float((img > 0.65).mean()),
        ])
    return np.asarray(rows, dtype=np.float64), feature_names()


def feature_moments(features) -> dict:
    f = np.asarray(features, dtype=np.float64)
    return {"n": int(len(f)), "mean": f.mean(0), "cov": np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1],) * 2)}


def frechet_distance(a: dict, b: dict, eps: float = 1e-6) -> float:
    mu1, mu2 = np.asarray(a["mean"]), np.asarray(b["mean"])
    s1, s2 = np.atleast_2d(a["cov"]), np.atleast_2d(b["cov"])
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)))


def precision_recall_coverage(real_feats, synth_feats, k: int = 5) -> dict:
    """Improved precision/recall and density/coverage with k-NN balls, in features standardised on the real set."""
    real, syn = np.asarray(real_feats, float), np.asarray(synth_feats, float)
    mu, sd = real.mean(0), real.std(0) + 1e-8
    real, syn = (real - mu) / sd, (syn - mu) / sd

    def knn_radius(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    r_real, r_syn = knn_radius(real), knn_radius(syn)
    d_sr = np.sqrt(((syn[:, None] - real[None]) ** 2).sum(-1))  # (S, R)
    inside_real = d_sr <= r_real[None]
    precision = float(inside_real.any(1).mean())
    recall = float((d_sr.T <= r_syn[None]).any(1).mean())
    density = float(inside_real.sum(1).mean() / k)
    coverage = float((d_sr.min(0) <= r_real).mean())
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}
