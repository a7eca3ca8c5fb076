"""The audit report for privacy officers: `audit.json` (versioned, every figure with its definition) and a
self-contained `audit.html` (plots inline as base64 PNG) that reads without code.

audit.json, schema 1.1 (strict JSON: a number that is not finite, e.g. the claimed epsilon of a site without DP,
is written as null):
    schema_version: "1.1"; created_at: ISO 8601 UTC; confidence: 0.95 (of every interval and bound)
    threat_model: {black_box, white_box, out_of_scope}
    definitions: {figure name: what it means}
    cohort: {path, n_images, class_names, checkpoint_sha256, run_id}
    run: {run_id, status, ..., central_dp: the run's client-level DP label} (from the run record, when given)
    sites: {site: {n_members, n_nonmembers,
                   claimed_privacy: {protection (kind: "formal sample-level DP ...", "client-level DP ...", "none"),
                                     epsilon, delta, accountant, ...}          (from the site's ledger)
                   memorization: privacy.memorization.memorization_audit(...)   (pixel, feature, per_class, flags)
                                 each space block (pixel, feature, per_class.{class}.pixel/feature) holds
                                 share_closer_to_member, matched_set_size, share_ci95 (binomial, assumes
                                 independence, not used for the verdict) and, new in 1.1: share_p_value,
                                 n_permutations, share_null_mean, share_null_q95, n_distinct_nearest_members,
                                 n_distinct_nearest_nonmembers, n_synthetic_tested, synthetic_subsampled,
                                 share_test, share_ci95_method
                   membership: {white_box: roc_summary + {epsilon_lower_bound: {...}}, black_box: same,
                                per_class: {class: {white_box, black_box}}}
                   fidelity: {overall: {frechet_distance, precision, recall, density, coverage}, per_class: {...},
                              reference: {holdout_patients: {...}, holdout_through_autoencoder: {...}}}
                              (the same figures for real hold-out images and for them passed through the autoencoder)
                   utility: {train_synthetic_test_real: {...}, train_real_test_real: {...}}}}
    worst_case: {figure: {value, site, class, attack}}   (largest value across sites, classes and attacks)
    failures: [sites that did not answer]
    flags: [human-readable findings and caveats]
    verdict: {status: "pass" | "fail" | "inconclusive", reasons: [...], findings: [...], caveats: [...],
              thresholds: {...}, dp_suspect: bool,
              share_tests: {n_tests, correction, alpha} (new in 1.1: the multiple-testing correction used)}
Schema 1.1 only adds fields to 1.0; `load_audit` reads both (`READABLE_SCHEMA_VERSIONS`). A 1.0 memorization
block (no share_p_value) is still judged by the 1.0 rule (binomial interval), with a caveat.

Verdict rule: "fail" if any site's empirical epsilon lower bound exceeds its claimed epsilon (the DP
implementation is suspect), if any near-copy was found, if a membership AUC is above its threshold AND
significantly above chance (its 95 % interval excludes 0.5), or if a share closer to a member is above its
threshold AND significant in its one-sided label-permutation test after a Holm correction over all the share tests
of the audit (every site x space x class that has a p-value): Holm-adjusted p < 0.05. Otherwise "inconclusive" if
a site did not answer or no site has enough records to assess membership; otherwise "pass". A share above its
threshold that is not significant is listed as a caveat (typically a few "hub" real images nearest to most
synthetic images), not a finding.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from common.io import write_json_atomic, write_text_atomic
from privacy.power import verdict_notes

AUDIT_SCHEMA_VERSION = "1.1"
READABLE_SCHEMA_VERSIONS = ("1.0", "1.1")  # 1.1 only adds fields (see the module docstring)
SHARE_ALPHA = (
    0.05  # family-wise level of the share permutation tests (Holm over the tests of one audit)
)
CONFIDENCE = 0.95
# A membership figure from fewer records than this (per side) is reported but not used for the verdict or the
# worst case: one member and one non-member give an AUC of 0 or 1 by chance.
MIN_RECORDS = 10
THRESHOLDS = {"membership_auc": 0.6, "share_closer_to_member": 0.65, "n_near_copies": 0}
MAX_GRID = 48

REFERENCE_LABELS = {
    "holdout_patients": "hold-out patients (real images never trained on)",
    "holdout_through_autoencoder": "hold-out patients through the autoencoder (the best a generator in this latent "
    "space could reach)",
}

THREAT_MODEL = {
    "black_box": "an honest-but-curious server or any partner who receives the released cohort (images only)",
    "white_box": "an auditor holding the global model's weights, bounding what the model itself leaks",
    "out_of_scope": "a malicious server forging messages; sites poisoning the model",
}

DEFINITIONS = {
    "membership_auc": "area under the ROC curve of a membership-inference attack separating a site's training "
    "patients (members) from its hold-out patients (non-members, never trained on); 0.5 = no "
    "better than chance; 95 % interval by Hanley-McNeil",
    "tpr_at_fpr_1pct": "share of members the attack identifies while wrongly accusing at most 1 % of non-members "
    "(needs at least 100 non-members to be measured; 0.1 % needs 1000)",
    "white_box": "attack score: minus the diffusion loss of the record under the global model at fixed timesteps",
    "black_box": "attack score: minus the distance from the record to the closest synthetic image",
    "epsilon_lower_bound": "a lower bound on epsilon, valid at 95 % confidence, implied by the attack: the "
    "threshold is chosen on a random half of the records and Clopper-Pearson bounds on its "
    "true- and false-positive rates are taken on the other half. A bound above the claimed "
    "epsilon means the DP implementation or its accounting is suspect; a bound below it "
    "does not prove the claim",
    "share_closer_to_member": "share of synthetic images whose nearest real image is a training patient rather "
    "than a hold-out patient, with equal set sizes (averaged exactly over all matched "
    "subsamples); about 0.5 when nothing is memorised. Judged by a one-sided "
    "label-permutation test: the member / non-member labels of the pooled real patients "
    "are shuffled B times (B reported, 999 for small problems) and the p-value is "
    "(1 + #shuffles with a share >= the observed one) / (1 + B); Holm-corrected over all "
    "share tests of the audit. The binomial interval also shown assumes independent "
    "synthetic images and is not used: images sharing a few nearest real images (hubs) "
    "are not independent, which the numbers of distinct nearest members / non-members "
    "show",
    "near_copy": "a synthetic image closer to a training patient than 99 % of hold-out patients are to their "
    "nearest training patient (the distance that separates two different real patients; with fewer "
    "than 99 hold-out patients, half the smallest such distance), and closer to that training patient "
    "than to any hold-out patient; checked on pixels, on image features and per class",
    "frechet_distance": "distance between Gaussian fits of radiomics features (real vs synthetic); 0 = identical",
    "precision_recall": "precision: share of synthetic images inside the real feature manifold; recall: share of "
    "real images covered by the synthetic one; density and coverage (Naeem et al. 2020) are "
    "robust variants (k-nearest-neighbour balls)",
    "utility": "balanced accuracy / AUC of a classifier trained on the synthetic cohort and tested on a site's "
    "hold-out (train-synthetic-test-real), beside one trained on the site's own training data",
}


# ---- the audit dict -------------------------------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _json_safe(x: Any) -> Any:
    """Plain JSON: numpy scalars and arrays become numbers and lists, non-finite numbers null."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _attacks(site: dict) -> list[tuple[str, str, dict]]:
    """(class or 'all', attack kind, result) for every attack the site ran."""
    mem = site.get("membership") or {}
    out = [("all", kind, mem[kind]) for kind in ("white_box", "black_box") if kind in mem]
    for cls, per in (mem.get("per_class") or {}).items():
        out += [(cls, kind, per[kind]) for kind in ("white_box", "black_box") if kind in per]
    return out


