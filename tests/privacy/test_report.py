"""The audit report: versioned strict JSON, a self-contained HTML page, the verdict rule, escaping."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from privacy.audit_schema import AUDIT_SCHEMA_VERSION, load_audit
from privacy.audit_stats import empirical_epsilon_lower_bound, roc_summary
from privacy.memorization import memorization_audit
from privacy.report import render_partner_report, write_audit_report
from privacy.verdict import build_audit, holm
from tests.privacy.conftest import blobs


def attack(rng, shift, n=60, delta=1e-3):
    m, nm = rng.normal(shift, 1, n), rng.normal(0, 1, n)
    return {
        **roc_summary(m, nm),
        "epsilon_lower_bound": empirical_epsilon_lower_bound(m, nm, delta),
    }


def site(
    rng,
    *,
    name,
    shift=0.0,
    copies=False,
    epsilon=8.0,
    hub=False,
    noisy_copies=False,
    canaries=2000,
):
    """A site's audit answer; `canaries`: the size of its one-run canary audit (2000 at delta 1e-5 can certify
    about 6.0, enough for a claim of 8; 0: none, so 60 hold-out records are all the power it has)."""
    members, nonmembers = blobs(rng, 30), blobs(rng, 30)
    synthetic = members[:10] + 0.001 if copies else blobs(rng, 10)
    if hub:  # a weak generator: every image far from the data, all nearest to one member (the hub)
        members[0] = 0.6
        synthetic = np.clip(1.0 - rng.uniform(0, 0.05, (10, *members.shape[1:])), 0, 1).astype(
            np.float32
        )
    if noisy_copies:  # a memoriser: perturbed copies of 10 distinct members
        synthetic = np.clip(members[:10] + rng.normal(0, 0.05, members[:10].shape), 0, 1).astype(
            np.float32
        )
    return {
        "site": name,
        "n_members": 30,
        "n_nonmembers": 30,
        "claimed_privacy": {
            "protection": "formal sample-level DP per patient (RDP accountant, delta=1e-5)"
            if math.isfinite(epsilon)
            else "none",
            "epsilon": epsilon,
            "delta": 1e-5,
            "accountant": "rdp",
        },
        "memorization": memorization_audit(
            synthetic, [f"syn-{i}" for i in range(10)], members, nonmembers
        ),
        "membership": {
            "white_box": attack(rng, shift),
            "black_box": attack(rng, 0.0),
            "canaries": {"n_canaries": canaries, "epsilon_lower_bound": 0.0},
        },
        "fidelity": {
            "overall": {
                "frechet_distance": 1.5,
                "precision": 0.8,
                "recall": 0.7,
                "density": 0.9,
                "coverage": 0.8,
            }
        },
    }


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def test_clean_audit_passes(rng):
    audit = build_audit(
        {"a": site(rng, name="a"), "b": site(rng, name="b")}, cohort={"n_images": 10}
    )
    assert audit["verdict"]["status"] == "pass", audit["verdict"]
    assert not audit["verdict"]["dp_suspect"] and audit["schema_version"] == AUDIT_SCHEMA_VERSION


def test_underpowered_clean_audit_is_inconclusive_never_pass():
    """Nothing found, but a perfect attack on 30 + 30 records (and no canaries) could certify only about 2.3:
    the audit could not have seen a violation of a claim of 8, so it must not say "pass"."""
    rng = np.random.default_rng(12)  # its own stream: the module's is shared by the tests after it
    audit = build_audit(
        {"a": site(rng, name="a", canaries=0), "b": site(rng, name="b")}, cohort={"n_images": 10}
    )
    v = audit["verdict"]
    assert v["status"] == "inconclusive", v
    assert len(v["reasons"]) == 1 and v["reasons"][0].startswith(
        "underpowered: a claims epsilon 8.00"
    )
    assert v["power"]["a"]["underpowered"] and not v["power"]["b"]["underpowered"]
    assert v["power"]["b"]["power"] > 4.0 > v["power"]["a"]["power"] > 0


def test_canary_bound_above_the_claim_fails():
    rng = np.random.default_rng(13)
    s = site(rng, name="a", epsilon=2.0)
    s["membership"]["canaries"]["epsilon_lower_bound"] = 3.0
    audit = build_audit({"a": s}, cohort={"n_images": 10})
    assert audit["verdict"]["status"] == "fail" and audit["verdict"]["dp_suspect"]
    assert any("one-run canary audit" in r for r in audit["verdict"]["reasons"])


def test_eps_lower_bound_above_claim_fails_as_dp_suspect(rng):
    audit = build_audit({"a": site(rng, name="a", shift=6.0, epsilon=0.1)}, cohort={"n_images": 10})
    assert audit["verdict"]["status"] == "fail" and audit["verdict"]["dp_suspect"]
    assert any("DP implementation is suspect" in r for r in audit["verdict"]["reasons"])
    assert audit["worst_case"]["epsilon_lower_bound"]["site"] == "a"


def test_copies_fail_and_missing_sites_are_inconclusive(rng):
    copied = build_audit({"a": site(rng, name="a", copies=True)}, cohort={"n_images": 10})
    assert copied["verdict"]["status"] == "fail" and not copied["verdict"]["dp_suspect"]
    assert any("near-copies" in r for r in copied["verdict"]["reasons"])
    missing = build_audit(
        {"a": site(rng, name="a")}, cohort={"n_images": 10}, failures=["node 7: timeout"]
    )
    assert missing["verdict"]["status"] == "inconclusive"
    assert build_audit({}, cohort={})["verdict"]["status"] == "inconclusive"


def test_report_files_are_strict_json_and_self_contained_html(tmp_path, rng):
    hostile = "<script>alert(1)</script>"
    s = site(rng, name=hostile, copies=True, epsilon=math.inf)
    s["claimed_privacy"]["accountant"] = "<b>rdp</b>"
    s["membership"]["per_class"] = {
        "<img src=x onerror=alert(2)>": {"white_box": attack(rng, 0.0, n=5)}
    }
    audit = build_audit({hostile: s}, cohort={"n_images": 10, "class_names": ["healthy", "le$ion"]})
    images = blobs(rng, 8)
    j, h = write_audit_report(
        audit, tmp_path / "audit", flagged_images={"syn-0": images[0], "$x$": images[1]}
    )

    def no_constants(c):
        raise AssertionError(f"non-standard JSON constant {c}")

    data = json.loads(j.read_text(), parse_constant=no_constants)
    assert (
        data["schema_version"] == AUDIT_SCHEMA_VERSION
        and data["sites"][hostile]["claimed_privacy"]["epsilon"] is None
    )
    assert load_audit(j)["verdict"] == data["verdict"]
    page = h.read_text()
    assert "Verdict: FAIL" in page and page.count('src="data:image/png;base64,') >= 4
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "<b>rdp</b>" not in page
    assert "no formal guarantee" in page and "kind of protection" in page and "95%" in page
    assert (
        "permutation p-value (one-sided)" in page
        and "(B = 999)" in page
        and "assumes independence" in page
    )
    assert "http://" not in page and "https://" not in page  # nothing loaded from elsewhere
    assert sorted(p.name for p in (tmp_path / "audit").iterdir()) == [
        "audit.html",
        "audit.json",
    ]  # no temp files


def test_bad_audit_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        write_audit_report({"schema_version": AUDIT_SCHEMA_VERSION}, tmp_path)
    bad = tmp_path / "audit.json"
    bad.write_text(json.dumps({"schema_version": "0.1"}))
    with pytest.raises(ValueError, match="schema"):
        load_audit(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="audit.json"):
        load_audit(bad)


def test_hub_share_does_not_fail_but_is_a_caveat(rng):
    hub = site(rng, name="a", hub=True)
    px = hub["memorization"]["pixel"]
    assert (
        px["share_closer_to_member"] == 1.0 and px["share_ci95"][0] > 0.5
    )  # the 1.0 rule failed here
    assert px["n_distinct_nearest_members"] == 1 and px["share_p_value"] > 0.3
    audit = build_audit({"a": hub, "b": site(rng, name="b")}, cohort={"n_images": 10})
    assert audit["verdict"]["status"] == "pass", audit["verdict"]
    caveat = next(c for c in audit["verdict"]["caveats"] if c.startswith("a: the share"))
    assert "pixel space, class all: 100 %" in caveat.replace("100%", "100 %")
    assert (
        "not significant" in caveat
        and "B = 999" in caveat
        and "1 distinct nearest member" in caveat
    )
    assert audit["verdict"]["share_tests"]["n_tests"] == 4  # 2 sites x pixel, feature
    legacy = {
        "a": {
            **hub,
            "memorization": {
                **hub["memorization"],
                "pixel": {k: v for k, v in px.items() if k != "share_p_value"},
            },
        }
    }  # a schema 1.0 block: judged by the 1.0 rule
    old = build_audit(legacy, cohort={"n_images": 10})
    assert old["verdict"]["status"] == "fail" and any(
        "schema 1.0" in c for c in old["verdict"]["caveats"]
    )


def test_memoriser_share_fails_with_holm_corrected_permutation_p():
    g = np.random.default_rng(7)
    s = site(g, name="a", noisy_copies=True)
    s["memorization"]["n_near_copies"], s["memorization"]["flagged_ids"] = (
        0,
        [],
    )  # as if withheld (privacy.policy)
    p = s["memorization"]["pixel"]["share_p_value"]
    assert p <= 0.005 and s["memorization"]["pixel"]["n_permutations"] == 999
    audit = build_audit({"a": s, "b": site(g, name="b")}, cohort={"n_images": 10})
    assert audit["verdict"]["status"] == "fail", audit["verdict"]
    reason = next(
        r for r in audit["verdict"]["reasons"] if r.startswith("a (pixel space, class all)")
    )
    assert (
        "significantly above chance" in reason and f"permutation p = {p:.3g} with B = 999" in reason
    )
    assert "Holm-adjusted over 4 share test(s)" in reason and "10 distinct member(s)" in reason


def test_share_tests_that_cannot_reach_significance_are_named():
    blk = {"share_closer_to_member": 0.5, "share_p_value": 0.5, "n_permutations": 19}
    s = {"site": "a", "memorization": {"pixel": blk, "feature": dict(blk)}}
    caveats = build_audit({"a": s}, cohort={})["verdict"]["caveats"]
    assert any("cannot reach Holm significance" in c and "a/all/pixel" in c for c in caveats)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == [] and holm([0.6, 0.6]) == [1.0, 1.0]


def test_schema_1_0_audits_still_load(tmp_path, rng):
    audit = build_audit({"a": site(rng, name="a")}, cohort={"n_images": 10})
    old = tmp_path / "audit.json"
    old.write_text(json.dumps({**audit, "schema_version": "1.0"}))
    assert load_audit(old)["schema_version"] == "1.0"


def test_partner_report_holds_aggregates_and_only_the_images_it_is_given(rng):
    hostile = "<script>alert(1)</script>"
    s = site(rng, name=hostile, copies=True)
    audit = build_audit({hostile: s}, cohort={"n_images": 10, "class_names": ["healthy", "lesion"]})
    released = blobs(rng, 3)
    gate = {
        "passed": False,
        "rules": [{"rule": "max_epsilon", "passed": True, "measured": 8.0, "threshold": 10.0}],
    }
    page = render_partner_report(
        audit,
        gate=gate,
        released_images=released,
        released_labels=[0, 1, 0],
        class_names=["healthy", "lesion"],
        withheld_count=10,
        n_released=0,
        source_sha256="c" * 64,
    )
    assert hostile not in page and "&lt;script&gt;" in page
    assert (
        "Release gate: FAILED" in page
        and "c" * 64 in page
        and "10</b> synthetic image(s) were withheld" in page
    )
    # one image, the sample grid of the three images given; no officer-only section
    assert page.count("data:image/png;base64,") == 1
    for officer_only in (
        "Flagged synthetic images",
        "Membership inference",
        "Memorization",
        "syn-",
    ):
        assert officer_only not in page


def test_no_python_file_of_privacy_holds_an_html_page():
    root = Path(__file__).resolve().parents[2] / "privacy"
    for py in root.rglob("*.py"):
        text = py.read_text().lower()
        assert "<html" not in text and "<table" not in text and "<!doctype" not in text, py
    assert {p.name for p in (root / "templates").glob("*.html.j2")} >= {
        "officer_report.html.j2",
        "partner_report.html.j2",
    }
