"""Synthesize a cohort from a global checkpoint, and own the cohort folder format (write, read, verify).

A cohort folder:
    images/synth-<class>-<NNNNN>.nii.gz   one synthetic image (2-D: H x W x 1) or volume (D x H x W) each
    labels.csv                            synthetic_id,class
    dataset.json                          MONAI / Decathlon-style datalist
    preview.png                           a grid per class (volumes: three orthogonal mid-slices each)
    manifest.json                         sha256 of every file, checkpoint hash, config, seed, versions, privacy

How it is made, so that a cohort of any size fits in bounded memory and survives a crash:
- image i of the cohort (classes in order, `per_class` each) starts from its own Gaussian noise, drawn from a
  generator seeded by (seed, i): the cohort does not depend on how it is split over devices or resumed;
- the images still to do are dealt round-robin to every device (all visible GPUs, or `workers` CPU processes);
  each holds one batch at a time and writes each image as soon as it is decoded (temporary file, then rename),
  then appends its sha256 to its own journal;
- everything happens in `.<name>.partial/` beside the final folder. Run again with the same request after a crash
  and it skips every image whose file matches its journal entry, redoes the rest, and finishes;
- labels.csv, dataset.json and preview.png are written when every image is there, manifest.json last, and only
  then is the folder renamed to its final name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import queue as queue_mod
import shutil
import time
from collections.abc import Callable, Iterator
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
from common.io import append_jsonl, atomic_path, sha256_file, write_json_atomic
from common.model import decode, sample_latents
from common.progress import Stage
from server.checkpoint import Checkpoint

MANIFEST_FORMAT = "fedsynth-cohort/1"
NOMINAL_FOV_MM = 192.0  # synthetic images carry a nominal field of view (the phantoms' default)
PREVIEW_PER_ROW = 8  # the preview shows the first 8 images of each class
_PLAN = "plan.json"
_JOURNALS = "journal"


@dataclass(frozen=True)
class SynthesisRequest:
    checkpoint: Path
    out_dir: Path
    per_class: int = 8
    seed: int = 0
    batch_size: int = 32
    steps: int | None = None  # DDIM steps; default: the model config's
    # "auto": every visible GPU, else the CPU; "cpu"; "cuda" (every GPU); or a list such as "cuda:0,cuda:2".
    device: str = "auto"
    workers: int = 0  # CPU worker processes (0: one); ignored on GPUs (one process per GPU)
    # classifier-free guidance scale (common/model.py guided_prediction); None: the run's `guidance-scale` as
    # recorded in the checkpoint (1.0, no guidance, for a checkpoint whose run did not record one)
    guidance_scale: float | None = None


def guidance_of(req: SynthesisRequest, ckpt: Checkpoint) -> float:
    """The guidance scale a request samples with: its own, else the one its checkpoint's run configured."""
    if req.guidance_scale is not None:
        return float(req.guidance_scale)
    return float(ckpt.run_config.get("guidance_scale", 1.0))


# ---- the format: ids, affine, images, labels, datalist, preview, manifest ---------------------------------------


def image_ids(class_names: tuple[str, ...] | list[str], per_class: int) -> list[tuple[str, int]]:
    """(synthetic id, class index) of every image of a cohort, in cohort order."""
    return [
        (f"synth-{name}-{k + 1:05d}", c)
        for c, name in enumerate(class_names)
        for k in range(per_class)
    ]


def image_affine(cfg: ModelConfig) -> np.ndarray:
    """RAS voxel -> mm affine of a synthetic image, centred on the nominal field of view.

    The sites' loader (common.site.load_image) turns every scan to RAS before resizing it to the model's grid, so
    the model's axes are right, anterior, superior and its images are written in that orientation; the spacing is
    the nominal field of view over the grid (the sites' own spacing never reaches the server). 2-D images are one
    axial slice of the same spacing."""
    spacing = NOMINAL_FOV_MM / cfg.image_size
    shape = np.array(
        [cfg.image_size, cfg.image_size, cfg.image_size if cfg.spatial_dims == 3 else 1]
    )
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -0.5 * (shape - 1) * spacing
    return affine


