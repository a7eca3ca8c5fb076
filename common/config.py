"""One typed configuration for a fedsynth run, read once and passed down.

Three parts, by who owns them:
- `ModelConfig`: the latent diffusion model (chosen by the consortium through a named preset).
- `RunConfig`: the federation plan the server runs (rounds, phases, strategy, synthesis); it is what
  `[tool.flwr.app.config]` in pyproject.toml and `flwr run --run-config` set.
- `SiteConfig`: what one hospital decides for itself (its data folder, its privacy budget); it is the SuperNode's
  `--node-config`.
Keys in Flower configs are kebab-case (`num-server-rounds`); fields are the same names in snake_case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLASS_NAMES: tuple[str, ...] = ("healthy", "lesion")
# Which diffusion UNet parameters the sites train with DP-SGD (common/model.py select_trainable): every one, or
# DP-LDM's choice (Lyu et al. 2024): the attention blocks and the conditioning (class and time embeddings, and each
# ResBlock's projection of them), the rest frozen at the public pretraining.
DP_TRAINABLE: tuple[str, ...] = ("all", "attention-conditioning")
# Which autoencoder parameters the sites train with DP-SGD in the autoencoder rounds: every one, the decoder only
# (the public encoder, so the public UNet's latent space, stays as it is), or only the GroupNorm scales and shifts
# (a few hundred numbers: the most signal per parameter under DP's noise).
AE_TRAINABLE: tuple[str, ...] = ("all", "decoder", "norms")


@dataclass(frozen=True)
class ModelConfig:
    """MONAI AutoencoderKL + class-conditional DiffusionModelUNet working in the autoencoder's latent space."""

    name: str
    spatial_dims: int = 2
    image_size: int = 64
    # Autoencoder: len(ae_channels) - 1 downsamplings by 2. No attention: cheap and DP-friendly.
    ae_channels: tuple[int, ...] = (16, 32, 64)
    ae_res_blocks: int = 1
    ae_norm_groups: int = 8
    latent_channels: int = 4
    # Diffusion UNet on latents.
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_attention: tuple[bool, ...] = (False, True, True)
    unet_res_blocks: int = 1
    unet_norm_groups: int = 8
    unet_head_channels: int = 16
    class_names: tuple[str, ...] = CLASS_NAMES
    train_timesteps: int = 1000
    ddim_steps: int = 50
    # What the UNet predicts. "v_prediction" (v = sqrt(abar) eps - sqrt(1 - abar) z0): x0 is recovered as
    # sqrt(abar) x - sqrt(1 - abar) v, with no division by sqrt(abar) (0.012 at t = 999 with this schedule). Measured
    # on the demo's warm-started `small` UNet, eps-prediction's small error at high noise (eps MSE 0.049 at t = 999)
    # became a x0 error of std 18 and DDIM ended at latents of std 15 against 1.0 for real ones: noise blobs.
    prediction_type: str = "v_prediction"  # or "epsilon"
    # Multiplies latents so they have about unit variance. Never fitted on private data: the server estimates it
    # on the public data at `fedsynth pretrain` (server/pretrain.py) and records it in the checkpoint.
    latent_scale: float = 1.0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def null_class(self) -> int:
        """The UNet's extra class label meaning "no class" (classifier-free guidance): one past the real ones."""
        return self.num_classes

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.ae_channels) - 1)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (1,) + (self.image_size,) * self.spatial_dims

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.latent_channels,) + (self.latent_size,) * self.spatial_dims


