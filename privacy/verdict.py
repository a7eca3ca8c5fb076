"""The audit's verdict: worst case across sites, classes and attacks, findings, caveats and the status, from the
sites' aggregates (the format is privacy/audit_schema.py's).

Verdict rule: "fail" if any site's empirical epsilon lower bound exceeds its claimed epsilon (the DP
implementation is suspect), if any near-copy was found, if a membership AUC is above its threshold AND
significantly above chance after a Holm correction over every membership attack of the audit (site x class x
attack with enough records; one-sided Hanley-McNeil p-values, family-wise 2.5 %: with a single attack the rule is
"its 95 % interval excludes 0.5"), or if a share closer to a member is above its
threshold AND significant in its one-sided label-permutation test after a Holm correction over all the share tests
of the audit (every site x space x class that has a p-value): Holm-adjusted p < 0.05. Otherwise "inconclusive" if
a site did not answer or no site has enough records to assess membership; otherwise "pass". A share above its
threshold that is not significant is listed as a caveat (typically a few "hub" real images nearest to most
synthetic images), not a finding; so is a membership AUC above its threshold that is not significant after the
correction (one chance interval among the 27 attacks of a three-site audit would otherwise decide the verdict).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from privacy.audit_schema import (
    AUDIT_SCHEMA_VERSION,
    DEFINITIONS,
    MIN_RECORDS,
    THREAT_MODEL,
    attacks,
    enough_records,
    eps_lower_bound,
    finite,
    fmt_number,
    json_safe,
    shares,
    tpr_resolvable,
)
from privacy.audit_stats import auc_p_value
from privacy.power import verdict_notes

SHARE_ALPHA = (
    0.05  # family-wise level of the share permutation tests (Holm over the tests of one audit)
)
CONFIDENCE = 0.95
# family-wise level of the membership AUC tests (Holm over the attacks of one audit), one-sided: with one attack the
# rule is the 1.0 rule "its 95 % interval excludes 0.5"
MEMBERSHIP_ALPHA = 0.025
THRESHOLDS = {
    "membership_auc": 0.6,
    "share_closer_to_member": 0.65,
    "n_near_copies": 0,
    "n_extraction_copies": 0,
}


def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control under any dependence)."""
    m = len(pvalues)
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def share_tests(sites: dict[str, dict]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """{(site, class, space): (permutation p-value, Holm-adjusted p-value)} over every share test of the audit
    that has a p-value (schema 1.1 blocks)."""
    keys, pvalues = [], []
    for name, site in sites.items():
        for cls, space, blk in shares(site):
            p = finite(blk.get("share_p_value"))
            if p is not None:
                keys.append((name, cls, space))
                pvalues.append(p)
    return {key: (p, padj) for key, p, padj in zip(keys, pvalues, holm(pvalues), strict=False)}


def membership_tests(sites: dict[str, dict]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """{(site, class, attack): (one-sided p-value, Holm-adjusted p-value)} over every membership attack of the
    audit with enough records (privacy.audit_schema.MIN_RECORDS) and an AUC."""
    keys, pvalues = [], []
    for name, site in sites.items():
        for cls, kind, res in attacks(site):
            auc = finite(res.get("auc"))
            if enough_records(res) and auc is not None:
                keys.append((name, cls, kind))
                pvalues.append(auc_p_value(auc, int(res["n_members"]), int(res["n_nonmembers"])))
    return {key: (p, padj) for key, p, padj in zip(keys, pvalues, holm(pvalues), strict=True)}


def extraction_notes(name: str, site: dict) -> tuple[list[str], list[str], list[str]]:
    """(findings, inconclusive reasons, caveats) of a site's extraction search (privacy/extraction.py): copies
    among the samples it drew fail; a search that drew no sample never passes; a lesion check that did not apply is
    said."""
    ext = (site.get("memorization") or {}).get("extraction")
    if not isinstance(ext, dict):
        return [], [], [f"{name}: no extraction search in this audit (a site of an older version)"]
    findings, inconclusive, caveats = [], [], []
    drawn, flagged = int(ext.get("n_samples_drawn") or 0), int(ext.get("n_drawn_flagged") or 0)
    if flagged > THRESHOLDS["n_extraction_copies"]:
        lesions = (ext.get("lesion_regions") or {}).get("drawn_flagged") or 0
        findings.append(
            f"{name}: extraction search: {flagged} of {drawn} samples the site drew from the model (never "
            f"released) are copies of training patients ({fmt_number(ext.get('n_distinct_members_copied'))} "
            f"distinct patient(s) copied, released images included; {lesions} by lesion region): the model "
            "memorises"
        )
    if drawn == 0:
        inconclusive.append(
            f"underpowered: {name}: the extraction search drew no samples (asked "
            f"{fmt_number(ext.get('samples_requested'))}, site limit "
            f"{fmt_number(ext.get('max_extraction_samples'))}): only the released images were searched"
        )
    lesion = ext.get("lesion_regions") or {}
    if lesion and not lesion.get("applicable"):
        caveats.append(
            f"{name}: lesion-region copies not checked: {lesion.get('why_not', 'no lesion masks')}"
        )
    return findings, inconclusive, caveats


def class_notes(name: str, site: dict) -> tuple[list[str], list[str]]:
    """(inconclusive reasons, caveats) from a site's class coverage (client/audit.py class_coverage): a class with
    training patients but no hold-out patient could not be tested, so the verdict cannot pass on it; a class with
    too few records for its own attacks is pooled into the all-class attacks, said with its counts."""
    inconclusive, caveats = [], []
    cover = (site.get("membership") or {}).get("class_coverage") or {}
    for cls, c in cover.items():
        counts = f"{fmt_number(c.get('n_members'))} members, {fmt_number(c.get('n_nonmembers'))} non-members"
        if c.get("status") == "untestable":
            inconclusive.append(
                f"underpowered: {name}, class {cls}: {counts}: no membership attack can test this class at "
                "this site (no hold-out patient of the class)"
            )
        elif c.get("status") == "pooled":
            caveats.append(
                f"{name}, class {cls}: {counts} (fewer than {fmt_number(c.get('min_records'))} per side): "
                "underpowered on its own; its patients count in the all-class attacks"
            )
    return inconclusive, caveats


def worst_case(sites: dict[str, dict]) -> dict[str, Any]:
    worst: dict[str, Any] = {}

    def consider(key: str, value: Any, where: dict) -> None:
        v = finite(value)
        if v is not None and (key not in worst or v > worst[key]["value"]):
            worst[key] = {"value": v, **where}

    for name, site in sites.items():
        for cls, kind, res in attacks(site):
            where = {"site": name, "class": cls, "attack": kind}
            consider("epsilon_lower_bound", eps_lower_bound(res), where)  # valid at any size
            if enough_records(res):
                consider("membership_auc", res.get("auc"), where)
                if tpr_resolvable(res):
                    consider("tpr_at_fpr_1pct", res.get("tpr_at_fpr_1pct"), where)
        m = site.get("memorization") or {}
        consider("n_near_copies", m.get("n_near_copies"), {"site": name, "class": "all"})
        consider(
            "n_extraction_copies",
            (m.get("extraction") or {}).get("n_drawn_flagged"),
            {"site": name, "class": "all"},
        )
        for cls, space, blk in shares(site):
            if (
                min(
                    blk.get("n_synthetic", 0),
                    blk.get("matched_set_size", blk.get("n_nonmembers", 0)),
                )
                >= MIN_RECORDS
            ):
                consider(
                    "share_closer_to_member",
                    blk.get("share_closer_to_member"),
                    {"site": name, "class": cls, "space": space},
                )
        consider(
            "claimed_epsilon", (site.get("claimed_privacy") or {}).get("epsilon"), {"site": name}
        )
        fid = site.get("fidelity") or {}
        consider(
            "frechet_distance",
            (fid.get("overall") or {}).get("frechet_distance"),
            {"site": name, "class": "all"},
        )
        for cls, per in (fid.get("per_class") or {}).items():
            consider("frechet_distance", per.get("frechet_distance"), {"site": name, "class": cls})
    return worst


def build_audit(
    site_results: dict[str, dict],
    *,
    cohort: dict,
    failures: list[str] | None = None,
    run_record: dict | None = None,
) -> dict[str, Any]:
    """Assemble per-site aggregates into the versioned audit dict (schema above) with worst case and verdict."""
    if not isinstance(site_results, dict):
        raise TypeError(
            f"build_audit: site_results must be a dict {{site: result}}, got {type(site_results).__name__}"
        )
    failures = [str(f) for f in failures or []]
    tests = share_tests(site_results)
    n_tests = len(tests)
    mtests = membership_tests(site_results)
    auc_not_significant: list[str] = []
    findings: list[str] = []
    caveats: list[str] = []
    site_inconclusive: list[str] = []
    suspect = False
    for name, site in site_results.items():
        cp = site.get("claimed_privacy") or {}
        claimed = finite(cp.get("epsilon"))
        for cls, kind, res in attacks(site):
            lb = eps_lower_bound(res)
            if claimed is not None and lb > claimed:
                suspect = True
                findings.append(
                    f"{name} ({kind.replace('_', '-')} attack, class {cls}): empirical epsilon lower bound {lb:.2f} "
                    f"exceeds the claimed epsilon {claimed:.2f}: the DP implementation is suspect"
                )
            if (name, cls, kind) in mtests and res["auc"] > THRESHOLDS["membership_auc"]:
                p, padj = mtests[(name, cls, kind)]
                ci = res.get("auc_ci") or [float("nan")] * 2
                where = f"{name} ({kind.replace('_', '-')} attack, class {cls})"
                detail = (
                    f"95 % interval {ci[0]:.3f}-{ci[1]:.3f}, one-sided p {p:.3g}, Holm-adjusted over "
                    f"{len(mtests)} membership test(s): {padj:.3g}"
                )
                if padj < MEMBERSHIP_ALPHA:
                    findings.append(
                        f"{where}: membership AUC {res['auc']:.3f} ({detail} < {MEMBERSHIP_ALPHA:g}) is above "
                        f"{THRESHOLDS['membership_auc']} and significantly above chance"
                    )
                else:
                    auc_not_significant.append(f"{where}: {res['auc']:.3f} ({detail})")
        m = site.get("memorization") or {}
        if (m.get("n_near_copies") or 0) > THRESHOLDS["n_near_copies"]:
            findings.append(
                f"{name}: {m['n_near_copies']} synthetic image(s) are near-copies of training patients "
                f"(flagged ids: {', '.join(map(str, m.get('flagged_ids', [])[:20]))})"
            )
        not_significant: list[str] = []
        for cls, space, blk in shares(site):
            share, ci = (
                finite(blk.get("share_closer_to_member")),
                blk.get("share_ci95") or [0.0, 1.0],
            )
            if share is None or share <= THRESHOLDS["share_closer_to_member"]:
                continue
            where = f"{name} ({space} space, class {cls})"
            if (
                name,
                cls,
                space,
            ) not in tests:  # a schema 1.0 block: no permutation test, the 1.0 rule
                if ci[0] > 0.5:
                    findings.append(
                        f"{where}: {share:.0%} of synthetic images are closer to a training patient "
                        f"than to a hold-out patient (binomial 95 % interval {ci[0]:.2f}-{ci[1]:.2f}, "
                        "assuming independent images; schema 1.0 audit without a permutation test)"
                    )
                continue
            p, padj = tests[(name, cls, space)]
            detail = (
                f"permutation p = {p:.3g} with B = {fmt_number(blk.get('n_permutations'))} label shuffles, "
                f"Holm-adjusted over {n_tests} share test(s): {padj:.3g}; null mean "
                f"{fmt_number(blk.get('share_null_mean'), 2)}, 95th percentile {fmt_number(blk.get('share_null_q95'), 2)}; "
                f"nearest real images: {fmt_number(blk.get('n_distinct_nearest_members'))} distinct member(s) and "
                f"{fmt_number(blk.get('n_distinct_nearest_nonmembers'))} distinct non-member(s) for "
                f"{fmt_number(blk.get('n_synthetic_tested', blk.get('n_synthetic')))} synthetic images"
            )
            if padj < SHARE_ALPHA:
                findings.append(
                    f"{where}: {share:.0%} of synthetic images are closer to a training patient than "
                    f"to a hold-out patient, significantly above chance ({detail} < {SHARE_ALPHA})"
                )
            else:
                not_significant.append(
                    f"{space} space, class {cls}: {share:.0%} (Holm-adjusted p {padj:.3g}, B = "
                    f"{fmt_number(blk.get('n_permutations'))} shuffles; "
                    f"{fmt_number(blk.get('n_distinct_nearest_members'))} distinct nearest member(s))"
                )
            if blk.get("synthetic_subsampled"):
                caveats.append(
                    f"{where}: the share test used {fmt_number(blk.get('n_synthetic_tested'))} of "
                    f"{fmt_number(blk.get('n_synthetic'))} synthetic images (seeded subsample; distance-matrix "
                    "cap)"
                )
        if not_significant:
            caveats.append(
                f"{name}: the share of synthetic images closer to a training patient than to a hold-out patient "
                f"is above {THRESHOLDS['share_closer_to_member']} but not significant in "
                f"{len(not_significant)} of {n_tests} permutation test(s) ({'; '.join(not_significant)}): with few "
                "distinct nearest real images this is what a few 'hub' images give by chance, not evidence of "
                "memorisation (each test's null and neighbours are in the memorisation table)"
            )
        legacy = [
            f"{cls}/{space}"
            for cls, space, blk in shares(site)
            if (name, cls, space) not in tests
            and finite(blk.get("share_closer_to_member")) is not None
        ]
        if legacy:
            caveats.append(
                f"{name}: share closer to a member without a permutation test (schema 1.0 block), judged "
                f"by the binomial interval, which assumes independent images: {', '.join(legacy)}"
            )
        if claimed is None:
            caveats.append(
                f"{name}: no finite formal privacy guarantee (protection: {cp.get('protection', 'unknown')})"
            )
        ext_findings, ext_inconclusive, ext_caveats = extraction_notes(name, site)
        findings += ext_findings
        site_inconclusive += ext_inconclusive
        caveats += ext_caveats
        cls_inconclusive, cls_caveats = class_notes(name, site)
        site_inconclusive += cls_inconclusive
        caveats += cls_caveats
        small = [f"{cls}/{kind}" for cls, kind, res in attacks(site) if not enough_records(res)]
        if small:
            caveats.append(
                f"{name}: membership figures from fewer than {MIN_RECORDS} members or non-members are "
                f"shown but not used for the verdict: {', '.join(small)}"
            )
    if auc_not_significant:
        caveats.append(
            f"membership AUC above {THRESHOLDS['membership_auc']} but not significant after Holm over "
            f"{len(mtests)} membership test(s) (family-wise {MEMBERSHIP_ALPHA:g}, one-sided): "
            f"{'; '.join(auc_not_significant)}: what the largest of that many chance-level attacks reads, not "
            "evidence of membership leakage"
        )
    blind = [
        f"{name}/{cls}/{space}"
        for name, site in site_results.items()
        for cls, space, blk in shares(site)
        if (name, cls, space) in tests
        and n_tests / (1 + (finite(blk.get("n_permutations")) or 0)) >= SHARE_ALPHA
    ]
    if blind:
        caveats.append(
            f"share tests that cannot reach Holm significance with their number of permutations B "
            f"({n_tests} tests x 1 / (1 + B) >= {SHARE_ALPHA}): {', '.join(blind[:10])}"
        )
    # power (privacy/power.py): a canary bound above the claim fails; a site whose audit could not have certified
    # the claim's range of interest even with a perfect attack makes the verdict inconclusive, never "pass"
    canary_findings, underpowered, power = verdict_notes(site_results)
    findings += canary_findings
    suspect = suspect or bool(canary_findings)
    worst = worst_case(site_results)
    inconclusive = list(underpowered) + site_inconclusive
    if not site_results:
        inconclusive.append("no site returned an audit")
    elif "membership_auc" not in worst:
        inconclusive.append(
            f"no site has {MIN_RECORDS}+ members and non-members: membership inference cannot be "
            "assessed"
        )
    if failures:
        inconclusive.append(f"no audit from: {'; '.join(failures)}")
    status = "fail" if findings else ("inconclusive" if inconclusive else "pass")
    reasons = (
        findings or inconclusive or ["no finding above the thresholds at any site, class or attack"]
    )
    return json_safe(
        {
            "schema_version": AUDIT_SCHEMA_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "confidence": CONFIDENCE,
            "threat_model": THREAT_MODEL,
            "definitions": DEFINITIONS,
            "cohort": cohort,
            "run": {
                k: run_record.get(k)
                for k in (
                    "run_id",
                    "status",
                    "autoencoder",
                    "diffusion_warm_start",
                    "completed_round",
                    "central_dp",
                )
            }
            if run_record
            else {},
            "sites": site_results,
            "worst_case": worst,
            "failures": failures,
            "flags": findings + inconclusive + caveats,
            "verdict": {
                "status": status,
                "reasons": reasons,
                "findings": findings,
                "caveats": caveats,
                "thresholds": THRESHOLDS,
                "dp_suspect": suspect,
                "power": power,
                "membership_tests": {
                    "n_tests": len(mtests),
                    "alpha": MEMBERSHIP_ALPHA,
                    "correction": f"Holm over the {len(mtests)} membership attack(s) of this audit with "
                    f"{MIN_RECORDS}+ members and non-members (site x class x attack), one-sided Hanley-McNeil "
                    "p-values",
                },
                "share_tests": {
                    "n_tests": n_tests,
                    "alpha": SHARE_ALPHA,
                    "correction": f"Holm over the {n_tests} share permutation test(s) of this audit "
                    "(site x space x class)",
                },
            },
        }
    )
