"""The site's privacy ledger: a durable record of every DP mechanism run on its patients.

One SQLite file per site (WAL, synchronous=FULL, so a commit is fsynced before record() returns). Spend is keyed
by the DATA (a fingerprint of the patients trained on), not by the run: a new run, a restarted site or a retried
round on the same patients keeps counting. Entries are only ever appended, and an entry is committed before the
update it pays for leaves the site, so a crash can only over-count, never under-count.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from privacy.accounting import ACCOUNTANTS, MechanismStep, epsilon_for

LEDGER_FILENAME = "privacy_ledger.sqlite"

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
    clipping_norm REAL NOT NULL CHECK (clipping_norm > 0),
    accountant TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'committed',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_data ON entries (dataset_fingerprint);
"""


@dataclass(frozen=True)
class BudgetDecision:
    """Whether a planned round fits the budget, with the spend before and after it."""

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    reason: str


class PrivacyLedger:
    """Append-only privacy spend of one site's dataset, in `<site_state_dir>/privacy_ledger.sqlite`."""

    def __init__(self, path: Path | str, dataset_fingerprint: str):
        if not dataset_fingerprint:
            raise ValueError(f"{path}: a privacy ledger needs a non-empty dataset fingerprint")
        self.path = Path(path)
        self.fingerprint = dataset_fingerprint
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as db, db:
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a usable privacy ledger ({e})") from e

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level="DEFERRED")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # in WAL mode: fsync the log on every commit
        return db

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
    ) -> None:
        """Append one mechanism; durable when this returns. Call it BEFORE the update it pays for is sent.

        Never overwrites: recording a retried (run_id, server_round, phase) again adds to the spend, because the
        first attempt may already have released an update.
        """
        problems = []
        if not noise_multiplier >= 0:
            problems.append(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            problems.append(f"sample_rate must be in (0, 1], got {sample_rate}")
        if int(steps) != steps or steps < 0:
            problems.append(f"steps must be a non-negative integer, got {steps}")
        if not (clipping_norm > 0 and math.isfinite(clipping_norm)):
            problems.append(f"clipping_norm must be a positive number, got {clipping_norm}")
        if accountant not in ACCOUNTANTS:
            problems.append(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
        if problems:
            raise ValueError(f"{self.path}: refusing to record ({'; '.join(problems)})")
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO entries (dataset_fingerprint, run_id, server_round, phase, noise_multiplier, sample_rate,"
                " steps, clipping_norm, accountant, status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self.fingerprint,
                    str(run_id),
                    int(server_round),
                    str(phase),
                    float(noise_multiplier),
                    float(sample_rate),
                    int(steps),
                    float(clipping_norm),
                    accountant,
                    "committed",
                    time.time(),
                ),
            )

    def entries(self) -> list[dict]:
        """Every committed entry for this dataset, oldest first."""
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM entries WHERE dataset_fingerprint = ? AND status = 'committed' ORDER BY id",
                (self.fingerprint,),
            )
            return [dict(r) for r in rows]

    def history(self) -> list[MechanismStep]:
        return [
            MechanismStep(e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in self.entries()
        ]

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent so far on this dataset: the composition of its whole history."""
        return epsilon_for(self.history(), delta, accountant)

    def epsilon_if(
        self, planned: Sequence[MechanismStep], delta: float, accountant: str = "rdp"
    ) -> float:
        """Epsilon this dataset would have spent after the `planned` steps too."""
        return epsilon_for(self.history() + list(planned), delta, accountant)

    def check_budget(
        self,
        planned: Sequence[MechanismStep],
        epsilon_budget: float,
        delta: float,
        accountant: str = "rdp",
    ) -> BudgetDecision:
        """Allow the planned steps only if the whole history plus them stays within `epsilon_budget`."""
        history = self.history()
        now = epsilon_for(history, delta, accountant)
        after = epsilon_for(history + list(planned), delta, accountant)
        where = f"at delta={delta:.2e} ({accountant.upper()}, {len(history)} ledger entries)"
        if after > epsilon_budget:
            return BudgetDecision(
                False,
                now,
                after,
                (
                    f"privacy budget exceeded: the planned round would bring epsilon from {now:.3f} to {after:.3f}, "
                    f"over the site's budget of {epsilon_budget:g} {where}"
                ),
            )
        return BudgetDecision(
            True,
            now,
            after,
            f"within budget: epsilon {now:.3f} -> {after:.3f} of {epsilon_budget:g} {where}",
        )
