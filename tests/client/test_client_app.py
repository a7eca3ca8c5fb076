"""The ClientApp's train handler, called as Flower calls it: what a site's reply carries (and what it does not)."""

import dataclasses
import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.client_app import SITE_LOG, audit, central_dp_clipping_mod, train
from client.task import load_training_data, open_ledger
from common import messages
from common.config import SiteConfig, model_config
from common.messages import AuditRequest, TrainMetrics, TrainStatus
from common.model import build_autoencoder
from privacy.client_level import update_norm
from tests.client.conftest import tiny_plan
from tests.conftest import record_spend

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def site_dir(make_site_dir):
    return make_site_dir(n_subjects=12, seed=5)


def _train_message() -> Message:
    plan = tiny_plan(num_server_rounds=2, batch_size=4)
    content = RecordDict(
        {
            messages.CONFIG: plan.to_record(),
            messages.ARRAYS: ArrayRecord(build_autoencoder(model_config("tiny")).state_dict()),
        }
    )
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)


def _patients(site_dir) -> int:
    train, _ = load_training_data(SiteConfig(site_dir=str(site_dir)), model_config("tiny"))
    return len(train)


def _context(site_dir, state_dir, **node_config) -> Context:
    config = {"site-dir": str(site_dir), "state-dir": str(state_dir), **node_config}
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def test_a_default_reply_carries_no_loss_and_no_patient_count(tmp_path, site_dir):
    """Attack (issue 9, item 5): the server reads the training loss and the exact number of patients from the
    reply. By default neither leaves the site."""
    reply = train(_train_message(), _context(site_dir, tmp_path / "state"))
    status = TrainStatus.from_record(reply.content[messages.STATUS])
    assert not status.error and not status.refused
    metrics = TrainMetrics.from_record(reply.content[messages.METRICS])
    assert metrics.loss is None and metrics.num_examples is None
    assert set(reply.content[messages.METRICS]) == {"steps", "seconds", "epsilon", "delta"}
    privacy = dict(reply.content[messages.PRIVACY])
    assert "patients_trained_on" not in privacy and privacy["training_stats_reported"] is False
    assert _patients(site_dir) not in privacy.values()  # the exact count is nowhere


def test_what_stays_at_the_site_is_in_the_sites_own_log(tmp_path, site_dir):
    """The site's log (its state folder's site.log) has the round's loss, which the reply withheld; the same
    message delivered again to the same process appends its own line, once (no handler added twice)."""
    msg = _train_message()
    train(msg, _context(site_dir, tmp_path / "state"))
    log = tmp_path / "state" / SITE_LOG
    lines = log.read_text().splitlines()
    trained = [line for line in lines if "round 1 autoencoder: loss" in line]
    assert len(trained) == 1 and "fedsynth.site INFO" in trained[0]
    received = re.search(
        r"site-0: train message received \(this process started ([\d.]+) s ago\)", lines[0]
    )
    assert received and float(received[1]) > 0
    train(msg, _context(site_dir, tmp_path / "state"))  # answered from the ledger
    again = log.read_text().splitlines()
    assert again[: len(lines)] == lines
    assert len([line for line in again if "released before" in line]) == 1


def test_a_site_that_opts_in_reports_its_loss_and_count(tmp_path, site_dir):
    context = _context(site_dir, tmp_path / "state", **{"report-training-stats": True})
    reply = train(_train_message(), context)
    metrics = TrainMetrics.from_record(reply.content[messages.METRICS])
    assert metrics.num_examples == _patients(site_dir) and metrics.loss > 0
    privacy = dict(reply.content[messages.PRIVACY])
    assert (
        privacy["patients_trained_on"] == _patients(site_dir)
        and privacy["training_stats_reported"] is True
    )


def test_a_plan_with_a_renamed_key_is_refused_with_an_error_naming_it(tmp_path, site_dir):
    msg = _train_message()
    msg.content[messages.CONFIG]["latent_scale"] = msg.content[messages.CONFIG].pop("latent-scale")
    reply = train(msg, _context(site_dir, tmp_path / "state"))
    status = TrainStatus.from_record(reply.content[messages.STATUS])
    assert "MessageError" in status.error and "'latent_scale'" in status.error
    assert messages.ARRAYS not in reply.content
    # nothing recorded in the site's state but its own log, which says why
    assert [p.name for p in (tmp_path / "state").iterdir()] == [SITE_LOG]
    assert "training round failed" in (tmp_path / "state" / SITE_LOG).read_text()


