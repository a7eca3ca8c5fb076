"""The portal's view of its data folder, shared by the API and page routers: who a request is, the cohorts it may
see, their status, and whether the bytes on disk are still the signed ones.

A cohort's status is never stored as a claim: it is `release_status` of the release folder and the officers'
verified decisions, recomputed on every request (the `status` column only caches it for the log and listings),
and "invalid" when release.json no longer carries the consortium's signature or a file no longer matches the
sha256 release.json gives it. Files are hashed once and re-hashed whenever their size, mtime or inode change, so
every byte served is the signed one without hashing on every request.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request

from common.io import sha256_file
from common.signing import load_public_key, verify
from server.release.access import may_see_cohort
from server.release.limits import AuthThrottle, Limits
from server.release.manifest import APPROVAL_FILE, NAME, release_status, safe_rel_path
from server.release.store import Principal, Store

CONSORTIUM_PUB = "consortium.pub"
SESSION_COOKIE = "fedsynth_session"
CSRF_HEADER = "x-fedsynth-request"  # a cross-site form cannot set it: cookie-authenticated API writes carry it


def consortium_key_path(data_dir: Path) -> Path:
    return Path(data_dir) / CONSORTIUM_PUB


def read_release_json(release_dir: Path) -> dict:
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


def listed_files(release_dir: Path, manifest: dict) -> dict[str, str | None]:
    """Every file a cohort serves: release.json's files (with their sha256), release.json, release.sig and the
    stored approvals (sha256 None: their signatures, not release.json, vouch for them)."""
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


class FileHashes:
    """sha256 of files, cached by (size, mtime, inode): a changed file is hashed again (thread-safe)."""

    def __init__(self):
        self._cache: dict[str, tuple[tuple[int, int, int], str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        with self._lock:
            hit = self._cache.get(str(path))
        if hit and hit[0] == key:
            return hit[1]
        digest = sha256_file(path)
        with self._lock:
            self._cache[str(path)] = (key, digest)
        return digest


@dataclass
class Cohort:
    """A registered cohort as one request sees it."""

    row: dict
    status: str
    problems: list[str] = field(default_factory=list)  # why it is invalid (for officers' eyes)

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def path(self) -> Path:
        return Path(self.row["path"])


class Portal:
    """The state one portal app works on (see the module docstring)."""

    def __init__(self, data_dir: Path, limits: Limits, log_retention_days: float):
        self.data_dir = Path(data_dir).resolve()
        self.store = Store(self.data_dir)
        self.limits = limits
        self.log_retention_days = log_retention_days
        self.throttle = AuthThrottle(limits.max_auth_failures, limits.auth_window)
        self.hashes = FileHashes()

    # ---- who is asking --------------------------------------------------------------------------------------

    def authenticate(self, request: Request) -> tuple[Principal | None, str]:
        """(the caller, "bearer" | "session" | "none"). A bearer token that does not check out counts as a
        failed authentication of the client's address; from a throttled address, none is even checked (429)."""
        auth = request.headers.get("authorization")
        if auth is not None:
            self.check_throttle(request)
            scheme, _, token = auth.partition(" ")
            who = self.store.principal(token.strip()) if scheme.lower() == "bearer" else None
            if who is None:
                self.throttle.failed(client_address(request))
            return who, "bearer"
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            return self.store.session_principal(session), "session"
        return None, "none"

    def check_throttle(self, request: Request) -> None:
        wait = self.throttle.retry_after(client_address(request))
        if wait:
            raise HTTPException(
                429,
                f"too many failed sign-ins from your address: try again in {wait} seconds",
                headers={"Retry-After": str(wait)},
            )

    def login(self, request: Request, token: str) -> Principal | None:
        """A sign-in with a token (the login form): the holder, or None (counted as a failure)."""
        self.check_throttle(request)
        who = self.store.principal(token)
        if who is None:
            self.throttle.failed(client_address(request))
        return who

    # ---- cohorts --------------------------------------------------------------------------------------------

    def cohort(self, row: dict) -> Cohort:
        """The status of a registered cohort (cached in the database): `release_status` with the stored, verified
        decisions, or "invalid" when release.json lost the consortium's signature or a file its sha256."""
        path = Path(row["path"])
        problems = self.integrity_problems(path)
        if problems:
            status = "invalid"
        else:
            approvals = [
                {"statement": a["statement"], "signature": a["signature"]}
                for a in self.store.approvals(row["id"])
            ]
            status = release_status(path, approvals)
        if status != row["status"]:
            self.store.set_status(row["id"], status)
        return Cohort(row, status, problems)

    def integrity_problems(self, release_dir: Path) -> list[str]:
        """Why the release folder on the portal's disk is no longer the signed one ([] if it is)."""
        try:
            public = load_public_key(consortium_key_path(self.data_dir))
            sig = (release_dir / "release.sig").read_text().strip()
            data = (release_dir / "release.json").read_bytes()
        except (OSError, ValueError) as err:
            return [f"the release cannot be read ({type(err).__name__})"]
        if not verify(public, sig, data):
            return ["release.json no longer carries the consortium's signature"]
        manifest = read_release_json(release_dir)
        problems = []
        for rel, digest in sorted(manifest["files"].items()):
            path = release_dir / rel
            if not safe_rel_path(rel) or path.is_symlink() or not path.is_file():
                problems.append(f"{rel}: missing or not a plain file")
            elif self.hashes.sha256(path) != digest:
                problems.append(f"{rel}: sha256 does not match the signed release.json")
        return problems

    def visible_cohort(self, who: Principal, cohort_id: str) -> Cohort:
        """A cohort the caller may see (server.release.access); 404 for any other, malformed ids included, so
        that a partner cannot tell a blocked or pending cohort from one that does not exist."""
        row = self.store.cohort(cohort_id) if NAME.match(cohort_id) else None
        cohort = self.cohort(row) if row else None
        if cohort is None or not may_see_cohort(who.role, cohort.status):
            raise HTTPException(404, f"no cohort {cohort_id!r} on this portal")
        return cohort

    def visible_cohorts(self, who: Principal) -> list[Cohort]:
        out = [self.cohort(row) for row in self.store.cohorts()]
        return [c for c in out if may_see_cohort(who.role, c.status)]

    def public_message(self, message: str) -> str:
        """An error message fit for a client: the portal's own paths replaced by what they mean."""
        for path, name in ((self.data_dir / "cohorts", "cohorts"), (self.data_dir, "DATA")):
            message = message.replace(str(path), name)
        return message


