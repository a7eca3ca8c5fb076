"""`fedsynth pull`: a partner downloads a released cohort from the portal and verifies it before using it.

    fedsynth pull COHORT --portal https://portal.example.org:8443 --token T [--out DIR] [--ca ca.crt]
                  [--consortium-key consortium.pub]

Everything lands in `OUT.partial/` first: release.json and release.sig, every file release.json lists that a
partner may read (server.release.access: never `officers/`), and the officers' approvals. Each file's sha256 is
checked against release.json, the consortium's signature of release.json is checked with the consortium key
(from --consortium-key, or, loudly, the key the portal serves: trust on first use), and the release status is
computed here, from the downloaded approvals: it must be "released". Only then is `OUT.partial` renamed to `OUT`.

A network failure keeps `OUT.partial` (the same command resumes it with HTTP Range). Anything that cannot be
resumed (no such cohort for this token, a file or signature that does not verify, a cohort that is not released)
removes `OUT.partial`, exits non-zero and says why; there is never a folder named OUT that did not verify.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx

from common.io import sha256_file
from common.signing import fingerprint, load_public_key, verify
from server.release.access import may_read_file
from server.release.manifest import (
    APPROVAL_FILE,
    load_approvals,
    release_status,
    safe_rel_path,
    verify_release,
)
from server.release.remote import PortalError, check, cohort_path, portal_client, transport_error


class PullError(PortalError):
    """The cohort could not be downloaded or did not verify; the message names the file and the problem."""


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _download(client: httpx.Client, url: str, dest: Path, rel: str, expected: str | None) -> int:
    """Download `url` into `dest`, resuming a partial file with Range, and check its sha256 when `expected` is
    given. Returns the bytes transferred. A file that does not verify is deleted and raises PullError."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if expected and dest.is_file() and sha256_file(dest) == expected:
        return 0
    transferred = 0
    for attempt in range(2):
        have = dest.stat().st_size if (expected and dest.is_file()) else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with client.stream("GET", url, headers=headers) as r:
            if r.status_code == 416 and have:  # the local part is longer than the file: start again
                dest.unlink()
                continue
            if r.status_code not in (200, 206):
                r.read()
            check(r, rel)
            served = r.headers.get("x-sha256")
            if expected and served and served != expected:
                raise PullError(
                    f"{rel}: the portal serves sha256 {served[:16]}..., release.json says "
                    f"{expected[:16]}...: the portal's copy does not match the signed release"
                )
            if r.status_code == 206:
                if not r.headers.get("content-range", "").startswith(f"bytes {have}-"):
                    raise PullError(
                        f"{rel}: the portal answered Range bytes={have}- with "
                        f"{r.headers.get('content-range')!r}"
                    )
                mode = "ab"
            else:
                mode = "wb"
            with open(dest, mode) as f:
                for block in r.iter_bytes(1 << 20):
                    f.write(block)
                    transferred += len(block)
                f.flush()
                os.fsync(f.fileno())
        if not expected:
            return transferred
        got = sha256_file(dest)
        if got == expected:
            return transferred
        dest.unlink()
        if have and attempt == 0:  # resumed onto a bad partial file: download it whole once
            continue
        raise PullError(
            f"{rel}: sha256 {got[:16]}... does not match release.json ({expected[:16]}...): the file "
            "was changed after the consortium signed the release"
        )
    raise PullError(f"{rel}: could not be downloaded")


def pull(
    cohort_id: str,
    portal: str,
    token: str,
    out: Path | None = None,
    *,
    ca: Path | None = None,
    consortium_key: Path | None = None,
    timeout: float = 60.0,
    progress: Callable[[str], None] = print,
    warn: Callable[[str], None] = _err,
) -> Path:
    """Download and verify a released cohort into `out` (default: ./COHORT). Raises PullError on any problem; `err.resumable` says whether `OUT.partial` was kept for the same command to resume."""
    try:
        base = cohort_path(cohort_id)
    except PortalError as err:
        raise PullError(str(err)) from None
    out = Path(out) if out is not None else Path(cohort_id)
    if out.exists():
        raise PullError(
            f"{out} already exists; refusing to overwrite it (remove it or choose --out)"
        )
    partial = out.with_name(out.name + ".partial")
    try:
        return _pull(
            cohort_id,
            base,
            portal,
            token,
            out,
            partial,
            ca,
            consortium_key,
            timeout,
            progress,
            warn,
        )
    except PortalError as err:
        if not err.resumable and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)  # nothing there can ever complete this pull
        if isinstance(err, PullError):
            raise
        raise PullError(str(err), resumable=err.resumable) from None


