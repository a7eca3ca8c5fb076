"""Set-up shared by the site-side tests (tests/client) and the deployment tests (tests/integration)."""

from __future__ import annotations

from collections.abc import Iterable

from client.task import open_ledger
from common.config import SiteConfig


def record_spend(site: SiteConfig, run_id: str, patients: Iterable[str], **mechanism) -> int:
    """Record in `site`'s privacy ledger that it trained `patients` in `run_id` (round 1, diffusion, DP-SGD with
    noise 1.0, sampling rate 0.5, 2 steps, clipping 1.0, delta 1e-5 under RDP, unless `mechanism` says otherwise):
    a site that already took part in a run. Returns the mechanism's id."""
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
