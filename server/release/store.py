"""The partner portal's state: one SQLite file (`DATA/portal.db`, WAL) holding tokens, registered release
candidates, officers' signed decisions and the access log.

Tables (schema version in `meta`):
    tokens      id, sha256 (of the secret; the secret itself is never stored), role, name, created_at, revoked_at
    cohorts     id, path (the release folder), status (the last value `release_status` computed: a cache for the
                log and listings, recomputed from the release folder and the approvals on every read), registered_at
    approvals   cohort, officer, decision, reason, statement, signature, at   (one decision per officer and cohort)
    access_log  at, who, role, method, what, status, bytes

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
from datetime import datetime, timezone
from pathlib import Path

from server.release.manifest import (
    NAME,
)  # token holder names follow release names: an officer's is its key name

SCHEMA_VERSION = 1
DB_NAME = "portal.db"
ROLES = ("partner", "officer", "admin")
TOKEN_ID_RE = re.compile(r"^[0-9a-f]{16}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, role TEXT NOT NULL, name TEXT NOT NULL,
    created_at TEXT NOT NULL, revoked_at TEXT);
CREATE TABLE IF NOT EXISTS cohorts (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, status TEXT NOT NULL, registered_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS approvals (
    cohort TEXT NOT NULL REFERENCES cohorts(id), officer TEXT NOT NULL, decision TEXT NOT NULL,
    reason TEXT NOT NULL, statement TEXT NOT NULL, signature TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (cohort, officer));
CREATE TABLE IF NOT EXISTS access_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, who TEXT NOT NULL, role TEXT NOT NULL,
    method TEXT NOT NULL, what TEXT NOT NULL, status INTEGER NOT NULL, bytes INTEGER NOT NULL);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
            db.execute(
                "PRAGMA journal_mode=WAL"
            )  # readers never wait for the writer; survives restarts
            db.executescript(_SCHEMA)
            db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        finally:
            db.close()
        if int(row[0]) != SCHEMA_VERSION:
            raise ValueError(
                f"{self.path}: portal database schema {row[0]}, this fedsynth reads {SCHEMA_VERSION}"
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

    def issue_token(self, role: str, name: str) -> tuple[str, str]:
        """A new bearer token for `name` in `role`: (token id, secret). Only the secret's sha256 is stored."""
        if role not in ROLES:
            raise ValueError(f"role {role!r}: must be one of {', '.join(ROLES)}")
        if not NAME.match(name or ""):
            raise ValueError(
                f"name {name!r}: use letters, digits, '.', '_' or '-' (at most 100); an officer's "
                "name is the name of its signing key"
            )
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        with self._connect() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)",
                (token_id, token_hash(secret), role, name, now()),
            )
        return token_id, secret

    def revoke_token(self, token_id: str) -> bool:
        """Revoke a token by id; False if there is no such (unrevoked) token."""
        if not TOKEN_ID_RE.match(token_id or ""):
            raise ValueError(f"token id {token_id!r}: expected 16 hex digits")
        with self._connect() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                (now(), token_id),
            )
            return cur.rowcount == 1

    def principal(self, secret: str) -> Principal | None:
        """The holder of a bearer token, or None for an unknown or revoked one."""
        if not secret or len(secret) > 200:
            return None
        with self._connect() as db:
            row = db.execute(
                "SELECT id, role, name FROM tokens WHERE sha256=? AND revoked_at IS NULL",
                (token_hash(secret),),
            ).fetchone()
        return Principal(row["id"], row["role"], row["name"]) if row else None

    def tokens(self) -> list[dict]:
        with self._connect() as db:
            return [
                dict(r)
                for r in db.execute(
                    "SELECT id, role, name, created_at, revoked_at FROM tokens ORDER BY created_at, id"
                )
            ]

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
        self, who: str, role: str, method: str, what: str, status: int, nbytes: int = 0
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO access_log (at, who, role, method, what, status, bytes) VALUES (?,?,?,?,?,?,?)",
                (now(), who, role, method, what[:500], int(status), int(nbytes)),
            )

    def access_log(self, limit: int = 1000) -> list[dict]:
        with self._connect() as db:
            return [
                dict(r)
                for r in db.execute("SELECT * FROM access_log ORDER BY seq DESC LIMIT ?", (limit,))
            ]
