"""The partner portal's state: one SQLite file (`DATA/portal.db`, WAL) holding tokens, browser sessions,
registered release candidates, officers' signed decisions and the access log.

Tables (schema version in `meta`; a version-1 database is upgraded in place on first open):
    tokens      id, sha256 (of the secret; the secret itself is never stored), role, name, created_at, revoked_at,
                expires_at (NULL: no expiry)
    sessions    sha256 (of the random session id the browser holds), token_id, role, created_at, expires_at,
                revoked_at: a browser signs in with a token once and then holds only a session id, which is
                revoked at logout and dies with its token (revoked or expired) and at its own expiry
    cohorts     id, path (the release folder), status (the last value the portal computed: a cache for the
                log and listings, recomputed from the release folder and the approvals on every read), registered_at
    approvals   cohort, officer, decision, reason, statement, signature, at   (one decision per officer and cohort)
    access_log  at, who, role, method, what, status, bytes, client (address), agent (User-Agent); rows older
                than the retention the portal is served with are deleted (`prune_log`)

Every call opens its own short connection: the portal serves requests from a thread pool, and SQLite connections
are not shared between threads.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from server.release.access import ROLES

# token holder names follow release names: an officer's is its key name
from server.release.manifest import NAME

SCHEMA_VERSION = 2
DB_NAME = "portal.db"
TOKEN_ID_RE = re.compile(r"\A[0-9a-f]{16}\Z")
SESSION_HOURS = 8  # a browser session lasts at most this long (and never past its token's expiry)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, role TEXT NOT NULL, name TEXT NOT NULL,
    created_at TEXT NOT NULL, revoked_at TEXT, expires_at TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    sha256 TEXT PRIMARY KEY, token_id TEXT NOT NULL REFERENCES tokens(id), role TEXT NOT NULL,
    created_at TEXT NOT NULL, expires_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS cohorts (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, status TEXT NOT NULL, registered_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS approvals (
    cohort TEXT NOT NULL REFERENCES cohorts(id), officer TEXT NOT NULL, decision TEXT NOT NULL,
    reason TEXT NOT NULL, statement TEXT NOT NULL, signature TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (cohort, officer));
CREATE TABLE IF NOT EXISTS access_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, who TEXT NOT NULL, role TEXT NOT NULL,
    method TEXT NOT NULL, what TEXT NOT NULL, status INTEGER NOT NULL, bytes INTEGER NOT NULL,
    client TEXT NOT NULL DEFAULT '-', agent TEXT NOT NULL DEFAULT '-');
CREATE INDEX IF NOT EXISTS access_log_at ON access_log(at);
"""
# version 1 -> 2: token expiry, sessions (created by _SCHEMA), client address and user agent in the log
_UPGRADE_1_TO_2 = (
    "ALTER TABLE tokens ADD COLUMN expires_at TEXT",
    "ALTER TABLE access_log ADD COLUMN client TEXT NOT NULL DEFAULT '-'",
    "ALTER TABLE access_log ADD COLUMN agent TEXT NOT NULL DEFAULT '-'",
)


def now() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request is: a token's id, role and holder name."""

    token_id: str
    role: str
    name: str

    @property
    def who(self) -> str:
        return f"{self.role}:{self.name} ({self.token_id})"


