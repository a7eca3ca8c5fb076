"""The partner portal against the real server (uvicorn, TLS, a SQLite file): tokens, roles, hostile paths and ids,
Range downloads, and the officers' signed decisions that release a cohort."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3

import pytest

from server.cli import main as cli_main
from server.release.api import RangeNotSatisfiable, parse_range
from server.release.manifest import write_approval
from server.release.portal import register_release
from server.release.store import Store
from tests.privacy.test_policy import privacy_json
from tests.server.portal_helpers import PortalServer, approve, make_consortium, raw_request

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("portal")
    c = make_consortium(root / "consortium")
    data = root / "data"
    for name in ("pending-1", "released-1", "traversal-1"):
        register_release(data, c.release(name), consortium_key=c.consortium_pub)
    register_release(data, c.release("blocked-1", epsilon=50.0))
    rel = data / "cohorts" / "released-1"
    store = Store(data)
    for officer in ("alice", "bob"):  # approved on the command line before the server starts
        a = approve(rel, c, officer)
        write_approval(rel, a)
        store.add_approval(
            "released-1",
            officer,
            "approve",
            "",
            a["statement"],
            a["signature"],
            json.loads(a["statement"])["at"],
        )
    tokens = {}
    for role, name in (
        ("admin", "root"),
        ("partner", "acme"),
        ("officer", "alice"),
        ("officer", "bob"),
        ("partner", "gone"),
    ):
        tokens[name] = store.issue_token(role, name)
    with PortalServer(data, root / "pki") as server:
        yield {
            "c": c,
            "data": data,
            "server": server,
            "tok": {k: v[1] for k, v in tokens.items()},
            "ids": {k: v[0] for k, v in tokens.items()},
            "store": store,
        }


def test_tokens_are_stored_only_as_hashes_in_a_wal_database_with_a_schema_version(env):
    db = sqlite3.connect(env["data"] / "portal.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"
    dump = "\n".join(db.iterdump())
    assert (
        env["tok"]["acme"] not in dump
        and hashlib.sha256(env["tok"]["acme"].encode()).hexdigest() in dump
    )


def test_no_bad_or_revoked_token_is_401(env):
    s = env["server"]
    with s.client() as anon:
        r = anon.get("/api/cohorts")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    with s.client("not-a-token") as bad:
        assert bad.get("/api/cohorts").status_code == 401
        assert bad.get("/api/cohorts/released-1/files/release.json").status_code == 401
    with s.client(env["tok"]["gone"]) as gone, s.client(env["tok"]["root"]) as admin:
        assert gone.get("/api/cohorts").status_code == 200
        assert admin.delete(f"/api/tokens/{env['ids']['gone']}").status_code == 200
        assert gone.get("/api/cohorts").status_code == 401
        assert gone.get("/api/cohorts/released-1/files/release.json").status_code == 401
        assert (
            admin.delete(f"/api/tokens/{env['ids']['gone']}").status_code == 404
        )  # already revoked
    with s.client() as anon:
        assert (
            anon.get(
                "/api/cohorts", headers={"Authorization": f"Basic {env['tok']['acme']}"}
            ).status_code
            == 401
        )


def test_roles_partner_sees_only_released_and_no_officer_or_admin_route(env):
    s, tok = env["server"], env["tok"]
    with s.client(tok["acme"]) as partner:
        listed = partner.get("/api/cohorts").json()["cohorts"]
        assert [c["cohort_id"] for c in listed] == ["released-1"]
        for cid in ("pending-1", "blocked-1"):  # as if they did not exist: 404, same text
            for what in ("", "/files/release.json", "/files/cohort/labels.csv", "/consortium.pub"):
                r = partner.get(f"/api/cohorts/{cid}{what}")
                missing = partner.get(f"/api/cohorts/no-such-{cid}{what}")
                assert r.status_code == missing.status_code == 404
                assert r.json()["detail"].replace(cid, "X") == missing.json()["detail"].replace(
                    f"no-such-{cid}", "X"
                )
        assert partner.get("/api/cohorts/released-1").json()["status"] == "released"
        assert partner.get("/api/cohorts/pending-1/statement").status_code == 403
        assert (
            partner.post(
                "/api/cohorts/released-1/decision", json={"statement": "{}", "signature": ""}
            ).status_code
            == 403
        )
        assert partner.post("/api/tokens", json={"role": "admin", "name": "me"}).status_code == 403
        assert partner.get("/api/access-log").status_code == 403
    with s.client(tok["alice"]) as officer:
        statuses = {
            c["cohort_id"]: c["status"] for c in officer.get("/api/cohorts").json()["cohorts"]
        }
        assert statuses == {
            "pending-1": "pending",
            "released-1": "released",
            "traversal-1": "pending",
            "blocked-1": "blocked",
        }
        assert officer.post("/api/tokens", json={"role": "admin", "name": "me"}).status_code == 403
        assert officer.delete(f"/api/tokens/{env['ids']['acme']}").status_code == 403
        assert officer.post("/api/cohorts", json={"path": "cohorts/pending-1"}).status_code == 403
        assert officer.get("/api/tokens").status_code == 403


@pytest.mark.parametrize(
    "target",
    [
        "/api/cohorts/traversal-1/files/../../portal.db",
        "/api/cohorts/traversal-1/files/..%2F..%2Fportal.db",
        "/api/cohorts/traversal-1/files/%2e%2e/%2e%2e/portal.db",
        "/api/cohorts/traversal-1/files/cohort/%2e%2e/%2e%2e/%2e%2e/portal.db",
        "/api/cohorts/traversal-1/files//etc/passwd",
        "/api/cohorts/traversal-1/files/%2Fetc%2Fpasswd",
        "/api/cohorts/traversal-1/files/cohort\\..\\..\\portal.db",
        "/api/cohorts/traversal-1/files/cohort/./labels.csv",
        "/api/cohorts/traversal-1/files/approvals/../release.json",
        "/api/cohorts/traversal-1/files/cohort%00/labels.csv",
        "/api/cohorts/traversal-1/files/secret.txt",  # a file in the folder that release.json does not list
        "/api/cohorts/traversal-1/files/cohort/link.csv",  # a symlink planted in the folder
        "/api/cohorts/traversal-1/files/approvals/evil.json",  # a symlinked 'approval'
        "/api/cohorts/traversal-1/files/",
        "/api/cohorts/..%2Fcohorts%2Freleased-1/files/release.json",
        "/api/cohorts/%2e%2e/files/release.json",
        "/api/cohorts/.hidden",
        "/api/cohorts/a;b",
        "/api/cohorts/a%20b",
        "/api/cohorts/" + "x" * 300,
        "/api/cohorts/no-such-cohort",
    ],
)
def test_traversal_and_malformed_ids_are_rejected(env, target):
    rel = env["data"] / "cohorts" / "traversal-1"
    if not (rel / "secret.txt").exists():
        (rel / "secret.txt").write_text("not part of the release\n")
        os.symlink(env["data"] / "portal.db", rel / "cohort" / "link.csv")
        (rel / "approvals").mkdir(exist_ok=True)
        os.symlink("/etc/passwd", rel / "approvals" / "evil.json")
    status, reply = raw_request(env["server"], target, env["tok"]["alice"])
    assert status in (400, 404), (target, reply[:300])
    assert (
        b"SQLite format" not in reply
        and b"root:" not in reply
        and b"not part of the release" not in reply
    )


def test_listed_symlink_is_refused_even_when_release_json_lists_it(env, tmp_path):
    rel = env["data"] / "cohorts" / "traversal-1"
    target = rel / "cohort" / "labels.csv"
    saved = tmp_path / "labels.csv"
    shutil.copy2(target, saved)
    target.unlink()
    os.symlink(env["data"] / "portal.db", target)
    try:
        status, reply = raw_request(
            env["server"], "/api/cohorts/traversal-1/files/cohort/labels.csv", env["tok"]["alice"]
        )
        assert status == 404 and b"SQLite format" not in reply
    finally:
        target.unlink()
        shutil.copy2(saved, target)


def test_download_range_resume_and_digest(env):
    rel_dir = env["data"] / "cohorts" / "released-1"
    manifest = json.loads((rel_dir / "release.json").read_text())
    name = next(r for r in manifest["files"] if r.endswith(".nii.gz"))
    data = (rel_dir / name).read_bytes()
    size = len(data)
    with env["server"].client(env["tok"]["acme"]) as partner:
        full = partner.get(f"/api/cohorts/released-1/files/{name}")
        assert full.status_code == 200 and full.content == data
        assert (
            full.headers["x-sha256"] == manifest["files"][name] == hashlib.sha256(data).hexdigest()
        )
        assert (
            full.headers["digest"].startswith("sha-256=")
            and full.headers["accept-ranges"] == "bytes"
        )
        head = partner.get(f"/api/cohorts/released-1/files/{name}", headers={"Range": "bytes=0-9"})
        assert head.status_code == 206 and head.content == data[:10]
        assert head.headers["content-range"] == f"bytes 0-9/{size}"
        rest = partner.get(f"/api/cohorts/released-1/files/{name}", headers={"Range": "bytes=10-"})
        assert rest.status_code == 206 and head.content + rest.content == data
        tail = partner.get(f"/api/cohorts/released-1/files/{name}", headers={"Range": "bytes=-7"})
        assert tail.status_code == 206 and tail.content == data[-7:]
        for bad in (
            f"bytes={size}-",
            f"bytes={size + 100}-{size + 200}",
            "bytes=9-3",
            "bytes=abc",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=-0",
        ):
            r = partner.get(f"/api/cohorts/released-1/files/{name}", headers={"Range": bad})
            assert r.status_code == 416, bad
            assert r.headers["content-range"] == f"bytes */{size}"
    with env["server"].client(env["tok"]["root"]) as admin:
        log = admin.get("/api/access-log").json()["entries"]
    downloads = [e for e in log if e["what"].endswith(name) and e["who"].startswith("partner:acme")]
    assert {e["status"] for e in downloads} >= {200, 206, 416}
    assert any(e["status"] == 200 and e["bytes"] == size for e in downloads)
    assert any(e["status"] == 206 and e["bytes"] == 10 for e in downloads)


def test_parse_range_unit():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=2-", 10) == (2, 9)
    assert parse_range("bytes=2-100", 10) == (2, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    for bad in ("bytes=10-", "bytes=", "bytes=-", "bytes=3-2", "bytes=1-2,4-5", "bytes=-1"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 10 if bad != "bytes=-1" else 0)


def test_officers_approve_and_the_cohort_is_released(env):
    c, s, tok = env["c"], env["server"], env["tok"]
    rel = env["data"] / "cohorts" / "pending-1"
    with (
        s.client(tok["alice"]) as alice,
        s.client(tok["bob"]) as bob,
        s.client(tok["acme"]) as partner,
    ):
        statement = alice.get(
            "/api/cohorts/pending-1/statement", params={"decision": "approve", "reason": "ok"}
        )
        assert statement.status_code == 200 and json.loads(statement.text)["officer"] == "alice"
        from server.release.manifest import sign_approval

        signed = sign_approval(statement.text, c.officer_keys["alice"])
        # not alice: a statement made out to alice and posted with bob's token, and one signed with the wrong key
        assert bob.post("/api/cohorts/pending-1/decision", json=signed).status_code == 403
        forged = sign_approval(statement.text, c.officer_keys["bob"])
        r = alice.post("/api/cohorts/pending-1/decision", json=forged)
        assert r.status_code == 400 and "signature" in r.json()["detail"]
        other = approve(env["data"] / "cohorts" / "traversal-1", c, "alice")
        r = alice.post("/api/cohorts/pending-1/decision", json=other)
        assert r.status_code == 400 and "traversal-1" in r.json()["detail"]
        assert (
            alice.post(
                "/api/cohorts/pending-1/decision", json={"statement": statement.text}
            ).status_code
            == 400
        )
        assert (
            alice.post("/api/cohorts/pending-1/decision", content=b"{not json").status_code == 400
        )
        assert (
            alice.get("/api/cohorts/pending-1/statement", params={"decision": "reject"}).status_code
            == 400
        )
        assert (
            alice.get("/api/cohorts/pending-1/statement", params={"decision": "maybe"}).status_code
            == 400
        )
        r = alice.post("/api/cohorts/pending-1/decision", json=signed)
        assert r.status_code == 200 and r.json()["status"] == "pending"  # two approvals required
        assert alice.post("/api/cohorts/pending-1/decision", json=signed).status_code == 409
        assert partner.get("/api/cohorts/pending-1").status_code == 404
        r = bob.post("/api/cohorts/pending-1/decision", json=approve(rel, c, "bob"))
        assert r.status_code == 200 and r.json()["status"] == "released"
        info = partner.get("/api/cohorts/pending-1").json()
        assert info["status"] == "released" and info["approvals"] == [
            "approvals/alice.json",
            "approvals/bob.json",
        ]
        assert partner.get("/api/cohorts/pending-1/files/approvals/alice.json").json() == signed
        assert "pending-1" in [
            x["cohort_id"] for x in partner.get("/api/cohorts").json()["cohorts"]
        ]
    assert (
        json.loads((rel / "approvals" / "alice.json").read_text())["signature"]
        == signed["signature"]
    )
    assert env["store"].cohort("pending-1")["status"] == "released"


def test_a_blocked_cohort_cannot_be_approved(env):
    c, s = env["c"], env["server"]
    with s.client(env["tok"]["alice"]) as alice:
        r = alice.post(
            "/api/cohorts/blocked-1/decision",
            json=approve(env["data"] / "cohorts" / "blocked-1", c, "alice"),
        )
        assert r.status_code == 409 and "gate" in r.json()["detail"]
        page = alice.get("/api/cohorts/blocked-1").json()
        assert page["status"] == "blocked" and not page["release"]["gate"]["passed"]


def test_admin_issues_tokens_and_registers_a_release_under_the_data_dir(env):
    c, s = env["c"], env["server"]
    incoming = env["data"] / "incoming" / "new-1"
    shutil.copytree(c.release("new-1"), incoming)
    with s.client(env["tok"]["root"]) as admin:
        for bad in ("../consortium", "/etc", "", "cohorts", "incoming/none"):
            assert admin.post("/api/cohorts", json={"path": bad}).status_code == 400, bad
        r = admin.post("/api/tokens", json={"role": "officer", "name": "carol"})
        assert r.status_code == 200
        assert admin.post("/api/tokens", json={"role": "root", "name": "x"}).status_code == 400
        assert (
            admin.post("/api/tokens", json={"role": "partner", "name": "../x"}).status_code == 400
        )
        carol = r.json()
        r = admin.post("/api/cohorts", json={"path": "incoming/new-1"})
        assert r.status_code == 200 and r.json() == {"cohort_id": "new-1", "status": "pending"}
        assert (
            env["data"] / "cohorts" / "new-1" / "release.json"
        ).exists() and not incoming.exists()
        assert admin.post("/api/cohorts", json={"path": "cohorts/new-1"}).status_code == 409
        tampered = env["data"] / "incoming" / "new-2"
        shutil.copytree(c.release("new-2"), tampered)
        (tampered / "cohort" / "labels.csv").write_text("synthetic_id,class\n")
        r = admin.post("/api/cohorts", json={"path": "incoming/new-2"})
        assert r.status_code == 400 and "labels.csv" in r.json()["detail"]
        assert {t["name"] for t in admin.get("/api/tokens").json()["tokens"]} >= {"carol", "root"}
    with s.client(carol["token"]) as officer:
        assert officer.get("/api/cohorts/new-1").json()["status"] == "pending"


def test_cli_token_revoke_and_add(env, tmp_path, capsys):
    c = env["c"]
    data = tmp_path / "data"
    assert (
        cli_main(["portal", "token", "--data", str(data), "--role", "partner", "--name", "zed"])
        == 0
    )
    out = capsys.readouterr().out
    token_id, token = out.split()[2], out.strip().splitlines()[-1]
    store = Store(data)
    assert store.principal(token).name == "zed"
    assert cli_main(["portal", "revoke", "--data", str(data), "--token-id", token_id]) == 0
    assert store.principal(token) is None
    assert cli_main(["portal", "revoke", "--data", str(data), "--token-id", token_id]) == 2
    release = c.release("cli-1")
    assert (
        cli_main(["portal", "add", "--data", str(data), str(release)]) == 2
    )  # no consortium key yet
    assert "--consortium-key" in capsys.readouterr().out
    assert (
        cli_main(
            [
                "portal",
                "add",
                "--data",
                str(data),
                str(release),
                "--consortium-key",
                str(c.consortium_pub),
            ]
        )
        == 0
    )
    assert store.cohort("cli-1")["status"] == "pending" and (data / "consortium.pub").exists()
    assert cli_main(["portal", "add", "--data", str(data), str(release)]) == 2  # already registered


def test_login_session_and_pages(env):
    s = env["server"]
    origin = {"Origin": s.url}
    with s.client() as browser:
        assert browser.get("/").status_code == 303
        bad = browser.post("/login", data={"token": "nope"}, headers=origin)
        assert bad.status_code == 401 and "Unknown, revoked or expired" in bad.text
        r = browser.post("/login", data={"token": env["tok"]["bob"]}, headers=origin)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        session = cookie.split(";")[0].split("=", 1)[1]
        assert (
            session != env["tok"]["bob"] and env["tok"]["bob"] not in cookie
        )  # a session id, not the token
        low = cookie.lower()
        assert "httponly" in low and "secure" in low and "samesite=strict" in low
        browser.cookies.set("fedsynth_session", session, domain="127.0.0.1")
        index = browser.get("/")
        assert index.status_code == 200 and "blocked-1" in index.text
        page = browser.get("/cohorts/blocked-1")
        assert page.status_code == 200 and "gate-table" in page.text and "max_epsilon" in page.text
        assert (
            "FAIL" in page.text and "script-src 'self'" in page.headers["content-security-policy"]
        )
        assert (
            "<script>" not in page.text and "style=" not in page.text
        )  # scripts and styles are files
        assert (
            "near-copies found" in page.text
        )  # each gate line shows its note (what was measured, or not)
        # a cookie-authenticated write from another site (no Origin, or a foreign one) is refused
        for headers in ({}, {"Origin": "https://evil.example", "X-Fedsynth-Request": "1"}):
            r = browser.post(
                "/api/cohorts/traversal-1/decision",
                json={"statement": "{}", "signature": "x"},
                headers=headers,
            )
            assert r.status_code == 403 and "from this portal" in r.json()["detail"]
        html_report = browser.get("/api/cohorts/blocked-1/files/audit/report.html")
        assert (
            html_report.status_code == 200
            and "sandbox" in html_report.headers["content-security-policy"]
        )


def test_demo_publishes_its_release_to_a_portal_folder(env, tmp_path):
    from server.demo import publish_demo_release, release_lines

    c = env["c"]
    out = tmp_path / "demo"
    shutil.copytree(c.cohort, out / "run" / "cohort")
    shutil.copytree(c.audit, out / "run" / "audit")
    recorded = privacy_json(json.loads((c.audit / "audit.json").read_text()))
    (out / "run" / "privacy.json").write_text(json.dumps(recorded))  # what the run recorded
    info = publish_demo_release(out)
    messages = release_lines(info)  # the demo summary's release part: the next steps that work
    assert info["status"] == "pending" and (out / "keys" / "officer.key").exists()
    assert oct((out / "portal" / "tokens.txt").stat().st_mode & 0o777) == "0o600"
    lines = (out / "portal" / "tokens.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["officer", "partner", "admin"]
    store = Store(out / "portal")
    assert store.principal(lines[0].split()[2]).role == "officer"
    assert any("fedsynth portal serve --data" in m for m in messages)
    assert any("fedsynth pull" in m for m in messages)
    with pytest.raises(FileExistsError):
        publish_demo_release(out)
