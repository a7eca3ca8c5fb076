"""The portal database: a version-1 file (before sessions, token expiry and client addresses) is upgraded in place
and keeps its tokens; an unknown version is refused with what to do."""

import sqlite3

import pytest

from server.release.store import Store, token_hash

V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tokens (id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, role TEXT NOT NULL, name TEXT NOT NULL,
    created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE cohorts (id TEXT PRIMARY KEY, path TEXT NOT NULL, status TEXT NOT NULL, registered_at TEXT NOT NULL);
CREATE TABLE approvals (cohort TEXT NOT NULL REFERENCES cohorts(id), officer TEXT NOT NULL, decision TEXT NOT NULL,
    reason TEXT NOT NULL, statement TEXT NOT NULL, signature TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (cohort, officer));
CREATE TABLE access_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, who TEXT NOT NULL,
    role TEXT NOT NULL, method TEXT NOT NULL, what TEXT NOT NULL, status INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def test_a_version_1_database_is_upgraded_and_keeps_its_tokens(tmp_path):
    db = sqlite3.connect(tmp_path / "portal.db")
    db.executescript(V1)
    db.execute(
        "INSERT INTO tokens VALUES ('0123456789abcdef', ?, 'partner', 'acme', '2026-01-01', NULL)",
        (token_hash("old-secret"),),
    )
    db.commit()
    db.close()
    store = Store(tmp_path)
    who = store.principal("old-secret")
    assert who is not None and who.name == "acme"
    session, _ = store.open_session(who)
    assert store.session_principal(session) == who
    store.log("x", "-", "GET", "/", 200, client="10.0.0.1", agent="curl")
    assert store.access_log(1)[0]["client"] == "10.0.0.1"
    assert Store(tmp_path).principal("old-secret") == who  # opening again changes nothing


def test_an_unknown_schema_version_is_refused(tmp_path):
    Store(tmp_path)
    db = sqlite3.connect(tmp_path / "portal.db")
    db.execute("UPDATE meta SET value='9' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="schema 9.*use the fedsynth version that wrote it"):
        Store(tmp_path)


def test_no_token_starts_with_a_dash(tmp_path):
    store = Store(tmp_path)  # `fedsynth pull --token -x...` would be read as an option
    assert not any(store.issue_token("partner", "p")[1].startswith("-") for _ in range(200))
