"""Release candidates: a cohort that passed (or failed) the policy gate, signed by the consortium, then approved
or rejected by privacy officers, each with their own key.

A release candidate is a folder:
    cohort/           the cohort minus the withheld near-copies: images/, labels.csv and dataset.json without them,
                      preview.png redrawn from the released images when a withheld one was in it; manifest.json is
                      the ORIGINAL cohort manifest, kept for provenance (it no longer matches the files that were
                      withheld or rewritten: release.json is what verifies the release)
    audit/report.html the partner report, rendered at build from officers/audit.json: aggregates only, and a
                      sample grid drawn from the RELEASED images (privacy.report.render_partner_report)
    officers/         for privacy officers only (the portal serves it to officers and admins; `fedsynth pull`
                      never downloads it): audit.json, byte for byte as the sites' audit wrote it, and audit.html,
                      the officers' report rendered at build from that audit.json, with the flagged images
    policy.toml       the policy the gate applied
    gate.json         the gate's result (privacy.policy.GateResult.to_dict())
    release.json      the release manifest (format fedsynth-release/1): sha256 of every file above, the gate,
                      the withheld ids, each site's privacy claim, the consortium key's fingerprint, the officers
                      allowed to approve (name -> public key PEM) and how many approvals are required
    release.sig       base64 Ed25519 signature of the exact bytes of release.json by the consortium key
    approvals/        <officer>.json: {"statement": JSON text, "signature": base64}; outside release.json, so
                      officers sign after the consortium and their approvals travel with the release
The consortium's signature vouches for the officers' keys; an officer's signature covers the sha256 of
release.json, so it approves exactly one release.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.io import atomic_dir, sha256_file, write_json_atomic
from common.signing import (
    fingerprint,
    load_private_key,
    load_public_key,
    public_key_pem,
    sign,
    verify,
)
from server.release.access import may_read_file

if (
    TYPE_CHECKING
):  # building a release needs numpy, nibabel and the audit; verifying one (a partner) does not
    from privacy.policy import GateResult, Policy

RELEASE_FORMAT = "fedsynth-release/1"
APPROVAL_FORMAT = "fedsynth-approval/1"
# Officer names and cohort ids: safe in paths and URLs. \Z, not $: "$" also matches before a trailing newline.
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
# One relative path inside a release: segments of safe characters, none of them "." or "..".
REL_PATH = re.compile(
    r"\A(?!/)(?:[A-Za-z0-9_][A-Za-z0-9._-]{0,199})(?:/[A-Za-z0-9_][A-Za-z0-9._-]{0,199}){0,7}\Z"
)
APPROVAL_FILE = re.compile(r"\Aapprovals/[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.json\Z")
UNSIGNED = ("release.json", "release.sig")
PARTNER_REPORT = "audit/report.html"  # what a partner reads about the audit
AUDIT_JSON = "officers/audit.json"  # the sites' audit: officers only
OFFICER_REPORT = "officers/audit.html"


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(
            f"{kind} {name!r}: use letters, digits, '.', '_' or '-' (at most 100, not starting with "
            "'.' or '-')"
        )
    return name


def safe_rel_path(rel: str) -> bool:
    """True for a plain relative path inside a release: no '..', no absolute path, no backslash, no odd bytes."""
    return isinstance(rel, str) and bool(REL_PATH.match(rel)) and ".." not in rel.split("/")


def manifest_bytes(manifest: dict) -> bytes:
    """The exact bytes release.json holds for a manifest (what the consortium signs)."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ---- building a candidate -------------------------------------------------------------------------------------


