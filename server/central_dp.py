"""Central (client-level) differential privacy for the federation, with Flower's own pieces.

With `central-dp = "client-side-fixed"` every site clips its model update (new - global) to an L2 norm C before it
leaves (client.client_app.central_dp_clipping_mod), and the server wraps the phase's FedAvg/FedProx in Flower's
`DifferentialPrivacyClientSideFixedClipping`: it averages the n clipped updates with equal weights and adds
Gaussian noise of std sigma x C / n to the aggregate. Each noisy aggregate is one Gaussian release, composed in
Flower's `RdpAccountant` (no sampling amplification: every site takes part in every round). One accountant serves
the whole run, both phases, and is written to `central_dp_accountant.json` in the run folder after every release,
BEFORE the round's checkpoint, so a resumed run keeps counting and a crash can only over-count.

What this protects: what anyone who sees the released global model (the sites between rounds, a checkpoint, the
cohort synthesized from it) can learn about whether one whole site took part. What it does not: the server still
sees each site's clipped update in the clear (TLS protects it only in transit); hiding it from the server needs
secure aggregation (SecAgg+), which is not wired.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from common.config import RunConfig
from common.io import write_json_atomic

log = logging.getLogger("fedsynth.server")
ACCOUNTANT_FILE = "central_dp_accountant.json"
UNIFORM_WEIGHT_KEY = (
    "central-dp-weight"  # FedAvg weighs by this key under central DP: 1.0 for every site
)
REFERENCE_DELTA = (
    1e-5  # client_level also reports epsilon here, for comparison with the usual "delta << 1/n"
)
NORM_TOLERANCE = (
    1e-4  # relative slack for float32 rounding when the server re-checks a clipped update
)


def default_delta(n_sites: int) -> float:
    return 1.0 / (10.0 * n_sites)


class CentralDP:
    """The run's client-level DP: one accountant for all phases, the per-phase Flower wrapper, the labels."""

    def __init__(self, run: RunConfig, run_dir: Path):
        self.run = run
        self.path = Path(run_dir) / ACCOUNTANT_FILE
        self.accountant: RdpAccountant | None = None
        self._stored: dict[str, Any] | None = None
        if self.path.exists():
            self._stored = json.loads(self.path.read_text())
            if self.enabled:
                self._load(self._stored)

    @property
    def enabled(self) -> bool:
        return self.run.central_dp != "off"

    # ---- accountant ----------------------------------------------------------------------------------------------
    def _config(self, population: int) -> PrivacyConfig:
        return PrivacyConfig(
            target_delta=self.run.central_dp_delta or default_delta(population),
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=self.run.central_dp_max_epsilon or None,
        )

    def _load(self, state: dict[str, Any]) -> None:
        """Restore the run's accountant. The population (sites at the start of the run) comes from the file; delta
        and max-epsilon may be changed by a resumed run's config (they change what is reported, not what happened)."""
        stored = dict(state.get("config") or {})
        population = int(stored.get("population_size", 0))
        if stored.get("sampling_method") != SamplingMethod.NO_AMPLIFICATION.value:
            raise ValueError(
                f"{self.path}: accountant state with sampling {stored.get('sampling_method')!r}; "
                "fedsynth composes no-amplification releases only"
            )
        config = self._config(population)
        state = {
            **state,
            "config": {
                **stored,
                "target_delta": config.target_delta,
                "max_epsilon": config.max_epsilon,
            },
        }
        self.accountant = RdpAccountant(config)
        self.accountant.load_state_dict(state)

    def ensure_accountant(self, population: int) -> RdpAccountant:
        """The run's accountant; created for `population` sites on the run's first central-DP round."""
        if self.accountant is None:
            self.accountant = RdpAccountant(self._config(population))
        return self.accountant

    def save(self) -> None:
        if self.accountant is not None:
            write_json_atomic(self.path, self.accountant.state_dict())

    @property
    def releases(self) -> int:
        return self.accountant.num_releases if self.accountant is not None else 0

    def epsilon(self) -> tuple[float, float | None]:
        """(epsilon, delta) spent so far; epsilon 0 before the first release (delta None before the sites are
        known, when it defaults to 1 / (10 x sites))."""
        if self.accountant is None:
            return 0.0, self.run.central_dp_delta or None
        if self.accountant.num_releases == 0:
            return 0.0, self.accountant.config.target_delta
        spent = self.accountant.get_privacy_spent()
        return float(spent.epsilon), float(spent.delta)

    # ---- the strategy ------------------------------------------------------------------------------------------
    def wrap(
        self, strategy: Strategy, sites: int, population: int
    ) -> DifferentialPrivacyClientSideFixedClipping:
        """Flower's client-side fixed-clipping wrapper around `strategy`, for `sites` sites per round."""
        acc = self.ensure_accountant(population)
        if sites > acc.config.population_size:
            raise ValueError(
                f"central DP: {sites} sites to train but the run's accountant was set up for "
                f"{acc.config.population_size} (the sites at the start of the run); use a new run-dir"
            )
        return DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=self.run.central_dp_noise_multiplier,
            clipping_norm=self.run.central_dp_clipping_norm,
            num_sampled_clients=sites,
            accountant=acc,
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
        """Give every reply the same FedAvg weight, and re-check that its update is within the clipping norm.

        The sites clip; the server re-clips (same Flower function) any update that is not, naming the site, so the
        sensitivity the accountant assumes holds even for a site that did not clip (an old client, a bug).
        """
        c = self.run.central_dp_clipping_norm
        global_nd = global_arrays.to_numpy_ndarrays()
        for m in replies:
            m.content["metrics"][UNIFORM_WEIGHT_KEY] = 1.0
            record = m.content["arrays"]
            nd = record.to_numpy_ndarrays()
            norm = update_norm(nd, global_nd)
            if norm > c * (1 + NORM_TOLERANCE):
                name = (site_of or {}).get(m.metadata.src_node_id, f"node {m.metadata.src_node_id}")
                log.warning(
                    "central DP: %s sent an update of norm %.4g > clipping norm %.4g; clipped at the server",
                    name,
                    norm,
                    c,
                )
                compute_clip_model_update(nd, global_nd, c)
                m.content["arrays"] = ArrayRecord(
                    {k: Array(np.asarray(v)) for k, v in zip(record.keys(), nd, strict=False)}
                )

    # ---- labels ------------------------------------------------------------------------------------------------
    def summary(self, completed_rounds: int) -> dict[str, Any]:
        """The `client_level` part of privacy.json (and run.json)."""
        if not self.enabled:
            earlier = sum(
                int(c.get("count", 0)) for c in (self._stored or {}).get("compositions", [])
            )
            note = (
                "central-dp is off: the server adds no noise to the aggregate, so the released model carries no "
                "client-level guarantee; each site's updates carry only its own sample-level DP"
            )
            if earlier:
                note += f" (central DP was on for {earlier} earlier release(s) of this run; that does not carry over)"
            return {"protection": "none", "note": note}
        eps, delta = self.epsilon()
        acc = self.accountant
        sites = acc.config.population_size if acc else 0
        unprotected = max(0, completed_rounds - self.releases)
        out: dict[str, Any] = {
            "protection": (
                "client-level DP: bounds what anyone who sees the released model can learn about whether "
                f"a whole site participated (RDP, delta={delta:.2e})"
                if delta
                else "client-level DP (RDP, delta = 1/(10 x sites) once the sites are known)"
            ),
            "epsilon": eps if not unprotected else math.inf,
            "delta": delta,
            f"epsilon_at_delta_{REFERENCE_DELTA:g}": (
                float(acc.get_epsilon(REFERENCE_DELTA))
                if acc and acc.num_releases and not unprotected
                else (0.0 if not unprotected else math.inf)
            ),
            "noise_multiplier": self.run.central_dp_noise_multiplier,
            "clipping_norm": self.run.central_dp_clipping_norm,
            "noise_std_on_aggregate": self.noise_std(sites) if sites else None,
            "rounds": self.releases,
            "sites": sites,
            "sampling": "none: every site in every round (no amplification)",
            "mechanism": "Flower DifferentialPrivacyClientSideFixedClipping (update clipping at the sites, "
            "Gaussian noise on the uniform FedAvg aggregate at the server)",
            "accountant": "flwr RdpAccountant",
            "max_epsilon": self.run.central_dp_max_epsilon or None,
            "trust": "the server sees each site's clipped update (no secure aggregation); the guarantee is "
            "towards everyone who sees only the released aggregates",
        }
        if unprotected:
            out["note"] = (
                f"{unprotected} round(s) of this run were released without central DP: the final model "
                "has no finite client-level guarantee"
            )
        return out


def update_norm(new: list[np.ndarray], old: list[np.ndarray]) -> float:
    """L2 norm of the model update new - old over all arrays (Flower's get_norm)."""
    return get_norm([np.subtract(a, b) for a, b in zip(new, old, strict=True)])


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