def test_an_audit_for_a_run_the_site_never_trained_in_is_refused(tmp_path, site_dir):
    """The audit handler reads the AuditRequest's run id and hashes and asks the site's admission before it
    touches a patient: a run it never trained in (it did train in another) gets an error reply naming the reason
    the server sees, no audit result, and no audit counted against that run."""
    context = _context(site_dir, tmp_path / "state")
    site = SiteConfig.from_flwr(context.node_config)
    record_spend(site, "run-a", ["p1", "p2"])
    request = AuditRequest(
        run_id="never-trained",
        checkpoint_sha256="a" * 64,
        cohort_manifest_sha256="b" * 64,
        preset="tiny",
        prediction_type="v_prediction",
        latent_scale=1.0,
        synthetic_ids=("syn-1",),
        extraction_samples=0,
        sampler_steps=0,
        guidance_scale=1.0,
    )
    msg = Message(
        content=RecordDict({messages.CONFIG: request.to_record()}),
        message_type=f"{MessageType.QUERY}.{messages.AUDIT}",
        dst_node_id=7,
    )
    reply = audit(msg, context)
    assert reply.has_error() and "never-trained" in reply.error.reason
    assert not reply.has_content()
    assert open_ledger(site).audits_answered("never-trained") == 0


def test_under_central_dp_the_plan_reaches_the_app_exact_and_the_update_leaves_clipped(
    tmp_path, site_dir
):
    """Flower's central-DP wrapper adds its clipping-norm key to the round plan: the site's mod consumes it, so
    the app parses the exact RoundPlan (no unknown key), and the update leaves clipped to that norm."""
    msg = _train_message()
    msg.content[messages.CONFIG][KEY_CLIPPING_NORM] = 0.05
    reply = central_dp_clipping_mod(msg, _context(site_dir, tmp_path / "state"), train)
    status = TrainStatus.from_record(reply.content[messages.STATUS])
    assert not status.error and not status.refused
    sent = msg.content[messages.ARRAYS].to_numpy_ndarrays()
    new = reply.content[messages.ARRAYS].to_numpy_ndarrays()
    assert update_norm(new, sent) <= 0.05 * (1 + 1e-6)
    assert msg.content[messages.CONFIG][KEY_CLIPPING_NORM] == 0.05  # the message as received


def test_a_train_message_delivered_again_gets_the_same_update_marked_replayed(tmp_path, site_dir):
    """A resumed run asks for a round the site already answered (issue 14): through the ClientApp and its
    central-DP mod, the second reply carries the very same (clipped) update and figures, says it is a replay, and
    the site's ledger holds one mechanism."""
    msg = _train_message()
    msg.content[messages.CONFIG][KEY_CLIPPING_NORM] = 0.05
    context = _context(site_dir, tmp_path / "state")
    first = central_dp_clipping_mod(msg, context, train)
    again = central_dp_clipping_mod(msg, context, train)
    for reply in (first, again):
        status = TrainStatus.from_record(reply.content[messages.STATUS])
        assert not status.error and not status.refused
    a = first.content[messages.ARRAYS].to_numpy_ndarrays()
    b = again.content[messages.ARRAYS].to_numpy_ndarrays()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    m1 = TrainMetrics.from_record(first.content[messages.METRICS])
    m2 = TrainMetrics.from_record(again.content[messages.METRICS])
    assert m1.replayed is None and m2.replayed == 1
    assert dataclasses.replace(m2, replayed=None) == m1
    assert dict(again.content[messages.PRIVACY]) == dict(first.content[messages.PRIVACY])
    ledger = open_ledger(SiteConfig.from_flwr(context.node_config))
    assert [(e["run_id"], e["server_round"]) for e in ledger.entries()] == [("run-a", 1)]
