"""The portal's web pages (templates/ and static/ beside this file): sign-in and sign-out with server-side
sessions, the cohort list and a cohort's page (audit verdict, policy gate, reports, the officer's decision form).

Signing in exchanges a token for a random session id (the cookie; the token itself is never stored in the
browser); signing out revokes it on the server. Both are POSTs that must come from this portal's own page
(Origin), and failed sign-ins count towards the client's throttle (server.release.limits)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from privacy.policy import format_value
from server.release.access import may_read_file, officers_only
from server.release.api import cohort_files
from server.release.manifest import release_sha256
from server.release.state import (
    SESSION_COOKIE,
    Cohort,
    portal_of,
    read_release_json,
    same_origin,
)
from server.release.store import SESSION_HOURS, Principal

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["value"] = format_value
router = APIRouter()
# Pages load only the portal's own stylesheet, images, frames and the officer's script; nothing inline.
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; frame-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def render(request: Request, name: str, code: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, context, status_code=code, headers={"Content-Security-Policy": PAGE_CSP}
    )


def page_user(request: Request) -> Principal | None:
    who, _ = portal_of(request).authenticate(request)
    if who is not None:
        request.state.principal = who
    return who


@router.get("/", response_class=HTMLResponse)
def page_index(request: Request):
    who = page_user(request)
    if who is None:
        return RedirectResponse("/login", status_code=303)
    cohorts = portal_of(request).visible_cohorts(who)
    return render(request, "index.html", title="Cohorts", who=who, cohorts=cohorts)


@router.get("/login", response_class=HTMLResponse)
def page_login(request: Request):
    return render(request, "login.html", title="Sign in", who=None, session_hours=SESSION_HOURS)


@router.post("/login")
async def page_login_post(request: Request):
    if not same_origin(request):
        raise HTTPException(403, "sign in from this portal's own sign-in page")
    portal = portal_of(request)
    portal.check_throttle(request)
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    who = portal.login(request, token)
    if who is None:
        return render(
            request,
            "login.html",
            401,
            title="Sign in",
            who=None,
            session_hours=SESSION_HOURS,
            message="Unknown, revoked or expired token.",
        )
    request.state.principal = who
    session, seconds = portal.store.open_session(who)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        session,
        httponly=True,
        secure=True,
        samesite="strict",
        path="/",
        max_age=seconds,
    )
    return resp


@router.post("/logout")
def page_logout(request: Request):
    if not same_origin(request):
        raise HTTPException(403, "sign out from this portal's own pages")
    page_user(request)
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        portal_of(request).store.close_session(session)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
    return resp


@router.get("/cohorts/{cohort_id}", response_class=HTMLResponse)
def page_cohort(request: Request, cohort_id: str, decided: int = 0):
    who = page_user(request)
    if who is None:
        return RedirectResponse("/login", status_code=303)
    cohort = portal_of(request).visible_cohort(who, cohort_id)
    return render(request, "cohort.html", **cohort_context(request, cohort, who), decided=decided)


def cohort_context(request: Request, cohort: Cohort, who: Principal) -> dict:
    manifest = read_release_json(cohort.path)
    files = cohort_files(cohort, who)
    # The sites' audit.json may be for officers only (officers/): a page shows its reasons only to whoever may
    # read that file, and everyone else the verdict the signed release.json states.
    audit_rel = (manifest.get("reports") or {}).get("audit", "audit/audit.json")
    verdict = {"status": manifest.get("audit_verdict"), "reasons": []}
    if audit_rel in files and may_read_file(who.role, audit_rel):
        try:
            verdict = json.loads((cohort.path / audit_rel).read_text()).get("verdict") or {}
        except (OSError, ValueError, AttributeError):
            verdict = {"status": "unreadable", "reasons": [f"{audit_rel} could not be read"]}
    if cohort.problems:  # a changed audit.json is not the audit the officers are asked to sign off
        verdict = {"status": "not shown", "reasons": ["the cohort is invalid (see above)"]}
    reports = [
        {
            "rel": rel,
            "title": ("Officers' report: " if officers_only(rel) else "Audit report: ") + rel,
            "frame_title": "officers' report" if officers_only(rel) else "audit report",
        }
        for rel in files
        if rel.endswith(".html") and not cohort.problems
    ]
    return {
        "title": f"Cohort {cohort.id}",
        "who": who,
        "cohort": cohort,
        "manifest": manifest,
        "gate": manifest.get("gate") or {},
        "withheld": manifest.get("withheld") or {},
        "verdict": verdict,
        "release_sha256": release_sha256(cohort.path),
        "decisions": portal_of(request).store.approvals(cohort.id),
        "files": sorted(files),
        "reports": reports,
        "can_decide": who.role == "officer" and cohort.status == "pending",
    }
