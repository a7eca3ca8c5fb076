"""The audit's statistics and report, checked against references and known mechanisms."""

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from privacy.audit_stats import clopper_pearson, empirical_epsilon_lower_bound, roc_summary
from privacy.fidelity import feature_moments, frechet_distance, precision_recall_coverage, radiomics_features
from privacy.memorization import memorization_audit, pairwise_min_distances
from privacy.report import build_audit, write_audit_report


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 200), (1, 1000)])
def test_clopper_pearson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n, 0.05) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_roc_summary_separable_and_identical():
    rng = np.random.default_rng(0)
    assert roc_summary(rng.normal(10, 1, 300), rng.normal(0, 1, 300))["auc"] > 0.99
    same = roc_summary(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000))
    assert abs(same["auc"] - 0.5) < 0.03 and len(same["roc"]["fpr"]) <= 200


def test_epsilon_lower_bound_never_over_claims_without_signal():
    for seed in range(20):
        rng = np.random.default_rng(seed)
        lb = empirical_epsilon_lower_bound(rng.normal(0, 1, 500), rng.normal(0, 1, 500), delta=1e-5, seed=seed)
        assert lb["epsilon_lower_bound"] < 0.5


def test_epsilon_lower_bound_respects_a_known_mechanism():
    """Randomised response with true epsilon: members say 1 w.p. e^eps/(1+e^eps), non-members w.p. 1/(1+e^eps)."""
    for eps in (0.5, 1.0, 2.0):
        p = math.exp(eps) / (1 + math.exp(eps))
        for seed in range(5):
            rng = np.random.default_rng(seed)
            m = (rng.random(4000) < p).astype(float)
            n = (rng.random(4000) < 1 - p).astype(float)
            lb = empirical_epsilon_lower_bound(m, n, delta=0.0, seed=seed)["epsilon_lower_bound"]
            assert lb <= eps
            assert lb > 0.5 * eps  # and the bound is not vacuous with this many records


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(1)
    q, r = rng.random((37, 1, 8, 8)), rng.random((53, 1, 8, 8))
    d, i = pairwise_min_distances(q, r, batch=10)
    ref = np.sqrt(((q.reshape(37, 1, -1) - r.reshape(1, 53, -1)) ** 2).mean(-1))
    assert np.allclose(d, ref.min(1), atol=1e-5) and np.array_equal(i, ref.argmin(1))


def phantom_like(rng, n):
    """Smooth random blobs: distinct 'patients' that are nonetheless alike."""
    yy, xx = np.mgrid[:32, :32] / 32.0
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.35, 0.65, 2).tolist() + [rng.uniform(0.2, 0.35)]
        img = np.clip(1.2 - np.hypot(xx - cx, yy - cy) / r, 0, 1) * rng.uniform(0.6, 1.0)
        out.append(img + rng.normal(0, 0.02, img.shape))
    return np.clip(np.asarray(out, np.float32)[:, None], 0, 1)


def test_memorization_copies_are_flagged_and_independent_samples_are_not():
    rng = np.random.default_rng(3)
    members, nonmembers = phantom_like(rng, 40), phantom_like(rng, 40)
    ids = [f"s{i}" for i in range(20)]
    copies = memorization_audit(members[:20] + 0.001, ids, members, nonmembers)
    assert copies["n_near_copies"] == 20 and copies["pixel"]["share_closer_to_member"] == 1.0
    fresh = memorization_audit(phantom_like(rng, 20), ids, members, nonmembers)
    assert fresh["n_near_copies"] <= 1
    assert 0.2 <= fresh["pixel"]["share_closer_to_member"] <= 0.8
    assert "edges" in fresh["pixel"]["histogram"] and len(fresh["pixel"]["histogram"]["synthetic_to_member"]) == 30


def test_fidelity_distance_grows_with_a_shift():
    rng = np.random.default_rng(4)
    a = phantom_like(rng, 30)
    fa, names = radiomics_features(a)
    fb, _ = radiomics_features(np.clip(a * 0.6, 0, 1))
    assert fa.shape == (30, len(names))
    assert frechet_distance(feature_moments(fa), feature_moments(fa)) < 1e-6
    assert frechet_distance(feature_moments(fa), feature_moments(fb)) > 0.01
    pr = precision_recall_coverage(fa, fa, k=3)
    assert pr["precision"] == pytest.approx(1.0) and pr["coverage"] == pytest.approx(1.0)


def test_report_json_and_html(tmp_path):
    rng = np.random.default_rng(5)
    members, nonmembers = phantom_like(rng, 30), phantom_like(rng, 30)
    site = {
        "site": "<script>alert(1)</script>", "n_members": 30, "n_nonmembers": 30,
        "claimed_privacy": {"protection": "formal sample-level DP per patient (RDP accountant, delta=1e-3)",
                            "epsilon": 0.1, "delta": 1e-3, "accountant": "rdp"},
        "memorization": memorization_audit(members[:10] + 0.001, [f"s{i}" for i in range(10)], members, nonmembers),
        "membership": {"white_box": {**roc_summary(rng.normal(3, 1, 30), rng.normal(0, 1, 30)),
                                     "epsilon_lower_bound": empirical_epsilon_lower_bound(
                                         rng.normal(6, 1, 30), rng.normal(0, 1, 30), 1e-3)}},
    }
    audit = build_audit({site["site"]: site}, cohort={"n_images": 10, "class_names": ["healthy", "lesion"]})
    assert audit["verdict"]["status"] == "fail" and audit["verdict"]["dp_suspect"]  # eps_lb > claimed 0.1
    j, h = write_audit_report(audit, tmp_path, sample_images=members[:8], sample_labels=np.zeros(8, int),
                              class_names=["healthy", "lesion"], flagged_images={"s0": members[0]})
    assert json.loads(j.read_text())["schema_version"] == "1.0"
    page = h.read_text()
    assert "Verdict: FAIL" in page and page.count("data:image/png;base64,") >= 3
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