class Store:
    """The portal database in `data_dir/portal.db`; created (with its schema) on first use."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self.data_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            db.execute("BEGIN IMMEDIATE")
            row = None
            if db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is not None and row[0] == "1":
                for stmt in _UPGRADE_1_TO_2:
                    db.execute(stmt)
                db.execute("UPDATE meta SET value=? WHERE key='schema_version'", ("2",))
                row = ("2",)
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                row = (str(SCHEMA_VERSION),)
            db.execute("COMMIT")
        finally:
            db.close()
        if int(row[0]) != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: portal database schema {row[0]}, this fedsynth reads {SCHEMA_VERSION}: "
                "use the fedsynth version that wrote it"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    # ---- tokens ------------------------------------------------------------------------------------------------

    def issue_token(self, role: str, name: str, days: float | None = None) -> tuple[str, str]:
        """A new bearer token for `name` in `role`, valid for `days` (None: until revoked): (token id, secret).
        Only the secret's sha256 is stored."""
        if role not in ROLES:
            raise ValueError(f"role {role!r}: must be one of {', '.join(ROLES)}")
        if not NAME.match(name or ""):
            raise ValueError(
                f"name {name!r}: use letters, digits, '.', '_' or '-' (at most 100); an officer's "
                "name is the name of its signing key"
            )
        if days is not None and not days > 0:
            raise ValueError(f"days {days!r}: a token must be valid for a positive number of days")
        expires = _iso(datetime.now(timezone.utc) + timedelta(days=days)) if days else None
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        while secret.startswith("-"):  # `--token -abc` would read as an option on the command line
            secret = secrets.token_urlsafe(32)
        with self._connect() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL, ?)",
                (token_id, token_hash(secret), role, name, now(), expires),
            )
        return token_id, secret

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token by id (and with it every session signed in with it); False if there is no such
        (unrevoked) token."""
        if not TOKEN_ID_RE.match(token_id or ""):
            raise ValueError(f"token id {token_id!r}: expected 16 hex digits")
        with self._connect() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                (now(), token_id),
            )
            db.execute(
                "UPDATE sessions SET revoked_at=? WHERE token_id=? AND revoked_at IS NULL",
                (now(), token_id),
            )
            return cur.rowcount == 1

    def principal(self, secret: str) -> Principal | None:
        """The holder of a bearer token, or None for an unknown, revoked or expired one."""
        if not secret or len(secret) > 200:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT id, role, name FROM tokens WHERE sha256=? AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (token_hash(secret), now()),
            ).fetchone()
        return Principal(row["id"], row["role"], row["name"]) if row else None

    def tokens(self) -> list[dict]:
        with self._connect() as db:
            return [
                dict(r)
                for r in db.execute(
                    "SELECT id, role, name, created_at, expires_at, revoked_at FROM tokens "
                    "ORDER BY created_at, id"
                )
            ]

    # ---- browser sessions --------------------------------------------------------------------------------------

    def open_session(self, who: Principal) -> tuple[str, int]:
        """A new session for a signed-in token holder: (random session id for the cookie, its lifetime in
        seconds: SESSION_HOURS, cut to the token's expiry). Only the id's sha256 is stored."""
        start = datetime.now(timezone.utc)
        end = start + timedelta(hours=SESSION_HOURS)
        with self._connect() as db:
            row = db.execute("SELECT expires_at FROM tokens WHERE id=?", (who.token_id,)).fetchone()
            if row and row["expires_at"]:
                end = min(end, datetime.fromisoformat(row["expires_at"]))
            session = secrets.token_urlsafe(32)
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, NULL)",
                (token_hash(session), who.token_id, who.role, _iso(start), _iso(end)),
            )
        return session, max(0, int((end - start).total_seconds()))

    def session_principal(self, session: str) -> Principal | None:
        """The holder of a live session: not revoked or expired, its token neither, with the role it was opened
        with; None otherwise."""
        if not session or len(session) > 200:
            return None
        t = now()
        with self._connect() as db:
            row = db.execute(
                "SELECT t.id, t.role, t.name FROM sessions s JOIN tokens t ON t.id = s.token_id "
                "WHERE s.sha256=? AND s.revoked_at IS NULL AND s.expires_at > ? AND t.revoked_at IS NULL "
                "AND (t.expires_at IS NULL OR t.expires_at > ?) AND s.role = t.role",
                (token_hash(session), t, t),
            ).fetchone()
        return Principal(row["id"], row["role"], row["name"]) if row else None

    def close_session(self, session: str) -> bool:
        """Revoke a session (logout); False if it was not live."""
        with self._connect() as db:
            cur = db.execute(
                "UPDATE sessions SET revoked_at=? WHERE sha256=? AND revoked_at IS NULL",
                (now(), token_hash(session or "")),
            )
            return cur.rowcount == 1

    # ---- cohorts and approvals ---------------------------------------------------------------------------------

    def add_cohort(self, cohort_id: str, path: Path, status: str) -> None:
        with self._connect() as db:
            if db.execute("SELECT 1 FROM cohorts WHERE id=?", (cohort_id,)).fetchone():
                raise FileExistsError(f"cohort {cohort_id} is already registered")
            db.execute(
                "INSERT INTO cohorts VALUES (?, ?, ?, ?)", (cohort_id, str(path), status, now())
            )

    def cohort(self, cohort_id: str) -> dict | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM cohorts WHERE id=?", (cohort_id,)).fetchone()
        return dict(row) if row else None

    def cohorts(self) -> list[dict]:
        with self._connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM cohorts ORDER BY registered_at, id")]

    def set_status(self, cohort_id: str, status: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE cohorts SET status=? WHERE id=?", (status, cohort_id))

    def approvals(self, cohort_id: str) -> list[dict]:
        with self._connect() as db:
            return [
                dict(r)
                for r in db.execute(
                    "SELECT * FROM approvals WHERE cohort=? ORDER BY at, officer", (cohort_id,)
                )
            ]

    def add_approval(
        self,
        cohort_id: str,
        officer: str,
        decision: str,
        reason: str,
        statement: str,
        signature: str,
        at: str,
    ) -> None:
        with self._connect() as db:
            if db.execute(
                "SELECT 1 FROM approvals WHERE cohort=? AND officer=?", (cohort_id, officer)
            ).fetchone():
                raise FileExistsError(
                    f"officer {officer} has already decided on cohort {cohort_id}"
                )
            db.execute(
                "INSERT INTO approvals VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cohort_id, officer, decision, reason, statement, signature, at),
            )

    # ---- access log --------------------------------------------------------------------------------------------

    def log(
        self,
        who: str,
        role: str,
        method: str,
        what: str,
        status: int,
        nbytes: int = 0,
        *,
        client: str = "-",
        agent: str = "-",
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO access_log (at, who, role, method, what, status, bytes, client, agent) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    now(),
                    who,
                    role,
                    method[:16],
                    what[:500],
                    int(status),
                    int(nbytes),
                    client[:100],
                    agent[:300],
                ),
            )

    def access_log(self, limit: int = 1000) -> list[dict]:
        with self._connect() as db:
            return [
                dict(r)
                for r in db.execute("SELECT * FROM access_log ORDER BY seq DESC LIMIT ?", (limit,))
            ]

    def prune_log(self, days: float) -> int:
        """Delete access-log rows older than `days`; returns how many."""
        cutoff = _iso(datetime.now(timezone.utc) - timedelta(days=days))
        with self._connect() as db:
            return db.execute("DELETE FROM access_log WHERE at < ?", (cutoff,)).rowcount
