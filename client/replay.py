"""A site's released updates, kept so that a round asked for again is answered with the same bytes, not trained again.

Why: the server can die after the sites trained round r but before it checkpointed it (issue 14, a SuperLink or
coordinating machine that restarts). The run is submitted again, resumes from round r - 1 and asks for round r
again. Re-sending the update already released is post-processing of a released DP output: it costs no privacy.
Training again would be a second DP output of the same patients for the same round, which the server could
compare with the first, and a second charge the site's noise was not calibrated for (it plans one mechanism per
remaining round, so the redo of a run's last round would find no budget left and the run could not finish).

The rule, per (run id, server round, phase), at most ONE release, ever:
- the first request trains, and the update is kept here and recorded in the privacy ledger (privacy/ledger.py
  `record_release`: what was asked, the sha256 of the kept copy) BEFORE it leaves the site;
- a repeated request that is the same request (every field of the round plan, the sha256 of the global weights
  and of the frozen autoencoder) is answered with the kept reply, byte for byte: nothing is trained or spent;
- a repeated request that differs in any of these is refused, naming what differs. Answering it with the kept
  update would be safe for privacy, but that update was computed from other weights (or another plan) and the
  server would aggregate it as if it were not: a differing request is a misconfigured resubmission or a server
  probing for a second output, and both deserve a refusal, not a silently wrong model.
- a kept copy that is missing (only each run's newest round is kept), unreadable or not the one the ledger
  recorded is refused, saying what to do: that round is never trained again.

A kept copy is bound to its ledger entry: the file is named by the mechanism id, carries its run id, round and
phase, and must hash to the sha256 the ledger recorded; it is never used for any other key.

A mechanism recorded without a release (the site crashed after committing the spend and before the update was
kept) never released anything, since the release is recorded before the update can leave: a repeated request
then trains again, a second mechanism charged again (an over-count, never an under-count).

Files: `<state>/released/<mechanism id>.pt`, written (atomically, fsynced) and read only here; a torch file of a
dict with exactly the keys in KEYS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.config import SiteConfig
from common.io import sha256_file, write_bytes_atomic
from common.messages import RoundPlan
from privacy.ledger import PrivacyLedger

FOLDER = "released"
FORMAT = "fedsynth-released-update/1"
KEYS = {
    "format",
    "mechanism_id",
    "run_id",
    "server_round",
    "phase",
    "request_json",
    "state_dict",
    "metrics",
    "privacy",
}
WEIGHTS = {
    "arrays_sha256": "the global model weights",
    "autoencoder_sha256": "the frozen autoencoder",
}


class NotReplayable(ValueError):
    """The round was released once already and this request cannot be answered; the message says why and what to
    do. The site does not train that round again."""


@dataclass(frozen=True)
class Kept:
    """A kept reply: the model update, its metrics and the privacy summary exactly as released."""

    mechanism_id: int
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float]
    privacy: dict[str, Any]


def weights_sha256(state: dict[str, torch.Tensor] | None) -> str:
    """sha256 of a state dict: every tensor's name, dtype, shape and bytes, in name order ("" for None)."""
    if state is None:
        return ""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def request_json(
    plan: RoundPlan,
    arrays: dict[str, torch.Tensor],
    autoencoder_arrays: dict[str, torch.Tensor] | None,
) -> str:
    """What decides a round's update, as one canonical JSON text: the whole plan and the weights' sha256."""
    return json.dumps(
        {
            "plan": dataclasses.asdict(plan),
            "arrays_sha256": weights_sha256(arrays),
            "autoencoder_sha256": weights_sha256(autoencoder_arrays),
        },
        sort_keys=True,
    )


def path_of(site: SiteConfig, mechanism_id: int) -> Path:
    return site.state_path / FOLDER / f"{int(mechanism_id)}.pt"


