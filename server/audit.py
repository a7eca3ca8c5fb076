"""The audit round: send the candidate cohort and the global model to every site, collect their aggregates, and
write the audit report (`audit.json` + `audit.html`) for privacy officers.

The sites compute on their own records; what comes back is a JSON document of summaries per site (see
client/audit.py). The server only combines them: worst case across sites and classes, verdict, report.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import messages as msg
from common.io import sha256_file
from common.messages import AuditReply, AuditRequest, MessageError
from common.progress import say_line
from privacy.audit_schema import flagged_ids, load_audit
from privacy.report import write_audit_report
from privacy.verdict import build_audit
from server.checkpoint import Checkpoint
from server.synthesis import read_cohort

log = logging.getLogger("fedsynth.server.audit")


def load_cohort(cohort_dir: Path) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Synthetic images (N, 1, ...), their ids, class indices and the class names, from a cohort folder."""
    cohort = read_cohort(cohort_dir)
    return cohort.images(), cohort.ids, cohort.labels, cohort.class_names


def audit_request(
    cohort_dir: Path, checkpoint: Path, ids: list[str], oversample: int = 10
) -> AuditRequest:
    """What the sites are asked: the cohort's ids, how to score with the checkpoint, the hashes that tie the
    audit to a run (refused when the cohort was not synthesized from this checkpoint), and how many samples each
    site draws itself for the extraction search (`oversample` x the cohort's size; client/extraction.py)."""
    ckpt = Checkpoint.load(checkpoint)
    checkpoint_sha256 = sha256_file(checkpoint)
    manifest = json.loads((cohort_dir / "manifest.json").read_text())
    made_from = manifest.get("checkpoint", {}).get("sha256")
    if made_from != checkpoint_sha256:
        raise ValueError(
            f"{cohort_dir / 'manifest.json'}: the cohort was synthesized from checkpoint sha256 {made_from}, "
            f"not from {checkpoint} ({checkpoint_sha256}); audit a cohort with the checkpoint it came from"
        )
    return AuditRequest(
        run_id=str(ckpt.run_state.run_id),
        checkpoint_sha256=checkpoint_sha256,
        cohort_manifest_sha256=sha256_file(cohort_dir / "manifest.json"),
        preset=ckpt.model_config.name,
        # what the checkpoint's UNet predicts (server/checkpoint.py: old checkpoints load as the noise)
        prediction_type=ckpt.model_config.prediction_type,
        latent_scale=float(ckpt.run_state.latent_scale),
        synthetic_ids=tuple(ids),
        extraction_samples=int(oversample) * len(ids),
        sampler_steps=int((manifest.get("sampler") or {}).get("steps") or 0),
        guidance_scale=float((manifest.get("sampler") or {}).get("guidance_scale", 1.0)),
        noise_levels_json=json.dumps(
            {site: float(v["sigma"]) for site, v in ckpt.run_state.noise_levels.items()}
        ),
    )


def audit_messages(
    grid: Grid, node_ids: list[int], cohort_dir: Path, checkpoint: Path, oversample: int = 10
) -> list[Message]:
    images, ids, labels, _ = load_cohort(cohort_dir)
    request = audit_request(cohort_dir, checkpoint, ids, oversample)
    ckpt = Checkpoint.load(checkpoint)
    content = RecordDict(
        {
            msg.COHORT: ArrayRecord(
                {
                    msg.COHORT_IMAGES: torch.from_numpy(images),
                    msg.COHORT_LABELS: torch.from_numpy(labels),
                }
            ),
            msg.AUTOENCODER: ArrayRecord(ckpt.autoencoder),
            msg.UNET: ArrayRecord(ckpt.unet),
            msg.CONFIG: request.to_record(),
        }
    )
    return [
        Message(content=content, message_type=f"{MessageType.QUERY}.{msg.AUDIT}", dst_node_id=n)
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
    oversample: int = 10,
) -> tuple[Path, Path]:
    say = progress or (lambda m: log.info("%s", m))
    nodes = list(grid.get_node_ids())
    say(f"audit: sending the candidate cohort to {len(nodes)} sites")
    t0 = time.time()
    messages = audit_messages(grid, nodes, cohort_dir, checkpoint, oversample)
    say(
        f"audit: each site scores its patients, draws up to {oversample}x the cohort's size in extra samples of "
        "its own for the extraction search (capped by its max-extraction-samples) and trains two classifiers; "
        "this takes minutes, and each site's log shows its progress"
    )
    replies = grid.send_and_receive(messages, timeout=timeout)
    site_results: dict[str, Any] = {}
    failures: list[str] = []
    for m in replies:
        if m.has_error():
            failures.append(f"node {m.metadata.src_node_id}: {msg.readable_error(m.error.reason)}")
            continue
        try:
            result = json.loads(
                AuditReply.from_record(m.content.config_records.get(msg.AUDIT)).result_json
            )
        except MessageError as err:
            failures.append(f"node {m.metadata.src_node_id}: malformed audit reply: {err}")
            continue
        site_results[result["site"]] = result
        say(site_audit_line(result))
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


def site_audit_line(result: dict[str, Any]) -> str:
    """The progress line for one site's audit reply: its counts and where its minutes went."""
    line = f"  audit from {result['site']}: {result['n_members']} members, {result['n_nonmembers']} non-members"
    stages = result.get("seconds")
    if not isinstance(stages, dict) or not stages:
        return line  # a site of an earlier version sends no stage times
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stages.values()):
        return line + "; its stage times are malformed"
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in stages.items())
    return line + f"; {sum(stages.values()):.0f} s at the site ({parts})"


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
            # an experiment's cohort (server/control.py) says so everywhere; the release gate refuses it
            "experiment": (manifest.get("run_config") or {}).get("experiment") or "",
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
