"""One site's data: a folder of NIfTI files and/or DICOM series plus labels.csv, validated and normalised.

Convention: images sit in `DIR/images/` if it exists, else in `DIR/`. A NIfTI file's subject id is its name without
`.nii`/`.nii.gz`; a single `.dcm` file's is its stem; a sub-folder of DICOM files is one series named by the folder.
`labels.csv` has `subject_id,class[,site]`. Each patient gives exactly ONE record (the middle axial slice for a 2D
model, the volume for a 3D one): privacy is counted per patient.

Bad input never stops the site while something is usable: every problem is a `SiteProblem` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DEFAULT_CLASS_NAMES = ("healthy", "lesion")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SKIP_NAMES = {"labels.csv", "site.json", "masks"}


class SiteError(Exception):
    """The site has nothing usable (the message lists why)."""


@dataclass
class SiteProblem:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class SiteData:
    subject_ids: list[str]
    images: np.ndarray  # float32 (N, 1, *spatial) in [0, 1]
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]
    problems: list[SiteProblem] = field(default_factory=list)
    spacings: dict[str, tuple[float, ...]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.subject_ids)

    def subset(self, idx: Sequence[int]) -> "SiteData":
        idx = list(idx)
        return SiteData(
            subject_ids=[self.subject_ids[i] for i in idx],
            images=self.images[idx] if idx else self.images[:0],
            labels=self.labels[idx] if idx else self.labels[:0],
            class_names=self.class_names,
            problems=list(self.problems),
            spacings={self.subject_ids[i]: self.spacings[self.subject_ids[i]] for i in idx
                      if self.subject_ids[i] in self.spacings},
            shapes={self.subject_ids[i]: self.shapes[self.subject_ids[i]] for i in idx
                    if self.subject_ids[i] in self.shapes},
        )


# ---- finding files -------------------------------------------------------------------------------------------

def _subject_id(path: Path) -> str | None:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    if name.lower().endswith(".dcm"):
        return path.stem
    return None


def _is_dicom_dir(path: Path) -> bool:
    return path.is_dir() and any(p.is_file() and not p.name.startswith(".") for p in path.iterdir())


def find_images(site_dir: Path, problems: list[SiteProblem]) -> dict[str, Path]:
    """Subject id -> image path (file or DICOM series folder). Ambiguous ids are dropped with a problem."""
    root = site_dir / "images" if (site_dir / "images").is_dir() else site_dir
    found: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or path.name in SKIP_NAMES or path.name == "images":
            continue
        if path.is_dir():
            if _is_dicom_dir(path):
                found.setdefault(path.name, []).append(path)
            continue
        sid = _subject_id(path)
        if sid is None:
            problems.append(SiteProblem(str(path), "not an image file (expected .nii, .nii.gz, .dcm or a DICOM series folder); ignored"))
            continue
        found.setdefault(sid, []).append(path)
    out: dict[str, Path] = {}
    for sid, paths in found.items():
        if len(paths) > 1:
            problems.append(SiteProblem(", ".join(str(p) for p in paths),
                                        f"several images for subject {sid!r}; all are ignored (ambiguous)"))
        else:
            out[sid] = paths[0]
    return out


def read_labels(site_dir: Path, class_names: tuple[str, ...], problems: list[SiteProblem]) -> dict[str, int]:
    path = site_dir / "labels.csv"
    if not path.is_file():
        raise SiteError(f"{path}: missing; a site needs labels.csv with columns subject_id,class")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (UnicodeDecodeError, csv.Error) as err:
        raise SiteError(f"{path}: not a readable CSV ({err})") from err
    if not rows or not {"subject_id", "class"} <= set(header):
        raise SiteError(f"{path}: needs a header with subject_id and class and at least one row")
    labels: dict[str, int] = {}
    seen: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        sid, cls = (row.get("subject_id") or "").strip(), (row.get("class") or "").strip()
        seen[sid] = seen.get(sid, 0) + 1
        if not sid:
            problems.append(SiteProblem(f"{path}:{line}", "empty subject_id; row ignored"))
        elif cls not in class_names:
            problems.append(SiteProblem(f"{path}:{line}", f"unknown class {cls!r} for {sid!r} (known: {', '.join(class_names)}); row ignored"))
        else:
            labels[sid] = class_names.index(cls)
    for sid, n in seen.items():
        if n > 1 and sid:
            problems.append(SiteProblem(str(path), f"subject {sid!r} listed {n} times; ignored (ambiguous)"))
            labels.pop(sid, None)
    return labels


# ---- reading one image ---------------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _loader(kind: str):
    """MONAI load -> channel first -> RAS orientation, with the reader named (no trial and error per file)."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    reader = "NibabelReader" if kind == "nifti" else "PydicomReader"
    return Compose([LoadImage(image_only=True, reader=reader), EnsureChannelFirst(), Orientation(axcodes="RAS")])