def write_image(folder: Path, sid: str, image: np.ndarray, cfg: ModelConfig) -> str:
    """Write one image (1, H, W) or (1, D, H, W) in [0, 1] as images/<sid>.nii.gz (temp file, then rename);
    returns its sha256."""
    vol = image[0] if cfg.spatial_dims == 3 else image[0][:, :, None]
    affine = image_affine(cfg)
    nii = nib.Nifti1Image(np.asarray(vol, dtype=np.float32), affine)
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nii.header.set_xyzt_units("mm")
    final = folder / "images" / f"{sid}.nii.gz"
    with atomic_path(final) as tmp:
        nib.save(nii, tmp)
        digest = sha256_file(tmp)
    return digest


def load_image(path: Path, spatial_dims: int) -> np.ndarray:
    """One cohort image as written by `write_image`: (1, H, W) or (1, D, H, W) float32."""
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    if spatial_dims == 2:
        data = data[:, :, 0]
    return data[None]


def write_labels(folder: Path, ids: list[tuple[str, int]], class_names) -> None:
    with open(folder / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["synthetic_id", "class"])
        w.writeheader()
        w.writerows({"synthetic_id": sid, "class": class_names[c]} for sid, c in ids)


def write_datalist(folder: Path, ids: list[tuple[str, int]], cfg: ModelConfig) -> None:
    datalist = [
        {"image": f"images/{sid}.nii.gz", "label": c, "class": cfg.class_names[c]} for sid, c in ids
    ]
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "name": "fedsynth synthetic cohort",
                "description": "Synthetic MRI from a federated latent diffusion model; no real patient images.",
                "tensorImageSize": "3D",
                "modality": {"0": "MRI"},
                "labels": {str(i): n for i, n in enumerate(cfg.class_names)},
                "numTraining": len(datalist),
                "training": datalist,
            },
            indent=2,
        )
    )


