"""The checkpoint format (`fedsynth-checkpoint/1`): the one module that writes and reads it.

A checkpoint is a torch file holding a dict with exactly these keys:

    format            "fedsynth-checkpoint/1"
    model_config      dataclasses.asdict(ModelConfig): what rebuilds the autoencoder and the UNet
    run_config        dataclasses.asdict(RunConfig) of the run that wrote it (a record; nothing reads it back)
    run_state         dataclasses.asdict(RunState): what survives a restart
    autoencoder       the autoencoder's state dict
    unet              the diffusion UNet's state dict
    server_optimizer  a server optimiser's moments (FedAdam), or None
    pretraining       where the starting weights came from, or None (trained from scratch at the sites):
                      {"public_data_sha256", "public_files", "public_dir", "preset", "autoencoder_steps",
                      "unet_steps", "batch_size", "class_dropout", "seed", "seconds", "created", ...}; in a run's
                      checkpoints also "checkpoint" and "checkpoint_sha256" of the pretrained file it started from

Two kinds: a run's checkpoints (`save`: round-NNN.pt and latest.pt in its run folder) and a public pretrained
checkpoint (`write`: one file, made by `fedsynth pretrain`, server/pretrain.py; run_state.completed_round 0).

The UNet has one class embedding per class plus the null class of classifier-free guidance (common/model.py);
a checkpoint from before guidance (one embedding per class only) is refused, naming the file, because its UNet
has no unconditional prediction to guide with: pretrain and train again with this version.

Legacy: checkpoints written before `model_config.prediction_type` existed predicted the noise, so they load as
"epsilon"; those written before `server_optimizer` or `pretraining` existed load with None. Any other missing or
unknown key is an error naming the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import ModelConfig
from common.io import atomic_path
from common.model import build_autoencoder, build_unet
from server.run_folder import RunFolder

FORMAT = "fedsynth-checkpoint/1"
KEYS = {
    "format",
    "model_config",
    "run_config",
    "run_state",
    "autoencoder",
    "unet",
    "server_optimizer",
    "pretraining",
}
LEGACY_KEYS = {
    "server_optimizer": None,
    "pretraining": None,
}  # absent in checkpoints written before them
LEGACY_MODEL_CONFIG = {"prediction_type": "epsilon"}  # old checkpoints predicted noise
LEGACY_RUN_STATE = {
    "noise_levels": {}
}  # written before the sites' noise-level releases: none were made


@dataclass
class RunState:
    """What survives a restart: the global model, the round reached, and what happened to each site."""

    run_id: str
    completed_round: int = 0
    latent_scale: float = 1.0
    autoencoder_source: str = "federated"
    unet_warm_started: bool = False
    sites: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # site name -> {node_id, status, reason, round}
    # site name -> {sigma, std, round}: each site's scanner noise level as it released it under DP (RunConfig
    # release_noise_levels; privacy/noise_level.py)
    noise_levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str = "running"
    reason: str = ""


@dataclass
class Checkpoint:
    """One global model and the state of the run that made it."""

    model_config: ModelConfig
    run_config: dict[str, Any]
    run_state: RunState
    autoencoder: dict[str, torch.Tensor]
    unet: dict[str, torch.Tensor]
    server_optimizer: dict[str, Any] | None = None
    pretraining: dict[str, Any] | None = None

    def _payload(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_config": dataclasses.asdict(self.model_config),
            "run_config": dict(self.run_config),
            "run_state": dataclasses.asdict(self.run_state),
            "autoencoder": self.autoencoder,
            "unet": self.unet,
            "server_optimizer": self.server_optimizer,
            "pretraining": self.pretraining,
        }

    def write(self, path: Path | str) -> Path:
        """Write this checkpoint to one file (a pretrained checkpoint), atomically: temp file, then rename."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self._payload(), tmp)
        return path

    def save(self, run_dir: RunFolder | Path | str) -> Path:
        """Write round-NNN.pt and latest.pt in the run's checkpoints folder, each atomically; returns the first."""
        folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(Path(run_dir))
        payload = self._payload()
        path = folder.checkpoint(self.run_state.completed_round)
        for target in (path, folder.latest_checkpoint):
            with atomic_path(target) as tmp:
                torch.save(payload, tmp)
        return path

    @classmethod
    def load(cls, path: Path | str) -> Checkpoint:
        """Read and check a checkpoint; a ValueError names the file and what is wrong with it."""
        path = Path(path)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # torch raises many kinds for a file that is not one of its own
            raise ValueError(f"{path}: not a readable checkpoint ({err})") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path}: not a fedsynth checkpoint (format {FORMAT!r} expected)")
        payload = {**LEGACY_KEYS, **payload}
        _exact_keys(path, "checkpoint", set(payload), KEYS)
        cfg = {**LEGACY_MODEL_CONFIG, **payload["model_config"]}
        _exact_keys(
            path, "model_config", set(cfg), {f.name for f in dataclasses.fields(ModelConfig)}
        )
        run_state = {**LEGACY_RUN_STATE, **payload["run_state"]}
        _exact_keys(
            path, "run_state", set(run_state), {f.name for f in dataclasses.fields(RunState)}
        )
        model_config = ModelConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        )
        _check_class_embeddings(path, model_config, payload["unet"])
        return cls(
            model_config=model_config,
            run_config=dict(payload["run_config"]),
            run_state=RunState(**run_state),
            autoencoder=payload["autoencoder"],
            unet=payload["unet"],
            server_optimizer=payload["server_optimizer"],
            pretraining=payload["pretraining"],
        )

    def models(self, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module]:
        """The autoencoder and the UNet rebuilt from the checkpoint, on `device`, in eval mode."""
        ae, unet = build_autoencoder(self.model_config), build_unet(self.model_config)
        ae.load_state_dict(self.autoencoder)
        unet.load_state_dict(self.unet)
        return ae.to(device).eval(), unet.to(device).eval()


def _check_class_embeddings(path: Path, cfg: ModelConfig, unet: dict[str, torch.Tensor]) -> None:
    weight = unet.get("class_embedding.weight") if isinstance(unet, dict) else None
    expected = cfg.num_classes + 1
    if weight is not None and weight.shape[0] != expected:
        before = weight.shape[0] == cfg.num_classes
        raise ValueError(
            f"{path}: the UNet has {weight.shape[0]} class embeddings, this version needs {expected} "
            f"({cfg.num_classes} classes + the null class of classifier-free guidance)"
            + (
                "; the checkpoint was written before classifier-free guidance: pretrain and train a new run "
                "with this version (its UNet cannot be guided)"
                if before
                else ""
            )
        )


def _exact_keys(path: Path, part: str, got: set[str], expected: set[str]) -> None:
    missing, unknown = sorted(expected - got), sorted(got - expected)
    if missing or unknown:
        raise ValueError(
            f"{path}: {part} has missing keys {missing} and unknown keys {unknown}; it was written by another "
            f"version of fedsynth ({FORMAT}): load it with that version or start a new run"
        )
