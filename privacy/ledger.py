"""The site's privacy ledger: a durable, per-patient record of every mechanism run on its patients.

One SQLite file per site (WAL, synchronous=FULL, so a commit is fsynced before a write returns). It records:
- each mechanism run (run id, round, phase, noise multiplier, sampling rate, steps, clipping norm, accountant) and
  WHICH patients (by patient id) were in the training set it sampled from;
- each patient's audit hold-out assignment, decided once when the patient first appears and never changed, so a
  patient once trained on is never a non-member later;
- each audit the site answered (run id, checkpoint and cohort-manifest hashes), so audits per run can be bounded;
- each update released (`releases`): the mechanism it came from, what the server asked for (the round plan and
  the sha256 of the weights it sent) and the sha256 of the kept copy of the update (client/replay.py). A site
  releases at most one update per (run id, round, phase); once one is recorded, `record` refuses another
  mechanism for that key, so the round is never trained again: it is answered with the same update or refused.
  (A ledger written before releases existed gains the empty table when opened; its schema version is unchanged.)

A patient's spend is the composition of every mechanism they were in, whatever else changed (patients added or
removed, files unreadable, hold-out fraction, the site's name: none of these is a key). The site's spend is the
maximum over its patients. Rows are only ever appended (triggers refuse UPDATE and DELETE), and a mechanism is
committed before the update it pays for leaves the site, so a crash can only over-count, never under-count.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from privacy.accounting import ACCOUNTANTS, MechanismStep, epsilon_for

LEDGER_FILENAME = "privacy_ledger.sqlite"
SCHEMA_VERSION = "per-patient-2"
NO_DP = "none"  # the accountant of a mechanism run without DP (noise multiplier 0): its patients lose any guarantee

_TABLES = ("mechanisms", "participants", "assignments", "audits", "releases")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mechanisms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    phase TEXT NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    clipping_norm REAL NOT NULL CHECK (clipping_norm > 0),
    accountant TEXT NOT NULL,
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    n_patients INTEGER NOT NULL CHECK (n_patients >= 1),
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS participants (
    mechanism_id INTEGER NOT NULL REFERENCES mechanisms (id),
    patient_id TEXT NOT NULL,
    PRIMARY KEY (mechanism_id, patient_id)
);
CREATE INDEX IF NOT EXISTS participants_by_patient ON participants (patient_id);
CREATE TABLE IF NOT EXISTS assignments (
    patient_id TEXT PRIMARY KEY,
    side TEXT NOT NULL CHECK (side IN ('train', 'holdout')),
    holdout_fraction REAL NOT NULL,
    assigned_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    cohort_manifest_sha256 TEXT NOT NULL,
    answered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    mechanism_id INTEGER PRIMARY KEY REFERENCES mechanisms (id),
    request_json TEXT NOT NULL,
    update_sha256 TEXT NOT NULL,
    released_at REAL NOT NULL
);
""" + "".join(
    f"CREATE TRIGGER IF NOT EXISTS {t}_no_{op.lower()} BEFORE {op} ON {t} "
    f"BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;\n"
    for t in _TABLES
    for op in ("UPDATE", "DELETE")
)


def _released(db: sqlite3.Connection, run_id: str, server_round: int, phase: str) -> int | None:
    """The mechanism whose update was released for (run id, round, phase), or None."""
    row = db.execute(
        "SELECT r.mechanism_id FROM releases r JOIN mechanisms m ON m.id = r.mechanism_id"
        " WHERE m.run_id = ? AND m.server_round = ? AND m.phase = ?",
        (str(run_id), int(server_round), str(phase)),
    ).fetchone()
    return None if row is None else int(row[0])


class LedgerSchemaError(ValueError):
    """The file is a privacy ledger this version cannot use safely; the message says what to do."""


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a planned round fits the budget of every patient in it, with the site's spend before and after."""

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str


def _step(m: Mapping) -> MechanismStep:
    return MechanismStep(m["noise_multiplier"], m["sample_rate"], m["steps"])


