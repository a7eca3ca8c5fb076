"""Resuming a FedAdam run continues the same server optimiser: its moments travel in the checkpoint."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Message

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
