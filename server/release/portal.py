"""The partner portal: HTTP over TLS, where privacy officers approve release candidates and partners download
the released cohorts.

    fedsynth portal serve --data DIR --cert C --key K [--host 127.0.0.1] [--port 8443]
    fedsynth portal token --data DIR --role partner|officer|admin --name N     (prints the token once)
    fedsynth portal revoke --data DIR --token-id ID
    fedsynth portal add --data DIR RELEASE_DIR [--consortium-key consortium.pub]

Roles: a *partner* lists and downloads released cohorts; an *officer* sees every candidate with its audit report
and gate result and approves or rejects it with a signature made by its own key (in the browser with WebCrypto,
or with `server.release.sign_approval`); an *admin* issues and revokes tokens and registers release candidates.

The data folder:
    DATA/portal.db            tokens (sha256 only), cohorts, approvals, access log (server/release/store.py)
    DATA/consortium.pub       the consortium public key every registered release must verify against
    DATA/cohorts/<id>/        one release candidate folder each (server/release/manifest.py), approvals/ written here

A cohort's status is never stored as a claim: it is `release_status` of the release folder and the officers'
verified decisions, recomputed on every request (the `status` column only caches it for the log and listings),
and "invalid" when release.json no longer carries the consortium's signature.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from common.io import sha256_file, write_bytes_atomic
from common.signing import fingerprint, load_public_key, public_key_pem, verify
from privacy.policy import format_value
from server.release.manifest import (
    APPROVAL_FILE,
    approval_statement,
    check_approval,
    load_approvals,
    release_sha256,
    release_status,
    safe_rel_path,
    verify_release,
    write_approval,
)
from server.release.manifest import NAME as COHORT_ID
from server.release.store import Principal, Store

COOKIE = "fedsynth_token"
CSRF_HEADER = "x-fedsynth-request"  # a cross-site form cannot set it: cookie-authenticated writes must carry it
CHUNK = 256 * 1024
MAX_BODY = 64 * 1024
CONSORTIUM_PUB = "consortium.pub"

MEDIA_TYPES = {
    ".json": "application/json",
    ".html": "text/html; charset=utf-8",
    ".png": "image/png",
    ".csv": "text/csv; charset=utf-8",
    ".gz": "application/gzip",
    ".toml": "text/plain; charset=utf-8",
    ".sig": "text/plain; charset=utf-8",
    ".pub": "text/plain; charset=utf-8",
}


class RangeNotSatisfiable(ValueError):
    pass


# ---- releases on the portal's disk ----------------------------------------------------------------------------


def _read_release_json(release_dir: Path) -> dict:
    path = Path(release_dir) / "release.json"
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (not a release candidate folder)") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{path}: not a release manifest (no 'files')")
    return manifest


def _no_symlinks(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, n)):
                raise ValueError(
                    f"{os.path.join(dirpath, n)}: a symbolic link; a release folder holds plain files"
                )


def consortium_key_path(data_dir: Path) -> Path:
    return Path(data_dir) / CONSORTIUM_PUB


def register_release(
    data_dir: Path, release_dir: Path, *, consortium_key: Path | None = None, move: bool = False
) -> str:
    """Verify a release candidate against the consortium key and register it as DATA/cohorts/<cohort_id>/
    (copied, or moved with `move`). The first registration needs `consortium_key`, which the portal keeps as
    DATA/consortium.pub; later ones must be signed by the same key. Returns the cohort id."""

    data_dir, release_dir = Path(data_dir).resolve(), Path(release_dir).resolve()
    store = Store(data_dir)
    trusted_path = consortium_key_path(data_dir)
    if trusted_path.exists():
        trusted = load_public_key(trusted_path)
        if consortium_key is not None and fingerprint(
            load_public_key(Path(consortium_key))
        ) != fingerprint(trusted):
            raise ValueError(
                f"{consortium_key}: not the consortium key this portal trusts ({trusted_path}, "
                f"fingerprint {fingerprint(trusted)}); a portal serves one consortium"
            )
    elif consortium_key is None:
        raise ValueError(
            f"{trusted_path} does not exist yet: give the consortium public key (--consortium-key)"
        )
    else:
        trusted = load_public_key(Path(consortium_key))
    manifest = _read_release_json(release_dir)
    cohort_id = manifest.get("cohort_id")
    if not isinstance(cohort_id, str) or not COHORT_ID.match(cohort_id):
        raise ValueError(
            f"{release_dir / 'release.json'}: cohort_id {cohort_id!r} is not a valid cohort id"
        )
    bad = [rel for rel in manifest["files"] if not safe_rel_path(rel)]
    if bad:
        raise ValueError(f"{release_dir / 'release.json'}: unsafe file paths {bad[:5]}")
    _no_symlinks(release_dir)
    problems = verify_release(release_dir, trusted)
    if problems:
        raise ValueError(
            f"{release_dir}: the release does not verify against the consortium key "
            f"{fingerprint(trusted)[:16]}...: " + "; ".join(problems[:10])
        )
    if store.cohort(cohort_id):
        raise FileExistsError(f"cohort {cohort_id} is already registered on this portal")
    dest = data_dir / "cohorts" / cohort_id
    if release_dir != dest:
        if dest.exists():
            raise FileExistsError(f"{dest} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(release_dir, dest)
        else:
            tmp = Path(
                tempfile.mkdtemp(prefix=f".{cohort_id}.", suffix=".partial", dir=dest.parent)
            )
            try:
                shutil.copytree(release_dir, tmp / "r")
                os.replace(tmp / "r", dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if not trusted_path.exists():
        write_bytes_atomic(trusted_path, public_key_pem(trusted).encode())
    approvals = load_approvals(dest)
    store.add_cohort(cohort_id, dest, release_status(dest, approvals))
    for a in approvals:  # decisions that travelled with the release (verify_release checked them)
        st = json.loads(a["statement"])
        store.add_approval(
            cohort_id,
            st["officer"],
            st["decision"],
            st.get("reason", ""),
            a["statement"],
            a["signature"],
            st.get("at", ""),
        )
    return cohort_id


def release_signed(data_dir: Path, release_dir: Path) -> bool:
    """True if release.json still carries the consortium's signature (cheap: no file is re-hashed)."""

    try:
        public = load_public_key(consortium_key_path(data_dir))
        sig = (Path(release_dir) / "release.sig").read_text().strip()
        return verify(public, sig, (Path(release_dir) / "release.json").read_bytes())
    except (OSError, ValueError):
        return False


