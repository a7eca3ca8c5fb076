"""Extraction search: are any of many samples from the model copies of a site's training patients?

After Carlini et al. 2023 ("Extracting training data from diffusion models", USENIX Security): draw far more samples
from the model than are released and look for near-duplicates of training records with a distance RELATIVE to
each sample's own neighbourhood. What is implemented, per space:

    rel(x) = d(x, m_1) / (ALPHA x mean_{j=1..n} d(x, m_j)),

m_1..m_n the n = min(NEIGHBOURS, members) nearest training patients of x, d the RMS distance, ALPHA = 0.5 and
NEIGHBOURS = 50 as in Carlini et al.'s CIFAR-10 definition. A sample in a dense region (close to many patients)
is not a copy of any one of them; a copy is far closer to one patient than to the others, whatever the scale.

Three spaces, so that neither the autoencoder's blur nor its latent code hides a copy:
- pixel: the sample image against the patients' images (exact pixel copies);
- reconstruction: the sample image against the patients passed through the same autoencoder (decode(encode(p))):
  a generator that reproduces a patient's latent gives exactly that reconstruction, which is as far from the
  patient's own image as the autoencoder's error (about the size of the pixel near-copy threshold);
- latent: the sample's latent (the sampler's output, or the encoder's mean for a released image) against the
  patients' latent means.

Calibration: real data, as for the near-copy threshold (privacy/memorization.py). The hold-out patients (never
trained on) are what a generator that copies nothing but draws new patients from the population would give: each
one's rel against the training patients, in the same space and through the same autoencoder (raw image for pixel,
reconstruction for reconstruction, latent mean for latent), is the null. The threshold is half the smallest of
those values (`extraction_threshold`: not a 1 % quantile, which would flag about 1 % of many samples of a model
that copies nothing). A sample is flagged in a space when its rel is below that threshold AND it is closer to its
nearest training patient than to any hold-out patient in that space. Flagged in any space = flagged.

Lesion regions: when the site has lesion masks, each training patient's lesion region is compared on its mask
(pixels inside the mask only, against both the patient's image and its reconstruction): a sample whose pixels on
some training patient's lesion mask are closer to that patient's lesion than the closest hold-out patient comes
(ratio below half the smallest of the hold-out patients' own leave-one-out ratios) is a
lesion-region copy, whatever the rest of the image looks like. Lesions are compared where they are (no search over
translations): a lesion pasted elsewhere in the image is not seen.

What leaves the site: counts (samples drawn, flagged per space, distinct training patients copied, lesion-region
copies), flagged ids of RELEASED images only (drawn samples never leave the site and have no ids), and histograms
of rel on fixed bins (`REL_EDGES`) merged until every bin holds `MIN_BIN_COUNT` values. Never a threshold, a
distance or a patient id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privacy.memorization import (
    MIN_BIN_COUNT,
    REFINE_CANDIDATES,
    SMALL_SITE_FACTOR,
    _check_images,
    _distance_matrix,
    coarse_histogram,
)

ALPHA = 0.5
NEIGHBOURS = 50
SPACES = ("pixel", "reconstruction", "latent")
REL_EDGES = tuple(round(0.1 * i, 1) for i in range(41)) + (float("inf"),)  # rel: 0 .. 4, then open


@dataclass
class Views:
    """One set of records seen in the three spaces (same order in each): `pixel` the images, `reconstruction`
    what is compared against the members' reconstructions (a sample's own image; a real patient's reconstruction),
    `latent` the latents. `masks` (optional, bool, image-shaped): lesion regions (members only)."""

    pixel: np.ndarray
    reconstruction: np.ndarray
    latent: np.ndarray
    masks: list[np.ndarray | None] | None = None

    def __post_init__(self) -> None:
        self.pixel = _check_images(self.pixel, "extraction pixel views")
        self.reconstruction = _check_images(self.reconstruction, "extraction reconstruction views")
        self.latent = _check_images(self.latent, "extraction latent views")
        if not len(self.pixel) == len(self.reconstruction) == len(self.latent):
            raise ValueError(
                f"extraction views: {len(self.pixel)} images, {len(self.reconstruction)} reconstructions and "
                f"{len(self.latent)} latents: one of each per record"
            )
        if self.masks is not None and len(self.masks) != len(self.pixel):
            raise ValueError(
                f"extraction views: {len(self.masks)} masks for {len(self.pixel)} records"
            )

    def __len__(self) -> int:
        return len(self.pixel)

    def space(self, name: str) -> np.ndarray:
        return getattr(self, name).reshape(len(self), -1)


def nearest(queries: np.ndarray, references: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest references of every query, nearest first: (RMS distances (n, k) float64, indices (n, k)).
    Candidates come from float32 matrix products, then `REFINE_CANDIDATES` more than k are re-measured exactly in
    float64 (an exact copy is at distance 0, not at float32 rounding)."""
    q = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
    r = np.asarray(references, dtype=np.float32).reshape(len(references), -1)
    k = min(k, len(r))
    kc = min(len(r), k + REFINE_CANDIDATES)
    out_d, out_i = np.empty((len(q), k)), np.empty((len(q), k), dtype=np.int64)
    # bounded memory: the float32 block (step x references) and the float64 re-measure (step x kc x values)
    step = max(1, min(8_000_000 // max(1, len(r)), 4_000_000 // (kc * q.shape[1])))
    for s in range(0, len(q), step):
        d = _distance_matrix(q[s : s + step], r)
        cand = (
            np.argpartition(d, kc - 1, axis=1)[:, :kc]
            if kc < len(r)
            else np.tile(np.arange(len(r)), (len(d), 1))
        )
        exact = np.sqrt(((q[s : s + step, None, :].astype(np.float64) - r[cand]) ** 2).mean(-1))
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        out_d[s : s + len(d)] = np.take_along_axis(exact, order, 1)
        out_i[s : s + len(d)] = np.take_along_axis(cand, order, 1)
    return out_d, out_i


def relative_distance(knn: np.ndarray) -> np.ndarray:
    """Carlini et al.'s relative distance from sorted k-nearest distances (n, k): d_1 / (ALPHA x mean d_1..d_n)."""
    n = min(NEIGHBOURS, knn.shape[1])
    scale = ALPHA * knn[:, :n].mean(1)
    return np.where(scale > 0, knn[:, 0] / np.where(scale > 0, scale, 1.0), 0.0)


def extraction_threshold(null: np.ndarray) -> tuple[float, str]:
    """Half the smallest hold-out value, whatever the number of hold-out patients. Not the 1 % quantile of the
    near-copy rule: the search judges many samples, and at a 1 % rate per sample 1,000 samples of a model that
    copies nothing would give about 10 false flags; below half of what ANY fresh patient reaches, a sample is a
    copy, and exact and latent copies (relative distance about 0) are still caught."""
    null = np.asarray(null, dtype=np.float64)
    return float(SMALL_SITE_FACTOR * null.min()), (
        f"{SMALL_SITE_FACTOR} x the smallest of {len(null)} hold-out values"
    )


def _space_flags(
    queries: np.ndarray, mem: np.ndarray, non: np.ndarray, null_queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(flags, nearest member index, rel of the queries, rel of the null, threshold rule) in one space."""
    knn_d, knn_i = nearest(queries, mem, NEIGHBOURS)
    rel = relative_distance(knn_d)
    null = relative_distance(nearest(null_queries, mem, NEIGHBOURS)[0])
    threshold, rule = extraction_threshold(null)
    d_non = nearest(queries, non, 1)[0][:, 0]
    flags = (rel < threshold) & (knn_d[:, 0] < d_non)
    return flags, knn_i[:, 0], rel, null, rule


def _masked_rms(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RMS over the mask's pixels of each record in x (n, ...) against ref (...)."""
    sel = mask.reshape(-1)
    return np.sqrt(((x.reshape(len(x), -1)[:, sel] - ref.reshape(-1)[sel]) ** 2).mean(1))


def lesion_region_search(
    queries: np.ndarray, members: Views, nonmembers: Views
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(flags per query, index of the member whose lesion it copies (-1 if none), summary). Each member with a
    non-empty mask: d_m(x) = min(RMS on the mask of x - member image, of x - member reconstruction); s_m = the
    closest any hold-out patient comes (their images and their reconstructions as x); ratio(x) = min over m of
    d_m(x) / s_m. Threshold: half the smallest of the hold-out patients' leave-one-out ratios (s_m without them)."""
    lesion = [i for i, m in enumerate(members.masks or []) if m is not None and bool(np.any(m))]
    summary = {"n_members_with_lesion_masks": len(lesion)}
    if not lesion or len(nonmembers) < 2:
        summary["applicable"] = False
        summary["why_not"] = (
            "no training patient has a lesion mask"
            if not lesion
            else "fewer than 2 hold-out patients"
        )
        return np.zeros(len(queries), bool), np.full(len(queries), -1), summary
    q = queries.reshape(len(queries), -1)
    dq = np.full((len(q), len(lesion)), np.inf)
    dh = np.full((len(nonmembers), len(lesion)), np.inf)
    for j, i in enumerate(lesion):
        mask = np.asarray(members.masks[i], bool)
        for ref in (members.pixel[i], members.reconstruction[i]):
            dq[:, j] = np.minimum(dq[:, j], _masked_rms(q, ref, mask))
            for h in (
                nonmembers.pixel,
                nonmembers.reconstruction,
            ):  # what a fresh patient gives, raw or through the AE
                dh[:, j] = np.minimum(dh[:, j], _masked_rms(h, ref, mask))
    s = dh.min(0)
    two = np.sort(dh, 0)[:2]
    # leave-one-out: the closest OTHER hold-out patient for each hold-out patient
    s_loo = np.where(dh <= two[0], two[1], two[0])
    null = (dh / np.where(s_loo > 0, s_loo, np.inf)).min(1)
    threshold, rule = extraction_threshold(null)
    ratio = dq / np.where(s > 0, s, np.inf)
    best = ratio.argmin(1)
    flags = ratio[np.arange(len(q)), best] < threshold
    summary.update({"applicable": True, "rule": rule})
    return flags, np.where(flags, np.asarray(lesion)[best], -1), summary


def extraction_audit(
    released: Views,
    released_ids: list[str],
    drawn: Views | None,
    members: Views,
    nonmembers: Views,
    *,
    samples_requested: int,
) -> dict:
    """Search the released cohort and the samples drawn at the site (never released) for copies of training
    patients (module docstring). Returns aggregates only; `flagged_ids` names released images."""
    ids = [str(i) for i in released_ids]
    if len(ids) != len(released):
        raise ValueError(f"extraction_audit: {len(ids)} ids for {len(released)} released images")
    if len(members) < 2 or len(nonmembers) < 2:
        raise ValueError(
            f"extraction_audit: needs >= 2 training and >= 2 hold-out patients, got {len(members)}, "
            f"{len(nonmembers)}"
        )
    n_drawn = 0 if drawn is None else len(drawn)
    out: dict = {
        "definition": (__doc__ or "").split("\n\n", 1)[1].strip(),
        "alpha": ALPHA,
        "neighbours": min(NEIGHBOURS, len(members)),
        "samples_requested": int(samples_requested),
        "n_samples_drawn": int(n_drawn),
        "n_released": len(released),
        "n_members": len(members),
        "n_nonmembers": len(nonmembers),
        "spaces": {},
    }
    null_views = {
        "pixel": nonmembers.pixel,
        "reconstruction": nonmembers.reconstruction,
        "latent": nonmembers.latent,
    }
    rel_flag_released = np.zeros(len(released), bool)
    drawn_flag = np.zeros(n_drawn, bool)
    copied: set[int] = set()
    for space in SPACES:
        mem, non = members.space(space), nonmembers.space(space)
        null_q = null_views[space].reshape(len(nonmembers), -1)
        block: dict = {}
        for what, views in (("released", released), ("drawn", drawn)):
            if views is None or len(views) == 0:
                block[what] = {"n": 0, "n_flagged": 0}
                continue
            flags, nn, rel, null, rule = _space_flags(views.space(space), mem, non, null_q)
            copied |= set(nn[flags].tolist())
            if what == "released":
                rel_flag_released |= flags
            else:
                drawn_flag |= flags
            block["rule"] = rule
            block[what] = {
                "n": int(len(views)),
                "n_flagged": int(flags.sum()),
                "relative_distance_histogram": coarse_histogram(rel, REL_EDGES),
            }
            block["holdout_relative_distance_histogram"] = coarse_histogram(null, REL_EDGES)
        out["spaces"][space] = block
    lesion_released, lm_r, summary = lesion_region_search(released.pixel, members, nonmembers)
    lesion_drawn, lm_d, _ = (
        lesion_region_search(drawn.pixel, members, nonmembers)
        if n_drawn
        else (np.zeros(0, bool), np.zeros(0, int), None)
    )
    lesion_copied = set(lm_r[lesion_released].tolist()) | set(lm_d[lesion_drawn].tolist())
    out["lesion_regions"] = {
        **summary,
        "released_flagged": int(lesion_released.sum()),
        "drawn_flagged": int(lesion_drawn.sum()),
        "n_distinct_lesions_copied": len(lesion_copied),
    }
    flagged_released = rel_flag_released | lesion_released
    out["flagged_ids"] = [ids[i] for i in np.flatnonzero(flagged_released)]
    out["n_released_flagged"] = int(flagged_released.sum())
    out["n_drawn_flagged"] = int((drawn_flag | lesion_drawn).sum())
    out["n_distinct_members_copied"] = len(copied | lesion_copied)
    out["histogram_min_count"] = MIN_BIN_COUNT
    return out