def preview_views(image: np.ndarray) -> list[np.ndarray]:
    """What the preview shows of one image (1, H, W) or (1, D, H, W): the image itself, or a volume's three
    orthogonal mid-slices (sagittal, coronal, axial; RAS axes), each rotated for display."""
    img = image[0]
    if img.ndim == 2:
        return [np.rot90(img)]
    i, j, k = (s // 2 for s in img.shape)
    return [np.rot90(img[i, :, :]), np.rot90(img[:, j, :]), np.rot90(img[:, :, k])]


def write_preview(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    per_row: int = PREVIEW_PER_ROW,
) -> None:
    """A grid with one row per class (the first `per_row` images); a volume takes three rows, its sagittal,
    coronal and axial mid-slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_views = len(preview_views(images[0])) if len(images) else 1
    # no empty columns: as many as the largest class shows
    per_row = max(
        1, min(per_row, max((int((labels == r).sum()) for r in range(len(class_names))), default=1))
    )
    view_names = ("sagittal", "coronal", "axial") if n_views == 3 else ("",)
    rows = len(class_names) * n_views
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.4, rows * 1.5), squeeze=False)
    for r, name in enumerate(class_names):
        idx = np.flatnonzero(labels == r)[:per_row]
        for c in range(per_row):
            views = preview_views(images[idx[c]]) if c < len(idx) else [None] * n_views
            for v, view in enumerate(views):
                ax = axes[r * n_views + v, c]
                ax.axis("off")
                if view is not None:
                    ax.imshow(view, cmap="gray", vmin=0, vmax=1)
                if c == 0:
                    ax.set_title(f"{name} {view_names[v]}".strip(), loc="left", fontsize=8)
    fig.suptitle(
        "fedsynth synthetic cohort (one row per class"
        + (", three orthogonal mid-slices per volume)" if n_views == 3 else ")"),
        fontsize=10,
    )
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
    ckpt: Checkpoint,
    n_images: int,
    privacy: dict[str, Any] | None,
    devices: list[str],
) -> None:
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name != "manifest.json"
        and p.relative_to(folder).parts[0]
        not in (_PLAN, _JOURNALS)  # synthesis state, removed next
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "n_images": n_images,
        "per_class": req.per_class,
        "class_names": list(cfg.class_names),
        "sampler": {
            "kind": "DDIM",
            "steps": req.steps or cfg.ddim_steps,
            "eta": 0.0,
            "seed": req.seed,
            "guidance_scale": guidance_of(req, ckpt),
        },
        "synthesis": {
            "devices": devices,
            "precision": "bfloat16 autocast" if devices[0].startswith("cuda") else "float32",
            "noise": "image i starts from torch.Generator seeded with sha256('<seed>:<i>')",
            "affine": "RAS, centred, spacing = nominal field of view / image size",
            "spacing_mm": NOMINAL_FOV_MM / cfg.image_size,
        },
        "checkpoint": {
            "path": str(req.checkpoint),
            "sha256": sha256_file(req.checkpoint),
            "run_id": ckpt.run_state.run_id,
            "completed_round": ckpt.run_state.completed_round,
        },
        "model_config": asdict(cfg),
        "run_config": ckpt.run_config,
        # the public pretrained checkpoint the run started from (its sha256, its public data's hash), or None
        "pretraining": ckpt.pretraining,
        "privacy": privacy or {"note": "no privacy record supplied"},
        "software": software_versions(),
        "files": files,
    }
    with atomic_path(folder / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


@dataclass(frozen=True)
class Cohort:
    """A cohort folder as read back: its manifest and, in cohort order, the ids and class indices."""

    path: Path
    manifest: dict[str, Any]
    ids: list[str]
    labels: np.ndarray
    class_names: list[str]

    @property
    def spatial_dims(self) -> int:
        return int(self.manifest["model_config"]["spatial_dims"])

    def image(self, sid: str) -> np.ndarray:
        return load_image(self.path / "images" / f"{sid}.nii.gz", self.spatial_dims)

    def images(self) -> np.ndarray:
        """Every image stacked, (N, 1, ...) float32 (the whole cohort in memory: for audits of cohorts that fit)."""
        return np.stack([self.image(sid) for sid in self.ids])


def read_cohort(cohort_dir: Path) -> Cohort:
    """The manifest and labels of a cohort folder; a missing or malformed part is named (ValueError)."""
    cohort_dir = Path(cohort_dir)
    try:
        manifest = json.loads((cohort_dir / "manifest.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{cohort_dir / 'manifest.json'}: unreadable ({err})") from None
    for key in ("class_names", "model_config"):
        if key not in manifest:
            raise ValueError(f"{cohort_dir / 'manifest.json'}: no {key!r}; not a fedsynth cohort")
    class_names = list(manifest["class_names"])
    with open(cohort_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids, labels = [], []
    for n, row in enumerate(rows, start=2):
        if row.get("class") not in class_names or not row.get("synthetic_id"):
            raise ValueError(
                f"{cohort_dir / 'labels.csv'} line {n}: expected synthetic_id,class with a class in {class_names}"
            )
        ids.append(row["synthetic_id"])
        labels.append(class_names.index(row["class"]))
    return Cohort(cohort_dir, manifest, ids, np.asarray(labels, dtype=np.int64), class_names)


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


# ---- sampling -----------------------------------------------------------------------------------------------------


def resolve_devices(device: str, workers: int = 0) -> list[str]:
    """The devices a synthesis runs on, one worker process each (a CPU may appear several times)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if device == "cuda":
        raise ValueError(
            "device 'cuda' asked for, but torch sees no GPU (is the CUDA build of torch installed?)"
        )
    if device in ("auto", "cpu"):
        return ["cpu"] * max(1, workers)
    names = [d.strip() for d in device.split(",") if d.strip()]
    for name in names:
        torch.device(name)  # raises on a malformed name
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: torch sees no GPU")
    return names


def image_noise(cfg: ModelConfig, seed: int, index: int) -> torch.Tensor:
    """Image `index`'s starting noise: the same whatever device, batch or shard it is sampled in."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(cfg.latent_shape, generator=generator)


def generate(
    cfg: ModelConfig,
    ae,
    unet,
    indices: list[int],
    labels: torch.Tensor,
    latent_scale: float,
    *,
    seed: int,
    batch_size: int,
    steps: int | None,
    device: torch.device,
    guidance_scale: float = 1.0,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Batches of (cohort indices, images (B, 1, ...) in [0, 1]); image i depends only on (seed, i)."""
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        noise = torch.stack([image_noise(cfg, seed, i) for i in batch]).to(device)
        with autocast:
            z = sample_latents(
                unet,
                cfg,
                labels[batch].to(device),
                steps=steps,
                noise=noise,
                guidance_scale=guidance_scale,
            )
            images = decode(ae, z.float(), latent_scale)
        yield batch, images.float().cpu().numpy()


def _work(
    req: SynthesisRequest,
    partial: Path,
    device_name: str,
    worker: int,
    indices: list[int],
    threads: int,
    report: Callable[[int, str], None],
) -> None:
    """One worker: sample its share of the cohort on one device and write each image as it comes; `report(n,
    line)` after each batch of n images."""
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt = Checkpoint.load(req.checkpoint)
    cfg, (ae, unet) = ckpt.model_config, ckpt.models(device)
    ids = image_ids(cfg.class_names, req.per_class)
    labels = torch.tensor([c for _, c in ids])
    journal = partial / _JOURNALS / f"worker-{worker}-{os.getpid()}.jsonl"
    done = 0
    t0 = time.time()
    for batch, images in generate(
        cfg,
        ae,
        unet,
        indices,
        labels,
        float(ckpt.run_state.latent_scale),
        seed=req.seed,
        batch_size=req.batch_size,
        steps=req.steps,
        device=device,
        guidance_scale=guidance_of(req, ckpt),
    ):
        for i, image in zip(batch, images, strict=True):
            sid = ids[i][0]
            append_jsonl(journal, {"id": sid, "sha256": write_image(partial, sid, image, cfg)})
        done += len(batch)
        report(
            len(batch),
            f"synthesis {device_name} (worker {worker}): {done}/{len(indices)} images, "
            f"{done / max(time.time() - t0, 1e-9):.2f} images/s",
        )


def _worker_main(req, partial, device_name, worker, indices, threads, messages, errors) -> None:
    try:
        _work(
            req,
            partial,
            device_name,
            worker,
            indices,
            threads,
            lambda n, line: messages.put((n, line)),
        )
    except BaseException as err:  # reported to the parent, which names the worker and stops
        errors.put(f"worker {worker} on {device_name}: {type(err).__name__}: {err}")
        raise


def _plan(req: SynthesisRequest, cfg: ModelConfig) -> dict[str, Any]:
    guidance = guidance_of(req, Checkpoint.load(req.checkpoint))
    return {
        "guidance_scale": guidance,
        "format": MANIFEST_FORMAT,
        "checkpoint_sha256": sha256_file(req.checkpoint),
        "per_class": req.per_class,
        "seed": req.seed,
        "steps": req.steps or cfg.ddim_steps,
        "class_names": list(cfg.class_names),
        "image_shape": list(cfg.image_shape),
    }


def partial_dir(out_dir: Path) -> Path:
    """Where a cohort is built (and resumed from) before it is renamed to `out_dir`."""
    return out_dir.parent / f".{out_dir.name}.partial"


def _verified(partial: Path) -> dict[str, str]:
    """Images already written: those whose file matches the sha256 its worker journalled after writing it."""
    journalled: dict[str, str] = {}
    for path in sorted((partial / _JOURNALS).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                journalled[entry["id"]] = entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line: that image is simply redone
    return {
        sid: digest
        for sid, digest in journalled.items()
        if (partial / "images" / f"{sid}.nii.gz").is_file()
        and sha256_file(partial / "images" / f"{sid}.nii.gz") == digest
    }


def _finish(partial: Path, out_dir: Path) -> None:
    """The manifest is written: drop the synthesis state and give the folder its final name."""
    shutil.rmtree(partial / _JOURNALS, ignore_errors=True)
    (partial / _PLAN).unlink(missing_ok=True)
    os.replace(partial, out_dir)


def _start(
    req: SynthesisRequest, cfg: ModelConfig, say: Callable[[str], None]
) -> tuple[Path, set[str] | None]:
    """The partial folder, new or resumed, and the ids already done in it (None: the cohort is complete)."""
    partial = partial_dir(req.out_dir)
    plan = _plan(req, cfg)
    if partial.exists() and not (partial / _PLAN).exists() and not verify_cohort(partial):
        return partial, None  # stopped after its manifest was written, before the rename: complete
    if partial.exists():
        try:
            previous = json.loads((partial / _PLAN).read_text())
        except (OSError, ValueError):
            previous = None
        if previous != plan:
            raise FileExistsError(
                f"{partial}: a half-written cohort from a different request (checkpoint, seed, size or steps) "
                "is there; rerun with the same options to finish it, or remove the folder to start again"
            )
        for stray in (partial / "images").glob(
            ".*.tmp*"
        ):  # an image being written when the run stopped
            stray.unlink()
        done = set(_verified(partial))
        say(f"resuming the cohort in {partial}: {len(done)} images already written and verified")
        return partial, done
    (partial / "images").mkdir(parents=True)
    (partial / _JOURNALS).mkdir()
    write_json_atomic(partial / _PLAN, plan)
    return partial, set()


def _run_workers(
    req: SynthesisRequest,
    partial: Path,
    devices: list[str],
    todo: list[int],
    n_images: int,
    say: Callable[[str], None],
) -> None:
    shards = [todo[k :: len(devices)] for k in range(len(devices))]
    bar = Stage("synthesis", "synthesis", n_images, "image")
    written = n_images - len(todo)

    def report(n: int, line: str) -> None:
        nonlocal written
        written += n
        bar.update(written)
        say(line)

    cpu_workers = sum(d == "cpu" for d in devices)
    threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers > 1 else 0
    if len(devices) == 1:  # no process to spawn
        _work(req, partial, devices[0], 0, shards[0], threads, report)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
    messages, errors = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(req, partial, dev, k, shard, threads, messages, errors),
            name=f"fedsynth-synthesis-{k}",
        )
        for k, (dev, shard) in enumerate(zip(devices, shards, strict=True))
        if shard
    ]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            try:
                report(*messages.get(timeout=1.0))
            except queue_mod.Empty:
                pass
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    finally:
        for p in procs:
            if p.is_alive() and any(q.exitcode not in (None, 0) for q in procs):
                p.terminate()
            p.join()
    while not messages.empty():
        report(*messages.get())
    failed = [p for p in procs if p.exitcode != 0]
    if failed:
        reasons = []
        while not errors.empty():
            reasons.append(errors.get())
        raise RuntimeError(
            "synthesis failed: "
            + ("; ".join(reasons) or ", ".join(f"{p.name} exited {p.exitcode}" for p in failed))
            + f". The images written so far are kept in {partial}: run the same command again to finish"
        )


