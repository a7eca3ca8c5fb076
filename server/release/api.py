"""The portal's JSON API (`/api/...`): cohorts and their files for everyone allowed to see them
(server.release.access), officers' signed decisions, and the admin's tokens, registrations and access log.
Every request is logged by the app's access-log middleware (server.release.portal)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from server.release.access import may_read_file, visible_files
from server.release.manifest import (
    approval_statement,
    check_approval,
    release_sha256,
    safe_rel_path,
    write_approval,
)
from server.release.state import (
    Cohort,
    consortium_key_path,
    listed_files,
    portal_of,
    read_release_json,
    require,
)
from server.release.store import Principal

router = APIRouter(prefix="/api")
CHUNK = 256 * 1024
MAX_REASON = 2000
MEDIA_TYPES = {
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".csv": "text/csv; charset=utf-8",
    ".gz": "application/gzip",
    ".toml": "text/plain; charset=utf-8",
    ".sig": "text/plain; charset=utf-8",
}
_RANGE = re.compile(
    r"\s*bytes\s*=\s*(\d{0,18})\s*-\s*(\d{0,18})\s*"
)  # 18 digits: past any file size


class RangeNotSatisfiable(ValueError):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a single `bytes=` range; None without a Range header."""
    if header is None:
        return None
    m = _RANGE.fullmatch(header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise RangeNotSatisfiable(
            f"Range {header[:80]!r}: expected one range 'bytes=FIRST-[LAST]' or 'bytes=-N'"
        )
    if m.group(1) == "":
        n = int(m.group(2))
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(f"Range {header!r}: empty suffix range of a {size}-byte file")
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable(f"Range {header!r}: not within the file's {size} bytes")
    return first, min(last, size - 1)


async def json_body(request: Request) -> Any:
    """The request's JSON body (its size is capped by the app's BodyLimit middleware before it is read)."""
    try:
        return json.loads(await request.body())
    except ValueError as err:
        raise HTTPException(400, f"request body: not valid JSON ({err})") from None


def cohort_files(cohort: Cohort, who: Principal) -> dict[str, str | None]:
    """The files of a cohort the caller may list and download: sha256 from release.json (None: not in it)."""
    files = listed_files(cohort.path, read_release_json(cohort.path))
    return {rel: files[rel] for rel in visible_files(who.role, files)}


def cohort_info(request: Request, cohort: Cohort, who: Principal) -> dict:
    portal = portal_of(request)
    manifest = read_release_json(cohort.path)
    files = cohort_files(cohort, who)
    out = {
        "cohort_id": cohort.id,
        "status": cohort.status,
        "registered_at": cohort.row["registered_at"],
        "release_sha256": release_sha256(cohort.path),
        "release": manifest,
        "files": sorted(files),
        "approvals": sorted(f for f in files if f.startswith("approvals/")),
    }
    if who.role != "partner":
        out["problems"] = cohort.problems
        out["decisions"] = [
            {k: a[k] for k in ("officer", "decision", "reason", "at")}
            for a in portal.store.approvals(cohort.id)
        ]
    return out


# ---- cohorts and files ------------------------------------------------------------------------------------------


@router.get("/cohorts")
def api_cohorts(request: Request):
    who = require(request)
    return {
        "cohorts": [
            {"cohort_id": c.id, "status": c.status, "registered_at": c.row["registered_at"]}
            for c in portal_of(request).visible_cohorts(who)
        ]
    }


@router.get("/cohorts/{cohort_id}")
def api_cohort(request: Request, cohort_id: str):
    who = require(request)
    return cohort_info(request, portal_of(request).visible_cohort(who, cohort_id), who)


@router.get("/cohorts/{cohort_id}/consortium.pub")
def api_consortium_pub(request: Request, cohort_id: str):
    portal = portal_of(request)
    portal.visible_cohort(require(request), cohort_id)
    return PlainTextResponse(consortium_key_path(portal.data_dir).read_text())


def resolve_file(cohort: Cohort, rel: str, files: dict[str, str | None]) -> Path:
    """The file `rel` of a cohort, if the caller may see it and it is a plain file inside the folder (else 404)."""
    missing = HTTPException(404, f"{rel[:200]!r}: not a file of this release")
    if not safe_rel_path(rel) or rel not in files:
        raise missing
    root = cohort.path.resolve()
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise missing
    if not path.is_file() or not path.resolve().is_relative_to(root):
        raise missing
    return path


@router.api_route("/cohorts/{cohort_id}/files/{rel:path}", methods=["GET", "HEAD"])
def api_file(request: Request, cohort_id: str, rel: str):
    portal = portal_of(request)
    who = require(request)
    cohort = portal.visible_cohort(who, cohort_id)
    if not may_read_file(who.role, rel):
        raise HTTPException(404, f"{rel[:200]!r}: not a file of this release")
    files = cohort_files(cohort, who)
    path = resolve_file(cohort, rel, files)
    digest = portal.hashes.sha256(path)
    if files[rel] is not None and digest != files[rel]:
        raise HTTPException(
            409,
            f"{rel}: its bytes on the portal no longer match the signed release.json, so it is not served; "
            "the cohort is invalid until an admin restores the signed file",
        )
    size = path.stat().st_size
    headers = {
        "Accept-Ranges": "bytes",
        "X-Sha256": digest,
        "ETag": f'"{digest}"',
        "Digest": "sha-256=" + base64.b64encode(bytes.fromhex(digest)).decode(),
    }
    if rel.endswith(
        ".html"
    ):  # an audit report: shown in the cohort page, never allowed to run anything
        headers["Content-Security-Policy"] = (
            "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            "frame-ancestors 'self'"
        )
    elif rel.endswith(".png"):
        headers["Content-Security-Policy"] = "default-src 'none'; frame-ancestors 'self'"
    media_type = MEDIA_TYPES.get(Path(rel).suffix, "application/octet-stream")
    try:
        rng = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable as err:
        return JSONResponse(
            {"detail": str(err)},
            status_code=416,
            headers={"Content-Range": f"bytes */{size}", **headers},
        )
    first, last = rng if rng else (0, size - 1)
    length = max(0, last - first + 1)
    status = 206 if rng else 200
    if rng:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    headers["Content-Length"] = str(length)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(first)
            left = length
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    break
                left -= len(block)
                yield block

    return StreamingResponse(chunks(), status_code=status, headers=headers, media_type=media_type)


# ---- officers' decisions --------------------------------------------------------------------------------------


@router.get("/cohorts/{cohort_id}/statement")
def api_statement(request: Request, cohort_id: str, decision: str = "approve", reason: str = ""):
    """The exact approval statement text the officer signs (with their own key, on their own machine)."""
    who = require(request, "officer")
    cohort = portal_of(request).visible_cohort(who, cohort_id)
    if len(reason) > MAX_REASON:
        raise HTTPException(400, f"reason: at most {MAX_REASON} characters")
    try:
        return PlainTextResponse(approval_statement(cohort.path, who.name, decision, reason))
    except ValueError as err:
        raise HTTPException(400, portal_of(request).public_message(str(err))) from None


@router.post("/cohorts/{cohort_id}/decision")
async def api_decision(request: Request, cohort_id: str):
    who = require(request, "officer")
    body = await json_body(request)
    return decide(request, who, cohort_id, body)


def decide(request: Request, who: Principal, cohort_id: str, body: Any) -> dict:
    portal = portal_of(request)
    cohort = portal.visible_cohort(who, cohort_id)
    if (
        not isinstance(body, dict)
        or set(body) != {"statement", "signature"}
        or not all(isinstance(body[k], str) for k in body)
    ):
        raise HTTPException(400, 'expected {"statement": text, "signature": base64 text}')
    try:
        st = json.loads(body["statement"])
    except ValueError:
        raise HTTPException(400, "statement: not valid JSON") from None
    if not isinstance(st, dict):
        raise HTTPException(400, "statement: not a JSON object")
    if st.get("officer") != who.name:
        raise HTTPException(
            403,
            f"the statement is signed as officer {st.get('officer')!r}, but this token belongs to "
            f"{who.name!r}",
        )
    if st.get("cohort_id") != cohort_id:
        raise HTTPException(
            400, f"the statement is about cohort {st.get('cohort_id')!r}, not {cohort_id}"
        )
    problems = check_approval(cohort.path, body)
    if problems:
        raise HTTPException(400, "; ".join(problems))
    if cohort.status == "blocked" and st["decision"] == "approve":
        raise HTTPException(
            409, f"cohort {cohort_id} failed the policy gate: it cannot be approved"
        )
    if cohort.status in ("released", "rejected"):
        raise HTTPException(409, f"cohort {cohort_id} is already {cohort.status}")
    if cohort.status == "invalid":
        raise HTTPException(
            409, f"cohort {cohort_id} is invalid: " + "; ".join(cohort.problems[:5])
        )
    try:
        portal.store.add_approval(
            cohort_id,
            who.name,
            st["decision"],
            str(st.get("reason", "")),
            body["statement"],
            body["signature"],
            str(st.get("at", "")),
        )
    except FileExistsError as err:
        raise HTTPException(409, str(err)) from None
    write_approval(cohort.path, body)
    status = portal.cohort(portal.store.cohort(cohort_id)).status
    return {
        "cohort_id": cohort_id,
        "officer": who.name,
        "decision": st["decision"],
        "status": status,
    }


# ---- admin ------------------------------------------------------------------------------------------------------


@router.post("/tokens")
async def api_issue_token(request: Request):
    require(request, "admin")
    body = await json_body(request)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("role"), str)
        or not isinstance(body.get("name"), str)
        or not isinstance(body.get("days"), (int, float, type(None)))
    ):
        raise HTTPException(
            400, 'expected {"role": "partner"|"officer"|"admin", "name": text, "days": number|null}'
        )
    try:
        token_id, token = portal_of(request).store.issue_token(
            body["role"], body["name"], body.get("days")
        )
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    request.state.log_detail = f"{token_id} {body['role']}:{body['name']}"
    return {"id": token_id, "token": token, "role": body["role"], "name": body["name"]}


