"""One site's data: a folder of NIfTI files and/or DICOM series plus labels.csv, validated and normalised.

Convention: images sit in `DIR/images/` if it exists, else in `DIR/` (not recursive; `labels.csv`, `site.json`,
hidden entries and `masks/` are skipped). A NIfTI file's subject id is its name without `.nii`/`.nii.gz`; a single
`.dcm` file's is its stem; a sub-folder of DICOM files is one series named by the folder. `labels.csv` has
`subject_id,class[,site]`. Each patient gives exactly ONE record (the middle axial slice for a 2D model, the
volume for a 3D one) because privacy is counted per patient.

Bad input never stops the site while something is usable: every problem is a `SiteProblem` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_CLASS_NAMES = ("healthy", "lesion")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SKIP_NAMES = {"labels.csv", "site.json", "masks"}


@dataclass
class SiteProblem:
    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class SiteError(Exception):
    """The site has nothing usable; the message (and `.problems`) say why."""

    def __init__(self, message: str, problems: Sequence[SiteProblem] = ()):
        super().__init__(message)
        self.problems = list(problems)


@dataclass
class SiteData:
    subject_ids: list[str]
    images: np.ndarray  # float32 (N, 1, *spatial) in [0, 1]
    labels: np.ndarray  # int64 (N,) index into class_names
    class_names: tuple[str, ...]
    problems: list[SiteProblem] = field(default_factory=list)
    spacings: dict[str, tuple[float, ...]] = field(
        default_factory=dict
    )  # subject -> voxel spacing (mm), as read
    shapes: dict[str, tuple[int, ...]] = field(
        default_factory=dict
    )  # subject -> spatial shape, as read

    def __len__(self) -> int:
        return len(self.subject_ids)

    def subset(self, idx: Sequence[int]) -> SiteData:
        idx = [int(i) for i in idx]
        ids = [self.subject_ids[i] for i in idx]
        return SiteData(
            subject_ids=ids,
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=self.class_names,
            problems=list(self.problems),
            spacings={s: self.spacings[s] for s in ids if s in self.spacings},
            shapes={s: self.shapes[s] for s in ids if s in self.shapes},
        )


# ---- finding files and labels --------------------------------------------------------------------------------


def _subject_id(path: Path) -> str | None:
    name, lower = path.name, path.name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    if lower.endswith(".dcm"):
        return path.stem
    return None


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def find_images(site_dir: Path, problems: list[SiteProblem]) -> tuple[dict[str, Path], set[str]]:
    """(subject id -> image path (a file or a DICOM series folder), ids dropped as ambiguous, each with a problem)."""
    root = site_dir / "images" if (site_dir / "images").is_dir() else site_dir
    found: dict[str, list[Path]] = {}
    for path in sorted(root.iterdir()):
        if (
            path.name.startswith(".")
            or path.name in SKIP_NAMES
            or (root == site_dir and path.name == "images")
        ):
            continue
        if path.is_dir():
            if not any(p.is_file() and not p.name.startswith(".") for p in path.iterdir()):
                problems.append(
                    SiteProblem(str(path), "empty folder (expected a DICOM series); ignored")
                )
                continue
            found.setdefault(path.name, []).append(path)
            continue
        sid = _subject_id(path)
        if sid is None:
            problems.append(
                SiteProblem(
                    str(path),
                    "not an image file (expected .nii, .nii.gz, .dcm or a DICOM series folder); ignored",
                )
            )
            continue
        found.setdefault(sid, []).append(path)
    out: dict[str, Path] = {}
    ambiguous: set[str] = set()
    for sid, paths in found.items():
        if len(paths) > 1:
            problems.append(
                SiteProblem(
                    ", ".join(str(p) for p in paths),
                    f"several images for subject {sid!r}; all are ignored (ambiguous)",
                )
            )
            ambiguous.add(sid)
        else:
            out[sid] = paths[0]
    return out, ambiguous


def read_labels(
    site_dir: Path, class_names: tuple[str, ...], problems: list[SiteProblem]
) -> tuple[dict[str, int], set[str]]:
    """(subject id -> class index, ids whose rows were rejected, each with a problem).

    A missing or malformed labels.csv makes the site unusable (SiteError)."""
    path = site_dir / "labels.csv"
    if not path.is_file():
        raise SiteError(
            f"{path}: missing; a site needs labels.csv with header subject_id,class[,site]"
        )
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise SiteError(f"{path}: not a readable CSV ({err})") from err
    if not {"subject_id", "class"} <= set(header):
        raise SiteError(
            f"{path}: header must contain subject_id and class, got {','.join(header) or 'nothing'}"
        )
    if not rows:
        raise SiteError(f"{path}: no rows below the header")
    labels: dict[str, int] = {}
    seen: dict[str, int] = {}
    rejected: set[str] = set()
    for line, row in enumerate(rows, start=2):
        sid, cls = (row.get("subject_id") or "").strip(), (row.get("class") or "").strip()
        if not sid:
            problems.append(SiteProblem(f"{path}:{line}", "empty subject_id; row ignored"))
            continue
        seen[sid] = seen.get(sid, 0) + 1
        if cls not in class_names:
            problems.append(
                SiteProblem(
                    f"{path}:{line}",
                    f"unknown class {cls!r} for {sid!r} (known: {', '.join(class_names)}); row ignored",
                )
            )
            rejected.add(sid)
        else:
            labels[sid] = class_names.index(cls)
    for sid, n in seen.items():
        if n > 1:
            problems.append(
                SiteProblem(
                    str(path), f"subject {sid!r} listed {n} times; all rows ignored (ambiguous)"
                )
            )
            labels.pop(sid, None)
            rejected.add(sid)
    return {s: y for s, y in labels.items() if s not in rejected}, rejected


# ---- reading one image ---------------------------------------------------------------------------------------


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _read(path: Path):
    """MONAI LoadImage with the reader named, so the reader's own error surfaces (not 'no suitable reader')."""
    import pydicom.misc
    from monai.data import NibabelReader, PydicomReader
    from monai.transforms import LoadImage

    if path.is_file() and path.stat().st_size == 0:
        raise ValueError("empty file")
    if path.is_dir() and not any(pydicom.misc.is_dicom(p) for p in path.iterdir() if p.is_file()):
        raise ValueError("folder holds no DICOM files")
    reader = NibabelReader() if _is_nifti(path) else PydicomReader()
    kind = "NIfTI" if _is_nifti(path) else "DICOM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoadImage(image_only=True)(str(path), reader=reader)
    except (
        Exception
    ) as err:  # nibabel/pydicom/gzip raise many types; each means "this file is unusable"
        raise ValueError(f"unreadable {kind} ({_reason(err)})") from None


