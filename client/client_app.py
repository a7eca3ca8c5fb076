"""fedsynth ClientApp: the part of the federation that runs inside each hospital.

Thin by design: it reads the site's node config and the server's round config, calls plain functions in
`client.task` (training) and `client.audit` (privacy audits on local data), and replies. Raw images never leave.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.task import RoundPlan, run_training_round
from common.config import SiteConfig, model_config
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
        msg.content.config_records.get("config")
        if msg.metadata.message_type == MessageType.TRAIN
        else None
    )
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    clipping_norm = float(config[KEY_CLIPPING_NORM])
    sent = msg.content["arrays"]
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content:
        return reply  # nothing of the model leaves
    new = reply.content["arrays"]
    if list(new.keys()) != list(sent.keys()):
        raise ValueError("central DP: the reply's arrays do not match the global model's")
    new_nd, norm = clip_update(new.to_numpy_ndarrays(), sent.to_numpy_ndarrays(), clipping_norm)
    # the unclipped norm says something about the site's data: it stays in the site's own log
    logging.getLogger("fedsynth.site").info(
        "central DP: model update norm %.4g, clipped to %.4g before it leaves",
        norm,
        min(norm, clipping_norm),
    )
    reply.content["arrays"] = ArrayRecord(
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


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = SiteConfig.from_flwr(context.node_config)
    plan = RoundPlan.from_config(dict(msg.content["config"]))
    arrays = msg.content["arrays"].to_torch_state_dict()
    autoencoder = (
        msg.content["autoencoder"].to_torch_state_dict() if "autoencoder" in msg.content else None
    )
    try:
        result = run_training_round(site, plan, arrays, autoencoder)
    except Exception as err:  # reply with the site's name and the reason, so the run record says who dropped and why
        logging.getLogger("fedsynth.site").exception(
            "site %s: round %d failed", site.name, plan.server_round
        )
        status = {"site": site.name, "refused": "", "error": f"{type(err).__name__}: {err}"[:2000]}
        return Message(content=RecordDict({"status": ConfigRecord(status)}), reply_to=msg)
    content = RecordDict({"privacy": ConfigRecord(_config_values(result.privacy))})
    content["status"] = ConfigRecord(
        {"site": result.site_name, "refused": result.refused, "error": ""}
    )
    if result.state_dict is not None:
        content["arrays"] = ArrayRecord(result.state_dict)
        content["metrics"] = MetricRecord({k: float(v) for k, v in result.metrics.items()})
    return Message(content=content, reply_to=msg)


@app.query("audit")
def audit(msg: Message, context: Context) -> Message:
    """Audit a candidate cohort against this site's members and hold-out; reply with aggregates only.

    Only for a run this site trained in, at most max-audits-per-run times (client/audit_admission.py); a refusal
    is an error reply whose reason the server records."""
    from client.audit import audit_site  # the audit stack loads only when an audit is asked for
    from client.audit_admission import admit

    site = SiteConfig.from_flwr(context.node_config)
    config = msg.content["config"]
    ok, reason = admit(
        site,
        str(config.get("run-id", "")),
        str(config.get("checkpoint-sha256", "")),
        str(config.get("cohort-manifest-sha256", "")),
    )
    if not ok:
        logging.getLogger("fedsynth.site").warning("%s", reason)
        return Message(error=Error(code=AUDIT_REFUSED, reason=reason), reply_to=msg)
    cohort = msg.content["cohort"]
    result = audit_site(
        site,
        model_config(
            str(config["preset"]), prediction_type=str(config.get("prediction-type", "epsilon"))
        ),
        synthetic=cohort["images"].numpy(),
        synthetic_ids=json.loads(str(config["synthetic-ids"])),
        synthetic_labels=cohort["labels"].numpy(),
        ae_state=msg.content["autoencoder"].to_torch_state_dict(),
        unet_state=msg.content["unet"].to_torch_state_dict(),
        latent_scale=float(config["latent-scale"]),
        run_id=str(config["run-id"]),
    )
    return Message(
        content=RecordDict(
            {"audit": ConfigRecord({"json": json.dumps(result, default=_json_default)})}
        ),
        reply_to=msg,
    )


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