def _read_cohort(cohort_dir: Path) -> tuple[dict, list[dict], dict]:
    from server.synthesis import verify_cohort

    problems = verify_cohort(cohort_dir)
    if problems:
        raise ValueError(
            f"{cohort_dir}: the cohort does not verify against its manifest: "
            + "; ".join(problems[:10])
        )
    manifest = json.loads((cohort_dir / "manifest.json").read_text())
    with open(cohort_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if any(set(r) < {"synthetic_id", "class"} or not r["synthetic_id"] for r in rows) or not rows:
        raise ValueError(f"{cohort_dir / 'labels.csv'}: expected rows of synthetic_id,class")
    try:
        dataset = json.loads((cohort_dir / "dataset.json").read_text())
    except ValueError as err:
        raise ValueError(f"{cohort_dir / 'dataset.json'}: not valid JSON ({err})") from err
    return manifest, rows, dataset


def _read_audit(audit_dir: Path, manifest: dict, ids: set[str], cohort_dir: Path) -> dict:
    path = audit_dir / "audit.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing (the audit of the cohort must come with the release)")
    from privacy.audit_schema import load_audit

    audit = load_audit(path)
    if not isinstance(audit.get("sites"), dict) or not isinstance(audit.get("cohort"), dict):
        raise ValueError(f"{path}: not a valid audit (no 'sites' or 'cohort' object)")
    audited = audit["cohort"].get("checkpoint_sha256")
    expected = (manifest.get("checkpoint") or {}).get("sha256")
    if not audited or audited != expected:
        raise ValueError(
            f"{path}: audits a cohort from checkpoint sha256 {audited!r}, but "
            f"{cohort_dir / 'manifest.json'} says {expected!r}: not this cohort's audit"
        )
    for site in audit["sites"].values():
        unknown = set(map(str, ((site.get("memorization") or {}).get("flagged_ids") or []))) - ids
        if unknown:
            raise ValueError(
                f"{path}: flags synthetic ids that are not in {cohort_dir}: {sorted(unknown)[:5]}"
            )
    return audit


def _write_cohort(
    src: Path, dst: Path, manifest: dict, rows: list[dict], dataset: dict, withheld: set[str]
) -> None:
    """Copy the cohort without the withheld images, rewriting labels.csv and dataset.json and, when a withheld
    image was in the preview, redrawing it from the released images."""
    import numpy as np

    from server.synthesis import PREVIEW_PER_ROW, load_image, write_preview

    (dst / "images").mkdir(parents=True)
    kept = [r for r in rows if r["synthetic_id"] not in withheld]
    for r in kept:
        name = f"{r['synthetic_id']}.nii.gz"
        shutil.copy2(src / "images" / name, dst / "images" / name)
    with open(dst / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=list(rows[0].keys()) if rows else ["synthetic_id", "class"]
        )
        w.writeheader()
        w.writerows(kept)
    gone = {f"images/{sid}.nii.gz" for sid in withheld}
    training = [e for e in dataset.get("training", []) if e.get("image") not in gone]
    (dst / "dataset.json").write_text(
        json.dumps({**dataset, "training": training, "numTraining": len(training)}, indent=2)
    )
    shutil.copy2(src / "manifest.json", dst / "manifest.json")
    if not (src / "preview.png").exists():
        return
    class_names = list(manifest.get("class_names") or sorted({r["class"] for r in rows}))
    in_preview = {
        r["synthetic_id"]
        for c in class_names
        for r in [r for r in rows if r["class"] == c][:PREVIEW_PER_ROW]
    }
    if not in_preview & withheld:
        shutil.copy2(src / "preview.png", dst / "preview.png")
    elif kept:
        shown = [
            r for c in class_names for r in [r for r in kept if r["class"] == c][:PREVIEW_PER_ROW]
        ]
        images = np.stack(
            [
                load_image(
                    src / "images" / f"{r['synthetic_id']}.nii.gz",
                    int(manifest["model_config"]["spatial_dims"]),
                )
                for r in shown
            ]
        )
        labels = np.array([class_names.index(r["class"]) for r in shown])
        write_preview(dst / "preview.png", images, labels, tuple(class_names))


