"""Set-up shared across the test folders: a site that already trained in a run, Flower's task identity, and
`fedsynth demo` run as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from common.config import SiteConfig


def record_spend(site: SiteConfig, run_id: str, patients: Iterable[str], **mechanism) -> int:
    """Record in `site`'s privacy ledger that it trained `patients` in `run_id` (round 1, diffusion, DP-SGD with
    noise 1.0, sampling rate 0.5, 2 steps, clipping 1.0, delta 1e-5 under RDP, unless `mechanism` says otherwise):
    a site that already took part in a run. Returns the mechanism's id."""
    # imported here: the tests that need no site do not load its training code
    from client.task import open_ledger

    spend = dict(
        server_round=1,
        phase="diffusion",
        noise_multiplier=1.0,
        sample_rate=0.5,
        steps=2,
        clipping_norm=1.0,
        accountant="rdp",
        delta=1e-5,
    )
    return open_ledger(site).record(run_id=run_id, patients=patients, **{**spend, **mechanism})


def pytest_collection_modifyitems(config, items):
    """The files that hold a slow (end-to-end) test first, each file's tests in their own order: with two workers
    taking a whole file at a time (pyproject's addopts), a four-minute file handed out last keeps the other worker
    idle for those minutes; handed out first, the many short files fill in around it (longest first)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    # a stable sort: the order within each group is kept
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Each pytest worker computes on one thread. The suite runs two workers on two cores beside the end-to-end
    tests' own processes; torch's default (a thread per core) then oversubscribes the CPU, and an in-process test
    that takes 26 s alone took 233 s in the suite (test_audit's DP case). The processes the tests start choose
    their own threads (`threads` in their configs)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps new messages with the running task's identity; outside a deployment there is none: this one
    (run 1, node 0, task 1) for the test. A module whose every test builds messages says
    `pytestmark = pytest.mark.usefixtures("task_identity")`."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def run_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`fedsynth demo --out OUT ARGS...` in a process of its own, as a terminal runs it (stdout and stderr
    captured, no stdin, this checkout on the path; 30 minutes at most)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "demo", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
