"""The verdict on the extraction search and on rare classes: copies among the samples a site drew fail, a search
that drew nothing never passes, a class that could not be tested never passes, and pooled classes are said with
their counts."""

import numpy as np

from privacy.verdict import build_audit
from tests.privacy.test_report import site


def extraction(drawn=200, drawn_flagged=0, applicable=True):
    return {
        "samples_requested": 200,
        "max_extraction_samples": 2000,
        "n_samples_drawn": drawn,
        "n_drawn_flagged": drawn_flagged,
        "n_released_flagged": 0,
        "n_distinct_members_copied": drawn_flagged,
        "flagged_ids": [],
        "lesion_regions": {"applicable": applicable, "drawn_flagged": 0}
        | ({} if applicable else {"why_not": "no training patient has a lesion mask"}),
    }


def coverage(lesion_members, lesion_nonmembers):
    def one(m, n):
        status = "tested" if min(m, n) >= 10 else "untestable" if n == 0 and m else "pooled"
        return {"n_members": m, "n_nonmembers": n, "status": status, "min_records": 10}

    return {"healthy": one(25, 25), "lesion": one(lesion_members, lesion_nonmembers)}


def audit_of(**kw):
    s = site(np.random.default_rng(0), name="site-a")
    s["memorization"]["extraction"] = extraction(**kw)
    return s


def test_clean_search_passes_and_copies_among_drawn_samples_fail():
    assert build_audit({"site-a": audit_of()}, cohort={})["verdict"]["status"] == "pass"
    verdict = build_audit({"site-a": audit_of(drawn_flagged=3)}, cohort={})["verdict"]
    assert verdict["status"] == "fail"
    assert any("3 of 200 samples the site drew" in f for f in verdict["findings"])


def test_a_search_that_drew_nothing_never_passes():
    verdict = build_audit({"site-a": audit_of(drawn=0)}, cohort={})["verdict"]
    assert verdict["status"] == "inconclusive"
    assert any("drew no samples" in r for r in verdict["reasons"])


def test_lesion_check_not_applicable_is_said():
    verdict = build_audit({"site-a": audit_of(applicable=False)}, cohort={})["verdict"]
    assert verdict["status"] == "pass"
    assert any("lesion-region copies not checked" in c for c in verdict["caveats"])


def test_rare_class_is_never_passed_untested_and_pooled_counts_are_shown():
    s = audit_of()
    s["membership"]["class_coverage"] = coverage(3, 0)
    verdict = build_audit({"site-a": s}, cohort={})["verdict"]
    assert verdict["status"] == "inconclusive"
    assert any("class lesion: 3 members, 0 non-members" in r for r in verdict["reasons"])
    s["membership"]["class_coverage"] = coverage(4, 2)
    verdict = build_audit({"site-a": s}, cohort={})["verdict"]
    assert verdict["status"] == "pass"
    assert any("class lesion: 4 members, 2 non-members" in c for c in verdict["caveats"])


def test_both_reports_show_the_extraction_search_and_the_classes(tmp_path):
    from privacy.report import render_partner_report, write_audit_report

    s = audit_of(drawn_flagged=2)
    s["membership"]["class_coverage"] = coverage(4, 2)
    audit = build_audit({"site-a": s}, cohort={"n_images": 10})
    _, html = write_audit_report(audit, tmp_path)
    page = html.read_text()
    assert "Extraction by many samples" in page and "200 of 200 asked" in page
    assert "4 / 2" in page and "pooled" in page
    partner = render_partner_report(
        audit, gate={"passed": False, "rules": []}, released_images=None
    )
    assert "Extraction search" in partner and "200 of 200 asked" in partner and "pooled" in partner
    assert "4 / 2" not in partner  # per-class patient counts stay in the officers' report