def _write_reports(
    tmp: Path,
    cohort_dir: Path,
    audit_json: Path,
    audit: dict,
    gate: GateResult,
    manifest: dict,
    rows: list[dict],
    withheld: set[str],
) -> str:
    """officers/audit.json (the sites' audit, byte for byte), officers/audit.html and audit/report.html, both
    rendered now from that audit.json; returns its sha256. The partner report's sample grid is read from the
    released cohort just written (tmp/cohort), so no withheld image can reach it."""
    import numpy as np

    from privacy.audit_schema import audit_sha256
    from privacy.report import render_officer_report, render_partner_report
    from server.synthesis import load_image

    dims = int(manifest["model_config"]["spatial_dims"])
    (tmp / "officers").mkdir()
    shutil.copyfile(audit_json, tmp / AUDIT_JSON)
    sha = audit_sha256(tmp / AUDIT_JSON)
    flagged = {
        sid: load_image(cohort_dir / "images" / f"{sid}.nii.gz", dims)
        for sid in sorted(set(gate.withheld_ids) | _all_flagged(audit))
    }
    (tmp / OFFICER_REPORT).write_text(
        render_officer_report(audit, flagged_images=flagged, source_sha256=sha), encoding="utf-8"
    )
    class_names = list(manifest.get("class_names") or sorted({r["class"] for r in rows}))
    kept = [r for r in rows if r["synthetic_id"] not in withheld]
    released = (tmp / "cohort" / "images").glob("*.nii.gz")
    on_disk = {p.name[: -len(".nii.gz")] for p in released}
    sample = [r for r in kept if r["synthetic_id"] in on_disk][:24]
    images = (
        np.stack(
            [
                load_image(tmp / "cohort" / "images" / f"{r['synthetic_id']}.nii.gz", dims)
                for r in sample
            ]
        )
        if sample
        else None
    )
    (tmp / "audit").mkdir()
    (tmp / PARTNER_REPORT).write_text(
        render_partner_report(
            audit,
            gate=gate.to_dict(),
            released_images=images,
            released_labels=[class_names.index(r["class"]) for r in sample],
            class_names=class_names,
            withheld_count=len(withheld),
            n_released=len(kept),
            source_sha256=sha,
        ),
        encoding="utf-8",
    )
    return sha


def _all_flagged(audit: dict) -> set[str]:
    from privacy.audit_schema import flagged_ids

    return set().union(*[flagged_ids(s) or set() for s in audit["sites"].values()])


