"""The audit's two HTML reports, rendered from an audit dict (privacy/audit_schema.py) with the Jinja2 templates
in privacy/templates/ (plots inline as base64 PNG, nothing loaded from elsewhere):

- the officers' report (`render_officer_report`, templates/officer_report.html.j2): every site's figures,
  per class and attack, the share tests, the distance histograms, and the synthetic images flagged as near-copies
  of a patient (to be withheld). For privacy officers only: a release keeps it under officers/.
- the partner report (`render_partner_report`, templates/partner_report.html.j2): what a partner may know about
  a released cohort: the audit's status, the gate's rules with their worst values, each site's privacy claim, how
  many images were withheld and why, and a sample grid drawn ONLY from the released images. No per-site audit
  figures, no flagged image, no image that is not in the release.

Both name the sha256 of the audit.json they were rendered from (`release build` renders them from the
audit.json it ships, so a report cannot disagree with its audit).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from common.io import write_text_atomic
from privacy.audit_schema import (
    REFERENCE_LABELS,
    attacks,
    audit_sha256,
    check_audit,
    eps_lower_bound,
    finite,
    fmt_number,
    json_safe,
    shares,
    utility,
    write_audit_json,
)
from privacy.verdict import (
    MEMBERSHIP_ALPHA,
    SHARE_ALPHA,
    THRESHOLDS,
    membership_tests,
    share_tests,
)

MAX_GRID = 48
SAMPLE_GRID = 24
TEMPLATES = Path(__file__).with_name("templates")
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["sentence"] = lambda s: str(s)[:1].upper() + str(s)[1:]
FIDELITY_KEYS = (
    "frechet_distance",
    "precision",
    "recall",
    "density",
    "coverage",
    "n_real",
    "n_synthetic",
)


# ---- plots (PNG data URIs) ----------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _txt(s: Any) -> str:
    """Text for matplotlib: '$' would start mathtext."""
    return str(s).replace("$", r"\$")


def _png(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _roc_points(res: dict) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) points of an attack: the fixed-FPR summary (schema 1.2) or a 1.0/1.1 downsampled curve."""
    pts = res.get("roc_at_fpr") or {}
    if pts.get("fpr"):
        fpr, tpr = np.asarray(pts["fpr"], float), np.asarray(pts["tpr"], dtype=float)
        ok = np.asarray(pts.get("resolvable") or [True] * len(fpr), bool) & np.isfinite(tpr)
        return np.r_[0.0, fpr[ok], 1.0], np.r_[0.0, tpr[ok], 1.0]
    curve = res.get("roc") or {}
    return np.asarray(curve.get("fpr") or [], float), np.asarray(curve.get("tpr") or [], float)


def _roc_plot(sites: dict) -> str:
    plt = _plt()
    kinds = [
        k
        for k in ("white_box", "calibrated", "black_box")
        if k != "calibrated"
        or any("calibrated" in (s.get("membership") or {}) for s in sites.values())
    ]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2))
    for ax, kind in zip(axes, kinds, strict=True):
        for name, site in sites.items():
            res = (site.get("membership") or {}).get(kind)
            if not res:
                continue
            fpr, tpr = _roc_points(res)
            if len(fpr) < 2:
                continue
            label = f"{name}: AUC {fmt_number(res.get('auc'), 2)}, {res.get('n_members')} / "
            ax.plot(fpr, tpr, marker="o", ms=3, label=_txt(label + f"{res.get('n_nonmembers')}"))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1.02),
            xlabel="false positive rate",
            ylabel="true positive rate",
            title=f"{kind.replace('_', '-')} attack: TPR at fixed FPR points",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="site: AUC, members / non-members", title_fontsize=7)
    return _png(fig)


