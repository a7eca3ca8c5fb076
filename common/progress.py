"""Progress of long stages as log records that any front end can render.

Code that runs a stage (public pretraining, a federated round, synthesis, the audit) reports through the
`fedsynth.progress` logger. In the CLI's own process a handler draws it (server/terminal.py); in Flower's ServerApp
process the same records are log lines that `flwr run --stream` carries back, and the CLI finds them again with
`parse_event`. One format, written and read here.

    bar events:  {"stage", "label", "done", "total", "unit", "elapsed", "info"}   a stage with a known size
    line events: {"stage", "line", "elapsed"}                                       one line for the person (a round)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

LOGGER = "fedsynth.progress"
TAG = "fedsynth-progress "
_log = logging.getLogger(LOGGER)


def emit(event: dict[str, Any]) -> None:
    _log.info("%s%s", TAG, json.dumps(event, separators=(",", ":"), default=str))


def parse_event(line: str) -> dict[str, Any] | None:
    """The event in a log line (whatever prefix a log format added), or None if the line holds none."""
    i = line.find(TAG)
    if i < 0:
        return None
    try:
        event = json.loads(line[i + len(TAG) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) and "stage" in event else None


def say_line(stage: str, line: str, elapsed: float | None = None) -> None:
    """One line for the person at the terminal (e.g. a finished round), shown even when it is not a TTY."""
    emit({"stage": stage, "line": line, "elapsed": elapsed})


class Stage:
    """A stage of known size: `update(done, **info)` reports at most every `every_s` seconds (always the first and
    the last update), so a 1200-step loop costs a few dozen log lines, not 1200."""

    def __init__(self, stage: str, label: str, total: int, unit: str, every_s: float = 2.0):
        self.stage, self.label, self.total, self.unit = stage, label, int(total), unit
        self.every_s = every_s
        self.t0 = time.monotonic()
        self._last = -float("inf")

    def update(self, done: int, **info: Any) -> None:
        now = time.monotonic()
        if done not in (1, self.total) and now - self._last < self.every_s:
            return
        self._last = now
        emit(
            {
                "stage": self.stage,
                "label": self.label,
                "done": int(done),
                "total": self.total,
                "unit": self.unit,
                "elapsed": round(now - self.t0, 3),
                "info": {k: _plain(v) for k, v in info.items()},
            }
        )


def _plain(value: Any) -> Any:
    """A tensor or numpy scalar as a rounded float, read only when an update is reported (no per-step sync)."""
    if hasattr(value, "item"):
        value = value.item()
    return round(value, 4) if isinstance(value, float) else value