def load_image(
    path: Path, *, spatial_dims: int, image_size: int
) -> tuple[np.ndarray, tuple[float, ...], tuple[int, ...]]:
    """One record (1, *[image_size]*spatial_dims) float32 in [0, 1], plus the voxel spacing and shape as read.

    Raises ValueError with a readable reason for anything unusable.
    """
    import torch
    from monai.transforms import (
        EnsureChannelFirst,
        Orientation,
        Resize,
        ScaleIntensity,
        ScaleIntensityRangePercentiles,
    )

    img = _read(path)
    try:
        img = EnsureChannelFirst()(img)
    except Exception as err:
        raise ValueError(
            f"cannot find the channel axis (shape {tuple(img.shape)}; {_reason(err)})"
        ) from None
    shape = tuple(int(s) for s in img.shape[1:])
    if img.shape[0] != 1:
        raise ValueError(
            f"{img.shape[0]} channels/volumes (shape {tuple(img.shape)}); expected a single image"
        )
    if len(shape) not in (2, 3):
        raise ValueError(f"{len(shape)}-D image (shape {shape}); expected 2-D or 3-D")
    spacing = tuple(round(float(s), 4) for s in img.pixdim[: len(shape)])
    arr = torch.as_tensor(img).float()
    if not torch.isfinite(arr).all():
        raise ValueError(f"{int((~torch.isfinite(arr)).sum())} NaN/inf voxels")
    ras = Orientation(axcodes="RAS"[: len(shape)], labels=(("L", "R"), ("P", "A"), ("I", "S")))
    arr = ras(
        img.float()
    )  # the last axis is then inferior -> superior, so [..., k] are axial slices
    if spatial_dims == 2:
        if arr.ndim == 4:
            arr = arr[..., arr.shape[-1] // 2]  # the middle axial slice: one record per patient
    elif arr.ndim != 4 or min(arr.shape[1:]) < 2:
        raise ValueError(f"a 3-D model needs a volume, got shape {shape}")
    if float(arr.max() - arr.min()) <= 0:
        raise ValueError(
            "constant image (no dynamic range)"
            if arr.ndim == len(shape) + 1
            else "constant middle slice (no dynamic range)"
        )
    arr = Resize((image_size,) * spatial_dims, mode="area" if spatial_dims == 2 else "trilinear")(
        arr
    )
    lo, hi = np.percentile(np.asarray(arr), [0.5, 99.5])
    if hi > lo:
        arr = ScaleIntensityRangePercentiles(
            lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True
        )(arr)
    else:  # >99 % of voxels equal (a speck on a flat background): percentiles collapse, fall back to min-max
        arr = ScaleIntensity(minv=0.0, maxv=1.0)(arr)
    return np.asarray(arr, dtype=np.float32), spacing, shape


# ---- the site --------------------------------------------------------------------------------------------------


def load_site(
    site_dir: Path | str,
    *,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    spatial_dims: int = 2,
    image_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> SiteData:
    """Every usable (labelled, readable, valid) patient as one normalised record; the rest become problems."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    site_dir, class_names = Path(site_dir), tuple(class_names)
    if not site_dir.is_dir():
        raise SiteError(f"{site_dir}: not a folder")
    problems: list[SiteProblem] = []
    labels, rejected = read_labels(site_dir, class_names, problems)
    images, ambiguous = find_images(site_dir, problems)
    for sid in sorted(set(images) - set(labels)):
        why = (
            "its labels.csv row was rejected"
            if sid in rejected
            else f"no row in labels.csv for subject {sid!r}"
        )
        problems.append(SiteProblem(str(images[sid]), f"{why}; ignored"))
    for sid in sorted(set(labels) - set(images) - ambiguous):
        problems.append(
            SiteProblem(str(site_dir / "labels.csv"), f"subject {sid!r} has a label but no image")
        )
    ids, arrays, ys, spacings, shapes = [], [], [], {}, {}
    todo = sorted(set(images) & set(labels))
    for i, sid in enumerate(todo):
        try:
            arr, spacing, shape = load_image(
                images[sid], spatial_dims=spatial_dims, image_size=image_size
            )
        except ValueError as err:
            problems.append(SiteProblem(str(images[sid]), f"{err}; ignored"))
        except Exception as err:  # an odd file must not stop the site; name it and go on
            problems.append(
                SiteProblem(str(images[sid]), f"could not be processed ({_reason(err)}); ignored")
            )
        else:
            ids.append(sid)
            arrays.append(arr)
            ys.append(labels[sid])
            spacings[sid], shapes[sid] = spacing, shape
        if progress:
            progress(i + 1, len(todo))
    if not ids:
        listing = "\n  ".join(str(p) for p in problems) or "no images found"
        raise SiteError(f"{site_dir}: no usable subjects:\n  {listing}", problems)
    return SiteData(
        ids,
        np.stack(arrays),
        np.asarray(ys, dtype=np.int64),
        class_names,
        problems,
        spacings,
        shapes,
    )


def _unit_hash(salt: str, sid: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{sid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_site(
    data: SiteData, holdout_fraction: float = 0.25, salt: str = "fedsynth-audit-holdout"
) -> tuple[SiteData, SiteData]:
    """(train, audit hold-out) by patient.

    A patient is held out when hash(salt, subject id) < holdout_fraction, so the split never changes between runs
    and adding a patient moves nobody else. Per class with two or more patients, if the hash left one side empty,
    the patient nearest the threshold is moved so both sides have one. The fraction is therefore approximate.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    u = np.array([_unit_hash(salt, s) for s in data.subject_ids])
    held = u < holdout_fraction
    for c in np.unique(data.labels):
        members = np.flatnonzero(data.labels == c)
        if len(members) < 2:
            continue
        if not held[members].any():
            held[members[np.argmin(u[members])]] = True
        elif held[members].all():
            held[members[np.argmax(u[members])]] = False
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))


