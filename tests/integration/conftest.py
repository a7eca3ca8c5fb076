"""Helpers for the deployment tests that act on a running federation (drop a site, restart the SuperLink)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path

import pytest


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


@pytest.fixture
def wait_for_file():
    """wait_for_file(path, future_of_the_run, timeout): until the running federation writes `path`."""
    return _wait_for_file
