"""fedsynth ClientApp: the part of the federation that runs inside each hospital.

Thin by design: it reads the site's node config and the server's round config, calls plain functions in
`client.task` (training) and `client.audit` (privacy audits on local data), and replies. Raw images never leave.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import reference
from client.task import RoundResult, run_training_round
from common import messages
from common.config import SiteConfig, model_config
from common.messages import AuditReply, AuditRequest, RoundPlan, TrainMetrics, TrainStatus
from common.noise import silence_known_noise
from privacy.client_level import clip_update


def central_dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Central DP, client side: clip this site's model update (new - global) to the norm the server asks for.

    What Flower's `fixedclipping_mod` does, but exact: the norm after clipping is <= C as the server measures it
    (privacy.client_level.clip_update; Flower's float32 scaling can land a hair above C). Flower's mod
    needs exactly one ArrayRecord in the train message (ours also carries the frozen "autoencoder" in the diffusion
    phase) and turns every reply without arrays (a refusal, a failed round) into an error; and mods are fixed when
    the ClientApp is built, so this one does nothing unless the round's config carries a clipping norm (Flower's
    `DifferentialPrivacyClientSideFixedClipping` puts it there when the run has central DP on).
    """
    config = (
        msg.content.config_records.get(messages.CONFIG)
        if msg.metadata.message_type == MessageType.TRAIN
        else None
    )
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    # the key is this mod's (Flower's DP wrapper adds it to the round plan): the app sees the exact RoundPlan
    clipping_norm = float(config.pop(KEY_CLIPPING_NORM))
    sent = msg.content[messages.ARRAYS]
    try:
        reply = call_next(msg, context)
    finally:
        config[KEY_CLIPPING_NORM] = clipping_norm  # the message as received
    if reply.has_error() or messages.ARRAYS not in reply.content:
        return reply  # nothing of the model leaves
    new = reply.content[messages.ARRAYS]
    if list(new.keys()) != list(sent.keys()):
        raise ValueError("central DP: the reply's arrays do not match the global model's")
    new_nd, norm = clip_update(new.to_numpy_ndarrays(), sent.to_numpy_ndarrays(), clipping_norm)
    # the unclipped norm says something about the site's data: it stays in the site's own log
    logging.getLogger("fedsynth.site").info(
        "central DP: model update norm %.4g, clipped to %.4g before it leaves",
        norm,
        min(norm, clipping_norm),
    )
    reply.content[messages.ARRAYS] = ArrayRecord(
        {k: Array(np.asarray(v)) for k, v in zip(new.keys(), new_nd, strict=True)}
    )
    return reply


AUDIT_REFUSED = 403  # error code of an audit the site declined (the reason says why)
app = ClientApp(mods=[central_dp_clipping_mod])
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower HTTP poll otherwise
logging.getLogger(
    "flwr"
).propagate = False  # Flower prints its own records; the root handler doubled each
silence_known_noise()  # this process loads every scan of the site: MONAI's reader warning would repeat per file


SITE_LOG = "site.log"  # in the site's state folder: the site's own record, never sent


def keep_site_log(site: SiteConfig) -> Path:
    """Every `fedsynth` record of this process also goes to `<state>/site.log` (appended; one handler per file
    however many messages the process serves). Flower's SuperNode does not keep a ClientApp's output, and this log
    holds what stays at the site: the loss, the exact patient counts, a central-DP update's unclipped norm."""
    path = (site.state_path / SITE_LOG).resolve()
    logger = logging.getLogger("fedsynth")
    if not any(getattr(h, "baseFilename", None) == str(path) for h in logger.handlers):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return path


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = SiteConfig.from_flwr(context.node_config)
    keep_site_log(site)
    logging.getLogger("fedsynth.site").info(
        "site %s: train message received (this process started %.1f s ago)",
        site.name,
        _process_age(),
    )
    try:
        plan = RoundPlan.from_record(msg.content.config_records.get(messages.CONFIG))
        arrays = msg.content[messages.ARRAYS].to_torch_state_dict()
        frozen = msg.content.array_records.get(messages.AUTOENCODER)
        # the UNet this run started from at this site: the calibrated attack's reference (client/reference.py)
        reference.keep_for_round(site, plan.run_id, plan.phase, arrays)
        result = run_training_round(
            site, plan, arrays, frozen.to_torch_state_dict() if frozen is not None else None
        )
    except Exception as err:  # reply with the site's name and the reason, so the run record says who dropped and why
        logging.getLogger("fedsynth.site").exception("site %s: training round failed", site.name)
        status = TrainStatus(site.name, refused="", error=f"{type(err).__name__}: {err}"[:2000])
        return Message(content=RecordDict({messages.STATUS: status.to_record()}), reply_to=msg)
    return Message(content=train_reply(site, result), reply_to=msg)


