"""Memorization audit: is any synthetic image a near-copy of a training patient?

Distances are RMS distances (L2 / sqrt(number of values)) between images in [0, 1] ("pixel space") and between
feature vectors ("feature space", see `feature_embedding`). For each synthetic image the audit finds its nearest
member (training patient) and nearest non-member (hold-out patient, never trained on).

Share closer to a member (matched set sizes): members and non-members are subsampled to the same size k (the
smaller of the two); the share is the fraction of synthetic images whose nearest real image in the matched sets is
a member. It is averaged EXACTLY over all ways of drawing the two subsamples (a closed form over the distance
ranks, so it does not depend on one random subsample). A generator that copies nothing gives about 0.5;
memorisation pushes it towards 1.

Is the share significantly above chance? Not by a binomial interval: synthetic images are not independent trials.
A weak generator puts its images away from the real data, and most of them then share the same few nearest real
images ("hubs"); one hub that happens to be a member drags every image with it. The test is a label-permutation
(exchangeability) test instead. Null hypothesis: the generator does not depend on which patients were trained on.
The member / non-member split is a random patient-level split, so under the null the labels of the pooled real
records (members + non-members) are exchangeable. The distances from the synthetic images to the pooled records are
computed once; the observed statistic is the share above; the null distribution is the same statistic with the
labels randomly permuted over the pool, B times (seeded; `PERM_B_MAX` = 999 for small problems, fewer, down to
`PERM_B_MIN`, for big ones; B is always reported). One-sided p-value: (1 + #{null >= observed}) / (1 + B).
Ties between a member and a non-member at the same distance are broken by one seeded random order of the pool.
Reported beside it: the null mean and 95th percentile, and the numbers of distinct nearest members and
non-members, an effective-sample-size diagnostic (few distinct neighbours = hubs = little information). The
distance matrix is capped at `PERM_MAX_CELLS` (synthetic x pool) values; above that the synthetic images are
subsampled (seeded) for this test and the audit says so (`synthetic_subsampled`, `n_synthetic_tested`). The
exact binomial interval (`share_ci95`) is still reported but assumes independent images; it is not evidence.

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

What leaves the site is coarse: counts, shares, p-values, intervals, flagged SYNTHETIC ids, and histograms of the
nearest-neighbour distances on FIXED bins (`PIXEL_EDGES`, `FEATURE_EDGES`: chosen before any data is seen), merged
with their neighbours until each reported bin holds at least `MIN_BIN_COUNT` values. Nothing that is, or pins down,
a distance between one synthetic image and one patient is returned: not the near-copy threshold (a distance between
two patients, or half of one), not median distances, not data-derived bin edges. Those would make the audit an
oracle: a server sending one-image "cohorts" could walk an image towards a patient.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import gammaln

from privacy.audit_stats import clopper_pearson
from privacy.fidelity import radiomics_features

NEAR_COPY_QUANTILE = 0.01
NEAR_COPY_RATIO = 1.0
SMALL_SITE_FACTOR = 0.5
MIN_BIN_COUNT = (
    5  # every reported histogram bin holds at least this many distances (small bins are merged)
)
PIXEL_EDGES = tuple(
    round(0.02 * i, 2) for i in range(51)
)  # RMS distances of images in [0, 1]: 0 .. 1
FEATURE_EDGES = tuple(round(0.1 * i, 1) for i in range(51)) + (
    float("inf"),
)  # feature space: 0 .. 5, then open
REFINE_CANDIDATES = 8
PERM_B_MAX = 999  # permutations of the share test for small problems
PERM_B_MIN = 199  # ... and the fewest for big ones
PERM_WORK = 200_000_000  # permutations x synthetic x window cells per test: sets B between the two
PERM_MAX_CELLS = (
    20_000_000  # synthetic x pooled real distances held at once; synthetic subsampled above
)
PERM_WINDOW_EVENTS = 25  # window = 25 x the expected rank of the nearest drawn record (+ 8)
PERM_TAIL_TOL = 1e-9  # largest tolerated probability that no drawn record is in the window
RANK_RTOL = 2e-6  # float32 ranks closer than this (x squared norms; ~8x the largest rounding measured) are re-measured


def _check_images(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim < 2 or len(a) == 0:
        raise ValueError(f"{what}: expected a non-empty array (N, ...), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return a


def pairwise_min_distances(
    queries,
    references,
    batch: int = 1024,
    *,
    device: str | torch.device | None = None,
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
        raise ValueError(
            f"pairwise_min_distances: queries have {q_np.shape[1]} values per record, references "
            f"{r_np.shape[1]}"
        )
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
                cand_d, order = torch.cat([cand_d, v], 1).topk(
                    min(k, cand_d.shape[1] + kk), 1, largest=False
                )
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
    pool = (
        torch.nn.functional.adaptive_avg_pool2d
        if dims == 2
        else torch.nn.functional.adaptive_avg_pool3d
    )
    blocks = [pool(x, g).flatten(1).numpy() for g in ((4,) * dims, (8,) * dims)]
    grads = torch.stack(torch.gradient(x[:, 0], dim=tuple(range(1, dims + 1)))).pow(2).sum(0).sqrt()
    for values, hi in ((x[:, 0], 1.0), (grads, 0.5)):
        flat = values.flatten(1).clamp(0, hi)
        blocks.append(
            (
                torch.stack([torch.histc(v, bins=16, min=0, max=hi) for v in flat]) / flat.shape[1]
            ).numpy()
        )
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
    ref = (
        raw
        if reference is None
        else _raw_embedding(_check_images(reference, "feature_embedding reference"))[0]
    )
    return _standardise(raw, ref, widths)


# ---- the share closer to a member and its permutation test ---------------------------------------------------


def _log_comb(n: np.ndarray, k: int) -> np.ndarray:
    """log C(n, k) elementwise; -inf where n < k."""
    n = np.asarray(n, dtype=np.float64)
    ok = n >= k
    out = np.full(n.shape, -np.inf)
    out[ok] = gammaln(n[ok] + 1) - gammaln(k + 1) - gammaln(n[ok] - k + 1)
    return out


def _first_tables(n_mem: int, n_non: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities over a uniform draw of k of the n_mem members and k of the n_non non-members:
    first[a]: a given member is drawn and none of the a members nearer than it (C(n_mem-a-1, k-1) / C(n_mem, k));
    none_m[a]: none of a given a members is drawn; none_n[b]: none of a given b non-members is drawn."""
    a, b = np.arange(n_mem + 1), np.arange(n_non + 1)
    first = np.exp(_log_comb(n_mem - a - 1, k - 1) - _log_comb(np.array(n_mem), k))
    none_m = np.exp(_log_comb(n_mem - a, k) - _log_comb(np.array(n_mem), k))
    none_n = np.exp(_log_comb(n_non - b, k) - _log_comb(np.array(n_non), k))
    return first, none_m, none_n


