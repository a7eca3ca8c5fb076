"""Memorization audit: is any synthetic image a near-copy of a training patient?

Distances are RMS distances (L2 / sqrt(number of values)) between images in [0, 1] ("pixel space") and between
feature vectors ("feature space", see `feature_embedding`). For each synthetic image the audit finds its nearest
member (training patient) and nearest non-member (hold-out patient, never trained on):
- share closer to a member: with matched set sizes, a generator that copies nothing is as close to a random
  non-member as to a random member, so the share is about 0.5; memorisation pushes it towards 1;
- near-copy: a synthetic image whose nearest member is closer than `NEAR_COPY_QUANTILE` of the distances between
  two *different real patients* (each non-member to its nearest member), AND at most `NEAR_COPY_RATIO` times its
  distance to the nearest non-member (much closer to one patient than to any unseen patient). Such images are
  flagged by synthetic id so they can be withheld.
Only aggregates and synthetic ids are returned.
"""

from __future__ import annotations

import numpy as np
import torch

from privacy.audit_stats import clopper_pearson

NEAR_COPY_QUANTILE = 0.01  # 1st percentile of real patient-to-nearest-other-patient distances
NEAR_COPY_RATIO = 0.5
HIST_BINS = 30


def _flat(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32).reshape(len(x), -1))


def pairwise_min_distances(queries, references, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest neighbour of every query among references: (RMS distance, index). Memory ~ batch x batch."""
    q, r = _flat(queries), _flat(references)
    d = q.shape[1]
    r_sq = (r * r).sum(1)
    best = torch.full((len(q),), float("inf"))
    arg = torch.zeros(len(q), dtype=torch.long)
    with torch.no_grad():
        for i in range(0, len(q), batch):
            qi = q[i : i + batch]
            qi_sq = (qi * qi).sum(1, keepdim=True)
            for j in range(0, len(r), batch):
                dist2 = (qi_sq + r_sq[j : j + batch] - 2 * qi @ r[j : j + batch].T).clamp_min_(0)
                val, idx = dist2.min(1)
                better = val < best[i : i + batch]
                best[i : i + batch] = torch.where(better, val, best[i : i + batch])
                arg[i : i + batch] = torch.where(better, idx + j, arg[i : i + batch])
    return (best / d).sqrt().numpy(), arg.numpy()


def feature_embedding(images) -> np.ndarray:
    """A fixed, data-independent feature space (no learned weights): for each image, intensities averaged over
    4x4 and 8x8 blocks (coarse anatomy), and histograms of intensity (16 bins) and of gradient magnitude
    (16 bins). Each part is scaled to comparable range; distances in this space compare structure and texture
    rather than exact pixel alignment."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    dims = x.ndim - 2
    pool = torch.nn.functional.avg_pool2d if dims == 2 else torch.nn.functional.avg_pool3d
    parts = []
    for k in (4, 8):
        k = min(k, x.shape[-1])
        parts.append(pool(x, k).flatten(1))
    grads = torch.stack(torch.gradient(x[:, 0], dim=tuple(range(1, dims + 1)))).pow(2).sum(0).sqrt()
    for values, hi in ((x[:, 0], 1.0), (grads, 0.5)):
        flat = values.flatten(1).clamp(0, hi)
        hist = torch.stack([torch.histc(v, bins=16, min=0, max=hi) for v in flat]) / flat.shape[1]
        parts.append(hist * 4.0)
    return torch.cat(parts, 1).numpy()


def _hist(values: np.ndarray, edges: np.ndarray) -> list[int]:
    return np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0].astype(int).tolist()


def _space_audit(syn, mem, non, ids, rng) -> dict:
    """One space (pixel or feature): distances, threshold, share, flags, histograms."""
    k = min(len(mem), len(non))
    mem_matched = mem[rng.permutation(len(mem))[:k]] if len(mem) > k else mem
    d_mem, _ = pairwise_min_distances(syn, mem)
    d_mem_matched, _ = pairwise_min_distances(syn, mem_matched)
    d_non, _ = pairwise_min_distances(syn, non)
    real_gap, _ = pairwise_min_distances(non, mem)  # distance from a real patient to the nearest OTHER patient
    threshold = float(np.quantile(real_gap, NEAR_COPY_QUANTILE))
    closer = d_mem_matched < d_non
    flagged = (d_mem < threshold) & (d_mem <= NEAR_COPY_RATIO * d_non)
    top = float(max(d_mem.max(), d_non.max(), real_gap.max()) * 1.05 + 1e-9)
    edges = np.linspace(0.0, top, HIST_BINS + 1)
    n_closer = int(closer.sum())
    lo, hi = clopper_pearson(n_closer, len(closer))
    return {
        "n_synthetic": int(len(syn)), "n_members": int(len(mem)), "n_nonmembers": int(len(non)),
        "matched_set_size": int(k),
        "share_closer_to_member": n_closer / max(1, len(closer)), "share_ci95": [lo, hi],
        "near_copy_threshold": threshold, "n_near_copies": int(flagged.sum()),
        "flagged_ids": [ids[i] for i in np.flatnonzero(flagged)],
        "median_distance_to_member": float(np.median(d_mem)),
        "median_distance_to_nonmember": float(np.median(d_non)),
        "median_real_gap": float(np.median(real_gap)),
        "histogram": {"edges": edges.round(5).tolist(), "synthetic_to_member": _hist(d_mem, edges),
                      "synthetic_to_nonmember": _hist(d_non, edges), "real_nonmember_to_member": _hist(real_gap, edges)},
    }


def memorization_audit(synthetic, synthetic_ids, members, nonmembers, *, synthetic_labels=None, member_labels=None,
                       nonmember_labels=None, class_names=None, seed: int = 0) -> dict:
    synthetic, members, nonmembers = (np.asarray(a, dtype=np.float32) for a in (synthetic, members, nonmembers))
    ids = list(synthetic_ids)
    rng = np.random.default_rng(seed)
    out = {
        "definition": __doc__.split("\n\n")[1].strip() if __doc__ else "",
        "pixel": _space_audit(synthetic, members, nonmembers, ids, rng),
        "feature": _space_audit(feature_embedding(synthetic), feature_embedding(members),
                                feature_embedding(nonmembers), ids, rng),
        "per_class": {},
    }
    out["share_closer_to_member"] = out["pixel"]["share_closer_to_member"]
    if synthetic_labels is not None and member_labels is not None and nonmember_labels is not None:
        for c, name in enumerate(class_names or []):
            s, m, n = (np.asarray(synthetic_labels) == c, np.asarray(member_labels) == c,
                       np.asarray(nonmember_labels) == c)
            if s.sum() >= 1 and m.sum() >= 1 and n.sum() >= 1:
                sub = _space_audit(synthetic[s], members[m], nonmembers[n], [ids[i] for i in np.flatnonzero(s)], rng)
                out["per_class"][name] = {k: sub[k] for k in (
                    "n_synthetic", "n_members", "n_nonmembers", "share_closer_to_member", "share_ci95",
                    "n_near_copies", "flagged_ids", "near_copy_threshold")}
    flagged = set(out["pixel"]["flagged_ids"]) | set(out["feature"]["flagged_ids"])
    for per in out["per_class"].values():
        flagged |= set(per["flagged_ids"])
    out["flagged_ids"], out["n_near_copies"] = sorted(flagged), len(flagged)
    return out