def load_image(path: Path, *, spatial_dims: int, image_size: int) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """One record (1, *spatial) float32 in [0, 1], plus the voxel spacing and the original shape.

    Raises ValueError with a readable reason for anything unusable.
    """
    import torch
    from monai.transforms import Resize, ScaleIntensityRangePercentiles

    if path.is_file() and path.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind = "nifti" if path.name.endswith(NIFTI_SUFFIXES) else "dicom"
            img = _loader(kind)(str(path))
    except Exception as err:  # MONAI wraps reader errors in RuntimeError/OSError/...: all mean "unreadable"
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ValueError(f"unreadable image ({type(err).__name__}: {reason[:200]})") from None
    arr = torch.as_tensor(img).float()
    spacing = tuple(float(s) for s in getattr(img, "pixdim", [])[: arr.ndim - 1]) if hasattr(img, "pixdim") else ()
    shape = tuple(arr.shape[1:])
    if arr.shape[0] != 1:
        raise ValueError(f"{arr.shape[0]} channels/volumes (shape {tuple(arr.shape)}); expected a single image")
    if arr.ndim not in (3, 4):
        raise ValueError(f"{arr.ndim - 1}-D image (shape {shape}); expected 2-D or 3-D")
    if not torch.isfinite(arr).all():
        raise ValueError(f"{int((~torch.isfinite(arr)).sum())} NaN/inf voxels")
    if spatial_dims == 2:
        if arr.ndim == 4:
            arr = arr[..., arr.shape[-1] // 2]  # the middle axial slice: one record per patient
    elif arr.ndim != 4 or min(arr.shape[1:]) < 2:
        raise ValueError(f"a 3-D model needs a volume, got shape {shape}")
    if float(arr.max() - arr.min()) <= 0:
        raise ValueError("constant image (no dynamic range)")
    arr = Resize((image_size,) * spatial_dims, mode="area" if spatial_dims == 2 else "trilinear")(arr)
    arr = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(arr)
    return np.asarray(arr, dtype=np.float32), spacing, shape


# ---- the site --------------------------------------------------------------------------------------------------

def load_site(site_dir: Path | str, *, class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES, spatial_dims: int = 2,
              image_size: int = 64, progress: Callable[[int, int], None] | None = None) -> SiteData:
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SiteError(f"{site_dir}: not a folder")
    problems: list[SiteProblem] = []
    labels = read_labels(site_dir, tuple(class_names), problems)
    images = find_images(site_dir, problems)
    for sid in sorted(set(images) - set(labels)):
        problems.append(SiteProblem(str(images[sid]), f"no row in labels.csv for subject {sid!r}; ignored"))
    for sid in sorted(set(labels) - set(images)):
        problems.append(SiteProblem(str(site_dir / "labels.csv"), f"subject {sid!r} has a label but no image"))
    ids, arrays, ys, spacings, shapes = [], [], [], {}, {}
    todo = sorted(set(images) & set(labels))
    for i, sid in enumerate(todo):
        try:
            arr, spacing, shape = load_image(images[sid], spatial_dims=spatial_dims, image_size=image_size)
        except ValueError as err:
            problems.append(SiteProblem(str(images[sid]), f"{err}; ignored"))
            continue
        ids.append(sid)
        arrays.append(arr)
        ys.append(labels[sid])
        spacings[sid], shapes[sid] = spacing, shape
        if progress:
            progress(i + 1, len(todo))
    if not ids:
        listing = "\n  ".join(str(p) for p in problems) or "no images found"
        raise SiteError(f"{site_dir}: no usable subjects:\n  {listing}")
    return SiteData(ids, np.stack(arrays), np.asarray(ys, dtype=np.int64), tuple(class_names), problems,
                    spacings, shapes)


def split_site(data: SiteData, holdout_fraction: float = 0.25,
               salt: str = "fedsynth-audit-holdout") -> tuple[SiteData, SiteData]:
    """(train, hold-out) by patient, decided by a hash of (salt, subject id) so it never changes between runs and
    adding a patient moves nobody else. Per class, the hold-out takes the lowest-hash share (at least one patient
    when the class has two or more)."""
    if not 0 < holdout_fraction < 1:
        raise ValueError("holdout_fraction must be between 0 and 1")

    def rank(sid: str) -> str:
        return hashlib.sha256(f"{salt}\0{sid}".encode()).hexdigest()

    holdout: list[int] = []
    for c in np.unique(data.labels):
        members = sorted(np.flatnonzero(data.labels == c), key=lambda i: rank(data.subject_ids[i]))
        k = int(round(holdout_fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        holdout += [int(i) for i in members[:k]]
    held = set(holdout)
    train = [i for i in range(len(data)) if i not in held]
    return data.subset(train), data.subset(sorted(held))


@dataclass
class SiteReport:
    site_dir: str
    usable_subjects: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)  # original shape -> count
    spacings: dict[str, int] = field(default_factory=dict)  # voxel spacing -> count
    problems: list[str] = field(default_factory=list)
    train_subjects: int = 0
    holdout_subjects: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def to_text(self) -> str:
        lines = [f"site {self.site_dir}", f"  usable subjects: {self.usable_subjects} "
                 f"(train {self.train_subjects}, audit hold-out {self.holdout_subjects})"]
        lines.append("  classes: " + (", ".join(f"{k} {v}" for k, v in self.class_counts.items()) or "none"))
        lines.append("  shapes: " + (", ".join(f"{k} x{v}" for k, v in self.shapes.items()) or "none"))
        lines.append("  voxel spacing (mm): " + (", ".join(f"{k} x{v}" for k, v in self.spacings.items()) or "none"))
        lines.append(f"  problems: {len(self.problems)}")
        lines += [f"    - {p}" for p in self.problems]
        return "\n".join(lines)


def check_site(site_dir: Path | str, *, class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES, spatial_dims: int = 2,
               image_size: int = 64) -> SiteReport:
    """What `fedsynth site check` prints: never raises on bad files, reports them."""
    report = SiteReport(str(site_dir), class_counts={c: 0 for c in class_names})
    try:
        data = load_site(site_dir, class_names=class_names, spatial_dims=spatial_dims, image_size=image_size)
    except SiteError as err:
        report.problems = [str(err)]
        return report
    train, holdout = split_site(data)
    report.usable_subjects = len(data)
    report.train_subjects, report.holdout_subjects = len(train), len(holdout)
    for y in data.labels:
        report.class_counts[class_names[int(y)]] += 1
    for sid in data.subject_ids:
        shape = "x".join(map(str, data.shapes.get(sid, ())))
        spacing = "x".join(f"{s:g}" for s in data.spacings.get(sid, ()))
        report.shapes[shape] = report.shapes.get(shape, 0) + 1
        report.spacings[spacing] = report.spacings.get(spacing, 0) + 1
    report.problems = [str(p) for p in data.problems]
    return report
