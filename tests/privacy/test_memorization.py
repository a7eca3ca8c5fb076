"""Memorization audit: exact nearest neighbours, copies caught, independent samples left alone, aggregates only."""

import numpy as np
import pytest

import privacy.memorization as memorization
from privacy.memorization import (
    MIN_BIN_COUNT,
    PIXEL_EDGES,
    coarse_histogram,
    feature_embedding,
    memorization_audit,
    near_copy_threshold,
    pairwise_min_distances,
    share_permutation_test,
)


def phantom_like(rng, n, size=32):
    """Smooth random blobs with noise: distinct 'patients' that are nonetheless alike."""
    yy, xx = np.mgrid[:size, :size] / size
    out = []
    for _ in range(n):
        cx, cy = rng.uniform(0.35, 0.65, 2)
        img = np.clip(
            1.2 - np.hypot(xx - cx, yy - cy) / rng.uniform(0.2, 0.35), 0, 1
        ) * rng.uniform(0.6, 1.0)
        out.append(img + rng.normal(0, 0.02, img.shape))
    return np.clip(np.asarray(out, np.float32)[:, None], 0, 1)


def brute(q, r):
    d = np.sqrt(
        ((q.reshape(len(q), 1, -1).astype(np.float64) - r.reshape(1, len(r), -1)) ** 2).mean(-1)
    )
    return d.min(1), d.argmin(1)


@pytest.mark.parametrize("batch", [7, 16, 1024])
def test_batched_nearest_neighbours_equal_brute_force(batch):
    rng = np.random.default_rng(1)
    q, r = rng.random((37, 1, 8, 8), dtype=np.float32), rng.random((53, 1, 8, 8), dtype=np.float32)
    q[:5] = (
        r[[3, 10, 20, 40, 52]] + 1e-4
    )  # near-duplicates: float32 cancellation must not hide them
    d, i = pairwise_min_distances(q, r, batch=batch)
    ref_d, ref_i = brute(q, r)
    assert np.allclose(d, ref_d, atol=1e-7) and np.array_equal(i, ref_i)
    assert np.allclose(d[:5], 1e-4, rtol=1e-2)


