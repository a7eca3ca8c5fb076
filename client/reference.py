"""The site's reference model for calibrated membership attacks: the diffusion UNet a run STARTED from at this site.

When a site trains its first diffusion round of a run, the global UNet it receives has never seen this site's
records (the site has not trained it yet): it is the public warm start or pretrained checkpoint, a fresh
initialisation, or (for a site joining late) a model trained by other sites only. The site keeps a copy,
`<state>/reference/<run id>.pt` (written and read only here), and the audit scores every record under the audited
model AND under this reference with the same draws (client/audit.py): the difference calibrates each record's
difficulty, LiRA / RMIA style, with a reference the site gets without spending any patient's privacy and without
setting any record aside (all hold-out patients stay non-members of the test).

The reference is the server's own weights, so keeping it reveals nothing new to anyone; a server that sends odd
weights only weakens the site's own audit, which the power figures then show.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from common.config import SiteConfig
from common.io import atomic_path

FOLDER = "reference"


def path_of(site: SiteConfig, run_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(run_id)) or "_"
    return site.state_path / FOLDER / f"{safe}.pt"


def keep_if_first(
    site: SiteConfig, run_id: str, unet_state: dict[str, torch.Tensor], trained_before: bool
) -> Path | None:
    """Keep the received global UNet as this run's reference, unless the site already has one for the run or
    already trained the UNet in it (`trained_before`: then the weights it receives carry its own records)."""
    path = path_of(site, run_id)
    if trained_before or path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu().clone() for k, v in unet_state.items()}, tmp)
    return path


def keep_for_round(site: SiteConfig, run_id: str, phase: str, unet_state: dict) -> Path | None:
    """Before a training round: in the diffusion phase, keep the received UNet if this site has not yet trained the
    UNet in run `run_id` (read from its privacy ledger, where every round it trained is recorded first)."""
    if phase != "diffusion":
        return None
    from client.task import open_ledger

    trained = any(
        m["run_id"] == str(run_id) and m["phase"] == "diffusion"
        for m in open_ledger(site).entries()
    )
    return keep_if_first(site, run_id, unet_state, trained)


def load(site: SiteConfig, run_id: str) -> dict[str, torch.Tensor] | None:
    """This run's reference UNet state, or None when the site kept none (it trained no diffusion round of the run
    since references were introduced). An unreadable file is an error naming it."""
    path = path_of(site, run_id)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise ValueError(
            f"{path}: unreadable reference model ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            "move it away (the audit then runs without the calibrated attack)"
        ) from err