def _eps_lb(res: dict) -> float:
    return _finite((res.get("epsilon_lower_bound") or {}).get("epsilon_lower_bound")) or 0.0


def _enough(res: dict) -> bool:
    return min(res.get("n_members", 0) or 0, res.get("n_nonmembers", 0) or 0) >= MIN_RECORDS


def _shares(site: dict) -> list[tuple[str, str, dict]]:
    """(class, space, memorization block) for every share the site computed."""
    m = site.get("memorization") or {}
    out = [("all", space, m[space]) for space in ("pixel", "feature") if space in m]
    for cls, per in (m.get("per_class") or {}).items():
        out += [(cls, space, per[space]) for space in ("pixel", "feature") if space in per]
    return out


def _holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error control under any dependence)."""
    m = len(pvalues)
    adjusted, running = [1.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _share_tests(sites: dict[str, dict]) -> dict[tuple[str, str, str], tuple[float, float]]:
    """{(site, class, space): (permutation p-value, Holm-adjusted p-value)} over every share test of the audit
    that has a p-value (schema 1.1 blocks)."""
    keys, pvalues = [], []
    for name, site in sites.items():
        for cls, space, blk in _shares(site):
            p = _finite(blk.get("share_p_value"))
            if p is not None:
                keys.append((name, cls, space))
                pvalues.append(p)
    return {key: (p, padj) for key, p, padj in zip(keys, pvalues, _holm(pvalues), strict=False)}


def _worst(sites: dict[str, dict]) -> dict[str, Any]:
    worst: dict[str, Any] = {}

    def consider(key: str, value: Any, where: dict) -> None:
        v = _finite(value)
        if v is not None and (key not in worst or v > worst[key]["value"]):
            worst[key] = {"value": v, **where}

    for name, site in sites.items():
        for cls, kind, res in _attacks(site):
            where = {"site": name, "class": cls, "attack": kind}
            consider("epsilon_lower_bound", _eps_lb(res), where)  # valid at any size
            if _enough(res):
                consider("membership_auc", res.get("auc"), where)
                if (res.get("resolvable") or {}).get(
                    "tpr_at_fpr_1pct", (res.get("n_nonmembers") or 0) >= 100
                ):
                    consider("tpr_at_fpr_1pct", res.get("tpr_at_fpr_1pct"), where)
        m = site.get("memorization") or {}
        consider("n_near_copies", m.get("n_near_copies"), {"site": name, "class": "all"})
        for cls, space, blk in _shares(site):
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
    tests = _share_tests(site_results)
    n_tests = len(tests)
    findings: list[str] = []
    caveats: list[str] = []
    suspect = False
    for name, site in site_results.items():
        cp = site.get("claimed_privacy") or {}
        claimed = _finite(cp.get("epsilon"))
        for cls, kind, res in _attacks(site):
            lb = _eps_lb(res)
            if claimed is not None and lb > claimed:
                suspect = True
                findings.append(
                    f"{name} ({kind.replace('_', '-')} attack, class {cls}): empirical epsilon lower bound {lb:.2f} "
                    f"exceeds the claimed epsilon {claimed:.2f}: the DP implementation is suspect"
                )
            if (
                _enough(res)
                and (_finite(res.get("auc")) or 0) > THRESHOLDS["membership_auc"]
                and (res.get("auc_ci") or [0.0])[0] > 0.5
            ):
                findings.append(
                    f"{name} ({kind.replace('_', '-')} attack, class {cls}): membership AUC {res['auc']:.3f} (95 % "
                    f"interval {res['auc_ci'][0]:.3f}-{res['auc_ci'][1]:.3f}) is above "
                    f"{THRESHOLDS['membership_auc']} and significantly above chance"
                )
        m = site.get("memorization") or {}
        if (m.get("n_near_copies") or 0) > THRESHOLDS["n_near_copies"]:
            findings.append(
                f"{name}: {m['n_near_copies']} synthetic image(s) are near-copies of training patients "
                f"(flagged ids: {', '.join(map(str, m.get('flagged_ids', [])[:20]))})"
            )
        for cls, space, blk in _shares(site):
            share, ci = (
                _finite(blk.get("share_closer_to_member")),
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
                f"permutation p = {p:.3g} with B = {_fmt(blk.get('n_permutations'))} label shuffles, "
                f"Holm-adjusted over {n_tests} share test(s): {padj:.3g}; null mean "
                f"{_fmt(blk.get('share_null_mean'), 2)}, 95th percentile {_fmt(blk.get('share_null_q95'), 2)}; "
                f"nearest real images: {_fmt(blk.get('n_distinct_nearest_members'))} distinct member(s) and "
                f"{_fmt(blk.get('n_distinct_nearest_nonmembers'))} distinct non-member(s) for "
                f"{_fmt(blk.get('n_synthetic_tested', blk.get('n_synthetic')))} synthetic images"
            )
            if padj < SHARE_ALPHA:
                findings.append(
                    f"{where}: {share:.0%} of synthetic images are closer to a training patient than "
                    f"to a hold-out patient, significantly above chance ({detail} < {SHARE_ALPHA})"
                )
            else:
                caveats.append(
                    f"{where}: {share:.0%} of synthetic images are closer to a training patient, above "
                    f"{THRESHOLDS['share_closer_to_member']} but not significant ({detail}): with few "
                    "distinct nearest real images this is what a few 'hub' images give by chance; not "
                    "evidence of memorisation"
                )
            if blk.get("synthetic_subsampled"):
                caveats.append(
                    f"{where}: the share test used {_fmt(blk.get('n_synthetic_tested'))} of "
                    f"{_fmt(blk.get('n_synthetic'))} synthetic images (seeded subsample; distance-matrix "
                    "cap)"
                )
        legacy = [
            f"{cls}/{space}"
            for cls, space, blk in _shares(site)
            if (name, cls, space) not in tests
            and _finite(blk.get("share_closer_to_member")) is not None
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
        small = [f"{cls}/{kind}" for cls, kind, res in _attacks(site) if not _enough(res)]
        if small:
            caveats.append(
                f"{name}: membership figures from fewer than {MIN_RECORDS} members or non-members are "
                f"shown but not used for the verdict: {', '.join(small)}"
            )
    blind = [
        f"{name}/{cls}/{space}"
        for name, site in site_results.items()
        for cls, space, blk in _shares(site)
        if (name, cls, space) in tests
        and n_tests / (1 + (_finite(blk.get("n_permutations")) or 0)) >= SHARE_ALPHA
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
    worst = _worst(site_results)
    inconclusive = list(underpowered)
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
    return _json_safe(
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
                "share_tests": {
                    "n_tests": n_tests,
                    "alpha": SHARE_ALPHA,
                    "correction": f"Holm over the {n_tests} share permutation test(s) of this audit "
                    "(site x space x class)",
                },
            },
        }
    )


# ---- plots ----------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _txt(s: Any) -> str:
    """Text for matplotlib: '$' would start mathtext."""
    return str(s).replace("$", r"\$")


def _png(fig, alt: str) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return (
        f'<img alt="{html.escape(alt)}" style="max-width:100%" '
        f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'
    )


def _roc_plot(sites: dict) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind in zip(axes, ("white_box", "black_box"), strict=False):
        floor = 1e-3
        for name, site in sites.items():
            res = (site.get("membership") or {}).get(kind)
            if not res or not (res.get("roc") or {}).get("fpr"):
                continue
            floor = min(floor, 0.5 / max(res.get("n_nonmembers") or 1, 1))
            fpr, tpr = np.asarray(res["roc"]["fpr"], float), np.asarray(res["roc"]["tpr"], float)
            ax.plot(
                np.maximum(fpr, floor),
                np.maximum(tpr, floor),
                drawstyle="steps-post",
                label=_txt(
                    f"{name}: AUC {res['auc']:.2f}, {res['n_members']} / {res['n_nonmembers']}"
                ),
            )
        ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
        ax.set(
            xscale="log",
            yscale="log",
            xlim=(floor, 1.05),
            ylim=(floor, 1.05),
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{kind.replace('_', '-')} membership inference (log-log)",
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, title="site: AUC, members / non-members", title_fontsize=7)
    return _png(fig, "ROC curves of the membership-inference attacks per site, log-log axes")


def _epsilon_plot(sites: dict) -> str:
    plt = _plt()
    names = list(sites)
    claimed = [_finite((s.get("claimed_privacy") or {}).get("epsilon")) for s in sites.values()]
    lbs = [max([_eps_lb(r) for _, _, r in _attacks(s)], default=0.0) for s in sites.values()]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 3.2))
    x = np.arange(len(names))
    ax.bar(
        x - 0.2,
        [c if c is not None else 0 for c in claimed],
        0.4,
        label="claimed epsilon (accountant)",
        color="#4c72b0",
    )
    ax.bar(x + 0.2, lbs, 0.4, label="empirical lower bound (95 %)", color="#dd8452")
    for xi, c in zip(x, claimed, strict=False):
        if c is None:
            ax.text(xi - 0.2, 0, "no formal\nguarantee", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [_txt(n)[:24] for n in names], fontsize=8)
    ax.set_ylabel("epsilon")
    ax.set_title("claimed epsilon vs empirical lower bound (lower bound must stay below the claim)")
    ax.legend(fontsize=7)
    return _png(fig, "bar chart of claimed epsilon and empirical epsilon lower bound per site")


def _hist_plot(name: str, mem: dict) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, space in zip(axes, ("pixel", "feature"), strict=False):
        blk = mem.get(space) or {}
        h = blk.get("histogram")
        if not h:
            ax.axis("off")
            continue
        edges = np.asarray(h["edges"], float)
        for key, label in (
            ("synthetic_to_member", "synthetic -> nearest member"),
            ("synthetic_to_nonmember", "synthetic -> nearest non-member"),
            ("real_nonmember_to_member", "real non-member -> nearest member (calibration)"),
        ):
            counts = np.asarray(h[key], float)
            ax.stairs(counts / max(counts.sum(), 1), edges, label=f"{label}, n={int(counts.sum())}")
        if _finite(blk.get("near_copy_threshold")) is not None:
            ax.axvline(blk["near_copy_threshold"], color="red", ls=":", label="near-copy threshold")
        ax.set(
            title=_txt(f"{name}: {space}-space distances"), xlabel="RMS distance", ylabel="share"
        )
        ax.legend(fontsize=6)
    return _png(fig, f"histograms of nearest-neighbour distances at site {name}")


def _tile(img: np.ndarray) -> np.ndarray:
    """What the report shows of one image (1, H, W) or volume (1, D, H, W): the image, or the volume's sagittal,
    coronal and axial mid-slices side by side (RAS axes), rotated for display."""
    img = img[0] if img.ndim in (3, 4) and img.shape[0] == 1 else img
    if img.ndim == 2:
        return np.rot90(img)
    i, j, k = (s // 2 for s in img.shape)
    views = [np.rot90(img[i]), np.rot90(img[:, j]), np.rot90(img[:, :, k])]
    if len({v.shape[0] for v in views}) > 1:  # not a cube: the axial mid-slice alone
        return views[2]
    return np.concatenate(views, axis=1)


def _grid(images: np.ndarray, titles: list[str], alt: str, cols: int = 8) -> str:
    plt = _plt()
    tiles = [_tile(np.asarray(img, float)) for img in images]
    wide = (
        3 if any(t.shape[1] > 2 * t.shape[0] for t in tiles) else 1
    )  # volumes: three slices a tile
    cols = max(1, cols // wide) if wide > 1 else cols
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3 * wide, rows * 1.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), tiles, titles, strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(_txt(title)[:20], fontsize=6)
    return _png(fig, alt)


# ---- HTML -----------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    f = _finite(v)
    if f is None:
        return "n/a" if v is None or isinstance(v, (int, float)) else html.escape(str(v))
    if f.is_integer() and abs(f) < 1e7:
        return str(int(f))
    return f"{f:.{digits}g}"


def _ci(ci: Any) -> str:
    return (
        f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"
        if isinstance(ci, (list, tuple)) and len(ci) == 2
        else "n/a"
    )


def _sent(s: str) -> str:
    """A definition as an escaped sentence."""
    return html.escape(s[:1].upper() + s[1:])


def _table(head: list[str], rows: list[list[str]]) -> str:
    """Cells are already-escaped HTML."""
    return (
        "<table><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr>"
        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )


STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1150px;margin:auto;padding:1em;color:#222;line-height:1.4}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;"
    "text-align:left}th{background:#f2f2f2}.verdict{padding:.8em 1.2em;border-radius:6px;color:#fff}"
    ".verdict h2{margin:.2em 0}.def{color:#555;font-size:13px}.bad{color:#b00020;font-weight:bold}"
    "h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"
)


def _html(audit: dict, sample_images, sample_labels, class_names, flagged_images) -> str:
    e = html.escape
    v, sites, cohort = audit["verdict"], audit["sites"], audit.get("cohort") or {}
    color = {"pass": "#1b7f3b", "inconclusive": "#8a6d00", "fail": "#b00020"}.get(
        v["status"], "#444"
    )
    conf = f"{audit['confidence']:.0%}"
    p = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>fedsynth privacy audit</title>"
        f"<style>{STYLE}</style></head><body>",
        "<h1>Privacy audit of a synthetic cohort</h1>",
        f"<div class='verdict' id='verdict' style='background:{color}'><h2>Verdict: {e(v['status'].upper())}</h2>"
        "<ul>" + "".join(f"<li>{e(str(r))}</li>" for r in v["reasons"]) + "</ul></div>",
    ]
    if v.get("caveats"):
        p.append(
            "<p><b>Caveats:</b></p><ul>"
            + "".join(f"<li>{e(str(c))}</li>" for c in v["caveats"])
            + "</ul>"
        )
    p.append(
        f"<p>Cohort: {e(_fmt(cohort.get('n_images')))} synthetic images; classes "
        f"{e(', '.join(map(str, cohort.get('class_names') or [])))}; model checkpoint sha256 "
        f"<code>{e(str(cohort.get('checkpoint_sha256') or '')[:16])}</code>; run "
        f"{e(str(cohort.get('run_id') or ''))}. Report created {e(str(audit['created_at']))}. Every interval and "
        f"bound is at {conf} confidence. Each hospital computed these figures on its own patients; only "
        "aggregates (counts, rates, binned histograms) left the hospital.</p>"
        "<p class='def'>How it is decided: FAIL if an empirical epsilon lower bound exceeds the claimed epsilon, "
        "if any near-copy of a patient is found, if an attack is above its threshold and significantly above "
        "chance, or if the closer-to-member share is above its threshold and significant in its label-permutation "
        f"test (Holm-adjusted p &lt; {SHARE_ALPHA} over all share tests); INCONCLUSIVE if a site did not answer "
        f"or there are too few records to judge; PASS otherwise. Thresholds: {e(json.dumps(v.get('thresholds', {})))}.</p>"
    )
    p.append(
        "<h2>Threat model</h2><ul>"
        + "".join(
            f"<li><b>{e(k.replace('_', ' '))}</b>: {e(str(t))}</li>"
            for k, t in audit["threat_model"].items()
        )
        + "</ul>"
    )
    rows = []
    for name, site in sites.items():
        cp = site.get("claimed_privacy") or {}
        claimed = _finite(cp.get("epsilon"))
        lbs = {
            kind: max([_eps_lb(r) for c, k, r in _attacks(site) if k == kind], default=None)
            for kind in ("white_box", "black_box")
        }
        worst_lb = max([x for x in lbs.values() if x is not None], default=0.0)
        status = (
            "<span class='bad'>suspect</span>"
            if claimed is not None and worst_lb > claimed
            else ("no formal guarantee" if claimed is None else "consistent")
        )
        rows.append(
            [
                e(name),
                e(str(cp.get("protection", "unknown"))),
                _fmt(claimed),
                _fmt(cp.get("delta")),
                e(str(cp.get("accountant", ""))),
                _fmt(lbs["white_box"]),
                _fmt(lbs["black_box"]),
                status,
                f"{_fmt(site.get('n_members'))} / {_fmt(site.get('n_nonmembers'))}",
            ]
        )
    p.append(
        "<h2>Privacy spend per site</h2><p class='def'>The kind of protection each claimed epsilon is, and the "
        f"empirical lower bound beside it. {_sent(DEFINITIONS['epsilon_lower_bound'])}.</p>"
        + _table(
            [
                "site",
                "kind of protection",
                "claimed epsilon",
                "delta",
                "accountant",
                f"lower bound, white-box ({conf})",
                f"lower bound, black-box ({conf})",
                "claim vs bound",
                "members / non-members",
            ],
            rows,
        )
        + (_epsilon_plot(sites) if sites else "")
    )
    central = (audit.get("run") or {}).get("central_dp") or {}
    if central:  # the run's client-level (central DP) label, beside the sites' sample-level ones
        p.append(
            f"<p><b>Client level (whole site):</b> {e(str(central.get('protection', 'unknown')))}"
            + (
                f"; epsilon {_fmt(_finite(central.get('epsilon')))} after {_fmt(central.get('rounds'))} rounds, "
                f"{_fmt(central.get('sites'))} sites"
                if central.get("protection") != "none"
                else ""
            )
            + ".</p>"
        )
    rows = []
    for key, w in audit["worst_case"].items():
        where = ", ".join(f"{k} {w[k]}" for k in ("site", "class", "attack", "space") if k in w)
        rows.append(
            [e(key.replace("_", " ")), _fmt(w.get("value")), e(where), _fmt(THRESHOLDS.get(key))]
        )
    p.append(
        "<h2>Worst case across sites and classes</h2>"
        + _table(["figure", "value", "where", "threshold"], rows)
    )
    rows = []
    for name, site in sites.items():
        for cls, kind, r in _attacks(site):
            lb = r.get("epsilon_lower_bound") or {}
            res = r.get("resolvable") or {}
            counts = (
                f"TP {lb['true_positives']} / {lb['n_members_evaluated']}, FP {lb['false_positives']} / "
                f"{lb['n_nonmembers_evaluated']}"
                if "true_positives" in lb
                else e(str(lb.get("note", "n/a")))
            )
            rows.append(
                [
                    e(name),
                    e(str(cls)),
                    e(kind.replace("_", "-")),
                    _fmt(r.get("auc")),
                    _ci(r.get("auc_ci")),
                    _fmt(r.get("tpr_at_fpr_1pct"))
                    + ("" if res.get("tpr_at_fpr_1pct", True) else " (unresolved)"),
                    _fmt(r.get("tpr_at_fpr_0_1pct"))
                    + ("" if res.get("tpr_at_fpr_0_1pct", True) else " (unresolved)"),
                    _fmt(lb.get("epsilon_lower_bound")),
                    counts,
                    f"{_fmt(r.get('n_members'))} / {_fmt(r.get('n_nonmembers'))}",
                ]
            )
    p.append(
        "<h2>Membership inference</h2><p class='def'>Can an attacker tell whether a given patient was in the "
        f"training data? {_sent(DEFINITIONS['membership_auc'])}. {_sent(DEFINITIONS['tpr_at_fpr_1pct'])}. White-box: "
        f"{e(DEFINITIONS['white_box'])}; black-box: {e(DEFINITIONS['black_box'])}. '(unresolved)': too few "
        "non-members to measure that false-positive rate.</p>"
        + (_roc_plot(sites) if sites else "")
        + _table(
            [
                "site",
                "class",
                "attack",
                "AUC",
                f"AUC {conf} interval",
                "TPR @ 1% FPR",
                "TPR @ 0.1% FPR",
                f"epsilon lower bound ({conf})",
                "counts behind the bound (evaluation half)",
                "members / non-members",
            ],
            rows,
        )
    )
    p.append(
        "<h2>Memorization</h2><p class='def'>Is any synthetic image a copy of a patient? "
        f"{_sent(DEFINITIONS['share_closer_to_member'])}. Near-copy: {e(DEFINITIONS['near_copy'])}.</p>"
    )
    tests = _share_tests(sites)
    for name, site in sites.items():
        m = site.get("memorization") or {}
        rows = []
        for cls, space, b in _shares(site):
            p_raw, p_adj = tests.get((name, cls, space), (None, None))
            sig = p_adj is not None and p_adj < SHARE_ALPHA
            rows.append(
                [
                    e(str(cls)),
                    e(space),
                    _fmt(b.get("share_closer_to_member")),
                    (f"<span class='bad'>{_fmt(p_raw)}</span>" if sig else _fmt(p_raw))
                    + (
                        f" (B = {_fmt(b.get('n_permutations'))})"
                        if p_raw is not None
                        else " (no test: schema 1.0)"
                    ),
                    _fmt(p_adj),
                    f"{_fmt(b.get('share_null_mean'), 2)} / {_fmt(b.get('share_null_q95'), 2)}",
                    f"{_fmt(b.get('n_distinct_nearest_members'))} / {_fmt(b.get('n_distinct_nearest_nonmembers'))}",
                    _ci(b.get("share_ci95")),
                    _fmt(b.get("n_near_copies")),
                    _fmt(b.get("near_copy_threshold")),
                    f"{_fmt(b.get('n_synthetic'))} / {_fmt(b.get('n_members'))} / {_fmt(b.get('n_nonmembers'))}",
                ]
            )
        p.append(
            f"<h3>{e(name)}</h3><p>Near-copies (any space or class): <b>{_fmt(m.get('n_near_copies'))}</b></p>"
            + _table(
                [
                    "class",
                    "space",
                    "share closer to a member",
                    "permutation p-value (one-sided)",
                    f"Holm-adjusted p ({len(tests)} tests)",
                    "null mean / 95th percentile",
                    "distinct nearest members / non-members",
                    f"binomial {conf} interval (assumes independence; not used)",
                    "near-copies",
                    "near-copy threshold (RMS distance)",
                    "synthetic / members / non-members",
                ],
                rows,
            )
            + _hist_plot(name, m)
        )
    if flagged_images:
        shown = list(flagged_images)[:MAX_GRID]
        p.append(
            f"<h2>Flagged synthetic images ({len(flagged_images)}; to be withheld from release)</h2>"
            + ("" if len(shown) == len(flagged_images) else f"<p>First {len(shown)} shown.</p>")
            + _grid(
                np.stack([np.asarray(flagged_images[k]) for k in shown]),
                shown,
                "synthetic images flagged as near-copies",
            )
        )
    else:
        p.append("<h2>Flagged synthetic images</h2><p>None.</p>")
    rows = []
    for name, site in sites.items():
        fid = site.get("fidelity") or {}
        for cls, f in [("all", fid.get("overall") or {})] + list(
            (fid.get("per_class") or {}).items()
        ):
            rows.append(
                [e(name), e(str(cls))]
                + [
                    _fmt(f.get(k))
                    for k in (
                        "frechet_distance",
                        "precision",
                        "recall",
                        "density",
                        "coverage",
                        "n_real",
                        "n_synthetic",
                    )
                ]
            )
        for ref, f in (
            fid.get("reference") or {}
        ).items():  # what real images / the autoencoder reach, for scale
            label = "<i>reference: " + e(REFERENCE_LABELS.get(ref, ref)) + "</i>"
            rows.append(
                [e(name), label]
                + [
                    _fmt(f.get(k))
                    for k in (
                        "frechet_distance",
                        "precision",
                        "recall",
                        "density",
                        "coverage",
                        "n_real",
                        "n_synthetic",
                    )
                ]
            )
    urows = []
    for name, site in sites.items():
        u = site.get("utility") or {}
        ts, tr = u.get("train_synthetic_test_real") or {}, u.get("train_real_test_real") or {}
        urows.append(
            [
                e(name),
                f"{_fmt(ts.get('balanced_accuracy'))} / {_fmt(ts.get('auc'))}",
                f"{_fmt(tr.get('balanced_accuracy'))} / {_fmt(tr.get('auc'))}",
                _fmt(u.get("n_test")),
            ]
        )
    p.append(
        f"<h2>Fidelity and utility</h2><p class='def'>{_sent(DEFINITIONS['frechet_distance'])}. "
        f"{_sent(DEFINITIONS['precision_recall'])}. {_sent(DEFINITIONS['utility'])}.</p>"
        + _table(
            [
                "site",
                "class",
                "Frechet distance",
                "precision",
                "recall",
                "density",
                "coverage",
                "real",
                "synthetic (or reference) images",
            ],
            rows,
        )
        + (
            _table(
                [
                    "site",
                    "train synthetic, test real: balanced acc / AUC",
                    "train real, test real: balanced acc / AUC",
                    "test patients",
                ],
                urows,
            )
            if any(site.get("utility") for site in sites.values())
            else "<p>No utility figures reported.</p>"
        )
    )
    if sample_images is not None and len(sample_images):
        names = list(class_names or [])
        labels = list(sample_labels) if sample_labels is not None else [None] * len(sample_images)
        titles = [
            names[int(y)] if names and y is not None and 0 <= int(y) < len(names) else str(y)
            for y in labels
        ]
        p.append(
            "<h2>Sample of the cohort</h2>"
            + _grid(np.asarray(sample_images)[:24], titles[:24], "a sample of synthetic images")
        )
    if audit.get("failures"):
        p.append(
            "<h2>Sites that did not answer</h2><ul>"
            + "".join(f"<li>{e(str(f))}</li>" for f in audit["failures"])
            + "</ul>"
        )
    p.append(
        "<h2>Definitions</h2><dl>"
        + "".join(
            f"<dt><b>{e(k.replace('_', ' '))}</b></dt><dd>{e(str(d))}</dd>"
            for k, d in audit.get("definitions", {}).items()
        )
        + "</dl>"
    )
    p.append(
        f"<p class='def'>All figures: audit.json (schema {e(str(audit['schema_version']))}).</p></body></html>"
    )
    return "\n".join(p)


def write_audit_report(
    audit: dict,
    out_dir: Path,
    *,
    sample_images: np.ndarray | None = None,
    sample_labels=None,
    class_names=None,
    flagged_images: dict[str, np.ndarray] | None = None,
) -> tuple[Path, Path]:
    """Write `out_dir/audit.json` (strict JSON) and a self-contained `out_dir/audit.html`, each atomically."""
    missing = [
        k
        for k in (
            "schema_version",
            "created_at",
            "confidence",
            "threat_model",
            "sites",
            "worst_case",
            "verdict",
        )
        if k not in audit
    ]
    if missing:
        raise ValueError(
            f"write_audit_report: the audit dict lacks {', '.join(missing)} (build it with build_audit)"
        )
    if audit["schema_version"] != AUDIT_SCHEMA_VERSION:
        raise ValueError(
            f"write_audit_report: audit schema {audit['schema_version']!r}, expected {AUDIT_SCHEMA_VERSION}"
        )
    audit = _json_safe(audit)
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / "audit.json", out_dir / "audit.html"
    page = _html(audit, sample_images, sample_labels, class_names, flagged_images)
    write_json_atomic(json_path, audit)
    write_text_atomic(html_path, page)
    return json_path, html_path


def load_audit(path: Path) -> dict:
    """Read an audit.json, checking its schema version."""
    try:
        audit = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable audit.json ({err})") from err
    if audit.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"{path}: audit schema {audit.get('schema_version')!r}, expected one of "
            f"{', '.join(READABLE_SCHEMA_VERSIONS)}"
        )
    return audit
