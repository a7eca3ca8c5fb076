"""A crash between the two writes of a checkpoint (round-NNN.pt first, latest.pt second) loses nothing: the run
resumes from the newest state, under the same run id, and does not train that round again."""

import shutil

import pytest
import torch

from server.checkpoint import Checkpoint
from server.training import Federation
from tests.server.test_training import RoundSeededGrid, _run

pytestmark = pytest.mark.usefixtures("task_identity")


class CountingGrid(RoundSeededGrid):
    """Records which rounds the sites were asked to train."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds_asked: set[int] = set()

    def _answer(self, msg):
        self.rounds_asked.add(int(msg.content["config"]["server-round"]))
        return super()._answer(msg)


def test_a_crash_between_the_round_file_and_latest_resumes_from_the_round_file(tmp_path):
    whole = Federation(RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "whole", 3)).run_rounds()
    Federation(RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "cut", 2)).run_rounds()
    checkpoints = tmp_path / "cut" / "checkpoints"
    run_id = Checkpoint.load(checkpoints / "latest.pt").run_state.run_id
    # the crash: round-002.pt was written, latest.pt still holds round 1
    shutil.copyfile(checkpoints / "round-001.pt", checkpoints / "latest.pt")
    lines: list[str] = []
    grid = CountingGrid(3, step_norm=0.5)
    resumed = Federation(grid, _run(tmp_path / "cut", 3), progress=lines.append).run_rounds()
    assert any(f"resuming run {run_id} after round 2" in line for line in lines), lines
    assert Checkpoint.load(resumed).run_state.run_id == run_id
    assert Checkpoint.load(resumed).run_state.completed_round == 3
    # round 2 was not trained again: the resumed run asked the sites for round 3 only
    assert grid.rounds_asked == {3}
    a, b = Checkpoint.load(whole).unet, Checkpoint.load(resumed).unet
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_crash_before_the_first_latest_resumes_the_same_run(tmp_path):
    Federation(RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "cut", 1)).run_rounds()
    checkpoints = tmp_path / "cut" / "checkpoints"
    run_id = Checkpoint.load(checkpoints / "round-001.pt").run_state.run_id
    (checkpoints / "latest.pt").unlink()  # the crash: round-001.pt written, latest.pt not yet
    lines: list[str] = []
    resumed = Federation(
        RoundSeededGrid(3, step_norm=0.5), _run(tmp_path / "cut", 2), progress=lines.append
    ).run_rounds()
    assert any(f"resuming run {run_id} after round 1" in line for line in lines), lines
    assert Checkpoint.load(resumed).run_state.run_id == run_id