def _window_shares(lab: np.ndarray, tables) -> tuple[np.ndarray, float]:
    """Exact matched-subsample share from labels along each synthetic image's sorted real records.

    lab: (..., n_syn, T) bool, True where the j-th nearest pooled record is a (pseudo-)member. The share of a row is
    P(the nearest drawn record is a member) = sum over members j of first[a_j] * none_n[b_j], a_j / b_j the members /
    non-members nearer than j. Returns the shares (...,) averaged over rows and the largest probability that no
    drawn record lies in the window (truncation error bound)."""
    first, none_m, none_n = tables
    t = lab.shape[-1]
    cum = np.cumsum(lab, axis=-1, dtype=np.int32)
    a = cum - lab
    b = np.arange(t, dtype=np.int32) - a
    rows = np.where(lab, first[a] * none_n[b], 0.0).sum(-1)
    tail = none_m[cum[..., -1]] * none_n[t - cum[..., -1]]
    return rows.mean(-1), float(tail.max(initial=0.0))


def _distance_matrix(queries: np.ndarray, references: np.ndarray, batch: int = 2048) -> np.ndarray:
    """(n_q, n_r) RMS distances, float32 matrix products on centred data (ranks refined later in float64)."""
    centre = references.mean(0, dtype=np.float64).astype(np.float32)
    q = torch.from_numpy(np.ascontiguousarray(queries - centre, dtype=np.float32))
    r = torch.from_numpy(np.ascontiguousarray(references - centre, dtype=np.float32))
    r_sq = (r * r).sum(1)
    out = np.empty((len(q), len(r)), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, len(q), batch):
            qi = q[i : i + batch]
            d2 = (qi * qi).sum(1, keepdim=True) + r_sq - 2 * qi @ r.T
            out[i : i + len(qi)] = d2.clamp_min_(0).div_(q.shape[1]).sqrt_().numpy()
    return out