def train_reply(site: SiteConfig, result: RoundResult) -> RecordDict:
    """What leaves the site after a round: status, privacy spend, and, if it trained, the model and its metrics.
    The exact patient count and the training loss only with `report-training-stats` (common/config.py)."""
    privacy = dict(result.privacy)
    if not site.report_training_stats:
        privacy.pop("patients_trained_on", None)
    privacy["training_stats_reported"] = site.report_training_stats
    content = RecordDict(
        {
            messages.STATUS: TrainStatus(result.site_name, result.refused, "").to_record(),
            messages.PRIVACY: ConfigRecord(_config_values(privacy)),
        }
    )
    if result.state_dict is not None:
        m = result.metrics
        report = site.report_training_stats
        content[messages.ARRAYS] = ArrayRecord(result.state_dict)
        content[messages.METRICS] = TrainMetrics(
            steps=int(m["steps"]),
            seconds=float(m["seconds"]),
            epsilon=float(m["epsilon"]),
            delta=float(m["delta"]),
            loss=float(m["loss"]) if report else None,
            num_examples=int(m["num-examples"]) if report else None,
            replayed=1 if result.replayed else None,
            noise_level=m.get("noise-level"),
            noise_level_std=m.get("noise-level-std"),
        ).to_record()
    return content


@app.query(messages.AUDIT)
def audit(msg: Message, context: Context) -> Message:
    """Audit a candidate cohort against this site's members and hold-out; reply with aggregates only.

    Only for a run this site trained in, at most max-audits-per-run times (client/audit_admission.py); a refusal
    is an error reply whose reason the server records."""
    from client.audit import audit_site  # the audit stack loads only when an audit is asked for
    from client.audit_admission import admit

    site = SiteConfig.from_flwr(context.node_config)
    keep_site_log(site)
    logging.getLogger("fedsynth.site").info(
        "site %s: audit message received (this process started %.1f s ago)",
        site.name,
        _process_age(),
    )
    request = AuditRequest.from_record(msg.content.config_records.get(messages.CONFIG))
    ok, reason = admit(
        site, request.run_id, request.checkpoint_sha256, request.cohort_manifest_sha256
    )
    if not ok:
        logging.getLogger("fedsynth.site").warning("%s", reason)
        return Message(error=Error(code=AUDIT_REFUSED, reason=reason), reply_to=msg)
    cohort = msg.content[messages.COHORT]
    result = audit_site(
        site,
        model_config(request.preset, prediction_type=request.prediction_type),
        synthetic=cohort[messages.COHORT_IMAGES].numpy(),
        synthetic_ids=list(request.synthetic_ids),
        synthetic_labels=cohort[messages.COHORT_LABELS].numpy(),
        ae_state=msg.content[messages.AUTOENCODER].to_torch_state_dict(),
        unet_state=msg.content[messages.UNET].to_torch_state_dict(),
        latent_scale=request.latent_scale,
        run_id=request.run_id,
        extraction_samples=request.extraction_samples,
        sampler={"steps": request.sampler_steps, "guidance_scale": request.guidance_scale},
        noise_level=json.loads(request.noise_levels_json).get(site.name),
    )
    reply = AuditReply(json.dumps(result, default=_json_default))
    return Message(content=RecordDict({messages.AUDIT: reply.to_record()}), reply_to=msg)


def _process_age() -> float:
    """Seconds since this process started (Flower starts a ClientApp process per message: the start-up, mostly
    importing torch and MONAI, is part of every round's time)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _config_values(d: dict) -> dict:
    """ConfigRecord takes scalars and strings; floats like inf go as strings so nothing is silently dropped."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float) and v != v or v in (float("inf"), float("-inf")):
            out[k] = str(v)
        elif isinstance(v, (int, float, str, bool)):
            out[k] = v
        else:
            out[k] = str(v)
    return out
