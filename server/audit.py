"""The audit round: send the candidate cohort and the global model to every site, collect their aggregates, and
write the audit report (`audit.json` + `audit.html`) for privacy officers.

The sites compute on their own records; what comes back is a JSON document of summaries per site (see
client/audit.py). The server only combines them: worst case across sites and classes, verdict, report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common.progress import say_line
from privacy.audit_schema import flagged_ids, load_audit
from privacy.report import write_audit_report
from privacy.verdict import build_audit
from server.synthesis import read_cohort
from server.training import load_checkpoint

log = logging.getLogger("fedsynth.server.audit")


def load_cohort(cohort_dir: Path) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Synthetic images (N, 1, ...), their ids, class indices and the class names, from a cohort folder."""
    cohort = read_cohort(cohort_dir)
    return cohort.images(), cohort.ids, cohort.labels, cohort.class_names


def audit_messages(
    grid: Grid, node_ids: list[int], cohort_dir: Path, checkpoint: Path
) -> list[Message]:
    images, ids, labels, _ = load_cohort(cohort_dir)
    payload = load_checkpoint(checkpoint)
    manifest_bytes = (cohort_dir / "manifest.json").read_bytes()
    manifest = json.loads(manifest_bytes)
    content = RecordDict(
        {
            "cohort": ArrayRecord(
                {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}
            ),
            "autoencoder": ArrayRecord(payload["autoencoder"]),
            "unet": ArrayRecord(payload["unet"]),
            "config": ConfigRecord(
                {
                    "synthetic-ids": json.dumps(ids),
                    "preset": payload["model_config"]["name"],
                    # what the checkpoint's UNet predicts (checkpoints from before the field: the noise)
                    "prediction-type": payload["model_config"].get("prediction_type", "epsilon"),
                    "latent-scale": float(payload["run_state"]["latent_scale"]),
                    # what a site ties the audit to (client/audit_admission.py): a run it trained in
                    "run-id": str(payload["run_state"]["run_id"]),
                    "checkpoint-sha256": str(manifest["checkpoint"]["sha256"]),
                    "cohort-manifest-sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                }
            ),
        }
    )
    return [
        Message(content=content, message_type=f"{MessageType.QUERY}.audit", dst_node_id=n)
        for n in node_ids
    ]


def run_audit_round(
    grid: Grid,
    cohort_dir: Path,
    checkpoint: Path,
    out_dir: Path,
    *,
    timeout: float = 1800.0,
    run_record: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    say = progress or (lambda m: log.info("%s", m))
    nodes = list(grid.get_node_ids())
    say(f"audit: sending the candidate cohort to {len(nodes)} sites")
    t0 = time.time()
    replies = grid.send_and_receive(
        audit_messages(grid, nodes, cohort_dir, checkpoint), timeout=timeout
    )
    site_results: dict[str, Any] = {}
    failures: list[str] = []
    for m in replies:
        if m.has_error():
            failures.append(f"node {m.metadata.src_node_id}: {m.error.reason}")
            continue
        result = json.loads(str(m.content["audit"]["json"]))
        site_results[result["site"]] = result
        say(
            f"  audit from {result['site']}: {result['n_members']} members, {result['n_nonmembers']} non-members"
        )
    answered = {m.metadata.src_node_id for m in replies}
    failures += [
        f"node {n}: no audit reply within {timeout:.0f}s" for n in nodes if n not in answered
    ]
    paths = write_cohort_audit(
        site_results, cohort_dir, out_dir, failures=failures, run_record=run_record
    )
    say(f"audit report written in {time.time() - t0:.0f}s: {paths[0]}, {paths[1]}")
    status = load_audit(paths[0])["verdict"]["status"]
    line = f"audit: {len(site_results)}/{len(nodes)} sites answered, {time.time() - t0:.0f}s; verdict {status}"
    say_line(
        "audit", line + "".join(f"; {f}" for f in failures), elapsed=round(time.time() - t0, 3)
    )
    return paths


def write_cohort_audit(
    site_results: dict[str, dict],
    cohort_dir: Path,
    out_dir: Path,
    *,
    failures: list[str] | None = None,
    run_record: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """The sites' answers about a cohort -> `out_dir/audit.json` and the officers' `out_dir/audit.html` (with the
    flagged images, which only officers see; the partner report is made by `release build`)."""
    images, ids, _, class_names = load_cohort(cohort_dir)
    manifest = json.loads((cohort_dir / "manifest.json").read_text())
    audit = build_audit(
        site_results,
        cohort={
            "path": str(cohort_dir),
            "n_images": len(ids),
            "class_names": class_names,
            "checkpoint_sha256": manifest["checkpoint"]["sha256"],
            "run_id": manifest["checkpoint"]["run_id"],
        },
        failures=failures,
        run_record=run_record,
    )
    flagged = set().union(*[flagged_ids(s) or set() for s in site_results.values()])
    return write_audit_report(
        audit,
        out_dir,
        flagged_images={sid: images[ids.index(sid)] for sid in sorted(flagged) if sid in ids},
    )