def test_nearest_neighbours_of_volumes_and_exact_copies():
    rng = np.random.default_rng(2)
    r = (
        rng.random((20, 1, 4, 6, 6), dtype=np.float32) * 0.1 + 0.9
    )  # large common offset, small differences
    d, i = pairwise_min_distances(r[[4, 7]], r, batch=3)
    assert np.array_equal(i, [4, 7]) and np.all(d == 0)
    with pytest.raises(ValueError, match="values per record"):
        pairwise_min_distances(r, rng.random((3, 1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        pairwise_min_distances(np.full((2, 1, 2, 2), np.nan), r[:, :, 0, :2, :2])


def test_feature_embedding_is_deterministic_standardised_and_size_independent():
    rng = np.random.default_rng(3)
    x = phantom_like(rng, 12)
    f = feature_embedding(x)
    assert np.array_equal(f, feature_embedding(x)) and np.isfinite(f).all()
    assert (
        np.abs(f.mean(0)).max() < 1e-5
    )  # standardised over the reference (here the images themselves)
    assert feature_embedding(phantom_like(rng, 3, size=64)).shape[1] == f.shape[1]
    ref = phantom_like(rng, 20)
    assert feature_embedding(x[:2], reference=ref).shape == (2, f.shape[1])


def test_exact_copies_are_flagged_and_closer_to_members():
    rng = np.random.default_rng(4)
    members, nonmembers = phantom_like(rng, 40), phantom_like(rng, 40)
    ids = [f"syn-{i}" for i in range(20)]
    out = memorization_audit(members[:20] + 0.001, ids, members, nonmembers)
    assert out["share_closer_to_member"] == 1.0 and out["feature"]["share_closer_to_member"] == 1.0
    assert out["n_near_copies"] == 20 and out["flagged_ids"] == sorted(ids)
    assert out["pixel"]["share_ci95"][0] > 0.8
    # 20 distinct nearest members: the permutation test sees 20 pieces of evidence, not one hub
    assert out["pixel"]["n_distinct_nearest_members"] == 20
    assert out["pixel"]["share_p_value"] <= 0.002 and out["pixel"]["n_permutations"] == 999


def test_independent_samples_are_not_flagged():
    shares, flagged = [], []
    for seed in range(3):
        rng = np.random.default_rng(10 + seed)
        members, nonmembers, synthetic = (
            phantom_like(rng, 60),
            phantom_like(rng, 40),
            phantom_like(rng, 60),
        )
        out = memorization_audit(
            synthetic, [f"s{i}" for i in range(60)], members, nonmembers, seed=seed
        )
        assert (
            out["pixel"]["matched_set_size"] == 40
        )  # members subsampled to the non-members' count
        lo, hi = out["pixel"]["share_ci95"]
        assert lo < out["share_closer_to_member"] < hi
        shares.append(out["share_closer_to_member"])
        flagged.append(out["n_near_copies"])
    assert 0.35 <= np.mean(shares) <= 0.65
    assert (
        sum(flagged) <= 2
    )  # the threshold is calibrated to flag at most ~1 % of fresh real patients


def test_near_copy_threshold_is_a_conservative_one_percent_order_statistic():
    rng = np.random.default_rng(7)
    hits = []
    for _ in range(3000):
        gaps = rng.random(199)
        t, rule = near_copy_threshold(gaps)
        assert t == np.sort(gaps)[1] and "2-th smallest" in rule
        hits.append(rng.random() < t)  # a fresh exchangeable draw
    assert np.mean(hits) < 0.015
    t, rule = near_copy_threshold(np.array([0.4, 0.2, 0.3]))
    assert t == pytest.approx(0.1) and "too few" in rule


def test_per_class_figures_and_aggregates_only():
    rng = np.random.default_rng(5)
    members, nonmembers = phantom_like(rng, 30), phantom_like(rng, 24)
    synthetic = np.concatenate([members[:3] + 0.001, phantom_like(rng, 9)])
    ml, nl, sl = np.arange(30) % 2, np.arange(24) % 2, np.array([0, 1, 0] + [0, 1] * 4 + [1])
    out = memorization_audit(
        synthetic,
        [f"s{i}" for i in range(12)],
        members,
        nonmembers,
        synthetic_labels=sl,
        member_labels=ml,
        nonmember_labels=nl,
        class_names=["healthy", "lesion"],
    )
    assert set(out["per_class"]) == {"healthy", "lesion"}
    again = memorization_audit(
        synthetic,
        [f"s{i}" for i in range(12)],
        members,
        nonmembers,
        synthetic_labels=sl,
        member_labels=ml,
        nonmember_labels=nl,
        class_names=["healthy", "lesion"],
    )
    assert again == out  # deterministic for a seed (p-values, null summaries, subsamples included)
    assert 0 < out["per_class"]["lesion"]["feature"]["share_p_value"] <= 1
    assert {"s0", "s1", "s2"} <= set(out["flagged_ids"])
    assert out["per_class"]["healthy"]["n_synthetic"] == int((sl == 0).sum())
    assert "s1" in out["per_class"]["lesion"]["flagged_ids"]
    h = out["pixel"]["histogram"]
    assert sum(h["synthetic_to_member"]["counts"]) == 12 and h["min_count"] == MIN_BIN_COUNT
    assert sum(h["real_nonmember_to_member"]["counts"]) == 24
    for kind in ("synthetic_to_member", "synthetic_to_nonmember", "real_nonmember_to_member"):
        part = h[kind]
        assert set(part["edges"]) <= set(PIXEL_EDGES) and min(part["counts"]) >= MIN_BIN_COUNT

    def lists(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from lists(v)
        elif isinstance(x, list):
            yield x

    for lst in lists(
        out
    ):  # merged histograms, intervals and synthetic ids only: nothing per real patient
        assert len(lst) <= 6 or all(isinstance(v, str) for v in lst), lst


def test_bad_input_is_named():
    rng = np.random.default_rng(6)
    a = phantom_like(rng, 5)
    with pytest.raises(ValueError, match="synthetic ids"):
        memorization_audit(a, ["x"], a, a)
    with pytest.raises(ValueError, match="shapes differ"):
        memorization_audit(a, [str(i) for i in range(5)], phantom_like(rng, 5, size=16), a)


# ---- the share closer to a member: permutation test -----------------------------------------------------------


def hub_cohort(rng, n_syn=16):
    """Real 'patients' plus synthetic images far from all of them whose nearest real image is one member (the hub):
    a weak generator, nothing memorised."""
    members, nonmembers = phantom_like(rng, 40), phantom_like(rng, 40)
    members[0] = (
        0.6  # a uniformly bright patient: the real image nearest to bright synthetic images
    )
    synthetic = np.clip(1.0 - rng.uniform(0, 0.05, (n_syn, *members.shape[1:])), 0, 1).astype(
        np.float32
    )
    return synthetic, members, nonmembers


def test_hub_share_of_one_is_not_significant():
    synthetic, members, nonmembers = hub_cohort(np.random.default_rng(20))
    out = memorization_audit(synthetic, [f"s{i}" for i in range(16)], members, nonmembers, seed=1)
    px = out["pixel"]
    assert px["share_closer_to_member"] == 1.0 and px["n_distinct_nearest_members"] == 1
    assert (
        px["share_ci95"][0] > 0.5
    )  # the binomial interval (independence assumed) would call this memorisation
    assert px["share_p_value"] > 0.3  # the hub's label is a coin flip under the null: no evidence
    assert px["share_null_q95"] == 1.0 and 0.3 < px["share_null_mean"] < 0.7
    assert out["n_near_copies"] == 0
    assert out["share_p_value"] == px["share_p_value"]


def test_memoriser_of_distinct_members_is_significant():
    rng = np.random.default_rng(21)
    members, nonmembers = rng.normal(size=(40, 32)), rng.normal(size=(40, 32))
    synthetic = members[rng.permutation(40)[:20]] + rng.normal(
        0, 0.2, (20, 32)
    )  # noisy copies of 20 members
    res = share_permutation_test(synthetic, members, nonmembers, rng=np.random.default_rng(0))
    assert res["share_closer_to_member"] > 0.9 and res["n_distinct_nearest_members"] >= 18
    assert res["share_p_value"] == 1 / 1000 and res["n_permutations"] == 999
    assert abs(res["share_null_mean"] - 0.5) < 0.05


def test_permutation_p_value_is_valid_under_the_null():
    """Synthetic records independent of the split (half of the problems near the data, half far away = hubs): the
    rejection rate at 0.05 stays at or below the nominal level, where the binomial interval rejects far more."""
    p_values, binomial_rejects = [], 0
    for i in range(200):
        g = np.random.default_rng(1000 + i)
        real = g.normal(size=(30, 6))
        synthetic = g.normal(size=(20, 6)) if i % 2 else g.normal(size=(20, 6)) * 0.3 + 4.0
        res = share_permutation_test(synthetic, real[:15], real[15:], rng=g, n_permutations=199)
        p_values.append(res["share_p_value"])
        binomial_rejects += res["share_ci95"][0] > 0.5
    p_values = np.asarray(p_values)
    assert np.mean(p_values < 0.05) <= 0.08
    assert (
        np.mean(p_values[1::2] < 0.5) > 0.3
    )  # near the data the p-value spreads over (0, 1), not stuck at 1
    assert binomial_rejects >= 30  # the old rule's false alarms on hubs


def test_share_is_the_exact_average_over_matched_subsamples():
    g = np.random.default_rng(22)
    members, nonmembers, synthetic = (
        g.normal(size=(50, 5)),
        g.normal(size=(12, 5)),
        g.normal(size=(30, 5)),
    )
    res = share_permutation_test(synthetic, members, nonmembers, rng=g, n_permutations=99)
    dm = np.sqrt(((synthetic[:, None] - members[None]) ** 2).mean(-1))
    dn = np.sqrt(((synthetic[:, None] - nonmembers[None]) ** 2).mean(-1))
    draws = [
        (dm[:, g.choice(50, 12, replace=False)].min(1) < dn.min(1)).mean() for _ in range(4000)
    ]
    assert res["matched_set_size"] == 12
    assert abs(res["share_closer_to_member"] - np.mean(draws)) < 0.01  # Monte Carlo error ~ 0.002


def test_share_test_is_deterministic_capped_and_aggregate_only(monkeypatch):
    g = np.random.default_rng(23)
    members, nonmembers, synthetic = (
        g.normal(size=(30, 8)),
        g.normal(size=(20, 8)),
        g.normal(size=(40, 8)),
    )
    a = share_permutation_test(synthetic, members, nonmembers, rng=np.random.default_rng(5))
    b = share_permutation_test(synthetic, members, nonmembers, rng=np.random.default_rng(5))
    assert a == b and not a["synthetic_subsampled"] and a["n_synthetic_tested"] == 40
    for key, value in a.items():  # scalars, one interval, text: nothing per patient
        assert isinstance(value, (int, float, bool, str)) or (
            key == "share_ci95" and len(value) == 2
        ), key
    monkeypatch.setattr(
        memorization, "PERM_MAX_CELLS", 50 * 25
    )  # cap: 25 synthetic x 50 pooled records
    c = share_permutation_test(synthetic, members, nonmembers, rng=np.random.default_rng(5))
    assert c["synthetic_subsampled"] and c["n_synthetic_tested"] == 25
    with pytest.raises(ValueError, match=">= 1"):
        share_permutation_test(synthetic, members[:0], nonmembers, rng=g)


def test_coarse_histogram_has_fixed_edges_and_a_minimum_count():
    edges = (0.0, 0.1, 0.2, 0.3, 0.4, float("inf"))
    h = coarse_histogram([0.05] * 2 + [0.15] * 4 + [0.35] * 7 + [9.0], edges, min_count=5)
    assert h == {"edges": [0.0, 0.2, None], "counts": [6, 8]}
    assert coarse_histogram([0.05, 0.06], edges, min_count=5) == {
        "edges": [0.0, None],
        "counts": [2],
    }
    assert coarse_histogram([0.05] * 5, edges, min_count=5) == {"edges": [0.0, None], "counts": [5]}


def _all_distances(a, b):
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).mean(-1)).ravel()


def _floats(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _floats(v)
    elif isinstance(x, list):
        for v in x:
            yield from _floats(v)
    elif isinstance(x, float):
        yield x


def test_the_answer_holds_no_distance_between_a_synthetic_image_and_a_patient():
    """Attack (issue 9 item 4): the audit used to return the near-copy threshold (half a real patient-to-patient
    distance), median distances and histogram edges derived from the largest distance: each is, or pins down, a
    distance between a specific synthetic image and a specific patient. No value in the answer may equal one (nor
    half of one), in pixel or feature space."""
    rng = np.random.default_rng(11)
    members, nonmembers = phantom_like(rng, 30), phantom_like(rng, 24)
    synthetic = np.concatenate(
        [members[:2] + 0.001, phantom_like(rng, 9)]
    )  # 11: medians are records
    out = memorization_audit(synthetic, [f"s{i}" for i in range(11)], members, nonmembers)
    real = np.concatenate([members, nonmembers])
    feats = [feature_embedding(x, reference=real) for x in (synthetic, members, nonmembers)]
    distances = np.concatenate(
        [
            _all_distances(synthetic, members),
            _all_distances(synthetic, nonmembers),
            _all_distances(nonmembers, members),
            _all_distances(feats[0], feats[1]),
            _all_distances(feats[0], feats[2]),
            _all_distances(feats[2], feats[1]),
        ]
    )
    distances = np.concatenate([distances, 0.5 * distances])
    distances = distances[distances > 1e-6]
    for v in _floats(out):
        hit = np.isclose(distances, v, rtol=1e-7, atol=0)
        assert not hit.any(), f"the answer carries a record-to-record distance: {v}"
