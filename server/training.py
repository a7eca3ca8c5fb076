"""The federation loop the ServerApp runs: rounds, phases, aggregation, checkpoints, resume, dropouts, refusals.

One obvious path: for each round, pick the sites still in the run, send them the component being trained (the
autoencoder first, then the diffusion UNet), aggregate what comes back with the configured Flower strategy, write
a checkpoint and the per-site metrics, and go on. Everything a later reader needs is in the run folder
(server/run_folder.py names its files; server/checkpoint.py owns the checkpoint format):

    run.json          the run record: config, sites, who dropped or refused and why, status
    metrics.jsonl     one line per site per round: steps, seconds, epsilon, status (loss and patients only
                      from sites that opt in: common/messages.py TrainMetrics)
    privacy.json      {"sample_level": {site: spend as last reported}, "client_level": {...},
                      "aggregation_weights": ...}, each labelled with the kind of protection (client_level:
                      central DP, or "none"); each site's entry says whether it reported its loss and count;
                      "noise_levels": each site's scanner noise level as released under DP (release-noise-levels)
    ../central_dp_ledger.sqlite  the consortium's client-level releases over all runs, when central DP is on
                      (server/central_dp.py; `central-dp-ledger` puts it elsewhere)
    checkpoints/      round-NNN.pt (atomic), latest.pt -> the newest (server/checkpoint.py)
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common import messages as msg
from common.config import RunConfig, model_config
from common.io import atomic_path, sha256_file
from common.messages import MessageError, RoundPlan, TrainMetrics, TrainStatus
from common.model import build_autoencoder, build_unet
from common.progress import say_line
from server.central_dp import UNIFORM_WEIGHT_KEY, CentralDP, SitesGrid, sample_level
from server.checkpoint import Checkpoint, RunState
from server.pretrain import load_pretrained
from server.run_folder import RunFolder

log = logging.getLogger("fedsynth.server")
AGGREGATION_WEIGHT_KEY = (
    UNIFORM_WEIGHT_KEY  # the server sets it to 1.0 on every reply it aggregates
)
AUTOENCODER_SOURCES = {
    "public": "pretrained on public data only (no patient data, no privacy cost)",
    "public+federated": "pretrained on public data, then fine-tuned at the sites (DP-SGD)",
    "federated": "trained federated at the sites (DP-SGD)",
}
AGGREGATION_WEIGHTS = (
    "uniform: every site's update counts the same (sites do not report their exact patient counts unless "
    "they opt in with report-training-stats, and those are never used as weights)"
)


def make_strategy(run: RunConfig) -> Strategy:
    """The phase's Flower strategy, given our record names. Sites are weighted equally (AGGREGATION_WEIGHTS): a
    site does not report its exact patient count unless it opts in, and Flower's central-DP accounting assumes a
    uniform mean anyway."""
    common = dict(
        min_train_nodes=run.min_sites,
        min_available_nodes=run.min_sites,
        fraction_evaluate=0.0,
        weighted_by_key=AGGREGATION_WEIGHT_KEY,
        arrayrecord_key=msg.ARRAYS,
        configrecord_key=msg.CONFIG,
    )
    if run.strategy == "fedavg":
        return FedAvg(**common)
    if run.strategy == "fedadam":
        return FedAdam(**common, eta=run.server_lr)
    return FedProx(**common, proximal_mu=run.proximal_mu)


def server_optimizer_state(strategy: Strategy, phase: str) -> dict[str, Any] | None:
    """A server optimiser's moments (FedAdam's m_t and v_t), so a resumed run continues the same optimiser instead
    of restarting it; None for strategies without state (FedAvg, FedProx)."""
    m_t, v_t = getattr(strategy, "m_t", None), getattr(strategy, "v_t", None)
    if not m_t:
        return None
    return {
        "phase": phase,
        "m_t": {k: v.copy() for k, v in m_t.items()},
        "v_t": {k: v.copy() for k, v in v_t.items()},
    }


def restore_server_optimizer(strategy: Strategy, saved: dict[str, Any] | None, phase: str) -> bool:
    """Put saved moments back into a fresh strategy of the same phase; True if it did."""
    if not saved or saved.get("phase") != phase or not hasattr(strategy, "m_t"):
        return False
    strategy.m_t = {k: v.copy() for k, v in saved["m_t"].items()}
    strategy.v_t = {k: v.copy() for k, v in saved["v_t"].items()}
    return True


def wait_for_sites(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.time() > deadline:
            raise TimeoutError(
                f"only {len(nodes)} of the {n} sites needed connected within {timeout:.0f}s"
            )
        time.sleep(2.0)


class Federation:
    """Holds a run's folder and state; `run()` drives the rounds. Small on purpose: read top to bottom."""

    def __init__(self, grid: Grid, run: RunConfig, progress: Callable[[str], None] | None = None):
        self.grid = grid
        self.run = run
        self.cfg = model_config(run.preset)
        self.dir = Path(run.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.folder = RunFolder(self.dir)
        self.say = progress or (lambda m: log.info("%s", m))
        self.privacy: dict[str, dict[str, Any]] = {}  # site -> sample-level spend as last reported
        self.central = CentralDP(run, self.dir)
        self._saved_server_optimizer: dict[str, Any] | None = None  # FedAdam moments, when resuming
        self._answered_nodes: set[int] = set()  # nodes that replied to this ServerApp
        self._phase_nodes: list[
            int
        ] = []  # central DP: the sites the phase's DP wrapper was set up for
        self.pretraining: dict[str, Any] | None = (
            None  # the pretrained checkpoint's provenance, if any
        )

    # ---- state -------------------------------------------------------------------------------------------------
    def _newest_checkpoint(self) -> Path:
        """latest.pt, or the newest round-NNN.pt when that is further on. Checkpoint.save writes the round's file
        first and latest.pt second: a crash between the two (a SuperLink or server restart) leaves the newest
        state only in the round's file, and resuming from latest.pt would train that round again (or, after
        round 1, start a new run)."""
        latest = self.folder.latest_checkpoint
        rounds = {
            int(m.group(1)): f
            for f in self.folder.checkpoints.glob("round-*.pt")
            if (m := re.fullmatch(r"round-(\d+)\.pt", f.name))
        }
        if not rounds:
            return latest
        newest = max(rounds)
        if latest.exists() and Checkpoint.load(latest).run_state.completed_round >= newest:
            return latest
        return rounds[newest]

    def _resume_or_start(self) -> tuple[RunState, dict, dict]:
        latest = self._newest_checkpoint()
        if (
            latest != self.folder.latest_checkpoint
        ):  # finish the interrupted save: latest.pt is the newest again
            with atomic_path(self.folder.latest_checkpoint) as tmp:
                shutil.copyfile(latest, tmp)
        if latest.exists():
            saved = Checkpoint.load(latest)
            if saved.model_config.name != self.cfg.name:
                raise ValueError(
                    f"{latest}: checkpoint is for preset {saved.model_config.name!r}, "
                    f"this run asks for {self.cfg.name!r}; use a new run-dir"
                )
            self.pretraining = saved.pretraining
            self._check_same_pretrained(latest)
            state = saved.run_state
            state.status, state.reason = "running", ""
            self.say(
                f"resuming run {state.run_id} after round {state.completed_round} from {latest}"
            )
            self._saved_server_optimizer = saved.server_optimizer
            privacy = self.folder.read_privacy()
            if privacy is not None:
                self.privacy = sample_level(privacy)
            return state, saved.autoencoder, saved.unet
        torch.manual_seed(self.run.seed)
        state = RunState(run_id=uuid.uuid4().hex[:12], autoencoder_source="federated")
        if not self.run.pretrained:
            return (
                state,
                build_autoencoder(self.cfg).state_dict(),
                build_unet(self.cfg).state_dict(),
            )
        ckpt, self.pretraining = load_pretrained(self.run.pretrained, self.cfg)
        state.latent_scale = ckpt.run_state.latent_scale
        state.unet_warm_started = True
        state.autoencoder_source = (
            "public" if self.run.autoencoder_rounds == 0 else "public+federated"
        )
        p = self.pretraining
        self.say(
            f"starting from the public pretrained checkpoint {p['checkpoint']} (sha256 "
            f"{p['checkpoint_sha256'][:16]}...; public data sha256 {p['public_data_sha256'][:16]}..., "
            f"{p['public_files']} files; latent scale {state.latent_scale:.3f})"
        )
        return state, ckpt.autoencoder, ckpt.unet

    def _check_same_pretrained(self, latest: Path) -> None:
        """A resumed run keeps the pretrained checkpoint it started from: naming another one is refused."""
        started = (self.pretraining or {}).get("checkpoint_sha256")
        if not self.run.pretrained:
            if started:
                raise ValueError(
                    f"{latest}: this run started from the pretrained checkpoint {self.pretraining['checkpoint']} "
                    "but the run config names none; set `pretrained` back or use a new run-dir"
                )
            return
        named = Path(self.run.pretrained)
        sha = sha256_file(named) if named.is_file() else None
        if started != sha:
            raise ValueError(
                f"{latest}: this run started from a pretrained checkpoint with sha256 {started}, but "
                f"`pretrained` names {named} (sha256 {sha}); set it back or use a new run-dir"
            )

    def _write_record(self, state: RunState) -> None:
        self.folder.write_record(
            {
                "run_id": state.run_id,
                "status": state.status,
                "reason": state.reason,
                "completed_round": state.completed_round,
                "num_server_rounds": self.run.num_server_rounds,
                "autoencoder": AUTOENCODER_SOURCES.get(
                    state.autoencoder_source, state.autoencoder_source
                ),
                "latent_scale": state.latent_scale,
                "latent_scale_source": (
                    "the pretrained checkpoint (estimated on its public data)"
                    if self.pretraining
                    else "none: 1.0 (no pretrained checkpoint)"
                ),
                "diffusion_warm_start": (
                    f"pretrained {self.pretraining['unet_steps']} steps on public data, then fine-tuned with DP "
                    "at the sites"
                    if self.pretraining
                    else "none: trained from scratch at the sites"
                ),
                "pretraining": self.pretraining,
                "sites": state.sites,
                "noise_levels": state.noise_levels,
                "aggregation_weights": AGGREGATION_WEIGHTS,
                "central_dp": self.central.summary(state.completed_round),
                "run_config": dataclasses.asdict(self.run),
                "model_config": dataclasses.asdict(self.cfg),
            },
        )
        self.folder.write_privacy(
            {
                "sample_level": self.privacy,
                "client_level": self.central.summary(state.completed_round),
                "aggregation_weights": AGGREGATION_WEIGHTS,
                # each site's scanner noise level, released under DP (with its own clip and noise multiplier)
                "noise_levels": state.noise_levels,
            },
        )

    # ---- one round ---------------------------------------------------------------------------------------------
    def _note_disconnected(self, state: RunState, r: int, connected: set[int]) -> None:
        """A site that answered in this run (this ServerApp) but whose SuperNode is no longer connected is
        recorded as dropped: the Grid no longer offers its node, so no round would ask it and notice."""
        for name, s in list(state.sites.items()):
            gone = s["node_id"] in self._answered_nodes and s["node_id"] not in connected
            if s["status"] == "active" and gone:
                self._mark(
                    state,
                    name,
                    s["node_id"],
                    "dropped",
                    r,
                    "disconnected: its SuperNode is no longer connected to the SuperLink",
                )

    def _active_nodes(self, state: RunState, r: int | None = None) -> list[int]:
        """The connected nodes of sites that have not refused; with a round, sites whose SuperNode is gone
        are recorded as dropped in it (from the same list of nodes)."""
        nodes = list(self.grid.get_node_ids())
        if r is not None:
            self._note_disconnected(state, r, set(nodes))
        refused = {s["node_id"] for s in state.sites.values() if s["status"] == "refused"}
        return [n for n in nodes if n not in refused]

    def _round(
        self,
        strategy: Strategy,
        state: RunState,
        r: int,
        arrays: ArrayRecord,
        frozen: ArrayRecord | None,
    ):
        phase = self.run.phase(r)
        plan = RoundPlan(
            run_id=state.run_id,
            server_round=r,
            phase=phase,
            num_server_rounds=self.run.num_server_rounds,
            federated_autoencoder_rounds=self.run.federated_autoencoder_rounds,
            preset=self.run.preset,
            local_epochs=self.run.local_epochs,
            batch_size=self.run.batch_size,
            lr=self.run.lr_autoencoder if phase == "autoencoder" else self.run.lr_diffusion,
            kl_weight=self.run.kl_weight,
            latent_scale=state.latent_scale,
            proximal_mu=self.run.proximal_mu if self.run.strategy == "fedprox" else 0.0,
            seed=self.run.seed,
            class_dropout=self.run.class_dropout,
            dp_trainable=self.run.dp_trainable,
            dp_trainable_autoencoder=self.run.dp_trainable_autoencoder,
            lesion_weight=self.run.lesion_weight,
            release_noise_level=self.run.release_noise_levels,
        )
        active = self._active_nodes(state, r)
        if self.central.enabled:  # Flower's DP wrapper was set up for exactly these sites
            if not set(self._phase_nodes) <= set(active):
                return (
                    None,
                    0,
                    (
                        f"round {r}: central DP: {len(set(self._phase_nodes) - set(active))} of the phase's "
                        f"{len(self._phase_nodes)} sites are gone; nothing was released. Resume the run to "
                        "go on with the sites that remain"
                    ),
                )
            active = self._phase_nodes
            over_budget = self.central.check_budget(r)
            if over_budget:
                return None, 0, over_budget
        if len(active) < self.run.min_sites:
            return (
                None,
                0,
                f"only {len(active)} sites can still train, min-sites is {self.run.min_sites}",
            )
        messages = list(
            strategy.configure_train(r, arrays, plan.to_record(), SitesGrid(self.grid, active))
        )
        if frozen is not None:
            for m in messages:
                m.content[msg.AUTOENCODER] = frozen
        self.say(f"round {r}/{self.run.num_server_rounds} ({phase}): asking {len(messages)} sites")
        t0 = time.time()
        replies = list(self.grid.send_and_receive(messages, timeout=self.run.round_timeout))
        # An error the SuperLink made for a node (e.g. "node unavailable") comes from the SuperLink, not the
        # node: tie it to the node it answers for through the message it replies to.
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        unique = len(asked) == len(messages)  # (messages not sent through a SuperLink have no ids)
        nodes = [
            asked.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)
            if m.has_error() and unique
            else m.metadata.src_node_id
            for m in replies
        ]
        answered = set(nodes)
        good: list[Message] = []
        for m, node in zip(replies, nodes, strict=True):
            self._note_reply(state, r, phase, m, good, node)
        for node in {m.metadata.dst_node_id for m in messages} - answered:
            self._mark(
                state,
                self._site_of(state, node),
                node,
                "dropped",
                r,
                "no reply within round-timeout",
            )
        new_arrays = None
        asked = [m.metadata.dst_node_id for m in messages]
        if self.central.enabled:
            result = self._aggregate_central_dp(
                strategy, state, r, phase, arrays, messages, good, t0
            )
            if result[2] is None:
                eps, _ = self.central.epsilon()
                self._round_line(state, r, phase, asked, answered, good, t0, eps)
            return result
        if good:
            new_arrays, _ = strategy.aggregate_train(r, good)
        self.say(f"round {r}: {len(good)} updates aggregated in {time.time() - t0:.1f}s")
        self._round_line(state, r, phase, asked, answered, good, t0)
        return new_arrays, len(good), None

    def _round_line(
        self,
        state: RunState,
        r: int,
        phase: str,
        asked: list[int],
        answered: set[int],
        good: list[Message],
        t0: float,
        client_level_epsilon: float | None = None,
    ) -> None:
        """One line per round for the person at the terminal: who answered, what each site has spent so far."""
        line = (
            f"round {r}/{self.run.num_server_rounds} ({phase}): "
            f"{len(answered & set(asked))}/{len(asked)} sites answered"
        )
        if len(good) != len(answered & set(asked)):
            line += f", {len(good)} updates used"
        line += f", {time.time() - t0:.0f}s"
        spent = [
            f"{site} {_epsilon_text(p.get('epsilon'))}/{_epsilon_text(p.get('epsilon_budget'))}"
            for site, p in sorted(self.privacy.items())
        ]
        if spent:
            line += "; sample-level epsilon spent/budget: " + ", ".join(spent)
        if client_level_epsilon is not None:
            line += f"; client-level epsilon {_epsilon_text(client_level_epsilon)}"
        trouble = [
            f"{site} {s['status']} ({_short(s['reason'])})"
            for site, s in sorted(state.sites.items())
            if s["round"] == r and s["status"] != "active"
        ]
        if trouble:
            line += "; " + "; ".join(trouble)
        say_line("round", line, elapsed=round(time.time() - t0, 3))

    def _aggregate_central_dp(
        self,
        strategy: Strategy,
        state: RunState,
        r: int,
        phase: str,
        arrays: ArrayRecord,
        messages: list[Message],
        good: list[Message],
        t0: float,
    ):
        """Flower's DP wrapper: uniform mean of the clipped updates + Gaussian noise, one accounted release.

        It aggregates only when every asked site sent an update (the noise was set for the mean of all of
        them); otherwise nothing is released and the run stops, saying why.
        """
        new_arrays = None
        if len(good) == len(messages):
            self.central.prepare_replies(
                good, arrays, {s["node_id"]: name for name, s in state.sites.items()}
            )
            new_arrays, _ = strategy.aggregate_train(r, good)
        if new_arrays is None:
            return (
                None,
                len(good),
                (
                    f"round {r}: central DP: {len(good)} of {len(messages)} asked sites sent an "
                    "update; Flower's accounted aggregation needs all of them, so nothing was "
                    "released. Resume the run to go on without the sites that refused or dropped"
                ),
            )
        # In the consortium ledger before the checkpoint: nobody receives the aggregate before that
        self.central.record_release(
            r, phase, [TrainStatus.from_record(m.content[msg.STATUS]).site for m in good]
        )
        eps, delta = self.central.epsilon()
        std = self.central.noise_std(len(good))
        self.folder.append_metrics(
            {
                "round": r,
                "phase": phase,
                "site": "(aggregate)",
                "status": "aggregated",
                "sites": len(good),
                "central-dp-noise-std": std,
                "client-level-epsilon": eps,
                "client-level-delta": delta,
            },
        )
        self.say(
            f"round {r}: {len(good)} clipped updates aggregated in {time.time() - t0:.1f}s, central DP noise "
            f"std {std:.3g}; client-level epsilon so far {eps:.2f} (delta {delta:.1e}, "
            f"{self.central.releases} releases)"
        )
        return new_arrays, len(good), None

    def _site_of(self, state: RunState, node: int) -> str:
        for name, s in state.sites.items():
            if s["node_id"] == node:
                return name
        return f"node-{node}"

    def _mark(
        self, state: RunState, site: str, node: int, status: str, r: int, reason: str = ""
    ) -> None:
        prev = state.sites.get(site, {})
        if status != "active" or prev.get("status") != "active":
            self.say(f"site {site}: {status}" + (f" ({reason})" if reason else ""))
        state.sites[site] = {
            "node_id": node,
            "status": status,
            "round": r,
            "reason": reason,
            "first_round": prev.get("first_round", r),
        }
        if status != "active":
            self.folder.append_metrics(
                {"round": r, "site": site, "node_id": node, "status": status, "reason": reason},
            )

    def _note_reply(
        self, state: RunState, r: int, phase: str, m: Message, good: list[Message], node: int
    ) -> None:
        self._answered_nodes.add(node)
        if m.has_error():
            self._mark(
                state,
                self._site_of(state, node),
                node,
                "dropped",
                r,
                f"error: {msg.readable_error(m.error.reason)}",
            )
            return
        try:
            status = TrainStatus.from_record(m.content.config_records.get(msg.STATUS))
            if status.error or status.refused:
                metrics = None
            else:
                metrics = TrainMetrics.from_record(m.content.metric_records.get(msg.METRICS))
        except MessageError as err:
            site = self._site_of(state, node)
            self._mark(state, site, node, "dropped", r, f"malformed reply: {err}")
            return
        site = status.site
        if status.error:
            self._mark(state, site, node, "dropped", r, f"error: {status.error}")
            return
        self.privacy[site] = dict(m.content[msg.PRIVACY])
        if status.refused:
            self._mark(state, site, node, "refused", r, status.refused)
            return
        self._mark(state, site, node, "active", r)
        reported = {k.replace("_", "-"): v for k, v in asdict(metrics).items() if v is not None}
        self.folder.append_metrics(
            {"round": r, "phase": phase, "site": site, "node_id": node, "status": "ok", **reported},
        )
        stats = (
            f"loss {metrics.loss:.4f}, {metrics.num_examples} patients, "
            if metrics.loss is not None and metrics.num_examples is not None
            else ""
        )
        replayed = (
            " (the update it released for this round before, sent again: nothing trained or spent now)"
            if metrics.replayed
            else ""
        )
        self.say(
            f"  {site}: {stats}{metrics.steps} steps, {metrics.seconds:.1f}s, "
            f"epsilon so far {metrics.epsilon:.2f}{replayed}"
        )
        if metrics.noise_level is not None:
            state.noise_levels[site] = {
                "sigma": metrics.noise_level,
                "std": metrics.noise_level_std,
                "round": r,
            }
            self.say(
                f"  {site}: scanner noise level {metrics.noise_level:.4f} (released under DP, noise std "
                f"{metrics.noise_level_std:.4f})"
            )
        # FedAvg weighs every site the same: the strategy sees this weight and nothing the site reported
        m.content[msg.METRICS] = MetricRecord({AGGREGATION_WEIGHT_KEY: 1.0})
        good.append(m)

    # ---- the run -----------------------------------------------------------------------------------------------
    def run_rounds(self) -> Path | None:
        """Run (or resume) all rounds; returns the final checkpoint, or None if the run had to stop early."""
        state, ae, unet = self._resume_or_start()
        self.central.run_id = state.run_id
        self._write_record(state)
        wait_for_sites(self.grid, self.run.min_sites, self.run.round_timeout)
        strategy, strategy_phase = None, None
        ckpt = self.folder.latest_checkpoint if state.completed_round else None
        if state.completed_round >= self.run.num_server_rounds:
            self.say("all rounds already done")
        for r in range(state.completed_round + 1, self.run.num_server_rounds + 1):
            phase = self.run.phase(r)
            if (
                phase != strategy_phase
            ):  # a fresh strategy per phase: server optimiser state is per component
                strategy, strategy_phase = make_strategy(self.run), phase
                if restore_server_optimizer(strategy, self._saved_server_optimizer, phase):
                    self.say(
                        f"server optimiser ({self.run.strategy}) moments restored from the checkpoint"
                    )
                self._phase_nodes = self._active_nodes(state)
                if self.central.enabled and len(self._phase_nodes) >= self.run.min_sites:
                    # Flower's DP wrapper, for this phase's sites; the accountant is the run's, shared by all phases
                    strategy = self.central.wrap(strategy, len(self._phase_nodes))
            active = self._active_nodes(state, r)
            if len(active) < self.run.min_sites:
                return self._stop(
                    state,
                    f"only {len(active)} sites can still train, min-sites is {self.run.min_sites}",
                )
            component = ae if phase == "autoencoder" else unet
            frozen = ArrayRecord(ae) if phase == "diffusion" else None
            new, n_good, failure = self._round(strategy, state, r, ArrayRecord(component), frozen)
            if failure:
                return self._stop(state, failure)
            if n_good < self.run.min_sites or new is None:
                return self._stop(
                    state, f"round {r}: {n_good} updates, fewer than min-sites={self.run.min_sites}"
                )
            if phase == "autoencoder":
                ae = new.to_torch_state_dict()
            else:
                unet = new.to_torch_state_dict()
            state.completed_round = r
            ckpt = Checkpoint(
                self.cfg,
                dataclasses.asdict(self.run),
                state,
                ae,
                unet,
                server_optimizer_state(strategy, phase),
                self.pretraining,
            ).save(self.folder)
            self._write_record(state)
        state.status = "completed"
        self._write_record(state)
        return self.folder.latest_checkpoint if ckpt else None

    def _stop(self, state: RunState, reason: str) -> None:
        state.status, state.reason = "stopped", reason
        # a warning: the terminal shows it whatever its verbosity
        log.warning("run stopped: %s", reason)
        self._write_record(state)
        return None


def _short(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _epsilon_text(value: Any) -> str:
    try:
        eps = float(value)
    except (TypeError, ValueError):
        return "?"
    return "inf" if eps == float("inf") else f"{eps:.2f}"
