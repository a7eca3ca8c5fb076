"""Resuming a FedAdam run continues the same server optimiser: its moments travel in the checkpoint. Sites that
drop are recorded. Each site's DP noise-level release reaches the run's records."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Message

from bench.bench_utility import InProcessGrid
from common.config import RunConfig
from server.checkpoint import Checkpoint
from server.training import Federation
from tests.server.test_central_dp import FakeGrid

pytestmark = pytest.mark.usefixtures("task_identity")


class RoundSeededGrid(FakeGrid):
    """Each site's step depends only on (round, node), so an interrupted run sees the same updates as a whole one."""

    def _answer(self, msg: Message) -> Message:
        self.rng = np.random.default_rng(
            1000 * int(msg.content["config"]["server-round"]) + msg.metadata.dst_node_id
        )
        return super()._answer(msg)


def _run(run_dir, rounds: int) -> RunConfig:
    return RunConfig(
        preset="tiny",
        num_server_rounds=rounds,
        autoencoder_rounds=1,
        min_sites=2,
        strategy="fedadam",
        server_lr=0.05,
        run_dir=str(run_dir),
        synthesize_per_class=0,
        round_timeout=5.0,
        audit=False,
    )


def test_a_resumed_fedadam_run_equals_an_uninterrupted_one(tmp_path):
    lines: list[str] = []
    whole = Federation(RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "whole", 3)).run_rounds()
    Federation(RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "cut", 2)).run_rounds()
    saved = Checkpoint.load(tmp_path / "cut" / "checkpoints" / "latest.pt").server_optimizer
    assert saved["phase"] == "diffusion" and saved["m_t"] and saved["v_t"]
    resumed = Federation(
        RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "cut", 3), progress=lines.append
    ).run_rounds()
    assert any("moments restored" in line for line in lines)
    a, b = Checkpoint.load(whole).unet, Checkpoint.load(resumed).unet
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # and the moments matter: a resume that forgot them lands elsewhere
    payload = torch.load(tmp_path / "cut" / "checkpoints" / "round-002.pt", weights_only=False)
    payload["server_optimizer"] = None
    forgot_dir = tmp_path / "forgot" / "checkpoints"
    forgot_dir.mkdir(parents=True)
    torch.save(payload, forgot_dir / "latest.pt")
    forgot = Federation(
        RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "forgot", 3)
    ).run_rounds()
    c = Checkpoint.load(forgot).unet
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)


class LeavingGrid(FakeGrid):
    """Node 3's SuperNode disconnects after round 1: the Grid stops offering it."""

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        if 3 in self.nodes:
            self.nodes.remove(3)
        return replies


def test_a_site_whose_supernode_disconnects_is_recorded_as_dropped(tmp_path):
    run = RunConfig(**{**_run(tmp_path / "run", 3).__dict__, "strategy": "fedavg"})
    assert Federation(LeavingGrid(3, step_norm=0.5), run).run_rounds() is not None
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "completed"
    gone = record["sites"]["site-2"]
    assert gone["status"] == "dropped" and gone["round"] == 2 and "disconnected" in gone["reason"]
    assert {record["sites"][s]["status"] for s in ("site-0", "site-1")} == {"active"}


def test_each_sites_dp_noise_level_reaches_the_run_record_privacy_json_and_the_checkpoint(tmp_path):
    from client.task import NOISE_LEVEL_PHASE, open_ledger
    from common.config import SiteConfig
    from common.phantoms import make_phantom_sites

    sites = make_phantom_sites(tmp_path / "sites", n_sites=2, n_subjects=12, size=32, seed=4)
    configs = [
        {"site-dir": str(s), "state-dir": str(tmp_path / "state" / s.name), "threads": 1}
        for s in sites
    ]
    run = RunConfig(
        preset="tiny",
        num_server_rounds=3,
        autoencoder_rounds=1,
        batch_size=4,
        min_sites=2,
        run_dir=str(tmp_path / "run"),
        synthesize_per_class=0,
        audit=False,
        release_noise_levels=True,
    )
    # real sites answering through the ClientApp's train handler, in this process (no deployment)
    latest = Federation(InProcessGrid(configs), run).run_rounds()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    levels = Checkpoint.load(latest).run_state.noise_levels
    assert set(levels) == {s.name for s in sites}
    for name, level in levels.items():
        assert level["round"] == 2  # the first diffusion round, once
        assert 0.0 <= level["sigma"] and level["std"] > 0
        assert record["noise_levels"][name] == privacy["noise_levels"][name] == level
    for config in configs:  # made once per site, in round 2, and charged there
        ledger = open_ledger(SiteConfig.from_flwr(config))
        made = [e["server_round"] for e in ledger.entries() if e["phase"] == NOISE_LEVEL_PHASE]
        assert made == [2]
    # ... and the cohort's audit sends each site the level it released, to score the cohort with it
    from server.audit import audit_request
    from server.synthesis import SynthesisRequest, synthesize_cohort

    cohort = tmp_path / "cohort"
    synthesize_cohort(SynthesisRequest(latest, cohort, per_class=1, steps=2))
    request = audit_request(cohort, latest, ["x"])
    assert json.loads(request.noise_levels_json) == {n: v["sigma"] for n, v in levels.items()}
