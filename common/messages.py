"""Every message between the server and the sites, defined once: what each carries and its Flower record.

The server (server/training.py, server/audit.py) builds these and the sites (client/client_app.py) read them, or
the other way round; neither side names a key anywhere else. Each type has one `to_record()` and one
`from_record()`; `from_record` refuses a missing key, an unknown key or a value of the wrong type, naming it, so
a key renamed on one side fails loudly instead of training with a default. Record keys are the fields in
kebab-case (`server-round`), as in Flower's configs.

A train message carries `CONFIG` (RoundPlan), `ARRAYS` (the component to train) and, in the diffusion phase,
`AUTOENCODER` (the frozen global autoencoder). The reply carries `STATUS` (TrainStatus), `PRIVACY` (the site's
spend: privacy_summary in client/task.py) and, when the site trained, `ARRAYS` (its model) and `METRICS`
(TrainMetrics). An audit query (message type `query.AUDIT`) carries `CONFIG` (AuditRequest), `COHORT`
(`COHORT_IMAGES`, `COHORT_LABELS`), `AUTOENCODER` and `UNET`; the reply `AUDIT` (AuditReply).
As Flower's FedAvg does, the strategies are given these record names (server/training.py make_strategy).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from flwr.app import ConfigRecord, MetricRecord

from common.config import AE_TRAINABLE, DP_TRAINABLE

# Record names in a message's content, and the audit query's action name.
CONFIG = "config"
ARRAYS = "arrays"
AUTOENCODER = "autoencoder"
UNET = "unet"
STATUS = "status"
PRIVACY = "privacy"
METRICS = "metrics"
COHORT = "cohort"
COHORT_IMAGES = "images"
COHORT_LABELS = "labels"
AUDIT = "audit"

PHASES = ("autoencoder", "diffusion")


class MessageError(ValueError):
    """A record that does not match its definition in common/messages.py; the message names the key."""


@dataclass(frozen=True)
class RoundPlan:
    """The server's instructions for one training round, plus what a site needs to plan its privacy for the run.

    `seed` makes a round reproducible only at a site without DP (client/task.py round_seed): under DP nothing the
    server sends decides the round's randomness. Every key is required on the wire (`from_record`); the defaults
    only serve code that builds a plan in Python."""

    run_id: str
    server_round: int
    phase: str  # "autoencoder" | "diffusion"
    num_server_rounds: int
    federated_autoencoder_rounds: int
    preset: str
    local_epochs: int
    batch_size: int
    lr: float
    kl_weight: float
    latent_scale: float
    proximal_mu: float
    seed: int
    # classifier-free guidance: the probability of replacing a diffusion training label by the null class (the
    # draws are the site's: under DP from its own OS entropy)
    class_dropout: float = 0.1
    # which diffusion UNet parameters the site trains (common/config.py DP_TRAINABLE); the rest come back unchanged
    dp_trainable: str = "all"
    # which autoencoder parameters the site trains in an autoencoder round (common/config.py AE_TRAINABLE)
    dp_trainable_autoencoder: str = "all"
    # the diffusion loss's extra weight on a patient's lesion region (common/model.py lesion_weight_map; 0: the
    # plain loss); each sample's weights come from its own mask, so the clipping bounds a patient as before
    lesion_weight: float = 0.0
    # the run asks every site for its scanner noise level, released under DP (privacy/noise_level.py): a site plans
    # the release into the run's budget from the first round and makes it once, in its first diffusion round
    release_noise_level: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.lesion_weight < float("inf"):
            raise MessageError(
                f"RoundPlan: lesion-weight {self.lesion_weight} is not >= 0 and finite"
            )
        if self.dp_trainable not in DP_TRAINABLE:
            raise MessageError(
                f"RoundPlan: dp-trainable {self.dp_trainable!r} is not one of {list(DP_TRAINABLE)}"
            )
        if self.dp_trainable_autoencoder not in AE_TRAINABLE:
            raise MessageError(
                f"RoundPlan: dp-trainable-autoencoder {self.dp_trainable_autoencoder!r} is not one of "
                f"{list(AE_TRAINABLE)}"
            )
        if self.phase not in PHASES:
            raise MessageError(f"RoundPlan: phase {self.phase!r} is not one of {PHASES}")
        if not 0.0 <= self.class_dropout <= 1.0:
            raise MessageError(f"RoundPlan: class-dropout {self.class_dropout} is not in [0, 1]")

    @property
    def remaining_rounds(self) -> int:
        """Rounds in which this site may still train, this one included (both phases count: both touch data)."""
        return self.num_server_rounds - self.server_round + 1

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(_values(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundPlan:
        return _parse(cls, record)


@dataclass(frozen=True)
class TrainStatus:
    """How a site's round ended: trained (both empty), refused (why, e.g. its privacy budget), or failed (error)."""

    site: str
    refused: str
    error: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(_values(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainStatus:
        return _parse(cls, record)


@dataclass(frozen=True)
class TrainMetrics:
    """What a site says about a round it trained. `loss` and `num_examples` (its exact patient count) leave only
    when the site opts in (`report-training-stats`); the steps reveal the count only to within a batch.
    `replayed` is 1 when the site had released this round's update before (a resumed run asked again) and sent
    that same update and these same figures again, training and spending nothing (client/replay.py)."""

    steps: int
    seconds: float
    epsilon: float
    delta: float
    loss: float | None = None
    num_examples: int | None = None
    replayed: int | None = None
    # the round that made the site's DP noise-level release (RoundPlan.release_noise_level): the level and the
    # standard deviation of its DP noise
    noise_level: float | None = None
    noise_level_std: float | None = None

    def to_record(self) -> MetricRecord:
        return MetricRecord({k: v for k, v in _values(self).items() if v is not None})

    @classmethod
    def from_record(cls, record: MetricRecord) -> TrainMetrics:
        return _parse(cls, record)


@dataclass(frozen=True)
class AuditRequest:
    """The server asks a site to audit a cohort synthesized from a checkpoint of run `run_id`.

    The hashes (of the checkpoint file, and of the cohort's manifest.json, which names that checkpoint) let the site
    tie the audit to a run it trained and count the audits per checkpoint."""

    run_id: str
    checkpoint_sha256: str
    cohort_manifest_sha256: str
    preset: str
    prediction_type: str  # what the checkpoint's UNet predicts: "v_prediction" | "epsilon"
    latent_scale: float
    synthetic_ids: tuple[str, ...]
    # samples the site is asked to draw for the extraction search (it draws them itself, capped by its own limit),
    # with the sampler the cohort was made with (its manifest): DDIM steps (0: the preset's) and guidance scale
    extraction_samples: int
    sampler_steps: int
    guidance_scale: float
    # {site name: the scanner noise level it released under DP in the run} as JSON ("{}": none released); a site
    # scores the cohort with its own level added back. Nothing the server could not do itself: it could send a
    # cohort with any noise added
    noise_levels_json: str = "{}"

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(_values(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> AuditRequest:
        return _parse(cls, record)


@dataclass(frozen=True)
class AuditReply:
    """A site's audit result: the JSON document of aggregates client/audit.py writes."""

    result_json: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(_values(self))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> AuditReply:
        return _parse(cls, record)


# ---- one conversion for all of them ----------------------------------------------------------------------------
def _key(field: str) -> str:
    return field.replace("_", "-")


def _values(message: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        out[_key(f.name)] = list(value) if isinstance(value, tuple) else value
    return out


def _parse(cls: type, record: Any) -> Any:
    name = cls.__name__
    if record is None:
        raise MessageError(f"{name}: the record is missing from the message")
    hints = typing.get_type_hints(cls)
    fields = {_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - set(fields))
    if unknown:
        required = [
            k for k, f in fields.items() if type(None) not in typing.get_args(hints[f.name])
        ]
        missing = sorted(set(required) - set(record))
        raise MessageError(
            f"{name}: unknown key(s) {unknown}"
            + (f", missing {missing}" if missing else "")
            + f" (known: {sorted(fields)}); the server and the site must run the same version of "
            "common/messages.py"
        )
    kwargs = {}
    for key, f in fields.items():
        optional = type(None) in typing.get_args(hints[f.name])
        if key not in record:
            if optional:
                continue
            raise MessageError(
                f"{name}: key {key!r} is missing; the server and the site must run the same version "
                "of common/messages.py"
            )
        kwargs[f.name] = _typed(name, key, record[key], hints[f.name])
    return cls(**kwargs)


def _typed(name: str, key: str, value: Any, hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (Union, types.UnionType):
        hint = args[0]
    if hint is bool and isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if (
        hint is int and isinstance(value, float) and value.is_integer()
    ):  # MetricRecord values may be floats
        return int(value)
    if hint is str and isinstance(value, str):
        return value
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return tuple(value)
    raise MessageError(f"{name}: key {key!r} should be {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def readable_error(reason: str) -> str:
    """Flower's error reply reason (`<class 'ValueError'>:<'message'>`, flwr/supernode/runtime/run_clientapp.py)
    as a person reads it: `ValueError: message`. Other texts pass through unchanged."""
    m = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>", reason.strip(), flags=re.DOTALL)
    return f"{m.group(1)}: {m.group(2)}" if m else reason
