"""Whether this site answers an audit: only for a run it trained in, a bounded number of times per run.

An audit answer is computed on the site's patients, so each one is a query against them. The server chooses what it
sends (cohort and weights), so the site ties an audit to a run id in its own privacy ledger and counts the answers
per run durably (the count is committed before any answer is computed; `max-audits-per-run` in the site's node
config). What it cannot check: that the weights sent really are that run's checkpoint (the site never sees the
final aggregate), so within the bound the server may send any weights under a run id the site trained in.
"""

from __future__ import annotations

import re

from client.task import open_ledger
from common.config import SiteConfig

_SHA256 = re.compile(r"[0-9a-f]{64}")


def admit(
    site: SiteConfig, run_id: str, checkpoint_sha256: str, cohort_manifest_sha256: str
) -> tuple[bool, str]:
    """(True, note) after durably counting this audit, or (False, reason to refuse) with nothing counted."""
    run_id = str(run_id or "")
    problems = []
    if not run_id:
        problems.append("the audit request names no run id")
    for name, value in (
        ("checkpoint_sha256", checkpoint_sha256),
        ("cohort_manifest_sha256", cohort_manifest_sha256),
    ):
        if not _SHA256.fullmatch(str(value or "")):
            problems.append(f"{name} is not a sha256 hex digest")
    if problems:
        return False, f"site {site.name} refuses the audit: {'; '.join(problems)}"
    if site.max_audits_per_run == 0:
        return False, f"site {site.name} answers no audits (max-audits-per-run = 0)"
    ledger = open_ledger(site)
    if run_id not in ledger.run_ids():
        return False, (
            f"site {site.name} refuses the audit: it has no record of training in run {run_id!r} (an audit "
            "is answered only for a run this site trained in)"
        )
    ok, note = ledger.admit_audit(
        run_id, checkpoint_sha256, cohort_manifest_sha256, site.max_audits_per_run
    )
    return ok, (note if ok else f"site {site.name} refuses the audit: {note}")
