"""A site answers an audit only for a run it trained in, and at most max-audits-per-run times: the audit is not an
unlimited oracle for the server."""

from __future__ import annotations

from client.audit_admission import admit
from client.task import open_ledger
from common.config import SiteConfig

SHA = "0" * 64


def _site(tmp_path, **kw) -> SiteConfig:
    return SiteConfig(site_dir=str(tmp_path / "data"), state_dir=str(tmp_path / "state"), **kw)


def _trained(site: SiteConfig, run_id: str) -> None:
    open_ledger(site).record(
        run_id=run_id,
        server_round=1,
        phase="diffusion",
        noise_multiplier=1.0,
        sample_rate=0.5,
        steps=2,
        clipping_norm=1.0,
        accountant="rdp",
        delta=1e-5,
        patients=["p1", "p2"],
    )


def test_an_audit_of_a_run_the_site_never_trained_in_is_refused(tmp_path):
    site = _site(tmp_path)
    _trained(site, "run-a")
    ok, reason = admit(site, "made-up-run", SHA, SHA)
    assert not ok and "made-up-run" in reason and "trained" in reason
    ok, reason = admit(site, "", SHA, SHA)
    assert not ok and "run id" in reason
    ok, reason = admit(site, "run-a", "not-a-hash", SHA)
    assert not ok and "checkpoint_sha256" in reason
    assert open_ledger(site).audits_answered("made-up-run") == 0


def test_audits_per_run_are_bounded_and_counted_durably(tmp_path):
    site = _site(tmp_path, max_audits_per_run=2)
    _trained(site, "run-a")
    assert admit(site, "run-a", SHA, SHA)[0]
    assert admit(_site(tmp_path, max_audits_per_run=2), "run-a", SHA, "1" * 64)[
        0
    ]  # a restarted site
    ok, reason = admit(site, "run-a", SHA, SHA)
    assert not ok and "max-audits-per-run" in reason
    assert open_ledger(site).audits_answered("run-a") == 2
    assert not admit(_site(tmp_path, max_audits_per_run=0), "run-a", SHA, SHA)[0]


def test_the_clientapp_refuses_an_unadmitted_audit_with_a_reason_the_server_sees(
    tmp_path, monkeypatch
):
    from flwr.app import Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client.client_app import audit
    from common import messages
    from common.messages import AuditRequest

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    site = _site(tmp_path)
    _trained(site, "run-a")
    request = AuditRequest(
        run_id="run-the-site-never-saw",
        checkpoint_sha256=SHA,
        cohort_manifest_sha256=SHA,
        preset="tiny",
        prediction_type="v_prediction",
        latent_scale=1.0,
        synthetic_ids=("s0",),
        extraction_samples=0,
        sampler_steps=0,
        guidance_scale=1.0,
    )
    msg = Message(
        content=RecordDict({messages.CONFIG: request.to_record()}),
        message_type=f"{MessageType.QUERY}.{messages.AUDIT}",
        dst_node_id=7,
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"site-dir": site.site_dir, "state-dir": site.state_dir},
        state=RecordDict(),
        run_config={},
    )
    reply = audit(msg, context)
    assert reply.has_error() and "run-the-site-never-saw" in reply.error.reason
    assert open_ledger(site).audits_answered("run-the-site-never-saw") == 0