def _files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` that release.json covers (not release.json, release.sig, approvals/)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in UNSIGNED and not rel.startswith("approvals/"):
            out[rel] = sha256_file(p)
    return out


def _privacy(audit: dict) -> dict[str, dict]:
    keys = ("protection", "epsilon", "delta", "accountant", "epsilon_budget")
    return {
        name: {k: (site.get("claimed_privacy") or {}).get(k) for k in keys}
        for name, site in audit["sites"].items()
    }


def build_release(
    cohort_dir: Path,
    audit_dir: Path,
    out_dir: Path,
    *,
    policy: Policy,
    consortium_key: Path,
    officer_keys: dict[str, Path],
    cohort_id: str | None = None,
    server_privacy: Path | dict | None = None,
) -> Path:
    """Build the signed release candidate `out_dir` (atomically; refuses to overwrite). It is built even when the
    gate fails, so the officers see why; gate.json and release.json then say "passed": false. `server_privacy`
    is the run's privacy.json (a path or its content): the gate checks the sites' audit-time claims against it,
    and fails that rule without it. The reports are rendered from the audit.json that ships."""
    from privacy.policy import evaluate_policy, policy_toml

    cohort_dir, audit_dir, out_dir = Path(cohort_dir), Path(audit_dir), Path(out_dir)
    if not officer_keys:
        raise ValueError(
            "build_release: name at least one privacy officer (officer_keys) who may approve"
        )
    if policy.required_approvals > len(officer_keys):
        raise ValueError(
            f"build_release: the policy requires {policy.required_approvals} approvals but only "
            f"{len(officer_keys)} officer(s) are named"
        )
    officers = {
        _check_name("officer name", n): public_key_pem(load_public_key(Path(p)))
        for n, p in officer_keys.items()
    }
    key = load_private_key(Path(consortium_key))
    owners: dict[str, str] = {public_key_pem(key): "the consortium"}
    for name, pem in officers.items():  # one key, one vote: no officer may approve under two names
        if pem in owners:
            raise ValueError(f"officer {name!r} has the same public key as {owners[pem]}")
        owners[pem] = f"officer {name!r}"
    manifest, rows, dataset = _read_cohort(cohort_dir)
    audit = _read_audit(audit_dir, manifest, {r["synthetic_id"] for r in rows}, cohort_dir)
    digest = hashlib.sha256((cohort_dir / "manifest.json").read_bytes()).hexdigest()
    cohort_id = _check_name("cohort id", cohort_id or f"cohort-{digest[:16]}")
    if isinstance(server_privacy, (str, Path)):
        try:
            server_privacy = json.loads(Path(server_privacy).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{server_privacy}: not a readable privacy.json ({err})") from err
    gate: GateResult = evaluate_policy(policy, audit, server_privacy=server_privacy)
    withheld = set(gate.withheld_ids)
    with atomic_dir(out_dir) as tmp:
        _write_cohort(cohort_dir, tmp / "cohort", manifest, rows, dataset, withheld)
        audit_sha = _write_reports(
            tmp, cohort_dir, audit_dir / "audit.json", audit, gate, manifest, rows, withheld
        )
        (tmp / "policy.toml").write_text(policy_toml(policy))
        write_json_atomic(tmp / "gate.json", gate.to_dict())
        release = {
            "format": RELEASE_FORMAT,
            "cohort_id": cohort_id,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cohort_manifest_sha256": digest,
            "checkpoint_sha256": manifest["checkpoint"]["sha256"],
            "n_images": len(rows) - len(withheld),
            "files": _files(tmp),
            "gate": {
                "passed": gate.passed,
                "rules": [
                    {
                        "rule": r.rule,
                        "passed": r.passed,
                        "measured": r.measured,
                        "threshold": r.threshold,
                        "where": r.where,
                        "note": r.note,
                    }
                    for r in gate.rules
                ],
            },
            "withheld": {
                "count": len(withheld),
                "ids": sorted(withheld),
                "reason": "flagged by the sites' memorization audit as near-copies of a training patient",
            },
            "audit_verdict": (audit.get("verdict") or {}).get("status"),
            # Both reports were rendered at build from this audit.json (officers/audit.json).
            "audit_sha256": audit_sha,
            "reports": {"partner": PARTNER_REPORT, "officers": OFFICER_REPORT, "audit": AUDIT_JSON},
            "privacy": _privacy(audit),
            "client_level_privacy": (audit.get("run") or {}).get("central_dp"),
            "consortium_key_fingerprint": fingerprint(key.public_key()),
            "officers": officers,
            "required_approvals": policy.required_approvals,
        }
        data = manifest_bytes(release)
        (tmp / "release.json").write_bytes(data)
        (tmp / "release.sig").write_text(sign(key, data) + "\n")
    return out_dir


# ---- approvals ------------------------------------------------------------------------------------------------


def _load_manifest(release: Path | dict) -> tuple[dict, str]:
    """(release manifest, its sha256) from a release folder (exact file bytes) or a manifest dict (its
    canonical bytes, as build_release writes them)."""
    if isinstance(release, dict):
        return release, hashlib.sha256(manifest_bytes(release)).hexdigest()
    path = Path(release) / "release.json"
    try:
        data = path.read_bytes()
        manifest = json.loads(data)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (not a release folder)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != RELEASE_FORMAT:
        raise ValueError(f"{path}: not a {RELEASE_FORMAT} manifest")
    return manifest, hashlib.sha256(data).hexdigest()


def release_sha256(release_dir: Path) -> str:
    """sha256 of the exact bytes of release.json: what an officer's approval refers to."""
    return _load_manifest(Path(release_dir))[1]


def approval_statement(release_dir: Path, officer: str, decision: str, reason: str = "") -> str:
    """The exact JSON text an officer signs to approve or reject a release."""
    manifest, digest = _load_manifest(Path(release_dir))
    if decision not in ("approve", "reject"):
        raise ValueError(f"decision {decision!r}: must be 'approve' or 'reject'")
    if decision == "reject" and not (reason or "").strip():
        raise ValueError("a rejection needs a reason")
    if officer not in (manifest.get("officers") or {}):
        raise ValueError(
            f"officer {officer!r} is not listed in {Path(release_dir) / 'release.json'} "
            f"(listed: {', '.join(manifest.get('officers') or {}) or 'none'})"
        )
    return json.dumps(
        {
            "format": APPROVAL_FORMAT,
            "cohort_id": manifest["cohort_id"],
            "release_sha256": digest,
            "officer": officer,
            "decision": decision,
            "reason": reason or "",
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
        sort_keys=True,
    )


def sign_approval(statement: str, officer_key: Path) -> dict:
    """{"statement": statement, "signature": base64 Ed25519 signature of its UTF-8 bytes by the officer's key}."""
    return {
        "statement": statement,
        "signature": sign(load_private_key(Path(officer_key)), statement.encode("utf-8")),
    }


def _statement(approval: Any) -> tuple[dict | None, list[str]]:
    if (
        not isinstance(approval, dict)
        or not isinstance(approval.get("statement"), str)
        or not isinstance(approval.get("signature"), str)
    ):
        return None, ["approval: expected {'statement': JSON text, 'signature': base64 text}"]
    try:
        st = json.loads(approval["statement"])
    except ValueError as err:
        return None, [f"approval statement: not valid JSON ({err})"]
    if not isinstance(st, dict) or st.get("format") != APPROVAL_FORMAT:
        return None, [f"approval statement: not a {APPROVAL_FORMAT} statement"]
    return st, []


def check_approval(release_dir_or_manifest: Path | dict, approval: dict) -> list[str]:
    """Problems with one officer's approval or rejection of this release; [] means valid."""
    return _check(*_load_manifest(release_dir_or_manifest), approval)


def _check(manifest: dict, digest: str, approval: Any) -> list[str]:
    st, problems = _statement(approval)
    if st is None:
        return problems
    officer = st.get("officer")
    who = f"approval by {officer!r}"
    if st.get("decision") not in ("approve", "reject"):
        problems.append(f"{who}: decision {st.get('decision')!r} is neither 'approve' nor 'reject'")
    if st.get("decision") == "reject" and not str(st.get("reason") or "").strip():
        problems.append(f"{who}: a rejection without a reason")
    if st.get("release_sha256") != digest or st.get("cohort_id") != manifest.get("cohort_id"):
        problems.append(
            f"{who}: signed for another release (cohort {st.get('cohort_id')!r}, release sha256 "
            f"{str(st.get('release_sha256'))[:16]}...), not this one"
        )
    pem = (manifest.get("officers") or {}).get(officer) if isinstance(officer, str) else None
    if pem is None:
        return problems + [f"{who}: this officer is not listed in release.json"]
    try:
        key = load_public_key(str(pem))
    except ValueError:
        return problems + [f"{who}: release.json holds no valid public key for this officer"]
    if not verify(key, approval["signature"], approval["statement"].encode("utf-8")):
        problems.append(
            f"{who}: the signature does not verify with the officer's key in release.json"
        )
    return problems


def write_approval(release_dir: Path, approval: dict) -> Path:
    """Store a valid approval as approvals/<officer>.json (atomically; an officer's later decision replaces the
    earlier one). Raises ValueError listing the problems of an invalid one."""
    problems = check_approval(Path(release_dir), approval)
    if problems:
        raise ValueError(f"{release_dir}: approval refused: " + "; ".join(problems))
    officer = _check_name("officer name", json.loads(approval["statement"])["officer"])
    path = Path(release_dir) / "approvals" / f"{officer}.json"
    write_json_atomic(
        path, {"statement": approval["statement"], "signature": approval["signature"]}
    )
    return path


def load_approvals(release_dir: Path) -> list[dict]:
    """Every approvals/*.json of a release (unchecked; see check_approval). Unreadable files raise ValueError."""
    out = []
    for p in sorted((Path(release_dir) / "approvals").glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError) as err:
            raise ValueError(f"{p}: not a readable approval ({err})") from err
    return out


def release_status(release_dir: Path, approvals: list[dict]) -> str:
    """Where a release stands: "blocked" (the gate failed), "rejected" (a valid rejection), "released" (the gate
    passed and enough distinct officers validly approved), else "pending". Invalid approvals are ignored."""
    manifest, digest = _load_manifest(Path(release_dir))
    if not (manifest.get("gate") or {}).get("passed"):
        return "blocked"
    decisions: dict[str, set[str]] = {}
    for a in approvals:
        if not _check(manifest, digest, a):
            st = json.loads(a["statement"])
            decisions.setdefault(st["decision"], set()).add(st["officer"])
    if decisions.get("reject"):
        return "rejected"
    if len(decisions.get("approve", set())) >= int(manifest.get("required_approvals", 1)):
        return "released"
    return "pending"


# ---- verification ---------------------------------------------------------------------------------------------


def verify_release(release_dir: Path, consortium_public_key, *, role: str = "officer") -> list[str]:
    """Every problem with a release folder, checked against the consortium public key (a key, a .pub path or PEM);
    [] means the release is intact, signed by that key, and every stored approval is valid. With
    role="partner" (a partner's download), the files a partner may not read (server.release.access) are not
    expected, and must not be there."""
    release_dir = Path(release_dir)
    public = load_public_key(consortium_public_key)
    try:
        manifest, _ = _load_manifest(release_dir)
    except (FileNotFoundError, ValueError) as err:
        return [str(err)]
    data = (release_dir / "release.json").read_bytes()
    problems = []
    sig_path = release_dir / "release.sig"
    if not sig_path.is_file():
        problems.append("release.sig: missing")
    elif not verify(public, sig_path.read_text().strip(), data):
        named = str(manifest.get("consortium_key_fingerprint"))[:16]
        problems.append(
            f"release.sig: not a valid signature of release.json by the consortium key "
            f"{fingerprint(public)[:16]}... (release.json names {named}...)"
        )
    listed = manifest.get("files") or {}
    for rel in (
        "policy.toml",
        "gate.json",
        PARTNER_REPORT,
        AUDIT_JSON,
        OFFICER_REPORT,
        "cohort/manifest.json",
    ):
        if rel not in listed:
            problems.append(f"{rel}: not listed in release.json")
    for rel, digest in sorted(listed.items()):
        path = release_dir / rel
        if not may_read_file(role, rel):
            if path.exists():
                problems.append(f"{rel}: for officers only, yet present in a {role}'s copy")
            continue
        if not safe_rel_path(rel):
            problems.append(
                f"{rel}: listed in release.json with an unsafe path (outside the release or odd bytes)"
            )
        elif not path.is_file():
            problems.append(f"{rel}: listed in release.json but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 does not match release.json")
    for rel in sorted(set(_files(release_dir)) - set(listed)):
        problems.append(f"{rel}: not listed in release.json")
    for p in (
        sorted((release_dir / "approvals").glob("*"))
        if (release_dir / "approvals").is_dir()
        else []
    ):
        try:
            approval = json.loads(p.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"approvals/{p.name}: not a readable approval ({err})")
            continue
        st, _ = _statement(approval)
        if st is not None and p.name != f"{st.get('officer')}.json":
            problems.append(
                f"approvals/{p.name}: holds the decision of officer {st.get('officer')!r}"
            )
        problems += [f"approvals/{p.name}: {x}" for x in check_approval(release_dir, approval)]
    return problems


def summary(release_dir: Path) -> str:
    """A few lines for people: cohort, gate, withheld images, approvals, status."""
    manifest, digest = _load_manifest(Path(release_dir))
    approvals = load_approvals(release_dir)
    buf = io.StringIO()
    buf.write(
        f"release {manifest['cohort_id']} ({manifest['n_images']} images), release sha256 {digest[:16]}...\n"
    )
    buf.write(
        f"gate: {'passed' if manifest['gate']['passed'] else 'FAILED'}; withheld near-copies: "
        f"{manifest['withheld']['count']}\n"
    )
    buf.write(
        f"approvals: {len(approvals)} stored, {manifest['required_approvals']} required; status: "
        f"{release_status(Path(release_dir), approvals)}\n"
    )
    return buf.getvalue()