class PrivacyLedger:
    """Append-only per-patient privacy spend of one site, in `<site_state_dir>/privacy_ledger.sqlite`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as db, db:
                tables = {
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                if "entries" in tables:
                    raise LedgerSchemaError(
                        f"{self.path}: an old-format privacy ledger (spend keyed by a fingerprint of the site name "
                        "and its exact training ids; it does not say which patients each mechanism covered), so "
                        "no patient's spend can be read from it safely. Migrate it with `fedsynth site "
                        "migrate-ledger --site-dir DIR [--state-dir DIR]`: every recorded mechanism is then charged "
                        "to every patient now at the site (an over-count, never an under-count) and those "
                        "patients are kept out of the audit hold-out; the old file is kept beside it"
                    )
                db.executescript(SCHEMA)
                db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (SCHEMA_VERSION,),
                )
                version = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a usable privacy ledger ({e})") from e
        if version != SCHEMA_VERSION:
            raise LedgerSchemaError(
                f"{self.path}: privacy ledger schema {version!r}, this fedsynth reads {SCHEMA_VERSION!r}; "
                "use the fedsynth version that wrote it, or ask its maintainers for a migration"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level="DEFERRED")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # in WAL mode: fsync the log on every commit
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        """One write transaction taken at its start (BEGIN IMMEDIATE: no other writer can read-then-insert in
        between), committed (fsynced) when the block ends, rolled back when it raises."""
        with closing(self._connect()) as db:
            db.isolation_level = None
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    # ---- mechanisms -----------------------------------------------------------------------------------------------

    def record(
        self,
        *,
        run_id: str,
        server_round: int,
        phase: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        clipping_norm: float,
        accountant: str,
        delta: float,
        patients: Iterable[str],
    ) -> int:
        """Append one mechanism and the patients it sampled from; durable when this returns. Call it BEFORE the
        update it pays for is sent. `accountant` "none" (noise multiplier 0) records training without DP: those
        patients have no finite guarantee from then on. `delta` is the delta the round was planned at: later
        accounting never uses a larger one (`min_delta`), so a grown or shrunk patient count cannot loosen it.

        Never overwrites: recording a retried (run_id, server_round, phase) again adds to the spend (a first
        attempt that recorded no release may have crashed at any point after its spend was committed). Refuses a
        key whose update was already released (`record_release`): that round is answered with the released
        update or not at all, never trained again.
        """
        patients = sorted({str(p) for p in patients})
        problems = []
        if not noise_multiplier >= 0:
            problems.append(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            problems.append(f"sample_rate must be in (0, 1], got {sample_rate}")
        if int(steps) != steps or steps < 0:
            problems.append(f"steps must be a non-negative integer, got {steps}")
        if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
            problems.append(f"clipping_norm must be a positive number, got {clipping_norm}")
        if accountant not in (*ACCOUNTANTS, NO_DP):
            problems.append(
                f"accountant must be one of {sorted((*ACCOUNTANTS, NO_DP))}, got {accountant!r}"
            )
        if (accountant == NO_DP) != (noise_multiplier == 0):
            problems.append(
                "a mechanism without noise is recorded with accountant 'none', and only it"
            )
        if not 0 < delta < 1:
            problems.append(f"delta must be in (0, 1), got {delta}")
        if not patients or any(not p for p in patients):
            problems.append("a mechanism needs the non-empty ids of the patients it sampled from")
        if problems:
            raise ValueError(f"{self.path}: refusing to record ({'; '.join(problems)})")
        with closing(self._connect()) as db, db:
            released = _released(db, run_id, server_round, phase)
            if released is not None:
                raise ValueError(
                    f"{self.path}: refusing to record a second mechanism for run {run_id!r}, round "
                    f"{server_round}, {phase}: its update was already released (mechanism {released}); a "
                    "site trains a round once and answers a repeated request with that same update"
                )
            cur = db.execute(
                "INSERT INTO mechanisms (run_id, server_round, phase, noise_multiplier, sample_rate, steps,"
                " clipping_norm, accountant, delta, n_patients, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(run_id),
                    int(server_round),
                    str(phase),
                    float(noise_multiplier),
                    float(sample_rate),
                    int(steps),
                    float(clipping_norm),
                    accountant,
                    float(delta),
                    len(patients),
                    time.time(),
                ),
            )
            mid = int(cur.lastrowid)
            db.executemany(
                "INSERT INTO participants (mechanism_id, patient_id) VALUES (?, ?)",
                [(mid, p) for p in patients],
            )
        return mid

    def entries(self) -> list[dict]:
        """Every mechanism, oldest first (without its patients; see `patients_of`)."""
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM mechanisms ORDER BY id")]

    def min_delta(self, up_to: int | None = None) -> float | None:
        """The smallest delta any mechanism (up to an id) was planned at; None for an empty ledger."""
        limit = math.inf if up_to is None else up_to
        deltas = [m["delta"] for m in self.entries() if m["id"] <= limit]
        return min(deltas) if deltas else None

    def run_ids(self) -> set[str]:
        with closing(self._connect()) as db:
            return {r[0] for r in db.execute("SELECT DISTINCT run_id FROM mechanisms")}

    def patients_of(self, run_id: str) -> set[str]:
        """The patients any mechanism of `run_id` sampled from."""
        with closing(self._connect()) as db:
            return {
                r[0]
                for r in db.execute(
                    "SELECT DISTINCT p.patient_id FROM participants p JOIN mechanisms m"
                    " ON m.id = p.mechanism_id WHERE m.run_id = ?",
                    (str(run_id),),
                )
            }

    def trained_patients(self) -> set[str]:
        with closing(self._connect()) as db:
            return {r[0] for r in db.execute("SELECT DISTINCT patient_id FROM participants")}

    def _participation(
        self, up_to: int | None = None
    ) -> tuple[dict[int, MechanismStep], dict[str, frozenset]]:
        """(mechanism id -> step, patient -> the ids of the mechanisms they were in), optionally up to an id."""
        limit = math.inf if up_to is None else up_to
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            steps = {
                int(m["id"]): _step(m)
                for m in db.execute("SELECT * FROM mechanisms ORDER BY id")
                if m["id"] <= limit
            }
            member: dict[str, set[int]] = {}
            for mid, pid in db.execute("SELECT mechanism_id, patient_id FROM participants"):
                if mid in steps:
                    member.setdefault(pid, set()).add(int(mid))
        return steps, {p: frozenset(s) for p, s in member.items()}

    def histories(
        self, patients: Iterable[str] | None = None, up_to: int | None = None
    ) -> list[list[MechanismStep]]:
        """The distinct maximal participation histories of `patients` (every patient in the ledger if None).

        Composition only grows with more mechanisms, so a history contained in another patient's never has the
        larger spend and is left out: the result is what the worst patient's spend is computed from, with one
        accountant call per distinct history instead of per patient.
        """
        steps, member = self._participation(up_to)
        wanted = member.keys() if patients is None else [p for p in patients if p in member]
        distinct = {member[p] for p in wanted}
        maximal = [s for s in distinct if not any(s < other for other in distinct)]
        out = [[steps[m] for m in sorted(s)] for s in sorted(maximal, key=sorted)]
        return out or [[]]

    def epsilon(
        self,
        delta: float,
        accountant: str = "rdp",
        patients: Iterable[str] | None = None,
        up_to: int | None = None,
    ) -> float:
        """The largest spend of any of `patients` (default: every patient the site ever trained on)."""
        return max(epsilon_for(h, delta, accountant) for h in self.histories(patients, up_to))

    def check_budget(
        self,
        planned: Sequence[MechanismStep],
        patients: Iterable[str],
        epsilon_budget: float,
        delta: float,
        accountant: str = "rdp",
    ) -> BudgetDecision:
        """Allow the planned steps on `patients` only if no patient's whole history plus them exceeds the budget."""
        patients = list(patients)
        now = self.epsilon(delta, accountant)
        after_in_round = max(
            epsilon_for(h + list(planned), delta, accountant) for h in self.histories(patients)
        )
        after = max(now, after_in_round)
        where = (
            f"at delta={delta:.2e} ({accountant.upper()}, worst of {len(patients)} patients in the round, "
            f"{len(self.entries())} mechanisms in the ledger)"
        )
        if after_in_round > epsilon_budget:
            return BudgetDecision(
                False,
                now,
                after,
                (
                    f"privacy budget exceeded: the planned round would bring a patient's epsilon to "
                    f"{after_in_round:.3f} (site's worst patient now: {now:.3f}), over the site's budget of "
                    f"{epsilon_budget:g} {where}"
                ),
            )
        return BudgetDecision(
            True,
            now,
            after,
            f"within budget: epsilon {now:.3f} -> {after:.3f} of {epsilon_budget:g} {where}",
        )

    def last_mechanism_of(self, run_id: str) -> dict | None:
        runs = [m for m in self.entries() if m["run_id"] == str(run_id)]
        return runs[-1] if runs else None

    # ---- released updates ---------------------------------------------------------------------------------------

    def record_release(self, mechanism_id: int, request_json: str, update_sha256: str) -> None:
        """Record that mechanism `mechanism_id`'s update is released: what the server asked for (`request_json`,
        client/replay.py) and the sha256 of the kept copy. Durable when this returns: call it after the copy is
        written and BEFORE the update leaves the site. At most one release per mechanism and per (run id,
        round, phase), checked in the same transaction as the insert."""
        if not re.fullmatch(r"[0-9a-f]{64}", str(update_sha256)):
            raise ValueError(f"{self.path}: update_sha256 must be a sha256 hex digest")
        with self._immediate() as db:
            row = db.execute(
                "SELECT run_id, server_round, phase FROM mechanisms WHERE id = ?",
                (int(mechanism_id),),
            ).fetchone()
            if row is None:
                raise ValueError(f"{self.path}: no mechanism {mechanism_id} to release")
            released = _released(db, *row)
            if released is not None:
                raise ValueError(
                    f"{self.path}: run {row[0]!r}, round {row[1]}, {row[2]} already released the update of "
                    f"mechanism {released}; one release per run, round and phase"
                )
            db.execute(
                "INSERT INTO releases (mechanism_id, request_json, update_sha256, released_at)"
                " VALUES (?, ?, ?, ?)",
                (int(mechanism_id), str(request_json), str(update_sha256), time.time()),
            )

    def releases(self, run_id: str | None = None) -> list[dict]:
        """Every released update (of run `run_id`, or of all runs), oldest first: mechanism_id, run_id,
        server_round, phase, request_json, update_sha256, released_at."""
        query = (
            "SELECT r.mechanism_id, m.run_id, m.server_round, m.phase, r.request_json, r.update_sha256,"
            " r.released_at FROM releases r JOIN mechanisms m ON m.id = r.mechanism_id"
        )
        args: tuple = ()
        if run_id is not None:
            query, args = query + " WHERE m.run_id = ?", (str(run_id),)
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(query + " ORDER BY r.mechanism_id", args)]

    def release_of(self, run_id: str, server_round: int, phase: str) -> dict | None:
        """The update released for (run id, round, phase) (a row of `releases`), or None if none was."""
        found = [
            r
            for r in self.releases(run_id)
            if r["server_round"] == int(server_round) and r["phase"] == str(phase)
        ]
        return found[-1] if found else None

    # ---- the audit hold-out ---------------------------------------------------------------------------------------

    def assignments(self) -> dict[str, str]:
        """patient id -> 'train' | 'holdout', as decided when each patient first appeared."""
        with closing(self._connect()) as db:
            return dict(db.execute("SELECT patient_id, side FROM assignments"))

    def assign(self, sides: Mapping[str, str], holdout_fraction: float) -> None:
        """Persist the side of patients seen for the first time. A patient already assigned keeps their side (the
        row is never rewritten), and a patient who was ever trained on is never put in the hold-out."""
        trained = self.trained_patients()
        bad = sorted(p for p, side in sides.items() if side == "holdout" and p in trained)
        if bad:
            raise ValueError(
                f"{self.path}: refusing to hold out patients who were already trained on: {', '.join(bad[:5])}"
            )
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT OR IGNORE INTO assignments (patient_id, side, holdout_fraction, assigned_at)"
                " VALUES (?, ?, ?, ?)",
                [(str(p), side, float(holdout_fraction), time.time()) for p, side in sides.items()],
            )

    # ---- audits answered ------------------------------------------------------------------------------------------

    def audits_answered(self, run_id: str) -> int:
        with closing(self._connect()) as db:
            return int(
                db.execute(
                    "SELECT COUNT(*) FROM audits WHERE run_id = ?", (str(run_id),)
                ).fetchone()[0]
            )

    def admit_audit(
        self, run_id: str, checkpoint_sha256: str, cohort_manifest_sha256: str, max_audits: int
    ) -> tuple[bool, str]:
        """Record an audit of `run_id` and allow it, unless `max_audits` were already answered for that run.

        The count and the insert are one transaction (BEGIN IMMEDIATE), so two concurrent audits cannot both take
        the last slot; the row is committed (fsynced) before this returns, i.e. before any answer is computed."""
        with self._immediate() as db:
            n = db.execute(
                "SELECT COUNT(*) FROM audits WHERE run_id = ?", (str(run_id),)
            ).fetchone()[0]
            if n >= max_audits:
                return False, (
                    f"this site already answered {n} audit(s) of run {run_id!r}, the most its "
                    f"max-audits-per-run ({max_audits}) allows"
                )
            db.execute(
                "INSERT INTO audits (run_id, checkpoint_sha256, cohort_manifest_sha256, answered_at)"
                " VALUES (?, ?, ?, ?)",
                (str(run_id), str(checkpoint_sha256), str(cohort_manifest_sha256), time.time()),
            )
        return True, f"audit {n + 1} of at most {max_audits} for run {run_id!r}"


