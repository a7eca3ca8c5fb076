"""Synthesize a cohort from a global checkpoint: batched, seeded DDIM sampling; NIfTI + labels + manifest.

A cohort folder:
    images/synth-<class>-<NNNNN>.nii.gz   one synthetic image each
    labels.csv                            synthetic_id,class
    dataset.json                          MONAI / Decathlon-style datalist
    preview.png                           a grid per class
    manifest.json                         sha256 of every file, checkpoint hash, config, seed, versions, privacy
The folder is built under a temporary name and renamed when complete: a crash never leaves half a cohort.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from common.config import ModelConfig
from common.io import atomic_dir, sha256_file
from common.model import build_autoencoder, build_unet, decode, sample_latents
from common.progress import Stage
from server.training import load_checkpoint

MANIFEST_FORMAT = "fedsynth-cohort/1"
NOMINAL_FOV_MM = 192.0  # synthetic images carry a nominal field of view (the phantoms' default)


@dataclass(frozen=True)
class SynthesisRequest:
    checkpoint: Path
    out_dir: Path
    per_class: int = 8
    seed: int = 0
    batch_size: int = 32
    steps: int | None = None  # DDIM steps; default: the model config's
    device: str = "auto"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_generator(checkpoint: Path, device: torch.device):
    payload = load_checkpoint(checkpoint)
    cfg_dict = dict(payload["model_config"])
    cfg_dict.setdefault(
        "prediction_type", "epsilon"
    )  # checkpoints written before the field existed
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    ae, unet = build_autoencoder(cfg), build_unet(cfg)
    ae.load_state_dict(payload["autoencoder"])
    unet.load_state_dict(payload["unet"])
    return cfg, ae.to(device).eval(), unet.to(device).eval(), payload


def generate(
    cfg: ModelConfig,
    ae,
    unet,
    labels: torch.Tensor,
    latent_scale: float,
    *,
    seed: int,
    batch_size: int,
    steps: int | None,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Images (N, 1, ...) in [0, 1] for the given class labels, in batches, reproducible for a seed."""
    generator = torch.Generator().manual_seed(seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    out = []
    n_batches = (len(labels) + batch_size - 1) // batch_size
    bar = Stage("synthesis", "synthesis", len(labels), "image")
    for b, i in enumerate(range(0, len(labels), batch_size)):
        batch = labels[i : i + batch_size].to(device)
        t0 = time.time()
        with autocast:
            z = sample_latents(unet, cfg, batch, steps=steps, generator=generator)
            images = decode(ae, z.float(), latent_scale)
        out.append(images.float().cpu().numpy())
        bar.update(i + len(batch))
        if progress:
            progress(
                f"synthesis batch {b + 1}/{n_batches}: {len(batch)} images in {time.time() - t0:.1f}s"
            )
    return np.concatenate(out)


def synthesize_cohort(
    req: SynthesisRequest,
    privacy: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    device = _device(req.device)
    cfg, ae, unet, payload = load_generator(req.checkpoint, device)
    latent_scale = float(payload["run_state"]["latent_scale"])
    labels = torch.arange(cfg.num_classes).repeat_interleave(req.per_class)
    images = generate(
        cfg,
        ae,
        unet,
        labels,
        latent_scale,
        seed=req.seed,
        batch_size=req.batch_size,
        steps=req.steps,
        device=device,
        progress=progress,
    )
    with atomic_dir(req.out_dir) as tmp:
        ids = write_images(tmp, images, labels.numpy(), cfg)
        write_preview(tmp / "preview.png", images, labels.numpy(), cfg.class_names)
        write_manifest(tmp, req, cfg, payload, ids, privacy)
    if progress:
        progress(f"cohort of {len(ids)} images written to {req.out_dir}")
    return req.out_dir


def write_images(
    folder: Path, images: np.ndarray, labels: np.ndarray, cfg: ModelConfig
) -> list[str]:
    (folder / "images").mkdir()
    spacing = NOMINAL_FOV_MM / cfg.image_size
    affine = np.diag([spacing] * 3 + [1.0])
    ids, rows, datalist = [], [], []
    counters: dict[int, int] = {}
    for img, label in zip(images, labels, strict=False):
        k = counters[int(label)] = counters.get(int(label), 0) + 1
        sid = f"synth-{cfg.class_names[label]}-{k:05d}"
        vol = img[0] if cfg.spatial_dims == 3 else img[0][:, :, None]
        nii = nib.Nifti1Image(vol.astype(np.float32), affine)
        nii.header.set_xyzt_units("mm")
        nib.save(nii, folder / "images" / f"{sid}.nii.gz")
        ids.append(sid)
        rows.append({"synthetic_id": sid, "class": cfg.class_names[label]})
        datalist.append(
            {"image": f"images/{sid}.nii.gz", "label": int(label), "class": cfg.class_names[label]}
        )
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["synthetic_id", "class"])
        w.writeheader()
        w.writerows(rows)
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "name": "fedsynth synthetic cohort",
                "description": "Synthetic MRI from a federated latent diffusion model; no real patient images.",
                "tensorImageSize": f"{cfg.spatial_dims}D" if cfg.spatial_dims == 3 else "3D",
                "modality": {"0": "MRI"},
                "labels": {str(i): n for i, n in enumerate(cfg.class_names)},
                "numTraining": len(datalist),
                "training": datalist,
            },
            indent=2,
        )
    )
    return ids


