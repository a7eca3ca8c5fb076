"""A site answers an audit only for a run it trained in, and at most max-audits-per-run times: the audit is not an
unlimited oracle for the server."""

from __future__ import annotations

from client.audit_admission import admit
from client.task import open_ledger
from common.config import SiteConfig
from tests.conftest import record_spend

SHA = "0" * 64


def _site(tmp_path, **kw) -> SiteConfig:
    return SiteConfig(site_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state"), **kw)


def test_an_audit_of_a_run_the_site_never_trained_in_is_refused(tmp_path):
    site = _site(tmp_path)
    record_spend(site, "run-a", ["p1", "p2"])
    ok, reason = admit(site, "made-up-run", SHA, SHA)
    assert not ok and "made-up-run" in reason and "trained" in reason
    ok, reason = admit(site, "", SHA, SHA)
    assert not ok and "run id" in reason
    ok, reason = admit(site, "run-a", "not-a-hash", SHA)
    assert not ok and "checkpoint_sha256" in reason
    assert open_ledger(site).audits_answered("made-up-run") == 0


def test_audits_per_run_are_bounded_and_counted_durably(tmp_path):
    site = _site(tmp_path, max_audits_per_run=2)
    record_spend(site, "run-a", ["p1", "p2"])
    assert admit(site, "run-a", SHA, SHA)[0]
    assert admit(_site(tmp_path, max_audits_per_run=2), "run-a", SHA, "1" * 64)[
        0
    ]  # a restarted site
    ok, reason = admit(site, "run-a", SHA, SHA)
    assert not ok and "max-audits-per-run" in reason
    assert open_ledger(site).audits_answered("run-a") == 2
    assert not admit(_site(tmp_path, max_audits_per_run=0), "run-a", SHA, SHA)[0]
