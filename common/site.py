"""One site's data: a folder of NIfTI files and/or DICOM series plus labels.csv, validated and normalised.

Convention: images sit in `DIR/images/` if it exists, else in `DIR/` (not recursive; `labels.csv`, `site.json`,
hidden entries and `masks/` are skipped). A NIfTI file's subject id is its name without `.nii`/`.nii.gz`; a single
`.dcm` file's is its stem; a sub-folder of DICOM files is one series named by the folder. `labels.csv` has
`subject_id,class[,patient_id][,site]`. Each scan (subject id) gives exactly ONE record (the middle axial slice for a
2D model, the volume for a 3D one). The privacy unit is the PATIENT: `patient_id` groups several scans of one
person (without the column, every scan is its own patient); DP-SGD samples patients and the audit split keeps all of
a patient's scans on one side.

Bad input never stops the site while something is usable: every problem is a `SiteProblem` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_CLASS_NAMES = ("healthy", "lesion")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PATIENT_COLUMN = "patient_id"
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
    patient_ids: list[str] = field(default_factory=list)  # per record; default: the subject id

    def __post_init__(self) -> None:
        if not self.patient_ids:
            self.patient_ids = list(self.subject_ids)
        if len(self.patient_ids) != len(self.subject_ids):
            raise ValueError("SiteData: one patient id per record")

    def __len__(self) -> int:
        return len(self.subject_ids)

    @property
    def patients(self) -> list[str]:
        """The distinct patients, sorted: the privacy units."""
        return sorted(set(self.patient_ids))

    def records_by_patient(self) -> list[list[int]]:
        """Record indices of each patient, in the order of `patients`."""
        index = {p: i for i, p in enumerate(self.patients)}
        groups: list[list[int]] = [[] for _ in index]
        for r, p in enumerate(self.patient_ids):
            groups[index[p]].append(r)
        return groups

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
            patient_ids=[self.patient_ids[i] for i in idx],
        )

    def with_patients(self, patients: set[str]) -> SiteData:
        """The records of `patients` only."""
        return self.subset([i for i, p in enumerate(self.patient_ids) if p in patients])


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
    site_dir: Path,
    class_names: tuple[str, ...],
    problems: list[SiteProblem],
    patients: dict[str, str] | None = None,
) -> tuple[dict[str, int], set[str]]:
    """(subject id -> class index, ids whose rows were rejected, each with a problem).

    If `patients` is given it is filled with subject id -> patient id: the `patient_id` column where labels.csv has
    one (an empty cell rejects the row: a scan of unknown patient cannot be counted), else the subject id.
    A missing or malformed labels.csv makes the site unusable (SiteError)."""
    path = site_dir / "labels.csv"
    if not path.is_file():
        raise SiteError(
            f"{path}: missing; a site needs labels.csv with header subject_id,class[,patient_id][,site]"
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
    has_patients = PATIENT_COLUMN in header
    for line, row in enumerate(rows, start=2):
        sid, cls = (row.get("subject_id") or "").strip(), (row.get("class") or "").strip()
        if not sid:
            problems.append(SiteProblem(f"{path}:{line}", "empty subject_id; row ignored"))
            continue
        seen[sid] = seen.get(sid, 0) + 1
        pid = (row.get(PATIENT_COLUMN) or "").strip() if has_patients else sid
        if not pid:
            problems.append(
                SiteProblem(
                    f"{path}:{line}",
                    f"empty patient_id for {sid!r}; row ignored (fill it in: a scan of an unknown patient "
                    "cannot be counted against anyone's privacy budget)",
                )
            )
            rejected.add(sid)
            continue
        if patients is not None:
            patients[sid] = pid
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


def load_lesion_masks(
    site_dir: Path | str, subject_ids: Sequence[str], *, spatial_dims: int, image_size: int
) -> tuple[list[np.ndarray | None], list[SiteProblem]]:
    """Lesion masks aligned with `load_image`'s records (same orientation, slice and size; nearest-neighbour
    resizing), as bool arrays (1, *[image_size]*spatial_dims), or None for a subject without a readable mask.

    Masks sit in `DIR/masks/<subject_id>.nii[.gz]`. A voxel is lesion when it equals `tissue_labels.lesion` of
    `DIR/site.json` (the phantoms' tissue label maps), else when it is non-zero (a binary lesion mask)."""
    import json

    import torch
    from monai.transforms import EnsureChannelFirst, Orientation, Resize

    site_dir = Path(site_dir)
    problems: list[SiteProblem] = []
    lesion_label = None
    try:
        meta = json.loads((site_dir / "site.json").read_text(encoding="utf-8"))
        lesion_label = (meta.get("tissue_labels") or {}).get("lesion")
    except (OSError, ValueError, AttributeError):
        pass  # no site.json (or not one of ours): masks are binary
    out: list[np.ndarray | None] = []
    for sid in subject_ids:
        path = next(
            (
                site_dir / "masks" / f"{sid}{s}"
                for s in NIFTI_SUFFIXES
                if (site_dir / "masks" / f"{sid}{s}").is_file()
            ),
            None,
        )
        if path is None:
            out.append(None)
            continue
        try:
            img = EnsureChannelFirst()(_read(path))
            ras = Orientation(
                axcodes="RAS"[: img.ndim - 1], labels=(("L", "R"), ("P", "A"), ("I", "S"))
            )
            arr = ras(img.float())
            if spatial_dims == 2 and arr.ndim == 4:
                arr = arr[..., arr.shape[-1] // 2]
            lesion = (arr == lesion_label) if lesion_label is not None else (arr != 0)
            arr = Resize((image_size,) * spatial_dims, mode="nearest")(
                torch.as_tensor(lesion).float()
            )
            out.append(np.asarray(arr) > 0.5)
        except Exception as err:  # an unreadable mask: that subject's lesion is not compared, named
            problems.append(SiteProblem(str(path), f"lesion mask not used ({_reason(err)})"))
            out.append(None)
    return out, problems


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
    patient_of: dict[str, str] = {}
    labels, rejected = read_labels(site_dir, class_names, problems, patient_of)
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
        patient_ids=[patient_of.get(sid, sid) for sid in ids],
    )


HOLDOUT_SALT = "fedsynth-audit-holdout"
MIN_PER_SIDE = 2  # training and hold-out patients the audit needs at least (client/audit.py)


def _unit_hash(salt: str, sid: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{sid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_holdout(
    data: SiteData,
    holdout_fraction: float = 0.25,
    known: Mapping[str, str] | None = None,
    salt: str = HOLDOUT_SALT,
) -> dict[str, str]:
    """patient id -> "train" | "holdout" for every patient in `data`, by patient (all of a patient's scans go
    to one side).

    A patient in `known` (the sides persisted in the site's privacy ledger) keeps that side, whatever the fraction
    is now. A new patient is held out when hash(salt, patient id) < holdout_fraction, so adding a patient moves
    nobody else. Per class (of a patient's first scan) with two or more patients, if one side would be empty, the
    NEW patient nearest the threshold is moved so both sides have one; and a site of 2 x MIN_PER_SIDE patients or
    more gets at least MIN_PER_SIDE on each side (what the audit needs) the same way. Known patients never move.
    The fraction is therefore approximate.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be between 0 and 1, got {holdout_fraction}")
    known = dict(known or {})
    cls: dict[str, int] = {}
    for pid, y in zip(data.patient_ids, data.labels, strict=True):
        cls.setdefault(pid, int(y))
    u = {p: _unit_hash(salt, p) for p in cls}
    side = {
        p: known.get(p) or ("holdout" if u[p] < holdout_fraction else "train") for p in sorted(cls)
    }
    for c in sorted(set(cls.values())):
        members = [p for p in side if cls[p] == c]
        movable = [p for p in members if p not in known]
        if len(members) < 2 or not movable:
            continue
        if all(side[p] == "train" for p in members):
            side[min(movable, key=u.get)] = "holdout"
        elif all(side[p] == "holdout" for p in members):
            side[max(movable, key=u.get)] = "train"

    # the audit needs MIN_PER_SIDE patients on each side: a small site the hash left short gets the NEW patients
    # nearest the threshold moved (so a 20-patient site cannot end with one hold-out patient and no audit), never
    # the last patient of its class on the side it leaves (the per-class rule above stays kept)
    def movable(side_now: str) -> list[str]:
        left = Counter(cls[p] for p in side if side[p] == side_now)
        return [p for p in side if side[p] == side_now and p not in known and left[cls[p]] > 1]

    for short, other, nearest in (("holdout", "train", min), ("train", "holdout", max)):
        while (
            len(side) >= 2 * MIN_PER_SIDE
            and sum(s == short for s in side.values()) < MIN_PER_SIDE
            and (candidates := movable(other))
        ):
            side[nearest(candidates, key=u.get)] = short
    return side


def split_by_assignment(data: SiteData, side: Mapping[str, str]) -> tuple[SiteData, SiteData]:
    """(train, hold-out) records of `data` by each record's patient's side."""
    train = [i for i, p in enumerate(data.patient_ids) if side[p] == "train"]
    held = [i for i, p in enumerate(data.patient_ids) if side[p] == "holdout"]
    return data.subset(train), data.subset(held)


def split_site(
    data: SiteData, holdout_fraction: float = 0.25, salt: str = HOLDOUT_SALT
) -> tuple[SiteData, SiteData]:
    """(train, audit hold-out) by patient, for a site with no persisted assignment (see `assign_holdout`).

    Training uses the assignment persisted in the site's privacy ledger (client/task.py), so that a patient once
    trained on is never a non-member later, whatever the hold-out fraction becomes.
    """
    return split_by_assignment(data, assign_holdout(data, holdout_fraction, salt=salt))


# ---- the report `fedsynth site check` prints -------------------------------------------------------------------


@dataclass
class SiteReport:
    site_dir: str
    images_found: int = 0
    labelled_subjects: int = 0
    usable_subjects: int = 0  # scans
    usable_patients: int = 0  # privacy units
    patient_ids_from: str = ""  # where the patient of each scan comes from
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
                f"  patients (the privacy unit): {self.usable_patients}; patient ids from "
                f"{self.patient_ids_from or 'unknown'}",
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
        with open(site_dir / "labels.csv", newline="", encoding="utf-8-sig") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
        report.patient_ids_from = (
            "the patient_id column of labels.csv (scans of one patient are one privacy unit)"
            if PATIENT_COLUMN in header
            else "subject_id (labels.csv has no patient_id column: each scan counts as its own patient; "
            "add the column if a patient has several scans)"
        )
    except (OSError, SiteError, UnicodeDecodeError, csv.Error):
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
    report.usable_patients = len(data.patients)
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