def write_preview(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    per_row: int = 8,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(class_names)
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.4, rows * 1.6), squeeze=False)
    for r, name in enumerate(class_names):
        idx = np.flatnonzero(labels == r)[:per_row]
        for c in range(per_row):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(idx):
                img = images[idx[c], 0]
                if img.ndim == 3:  # a volume: show its middle axial slice
                    img = img[:, :, img.shape[2] // 2]
                ax.imshow(np.rot90(img), cmap="gray", vmin=0, vmax=1)
            if c == 0:
                ax.set_title(name, loc="left", fontsize=9)
    fig.suptitle("fedsynth synthetic cohort (one row per class)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buf.getvalue())


def software_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("fedsynth", "torch", "monai", "flwr", "opacus", "numpy", "nibabel"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_manifest(
    folder: Path,
    req: SynthesisRequest,
    cfg: ModelConfig,
    payload: dict[str, Any],
    ids: list[str],
    privacy: dict[str, Any] | None,
) -> None:
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "n_images": len(ids),
        "per_class": req.per_class,
        "class_names": list(cfg.class_names),
        "sampler": {
            "kind": "DDIM",
            "steps": req.steps or cfg.ddim_steps,
            "eta": 0.0,
            "seed": req.seed,
        },
        "checkpoint": {
            "path": str(req.checkpoint),
            "sha256": sha256_file(req.checkpoint),
            "run_id": payload["run_state"]["run_id"],
            "completed_round": payload["run_state"]["completed_round"],
        },
        "model_config": asdict(cfg),
        "run_config": payload.get("run_config", {}),
        "privacy": privacy or {"note": "no privacy record supplied"},
        "software": software_versions(),
        "files": files,
    }
    (folder / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True, default=str)
    )


def verify_cohort(cohort_dir: Path) -> list[str]:
    """Problems found by re-hashing every file listed in the manifest (and spotting unlisted ones); [] means intact."""
    cohort_dir = Path(cohort_dir)
    manifest_path = cohort_dir / "manifest.json"
    if not manifest_path.exists():
        return [f"{manifest_path}: missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        return [f"{manifest_path}: not valid JSON ({err})"]
    problems = []
    listed = manifest.get("files", {})
    for rel, digest in listed.items():
        path = cohort_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 does not match the manifest")
    for path in cohort_dir.rglob("*"):
        rel = str(path.relative_to(cohort_dir))
        if path.is_file() and rel not in listed and path.name != "manifest.json":
            problems.append(f"{rel}: not listed in the manifest")
    return problems