@router.get("/tokens")
def api_tokens(request: Request):
    require(request, "admin")
    return {"tokens": portal_of(request).store.tokens()}


@router.delete("/tokens/{token_id}")
def api_revoke(request: Request, token_id: str):
    require(request, "admin")
    try:
        done = portal_of(request).store.revoke_token(token_id)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    if not done:
        raise HTTPException(404, f"no unrevoked token {token_id}")
    return {"id": token_id, "revoked": True}


@router.post("/cohorts")
async def api_register(request: Request):
    from server.release.portal import register_release

    require(request, "admin")
    portal = portal_of(request)
    data_dir = portal.data_dir
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise HTTPException(400, 'expected {"path": a release folder under the portal data folder}')
    src = (data_dir / body["path"]).resolve()
    cohorts_dir = data_dir / "cohorts"
    inside = src.is_relative_to(data_dir) and src != data_dir and src != cohorts_dir
    if not inside or (src.is_relative_to(cohorts_dir) and src.parent != cohorts_dir):
        raise HTTPException(
            400, f"{body['path'][:200]!r}: the release folder must be inside the portal data folder"
        )
    try:
        cohort_id = register_release(data_dir, src, move=True)
    except FileExistsError as err:
        raise HTTPException(409, portal.public_message(str(err))) from None
    except (FileNotFoundError, ValueError) as err:
        raise HTTPException(400, portal.public_message(str(err))) from None
    request.state.log_detail = cohort_id
    return {"cohort_id": cohort_id, "status": portal.cohort(portal.store.cohort(cohort_id)).status}


@router.get("/access-log")
def api_access_log(request: Request, limit: int = 1000):
    require(request, "admin")
    return {"entries": portal_of(request).store.access_log(max(1, min(limit, 10000)))}