def cohort_status(store: Store, row: dict) -> str:
    """`release_status` of a registered cohort with its stored, verified decisions (cached in the database);
    "invalid" when release.json on the portal's disk no longer carries the consortium's signature."""

    approvals = [
        {"statement": a["statement"], "signature": a["signature"]}
        for a in store.approvals(row["id"])
    ]
    if not release_signed(store.data_dir, Path(row["path"])):
        status = "invalid"
    else:
        status = release_status(Path(row["path"]), approvals)
    if status != row["status"]:
        store.set_status(row["id"], status)
    return status


def listed_files(release_dir: Path, manifest: dict) -> dict[str, str | None]:
    """Every file a cohort serves: release.json's files (with their sha256), release.json, release.sig and the
    stored approvals (sha256 None: computed when served)."""
    files: dict[str, str | None] = {
        rel: d for rel, d in manifest["files"].items() if safe_rel_path(rel)
    }
    files["release.json"] = None
    files["release.sig"] = None
    adir = Path(release_dir) / "approvals"
    if adir.is_dir() and not adir.is_symlink():
        for p in sorted(adir.glob("*.json")):
            rel = f"approvals/{p.name}"
            if APPROVAL_FILE.match(rel):
                files[rel] = None
    return files


def resolve_file(release_dir: Path, rel: str, files: dict[str, str | None]) -> Path:
    """The file `rel` of a release, if it is one the release lists and a plain file inside the folder."""
    if not safe_rel_path(rel) or rel not in files:
        raise HTTPException(404, f"{rel!r}: not a file of this release")
    root = Path(release_dir).resolve()
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise HTTPException(404, f"{rel!r}: not a file of this release")
    if not path.is_file() or not path.resolve().is_relative_to(root):
        raise HTTPException(404, f"{rel!r}: not a file of this release")
    return path


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a single `bytes=` range; None without a Range header."""
    if header is None:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
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


def _media_type(rel: str) -> str:
    return MEDIA_TYPES.get(Path(rel).suffix, "application/octet-stream")


# ---- the app --------------------------------------------------------------------------------------------------


def create_app(data_dir: Path) -> FastAPI:
    """The portal for one data folder (see the module docstring)."""
    data_dir = Path(data_dir).resolve()
    store = Store(data_dir)
    app = FastAPI(title="fedsynth partner portal", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"
        )
        return response

    def authenticate(request: Request) -> tuple[Principal | None, str]:
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            return (
                store.principal(token.strip()) if scheme.lower() == "bearer" else None
            ), "bearer"
        token = request.cookies.get(COOKIE)
        return (store.principal(token) if token else None), "cookie"

    def require(request: Request, *roles: str) -> Principal:
        """The caller, if its token is valid (else 401) and its role is one of `roles` (else 403)."""
        who, via = authenticate(request)
        what = request.url.path
        if who is None:
            store.log("anonymous", "-", request.method, what, 401)
            raise HTTPException(
                401,
                "a valid, unrevoked bearer token is required",
                headers={"WWW-Authenticate": 'Bearer realm="fedsynth"'},
            )
        if (
            via == "cookie"
            and request.method not in ("GET", "HEAD")
            and request.headers.get(CSRF_HEADER) != "1"
        ):
            store.log(who.who, who.role, request.method, what, 403)
            raise HTTPException(
                403, f"a browser request that changes something must carry {CSRF_HEADER}: 1"
            )
        if roles and who.role not in roles:
            store.log(who.who, who.role, request.method, what, 403)
            raise HTTPException(
                403, f"role {who.role} may not do this (needs {' or '.join(roles)})"
            )
        return who

    def cohort_for(request: Request, who: Principal, cohort_id: str) -> tuple[dict, str]:
        """A registered cohort and its status; partners see only released ones (403 otherwise)."""
        if not COHORT_ID.match(cohort_id):
            store.log(who.who, who.role, request.method, request.url.path, 400)
            raise HTTPException(400, "malformed cohort id")
        row = store.cohort(cohort_id)
        if row is None:
            store.log(who.who, who.role, request.method, request.url.path, 404)
            raise HTTPException(404, f"no cohort {cohort_id}")
        status = cohort_status(store, row)
        if who.role == "partner" and status != "released":
            store.log(who.who, who.role, request.method, request.url.path, 403)
            raise HTTPException(403, f"cohort {cohort_id} is not released")
        return row, status

    def cohort_info(row: dict, status: str, who: Principal) -> dict:
        path = Path(row["path"])
        manifest = _read_release_json(path)
        files = listed_files(path, manifest)
        out = {
            "cohort_id": row["id"],
            "status": status,
            "registered_at": row["registered_at"],
            "release_sha256": release_sha256(path),
            "release": manifest,
            "files": sorted(files),
            "approvals": sorted(f for f in files if f.startswith("approvals/")),
        }
        if who.role != "partner":
            out["decisions"] = [
                {k: a[k] for k in ("officer", "decision", "reason", "at")}
                for a in store.approvals(row["id"])
            ]
        return out

    async def json_body(request: Request) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"request body over {MAX_BODY} bytes")
        try:
            return json.loads(body)
        except ValueError as err:
            raise HTTPException(400, f"request body: not valid JSON ({err})") from None

    # ---- API: cohorts ----------------------------------------------------------------------------------------

    @app.get("/api/cohorts")
    def api_cohorts(request: Request):
        who = require(request)
        out = []
        for row in store.cohorts():
            status = cohort_status(store, row)
            if who.role == "partner" and status != "released":
                continue
            out.append(
                {"cohort_id": row["id"], "status": status, "registered_at": row["registered_at"]}
            )
        store.log(who.who, who.role, "GET", "/api/cohorts", 200)
        return {"cohorts": out}

    @app.get("/api/cohorts/{cohort_id}")
    def api_cohort(request: Request, cohort_id: str):
        who = require(request)
        row, status = cohort_for(request, who, cohort_id)
        store.log(who.who, who.role, "GET", request.url.path, 200)
        return cohort_info(row, status, who)

    @app.get("/api/cohorts/{cohort_id}/consortium.pub")
    def api_consortium_pub(request: Request, cohort_id: str):
        who = require(request)
        cohort_for(request, who, cohort_id)
        store.log(who.who, who.role, "GET", request.url.path, 200)
        return PlainTextResponse(consortium_key_path(data_dir).read_text())

    @app.api_route("/api/cohorts/{cohort_id}/files/{rel:path}", methods=["GET", "HEAD"])
    def api_file(request: Request, cohort_id: str, rel: str):
        who = require(request)
        row, _ = cohort_for(request, who, cohort_id)
        release_dir = Path(row["path"])
        files = listed_files(release_dir, _read_release_json(release_dir))
        try:
            path = resolve_file(release_dir, rel, files)
        except HTTPException:
            store.log(who.who, who.role, request.method, request.url.path, 404)
            raise
        size = path.stat().st_size
        digest = files[rel] or sha256_file(path)
        headers = {
            "Accept-Ranges": "bytes",
            "X-Sha256": digest,
            "ETag": f'"{digest}"',
            "Digest": "sha-256=" + base64.b64encode(bytes.fromhex(digest)).decode(),
        }
        if rel.endswith(
            ".html"
        ):  # the audit report: shown in the cohort page, never allowed to run anything
            headers["Content-Security-Policy"] = (
                "sandbox; default-src 'none'; img-src data:; "
                "style-src 'unsafe-inline'; frame-ancestors 'self'"
            )
        elif rel.endswith(".png"):
            headers["Content-Security-Policy"] = "default-src 'none'; frame-ancestors 'self'"
        try:
            rng = parse_range(request.headers.get("range"), size)
        except RangeNotSatisfiable as err:
            store.log(who.who, who.role, request.method, request.url.path, 416)
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
        store.log(
            who.who,
            who.role,
            request.method,
            request.url.path,
            status,
            length if request.method == "GET" else 0,
        )
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type=_media_type(rel))

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

        return StreamingResponse(
            chunks(), status_code=status, headers=headers, media_type=_media_type(rel)
        )

    # ---- API: officers' decisions ----------------------------------------------------------------------------

    @app.get("/api/cohorts/{cohort_id}/statement")
    def api_statement(
        request: Request, cohort_id: str, decision: str = "approve", reason: str = ""
    ):
        """The exact approval statement text the officer signs (with their own key, on their own machine)."""

        who = require(request, "officer")
        row, _ = cohort_for(request, who, cohort_id)
        if len(reason) > 2000:
            raise HTTPException(400, "reason: at most 2000 characters")
        try:
            text = approval_statement(Path(row["path"]), who.name, decision, reason)
        except ValueError as err:
            store.log(who.who, who.role, "GET", request.url.path, 400)
            raise HTTPException(400, str(err)) from None
        store.log(who.who, who.role, "GET", request.url.path, 200)
        return PlainTextResponse(text)

    @app.post("/api/cohorts/{cohort_id}/decision")
    async def api_decision(request: Request, cohort_id: str):
        who = require(request, "officer")
        body = await json_body(request)
        return decide(request, who, cohort_id, body)

    def decide(request: Request, who: Principal, cohort_id: str, body: Any) -> dict:

        row, status = cohort_for(request, who, cohort_id)
        what = request.url.path

        def refuse(code: int, msg: str):
            store.log(who.who, who.role, "POST", what, code)
            raise HTTPException(code, msg)

        if (
            not isinstance(body, dict)
            or set(body) != {"statement", "signature"}
            or not all(isinstance(body[k], str) for k in body)
        ):
            refuse(400, 'expected {"statement": text, "signature": base64 text}')
        try:
            st = json.loads(body["statement"])
        except ValueError:
            refuse(400, "statement: not valid JSON")
        if not isinstance(st, dict):
            refuse(400, "statement: not a JSON object")
        if st.get("officer") != who.name:
            refuse(
                403,
                f"the statement is signed as officer {st.get('officer')!r}, but this token belongs to "
                f"{who.name!r}",
            )
        if st.get("cohort_id") != cohort_id:
            refuse(400, f"the statement is about cohort {st.get('cohort_id')!r}, not {cohort_id}")
        problems = check_approval(Path(row["path"]), body)
        if problems:
            refuse(400, "; ".join(problems))
        if status == "blocked" and st["decision"] == "approve":
            refuse(409, f"cohort {cohort_id} failed the policy gate: it cannot be approved")
        if status in ("released", "rejected"):
            refuse(409, f"cohort {cohort_id} is already {status}")
        if status == "invalid":
            refuse(
                409,
                f"cohort {cohort_id}: release.json no longer carries the consortium's signature",
            )
        try:
            store.add_approval(
                cohort_id,
                who.name,
                st["decision"],
                str(st.get("reason", "")),
                body["statement"],
                body["signature"],
                str(st.get("at", "")),
            )
        except FileExistsError as err:
            refuse(409, str(err))
        write_approval(Path(row["path"]), body)
        status = cohort_status(store, store.cohort(cohort_id))
        store.log(who.who, who.role, "POST", what, 200)
        return {
            "cohort_id": cohort_id,
            "officer": who.name,
            "decision": st["decision"],
            "status": status,
        }

    # ---- API: admin -------------------------------------------------------------------------------------------

    @app.post("/api/tokens")
    async def api_issue_token(request: Request):
        who = require(request, "admin")
        body = await json_body(request)
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("role"), str)
            or not isinstance(body.get("name"), str)
        ):
            raise HTTPException(400, 'expected {"role": "partner"|"officer"|"admin", "name": text}')
        try:
            token_id, token = store.issue_token(body["role"], body["name"])
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        store.log(
            who.who,
            who.role,
            "POST",
            f"/api/tokens ({token_id} {body['role']}:{body['name']})",
            200,
        )
        return {"id": token_id, "token": token, "role": body["role"], "name": body["name"]}

    @app.get("/api/tokens")
    def api_tokens(request: Request):
        require(request, "admin")
        return {"tokens": store.tokens()}

    @app.delete("/api/tokens/{token_id}")
    def api_revoke(request: Request, token_id: str):
        who = require(request, "admin")
        try:
            done = store.revoke_token(token_id)
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
        if not done:
            raise HTTPException(404, f"no unrevoked token {token_id}")
        store.log(who.who, who.role, "DELETE", request.url.path, 200)
        return {"id": token_id, "revoked": True}

    @app.post("/api/cohorts")
    async def api_register(request: Request):
        who = require(request, "admin")
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise HTTPException(
                400, 'expected {"path": a release folder under the portal data folder}'
            )
        src = (data_dir / body["path"]).resolve()
        cohorts_dir = data_dir / "cohorts"
        inside = src.is_relative_to(data_dir) and src != data_dir and src != cohorts_dir
        if not inside or (src.is_relative_to(cohorts_dir) and src.parent != cohorts_dir):
            raise HTTPException(
                400, f"{body['path']!r}: the release folder must be inside the portal data folder"
            )
        try:
            cohort_id = register_release(data_dir, src, move=True)
        except FileExistsError as err:
            raise HTTPException(409, str(err)) from None
        except (FileNotFoundError, ValueError) as err:
            raise HTTPException(400, str(err)) from None
        store.log(who.who, who.role, "POST", f"/api/cohorts ({cohort_id})", 200)
        row = store.cohort(cohort_id)
        return {"cohort_id": cohort_id, "status": cohort_status(store, row)}

    @app.get("/api/access-log")
    def api_access_log(request: Request, limit: int = 1000):
        require(request, "admin")
        return {"entries": store.access_log(max(1, min(limit, 10000)))}

    # ---- web pages --------------------------------------------------------------------------------------------

    def page_user(request: Request) -> Principal | None:
        who, _ = authenticate(request)
        return who

    @app.get("/", response_class=HTMLResponse)
    def page_index(request: Request):
        who = page_user(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        rows = []
        for row in store.cohorts():
            status = cohort_status(store, row)
            if who.role == "partner" and status != "released":
                continue
            rows.append(
                f"<tr><td><a href='/cohorts/{quote(row['id'])}'>{_e(row['id'])}</a></td>"
                f"<td class='st-{_e(status)}'>{_e(status)}</td><td>{_e(row['registered_at'])}</td></tr>"
            )
        body = (
            "<h1>Cohorts</h1><table><tr><th>cohort</th><th>status</th><th>registered</th></tr>"
            + ("".join(rows) or "<tr><td colspan=3>none</td></tr>")
            + "</table>"
        )
        return _page("Cohorts", body, who)

    @app.get("/login", response_class=HTMLResponse)
    def page_login(request: Request):
        return _page("Sign in", _LOGIN_FORM, None)

    @app.post("/login")
    async def page_login_post(request: Request):
        body = await request.body()
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"request body over {MAX_BODY} bytes")
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
        who = store.principal(token)
        if who is None:
            store.log("anonymous", "-", "POST", "/login", 401)
            return _page(
                "Sign in", "<p class='fail'>Unknown or revoked token.</p>" + _LOGIN_FORM, None, 401
            )
        store.log(who.who, who.role, "POST", "/login", 303)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            COOKIE, token, httponly=True, secure=True, samesite="strict", path="/", max_age=8 * 3600
        )
        return resp

    @app.post("/logout")
    def page_logout():
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return resp

    @app.get("/cohorts/{cohort_id}", response_class=HTMLResponse)
    def page_cohort(request: Request, cohort_id: str):
        who = page_user(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        row, status = cohort_for(request, who, cohort_id)
        store.log(who.who, who.role, "GET", request.url.path, 200)
        return _cohort_page(store, row, status, who)

    return app


# ---- HTML -----------------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


_CSS = """body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em 2em;color:#222}
header{display:flex;justify-content:space-between;border-bottom:1px solid #ccc;margin-bottom:1em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
.pass,.st-released{color:#0a6b2a;font-weight:600}.fail,.st-blocked,.st-rejected,.st-invalid{color:#a40000;font-weight:600}
.st-pending{color:#8a5a00;font-weight:600}iframe{width:100%;height:36em;border:1px solid #ccc}
img.preview{max-width:100%;border:1px solid #ccc}fieldset{border:1px solid #ccc;margin:1em 0}
code{background:#f3f3f3;padding:0 .2em}"""

_LOGIN_FORM = """<h1>fedsynth partner portal</h1>
<form method="post" action="/login"><label>Access token <input type="password" name="token" id="token"
 autocomplete="off" size="50" required></label> <button type="submit" id="login">Sign in</button></form>
<p>Tokens are issued by the portal's administrator (<code>fedsynth portal token</code>).</p>"""


def _page(
    title: str, body: str, who: Principal | None, status: int = 200, nonce: str | None = None
) -> HTMLResponse:
    user = (
        (
            f"<span>{_e(who.name)} ({_e(who.role)})</span> <form method='post' action='/logout' style='display:inline'>"
            "<button>Sign out</button></form>"
        )
        if who
        else ""
    )
    script_src = f"'nonce-{nonce}'" if nonce else "'none'"
    csp = (
        f"default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; frame-src 'self'; "
        f"script-src {script_src}; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    doc = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)} - fedsynth</title>"
        f"<style>{_CSS}</style></head><body><header><p><a href='/'>fedsynth portal</a></p><p>{user}</p></header>"
        f"{body}</body></html>"
    )
    return HTMLResponse(doc, status_code=status, headers={"Content-Security-Policy": csp})


def _cohort_page(store: Store, row: dict, status: str, who: Principal) -> HTMLResponse:
    cid = row["id"]
    base = f"/api/cohorts/{quote(cid)}/files"
    path = Path(row["path"])
    manifest = _read_release_json(path)
    gate = manifest.get("gate") or {}
    try:
        audit = json.loads((path / "audit" / "audit.json").read_text())
        verdict = audit.get("verdict") or {}
    except (OSError, ValueError):
        verdict = {"status": "unreadable", "reasons": ["audit/audit.json could not be read"]}
    rules = "".join(
        f"<tr><td>{_e(r.get('rule'))}</td><td>{_e(format_value(r.get('measured')))}</td>"
        f"<td>{_e(format_value(r.get('threshold')))}"
        f"</td><td class='{'pass' if r.get('passed') else 'fail'}'>{'pass' if r.get('passed') else 'FAIL'}</td>"
        f"<td>{_e('; '.join(x for x in (r.get('where'), r.get('note')) if x))}</td></tr>"
        for r in gate.get("rules") or []
    )
    withheld = manifest.get("withheld") or {}
    decisions = "".join(
        f"<li>{_e(a['officer'])}: <b>{_e(a['decision'])}</b> {_e(a['at'])}"
        f"{(' - ' + _e(a['reason'])) if a['reason'] else ''}</li>"
        for a in store.approvals(cid)
    )
    files = listed_files(path, manifest)
    body = [
        f"<h1>Cohort <code id='cohort-id'>{_e(cid)}</code></h1>",
        f"<p>Status: <b id='status' class='st-{_e(status)}'>{_e(status)}</b> &middot; "
        f"{_e(manifest.get('n_images'))} images &middot; {_e(manifest.get('required_approvals'))} approvals "
        f"required &middot; release sha256 <code>{_e(release_sha256(path)[:16])}...</code></p>",
        f"<h2>Audit verdict: <span id='verdict' class='{'pass' if verdict.get('status') == 'pass' else 'fail'}'>"
        f"{_e(verdict.get('status'))}</span></h2><ul>"
        + "".join(f"<li>{_e(r)}</li>" for r in verdict.get("reasons") or [])
        + "</ul>",
        f"<h2>Policy gate: <span id='gate' class='{'pass' if gate.get('passed') else 'fail'}'>"
        f"{'passed' if gate.get('passed') else 'FAILED'}</span></h2>"
        "<table id='gate-table'><tr><th>rule</th><th>measured</th><th>threshold</th><th>result</th>"
        f"<th>where</th></tr>{rules}</table>",
        f"<p>Withheld near-copies: {_e(withheld.get('count', 0))}"
        f"{(' (' + _e(', '.join(withheld.get('ids') or [])) + ')') if withheld.get('ids') else ''}</p>",
        f"<h2>Decisions</h2><ul id='decisions'>{decisions or '<li>none yet</li>'}</ul>",
    ]
    if "cohort/preview.png" in files:
        body.append(
            f"<h2>Preview</h2><img class='preview' alt='preview of the synthetic cohort' "
            f"src='{base}/cohort/preview.png'>"
        )
    if "audit/audit.html" in files:
        body.append(
            f"<h2>Audit report</h2><p><a href='{base}/audit/audit.html' target='_blank'>open audit.html</a>"
            f"</p><iframe title='audit report' src='{base}/audit/audit.html'></iframe>"
        )
    nonce = None
    if who.role == "officer" and status == "pending":
        nonce = secrets.token_urlsafe(16)
        body.append(_officer_form(cid, who.name, nonce))
    body.append(
        "<h2>Files</h2><ul>"
        + "".join(f"<li><a href='{base}/{quote(rel)}'>{_e(rel)}</a></li>" for rel in sorted(files))
        + "</ul>"
    )
    body.append(
        f"<p>Download and verify with <code>fedsynth pull {_e(cid)} --portal URL --token TOKEN "
        "--consortium-key consortium.pub</code></p>"
    )
    return _page(f"Cohort {cid}", "\n".join(body), who, nonce=nonce)


def _officer_form(cohort_id: str, officer: str, nonce: str) -> str:
    """Approve / reject: the statement is fetched from the portal, signed in the browser with the officer's own
    Ed25519 key (WebCrypto; the key file never leaves the officer's machine), then posted."""
    return f"""<h2>Your decision</h2>
<form id="decision-form" data-cohort="{_e(cohort_id)}"><fieldset><legend>Sign as officer {_e(officer)}</legend>
<p><label><input type="radio" name="decision" value="approve" checked> approve</label>
<label><input type="radio" name="decision" value="reject"> reject</label></p>
<p><label>Reason (required to reject)<br><textarea id="reason" rows="2" cols="70" maxlength="2000"></textarea></label></p>
<p><label>Your private key file (<code>{_e(officer)}.key</code>; read here, never uploaded)
<input type="file" id="keyfile" accept=".key,.pem"></label></p>
<p><button type="submit" id="sign">Sign and submit</button></p><p id="result" role="status"></p></fieldset></form>
<script nonce="{nonce}">
(function () {{
  const form = document.getElementById('decision-form');
  const out = document.getElementById('result');
  const cohort = form.dataset.cohort;
  const b64 = (bytes) => btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(''));
  form.addEventListener('submit', async (ev) => {{
    ev.preventDefault();
    out.className = ''; out.textContent = 'signing...';
    try {{
      const decision = form.querySelector('input[name=decision]:checked').value;
      const reason = document.getElementById('reason').value;
      const file = document.getElementById('keyfile').files[0];
      if (!file) throw new Error('choose your private key file');
      const pem = await file.text();
      const body = pem.replace(/-----(BEGIN|END) PRIVATE KEY-----/g, '').replace(/\\s+/g, '');
      const der = Uint8Array.from(atob(body), (c) => c.charCodeAt(0));
      const key = await crypto.subtle.importKey('pkcs8', der, {{name: 'Ed25519'}}, false, ['sign']);
      const q = new URLSearchParams({{decision: decision, reason: reason}});
      const r = await fetch('/api/cohorts/' + encodeURIComponent(cohort) + '/statement?' + q,
                            {{credentials: 'same-origin'}});
      if (!r.ok) throw new Error((await r.json()).detail);
      const statement = await r.text();
      const sig = await crypto.subtle.sign({{name: 'Ed25519'}}, key, new TextEncoder().encode(statement));
      const p = await fetch('/api/cohorts/' + encodeURIComponent(cohort) + '/decision', {{
        method: 'POST', credentials: 'same-origin',
        headers: {{'Content-Type': 'application/json', 'X-Fedsynth-Request': '1'}},
        body: JSON.stringify({{statement: statement, signature: b64(new Uint8Array(sig))}})}});
      const res = await p.json();
      if (!p.ok) throw new Error(res.detail);
      out.className = 'pass';
      out.dataset.status = res.status;
      out.textContent = 'Recorded: ' + res.decision + '. Cohort status: ' + res.status + '.';
    }} catch (e) {{
      out.className = 'fail';
      out.textContent = 'Not recorded: ' + e.message;
    }}
  }});
}})();
</script>"""


# ---- serving --------------------------------------------------------------------------------------------------


def serve(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    cert: Path,
    key: Path,
    log_level: str = "info",
) -> None:
    """Serve the portal over TLS (uvicorn) until interrupted."""
    import uvicorn

    for p, what in ((cert, "TLS certificate"), (key, "TLS private key")):
        if not Path(p).is_file():
            raise FileNotFoundError(
                f"{p}: {what} not found (fedsynth pki writes one: superlink.crt/.key)"
            )
    uvicorn.run(
        create_app(Path(data_dir)),
        host=host,
        port=port,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level=log_level,
        server_header=False,
        proxy_headers=False,
        ws="none",
    )
