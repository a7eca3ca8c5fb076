"""The portal under abuse, against the real server (uvicorn, TLS, loopback): oversized and slow requests,
connection floods, password guessing, session theft and cross-site posts, bytes changed on the portal's disk,
hostile Range headers and ids, and officers-only files. Every loop is bounded."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import ssl
import time

import pytest

from common.signing import load_private_key, sign
from server.release.limits import Limits
from server.release.manifest import NAME, manifest_bytes, write_approval
from server.release.portal import PortalSettings, register_release
from server.release.store import Store
from tests.server.portal_helpers import PortalServer, approve, make_consortium, raw_request

LIMITS = Limits(
    max_body=4096, request_timeout=1.5, max_per_client=4, max_auth_failures=3, auth_window=3.0
)


def add_officers_file(release, c) -> None:
    """Put an officers-only file into a release and re-sign release.json (as `release build` will)."""
    (release / "officers").mkdir(exist_ok=True)
    (release / "officers" / "report.html").write_text("<html><body>officers only</body></html>")
    audit = json.loads(
        (release / "officers" / "audit.json").read_text()
    )  # as release build wrote it
    audit["verdict"] = {"status": "pass", "reasons": ["a reason for officer eyes only"]}
    (release / "officers" / "audit.json").write_text(json.dumps(audit))
    manifest = json.loads((release / "release.json").read_text())
    import hashlib

    for rel in ("officers/report.html", "officers/audit.json"):
        manifest["files"][rel] = hashlib.sha256((release / rel).read_bytes()).hexdigest()
    manifest.setdefault("reports", {})["audit"] = "officers/audit.json"
    data = manifest_bytes(manifest)
    (release / "release.json").write_bytes(data)
    (release / "release.sig").write_text(sign(load_private_key(c.consortium_key), data) + "\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("abuse")
    c = make_consortium(root / "consortium")
    data = root / "data"
    for name in ("ok-1", "tamper-1", "secret-1"):
        rel = c.release(name)
        if name == "secret-1":
            add_officers_file(rel, c)
        for officer in ("alice", "bob"):
            write_approval(rel, approve(rel, c, officer))
        register_release(data, rel, consortium_key=c.consortium_pub)
    register_release(data, c.release("pending-1"))
    store = Store(data)
    tok = {n: store.issue_token(r, n)[1] for r, n in (("partner", "acme"), ("officer", "alice"))}
    tok["root"] = store.issue_token("admin", "root")[1]
    settings = PortalSettings(limits=LIMITS)
    with PortalServer(data, root / "pki", settings) as server:
        yield {"c": c, "data": data, "server": server, "tok": tok, "store": store, "root": root}


def tls_socket(server, timeout: float = 10.0) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(server.ca))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def read_all(tls: ssl.SSLSocket, limit: float = 10.0) -> bytes:
    """Everything the server sends until it closes (at most `limit` seconds)."""
    out, end = b"", time.monotonic() + limit
    while time.monotonic() < end:
        try:
            chunk = tls.recv(65536)
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def wait_unthrottled(seconds: float = LIMITS.auth_window + 0.5) -> None:
    time.sleep(seconds)


def test_an_oversized_body_is_refused_before_it_is_read(env):
    s = env["server"]
    with tls_socket(s) as tls:  # declares 200 MB, sends 1 KB: answered at once, connection closed
        tls.sendall(
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: " + s.url.encode() + b"\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 200000000\r\n\r\n"
            + b"t"
            * 1024
        )
        reply = read_all(tls)
    assert reply.startswith(b"HTTP/1.1 413") and b"request body over 4096 bytes" in reply
    with tls_socket(s) as tls:  # no length given: counted while it streams, cut at the cap
        tls.sendall(
            b"POST /api/tokens HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + env["tok"]["root"].encode() + b"\r\n\r\n"
        )
        for _ in range(3):
            tls.sendall(b"800\r\n" + b"x" * 0x800 + b"\r\n")
        reply = read_all(tls)
    assert reply.startswith(b"HTTP/1.1 413")


def test_a_slow_request_is_dropped_and_a_client_holds_few_connections(env):
    s = env["server"]
    with tls_socket(s) as tls:  # headers trickle in: the connection is closed at the deadline
        tls.sendall(b"GET /api/cohorts HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        t0 = time.monotonic()
        assert read_all(tls, limit=8) == b""
        assert time.monotonic() - t0 < 6
    held = [tls_socket(s) for _ in range(LIMITS.max_per_client)]
    try:
        with tls_socket(s) as extra:
            extra.sendall(b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            reply = read_all(extra, limit=5)
        assert reply.startswith(b"HTTP/1.1 503") and b"too many open connections" in reply
    finally:
        for t in held:
            t.close()
    time.sleep(0.5)
    with s.client(env["tok"]["acme"]) as partner:  # the address may connect again
        assert partner.get("/api/cohorts").status_code == 200


def test_failed_authentication_is_throttled_per_client_with_429(env):
    s = env["server"]
    wait_unthrottled(0)
    with s.client("guess-0") as bad, s.client(env["tok"]["acme"]) as partner:
        codes = [bad.get("/api/cohorts").status_code for _ in range(LIMITS.max_auth_failures)]
        assert codes == [401] * LIMITS.max_auth_failures
        r = bad.get("/api/cohorts")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert "too many failed sign-ins" in r.json()["detail"]
        assert partner.get("/api/cohorts").status_code == 429  # no guess is even checked now
        page = s.client().post(
            "/login", data={"token": "x"}, headers={"Origin": s.url, "Accept": "text/html"}
        )
        assert page.status_code == 429 and "<html" in page.text and "Wait" in page.text
        wait_unthrottled()
        assert partner.get("/api/cohorts").status_code == 200
    log = env["store"].access_log(200)
    refused = [e for e in log if e["status"] in (401, 429)]
    assert refused and all(e["client"] == "127.0.0.1" for e in refused)
    assert all(e["agent"].startswith("python-httpx") for e in refused)


def test_every_refusal_admin_read_and_server_error_is_logged_with_the_client(env, monkeypatch):
    s = env["server"]
    with s.client(env["tok"]["root"]) as admin:
        assert admin.get("/no/such/route").status_code == 404
        assert admin.get("/api/tokens").status_code == 200
        from server.release import api

        def broken(*a, **k):
            raise RuntimeError(f"internal detail {env['data']}")

        monkeypatch.setattr(api, "release_sha256", broken)
        r = admin.get("/api/cohorts/ok-1")
        assert r.status_code == 500 and str(env["data"]) not in r.text
        monkeypatch.undo()
    with s.client(env["tok"]["root"]) as admin:  # uvicorn closes a connection after a server error
        log = admin.get("/api/access-log").json()["entries"]
    seen = {(e["what"], e["status"]) for e in log}
    assert {("/no/such/route", 404), ("/api/tokens", 200), ("/api/cohorts/ok-1", 500)} <= seen
    mine = [
        e
        for e in log
        if e["what"] in ("/no/such/route", "/api/tokens", "/api/cohorts/ok-1")
        and e["method"] == "GET"
    ]
    assert all(e["client"] == "127.0.0.1" and e["agent"].startswith("python-httpx") for e in mine)
    for _ in range(50):  # the row is written just after the reply is sent
        if any(e["what"] == "/api/access-log" for e in env["store"].access_log(50)):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the admin's read of the access log was not logged")


def test_access_log_retention_deletes_old_rows(env):
    store = env["store"]
    db = sqlite3.connect(store.path)
    db.execute(
        "INSERT INTO access_log (at, who, role, method, what, status, bytes) "
        "VALUES ('2020-01-01T00:00:00+00:00', 'x', '-', 'GET', '/old', 200, 0)"
    )
    db.commit()
    db.close()
    assert store.prune_log(90) == 1
    assert all(e["what"] != "/old" for e in store.access_log(10000))


def _login(client, server, token):
    r = client.post("/login", data={"token": token}, headers={"Origin": server.url})
    assert r.status_code == 303, r.text
    return r.headers["set-cookie"].split(";")[0].split("=", 1)[1]


def test_sessions_are_server_side_revoked_at_logout_and_bound_to_the_token(env):
    s, store = env["server"], env["store"]
    tid, token = store.issue_token("officer", "alice")
    with s.client() as browser:
        assert browser.post("/login", data={"token": token}).status_code == 403  # no Origin
        r = browser.post(
            "/login", data={"token": token}, headers={"Origin": "https://evil.example"}
        )
        assert r.status_code == 403
        session = _login(browser, s, token)
        browser.cookies.set("fedsynth_session", session, domain="127.0.0.1")
        assert browser.get("/").status_code == 200
        assert browser.post("/logout").status_code == 403  # a cross-site logout is refused too
        assert browser.post("/logout", headers={"Origin": s.url}).status_code == 303
        browser.cookies.set("fedsynth_session", session, domain="127.0.0.1")  # a copied cookie
        assert (
            browser.get("/").status_code == 303 and browser.get("/api/cohorts").status_code == 401
        )
        session = _login(browser, s, token)  # revoking the token ends its sessions
        browser.cookies.set("fedsynth_session", session, domain="127.0.0.1")
        assert browser.get("/").status_code == 200
        store.revoke_token(tid)
        assert browser.get("/").status_code == 303
    _, short = store.issue_token("partner", "brief", days=2 / 86400)  # a 2-second token
    with s.client() as browser:
        r = browser.post("/login", data={"token": short}, headers={"Origin": s.url})
        assert "max-age=" in r.headers["set-cookie"].lower()
        age = int(r.headers["set-cookie"].lower().split("max-age=")[1].split(";")[0])
        assert age <= 2
        browser.cookies.set(
            "fedsynth_session",
            r.headers["set-cookie"].split(";")[0].split("=", 1)[1],
            domain="127.0.0.1",
        )
        time.sleep(2.5)
        assert browser.get("/api/cohorts").status_code == 401


def test_changed_bytes_make_a_cohort_invalid_hidden_from_partners_and_explained_to_officers(env):
    s, data = env["server"], env["data"]
    labels = data / "cohorts" / "tamper-1" / "cohort" / "labels.csv"
    original = labels.read_bytes()
    with s.client(env["tok"]["acme"]) as partner, s.client(env["tok"]["alice"]) as officer:
        assert partner.get("/api/cohorts/tamper-1").json()["status"] == "released"
        labels.write_bytes(original.replace(b"lesion", b"healthy"))
        try:
            assert "tamper-1" not in [
                c["cohort_id"] for c in partner.get("/api/cohorts").json()["cohorts"]
            ]
            assert partner.get("/api/cohorts/tamper-1").status_code == 404
            assert partner.get("/api/cohorts/tamper-1/files/cohort/labels.csv").status_code == 404
            info = officer.get("/api/cohorts/tamper-1").json()
            assert info["status"] == "invalid"
            assert info["problems"] == [
                "cohort/labels.csv: sha256 does not match the signed release.json"
            ]
            r = officer.get("/api/cohorts/tamper-1/files/cohort/labels.csv")
            assert r.status_code == 409 and b"healthy" not in r.content
            page = officer.get("/cohorts/tamper-1")
            assert "Invalid" in page.text and "cohort/labels.csv: sha256" in page.text
        finally:
            labels.write_bytes(original)
        assert partner.get("/api/cohorts/tamper-1").json()["status"] == "released"  # re-checked


def test_a_changed_audit_of_a_pending_cohort_is_not_shown_as_the_signed_one(env):
    audit = env["data"] / "cohorts" / "pending-1" / "officers" / "audit.json"
    original = audit.read_bytes()
    doc = json.loads(original)
    doc["verdict"] = {"status": "pass", "reasons": ["edited on the portal"]}
    audit.write_text(json.dumps(doc))
    try:
        with env["server"].client(env["tok"]["alice"]) as officer:
            page = officer.get("/cohorts/pending-1")
            assert "officers/audit.json: sha256 does not match" in page.text
            assert "edited on the portal" not in page.text and "iframe" not in page.text
            assert (
                officer.get("/api/cohorts/pending-1/files/officers/audit.json").status_code == 409
            )
    finally:
        audit.write_bytes(original)


def test_hostile_range_headers_ids_and_paths_get_clear_4xx(env):
    s, tok = env["server"], env["tok"]
    with s.client(tok["acme"]) as partner:
        url = "/api/cohorts/ok-1/files/cohort/labels.csv"
        for rng in ("bytes=0-" + "9" * 5000, "bytes=" + "1" * 5000 + "-", "bytes=-" + "9" * 5000):
            r = partner.get(url, headers={"Range": rng})
            assert r.status_code == 416, rng[:20]
    assert NAME.match("ok-1\n") is None
    for target in ("/api/cohorts/ok-1%0A", "/api/cohorts/ok-1%0A/files/release.json"):
        status, reply = raw_request(s, target, tok["acme"])
        assert status == 404, target
    incoming = env["data"] / "incoming" / "bad-1"
    shutil.copytree(env["c"].release("bad-1"), incoming)
    (incoming / "cohort" / "labels.csv").write_text("synthetic_id,class\n")
    with s.client(tok["root"]) as admin:
        r = admin.post("/api/cohorts", json={"path": "incoming/bad-1"})
        assert r.status_code == 400 and "labels.csv" in r.json()["detail"]
        assert str(env["data"]) not in r.text and str(env["root"]) not in r.text


def test_refusals_are_html_pages_for_people_and_json_for_programs(env):
    s = env["server"]
    with s.client(env["tok"]["acme"]) as partner:
        page = partner.get("/cohorts/pending-1", headers={"Accept": "text/html"})
        assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
        assert "no cohort" in page.text and "Back to the cohorts" in page.text
        api = partner.get("/api/cohorts/pending-1")
        assert api.status_code == 404 and api.json()["detail"].startswith("no cohort")
    with s.client() as anon:
        page = anon.get("/api/cohorts/ok-1/files/release.json", headers={"Accept": "text/html"})
        assert page.status_code == 401 and "Sign in" in page.text


def test_officers_only_files_are_never_listed_or_served_to_partners(env, tmp_path):
    s = env["server"]
    with s.client(env["tok"]["acme"]) as partner, s.client(env["tok"]["alice"]) as officer:
        info = partner.get("/api/cohorts/secret-1").json()
        assert info["status"] == "released"
        assert not any(f.startswith("officers/") for f in info["files"])
        assert partner.get("/api/cohorts/secret-1/files/officers/report.html").status_code == 404
        page = partner.get("/cohorts/secret-1")
        assert "officers/" not in page.text and "officer eyes only" not in page.text
        assert "officer eyes only" in officer.get("/cohorts/secret-1").text
        assert "officers/report.html" in officer.get("/api/cohorts/secret-1").json()["files"]
        r = officer.get("/api/cohorts/secret-1/files/officers/report.html")
        assert r.status_code == 200 and b"officers only" in r.content
    from server.release.manifest import verify_release
    from server.release.pull import pull

    out = pull(
        "secret-1",
        s.url,
        env["tok"]["acme"],
        tmp_path / "secret-1",
        ca=s.ca,
        consortium_key=env["c"].consortium_pub,
        progress=lambda m: None,
    )
    assert not (out / "officers").exists()
    assert verify_release(out, env["c"].consortium_pub, role="partner") == []
    assert any("officers/report.html" in p for p in verify_release(out, env["c"].consortium_pub))