def _sorted_window(
    d: np.ndarray, syn: np.ndarray, pool: np.ndarray, t: int, tiebreak: np.ndarray
) -> np.ndarray:
    """Indices (n_syn, t) of each synthetic image's t nearest pooled records, nearest first. Candidates come from
    the float32 matrix; rows where two neighbours in the window are closer than the float32 rounding could
    distinguish (`RANK_RTOL` of the squared norms; exact ties included) are re-measured exactly in float64. Exact
    ties are ordered by `tiebreak`, a seeded random rank of the pool."""
    n_pool = d.shape[1]
    cand = (
        np.argsort(d, axis=1, kind="stable")
        if t >= n_pool
        else np.argpartition(d, t - 1, axis=1)[:, :t]
    )
    cand = cand[:, :t]
    d2 = np.take_along_axis(d, cand, 1).astype(np.float64) ** 2
    order = np.lexsort((tiebreak[cand], d2), axis=-1)
    cand, d2 = np.take_along_axis(cand, order, 1), np.take_along_axis(d2, order, 1)
    centre = pool.mean(0, dtype=np.float64)
    q_sq = ((syn - centre) ** 2).mean(1)
    r_sq_max = float(((pool - centre) ** 2).mean(1).max())
    tol = RANK_RTOL * (q_sq + r_sq_max)
    ambiguous = (
        np.flatnonzero((np.diff(d2, axis=1) <= tol[:, None]).any(1)) if t > 1 else np.array([], int)
    )
    step = max(1, 16_000_000 // (t * syn.shape[1]))
    for s in range(0, len(ambiguous), step):
        rows = ambiguous[s : s + step]
        cc = cand[rows]
        exact = ((syn[rows, None, :].astype(np.float64) - pool[cc].astype(np.float64)) ** 2).sum(-1)
        cand[rows] = np.take_along_axis(cc, np.lexsort((tiebreak[cc], exact), axis=-1), 1)
    return cand


def share_permutation_test(
    synthetic, members, nonmembers, *, rng: np.random.Generator, n_permutations: int | None = None
) -> dict:
    """The matched-size share closer to a member and its label-permutation test (module docstring).

    Inputs are records (images or feature vectors), flattened per record. Returns aggregates only: the share, the
    permutation p-value, B, the null mean and 95th percentile, the numbers of distinct nearest members and
    non-members, whether synthetic images were subsampled for the test, and the binomial interval (independence
    assumed, not used for the verdict)."""
    if min(len(synthetic), len(members), len(nonmembers)) < 1:
        raise ValueError(
            f"share_permutation_test: needs >= 1 synthetic, member and non-member record, got "
            f"{len(synthetic)}, {len(members)}, {len(nonmembers)}"
        )
    syn = np.asarray(synthetic, dtype=np.float32).reshape(len(synthetic), -1)
    mem = np.asarray(members, dtype=np.float32).reshape(len(members), -1)
    non = np.asarray(nonmembers, dtype=np.float32).reshape(len(nonmembers), -1)
    if not syn.shape[1] == mem.shape[1] == non.shape[1]:
        raise ValueError(
            f"share_permutation_test: values per record differ: synthetic {syn.shape[1]}, members "
            f"{mem.shape[1]}, non-members {non.shape[1]}"
        )
    n_mem, n_non = len(mem), len(non)
    n_pool, k = n_mem + n_non, min(n_mem, n_non)
    pool = np.concatenate([mem, non])
    n_syn_all = len(syn)
    keep = max(1, PERM_MAX_CELLS // n_pool)
    subsampled = n_syn_all > keep
    if subsampled:
        syn = syn[np.sort(rng.choice(n_syn_all, keep, replace=False))]
    n_syn = len(syn)
    d = _distance_matrix(syn, pool)
    n_distinct_mem = int(len(np.unique(d[:, :n_mem].argmin(1))))
    n_distinct_non = int(len(np.unique(d[:, n_mem:].argmin(1))))
    tiebreak = rng.permutation(n_pool)
    tables = _first_tables(n_mem, n_non, k)
    labels = np.zeros(n_pool, dtype=bool)
    labels[:n_mem] = True
    # window: a drawn record (2k of n_pool) lies among the first t with probability ~ 1 - exp(-25)
    t = int(min(n_pool, np.ceil(PERM_WINDOW_EVENTS * n_pool / (2 * k)) + 8))
    if n_permutations is None:
        n_permutations = int(np.clip(PERM_WORK // (n_syn * t), PERM_B_MIN, PERM_B_MAX))
    n_permutations = int(n_permutations)
    if n_permutations < 1:
        raise ValueError(
            f"share_permutation_test: n_permutations must be >= 1, got {n_permutations}"
        )
    perm_labels = rng.permuted(np.tile(labels, (n_permutations, 1)), axis=1)
    while True:
        order = _sorted_window(d, syn, pool, t, tiebreak)
        observed, tail = _window_shares(labels[order], tables)
        null = np.empty(n_permutations)
        per_batch = max(1, 2_000_000 // (n_syn * t))
        for s in range(0, n_permutations, per_batch):
            shares, tl = _window_shares(perm_labels[s : s + per_batch][:, order], tables)
            null[s : s + len(shares)], tail = shares, max(tail, tl)
        if tail <= PERM_TAIL_TOL or t >= n_pool:
            break
        t = min(n_pool, 2 * t)  # a drawn record may lie beyond the window: widen it (rare)
    observed = float(observed)
    p_value = (1 + int((null >= observed - 1e-12).sum())) / (1 + n_permutations)
    n_closer = int(round(observed * n_syn))
    lo, hi = clopper_pearson(n_closer, n_syn)
    return {
        "share_closer_to_member": observed,
        "n_closer_to_member": n_closer,
        "matched_set_size": int(k),
        "share_p_value": float(p_value),
        "n_permutations": n_permutations,
        "share_null_mean": float(null.mean()),
        "share_null_q95": float(np.quantile(null, 0.95)),
        "n_synthetic_tested": int(n_syn),
        "synthetic_subsampled": bool(subsampled),
        "n_distinct_nearest_members": n_distinct_mem,
        "n_distinct_nearest_nonmembers": n_distinct_non,
        "share_test": "label permutation over the pooled members and non-members, one-sided",
        "share_ci95": [lo, hi],
        "share_ci95_method": "exact binomial; assumes independent synthetic images (they are not); not used "
        "for the verdict",
    }


# ---- the audit ------------------------------------------------------------------------------------------------


def near_copy_threshold(real_gaps: np.ndarray) -> tuple[float, str]:
    """The near-copy threshold from real patient-to-nearest-training-patient distances, and the rule used."""
    gaps = np.sort(np.asarray(real_gaps, dtype=np.float64))
    k = int(np.floor(NEAR_COPY_QUANTILE * (len(gaps) + 1)))
    if k >= 1:
        return float(
            gaps[k - 1]
        ), f"{k}-th smallest of {len(gaps)} real distances (<= {NEAR_COPY_QUANTILE:.0%} quantile)"
    return float(SMALL_SITE_FACTOR * gaps[0]), (
        f"{SMALL_SITE_FACTOR} x the smallest of {len(gaps)} real distances "
        f"(too few non-members to estimate the {NEAR_COPY_QUANTILE:.0%} quantile)"
    )


def coarse_histogram(values, edges, min_count: int = MIN_BIN_COUNT) -> dict:
    """Counts of `values` on the fixed bins `edges`, adjacent bins merged (left to right) until every bin holds at
    least `min_count` values; a remainder joins the last bin. Returns {"edges", "counts"}: edges are a subset of
    the fixed ones (an infinite last edge is None in JSON), so no edge comes from the data, and no bin singles out
    fewer than `min_count` records (unless there are fewer values in all: then one bin holds them all)."""
    edges = np.asarray(edges, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).ravel()
    fine = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    out_edges, out_counts, acc = [float(edges[0])], [], 0
    for i, c in enumerate(fine):
        acc += int(c)
        if acc >= min_count:
            out_edges.append(float(edges[i + 1]))
            out_counts.append(acc)
            acc = 0
    if (
        acc or not out_counts
    ):  # the remainder (or everything, when there are too few) joins the last bin
        if out_counts:
            out_counts[-1] += acc
            out_edges[-1] = float(edges[-1])
        else:
            out_edges.append(float(edges[-1]))
            out_counts.append(acc)
    elif out_edges[-1] != float(edges[-1]):
        out_edges[-1] = float(edges[-1])  # trailing empty bins join the last one
    return {
        "edges": [e if np.isfinite(e) else None for e in out_edges],
        "counts": out_counts,
    }


def _space_audit(
    syn: np.ndarray,
    mem: np.ndarray,
    non: np.ndarray,
    ids: list[str],
    rng: np.random.Generator,
    ratio: float,
    edges: tuple[float, ...],
) -> dict:
    """One space (pixel or feature): matched share and its permutation test, calibrated near-copy threshold,
    flags, histograms."""
    test = share_permutation_test(syn, mem, non, rng=rng)
    d_mem, _ = pairwise_min_distances(syn, mem)
    d_non, _ = pairwise_min_distances(syn, non)
    real_gap, _ = pairwise_min_distances(
        non, mem
    )  # a never-trained-on patient to the nearest training patient
    threshold, rule = near_copy_threshold(real_gap)
    flagged = (d_mem < threshold) & (d_mem < ratio * d_non)
    return {
        "n_synthetic": int(len(syn)),
        "n_members": int(len(mem)),
        "n_nonmembers": int(len(non)),
        **test,
        "near_copy_quantile": NEAR_COPY_QUANTILE,
        "near_copy_ratio": ratio,
        "near_copy_rule": rule,  # the threshold itself stays here: it is a distance between two patients
        "n_near_copies": int(flagged.sum()),
        "flagged_ids": [ids[i] for i in np.flatnonzero(flagged)],
        "histogram": {
            "bins": "fixed edges, merged until each bin holds at least min_count distances",
            "min_count": MIN_BIN_COUNT,
            "synthetic_to_member": coarse_histogram(d_mem, edges),
            "synthetic_to_nonmember": coarse_histogram(d_non, edges),
            "real_nonmember_to_member": coarse_histogram(real_gap, edges),
        },
    }


def memorization_audit(
    synthetic,
    synthetic_ids,
    members,
    nonmembers,
    *,
    synthetic_labels=None,
    member_labels=None,
    nonmember_labels=None,
    class_names=None,
    seed: int = 0,
    near_copy_ratio: float = NEAR_COPY_RATIO,
) -> dict:
    """Memorization figures of a synthetic cohort against one site's members and non-members (see the module
    docstring for the definitions), overall in pixel and feature space, and per class when labels are given.

    Returns {"definition", "pixel": {...}, "feature": {...}, "per_class": {class: {"pixel", "feature", ...}},
    "share_closer_to_member" and "share_p_value" (pixel space), "flagged_ids" (union over spaces and classes),
    "n_near_copies"}. Each space block holds the share, its permutation p-value and B (`share_permutation_test`),
    the near-copy count and flags, and coarse histograms (fixed bins, `MIN_BIN_COUNT` per bin)."""
    synthetic = _check_images(synthetic, "memorization_audit synthetic")
    members = _check_images(members, "memorization_audit members")
    nonmembers = _check_images(nonmembers, "memorization_audit non-members")
    if not synthetic.shape[1:] == members.shape[1:] == nonmembers.shape[1:]:
        raise ValueError(
            f"memorization_audit: image shapes differ: synthetic {synthetic.shape[1:]}, members "
            f"{members.shape[1:]}, non-members {nonmembers.shape[1:]}"
        )
    ids = [str(i) for i in synthetic_ids]
    if len(ids) != len(synthetic):
        raise ValueError(
            f"memorization_audit: {len(ids)} synthetic ids for {len(synthetic)} synthetic images"
        )
    rng = np.random.default_rng(seed)
    raw = [_raw_embedding(a) for a in (synthetic, members, nonmembers)]
    widths = raw[0][1]
    reference = np.concatenate([raw[1][0], raw[2][0]])
    f_syn, f_mem, f_non = (_standardise(r, reference, widths) for r, _ in raw)
    out = {
        "definition": (__doc__ or "").split("\n\n", 1)[1].strip(),
        "pixel": _space_audit(
            synthetic, members, nonmembers, ids, rng, near_copy_ratio, PIXEL_EDGES
        ),
        "feature": _space_audit(f_syn, f_mem, f_non, ids, rng, near_copy_ratio, FEATURE_EDGES),
        "per_class": {},
    }
    out["share_closer_to_member"] = out["pixel"]["share_closer_to_member"]
    out["share_p_value"] = out["pixel"]["share_p_value"]
    if synthetic_labels is not None and member_labels is not None and nonmember_labels is not None:
        sl, ml, nl = (
            np.asarray(a).ravel() for a in (synthetic_labels, member_labels, nonmember_labels)
        )
        if (len(sl), len(ml), len(nl)) != (len(synthetic), len(members), len(nonmembers)):
            raise ValueError(
                "memorization_audit: labels must have one entry per synthetic image, member and "
                "non-member"
            )
        names = (
            list(class_names)
            if class_names is not None
            else [str(c) for c in sorted(set(sl.tolist()))]
        )
        for c, name in enumerate(names):
            s, m, n = sl == c, ml == c, nl == c
            if s.sum() >= 1 and m.sum() >= 1 and n.sum() >= 1:
                sub_ids = [ids[i] for i in np.flatnonzero(s)]
                per = {
                    space: _space_audit(a[s], b[m], d[n], sub_ids, rng, near_copy_ratio, e)
                    for space, (a, b, d), e in (
                        ("pixel", (synthetic, members, nonmembers), PIXEL_EDGES),
                        ("feature", (f_syn, f_mem, f_non), FEATURE_EDGES),
                    )
                }
                px = per["pixel"]
                out["per_class"][name] = {
                    **{
                        k: px[k]
                        for k in (
                            "n_synthetic",
                            "n_members",
                            "n_nonmembers",
                            "share_closer_to_member",
                            "share_p_value",
                            "n_permutations",
                            "share_ci95",
                        )
                    },
                    "flagged_ids": sorted(
                        set(px["flagged_ids"]) | set(per["feature"]["flagged_ids"])
                    ),
                    "pixel": {k: v for k, v in px.items() if k != "histogram"},
                    "feature": {k: v for k, v in per["feature"].items() if k != "histogram"},
                }
                out["per_class"][name]["n_near_copies"] = len(out["per_class"][name]["flagged_ids"])
    flagged = set(out["pixel"]["flagged_ids"]) | set(out["feature"]["flagged_ids"])
    for per in out["per_class"].values():
        flagged |= set(per["flagged_ids"])
    out["flagged_ids"], out["n_near_copies"] = sorted(flagged), len(flagged)
    return out