# ---- the report `fedsynth site check` prints -------------------------------------------------------------------


@dataclass
class SiteReport:
    site_dir: str
    images_found: int = 0
    labelled_subjects: int = 0
    usable_subjects: int = 0
    train_subjects: int = 0
    holdout_subjects: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)  # usable subjects per class
    holdout_class_counts: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)  # shape as read -> count
    spacings: dict[str, int] = field(default_factory=dict)  # voxel spacing (mm) -> count
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in self.__dict__.items()
        }

    def to_text(self) -> str:
        def counts(d: dict[str, int]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in d.items()) or "none"

        return "\n".join(
            [
                f"site {self.site_dir}",
                f"  images found: {self.images_found}, labelled subjects: {self.labelled_subjects}",
                f"  usable subjects: {self.usable_subjects} (train {self.train_subjects}, "
                f"audit hold-out {self.holdout_subjects})",
                f"  classes: {counts(self.class_counts)}",
                f"  hold-out classes: {counts(self.holdout_class_counts)}",
                f"  shapes: {counts(self.shapes)}",
                f"  voxel spacing (mm): {counts(self.spacings)}",
                f"  problems: {len(self.problems)}",
                *[f"    - {p}" for p in self.problems],
            ]
        )


def check_site(
    site_dir: Path | str,
    *,
    class_names: Sequence[str] = DEFAULT_CLASS_NAMES,
    spatial_dims: int = 2,
    image_size: int = 64,
) -> SiteReport:
    """Counts, shapes, spacings, class balance and problems of one site. Never raises on bad files."""
    site_dir, class_names = Path(site_dir), tuple(class_names)
    report = SiteReport(
        str(site_dir),
        class_counts={c: 0 for c in class_names},
        holdout_class_counts={c: 0 for c in class_names},
    )
    try:
        report.images_found = len(find_images(site_dir, [])[0])
        report.labelled_subjects = len(read_labels(site_dir, class_names, [])[0])
    except (OSError, SiteError):
        pass  # load_site below reports the same failure as a problem
    try:
        data = load_site(
            site_dir, class_names=class_names, spatial_dims=spatial_dims, image_size=image_size
        )
    except SiteError as err:
        report.problems = [str(p) for p in err.problems] or [str(err)]
        if err.problems:
            report.problems.append(f"{site_dir}: no usable subjects")
        return report
    except OSError as err:
        report.problems = [f"{site_dir}: cannot be read ({_reason(err)})"]
        return report
    train, holdout = split_site(data)
    report.usable_subjects, report.train_subjects, report.holdout_subjects = (
        len(data),
        len(train),
        len(holdout),
    )
    for y in data.labels:
        report.class_counts[class_names[int(y)]] += 1
    for y in holdout.labels:
        report.holdout_class_counts[class_names[int(y)]] += 1
    for sid in data.subject_ids:
        shape = "x".join(map(str, data.shapes.get(sid, ())))
        spacing = "x".join(f"{s:g}" for s in data.spacings.get(sid, ()))
        report.shapes[shape] = report.shapes.get(shape, 0) + 1
        report.spacings[spacing] = report.spacings.get(spacing, 0) + 1
    report.problems = [str(p) for p in data.problems]
    return report
