"""Memorization audit: is any synthetic image a near-copy of a training patient?

Distances are RMS distances (L2 / sqrt(number of values)) between images in [0, 1] ("pixel space") and between
feature vectors ("feature space", see `feature_embedding`). For each synthetic image the audit finds its nearest
member (training patient) and nearest non-member (hold-out patient, never trained on).

Share closer to a member: members and non-members are first subsampled (seeded) to the same size; a generator that
copies nothing is then as likely to land nearest a member as nearest a non-member, so the share is about 0.5, with
an exact binomial 95 % interval. Memorisation pushes it towards 1.

Near-copy: the calibration is real data. For each non-member, its distance to the nearest member is the distance
that separates a new, never-trained-on patient from the closest training patient. The near-copy threshold is the
1st percentile (`NEAR_COPY_QUANTILE`) of those n distances, taken conservatively as the k-th smallest with
k = floor(0.01 (n + 1)): by exchangeability a fresh real patient falls below it with probability k / (n + 1) <= 1 %.
With fewer than 99 non-members no order statistic certifies 1 %, so half the smallest of those distances is used
(`SMALL_SITE_FACTOR`); exact and lightly perturbed copies are still caught. A synthetic image is a near-copy when its distance to its
nearest member is below that threshold AND it is closer to that member than to any non-member (distance to the
nearest member < `near_copy_ratio` x distance to the nearest non-member; ratio 1 by default). Such images are
flagged by synthetic id so that they can be withheld. The rule is applied in pixel space, in feature space and
per class; an image flagged by any of them is flagged.

Only aggregates and synthetic ids are returned: counts, shares, intervals, binned histograms, thresholds.
"""

from __future__ import annotations

import numpy as np
import torch

from privacy.audit_stats import clopper_pearson
from privacy.fidelity import radiomics_features

NEAR_COPY_QUANTILE = 0.01
NEAR_COPY_RATIO = 1.0
SMALL_SITE_FACTOR = 0.5
HIST_BINS = 30
REFINE_CANDIDATES = 8


