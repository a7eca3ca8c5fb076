"""The site's privacy ledger: a durable record of every DP mechanism run on its patients.

One SQLite file per site (WAL, synchronous=FULL). Spend is keyed by the DATA (a fingerprint of the patients
trained on), not by the run: a new run, a restarted site or a retried round on the same patients keeps counting.
An entry is committed before the update it pays for leaves the site, so a crash can only over-count.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from privacy.accounting import MechanismStep, epsilon_for

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_fingerprint TEXT NOT NULL,
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    phase TEXT NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier >= 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    clipping_norm REAL NOT NULL,
    accountant TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'committed',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_data ON entries (dataset_fingerprint);
"""


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str = ""


class PrivacyLedger:
    def __init__(self, path: Path | str, dataset_fingerprint: str):
        self.path = Path(path)
        self.fingerprint = dataset_fingerprint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level="DEFERRED")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def record(self, *, run_id: str, server_round: int, phase: str, noise_multiplier: float, sample_rate: float,
               steps: int, clipping_norm: float, accountant: str) -> None:
        """Append one mechanism; durable when this returns. Never overwrites: a retried round adds to the spend."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO entries (dataset_fingerprint, run_id, server_round, phase, noise_multiplier, sample_rate,"
                " steps, clipping_norm, accountant, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.fingerprint, run_id, int(server_round), phase, float(noise_multiplier), float(sample_rate),
                 int(steps), float(clipping_norm), accountant, time.time()),
            )

    def entries(self) -> list[dict]:
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM entries WHERE dataset_fingerprint = ? ORDER BY id", (self.fingerprint,))
            return [dict(r) for r in rows]

    def history(self) -> list[MechanismStep]:
        return [MechanismStep(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries()]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        return epsilon_for(self.history(), delta, accountant)

    def epsilon_if(self, planned: Sequence[MechanismStep], delta: float, accountant: str = "rdp") -> float:
        return epsilon_for(self.history() + list(planned), delta, accountant)

    def check_budget(self, planned: Sequence[MechanismStep], epsilon_budget: float, delta: float,
                     accountant: str = "rdp") -> BudgetDecision:
        now = self.epsilon(delta, accountant)
        after = self.epsilon_if(planned, delta, accountant)
        if after > epsilon_budget:
            return BudgetDecision(False, now, after, (
                f"privacy budget: this round would bring epsilon from {now:.3f} to {after:.3f}, over the site's "
                f"budget of {epsilon_budget:g} at delta={delta:.2e} ({accountant.upper()})"))
        return BudgetDecision(True, now, after)