def _pull(
    cohort_id, base, portal, token, out, partial, ca, consortium_key, timeout, progress, warn
):
    try:
        with portal_client(portal, token, ca, timeout) as client:
            info = check(client.get(base), f"cohort {cohort_id}").json()
            if consortium_key is not None:
                public = load_public_key(Path(consortium_key))
            else:
                pem = check(client.get(f"{base}/consortium.pub"), "consortium.pub").text
                public = load_public_key(pem.encode())
                bar = "!" * 78
                warn(
                    f"{bar}\nWARNING: no --consortium-key given: trusting the consortium key the PORTAL serves "
                    f"(trust on first use).\nWARNING: its fingerprint is {fingerprint(public)}\nWARNING: compare "
                    "it with the fingerprint your consortium published, save the key and pass --consortium-key "
                    f"next time.\n{bar}"
                )
            partial.mkdir(parents=True, exist_ok=True)
            for rel in ("release.json", "release.sig"):  # the root of trust: always fetched whole
                (partial / rel).unlink(missing_ok=True)
                _download(client, f"{base}/files/{rel}", partial / rel, rel, None)
            data = (partial / "release.json").read_bytes()
            if not verify(public, (partial / "release.sig").read_text().strip(), data):
                raise PullError(
                    f"release.json: the signature in release.sig does not verify with the consortium "
                    f"key {fingerprint(public)[:16]}...: release.json was changed or signed by another "
                    "key"
                )
            try:
                manifest = json.loads(data)
            except ValueError as err:
                raise PullError(f"release.json: not valid JSON ({err})") from None
            if manifest.get("cohort_id") != cohort_id:
                raise PullError(
                    f"release.json: describes cohort {manifest.get('cohort_id')!r}, not {cohort_id}"
                )
            listed = manifest.get("files") or {}
            unsafe = [rel for rel in listed if not safe_rel_path(rel)]
            if unsafe:
                raise PullError(f"release.json: unsafe file paths {unsafe[:5]}")
            files = {rel: d for rel, d in listed.items() if may_read_file("partner", rel)}
            approvals = [a for a in info.get("approvals") or [] if APPROVAL_FILE.match(str(a))]
            wanted = set(files) | {"release.json", "release.sig"} | set(approvals)
            for p in sorted(
                partial.rglob("*")
            ):  # leftovers of an earlier attempt this release lacks
                rel = p.relative_to(partial).as_posix()
                if (p.is_file() or p.is_symlink()) and rel not in wanted:
                    p.unlink()
            total = 0
            for i, (rel, digest) in enumerate(sorted(files.items()), 1):
                total += _download(client, f"{base}/files/{quote(rel)}", partial / rel, rel, digest)
                if i % 50 == 0 or i == len(files):
                    progress(f"{i}/{len(files)} files verified ({total / 1e6:.1f} MB transferred)")
            for rel in approvals:
                (partial / rel).unlink(missing_ok=True)
                _download(client, f"{base}/files/{quote(rel)}", partial / rel, rel, None)
    except httpx.HTTPError as err:
        raise transport_error(portal, err, ca) from None
    problems = verify_release(partial, public, role="partner")
    if problems:
        raise PullError(
            f"cohort {cohort_id}: the download does not verify: " + "; ".join(problems[:10])
        )
    status = release_status(partial, load_approvals(partial))
    if status != "released":
        raise PullError(
            f"cohort {cohort_id}: status {status!r} by the downloaded approvals "
            f"({len(approvals)} stored, {manifest.get('required_approvals')} required): not released, so "
            "nothing was kept"
        )
    if out.exists():
        raise PullError(f"{out} appeared while downloading; refusing to overwrite it")
    os.replace(partial, out)
    progress(
        f"cohort {cohort_id}: {len(files)} files verified against release.json, signed by consortium key "
        f"{fingerprint(public)[:16]}..., released by {len(approvals)} officer approval(s): {out}"
    )
    return out