def migrate_fingerprint_ledger(path: Path | str, patients: Iterable[str]) -> Path:
    """Turn an old-format ledger (spend keyed by a dataset fingerprint) into a per-patient one, conservatively.

    The old file does not say which patients each entry covered, so EVERY entry (of every fingerprint) is charged
    to EVERY patient in `patients` (give all patients now at the site, hold-out included) and all of them are
    assigned to training, never to the hold-out. This over-counts, never under-counts. The old file is kept as
    `<name>.fingerprint-ledger.bak`; returns its path.
    """
    path = Path(path)
    patients = sorted({str(p) for p in patients})
    if not patients:
        raise ValueError(f"{path}: migrating needs the ids of the patients at the site")
    with closing(sqlite3.connect(path)) as old:
        old.row_factory = sqlite3.Row
        tables = {r[0] for r in old.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "entries" not in tables:
            raise ValueError(
                f"{path}: not an old-format (fingerprint) privacy ledger; nothing to migrate"
            )
        rows = [
            dict(r)
            for r in old.execute("SELECT * FROM entries WHERE status = 'committed' ORDER BY id")
        ]
        old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    backup = path.with_name(path.name + ".fingerprint-ledger.bak")
    if backup.exists():
        raise ValueError(f"{backup} exists: a migration was started before; move it away and retry")
    tmp = path.with_name(path.name + ".migrating")
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    new = PrivacyLedger(tmp)
    new.assign({p: "train" for p in patients}, holdout_fraction=0.0)
    for r in rows:
        new.record(
            run_id=r["run_id"],
            server_round=r["server_round"],
            phase=r["phase"],
            noise_multiplier=r["noise_multiplier"],
            sample_rate=r["sample_rate"],
            steps=r["steps"],
            clipping_norm=r["clipping_norm"],
            accountant=r["accountant"],
            delta=1.0 / (10 * len(patients)),  # the old default; accounting never uses a larger one
            patients=patients,
        )
    with closing(sqlite3.connect(tmp)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(path, backup)
    os.replace(tmp, path)
    return backup
