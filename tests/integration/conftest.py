"""Shared set-up of the deployment tests: each phantom site's SuperNode config, a tiny two-round run, and waiting
on a running federation (drop a site, restart the SuperLink)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from common.config import RunConfig


def _wait_for_file(path: Path, run: Future, timeout: float) -> None:
    """Until `path` exists; fail at once if the run ended first, or after `timeout` seconds."""
    deadline = time.time() + timeout
    while not path.exists():
        if run.done():
            run.result()  # raises the run's error, if any
            pytest.fail(f"the run ended before {path} was written")
        if time.time() > deadline:
            pytest.fail(f"{path} not written within {timeout:.0f}s")
        time.sleep(0.5)


# Steps of the two image utility CNNs every audit trains at each site (the site's utility-cnn-steps; the recipe's 500,
# 150 for volumes, cost most of an audit on a 2-core machine). No deployment test reads their figures; the
# classifiers themselves are tested in tests/privacy/test_utility.py.
UTILITY_CNN_STEPS = 20


def _node_configs(sites: list[Path], state_root: Path, **extra) -> list[dict]:
    return [
        {
            "site-dir": str(s),
            "site-name": s.name,
            "state-dir": str(state_root / s.name),
            "epsilon": 8.0,
            "utility-cnn-steps": UTILITY_CNN_STEPS,
            **extra,
        }
        for s in sites
    ]


def _tiny_run(run_dir: Path, **overrides) -> RunConfig:
    plan = dict(
        preset="tiny",
        num_server_rounds=2,
        autoencoder_rounds=1,
        batch_size=4,
        min_sites=2,
        run_dir=str(run_dir),
        round_timeout=300.0,
    )
    return RunConfig(**{**plan, **overrides})


@pytest.fixture
def wait_for_file():
    """wait_for_file(path, future_of_the_run, timeout): until the running federation writes `path`."""
    return _wait_for_file


@pytest.fixture
def node_configs_for():
    """node_configs_for(sites, state_root, **extra): one SuperNode config per site folder: the folder, its name, a
    state folder of its own under `state_root`, a budget of epsilon 8, utility CNNs of UTILITY_CNN_STEPS steps, and
    the `extra` keys (e.g. threads=1)."""
    return _node_configs


@pytest.fixture
def tiny_run():
    """tiny_run(run_dir, **overrides): the tiny preset, two rounds (autoencoder, then diffusion), batch 4, at least
    two sites, 300 s per round; `overrides` are RunConfig fields."""
    return _tiny_run
