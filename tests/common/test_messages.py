"""Every server <-> site message round-trips through its Flower record, and a key renamed, dropped or added on one
side fails loudly, naming the key, instead of being defaulted or ignored."""

import pytest
from flwr.app import ConfigRecord, MetricRecord

from common.messages import (
    AuditReply,
    AuditRequest,
    MessageError,
    RoundPlan,
    TrainMetrics,
    TrainStatus,
)

PLAN = RoundPlan(
    run_id="run-a",
    server_round=3,
    phase="diffusion",
    num_server_rounds=6,
    federated_autoencoder_rounds=2,
    preset="tiny",
    local_epochs=1,
    batch_size=16,
    lr=1e-3,
    kl_weight=1e-6,
    latent_scale=0.8,
    proximal_mu=0.01,
    seed=7,
)
AUDIT = AuditRequest(
    run_id="run-a",
    checkpoint_sha256="a" * 64,
    cohort_manifest_sha256="b" * 64,
    preset="tiny",
    prediction_type="v_prediction",
    latent_scale=0.8,
    synthetic_ids=("syn-0001", "syn-0002"),
    extraction_samples=0,
    sampler_steps=0,
    guidance_scale=1.0,
)
EXAMPLES = [
    PLAN,
    TrainStatus(site="site-0", refused="", error=""),
    TrainStatus(site="site-1", refused="privacy budget spent", error=""),
    TrainMetrics(steps=3, seconds=1.5, epsilon=0.7, delta=1e-5),
    TrainMetrics(steps=3, seconds=1.5, epsilon=0.7, delta=1e-5, loss=0.4, num_examples=15),
    AUDIT,
    AuditReply(result_json='{"site": "site-0"}'),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    record = message.to_record()
    assert isinstance(record, MetricRecord if isinstance(message, TrainMetrics) else ConfigRecord)
    assert type(message).from_record(record) == message


@pytest.mark.parametrize(
    "message, key, renamed",
    [
        (PLAN, "kl-weight", "kl_weight"),
        (PLAN, "latent-scale", "scale"),
        (PLAN, "proximal-mu", "mu"),
        (PLAN, "seed", "random-seed"),
        (TrainStatus("site-0", "", ""), "refused", "refusal"),
        (AUDIT, "cohort-manifest-sha256", "manifest-sha256"),
        (AUDIT, "synthetic-ids", "ids"),
    ],
)
def test_a_key_renamed_on_one_side_fails_loudly_naming_it(message, key, renamed):
    record = message.to_record()
    record[renamed] = record.pop(key)
    with pytest.raises(
        MessageError, match=rf"unknown key\(s\) \['{renamed}'\], missing \['{key}'\]"
    ):
        type(message).from_record(record)


@pytest.mark.parametrize("key", ["kl-weight", "latent-scale", "proximal-mu", "seed", "run-id"])
def test_no_plan_key_has_a_silent_default(key):
    record = PLAN.to_record()
    del record[key]
    with pytest.raises(MessageError, match=f"RoundPlan: key '{key}' is missing"):
        RoundPlan.from_record(record)


def test_an_extra_key_or_a_wrong_type_is_refused():
    record = PLAN.to_record()
    record["clipping_norm"] = (
        1.0  # Flower's central-DP key: the site's mod consumes it before parsing
    )
    with pytest.raises(MessageError, match="unknown key"):
        RoundPlan.from_record(record)
    record = PLAN.to_record()
    record["batch-size"] = "16"
    with pytest.raises(MessageError, match="'batch-size' should be an integer"):
        RoundPlan.from_record(record)
    # a flag that asks a site for a DP release is a boolean, not anything truthy
    with pytest.raises(MessageError, match="'release-noise-level' should be true or false"):
        RoundPlan.from_record(ConfigRecord({**PLAN.to_record(), "release-noise-level": 1}))
    assert RoundPlan.from_record(
        ConfigRecord({**PLAN.to_record(), "release-noise-level": True})
    ).release_noise_level
    with pytest.raises(MessageError, match="phase"):
        RoundPlan.from_record(ConfigRecord({**PLAN.to_record(), "phase": "pretraining"}))
    for weight in (-1.0, float("inf"), float("nan")):
        with pytest.raises(MessageError, match="lesion-weight"):
            RoundPlan.from_record(ConfigRecord({**PLAN.to_record(), "lesion-weight": weight}))
    with pytest.raises(MessageError, match="record is missing"):
        AuditRequest.from_record(None)
    metrics = TrainMetrics(steps=3, seconds=1.0, epsilon=1.0, delta=1e-5).to_record()
    metrics["patients"] = 15.0
    with pytest.raises(MessageError, match="unknown key"):
        TrainMetrics.from_record(metrics)


def test_metrics_without_the_opt_in_carry_no_loss_and_no_count():
    record = TrainMetrics(steps=3, seconds=1.0, epsilon=1.0, delta=1e-5).to_record()
    assert set(record) == {"steps", "seconds", "epsilon", "delta"}


def test_flowers_error_reason_reads_as_python_does():
    from common.messages import readable_error

    reason = "<class 'ValueError'>:<'unknown config key \\'epsilonn\\''>"
    assert readable_error(reason) == "ValueError: unknown config key \\'epsilonn\\'"
    assert readable_error("<class 'flwr.common.X.MessageError'>:<'bad'>") == "MessageError: bad"
    assert readable_error("no reply within 30s") == "no reply within 30s"
