"""Central (client-level) differential privacy for the federation: Flower's mechanism, our replace-one accounting.

With `central-dp = "client-side-fixed"` every site clips its model update (new - global) to an L2 norm C before it
leaves (client.client_app.central_dp_clipping_mod), the server re-checks every norm and clips what is above C (no
tolerance), and Flower's `DifferentialPrivacyClientSideFixedClipping` averages the n clipped updates with equal
weights and adds Gaussian noise of std sigma x C / n to the mean.

The claim is replace-one (privacy/client_level.py): which sites took part is public, so the neighbouring consortium
has the same sites, one of them with any other data. Sensitivity 2C, so each release is accounted as the Gaussian
mechanism with noise multiplier sigma / 2. Every release is written, BEFORE the round's checkpoint (the aggregate
reaches no one before that), to the consortium's durable ledger, a SQLite file shared by every run of the
consortium (`central-dp-ledger`, by default `central_dp_ledger.sqlite` beside the run folder), so a new run keeps
counting from what earlier runs spent. One release per (run id, round): a round redone after a crash replaces the
aggregate nobody received. The claimed epsilon composes every release in the ledger (each site took part in at
most all of them, whatever it is called); per-site and this-run figures are reported beside it.

What this protects: what anyone who sees only the released global models (the sites between rounds, a checkpoint,
the cohort synthesized from it) can learn about one site's data. What it does not: that a site took part (public),
and anything towards the server, which sees each site's clipped update in the clear (TLS protects it only in
transit); hiding it from the server needs secure aggregation (SecAgg+), which is not wired.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import compute_stdv

from common import messages
from common.config import RunConfig
from privacy.client_level import (
    NEIGHBORING_RELATION,
    clip_update,
    epsilon,
    replace_one_noise_multiplier,
    update_norm,
)

log = logging.getLogger("fedsynth.server")
LEDGER_FILE = "central_dp_ledger.sqlite"
OLD_ACCOUNTANT_FILE = "central_dp_accountant.json"  # before the ledger: one run's Flower accountant
UNIFORM_WEIGHT_KEY = "central-dp-weight"  # FedAvg weighs by this key under central DP: 1.0 each
REFERENCE_DELTA = 1e-5  # the usual "delta << 1/n"; also the ceiling of the default delta

__all__ = [
    "CentralDP",
    "CentralDPLedger",
    "SitesGrid",
    "default_delta",
    "sample_level",
    "update_norm",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    run_id TEXT NOT NULL,
    server_round INTEGER NOT NULL,
    phase TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,            -- sigma as configured: noise std sigma x C / n on the mean
    accounted_noise_multiplier REAL NOT NULL,  -- sigma / 2: the Gaussian mechanism under replace-one (2C)
    clipping_norm REAL NOT NULL,
    sites TEXT NOT NULL,                       -- JSON list of the site names whose updates were averaged
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (run_id, server_round)
);
"""


def default_delta(n_sites: int) -> float:
    """min(1e-5, 1 / (10 n)): far below 1 / n."""
    return min(REFERENCE_DELTA, 1.0 / (10.0 * max(1, n_sites)))


class CentralDPLedger:
    """The consortium's client-level releases over all its runs, in one SQLite file."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as db, db:
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(
                f"{self.path}: not a usable central-DP ledger ({e}); restore it from a backup "
                "(an empty one would forget what earlier runs spent)"
            ) from e

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        return db

    def record(
        self,
        *,
        run_id: str,
        server_round: int,
        phase: str,
        noise_multiplier: float,
        clipping_norm: float,
        sites: list[str],
    ) -> None:
        """One noisy aggregate; the same (run, round) again (redone after a crash) replaces it."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO releases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    int(server_round),
                    phase,
                    float(noise_multiplier),
                    replace_one_noise_multiplier(float(noise_multiplier)),
                    float(clipping_norm),
                    json.dumps(sorted(sites)),
                    datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                ),
            )

    def releases(self) -> list[dict[str, Any]]:
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM releases ORDER BY recorded_at, run_id, server_round")
            return [{**dict(r), "sites": json.loads(r["sites"])} for r in rows]

    def epsilon(
        self,
        delta: float,
        *,
        run_id: str | None = None,
        site: str | None = None,
        plus: Iterable[float] = (),
        excluding: tuple[str, int] | None = None,
    ) -> float:
        """Replace-one epsilon of the releases (all, one run's, or those a site took part in), plus
        `plus` (accounted multipliers of releases not made yet), without the (run, round) `excluding`."""
        sigmas = [
            r["accounted_noise_multiplier"]
            for r in self.releases()
            if (run_id is None or r["run_id"] == run_id)
            and (site is None or site in r["sites"])
            and (excluding is None or (r["run_id"], r["server_round"]) != excluding)
        ]
        return epsilon([*sigmas, *plus], delta)