def _epsilon_plot(sites: dict) -> str:
    plt = _plt()
    names = list(sites)
    claimed = [finite((s.get("claimed_privacy") or {}).get("epsilon")) for s in sites.values()]
    lbs = [max([eps_lower_bound(r) for _, _, r in attacks(s)], default=0.0) for s in sites.values()]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 3.2))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [c or 0 for c in claimed], 0.4, label="claimed epsilon", color="#4c72b0")
    ax.bar(x + 0.2, lbs, 0.4, label="empirical lower bound (95 %)", color="#dd8452")
    for xi, c in zip(x, claimed, strict=True):
        if c is None:
            ax.text(xi - 0.2, 0, "no formal\nguarantee", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [_txt(n)[:24] for n in names], fontsize=8)
    ax.set_ylabel("epsilon")
    ax.set_title("claimed epsilon vs empirical lower bound (the bound must stay below the claim)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


HIST_KINDS = (
    ("synthetic_to_member", "synthetic -> nearest member"),
    ("synthetic_to_nonmember", "synthetic -> nearest non-member"),
    ("real_nonmember_to_member", "real non-member -> nearest member (calibration)"),
)


def _hist_plot(name: str, mem: dict) -> str | None:
    """Histograms of one site's nearest-neighbour distances (schema 1.2: merged fixed bins per kind)."""
    blocks = [(s, (mem.get(s) or {}).get("histogram")) for s in ("pixel", "feature")]
    if not any(h for _, h in blocks):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, (space, h) in zip(axes, blocks, strict=True):
        if not h:
            ax.axis("off")
            continue
        parts = []
        for key, label in HIST_KINDS:
            part = h.get(key)
            if isinstance(part, dict):  # 1.2: {edges, counts} per kind (an open last edge is null)
                parts.append((label, [finite(e) for e in part["edges"]], part["counts"]))
            elif part:  # 1.0 / 1.1: shared edges
                parts.append((label, [finite(e) for e in h["edges"]], part))
        finite_edges = [e for _, edges, _ in parts for e in edges if e is not None]
        top = max(
            max(finite_edges, default=0.0) * 1.5, 0.1
        )  # where an open last bin is drawn to end
        for label, edges, counts in parts:
            e = np.asarray([top if v is None else min(v, top) for v in edges])
            c = np.asarray(counts, float)
            density = c / max(c.sum(), 1) / np.maximum(np.diff(e), 1e-9)
            ax.stairs(density, e, label=f"{label}, n={int(c.sum())}")
        ax.set(
            title=_txt(f"{name}: {space}-space distances"),
            xlabel=f"RMS distance (bins of >= {h.get('min_count', 1)} values; last one open)",
            ylabel="density",
        )
        ax.xaxis.label.set_size(8)
        ax.legend(fontsize=6)
    return _png(fig)


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


def image_grid(images, titles: list[str], cols: int = 8) -> str:
    """A grid of images (N, 1, H, W) or volumes (three mid-slices a tile) as a PNG data URI."""
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
    return _png(fig)


# ---- the tables ---------------------------------------------------------------------------------------------


def _cell(text: Any, bad: bool = False) -> dict:
    return {"text": str(text), "bad": bool(bad)}


def _ci(ci: Any) -> str:
    ok = isinstance(ci, (list, tuple)) and len(ci) == 2
    return f"[{fmt_number(ci[0])}, {fmt_number(ci[1])}]" if ok else "n/a"


def _privacy_rows(sites: dict) -> list[list]:
    rows = []
    for name, site in sites.items():
        cp = site.get("claimed_privacy") or {}
        claimed = finite(cp.get("epsilon"))
        lbs = {
            kind: max([eps_lower_bound(r) for _, k, r in attacks(site) if k == kind], default=None)
            for kind in ("white_box", "calibrated", "black_box")
        }
        worst = max([x for x in lbs.values() if x is not None], default=0.0)
        suspect = claimed is not None and worst > claimed
        status = (
            "suspect" if suspect else ("no formal guarantee" if claimed is None else "consistent")
        )
        rows.append(
            [
                name,
                cp.get("protection", "unknown"),
                fmt_number(claimed),
                fmt_number(cp.get("delta")),
                cp.get("accountant", ""),
                fmt_number(lbs["white_box"]),
                fmt_number(lbs["calibrated"]),
                fmt_number(lbs["black_box"]),
                _cell(status, suspect),
                f"{fmt_number(site.get('n_members'))} / {fmt_number(site.get('n_nonmembers'))}",
            ]
        )
    return rows


def _membership_rows(sites: dict, tests: dict) -> list[list]:
    """One row per membership attack; `tests`: privacy.verdict.membership_tests of the same sites."""
    rows = []
    for name, site in sites.items():
        for cls, kind, r in attacks(site):
            lb = r.get("epsilon_lower_bound") or {}
            res = r.get("resolvable") or {}
            counts = (
                f"TP {lb['true_positives']} / {lb['n_members_evaluated']}, FP "
                f"{lb['false_positives']} / {lb['n_nonmembers_evaluated']}"
                if "true_positives" in lb
                else str(lb.get("note", "n/a"))
            )
            need = r.get("nonmembers_needed") or {}
            pm = r.get("per_member") or {}
            per_member = (
                f"{pm.get('n_rejected_bh')} (BH) / {pm.get('n_rejected_holm')} (Holm) of "
                f"{fmt_number(pm.get('n_members'))}; smallest possible p {fmt_number(pm.get('smallest_possible_p'))}"
                + ("" if pm.get("holm_possible", True) else ", Holm unreachable")
                if pm
                else "n/a"
            )
            rows.append(
                [
                    name,
                    cls,
                    kind.replace("_", "-"),
                    fmt_number(r.get("auc")),
                    _ci(r.get("auc_ci")),
                    fmt_number(tests[(name, cls, kind)][1])
                    if (name, cls, kind) in tests
                    else "n/a",
                    fmt_number(r.get("tpr_at_fpr_1pct"))
                    + _unresolved(res, need, "tpr_at_fpr_1pct"),
                    fmt_number(r.get("tpr_at_fpr_0_1pct"))
                    + _unresolved(res, need, "tpr_at_fpr_0_1pct"),
                    per_member,
                    fmt_number(lb.get("epsilon_lower_bound")),
                    counts,
                    f"{fmt_number(r.get('n_members'))} / {fmt_number(r.get('n_nonmembers'))}",
                ]
            )
    return rows


def _unresolved(resolvable: dict, needed: dict, key: str) -> str:
    if resolvable.get(key, True):
        return ""
    return f" (unresolved: needs {needed[key]} non-members)" if key in needed else " (unresolved)"


def _power_rows(audit: dict) -> list[list]:
    """Per site: the one-run canary audit (its bound, counts and attack) and what every bound could reach at most
    (privacy/power.py, as the verdict judged it)."""
    power = (audit.get("verdict") or {}).get("power") or {}
    rows = []
    for name, site in (audit.get("sites") or {}).items():
        can = (site.get("membership") or {}).get("canaries") or {}
        p = power.get(name) or {}
        n = can.get("n_canaries") or 0
        rows.append(
            [
                name,
                f"{fmt_number(n)}"
                + (f" ({fmt_number(can.get('n_included'))} included)" if n else ""),
                can.get("attack") or can.get("note") or "n/a",
                f"{fmt_number(can.get('correct'))} / {fmt_number(can.get('guesses'))}"
                if n
                else "n/a",
                fmt_number(can.get("epsilon_lower_bound")),
                fmt_number(can.get("power")),
                fmt_number(p.get("holdout_power")),
                fmt_number(p.get("range_of_interest")),
                _cell(
                    "underpowered"
                    if p.get("underpowered")
                    else (
                        "not judged (no finite claim)"
                        if p.get("underpowered") is None
                        else "powered"
                    ),
                    bool(p.get("underpowered")),
                ),
            ]
        )
    return rows


def _memorization_blocks(sites: dict) -> list[dict]:
    tests = share_tests(sites)
    out = []
    for name, site in sites.items():
        m = site.get("memorization") or {}
        rows = []
        for cls, space, b in shares(site):
            p_raw, p_adj = tests.get((name, cls, space), (None, None))
            sig = p_adj is not None and p_adj < SHARE_ALPHA
            rows.append(
                [
                    cls,
                    space,
                    fmt_number(b.get("share_closer_to_member")),
                    _cell(
                        fmt_number(p_raw)
                        + (
                            f" (B = {fmt_number(b.get('n_permutations'))})"
                            if p_raw is not None
                            else " (no test: schema 1.0)"
                        ),
                        sig,
                    ),
                    fmt_number(p_adj),
                    f"{fmt_number(b.get('share_null_mean'), 2)} / "
                    f"{fmt_number(b.get('share_null_q95'), 2)}",
                    f"{fmt_number(b.get('n_distinct_nearest_members'))} / "
                    f"{fmt_number(b.get('n_distinct_nearest_nonmembers'))}",
                    _ci(b.get("share_ci95")),
                    fmt_number(b.get("n_near_copies")),
                    f"{fmt_number(b.get('n_synthetic'))} / {fmt_number(b.get('n_members'))} / "
                    f"{fmt_number(b.get('n_nonmembers'))}",
                ]
            )
        out.append(
            {
                "site": name,
                "n_near_copies": fmt_number(m.get("n_near_copies")),
                "rows": rows,
                "histogram": _hist_plot(name, m),
            }
        )
    return out


def _extraction_rows(sites: dict) -> list[list]:
    """One row per site: the extraction search by many samples (privacy/extraction.py)."""
    rows = []
    for name, site in sites.items():
        ext = (site.get("memorization") or {}).get("extraction")
        if not isinstance(ext, dict):
            rows.append([name, _cell("not run (older site)", True), "", "", "", "", ""])
            continue
        spaces = ext.get("spaces") or {}
        per_space = "; ".join(
            f"{sp}: {fmt_number((b.get('released') or {}).get('n_flagged'))} / "
            f"{fmt_number((b.get('drawn') or {}).get('n_flagged'))}"
            for sp, b in spaces.items()
        )
        lesion = ext.get("lesion_regions") or {}
        lesion_text = (
            f"{fmt_number(lesion.get('released_flagged'))} / {fmt_number(lesion.get('drawn_flagged'))} "
            f"({fmt_number(lesion.get('n_members_with_lesion_masks'))} training lesions compared)"
            if lesion.get("applicable")
            else f"not applicable: {lesion.get('why_not', 'no masks')}"
        )
        drawn = finite(ext.get("n_samples_drawn")) or 0
        rows.append(
            [
                name,
                _cell(
                    f"{fmt_number(drawn)} of {fmt_number(ext.get('samples_requested'))} asked "
                    f"(site limit {fmt_number(ext.get('max_extraction_samples'))})",
                    drawn == 0,
                ),
                _cell(
                    fmt_number(ext.get("n_released_flagged")), bool(ext.get("n_released_flagged"))
                ),
                _cell(fmt_number(ext.get("n_drawn_flagged")), bool(ext.get("n_drawn_flagged"))),
                fmt_number(ext.get("n_distinct_members_copied")),
                per_space,
                lesion_text,
            ]
        )
    return rows


def _class_rows(sites: dict, *, counts: bool) -> list[list]:
    """Per site and class: how membership was tested (counts for officers only)."""
    rows = []
    for name, site in sites.items():
        for cls, c in ((site.get("membership") or {}).get("class_coverage") or {}).items():
            status = str(c.get("status", "n/a"))
            row = [name, cls, _cell(status, status == "untestable")]
            if counts:
                row.insert(
                    2, f"{fmt_number(c.get('n_members'))} / {fmt_number(c.get('n_nonmembers'))}"
                )
            rows.append(row)
    return rows


def _fidelity_rows(sites: dict) -> list[list]:
    rows = []
    for name, site in sites.items():
        fid = site.get("fidelity") or {}
        blocks = [("all", fid.get("overall") or {})] + list((fid.get("per_class") or {}).items())
        for cls, f in blocks:
            rows.append([name, cls] + [fmt_number(f.get(k)) for k in FIDELITY_KEYS])
        for ref, f in (fid.get("reference") or {}).items():  # what real images reach, for scale
            label = "reference: " + REFERENCE_LABELS.get(ref, ref)
            rows.append([name, label] + [fmt_number(f.get(k)) for k in FIDELITY_KEYS])
    return rows


def _utility_rows(sites: dict) -> list[list]:
    """One row per site and classifier: TSTR, TRTR, and (CNN) the share of each class's synthetic images the
    real-trained CNN recognises, beside the same share on the real hold-out."""

    def score(d: dict) -> str:
        return f"{fmt_number(d.get('balanced_accuracy'))} / {fmt_number(d.get('auc'))}"

    rows = []
    for name, site in sites.items():
        u = utility(site)
        if not u:
            continue
        blocks = [("radiomics logistic regression", u)]
        if "cnn" in u:
            blocks.append(("small CNN on images", u["cnn"]))
        for label, b in blocks:
            rec, ref = b.get("recognised") or {}, b.get("recognised_holdout") or {}
            shares = "; ".join(
                f"{cls} {fmt_number(v)} (hold-out {fmt_number(ref.get(cls))})"
                for cls, v in rec.items()
            )
            rows.append(
                [
                    name,
                    label,
                    score(b.get("train_synthetic_test_real") or {}),
                    score(b.get("train_real_test_real") or {}),
                    shares or "-",
                    fmt_number(b.get("n_test")),
                ]
            )
    return rows


def _worst_rows(audit: dict, *, where: bool) -> list[list]:
    rows = []
    for key, w in (audit.get("worst_case") or {}).items():
        row = [key.replace("_", " "), fmt_number(w.get("value"))]
        if where:
            row.append(
                ", ".join(f"{k} {w[k]}" for k in ("site", "class", "attack", "space") if k in w)
            )
        rows.append(row + [fmt_number(THRESHOLDS[key]) if key in THRESHOLDS else "none"])
    return rows


def _common(audit: dict, source_sha256: str | None) -> dict:
    check_audit(audit)
    v = audit["verdict"]
    cohort = audit.get("cohort") or {}
    central = (audit.get("run") or {}).get("central_dp") or {}
    return {
        "status": v["status"],
        "confidence": f"{audit['confidence']:.0%}",
        "cohort": {
            "n_images": fmt_number(cohort.get("n_images")),
            "classes": ", ".join(map(str, cohort.get("class_names") or [])),
            "checkpoint": str(cohort.get("checkpoint_sha256") or "")[:16],
            "run_id": str(cohort.get("run_id") or ""),
        },
        "created_at": audit["created_at"],
        "rendered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "schema_version": audit["schema_version"],
        "source_sha256": source_sha256 or "",
        "threat_model": audit["threat_model"],
        "definitions": audit.get("definitions") or {},
        "central": central,
        "central_epsilon": fmt_number(finite(central.get("epsilon"))),
        "experiment": str(cohort.get("experiment") or ""),
        "power_rows": _power_rows(audit),
        "fmt": fmt_number,
    }


# ---- the reports --------------------------------------------------------------------------------------------


def render_officer_report(
    audit: dict,
    *,
    flagged_images: Mapping[str, np.ndarray] | None = None,
    source_sha256: str | None = None,
) -> str:
    """The officers' report: every site's figures and the flagged images (for officers only)."""
    audit = json_safe(audit)
    sites = audit["sites"]
    flagged = dict(flagged_images or {})
    shown = list(flagged)[:MAX_GRID]
    n_tests = len(share_tests(sites))
    mtests = membership_tests(sites)
    return _ENV.get_template("officer_report.html.j2").render(
        **_common(audit, source_sha256),
        verdict=audit["verdict"],
        thresholds=audit["verdict"].get("thresholds") or THRESHOLDS,
        share_alpha=SHARE_ALPHA,
        n_share_tests=n_tests,
        membership_alpha=MEMBERSHIP_ALPHA,
        n_membership_tests=len(mtests),
        privacy_rows=_privacy_rows(sites),
        epsilon_plot=_epsilon_plot(sites) if sites else None,
        worst_rows=_worst_rows(audit, where=True),
        roc_plot=_roc_plot(sites) if sites else None,
        membership_rows=_membership_rows(sites, mtests),
        memorization=_memorization_blocks(sites),
        extraction_rows=_extraction_rows(sites),
        class_rows=_class_rows(sites, counts=True),
        n_flagged=len(flagged),
        flagged_grid=image_grid(np.stack([np.asarray(flagged[k]) for k in shown]), shown)
        if shown
        else None,
        n_flagged_shown=len(shown),
        fidelity_rows=_fidelity_rows(sites),
        utility_rows=_utility_rows(sites),
        failures=audit.get("failures") or [],
    )


def render_partner_report(
    audit: dict,
    *,
    gate: dict,
    released_images: np.ndarray | None,
    released_labels=None,
    class_names=None,
    withheld_count: int = 0,
    n_released: int | None = None,
    source_sha256: str | None = None,
) -> str:
    """The partner report: aggregates only, and a sample grid drawn from `released_images`, which the caller
    takes from the released cohort (never the audited one)."""
    audit = json_safe(audit)
    names = list(class_names or [])
    grid = None
    if released_images is not None and len(released_images):
        labels = (
            list(released_labels) if released_labels is not None else [None] * len(released_images)
        )
        titles = [
            names[int(y)] if y is not None and 0 <= int(y) < len(names) else str(y) for y in labels
        ]
        grid = image_grid(np.asarray(released_images)[:SAMPLE_GRID], titles[:SAMPLE_GRID])
    claims = [
        [
            name,
            (s.get("claimed_privacy") or {}).get("protection", "unknown"),
            fmt_number(finite((s.get("claimed_privacy") or {}).get("epsilon"))),
            fmt_number((s.get("claimed_privacy") or {}).get("delta")),
        ]
        for name, s in audit["sites"].items()
    ]
    rules = [
        [
            r.get("rule", ""),
            fmt_number(r.get("measured"))
            if not isinstance(r.get("measured"), str)
            else r["measured"],
            fmt_number(r.get("threshold"))
            if not isinstance(r.get("threshold"), str)
            else r["threshold"],
            _cell("pass" if r.get("passed") else "FAIL", not r.get("passed")),
        ]
        for r in gate.get("rules") or []
    ]
    judged = next((r for r in gate.get("rules") or [] if r.get("rule") == "audit_verdict"), {})
    return _ENV.get_template("partner_report.html.j2").render(
        **_common(audit, source_sha256),
        gate_passed=bool(gate.get("passed")),
        released_verdict=str(judged.get("measured") or audit["verdict"]["status"]),
        rules=rules,
        claims=claims,
        withheld_count=int(withheld_count),
        n_released=fmt_number(n_released),
        sample_grid=grid,
        n_sample=min(SAMPLE_GRID, 0 if released_images is None else len(released_images)),
        n_sites=len(audit["sites"]),
        extraction_rows=[r[:4] + r[5:] for r in _extraction_rows(audit["sites"])],
        class_rows=_class_rows(audit["sites"], counts=False),
        n_failures=len(audit.get("failures") or []),
    )


def write_audit_report(
    audit: dict, out_dir: Path, *, flagged_images: Mapping[str, np.ndarray] | None = None
) -> tuple[Path, Path]:
    """Write `out_dir/audit.json` (strict JSON) and the officers' `out_dir/audit.html` rendered from it, each
    atomically. The report names the audit.json's sha256."""
    out_dir = Path(out_dir)
    json_path = write_audit_json(out_dir / "audit.json", audit)
    page = render_officer_report(
        audit, flagged_images=flagged_images, source_sha256=audit_sha256(json_path)
    )
    html_path = out_dir / "audit.html"
    write_text_atomic(html_path, page)
    return json_path, html_path