PRESETS: dict[str, ModelConfig] = {
    # Tests: seconds per round on a laptop CPU.
    "tiny": ModelConfig(
        name="tiny",
        image_size=32,
        ae_channels=(8, 16),
        latent_channels=3,
        unet_channels=(16, 32),
        unet_attention=(False, True),
        unet_head_channels=8,
        ddim_steps=10,
        train_timesteps=1000,
    ),
    # The CPU demo: 64x64 slices, 16x16x4 latents. DDIM 25: on the demo's public checkpoint its samples differ from
    # DDIM 50's (same noise) by 2.5 % of their RMS, at the same radiomics fidelity (bench/bench_sampler_steps.py,
    # docs/PERFORMANCE.md); half the synthesis and extraction-search time.
    "small": ModelConfig(name="small", ddim_steps=25),
    # GPU sites: 128x128 slices, 32x32x4 latents.
    "base2d": ModelConfig(
        name="base2d",
        image_size=128,
        ae_channels=(32, 64, 128),
        ae_res_blocks=2,
        unet_channels=(64, 128, 256),
        unet_attention=(False, True, True),
        unet_res_blocks=2,
        unet_norm_groups=32,
        unet_head_channels=32,
        ae_norm_groups=32,
    ),
    # Tests, CI and the CPU `--dims 3` demo: 32^3 volumes -> 8^3 x 4 latents (two downsamplings), tiny channels.
    "tiny3d": ModelConfig(
        name="tiny3d",
        spatial_dims=3,
        image_size=32,
        ae_channels=(8, 16, 16),
        latent_channels=4,
        unet_channels=(16, 32),
        unet_attention=(False, True),
        unet_head_channels=8,
        ddim_steps=10,
    ),
    # GPU sites, volumes: 64^3 -> 16^3 x 4 latents.
    "base3d": ModelConfig(
        name="base3d",
        spatial_dims=3,
        image_size=64,
        ae_channels=(32, 64, 64),
        unet_channels=(64, 128, 128),
        unet_attention=(False, False, True),
        unet_norm_groups=32,
        unet_head_channels=32,
        ae_norm_groups=16,
    ),
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


@dataclass(frozen=True)
class RunConfig:
    """The federation plan. Field `x_y` is Flower run-config key `x-y`."""

    preset: str = "small"
    num_server_rounds: int = 6
    # The first rounds train the autoencoder at the sites (DP-SGD), the rest the diffusion UNet. With `pretrained`,
    # 0 keeps the public autoencoder as it is (the usual choice); without it the autoencoder must be trained here.
    autoencoder_rounds: int = 2
    # A checkpoint made by `fedsynth pretrain` on PUBLIC data (server/pretrain.py): the autoencoder, the UNet and
    # the latent scale start from it, and the run records its sha256 and its public data hash. "": both models
    # start from scratch at the sites and the latent scale is 1.
    pretrained: str = ""
    local_epochs: int = 1
    batch_size: int = 16  # expected (Poisson) batch size at a site
    lr_autoencoder: float = 2e-3
    lr_diffusion: float = 1e-3
    kl_weight: float = 1e-6
    strategy: str = "fedavg"  # fedavg | fedadam | fedprox
    proximal_mu: float = 0.01  # FedProx only
    server_lr: float = 0.05  # FedAdam only
    min_sites: int = 2
    round_timeout: float = 900.0
    run_dir: str = "runs/latest"
    synthesize_per_class: int = 8
    seed: int = 0
    # Classifier-free guidance (Ho & Salimans 2022): in every diffusion training step (the sites' DP-SGD and the
    # server's public pretraining) each label is replaced by the null class with this probability (0.1-0.2 in the
    # paper and in most latent diffusion models since); synthesis then mixes the conditional and unconditional
    # predictions, uncond + guidance-scale x (cond - uncond) (1: no guidance).
    class_dropout: float = 0.1
    guidance_scale: float = 3.0
    # which UNet parameters the sites fine-tune with DP (DP_TRAINABLE); the privacy accounting is the same for any
    dp_trainable: str = "all"
    # which autoencoder parameters the sites train in the autoencoder rounds (AE_TRAINABLE); same accounting
    dp_trainable_autoencoder: str = "all"
    # The diffusion loss at the sites weighs each patient's lesion region (from its own mask in masks/) by
    # 1 + lesion-weight: without it the lesion label is not learnt, even without DP (docs/RECIPE.md, measured on
    # public phantoms). 0: the plain loss. A patient without a mask trains with the plain loss.
    lesion_weight: float = 20.0
    # Ask every site for its scanner noise level, released under DP with the site's own clip and noise
    # (privacy/noise_level.py; planned into each site's budget from the first round, made in its first diffusion
    # round). The levels go to run.json, privacy.json and the cohort's manifest.
    release_noise_levels: bool = False
    audit: bool = True  # run the federated privacy audit on the cohort after synthesis
    # Extraction by many samples (client/extraction.py): each site draws this many times the cohort's size from the
    # audited model with its own entropy, never released, and searches them for copies of its patients.
    audit_oversample: int = 10
    mode: str = "train"  # "train": rounds, synthesis, audit; "audit": only audit `cohort-dir` made from `checkpoint`
    cohort_dir: str = ""  # mode "audit"
    checkpoint: str = ""  # mode "audit"
    # Central (client-level) DP: sites clip their model update, the server adds Gaussian noise to the aggregate
    # (Flower's DifferentialPrivacyClientSideFixedClipping); every release is accounted replace-one (sensitivity
    # 2C) in the consortium's ledger, over all its runs (server/central_dp.py).
    central_dp: str = "off"  # "off" | "client-side-fixed"
    central_dp_noise_multiplier: float = (
        1.0  # noise std on the aggregate = this x clipping norm / sites
    )
    central_dp_clipping_norm: float = (
        1.0  # L2 bound on one site's model update (new - global) per round
    )
    central_dp_delta: float = 0.0  # 0 -> min(1e-5, 1 / (10 x sites))
    central_dp_max_epsilon: float = (
        0.0  # > 0: stop before a release that would take the consortium's epsilon past this
    )
    # The consortium's client-level ledger (SQLite, all runs); "": central_dp_ledger.sqlite beside run-dir
    central_dp_ledger: str = ""
    # Non-empty: this run is an experiment (e.g. `fedsynth experiment memorize`, server/control.py), labelled so in
    # the run record, the cohort manifest, audit.json and both reports; the release gate refuses it.
    experiment: str = ""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}")
        if not 0 <= self.autoencoder_rounds <= self.num_server_rounds:
            raise ValueError("autoencoder-rounds must be between 0 and num-server-rounds")
        if not self.pretrained and self.autoencoder_rounds == 0 and self.mode == "train":
            raise ValueError(
                "autoencoder-rounds 0 needs `pretrained` (a checkpoint from `fedsynth pretrain`): without one the "
                "autoencoder must be trained at the sites (autoencoder-rounds >= 1)"
            )
        if self.strategy not in ("fedavg", "fedadam", "fedprox"):
            raise ValueError(
                f"strategy: unknown {self.strategy!r}; choose fedavg, fedadam or fedprox"
            )
        if self.mode not in ("train", "audit"):
            raise ValueError("mode must be 'train' or 'audit'")
        if self.audit_oversample < 0:
            raise ValueError(
                "audit-oversample must be >= 0 (samples each site draws for the extraction search, per "
                "cohort image; 0 means none, and such an audit never passes)"
            )
        if self.mode == "audit" and not (self.cohort_dir and self.checkpoint):
            raise ValueError("mode 'audit' needs cohort-dir and checkpoint")
        if self.min_sites < 1:
            raise ValueError("min-sites must be >= 1")
        if self.dp_trainable not in DP_TRAINABLE:
            raise ValueError(
                f"dp-trainable: unknown {self.dp_trainable!r}; choose one of {list(DP_TRAINABLE)}"
            )
        if self.dp_trainable_autoencoder not in AE_TRAINABLE:
            raise ValueError(
                f"dp-trainable-autoencoder: unknown {self.dp_trainable_autoencoder!r}; choose one of "
                f"{list(AE_TRAINABLE)}"
            )
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(
                "class-dropout must be in [0, 1): the share of diffusion training labels replaced by the null "
                "class (classifier-free guidance; 0.1 is usual, 0 turns guidance off)"
            )
        if not 0.0 <= self.lesion_weight <= 1e4:
            raise ValueError(
                "lesion-weight must be in [0, 10000]: the extra loss weight of a lesion region (0: plain loss)"
            )
        if not 0.0 <= self.guidance_scale <= 50.0:
            raise ValueError(
                "guidance-scale must be in [0, 50] (1: the plain conditional model, 2-5 usual)"
            )
        if self.guidance_scale != 1.0 and self.class_dropout == 0.0:
            raise ValueError(
                "guidance-scale != 1 needs class-dropout > 0: without it the null class is never trained"
            )
        if self.central_dp not in ("off", "client-side-fixed"):
            raise ValueError(
                f"central-dp: unknown {self.central_dp!r}; choose 'off' or 'client-side-fixed'"
            )
        if self.central_dp != "off":
            if not 0 < self.central_dp_noise_multiplier < float("inf"):
                raise ValueError(
                    "central-dp-noise-multiplier must be > 0 and finite (0 would give no guarantee)"
                )
            if not 0 < self.central_dp_clipping_norm < float("inf"):
                raise ValueError("central-dp-clipping-norm must be > 0 and finite")
            if not 0 <= self.central_dp_delta < 1:
                raise ValueError(
                    "central-dp-delta must be in [0, 1) (0: min(1e-5, 1 / (10 x sites)))"
                )
            if not 0 <= self.central_dp_max_epsilon < float("inf"):
                raise ValueError("central-dp-max-epsilon must be >= 0 and finite (0: no limit)")
            if self.strategy == "fedadam":
                raise ValueError(
                    "central-dp needs strategy 'fedavg' or 'fedprox': Flower's client-level accounting "
                    "assumes FedAvg aggregation with uniform weights"
                )

    @property
    def diffusion_rounds(self) -> int:
        return self.num_server_rounds - self.federated_autoencoder_rounds

    @property
    def federated_autoencoder_rounds(self) -> int:
        return self.autoencoder_rounds

    def phase(self, server_round: int) -> str:
        """Round numbers start at 1, as in Flower."""
        return "autoencoder" if server_round <= self.federated_autoencoder_rounds else "diffusion"

    @classmethod
    def from_flwr(cls, run_config: Mapping[str, Any]) -> RunConfig:
        return _from_kebab(cls, run_config)

    def to_flwr(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's own settings, from its SuperNode `--node-config`."""

    site_dir: str = ""
    site_name: str = ""
    state_dir: str = ""  # durable site state: privacy ledger; defaults to <site_dir>/.fedsynth
    epsilon: float = 10.0  # this site's total (epsilon, delta) budget over all runs on this data
    delta: float = 0.0  # 0 -> min(1e-5, 1 / (10 x patients))
    accountant: str = "rdp"  # rdp | prv
    max_grad_norm: float = 1.0
    # Refuse a round whose calibrated noise would exceed this: the remaining budget is too small to learn anything.
    max_noise_multiplier: float = 10.0
    dp: bool = True  # False only for experiments; the run record then says "none"
    holdout_fraction: float = 0.25
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads for this site's training (0: torch's default); several sites on one machine: 1
    # How DP-SGD gets the clipped per-sample gradients; all exact (privacy/dp.py). bookkeeping: fastest here
    # (docs/PERFORMANCE.md); hooks / ghost: Opacus' own, for other layer types or comparison.
    grad_sample_mode: str = "bookkeeping"  # bookkeeping | hooks | ghost
    # Report each trained round's mean training loss and exact patient count to the server (off: they stay in the
    # site's log; the sampling rate and step count, which the privacy claim needs, reveal the count only to within
    # a batch). Off by default: both are outside the DP guarantee.
    report_training_stats: bool = False
    # Audits this site answers per run id it trained in (each answer reveals aggregates about its patients).
    max_audits_per_run: int = 2
    # One-run audit canaries (client/canaries.py): -1 auto (enough for half the claimed epsilon, at most 40 % of
    # the patient count so training grows by <= 20 %), 0 none, m > 0 exactly m. Fixed once drawn.
    canaries: int = -1
    # The most samples this site draws for an audit's extraction search (client/extraction.py), whatever the
    # server asks: ~0.35 s each on one quiet CPU thread for the `small` preset with guidance (docs/PERFORMANCE.md).
    max_extraction_samples: int = 1000
    # Steps of the two small CNNs this site trains in every audit for the image utility figures (privacy/utility.py;
    # they decide nothing at the release gate): 0 is the fixed recipe's (500 for slices, 150 for volumes). A site
    # short of CPU may set fewer, chosen by its CPU alone, never by looking at the figures; audit.json says how many.
    utility_cnn_steps: int = 0
    # The DP release of this site's scanner noise level, when a run asks for one (privacy/noise_level.py): each
    # training patient's level (estimated from the air around the head) is clipped to [0, noise-level-clip], in
    # units of the image range (the default phantom protocols: 0.012-0.045), and their sum gets Gaussian noise of
    # noise-level-multiplier x clip. One mechanism over every training patient (one step, sampling rate 1), planned
    # into the run's budget and charged in the ledger like a DP-SGD round; the site's own settings, never the server's.
    noise_level_clip: float = 0.1
    noise_level_multiplier: float = 10.0

    def __post_init__(self) -> None:
        if not (self.noise_level_clip > 0 and self.noise_level_multiplier > 0):
            raise ValueError("noise-level-clip and noise-level-multiplier must be > 0")
        if self.max_audits_per_run < 0:
            raise ValueError("max-audits-per-run must be >= 0 (0: answer no audit)")
        if not self.site_dir:
            raise ValueError(
                "node config needs site-dir (the folder with the site's images and labels.csv)"
            )
        if self.accountant not in ("rdp", "prv"):
            raise ValueError("accountant must be 'rdp' or 'prv'")
        if self.grad_sample_mode not in ("bookkeeping", "hooks", "ghost"):
            raise ValueError("grad-sample-mode must be 'bookkeeping', 'hooks' or 'ghost'")
        if self.max_extraction_samples < 0:
            raise ValueError("max-extraction-samples must be >= 0")
        if self.utility_cnn_steps < 0:
            raise ValueError("utility-cnn-steps must be >= 0 (0: the fixed recipe's steps)")
        if self.canaries < -1:
            raise ValueError("canaries must be -1 (auto), 0 (none) or a positive count")
        if self.epsilon <= 0 or self.delta < 0 or self.max_grad_norm <= 0:
            raise ValueError("epsilon and max-grad-norm must be > 0, delta >= 0")

    @property
    def name(self) -> str:
        return self.site_name or Path(self.site_dir).name

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else Path(self.site_dir) / ".fedsynth"

    @classmethod
    def from_flwr(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """Strict: a misspelt key (`epsilonn=1`) would otherwise leave the budget at its default. Only the keys
        Flower itself puts into a node config (simulation's partition keys) are ignored."""
        return _from_kebab(cls, node_config, ignore=FLOWER_NODE_KEYS)


# What Flower adds to a node config on its own (flwr.common.constant; the simulation engine sets them).
FLOWER_NODE_KEYS = frozenset({"partition-id", "num-partitions"})
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _from_kebab(cls: type, values: Mapping[str, Any], ignore: frozenset[str] = frozenset()) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields or key != name.replace("_", "-"):
            if key in ignore:
                continue
            raise ValueError(
                f"unknown config key {key!r} (keys are kebab-case); known: "
                f"{sorted(k.replace('_', '-') for k in fields)}"
            )
        default = fields[name].default
        if isinstance(default, bool):
            value = _boolean(key, value)
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        kwargs[name] = value
    return cls(**kwargs)


def _boolean(key: str, value: Any) -> bool:
    """true/1/yes or false/0/no (any case); anything else is an error, never a silent False (`dp=ture`)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if not isinstance(value, str) else value.lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{key}: {value!r} is not a boolean; write true or false")


__all__ = [
    "CLASS_NAMES",
    "AE_TRAINABLE",
    "DP_TRAINABLE",
    "ModelConfig",
    "PRESETS",
    "model_config",
    "RunConfig",
    "SiteConfig",
]
