"""The audit report for privacy officers: `audit.json` (versioned, every figure with its definition) and a
self-contained `audit.html` (plots inline) that reads without code.

audit.json (schema 1.0):
    schema_version, created_at, confidence
    threat_model: {black_box, white_box, out_of_scope}
    cohort: {path, n_images, class_names, checkpoint_sha256, run_id}
    definitions: {figure name: what it means}
    sites: {site: {n_members, n_nonmembers,
                   claimed_privacy: {protection, epsilon, delta, accountant, ...}   (from the site's ledger)
                   memorization: {pixel: {...}, feature: {...}, per_class: {...}, flagged_ids, n_near_copies, ...}
                   membership: {white_box: ROC + epsilon_lower_bound, black_box: ..., per_class: {class: {...}}}
                   fidelity: {overall: {frechet_distance, precision, recall, density, coverage}, per_class: {...}}
                   utility: {train_synthetic_test_real: {...}, train_real_test_real: {...}}}}
    worst_case: {membership_auc, tpr_at_fpr_1pct, epsilon_lower_bound, n_near_copies, share_closer_to_member,
                 ... each with the site and class it comes from}
    failures: [sites that did not answer]
    flags: [human-readable findings]
    verdict: {status: pass | review | fail, reasons: [...], thresholds: {...}}
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

AUDIT_SCHEMA_VERSION = "1.0"
CONFIDENCE = 0.95
# Review thresholds of the audit itself; the consortium's release policy (server/release.py) sets binding ones.
# A figure from fewer records than this (per side) is reported but not used for the worst case: one member and one
# non-member give an AUC of 0 or 1 by chance.
MIN_RECORDS = 10
REVIEW_THRESHOLDS = {"membership_auc": 0.6, "tpr_at_fpr_1pct": 0.05, "n_near_copies": 0, "share_closer_to_member": 0.65}

THREAT_MODEL = {
    "black_box": "an honest-but-curious server or any partner who receives the released cohort (images only)",
    "white_box": "an auditor holding the global model's weights, bounding what the model itself leaks",
    "out_of_scope": "a malicious server forging messages; sites poisoning the model",
}

DEFINITIONS = {
    "membership_auc": "area under the ROC curve of a membership-inference attack separating a site's training "
                      "patients (members) from its hold-out patients (non-members); 0.5 = no better than chance",
    "tpr_at_fpr_1pct": "share of members the attack identifies while wrongly accusing at most 1 % of non-members",
    "white_box": "attack score: minus the diffusion loss of the record under the global model at fixed timesteps",
    "black_box": "attack score: minus the distance from the record to the closest synthetic image",
    "epsilon_lower_bound": "a lower bound on epsilon at 95 % confidence implied by the best attack threshold "
                           "(chosen on half the records, Clopper-Pearson bounds on the other half); above the "
                           "claimed epsilon means the DP implementation is suspect",
    "share_closer_to_member": "share of synthetic images closer to a training patient than to any hold-out "
                              "patient, with equal set sizes; about 0.5 when nothing is memorised",
    "near_copy": "a synthetic image closer to a training patient than 99 % of real patients are to their nearest "
                 "other patient, and at most half as far from it as from any hold-out patient",
    "frechet_distance": "distance between Gaussian fits of radiomics features (real vs synthetic); 0 = identical",
    "precision_recall": "precision: synthetic images inside the real feature manifold; recall: real images "
                        "covered by the synthetic manifold (k-NN balls)",
    "utility": "balanced accuracy / AUC of a classifier trained on the synthetic cohort and tested on a site's "
               "hold-out (train-synthetic-test-real), beside one trained on the site's own training data",
}


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _attacks(site: dict) -> list[tuple[str, str, dict]]:
    """(class or 'all', attack kind, result) for every attack the site ran."""
    mem = site.get("membership", {})
    out = [("all", kind, mem[kind]) for kind in ("white_box", "black_box") if kind in mem]
    for cls, per in mem.get("per_class", {}).items():
        out += [(cls, kind, per[kind]) for kind in ("white_box", "black_box") if kind in per]
    return out


def _worst(sites: dict[str, dict]) -> dict[str, Any]:
    worst: dict[str, Any] = {}

    def consider(key: str, value: Any, where: dict) -> None:
        v = _finite(value)
        if v is not None and (key not in worst or v > worst[key]["value"]):
            worst[key] = {"value": v, **where}

    for name, site in sites.items():
        for cls, kind, res in _attacks(site):
            if min(res.get("n_members", 0), res.get("n_nonmembers", 0)) < MIN_RECORDS:
                continue
            where = {"site": name, "class": cls, "attack": kind}
            consider("membership_auc", res.get("auc"), where)
            consider("tpr_at_fpr_1pct", res.get("tpr_at_fpr_1pct"), where)
            consider("epsilon_lower_bound", res.get("epsilon_lower_bound", {}).get("epsilon_lower_bound"), where)
        m = site.get("memorization", {})
        consider("n_near_copies", m.get("n_near_copies"), {"site": name, "class": "all"})
        consider("share_closer_to_member", m.get("share_closer_to_member"), {"site": name, "class": "all"})
        for cls, per in m.get("per_class", {}).items():
            if per.get("n_synthetic", 0) >= MIN_RECORDS and per.get("n_nonmembers", 0) >= MIN_RECORDS:
                consider("share_closer_to_member", per.get("share_closer_to_member"), {"site": name, "class": cls})
        consider("claimed_epsilon", site.get("claimed_privacy", {}).get("epsilon"), {"site": name})
        fid = site.get("fidelity", {})
        consider("frechet_distance", fid.get("overall", {}).get("frechet_distance"), {"site": name, "class": "all"})
        for cls, per in fid.get("per_class", {}).items():
            consider("frechet_distance", per.get("frechet_distance"), {"site": name, "class": cls})
    return worst


def build_audit(site_results: dict[str, dict], *, cohort: dict, failures: list[str] | None = None,
                run_record: dict | None = None) -> dict[str, Any]:
    failures = list(failures or [])
    flags: list[str] = []
    suspect = []
    for name, site in site_results.items():
        claimed = _finite(site.get("claimed_privacy", {}).get("epsilon"))
        for cls, kind, res in _attacks(site):
            lb = _finite(res.get("epsilon_lower_bound", {}).get("epsilon_lower_bound")) or 0.0
            if claimed is not None and lb > claimed:
                suspect.append(f"{name} ({kind}, class {cls}): empirical epsilon lower bound {lb:.2f} exceeds the "
                               f"claimed epsilon {claimed:.2f}: the DP implementation is suspect")
        if claimed is None:
            flags.append(f"{name}: no finite formal privacy guarantee (protection: "
                         f"{site.get('claimed_privacy', {}).get('protection', 'unknown')})")
    worst = _worst(site_results)
    reasons = list(suspect)
    small = [f"{name} ({cls}, {kind})" for name, site in site_results.items() for cls, kind, res in _attacks(site)
             if min(res.get("n_members", 0), res.get("n_nonmembers", 0)) < MIN_RECORDS]
    if small:
        flags.append(f"membership figures from fewer than {MIN_RECORDS} members or non-members are shown but not "
                     f"used for the worst case: {', '.join(small)}")
    if site_results and "membership_auc" not in worst:
        reasons.append(f"no site has {MIN_RECORDS}+ members and non-members: membership inference cannot be assessed")
    for key, limit in REVIEW_THRESHOLDS.items():
        if key in worst and worst[key]["value"] > limit:
            w = worst[key]
            reasons.append(f"{key} = {w['value']:.3g} at {w.get('site')} (class {w.get('class', 'all')}) "
                           f"exceeds the review threshold {limit}")
    if failures:
        flags.append(f"no audit from: {'; '.join(failures)}")
    status = "fail" if suspect else ("review" if reasons or failures or not site_results else "pass")
    return {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "confidence": CONFIDENCE,
        "threat_model": THREAT_MODEL,
        "definitions": DEFINITIONS,
        "cohort": cohort,
        "run": {k: run_record.get(k) for k in ("run_id", "status", "autoencoder", "diffusion_warm_start",
                                               "completed_round")} if run_record else {},
        "sites": site_results,
        "worst_case": worst,
        "failures": failures,
        "flags": flags + reasons,
        "verdict": {"status": status, "reasons": reasons or ["no finding above the review thresholds"],
                    "thresholds": REVIEW_THRESHOLDS, "dp_suspect": bool(suspect)},
    }


# ---- HTML ------------------------------------------------------------------------------------------------------

def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plots():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _roc_plot(sites: dict) -> str:
    plt = _plots()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("white_box", "black_box")):
        for name, site in sites.items():
            res = site.get("membership", {}).get(kind)
            if not res or not res.get("roc", {}).get("fpr"):
                continue
            fpr = np.maximum(np.asarray(res["roc"]["fpr"]), 1e-3)
            tpr = np.maximum(np.asarray(res["roc"]["tpr"]), 1e-3)
            ax.plot(fpr, tpr, label=f"{name} (AUC {res['auc']:.2f})")
        ax.plot([1e-3, 1], [1e-3, 1], "k--", lw=0.8, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"{kind.replace('_', '-')} membership inference")
        ax.legend(fontsize=7)
    return _png(fig)


def _hist_plot(name: str, mem: dict) -> str:
    plt = _plots()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, space in zip(axes, ("pixel", "feature")):
        h = mem.get(space, {}).get("histogram")
        if not h:
            continue
        edges = np.asarray(h["edges"])
        centers = (edges[1:] + edges[:-1]) / 2
        w = edges[1] - edges[0]
        for key, label in (("synthetic_to_member", "synthetic -> nearest member"),
                           ("synthetic_to_nonmember", "synthetic -> nearest non-member"),
                           ("real_nonmember_to_member", "real non-member -> nearest member")):
            counts = np.asarray(h[key], float)
            ax.step(centers, counts / max(counts.sum(), 1), where="mid", label=label)
        ax.axvline(mem[space]["near_copy_threshold"], color="red", ls=":", label="near-copy threshold")
        ax.set_title(f"{name}: {space}-space distances (w={w:.3f})")
        ax.set_xlabel("RMS distance")
        ax.legend(fontsize=7)
    return _png(fig)


def _grid(images: np.ndarray, titles: list[str], cols: int = 8) -> str:
    plt = _plots()
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), images, titles):
        img = img[0] if img.ndim > 2 else img
        if img.ndim == 3:
            img = img[:, :, img.shape[2] // 2]
        ax.imshow(np.rot90(img), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=6)
    return _png(fig)


def _fmt(v: Any) -> str:
    f = _finite(v)
    if f is None:
        return html.escape(str(v)) if v is not None else "n/a"
    return f"{f:.3g}"


def write_audit_report(audit: dict, out_dir: Path, *, sample_images: np.ndarray | None = None, sample_labels=None,
                       class_names=None, flagged_images: dict[str, np.ndarray] | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / "audit.json", out_dir / "audit.html"
    write_json_atomic(json_path, audit)
    e = html.escape
    v = audit["verdict"]
    color = {"pass": "#1b7f3b", "review": "#a66b00", "fail": "#b00020"}.get(v["status"], "#444")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedsynth audit report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
        "th{background:#f2f2f2}.verdict{padding:1em;border-radius:6px;color:#fff}.def{color:#555;font-size:13px}"
        "</style></head><body>",
        "<h1>Privacy audit of a synthetic cohort</h1>",
        f"<div class='verdict' id='verdict' style='background:{color}'><h2>Verdict: {e(v['status'].upper())}</h2><ul>"
        + "".join(f"<li>{e(r)}</li>" for r in v["reasons"]) + "</ul></div>",
        f"<p>Cohort: {e(str(audit['cohort'].get('n_images')))} images, classes "
        f"{e(', '.join(audit['cohort'].get('class_names', [])))}; checkpoint sha256 "
        f"<code>{e(str(audit['cohort'].get('checkpoint_sha256', ''))[:16])}</code>; run "
        f"{e(str(audit['cohort'].get('run_id', '')))}. Report created {e(audit['created_at'])}; "
        f"confidence level {audit['confidence']:.0%}.</p>",
        "<h2>Threat model</h2><ul>" + "".join(f"<li><b>{e(k)}</b>: {e(t)}</li>" for k, t in audit["threat_model"].items()) + "</ul>",
        "<h2>Privacy spend per site</h2><table><tr><th>site</th><th>kind of protection</th><th>claimed epsilon</th>"
        "<th>delta</th><th>accountant</th><th>empirical epsilon lower bound (max over attacks)</th>"
        "<th>members / non-members</th></tr>",
    ]
    for name, site in audit["sites"].items():
        cp = site.get("claimed_privacy", {})
        lbs = [_finite(r.get("epsilon_lower_bound", {}).get("epsilon_lower_bound")) or 0 for _, _, r in _attacks(site)]
        parts.append(f"<tr><td>{e(name)}</td><td>{e(str(cp.get('protection', 'unknown')))}</td>"
                     f"<td>{_fmt(cp.get('epsilon'))}</td><td>{_fmt(cp.get('delta'))}</td>"
                     f"<td>{e(str(cp.get('accountant', '')))}</td><td>{_fmt(max(lbs, default=0))}</td>"
                     f"<td>{site.get('n_members')} / {site.get('n_nonmembers')}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Worst case across sites and classes</h2><table><tr><th>figure</th><th>value</th><th>where</th>"
                 "<th>review threshold</th></tr>")
    for key, w in audit["worst_case"].items():
        where = ", ".join(f"{k} {w[k]}" for k in ("site", "class", "attack") if k in w)
        parts.append(f"<tr><td>{e(key)}</td><td>{_fmt(w['value'])}</td><td>{e(where)}</td>"
                     f"<td>{_fmt(REVIEW_THRESHOLDS.get(key, ''))}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Membership inference</h2><p class='def'>" + e(DEFINITIONS["membership_auc"]) + ". "
                 + e(DEFINITIONS["epsilon_lower_bound"]) + ".</p>" + _roc_plot(audit["sites"]))
    parts.append("<table><tr><th>site</th><th>class</th><th>attack</th><th>AUC</th><th>TPR @ 1% FPR</th>"
                 "<th>TPR @ 0.1% FPR</th><th>eps lower bound</th><th>members / non-members</th></tr>")
    for name, site in audit["sites"].items():
        for cls, kind, r in _attacks(site):
            parts.append(f"<tr><td>{e(name)}</td><td>{e(cls)}</td><td>{e(kind)}</td><td>{_fmt(r.get('auc'))}</td>"
                         f"<td>{_fmt(r.get('tpr_at_fpr_1pct'))}</td><td>{_fmt(r.get('tpr_at_fpr_0_1pct'))}</td>"
                         f"<td>{_fmt(r.get('epsilon_lower_bound', {}).get('epsilon_lower_bound'))}</td>"
                         f"<td>{r.get('n_members')} / {r.get('n_nonmembers')}</td></tr>")
    parts.append("</table><h2>Memorization</h2><p class='def'>" + e(DEFINITIONS["share_closer_to_member"]) + ". "
                 + e(DEFINITIONS["near_copy"]) + ".</p>")
    for name, site in audit["sites"].items():
        m = site.get("memorization", {})
        parts.append(f"<h3>{e(name)}</h3><p>share closer to a member: {_fmt(m.get('share_closer_to_member'))} "
                     f"(95% CI {', '.join(_fmt(x) for x in m.get('pixel', {}).get('share_ci95', []))}); "
                     f"near-copies: {m.get('n_near_copies', 'n/a')}</p>" + _hist_plot(name, m))
    if flagged_images:
        parts.append("<h2>Flagged synthetic images (withheld from release)</h2>"
                     + _grid(np.stack(list(flagged_images.values())), list(flagged_images)))
    else:
        parts.append("<h2>Flagged synthetic images</h2><p>None.</p>")
    parts.append("<h2>Fidelity and utility</h2><p class='def'>" + e(DEFINITIONS["frechet_distance"]) + ". "
                 + e(DEFINITIONS["precision_recall"]) + ". " + e(DEFINITIONS["utility"]) + ".</p><table><tr><th>site</th>"
                 "<th>class</th><th>Frechet distance</th><th>precision</th><th>recall</th><th>density</th><th>coverage</th></tr>")
    for name, site in audit["sites"].items():
        fid = site.get("fidelity", {})
        for cls, f in [("all", fid.get("overall", {}))] + list(fid.get("per_class", {}).items()):
            parts.append(f"<tr><td>{e(name)}</td><td>{e(cls)}</td>" + "".join(
                f"<td>{_fmt(f.get(k))}</td>" for k in ("frechet_distance", "precision", "recall", "density", "coverage")) + "</tr>")
    parts.append("</table><table><tr><th>site</th><th>train synthetic, test real: balanced acc / AUC</th>"
                 "<th>train real, test real: balanced acc / AUC</th></tr>")
    for name, site in audit["sites"].items():
        u = site.get("utility", {})
        ts, tr = u.get("train_synthetic_test_real", {}), u.get("train_real_test_real", {})
        parts.append(f"<tr><td>{e(name)}</td><td>{_fmt(ts.get('balanced_accuracy'))} / {_fmt(ts.get('auc'))}</td>"
                     f"<td>{_fmt(tr.get('balanced_accuracy'))} / {_fmt(tr.get('auc'))}</td></tr>")
    parts.append("</table>")
    if sample_images is not None and len(sample_images):
        names = list(class_names or [])
        titles = [names[int(y)] if names else str(int(y)) for y in (sample_labels if sample_labels is not None else [0] * len(sample_images))]
        parts.append("<h2>Sample of the cohort</h2>" + _grid(np.asarray(sample_images)[:24], titles[:24]))
    if audit.get("failures"):
        parts.append("<h2>Sites that did not answer</h2><ul>" + "".join(f"<li>{e(f)}</li>" for f in audit["failures"]) + "</ul>")
    parts.append("<p class='def'>Full figures and definitions: audit.json (schema "
                 f"{e(audit['schema_version'])}).</p></body></html>")
    write_text_atomic(html_path, "\n".join(parts))
    return json_path, html_path


def load_audit(path: Path) -> dict:
    audit = json.loads(Path(path).read_text())
    if audit.get("schema_version") != AUDIT_SCHEMA_VERSION:
        raise ValueError(f"{path}: audit schema {audit.get('schema_version')!r}, expected {AUDIT_SCHEMA_VERSION}")
    return audit
