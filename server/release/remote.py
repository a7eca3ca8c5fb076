"""Talking to the portal from the command line (`fedsynth pull`, `fedsynth portal approve|reject`): the HTTPS
client, errors that say what to do next, and the officer's decision signed on the officer's own machine.

Light on purpose: httpx, cryptography and fedsynth's common/ and release format only, so a partner's install
(`pip install "fedsynth[pull]"`) needs neither torch nor flwr nor MONAI.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from pathlib import Path
from urllib.parse import quote

import httpx

from common.signing import fingerprint, load_private_key, load_public_key, public_key_pem, verify
from server.release.manifest import NAME, sign_approval

TOKEN = re.compile(r"\A[A-Za-z0-9._~+/=-]{1,200}\Z")  # what `fedsynth portal token` prints


class PortalError(Exception):
    """A portal operation failed; the message says why and what to do. `resumable`: running the same command
    again may succeed (a network failure), so a partial download is worth keeping."""

    def __init__(self, message: str, *, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


def portal_client(portal: str, token: str, ca: Path | None, timeout: float) -> httpx.Client:
    """An HTTPS client for the portal, authenticated with `token`, trusting `ca` (else the system's CAs)."""
    if not isinstance(portal, str) or not portal.startswith("https://"):
        raise PortalError(
            f"portal {portal!r}: must be an https:// URL (the token and the cohort travel over TLS)"
        )
    if not token:
        raise PortalError(
            "no token: pass --token TOKEN or set FEDSYNTH_TOKEN (the portal's admin issues tokens with "
            "`fedsynth portal token`)"
        )
    if not TOKEN.match(token):
        raise PortalError(
            "the token holds characters no portal token has (spaces, quotes, line breaks?): copy it "
            "again exactly as `fedsynth portal token` printed it"
        )
    if ca is not None and not Path(ca).is_file():
        raise PortalError(f"{ca}: CA certificate not found (--ca)")
    try:
        ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl.create_default_context()
    except ssl.SSLError as err:
        raise PortalError(f"{ca}: not a CA certificate in PEM form ({err})") from None
    return httpx.Client(
        base_url=portal.rstrip("/"),
        verify=ctx,
        timeout=timeout,
        follow_redirects=False,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )


def transport_error(portal: str, err: httpx.HTTPError, ca: Path | None) -> PortalError:
    """What a failed connection or transfer means for the person running the command."""
    text = str(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        hint = (
            f"the certificate of {portal} does not verify with {ca}: is it the CA of this portal, and "
            "does the URL use the name or address its certificate was made for?"
            if ca
            else "the portal's TLS certificate is not signed by a CA this machine trusts: pass the CA "
            "certificate of the portal with --ca ca.crt (ask the portal's admin for it)"
        )
        return PortalError(f"portal {portal}: {hint} ({text})")
    if isinstance(err, httpx.ConnectError):
        return PortalError(
            f"portal {portal}: cannot connect ({text}): check the address and port, and that the portal is "
            "running",
            resumable=True,
        )
    return PortalError(
        f"portal {portal}: {type(err).__name__}: {text}: the connection failed; run the same command again",
        resumable=True,
    )


def check(r: httpx.Response, what: str) -> httpx.Response:
    """`r` if it succeeded, else a PortalError that says what the refusal means and what to do."""
    if r.status_code in (200, 206):
        return r
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        detail = r.text[:200]
    code = r.status_code
    hint = {
        401: "the portal does not accept this token (unknown, revoked or expired): ask the portal's admin "
        "for a new one",
        403: "this token's role may not do this",
        404: "not available to you on this portal: it does not exist, or it is not released (pending, "
        "blocked by the release policy, rejected, or invalid because its files no longer match the "
        "signed release). Nothing can be downloaded; ask the consortium when it will be released",
        409: "refused in the cohort's present state",
        413: "the request was too large for the portal",
        429: f"too many failed sign-ins from this address: wait {r.headers.get('retry-after', 'a few')} "
        "seconds, and check the token",
    }.get(code, "the portal failed; try again later" if code >= 500 else "")
    message = f"{what}: HTTP {code}: {hint}" + (f" ({detail})" if detail else "")
    raise PortalError(message, resumable=code >= 500)


def cohort_path(cohort_id: str) -> str:
    if not isinstance(cohort_id, str) or not NAME.match(cohort_id):
        raise PortalError(
            f"cohort id {cohort_id!r}: not a valid cohort id (letters, digits, '.', '_', '-')"
        )
    return f"/api/cohorts/{quote(cohort_id)}"


def decide(
    cohort_id: str,
    portal: str,
    token: str,
    key: Path,
    decision: str,
    reason: str = "",
    *,
    ca: Path | None = None,
    consortium_key: Path | None = None,
    timeout: float = 60.0,
) -> dict:
    """An officer's approval or rejection of a cohort on the portal, signed here with the officer's own key
    (which never leaves this machine). The statement the portal hands out is checked before signing: this
    cohort, this decision and reason, and the sha256 of the release.json the portal serves (whose consortium
    signature is checked too when `consortium_key` is given). Returns the portal's answer (with the new status)."""
    if decision not in ("approve", "reject"):
        raise PortalError(f"decision {decision!r}: must be approve or reject")
    if decision == "reject" and not (reason or "").strip():
        raise PortalError('a rejection needs a reason: --reason "why"')
    base = cohort_path(cohort_id)
    try:
        private = load_private_key(Path(key))
    except (OSError, ValueError) as err:
        raise PortalError(f"{key}: not a readable private key ({err})") from None
    try:
        with portal_client(portal, token, ca, timeout) as client:
            info = check(client.get(base), f"cohort {cohort_id}").json()
            data = check(client.get(f"{base}/files/release.json"), "release.json").content
            if consortium_key is not None:
                sig = check(client.get(f"{base}/files/release.sig"), "release.sig").text.strip()
                if not verify(load_public_key(Path(consortium_key)), sig, data):
                    raise PortalError(
                        f"cohort {cohort_id}: release.json does not carry the consortium's signature "
                        f"(key {consortium_key}): do not sign it"
                    )
            params = {"decision": decision, "reason": reason or ""}
            text = check(client.get(f"{base}/statement", params=params), "statement").text
            st = json.loads(text)
            expected = {
                "cohort_id": cohort_id,
                "decision": decision,
                "reason": reason or "",
                "release_sha256": hashlib.sha256(data).hexdigest(),
            }
            wrong = {k: st.get(k) for k, v in expected.items() if st.get(k) != v}
            if wrong:
                raise PortalError(
                    f"cohort {cohort_id}: the statement the portal asks you to sign differs from what you "
                    f"asked for ({wrong}); nothing was signed"
                )
            officer = st.get("officer")
            listed = (info.get("release") or {}).get("officers") or {}
            if listed.get(officer) != public_key_pem(private.public_key()):
                raise PortalError(
                    f"{key}: not the key release.json names for officer {officer!r} (this key's "
                    f"fingerprint: {fingerprint(private.public_key())[:16]}...): use your own officer key"
                )
            approval = sign_approval(text, Path(key))
            return check(client.post(f"{base}/decision", json=approval), "decision").json()
    except httpx.HTTPError as err:
        raise transport_error(portal, err, ca) from None
