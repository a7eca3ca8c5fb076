"""A privacy officer in a real (headless) browser: signs in, reads the audit verdict and the policy gate of a
candidate, signs the approval with their own key file in the page (WebCrypto Ed25519, the key is never uploaded),
and the cohort is released; then a partner pulls it and it verifies."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from server.release.manifest import check_approval, verify_release
from server.release.portal import register_release
from server.release.pull import pull
from server.release.store import Store
from tests.server.portal_helpers import PortalServer, approve, make_consortium

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = pytest.mark.skipif(
    sync_playwright is None or not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None,
    reason="needs the playwright python package and Debian's chromium at /usr/bin/chromium "
    "(apt-get install chromium; pip install playwright; never `playwright install`)",
)


def test_officer_approves_in_the_browser_and_a_partner_pulls(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    c = make_consortium(tmp_path / "consortium")
    data = tmp_path / "data"
    register_release(data, c.release("browser-1"), consortium_key=c.consortium_pub)
    store = Store(data)
    alice, acme, bob = (
        store.issue_token("officer", "alice")[1],
        store.issue_token("partner", "acme")[1],
        store.issue_token("officer", "bob")[1],
    )
    release = data / "cohorts" / "browser-1"
    with PortalServer(data, tmp_path / "pki") as server:
        with server.client(bob) as cli:  # the other officer decided on the command line
            r = cli.post("/api/cohorts/browser-1/decision", json=approve(release, c, "bob"))
            assert r.status_code == 200 and r.json()["status"] == "pending"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            try:
                page = browser.new_context(ignore_https_errors=True).new_page()
                sent: list[str] = []
                page.on("request", lambda req: sent.append((req.url or "") + (req.post_data or "")))
                page.goto(f"{server.url}/cohorts/browser-1")
                assert page.url.endswith("/login")  # not signed in yet
                page.fill("#token", alice)
                page.click("#login")
                page.wait_for_url(f"{server.url}/")
                page.click("text=browser-1")
                page.wait_for_url(f"{server.url}/cohorts/browser-1")
                assert page.inner_text("#status") == "pending"
                assert page.inner_text("#verdict") == "pass"
                assert page.inner_text("#gate") == "passed"
                rows = page.locator("#gate-table tr").all_inner_texts()
                assert (
                    any(r.startswith("max_epsilon") and "pass" in r for r in rows)
                    and len(rows) >= 10
                )
                assert page.evaluate("document.querySelector('img.preview').naturalWidth") > 0
                assert page.locator("iframe[title='audit report']").count() == 1
                assert "bob" in page.inner_text("#decisions")
                page.set_input_files("#keyfile", str(c.officer_keys["alice"]))
                page.check("input[name=decision][value=approve]")
                page.fill("#reason", "gate passed; audit read")
                page.click("#sign")
                page.wait_for_url("**/cohorts/browser-1?decided=1", timeout=15000)  # refreshed
                assert page.get_attribute("#result", "data-status") == "released", page.inner_text(
                    "#result"
                )
                assert page.inner_text("#status") == "released"
                assert page.locator("#decision-form").count() == 0  # nothing left to decide
                page.click("#logout")
                page.wait_for_url(f"{server.url}/login")
                page.goto(f"{server.url}/cohorts/browser-1")
                assert page.url.endswith("/login")  # the session ended on the server
            finally:
                browser.close()
        key_body = "".join(c.officer_keys["alice"].read_text().splitlines()[1:-1])
        assert sent and not any(
            "PRIVATE KEY" in s or key_body in s for s in sent
        )  # the key never left
        approval = json.loads((release / "approvals" / "alice.json").read_text())
        assert check_approval(release, approval) == []
        assert json.loads(approval["statement"])["reason"] == "gate passed; audit read"
        out = pull(
            "browser-1",
            server.url,
            acme,
            tmp_path / "pulled",
            ca=server.ca,
            consortium_key=c.consortium_pub,
            progress=lambda m: None,
        )
    assert verify_release(out, c.consortium_pub, role="partner") == []