def keep(
    site: SiteConfig,
    ledger: PrivacyLedger,
    mechanism_id: int,
    plan: RoundPlan,
    request: str,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, float],
    privacy: dict[str, Any],
) -> Path:
    """Keep the reply of mechanism `mechanism_id` and record its release in the ledger; call it BEFORE the update
    leaves the site. Then drop the kept replies of the run's earlier rounds: a resumed run asks again only for
    the round after its newest checkpoint, and the server sends no later round before that checkpoint exists, so
    the round asked again is never older than the newest one a site released."""
    buf = io.BytesIO()
    torch.save(
        {
            "format": FORMAT,
            "mechanism_id": int(mechanism_id),
            "run_id": str(plan.run_id),
            "server_round": int(plan.server_round),
            "phase": str(plan.phase),
            "request_json": request,
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
            "metrics": _plain(metrics),
            "privacy": _plain(privacy),
        },
        buf,
    )
    path = path_of(site, mechanism_id)
    write_bytes_atomic(path, buf.getvalue())
    ledger.record_release(mechanism_id, request, hashlib.sha256(buf.getvalue()).hexdigest())
    _drop_older(site, ledger, plan.run_id, mechanism_id)
    return path


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Python scalars (a numpy or torch scalar would make the copy unreadable with `weights_only`)."""
    return {k: v.item() if hasattr(v, "item") else v for k, v in values.items()}


def _drop_older(site: SiteConfig, ledger: PrivacyLedger, run_id: str, newest: int) -> None:
    """Remove the kept replies of run `run_id` other than `newest` (and copies never recorded as released)."""
    of_run = {int(m["id"]) for m in ledger.entries() if m["run_id"] == str(run_id)}
    for path in (site.state_path / FOLDER).glob("*.pt"):
        if re.fullmatch(r"\d+", path.stem) and int(path.stem) in of_run - {newest}:
            path.unlink(missing_ok=True)


def kept_reply(
    site: SiteConfig, ledger: PrivacyLedger, plan: RoundPlan, request: str
) -> Kept | None:
    """The reply released for this plan's (run id, round, phase), if the site released one; None if it did not
    (the round is then trained). Raises NotReplayable when it did but cannot answer this request with it."""
    released = ledger.release_of(plan.run_id, plan.server_round, plan.phase)
    if released is None:
        return None
    mid = int(released["mechanism_id"])
    what = (
        f"round {plan.server_round} ({plan.phase}) of run {plan.run_id!r} was already trained at this site and "
        f"its update released (privacy ledger mechanism {mid})"
    )
    never = "the site never trains a round twice"
    differs = _differences(json.loads(released["request_json"]), json.loads(request))
    if differs:
        raise NotReplayable(
            f"{what}; this request differs from the one answered then in {', '.join(differs)}, so the site "
            f"neither trains again (a second DP output of the same patients for the same round) nor replays "
            "an update computed from other inputs. Resubmit the run with the same run config, from its own "
            "run-dir, so it resumes from its checkpoint and asks the same again; or start a new run"
        )
    path = path_of(site, mid)
    if not path.exists():
        raise NotReplayable(
            f"{what}, but its kept copy {path} is gone (the site keeps each run's newest round only); "
            f"{never}. Restore the file from a backup of the site's state folder, or start a new run"
        )
    sha = sha256_file(path)
    if sha != released["update_sha256"]:
        raise NotReplayable(
            f"{what}, but its kept copy {path} is not the one the ledger recorded (sha256 {sha[:16]}..., "
            f"recorded {released['update_sha256'][:16]}...): damaged or altered; {never}. Restore the file "
            "from a backup of the site's state folder, or start a new run"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a file that is not one of its own
        raise NotReplayable(
            f"{what}, but its kept copy {path} is unreadable ({type(err).__name__}); {never}. Restore the "
            "file from a backup of the site's state folder, or start a new run"
        ) from err
    bound = (mid, str(plan.run_id), int(plan.server_round), str(plan.phase), request)
    if (
        not isinstance(saved, dict)
        or set(saved) != KEYS
        or saved["format"] != FORMAT
        or (
            saved["mechanism_id"],
            saved["run_id"],
            saved["server_round"],
            saved["phase"],
            saved["request_json"],
        )
        != bound
    ):
        raise NotReplayable(
            f"{what}, but {path} is not that round's kept reply ({FORMAT} for mechanism {mid}); {never}. "
            "Restore the file from a backup of the site's state folder, or start a new run"
        )
    return Kept(mid, saved["state_dict"], saved["metrics"], saved["privacy"])


def _differences(first: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = [
        f"{key.replace('_', '-')} ({first['plan'].get(key)!r} then, {value!r} now)"
        for key, value in sorted(now["plan"].items())
        if first["plan"].get(key) != value
    ]
    gone = sorted(set(first["plan"]) - set(now["plan"]))
    if gone:
        out.append(f"the plan's fields {gone} (absent now)")
    out += [label for key, label in WEIGHTS.items() if first[key] != now[key]]
    return out
