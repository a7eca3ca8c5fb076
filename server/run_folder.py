"""A run's folder: the one place that names its files, and the one reader and writer of run.json and privacy.json.

run.json          the run record: config, sites, who dropped or refused and why, status, noise levels
privacy.json      {"sample_level": {site: spend as last reported}, "client_level": {...},
                  "aggregation_weights": ..., "noise_levels": {site: {sigma, std, round}} (DP releases)}
metrics.jsonl     one line per site per round
checkpoints/      round-NNN.pt, latest.pt -> the newest (server/checkpoint.py writes and reads them)
cohort/           the synthetic cohort (server/synthesis.py)
audit/            the audit report (server/audit.py)
<name>.log        the terminal's full logs
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.io import append_jsonl, write_json_atomic


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, checkpoint: Path | str) -> RunFolder | None:
        """The run folder a checkpoint lies in, or None when it is not in a run's checkpoints/ folder."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint.parent.parent) if checkpoint.parent.name == "checkpoints" else None

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, round_: int) -> Path:
        return self.checkpoints / f"round-{round_:03d}.pt"

    @property
    def latest_checkpoint(self) -> Path:
        return self.checkpoints / "latest.pt"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def privacy_json(self) -> Path:
        return self.root / "privacy.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def cohort(self) -> Path:
        return self.root / "cohort"

    @property
    def audit(self) -> Path:
        return self.root / "audit"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    # ---- run.json and privacy.json -----------------------------------------------------------------------------
    def write_record(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.run_json, record)

    def read_record(self) -> dict[str, Any]:
        return _read_json(self.run_json)

    def write_privacy(self, privacy: dict[str, Any]) -> None:
        write_json_atomic(self.privacy_json, privacy)

    def read_privacy(self) -> dict[str, Any] | None:
        """privacy.json, or None when the run has not written one."""
        return _read_json(self.privacy_json) if self.privacy_json.exists() else None

    # ---- metrics.jsonl -----------------------------------------------------------------------------------------
    def append_metrics(self, line: dict[str, Any]) -> None:
        append_jsonl(self.metrics, line)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{path}: not found; is {path.parent} a run folder (run-dir)?"
        ) from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