def synthesize_cohort(
    req: SynthesisRequest,
    privacy: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Sample the cohort over every device, write it image by image, resume a half-written one; returns out_dir."""
    say = progress or (lambda _msg: None)
    out_dir = Path(req.out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; refusing to overwrite it")
    if req.per_class < 1 or req.batch_size < 1:
        raise ValueError("per-class and batch-size must be >= 1")
    devices = resolve_devices(req.device, req.workers)
    ckpt = Checkpoint.load(req.checkpoint)
    cfg = ckpt.model_config
    ckpt.models()  # a checkpoint whose weights do not fit its config fails here, before any work
    partial, done = _start(req, cfg, say)
    if done is None:
        _finish(partial, out_dir)
        say(f"cohort in {partial} was complete: renamed to {out_dir}")
        return out_dir
    ids = image_ids(cfg.class_names, req.per_class)
    todo = [i for i, (sid, _) in enumerate(ids) if sid not in done]
    if todo:
        say(f"synthesis: {len(todo)} images on {', '.join(devices)} (batches of {req.batch_size})")
        _run_workers(req, partial, devices, todo, len(ids), say)
    missing = sorted(set(sid for sid, _ in ids) - set(_verified(partial)))
    if missing:
        raise RuntimeError(
            f"synthesis: {len(missing)} images missing in {partial}, e.g. {missing[:3]}"
        )
    write_labels(partial, ids, cfg.class_names)
    write_datalist(partial, ids, cfg)
    shown = [i for i, (_, c) in enumerate(ids) if i - c * req.per_class < PREVIEW_PER_ROW]
    write_preview(
        partial / "preview.png",
        np.stack(
            [
                load_image(partial / "images" / f"{ids[i][0]}.nii.gz", cfg.spatial_dims)
                for i in shown
            ]
        ),
        np.array([ids[i][1] for i in shown]),
        cfg.class_names,
    )
    write_manifest(partial, req, cfg, ckpt, len(ids), privacy, devices)
    _finish(partial, out_dir)
    say(f"cohort of {len(ids)} images written to {out_dir}")
    return out_dir
