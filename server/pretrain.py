"""`fedsynth pretrain`: the autoencoder and the diffusion UNet trained at the server on a PUBLIC data folder.

Public pretraining is how DP generative models become useful (Ghalebikesabi et al. 2023; DP-LDM, Lyu et al. 2024):
the sites then fine-tune the pretrained model with DP-SGD. It is a step of its own, run once and reused by any
number of runs (RunConfig `pretrained`), so a run's minutes go to DP at the sites.

The public folder has the format of a site (NIfTI/DICOM + labels.csv, read by common/site.py's loader, with the
same preprocessing as the sites'). It may hold only one class (healthy volunteers, say): the UNet is trained with
classifier-free guidance's class dropout, so it learns the unconditional (null-class) path as well as the classes
it sees; a class it never saw is learnt at the sites. Nothing here ever reads patient data: the latent scale is
estimated on the public images too.

The checkpoint (server/checkpoint.py's format, written atomically) records where it came from: the public folder's
content hash (sha256 over the sorted relative paths and sha256 of every file), its file count, the preset, the
steps, the batch size, the seed and the wall time. A run records the checkpoint's own sha256 and that provenance in
run.json and the cohort manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ModelConfig, model_config
from common.io import sha256_file
from common.model import (
    autoencoder_loss,
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    diffusion_loss,
    drop_labels,
    encode,
    estimate_latent_scale,
    init_unseen_classes,
)
from common.progress import Stage
from common.site import SiteData, SiteError, load_site
from server.checkpoint import Checkpoint, RunState

log = logging.getLogger("fedsynth.pretrain")


LR_SCHEDULES = ("one-cycle", "constant")


def lr_scheduler(
    opt: torch.optim.Optimizer, schedule: str, lr: float, steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule both pretraining loops step once per step (None: constant). The warm-up is 10 % of the steps
    and at least 2 (torch's OneCycleLR divides by zero when its warm-up ends at step 0, e.g. 10 steps at 10 %: the
    `--dims 3` demo's); under 3 steps there is nothing to anneal."""
    if schedule == "constant" or steps < 3:
        return None
    warm_up = max(0.1, 2.0 / steps)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warm_up)


