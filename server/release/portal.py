"""The partner portal: HTTP over TLS, where privacy officers approve release candidates and partners download
the released cohorts.

    fedsynth portal serve --data DIR --cert C --key K [--host 127.0.0.1] [--port 8443] [limits, --trusted-proxy]
    fedsynth portal token --data DIR --role partner|officer|admin --name N [--days D]   (prints the token once)
    fedsynth portal revoke --data DIR --token-id ID
    fedsynth portal add --data DIR RELEASE_DIR [--consortium-key consortium.pub]
    fedsynth portal approve|reject COHORT --portal URL --token T --key officer.key    (an officer, remotely)

Roles and what each may see: server/release/access.py. The data folder:
    DATA/portal.db            tokens and sessions (sha256 only), cohorts, approvals, access log (store.py)
    DATA/consortium.pub       the consortium public key every registered release must verify against
    DATA/cohorts/<id>/        one release candidate folder each (manifest.py), approvals/ written here

The app: `api.py` (JSON under /api) and `pages.py` (HTML from templates/, static/) are its routers; `state.py`
holds what they share (who is asking, cohort status, hash checks of served files); `limits.py` what keeps it up
under abuse. Every request is written to the access log with the client's address and user agent, refusals and
server errors included; rows older than the retention are deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.io import write_bytes_atomic
from common.signing import fingerprint, load_public_key, public_key_pem
from server.release import api, pages
from server.release.limits import BodyLimit, Limits, guarded_protocol
from server.release.manifest import NAME as COHORT_ID
from server.release.manifest import load_approvals, release_status, safe_rel_path, verify_release
from server.release.state import Portal, consortium_key_path, read_release_json
from server.release.store import Store

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: under no-referrer browsers send "Origin: null" with the portal's own forms
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)
PRUNE_EVERY = 3600.0  # seconds between deletions of access-log rows past the retention


@dataclass(frozen=True)
class PortalSettings:
    """How the portal is served (`fedsynth portal serve` flags)."""

    limits: Limits = Limits()
    log_retention_days: float = 90.0
    trusted_proxies: tuple[
        str, ...
    ] = ()  # reverse proxies whose X-Forwarded-For names the real client


# ---- releases on the portal's disk ----------------------------------------------------------------------------


def _no_symlinks(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, n)):
                raise ValueError(
                    f"{os.path.join(dirpath, n)}: a symbolic link; a release folder holds plain files"
                )


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
    manifest = read_release_json(release_dir)
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


# ---- the app --------------------------------------------------------------------------------------------------


class AccessLog:
    """ASGI middleware: one access-log row per request (who, role, method, path, status, body bytes sent, client
    address, user agent), refusals, unrouted paths and server errors included; security headers on every
    response; old rows pruned past the retention."""

    def __init__(self, app, portal: Portal):
        self.app, self.portal = app, portal
        self.last_prune = 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, sent = 500, 0

        async def watched_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names
                ]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            await anyio.to_thread.run_sync(self._log, scope, status, sent)

    def _log(self, scope, status: int, sent: int) -> None:
        state = scope.get("state") or {}
        who = state.get("principal")
        headers = dict(scope.get("headers") or [])
        what = scope.get("path", "")
        if state.get("log_detail"):
            what += f" ({state['log_detail']})"
        self.portal.store.log(
            who.who if who else "anonymous",
            who.role if who else "-",
            scope.get("method", "-"),
            what,
            status,
            sent if scope.get("method") != "HEAD" else 0,
            client=(scope.get("client") or ("-",))[0],
            agent=headers.get(b"user-agent", b"-").decode("latin-1"),
        )
        if time.monotonic() - self.last_prune > PRUNE_EVERY:
            self.last_prune = time.monotonic()
            self.portal.store.prune_log(self.portal.log_retention_days)


def wants_html(request: Request) -> bool:
    """A person's browser (a page, or a file link opened from one) gets an HTML refusal; programs get JSON."""
    accept = request.headers.get("accept", "")
    return not request.url.path.startswith("/api/") or "text/html" in accept


async def refusal(request: Request, exc: StarletteHTTPException):
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    headers = dict(exc.headers or {})
    if wants_html(request):
        return _html_refusal(request, exc.status_code, detail, headers)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def _html_refusal(request: Request, code: int, detail: str, headers: dict):
    from http import HTTPStatus

    resp = pages.render(
        request,
        "error.html",
        code,
        title=str(code),
        who=getattr(request.state, "principal", None),
        status=code,
        reason=HTTPStatus(code).phrase,
        detail=detail,
    )
    resp.headers.update(headers)
    return resp


def create_app(data_dir: Path, settings: PortalSettings | None = None) -> FastAPI:
    """The portal for one data folder (see the module docstring)."""
    settings = settings or PortalSettings()
    portal = Portal(Path(data_dir), settings.limits, settings.log_retention_days)
    app = FastAPI(title="fedsynth partner portal", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.portal = portal
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=pages.HERE / "static"), name="static")
    app.add_exception_handler(StarletteHTTPException, refusal)
    app.add_middleware(BodyLimit, max_body=settings.limits.max_body)
    app.add_middleware(AccessLog, portal=portal)  # outermost: sees the BodyLimit's 413s too
    return app


# ---- serving --------------------------------------------------------------------------------------------------


def server_config(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    cert: Path,
    key: Path,
    settings: PortalSettings | None = None,
    log_level: str = "info",
):
    """The uvicorn configuration the portal is served with: TLS, the limits (server.release.limits), proxy
    headers only from `settings.trusted_proxies`."""
    import uvicorn

    settings = settings or PortalSettings()
    for p, what in ((cert, "TLS certificate"), (key, "TLS private key")):
        if not Path(p).is_file():
            raise FileNotFoundError(
                f"{p}: {what} not found (fedsynth pki writes one: superlink.crt/.key)"
            )
    limits = settings.limits
    return uvicorn.Config(
        create_app(Path(data_dir), settings),
        host=host,
        port=port,
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        log_level=log_level,
        server_header=False,
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
        http=guarded_protocol(limits, frozenset(settings.trusted_proxies)),
        ws="none",
        lifespan="off",
        timeout_keep_alive=int(max(1, limits.keep_alive)),
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )


def serve(data_dir: Path, **kwargs) -> None:
    """Serve the portal over TLS (uvicorn) until interrupted; arguments as `server_config`."""
    import uvicorn

    uvicorn.Server(server_config(data_dir, **kwargs)).run()