class CentralDP:
    """The run's client-level DP: the consortium ledger, the per-phase Flower wrapper, the labels."""

    def __init__(self, run: RunConfig, run_dir: Path):
        self.run = run
        self.run_dir = Path(run_dir)
        self.run_id = ""  # set by the federation once the run's id is known
        self.sites = 0  # sites per release (the phase's sites)
        self.ledger_path = (
            Path(run.central_dp_ledger)
            if run.central_dp_ledger
            else self.run_dir.resolve().parent / LEDGER_FILE
        )
        self.ledger: CentralDPLedger | None = None
        if self.enabled:
            if (self.run_dir / OLD_ACCOUNTANT_FILE).exists():
                raise ValueError(
                    f"{self.run_dir / OLD_ACCOUNTANT_FILE}: this run's central-DP releases were "
                    "accounted by an earlier fedsynth outside the consortium ledger (and as "
                    "add/remove-one); resuming would drop them from the claim. Use a new run-dir"
                )
            self.ledger = CentralDPLedger(self.ledger_path)

    @property
    def enabled(self) -> bool:
        return self.run.central_dp != "off"

    @property
    def delta(self) -> float:
        return self.run.central_dp_delta or default_delta(self.sites)

    @property
    def accounted_noise_multiplier(self) -> float:
        return replace_one_noise_multiplier(self.run.central_dp_noise_multiplier)

    # ---- accounting ----------------------------------------------------------------------------
    def run_releases(self) -> list[dict[str, Any]]:
        if self.ledger is None:
            return []
        return [r for r in self.ledger.releases() if r["run_id"] == self.run_id]

    @property
    def releases(self) -> int:
        return len(self.run_releases())

    def epsilon(self) -> tuple[float, float]:
        """(epsilon, delta) of every release in the consortium ledger, this run's included."""
        if self.ledger is None:
            return 0.0, self.delta
        return self.ledger.epsilon(self.delta), self.delta

    def check_budget(self, server_round: int) -> str | None:
        """Why the release of `server_round` may not happen (max-epsilon over the consortium)."""
        limit = self.run.central_dp_max_epsilon
        if not limit or self.ledger is None:
            return None
        skip = (self.run_id, server_round)
        now = self.ledger.epsilon(self.delta, excluding=skip)
        after = self.ledger.epsilon(
            self.delta, plus=[self.accounted_noise_multiplier], excluding=skip
        )
        if after > limit:
            return (
                f"round {server_round}: central DP: the next release would take the consortium's "
                f"client-level epsilon from {now:.3g} to {after:.3g}, past max_epsilon = "
                f"{limit:g} (delta {self.delta:.1e}, ledger {self.ledger_path})"
            )
        return None

    def record_release(self, server_round: int, phase: str, sites: list[str]) -> None:
        if self.ledger is None:
            raise RuntimeError("central DP is off: there is no release to record")
        self.ledger.record(
            run_id=self.run_id,
            server_round=server_round,
            phase=phase,
            noise_multiplier=self.run.central_dp_noise_multiplier,
            clipping_norm=self.run.central_dp_clipping_norm,
            sites=sites,
        )

    # ---- the strategy --------------------------------------------------------------------------
    def wrap(self, strategy: Strategy, sites: int) -> DifferentialPrivacyClientSideFixedClipping:
        """Flower's client-side fixed-clipping wrapper around `strategy`, for `sites` sites per round.
        Flower's own accountant is not used: it knows only add/remove-one; the ledger accounts."""
        self.sites = sites
        return DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=self.run.central_dp_noise_multiplier,
            clipping_norm=self.run.central_dp_clipping_norm,
            num_sampled_clients=sites,
        )

    def noise_std(self, sites: int) -> float:
        return compute_stdv(
            self.run.central_dp_noise_multiplier, self.run.central_dp_clipping_norm, sites
        )

    def prepare_replies(
        self,
        replies: Iterable[Message],
        global_arrays: ArrayRecord,
        site_of: dict[int, str] | None = None,
    ) -> None:
        """Give every reply the same FedAvg weight, and clip at the server every update above C.

        The sites clip; the server re-clips (privacy.client_level.clip_update, exact: norm <= C, no
        tolerance) any update that is not, naming the site, so the sensitivity the accounting assumes
        holds even for a site that did not clip (an old client, a bug, a cheat). A non-finite update
        counts as no update (the global model).
        """
        c = self.run.central_dp_clipping_norm
        global_nd = global_arrays.to_numpy_ndarrays()
        for m in replies:
            m.content[messages.METRICS][UNIFORM_WEIGHT_KEY] = 1.0
            record = m.content[messages.ARRAYS]
            nd = record.to_numpy_ndarrays()
            name = (site_of or {}).get(m.metadata.src_node_id, f"node {m.metadata.src_node_id}")
            norm = update_norm(nd, global_nd)
            if norm <= c:
                continue
            if math.isfinite(norm):
                log.warning(
                    "central DP: %s sent an update of norm %.6g > clipping norm %.6g; "
                    "clipped at the server",
                    name,
                    norm,
                    c,
                )
                nd = clip_update(nd, global_nd, c)[0]
            else:
                log.warning("central DP: %s sent a non-finite update; counted as none", name)
                nd = [np.array(g, copy=True) for g in global_nd]
            m.content[messages.ARRAYS] = ArrayRecord(
                {k: Array(np.asarray(v)) for k, v in zip(record.keys(), nd, strict=True)}
            )

    # ---- labels --------------------------------------------------------------------------------
    def summary(self, completed_rounds: int) -> dict[str, Any]:
        """The `client_level` part of privacy.json (and run.json)."""
        if not self.enabled or self.ledger is None:
            return {
                "protection": "none",
                "note": "central-dp is off: the server adds no noise to the aggregate, so the "
                "released model carries no client-level guarantee; each site's updates carry only "
                "its own sample-level DP",
            }
        eps, delta = self.epsilon()
        mine = self.run_releases()
        every = self.ledger.releases()
        names = sorted({s for r in every for s in r["sites"]})
        unprotected = max(0, completed_rounds - len(mine))
        out: dict[str, Any] = {
            "protection": (
                "client-level DP, replace-one (any one site's data replaced by any other; "
                "sensitivity 2C): bounds what anyone who sees only the released models and cohort "
                "can learn about one site's data, composed over every central-DP release of the "
                f"consortium (RDP, delta={delta:.1e}). Not protected: which sites took part "
                "(public), and anything towards the server"
            ),
            "neighboring_relation": NEIGHBORING_RELATION,
            "sensitivity": "2C (each update clipped to C at the site, re-clipped at the server)",
            "epsilon": eps if not unprotected else math.inf,
            "delta": delta,
            f"epsilon_at_delta_{REFERENCE_DELTA:g}": (
                self.ledger.epsilon(REFERENCE_DELTA) if not unprotected else math.inf
            ),
            "epsilon_this_run": epsilon([r["accounted_noise_multiplier"] for r in mine], delta),
            "epsilon_per_site": {s: self.ledger.epsilon(delta, site=s) for s in names},
            "noise_multiplier": self.run.central_dp_noise_multiplier,
            "accounted_noise_multiplier": self.accounted_noise_multiplier,
            "clipping_norm": self.run.central_dp_clipping_norm,
            "noise_std_on_aggregate": self.noise_std(self.sites) if self.sites else None,
            "rounds": len(mine),
            "releases_in_ledger": len(every),
            "runs_in_ledger": len({r["run_id"] for r in every}),
            "ledger": str(self.ledger_path),
            "sites": self.sites,
            "sampling": "none: every site in every round (no amplification)",
            "mechanism": "Flower DifferentialPrivacyClientSideFixedClipping (update clipping at the "
            "sites, Gaussian noise on the uniform FedAvg aggregate at the server)",
            "accountant": "dp-accounting RDP, replace-one (Gaussian, noise multiplier sigma / 2)",
            "max_epsilon": self.run.central_dp_max_epsilon or None,
            "trust": "the server sees each site's clipped update (no secure aggregation); the "
            "guarantee is towards everyone who sees only the released aggregates",
        }
        if unprotected:
            out["note"] = (
                f"{unprotected} round(s) of this run were released without central DP: the final "
                "model has no finite client-level guarantee"
            )
        return out


class SitesGrid:
    """A view of the Grid that offers the strategy only the given nodes (the sites still in the run)."""

    def __init__(self, grid: Any, node_ids: Iterable[int]):
        self._grid = grid
        self._nodes = list(node_ids)

    def get_node_ids(self) -> list[int]:
        # The list as given, not re-checked: a site that disconnected meanwhile is asked anyway and recorded as
        # dropped when it does not answer (a strategy waiting for it to reconnect would wait forever).
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def sample_level(privacy_record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-site sample-level entries of a privacy.json, in this format or the earlier flat {site: {...}} one."""
    if "sample_level" in privacy_record:
        return dict(privacy_record["sample_level"])
    return {k: v for k, v in privacy_record.items() if k != "client_level"}