def client_address(request: Request) -> str:
    return request.client.host if request.client else "-"


def portal_of(request: Request) -> Portal:
    return request.app.state.portal


def same_origin(request: Request) -> bool:
    """Does the request come from a page of this portal? Browsers send Origin with every POST; it must name
    this portal (the Host it was reached at, over https), and Sec-Fetch-Site, where sent, must agree."""
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    fetch_site = request.headers.get("sec-fetch-site", "same-origin")
    return bool(origin and host) and origin == f"https://{host}" and fetch_site == "same-origin"


def require(request: Request, *roles: str) -> Principal:
    """The caller, if authenticated (else 401) with one of `roles` (else 403). A browser session's writes must
    come from the portal's own pages: Origin this portal and the portal's request header (else 403)."""
    portal = portal_of(request)
    who, via = portal.authenticate(request)
    if who is None:
        raise HTTPException(
            401,
            "a valid, unrevoked, unexpired bearer token is required",
            headers={"WWW-Authenticate": 'Bearer realm="fedsynth"'},
        )
    request.state.principal = who
    if via == "session" and request.method not in ("GET", "HEAD"):
        if not same_origin(request):
            raise HTTPException(
                403, "a browser request that changes something must come from this portal"
            )
        if request.headers.get(CSRF_HEADER) != "1":
            raise HTTPException(
                403, f"a browser request that changes something must carry {CSRF_HEADER}: 1"
            )
    if roles and who.role not in roles:
        raise HTTPException(403, f"role {who.role} may not do this (needs {' or '.join(roles)})")
    return who