@dataclass(frozen=True)
class PretrainConfig:
    """What `fedsynth pretrain` trains, on what, for how long."""

    public_dir: str
    out: str
    preset: str = "small"
    # 3,200 one-cycle steps: on public phantoms they halve the pixel error and the radiomics Frechet distance of 800
    # (the demo's first run, sized for its time) and, with the scanner's noise added back, lift the
    # reconstructions' precision / coverage from 0.54 / 0.11 to 0.89 / 0.62 (docs/PERFORMANCE.md, bench
    # bench_autoencoder_texture --steps; public data only, so choosing it costs no privacy)
    autoencoder_steps: int = 3200
    unet_steps: int = 1200
    batch_size: int = 16
    lr_autoencoder: float = 2e-3
    lr_diffusion: float = 1e-3
    kl_weight: float = 1e-6
    # classifier-free guidance: the share of training labels replaced by the null class (common/model.py)
    class_dropout: float = 0.1
    # a class the public data never shows (the demo's lesions) starts at the null class's embedding ("null", see
    # common/model.py init_unseen_classes) or keeps its random initialisation ("random", for comparison)
    unseen_classes: str = "null"
    # learning-rate schedule of both models: "one-cycle" (warm up to the lr over the first 10 % of the steps, then
    # anneal to ~0: torch's OneCycleLR) or "constant". Measured on public phantoms only (docs/RECIPE.md): at a
    # constant 2e-3 the autoencoder never settles into the fine structure (ventricles) and the UNet's loss stops
    # falling after a few hundred steps; annealing reaches both with the same steps.
    lr_schedule: str = "one-cycle"
    seed: int = 0
    threads: int = (
        0  # CPU threads (0: torch's default); on a loaded machine 1 can be many times faster
    )

    def __post_init__(self) -> None:
        model_config(self.preset)  # an unknown preset fails here, naming the choices
        if self.autoencoder_steps < 1 or self.unet_steps < 1:
            raise ValueError("--autoencoder-steps and --unet-steps must be >= 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"--lr-schedule: {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        if self.threads < 0:
            raise ValueError("--threads must be >= 0 (0: torch's default)")
        if self.unseen_classes not in ("null", "random"):
            raise ValueError("unseen-classes must be 'null' or 'random'")
        if not 0.0 < self.class_dropout < 1.0:
            raise ValueError(
                "class-dropout must be in (0, 1): the UNet must learn the unconditional (null-class) path"
            )


def public_data_hash(folder: Path | str) -> tuple[str, int]:
    """(sha256, file count) of a public folder's content: every file (hidden ones aside) by its relative path and
    its own sha256, sorted. Renaming, adding, removing or changing any file changes it."""
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest(), len(files)


def load_public(folder: Path | str, cfg: ModelConfig) -> SiteData:
    """The public folder's usable images, preprocessed exactly like a site's; every problem is logged with its file
    and the rest is used. A folder with nothing usable is an error that names every problem."""
    folder = Path(folder)
    if not (folder / "labels.csv").is_file():
        raise ValueError(
            f"{folder}: no labels.csv; a public data folder has the format of a site (NIfTI/DICOM files plus "
            "labels.csv with subject_id,class): check it with `fedsynth site check DIR`"
        )
    try:
        data = load_site(
            folder,
            class_names=cfg.class_names,
            spatial_dims=cfg.spatial_dims,
            image_size=cfg.image_size,
        )
    except SiteError as err:
        raise ValueError(f"public data: {err}") from err
    for problem in data.problems:
        log.warning("public data: %s", problem)
    return data


def train_autoencoder(
    cfg: ModelConfig, pre: PretrainConfig, images: torch.Tensor
) -> dict[str, torch.Tensor]:
    # 2D: channels-last convolutions, the same float32 arithmetic in an order oneDNN runs 1.2x faster here
    # (bench_precision); 3D is left as it is (not measured)
    layout = torch.channels_last if cfg.spatial_dims == 2 else torch.contiguous_format
    ae = build_autoencoder(cfg).to(memory_format=layout)
    images = images.contiguous(memory_format=layout)
    opt = torch.optim.Adam(ae.parameters(), lr=pre.lr_autoencoder)
    schedule = lr_scheduler(opt, pre.lr_schedule, pre.lr_autoencoder, pre.autoencoder_steps)
    bar = Stage(
        "pretrain-autoencoder", "public pretraining: autoencoder", pre.autoencoder_steps, "step"
    )
    for step in range(pre.autoencoder_steps):
        idx = torch.randint(0, len(images), (min(pre.batch_size, len(images)),))
        loss = autoencoder_loss(ae, images[idx], pre.kl_weight).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        bar.update(step + 1, loss=loss.detach())
    return {
        k: v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in ae.state_dict().items()
    }


def train_unet(
    cfg: ModelConfig,
    pre: PretrainConfig,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    labels: torch.Tensor,
    latent_scale: float,
) -> dict[str, torch.Tensor]:
    """The class-conditional UNet with class dropout: it learns every class it sees and the null class. Its initial
    weights come from seed + 1, whatever the autoencoder's training drew."""
    torch.manual_seed(pre.seed + 1)
    unet = build_unet(cfg)
    opt = torch.optim.Adam(unet.parameters(), lr=pre.lr_diffusion)
    schedule = lr_scheduler(opt, pre.lr_schedule, pre.lr_diffusion, pre.unet_steps)
    scheduler = ddpm_scheduler(cfg)
    bar = Stage("pretrain-unet", "public pretraining: diffusion UNet", pre.unet_steps, "step")
    for step in range(pre.unet_steps):
        idx = torch.randint(0, len(mu), (min(pre.batch_size, len(mu)),))
        z = (mu[idx] + sigma[idx] * torch.randn_like(mu[idx])) * latent_scale
        y = drop_labels(labels[idx], pre.class_dropout, cfg.null_class)
        loss = diffusion_loss(unet, scheduler, z, y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        bar.update(step + 1, loss=loss.detach())
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def pretrain(pre: PretrainConfig, say=None) -> Path:
    """Train both models on the public folder and write the checkpoint to `pre.out` (temp file, then rename)."""
    say = say or (lambda m: log.info("%s", m))
    t0 = time.monotonic()
    cfg = model_config(pre.preset)
    folder = Path(pre.public_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the public data folder does not exist")
    digest, n_files = public_data_hash(folder)
    data = load_public(folder, cfg)
    counts = {c: int((data.labels == i).sum()) for i, c in enumerate(cfg.class_names)}
    say(
        f"public data {folder}: {len(data)} images ({', '.join(f'{n} {c}' for c, n in counts.items())}), "
        f"{n_files} files, sha256 {digest[:16]}..."
    )
    if pre.threads:
        torch.set_num_threads(pre.threads)
    torch.manual_seed(pre.seed)
    np.random.seed(pre.seed)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    ae_state = train_autoencoder(cfg, pre, images)
    ae = build_autoencoder(cfg)
    ae.load_state_dict(ae_state)
    ae.eval()
    latent_scale = estimate_latent_scale(ae, images)
    mu, sigma = encode(ae, images)
    with torch.no_grad():
        recon_mse = float(
            torch.cat(
                [
                    ae.decode(m).sub(x).pow(2)
                    for m, x in zip(mu.split(64), images.split(64), strict=True)
                ]
            ).mean()
        )
    say(
        f"autoencoder on the public images: reconstruction MSE {recon_mse:.4f}, posterior sigma (median) "
        f"{float(sigma.median()):.4f}; latent scale {latent_scale:.3f}"
    )
    unet_state = train_unet(cfg, pre, mu, sigma, labels, latent_scale)
    unseen = [c for c, n in counts.items() if n == 0]
    if unseen and pre.unseen_classes == "null":
        unet = build_unet(cfg)
        unet.load_state_dict(unet_state)
        init_unseen_classes(unet, list(counts.values()), cfg.null_class)
        unet_state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        say(
            f"classes the public data never shows ({', '.join(unseen)}) start at the null class's embedding: "
            "the sites' DP fine-tuning teaches them"
        )
    provenance: dict[str, Any] = {
        "public_dir": str(folder.resolve()),
        "public_data_sha256": digest,
        "public_files": n_files,
        "public_images": len(data),
        "public_class_counts": counts,
        "unseen_classes": unseen,
        "unseen_classes_start": pre.unseen_classes if unseen else None,
        "preset": pre.preset,
        "autoencoder_steps": pre.autoencoder_steps,
        "unet_steps": pre.unet_steps,
        "batch_size": pre.batch_size,
        "lr_autoencoder": pre.lr_autoencoder,
        "lr_diffusion": pre.lr_diffusion,
        "lr_schedule": pre.lr_schedule,
        "class_dropout": pre.class_dropout,
        "seed": pre.seed,
        "latent_scale": latent_scale,
        "autoencoder_reconstruction_mse": round(recon_mse, 5),
        "autoencoder_posterior_sigma_median": round(float(sigma.median()), 5),
        "seconds": round(time.monotonic() - t0, 1),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = Checkpoint(
        model_config=cfg,
        run_config=dataclasses.asdict(pre),
        run_state=RunState(
            run_id=f"pretrain-{digest[:12]}",
            latent_scale=latent_scale,
            autoencoder_source="public",
            unet_warm_started=True,
            status="completed",
        ),
        autoencoder=ae_state,
        unet=unet_state,
        pretraining=provenance,
    ).write(pre.out)
    return out


def load_pretrained(path: Path | str, cfg: ModelConfig) -> tuple[Checkpoint, dict[str, Any]]:
    """A pretrained checkpoint for a run of model `cfg`, and its provenance plus its own path and sha256.

    Refused, saying why: a file that is not a fedsynth checkpoint, a run's checkpoint (not made by
    `fedsynth pretrain`), or one made for another preset or model shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: pretrained checkpoint not found; make one with "
            "`fedsynth pretrain --public DIR --preset P --out FILE`"
        )
    ckpt = Checkpoint.load(path)
    if ckpt.pretraining is None or ckpt.run_state.completed_round != 0:
        raise ValueError(
            f"{path}: not a pretrained checkpoint (it was not made by `fedsynth pretrain`); a run's own "
            "checkpoint cannot start another run"
        )
    # the sampler's step count is how a model is sampled, not which model it is: a checkpoint made when the preset
    # sampled with other steps still fits (the run samples with its own)
    if dataclasses.replace(ckpt.model_config, ddim_steps=cfg.ddim_steps) != cfg:
        mine, theirs = dataclasses.asdict(cfg), dataclasses.asdict(ckpt.model_config)
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(
            f"{path}: made for preset {ckpt.model_config.name!r} but this run uses {cfg.name!r} (differs in "
            f"{', '.join(diff)}); pretrain again with --preset {cfg.name} or set `pretrained` to a matching file"
        )
    provenance = {
        **ckpt.pretraining,
        "checkpoint": str(path.resolve()),
        "checkpoint_sha256": sha256_file(path),
    }
    return ckpt, provenance