def _check_images(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim < 2 or len(a) == 0:
        raise ValueError(f"{what}: expected a non-empty array (N, ...), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return a


def pairwise_min_distances(queries, references, batch: int = 1024, *, device: str | torch.device | None = None,
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest neighbour of every query among the references: (RMS distance, index of the reference).

    Inputs are flattened per record. Squared distances come from the matrix-product form
    |q|^2 + |r|^2 - 2 q.r on centred data, batch x batch at a time (memory ~ batch^2 + batch x values); the
    `REFINE_CANDIDATES` best candidates of each query are then re-measured exactly in float64, so float32 rounding
    cannot misreport a near-copy's distance. 10,000 x 10,000 images of 64 x 64 take seconds on a GPU, about a
    minute on two CPU cores."""
    q_np, r_np = _check_images(queries, "queries"), _check_images(references, "references")
    q_np, r_np = q_np.reshape(len(q_np), -1), r_np.reshape(len(r_np), -1)
    if q_np.shape[1] != r_np.shape[1]:
        raise ValueError(f"pairwise_min_distances: queries have {q_np.shape[1]} values per record, references "
                         f"{r_np.shape[1]}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    centre = r_np.mean(0, dtype=np.float64).astype(np.float32)
    q = torch.from_numpy(q_np - centre).to(dev)
    r = torch.from_numpy(r_np - centre).to(dev)
    r_sq = (r * r).sum(1)
    k = min(REFINE_CANDIDATES, len(r))
    best_d = np.empty(len(q), dtype=np.float64)
    best_i = np.empty(len(q), dtype=np.int64)
    with torch.no_grad():
        for i in range(0, len(q), batch):
            qi = q[i : i + batch]
            qi_sq = (qi * qi).sum(1, keepdim=True)
            cand_d = torch.full((len(qi), 0), float("inf"), device=dev)
            cand_i = torch.zeros((len(qi), 0), dtype=torch.long, device=dev)
            for j in range(0, len(r), batch):
                d2 = qi_sq + r_sq[j : j + batch] - 2 * qi @ r[j : j + batch].T
                kk = min(k, d2.shape[1])
                v, idx = d2.topk(kk, dim=1, largest=False)
                cand_d, order = torch.cat([cand_d, v], 1).topk(min(k, cand_d.shape[1] + kk), 1, largest=False)
                cand_i = torch.cat([cand_i, idx + j], 1).gather(1, order)
            cand = cand_i.cpu().numpy()
            step = max(1, 4_000_000 // (k * q_np.shape[1]))  # exact re-measure, bounded memory
            for s in range(0, len(cand), step):
                cc = cand[s : s + step]
                qq = q_np[i + s : i + s + len(cc)].astype(np.float64)
                d = np.sqrt(((qq[:, None, :] - r_np[cc].astype(np.float64)) ** 2).mean(-1))
                a = d.argmin(1)
                # among exact ties keep the lowest reference index (as a brute-force argmin would)
                best = d[np.arange(len(d)), a]
                tie = np.where(d <= best[:, None], cc, np.iinfo(np.int64).max).min(1)
                best_d[i + s : i + s + len(d)] = best
                best_i[i + s : i + s + len(d)] = tie
    return best_d, best_i


# ---- feature space --------------------------------------------------------------------------------------------

def _raw_embedding(images: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Unscaled feature blocks of `feature_embedding` and their widths."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    dims = x.ndim - 2
    pool = torch.nn.functional.adaptive_avg_pool2d if dims == 2 else torch.nn.functional.adaptive_avg_pool3d
    blocks = [pool(x, g).flatten(1).numpy() for g in ((4,) * dims, (8,) * dims)]
    grads = torch.stack(torch.gradient(x[:, 0], dim=tuple(range(1, dims + 1)))).pow(2).sum(0).sqrt()
    for values, hi in ((x[:, 0], 1.0), (grads, 0.5)):
        flat = values.flatten(1).clamp(0, hi)
        blocks.append((torch.stack([torch.histc(v, bins=16, min=0, max=hi) for v in flat]) / flat.shape[1]).numpy())
    blocks.append(radiomics_features(images)[0])
    return np.concatenate(blocks, 1).astype(np.float64), [b.shape[1] for b in blocks]


def _standardise(raw: np.ndarray, reference: np.ndarray, widths: list[int]) -> np.ndarray:
    mu, sd = reference.mean(0), reference.std(0)
    z = (raw - mu) / np.where(sd > 1e-8, sd, 1.0)
    scale = np.concatenate([np.full(w, 1 / np.sqrt(w)) for w in widths]) * np.sqrt(len(widths))
    return (z * scale).astype(np.float32)


def feature_embedding(images, *, reference=None) -> np.ndarray:
    """A fixed, deterministic feature space with no learned or downloaded weights. Per image, five blocks:
    1. mean intensity over a 4x4 grid of regions (4x4x4 for volumes): coarse anatomy;
    2. mean intensity over an 8x8 grid (8x8x8): finer anatomy;
    3. histogram of intensities, 16 bins on [0, 1], as fractions of the image;
    4. histogram of gradient magnitudes (central differences), 16 bins on [0, 0.5]: edges and texture;
    5. the radiomics features of `privacy.fidelity.radiomics_features` (intensity statistics, GLCM texture,
       tissue proportions).
    Every column is standardised (zero mean, unit sd) over `reference` (images; default the images themselves;
    the audit uses all real records, members and non-members alike, so neither side is favoured), and each block
    is weighted 1/sqrt(width) so that the five blocks count equally in a distance. Distances in this space compare
    structure and texture rather than exact pixel alignment."""
    images = _check_images(images, "feature_embedding images")
    raw, widths = _raw_embedding(images)
    ref = raw if reference is None else _raw_embedding(_check_images(reference, "feature_embedding reference"))[0]
    return _standardise(raw, ref, widths)


# ---- the audit ------------------------------------------------------------------------------------------------

def near_copy_threshold(real_gaps: np.ndarray) -> tuple[float, str]:
    """The near-copy threshold from real patient-to-nearest-training-patient distances, and the rule used."""
    gaps = np.sort(np.asarray(real_gaps, dtype=np.float64))
    k = int(np.floor(NEAR_COPY_QUANTILE * (len(gaps) + 1)))
    if k >= 1:
        return float(gaps[k - 1]), f"{k}-th smallest of {len(gaps)} real distances (<= {NEAR_COPY_QUANTILE:.0%} quantile)"
    return float(SMALL_SITE_FACTOR * gaps[0]), (f"{SMALL_SITE_FACTOR} x the smallest of {len(gaps)} real distances "
                                                f"(too few non-members to estimate the {NEAR_COPY_QUANTILE:.0%} quantile)")


def _hist(values: np.ndarray, edges: np.ndarray) -> list[int]:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0].astype(int).tolist()


def _space_audit(syn: np.ndarray, mem: np.ndarray, non: np.ndarray, ids: list[str], rng: np.random.Generator,
                 ratio: float) -> dict:
    """One space (pixel or feature): matched share, calibrated near-copy threshold, flags, histograms."""
    k = min(len(mem), len(non))
    mem_pick, non_pick = rng.permutation(len(mem))[:k], rng.permutation(len(non))[:k]
    rest = np.setdiff1d(np.arange(len(mem)), mem_pick)
    d_mem_matched, _ = pairwise_min_distances(syn, mem[mem_pick])
    d_mem = np.minimum(d_mem_matched, pairwise_min_distances(syn, mem[rest])[0]) if len(rest) else d_mem_matched
    d_non, _ = pairwise_min_distances(syn, non)
    d_non_matched = d_non if k == len(non) else pairwise_min_distances(syn, non[non_pick])[0]
    real_gap, _ = pairwise_min_distances(non, mem)  # a never-trained-on patient to the nearest training patient
    threshold, rule = near_copy_threshold(real_gap)
    closer = d_mem_matched < d_non_matched
    flagged = (d_mem < threshold) & (d_mem < ratio * d_non)
    top = float(max(d_mem.max(), d_non.max(), real_gap.max()) * 1.05 + 1e-9)
    edges = np.linspace(0.0, top, HIST_BINS + 1)
    n_closer = int(closer.sum())
    lo, hi = clopper_pearson(n_closer, len(closer))
    return {
        "n_synthetic": int(len(syn)), "n_members": int(len(mem)), "n_nonmembers": int(len(non)),
        "matched_set_size": int(k), "n_closer_to_member": n_closer,
        "share_closer_to_member": n_closer / len(closer), "share_ci95": [lo, hi],
        "near_copy_quantile": NEAR_COPY_QUANTILE, "near_copy_ratio": ratio,
        "near_copy_threshold": threshold, "near_copy_rule": rule, "n_near_copies": int(flagged.sum()),
        "flagged_ids": [ids[i] for i in np.flatnonzero(flagged)],
        "median_distance_to_member": float(np.median(d_mem)),
        "median_distance_to_nonmember": float(np.median(d_non)),
        "median_real_gap": float(np.median(real_gap)),
        "histogram": {"edges": edges.round(6).tolist(), "synthetic_to_member": _hist(d_mem, edges),
                      "synthetic_to_nonmember": _hist(d_non, edges),
                      "real_nonmember_to_member": _hist(real_gap, edges)},
    }


def memorization_audit(synthetic, synthetic_ids, members, nonmembers, *, synthetic_labels=None, member_labels=None,
                       nonmember_labels=None, class_names=None, seed: int = 0,
                       near_copy_ratio: float = NEAR_COPY_RATIO) -> dict:
    """Memorization figures of a synthetic cohort against one site's members and non-members (see the module
    docstring for the definitions), overall in pixel and feature space, and per class when labels are given.

    Returns {"definition", "pixel": {...}, "feature": {...}, "per_class": {class: {"pixel", "feature", ...}},
    "share_closer_to_member" (pixel space), "flagged_ids" (union over spaces and classes), "n_near_copies"}."""
    synthetic = _check_images(synthetic, "memorization_audit synthetic")
    members = _check_images(members, "memorization_audit members")
    nonmembers = _check_images(nonmembers, "memorization_audit non-members")
    if not synthetic.shape[1:] == members.shape[1:] == nonmembers.shape[1:]:
        raise ValueError(f"memorization_audit: image shapes differ: synthetic {synthetic.shape[1:]}, members "
                         f"{members.shape[1:]}, non-members {nonmembers.shape[1:]}")
    ids = [str(i) for i in synthetic_ids]
    if len(ids) != len(synthetic):
        raise ValueError(f"memorization_audit: {len(ids)} synthetic ids for {len(synthetic)} synthetic images")
    rng = np.random.default_rng(seed)
    raw = [_raw_embedding(a) for a in (synthetic, members, nonmembers)]
    widths = raw[0][1]
    reference = np.concatenate([raw[1][0], raw[2][0]])
    f_syn, f_mem, f_non = (_standardise(r, reference, widths) for r, _ in raw)
    out = {
        "definition": (__doc__ or "").split("\n\n", 1)[1].strip(),
        "pixel": _space_audit(synthetic, members, nonmembers, ids, rng, near_copy_ratio),
        "feature": _space_audit(f_syn, f_mem, f_non, ids, rng, near_copy_ratio),
        "per_class": {},
    }
    out["share_closer_to_member"] = out["pixel"]["share_closer_to_member"]
    if synthetic_labels is not None and member_labels is not None and nonmember_labels is not None:
        sl, ml, nl = (np.asarray(a).ravel() for a in (synthetic_labels, member_labels, nonmember_labels))
        if (len(sl), len(ml), len(nl)) != (len(synthetic), len(members), len(nonmembers)):
            raise ValueError("memorization_audit: labels must have one entry per synthetic image, member and "
                             "non-member")
        names = list(class_names) if class_names is not None else [str(c) for c in sorted(set(sl.tolist()))]
        for c, name in enumerate(names):
            s, m, n = sl == c, ml == c, nl == c
            if s.sum() >= 1 and m.sum() >= 1 and n.sum() >= 1:
                sub_ids = [ids[i] for i in np.flatnonzero(s)]
                per = {space: _space_audit(a[s], b[m], d[n], sub_ids, rng, near_copy_ratio)
                       for space, (a, b, d) in (("pixel", (synthetic, members, nonmembers)),
                                                ("feature", (f_syn, f_mem, f_non)))}
                px = per["pixel"]
                out["per_class"][name] = {
                    **{k: px[k] for k in ("n_synthetic", "n_members", "n_nonmembers", "share_closer_to_member",
                                          "share_ci95", "near_copy_threshold")},
                    "flagged_ids": sorted(set(px["flagged_ids"]) | set(per["feature"]["flagged_ids"])),
                    "pixel": {k: v for k, v in px.items() if k != "histogram"},
                    "feature": {k: v for k, v in per["feature"].items() if k != "histogram"},
                }
                out["per_class"][name]["n_near_copies"] = len(out["per_class"][name]["flagged_ids"])
    flagged = set(out["pixel"]["flagged_ids"]) | set(out["feature"]["flagged_ids"])
    for per in out["per_class"].values():
        flagged |= set(per["flagged_ids"])
    out["flagged_ids"], out["n_near_copies"] = sorted(flagged), len(flagged)
    return out
