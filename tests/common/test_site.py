"""common.site: loading, validating, normalising and splitting one hospital's folder of NIfTI/DICOM + labels.csv.

Fixtures are written at run time: small NIfTI volumes with nibabel, DICOM slices and series with pydicom, plus
the valid and broken example files that nibabel and pydicom ship in their test data folders.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from common.site import (
    DEFAULT_CLASS_NAMES,
    HOLDOUT_SALT,
    MIN_PER_SIDE,
    SiteData,
    SiteError,
    SiteProblem,
    _unit_hash,
    assign_holdout,
    check_site,
    load_site,
    split_site,
)

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
DCM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
SIZE = 16


# ---- fixture writers ---------------------------------------------------------------------------------------


def shipped(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        pytest.skip(f"{path} is not on disk")
    return path


def volume(shape=(10, 12, 9), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 1000).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def write_labels(
    site: Path, rows: list[tuple[str, str]], header: str = "subject_id,class,site"
) -> Path:
    lines = [header] + [
        f"{sid},{cls},{site.name}" if header.endswith("site") else f"{sid},{cls}"
        for sid, cls in rows
    ]
    (site / "labels.csv").write_text("\n".join(lines) + "\n")
    return site / "labels.csv"


def write_dicom_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    z: float,
    instance: int,
    series_uid: str,
    spacing=(0.5, 0.7),
    thickness: float = 2.0,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "MR", "anon"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(z)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(folder: Path, slices: np.ndarray, thickness: float = 2.0) -> Path:
    """slices: (n, rows, cols). File names are deliberately not in slice order: InstanceNumber must decide."""
    folder.mkdir(parents=True)
    uid = generate_uid()
    order = list(range(len(slices)))[::-1]
    for file_no, k in enumerate(order):
        write_dicom_slice(
            folder / f"IM{file_no:04d}.dcm",
            slices[k],
            z=k * thickness,
            instance=k + 1,
            series_uid=uid,
            thickness=thickness,
        )
    return folder


def problems_for(data_or_problems, name: str) -> list[SiteProblem]:
    problems = (
        data_or_problems.problems if hasattr(data_or_problems, "problems") else data_or_problems
    )
    return [p for p in problems if name in p.path]


# ---- a valid site -------------------------------------------------------------------------------------------


def test_valid_mixed_site_loads_one_normalised_record_per_patient(tmp_path):
    site = tmp_path / "hospital_a"
    images = site / "images"
    images.mkdir(parents=True)
    write_nifti(images / "p01.nii.gz", volume(seed=1))
    write_nifti(images / "p02.nii", volume((12, 10, 7), seed=2))
    write_nifti(images / "p03.nii.gz", volume((20, 14), seed=3))  # a 2-D image is used as is
    write_nifti(images / "p04.nii.gz", volume((9, 11, 1), seed=4))  # a single-slice volume too
    write_nifti(images / "p05.nii.gz", volume((8, 8, 6, 1), seed=5))  # 4-D with one volume is fine
    shutil.copy(shipped(NIB_DATA, "anatomical.nii"), images / "p06.nii")
    shutil.copy(shipped(DCM_DATA, "CT_small.dcm"), images / "p07.dcm")
    write_dicom_series(images / "p08", (volume((4, 10, 12), seed=8)).astype(np.uint16))
    (site / "site.json").write_text("{}")
    (images / ".DS_Store").write_bytes(b"\0\1junk")
    (images / "masks").mkdir()
    write_nifti(images / "masks" / "p01.nii.gz", volume(seed=9))
    classes = {
        "p01": "healthy",
        "p02": "lesion",
        "p03": "healthy",
        "p04": "lesion",
        "p05": "healthy",
        "p06": "lesion",
        "p07": "healthy",
        "p08": "lesion",
    }
    write_labels(site, sorted(classes.items()))
    calls = []
    data = load_site(
        site, spatial_dims=2, image_size=SIZE, progress=lambda i, n: calls.append((i, n))
    )

    assert data.problems == []
    assert data.subject_ids == sorted(classes)
    assert len(data) == 8
    assert data.images.shape == (8, 1, SIZE, SIZE) and data.images.dtype == np.float32
    assert data.labels.dtype == np.int64
    assert [DEFAULT_CLASS_NAMES[y] for y in data.labels] == [classes[s] for s in data.subject_ids]
    assert data.images.min() >= 0.0 and data.images.max() <= 1.0
    per_image = data.images.reshape(8, -1)
    assert np.allclose(per_image.min(axis=1), 0.0) and np.allclose(per_image.max(axis=1), 1.0)
    assert calls[-1] == (8, 8) and len(calls) == 8
    assert data.shapes["p01"] == (10, 12, 9) and data.shapes["p07"] == (128, 128)
    assert data.shapes["p08"] in {(10, 12, 4), (12, 10, 4)}
    assert data.spacings["p06"] == (2.0, 2.0, 2.0)
    assert data.spacings["p08"][-1] == pytest.approx(2.0)
    assert sorted(data.spacings["p08"][:2]) == pytest.approx([0.5, 0.7])


def test_middle_axial_slice_after_ras_orientation(tmp_path):
    """The record is the middle slice along the superior axis, whatever the stored axis order or flips."""
    site = tmp_path / "s"
    site.mkdir()
    x, y, z = 8, 10, 7
    ras = np.zeros((x, y, z), np.float32)
    ras[:, :, :] = np.arange(y)[None, :, None]  # every slice: a ramp along A
    ras[:, :, z // 2] = np.arange(x)[:, None] * 10  # the middle axial slice: a ramp along R instead
    write_nifti(site / "ras.nii.gz", ras)
    # The same anatomy stored as (S, R, A) with a permuting affine, and stored left-right flipped (LAS).
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    write_nifti(site / "sra.nii.gz", ras.transpose(2, 0, 1), perm)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = x - 1
    write_nifti(site / "las.nii.gz", ras[::-1].copy(), flip)
    write_labels(site, [("ras", "healthy"), ("sra", "healthy"), ("las", "lesion")])
    data = load_site(site, image_size=SIZE)
    rec = {s: data.images[i, 0] for i, s in enumerate(data.subject_ids)}
    # the ramp runs along axis 0 (R), constant along axis 1: this is the middle slice, not a neighbour
    assert rec["ras"][-1].mean() > rec["ras"][0].mean() + 0.5
    assert np.allclose(rec["ras"].std(axis=1), 0.0, atol=1e-5)
    assert np.allclose(rec["sra"], rec["ras"], atol=1e-5)
    assert np.allclose(rec["las"], rec["ras"], atol=1e-5)


def test_dicom_series_is_one_record_from_its_middle_slice(tmp_path):
    site = tmp_path / "s"
    images = site / "images"
    images.mkdir(parents=True)
    rows, cols, n = 10, 12, 5
    slices = np.zeros((n, rows, cols), np.uint16)
    for k in range(n):
        slices[k] = np.arange(cols)[None, :] * 20 + 5  # a ramp along columns...
    slices[n // 2] = (
        np.arange(rows)[:, None] * 30 + 5
    )  # ...except the middle slice, a ramp along rows
    write_dicom_series(images / "series_a", slices)
    write_dicom_slice(
        images / "mid.dcm", slices[n // 2], z=0.0, instance=1, series_uid=generate_uid()
    )
    write_labels(site, [("series_a", "lesion"), ("mid", "healthy")])
    data = load_site(site, image_size=SIZE)
    assert data.problems == []
    assert data.images.shape == (2, 1, SIZE, SIZE)
    series, single = (
        data.images[data.subject_ids.index("series_a"), 0],
        data.images[data.subject_ids.index("mid"), 0],
    )
    assert np.allclose(series, single, atol=1e-5)  # the series' record is exactly its middle slice
    assert len(data.shapes["series_a"]) == 3 and data.shapes["series_a"][-1] == n
    assert data.labels[data.subject_ids.index("series_a")] == 1


def test_spatial_dims_3_resizes_volumes_and_rejects_2d(tmp_path):
    site = tmp_path / "s"
    site.mkdir()
    write_nifti(site / "vol.nii.gz", volume((10, 12, 9)))
    write_nifti(site / "flat.nii.gz", volume((10, 12)))
    write_dicom_series(site / "ser", volume((4, 6, 8), seed=3).astype(np.uint16))
    write_labels(site, [("vol", "healthy"), ("flat", "lesion"), ("ser", "lesion")])
    data = load_site(site, spatial_dims=3, image_size=8)
    assert data.subject_ids == ["ser", "vol"]
    assert data.images.shape == (2, 1, 8, 8, 8) and data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    [flat] = problems_for(data, "flat.nii.gz")
    assert "3-D model needs a volume" in flat.problem


def test_custom_class_names_and_root_folder_convention(tmp_path):
    site = tmp_path / "s"
    site.mkdir()  # no images/ folder: images sit in the site folder itself
    for i, sid in enumerate(["a", "b", "c"]):
        write_nifti(site / f"{sid}.nii.gz", volume(seed=i))
    write_labels(
        site, [("a", "glioma"), ("b", "normal"), ("c", "meningioma")], header="subject_id,class"
    )
    data = load_site(site, class_names=("normal", "glioma", "meningioma"), image_size=8)
    assert dict(zip(data.subject_ids, data.labels.tolist(), strict=False)) == {
        "a": 1,
        "b": 0,
        "c": 2,
    }
    assert data.class_names == ("normal", "glioma", "meningioma")


def test_images_folder_wins_over_files_in_site_root(tmp_path):
    site = tmp_path / "s"
    (site / "images").mkdir(parents=True)
    write_nifti(site / "images" / "in.nii.gz", volume())
    write_nifti(site / "stray.nii.gz", volume())
    write_labels(site, [("in", "healthy")])
    data = load_site(site, image_size=8)
    assert data.subject_ids == ["in"] and data.problems == []


# ---- bad input ----------------------------------------------------------------------------------------------


def test_every_bad_input_is_a_problem_naming_the_file_and_the_rest_load(tmp_path):
    site = tmp_path / "messy"
    im = site / "images"
    im.mkdir(parents=True)
    good = ["good1", "good2", "good3"]
    for i, sid in enumerate(good):
        write_nifti(im / f"{sid}.nii.gz", volume(seed=i))
    big = im / "big.nii.gz"
    write_nifti(big, volume((30, 30, 30), seed=7))
    raw = big.read_bytes()
    big.unlink()
    (im / "trunc_gz.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])  # the gzip stream ends early
    (im / "garbage_gz.nii.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    full = gzip.decompress(raw)
    (im / "trunc.nii").write_bytes(full[: len(full) // 2])
    (im / "text.nii").write_text("this is not a NIfTI file\n" * 20)
    (im / "notes.txt").write_text("scanner was recalibrated on monday\n")
    (im / "empty.nii.gz").write_bytes(b"")
    nan = volume(seed=11)
    nan[3, 4, 5] = np.nan
    write_nifti(im / "nan.nii.gz", nan)
    inf = volume(seed=12)
    inf[1, 1, 1] = np.inf
    write_nifti(im / "inf.nii.gz", inf)
    write_nifti(im / "fourd.nii.gz", volume((6, 6, 6, 3)))
    write_nifti(im / "oned.nii.gz", volume((40,)))
    write_nifti(im / "const.nii.gz", np.full((8, 8, 8), 7.0, np.float32))
    write_nifti(im / "unlabelled.nii.gz", volume(seed=13))
    write_nifti(im / "oddclass.nii.gz", volume(seed=14))
    write_nifti(im / "dup.nii.gz", volume(seed=15))
    write_nifti(im / "twin.nii.gz", volume(seed=16))
    write_nifti(im / "twin.nii", volume(seed=17))
    shutil.copy(shipped(DCM_DATA, "MR_truncated.dcm"), im / "dcm_trunc.dcm")
    shutil.copy(shipped(DCM_DATA, "rtplan.dcm"), im / "no_pixels.dcm")
    (im / "fake.dcm").write_text("not dicom at all")
    (im / "junkseries").mkdir()
    (im / "junkseries" / "readme.txt").write_text("no dicom here")
    (im / "emptyseries").mkdir()
    shutil.copy(shipped(NIB_DATA, "example4d.nii.gz"), im / "shipped4d.nii.gz")
    labelled = good + [
        "trunc_gz",
        "garbage_gz",
        "trunc",
        "text",
        "empty",
        "nan",
        "inf",
        "fourd",
        "oned",
        "const",
        "dup",
        "twin",
        "dcm_trunc",
        "no_pixels",
        "fake",
        "junkseries",
        "shipped4d",
        "ghost",
    ]
    rows = [(s, "healthy" if i % 2 else "lesion") for i, s in enumerate(labelled)]
    rows += [("dup", "lesion"), ("oddclass", "tumour")]
    write_labels(site, rows)

    data = load_site(site, image_size=8)
    assert data.subject_ids == good
    assert data.images.shape == (3, 1, 8, 8)
    expected = {
        "trunc_gz.nii.gz": "unreadable NIfTI",
        "garbage_gz.nii.gz": "unreadable NIfTI",
        "trunc.nii": "unreadable NIfTI",
        "text.nii": "unreadable NIfTI",
        "notes.txt": "not an image file",
        "empty.nii.gz": "empty file",
        "nan.nii.gz": "NaN/inf",
        "inf.nii.gz": "NaN/inf",
        "fourd.nii.gz": "3 channels/volumes",
        "shipped4d.nii.gz": "2 channels/volumes",
        "oned.nii.gz": "1-D image",
        "const.nii.gz": "constant",
        "unlabelled.nii.gz": "no row in labels.csv",
        "dcm_trunc.dcm": "unreadable DICOM",
        "no_pixels.dcm": "unreadable DICOM",
        "fake.dcm": "unreadable DICOM",
        "junkseries": "no DICOM files",
        "emptyseries": "empty folder",
        "twin.nii": "several images for subject 'twin'",
    }
    for name, what in expected.items():
        found = [p for p in problems_for(data, name) if what in p.problem]
        assert found, f"no problem {what!r} for {name}; got:\n" + "\n".join(map(str, data.problems))
        assert name in str(found[0]) and str(found[0]).startswith(found[0].path + ": ")
    labels_problems = [str(p) for p in problems_for(data, "labels.csv")]
    assert any("'ghost' has a label but no image" in p for p in labels_problems)
    assert any("'dup' listed 2 times" in p for p in labels_problems)
    assert any("unknown class 'tumour'" in p and "oddclass" in p for p in labels_problems)
    assert any(
        "oddclass" in p.path and "labels.csv row was rejected" in p.problem for p in data.problems
    )
    assert any(
        "dup.nii.gz" in p.path and "labels.csv row was rejected" in p.problem for p in data.problems
    )
    assert not any(
        "'twin' has a label but no image" in p for p in labels_problems
    )  # it has two: reported once
    assert not any(".DS_Store" in p.path for p in data.problems)


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "missing"),
        ("subject_id,diagnosis\np1,healthy\n", "header must contain subject_id and class"),
        ("subject_id,class\n", "no rows"),
        (b"\xff\xfe\x00\x00\x80\x81garbage", "not a readable CSV"),
    ],
)
def test_missing_or_malformed_labels_make_the_site_unusable(tmp_path, content, why):
    site = tmp_path / "s"
    site.mkdir()
    write_nifti(site / "p1.nii.gz", volume())
    if isinstance(content, bytes):
        (site / "labels.csv").write_bytes(content)
    elif content is not None:
        (site / "labels.csv").write_text(content)
    with pytest.raises(SiteError, match=why) as err:
        load_site(site, image_size=8)
    assert "labels.csv" in str(err.value)
    report = check_site(site, image_size=8)  # never raises
    assert report.usable_subjects == 0 and report.images_found == 1
    assert any("labels.csv" in p and why in p for p in report.problems)


def test_site_with_nothing_usable_raises_listing_every_problem(tmp_path):
    site = tmp_path / "s"
    site.mkdir()
    (site / "a.nii.gz").write_bytes(b"broken")
    write_nifti(site / "b.nii.gz", np.zeros((6, 6, 6), np.float32))
    shutil.copy(shipped(DCM_DATA, "MR_truncated.dcm"), site / "c.dcm")
    write_labels(site, [("a", "healthy"), ("b", "lesion"), ("c", "healthy")])
    with pytest.raises(SiteError, match="no usable subjects") as err:
        load_site(site, image_size=8)
    message = str(err.value)
    for name in ("a.nii.gz", "b.nii.gz", "c.dcm"):
        assert name in message
    assert len(err.value.problems) == 3
    with pytest.raises(SiteError, match="not a folder"):
        load_site(tmp_path / "nowhere")


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="spatial_dims"):
        load_site(tmp_path, spatial_dims=4)


# ---- the split ----------------------------------------------------------------------------------------------


def fake_site(ids: list[str], labels: list[int], class_names=DEFAULT_CLASS_NAMES) -> SiteData:
    images = np.stack([np.full((1, 2, 2), i, np.float32) for i in range(len(ids))])
    return SiteData(list(ids), images, np.asarray(labels, np.int64), tuple(class_names), [])


def test_split_is_deterministic_disjoint_complete_and_aligned():
    ids = [f"pt{i:03d}" for i in range(200)]
    data = fake_site(ids, [i % 2 for i in range(200)])
    train, hold = split_site(data)
    train2, hold2 = split_site(
        fake_site(ids[::-1], [i % 2 for i in range(200)][::-1])
    )  # input order is irrelevant
    assert set(hold.subject_ids) == set(hold2.subject_ids) and set(train.subject_ids) == set(
        train2.subject_ids
    )
    assert not set(train.subject_ids) & set(hold.subject_ids)
    assert sorted(train.subject_ids + hold.subject_ids) == ids
    assert 0.15 < len(hold) / len(data) < 0.35
    for part in (train, hold):  # images and labels still belong to their subject
        for sid, img, y in zip(part.subject_ids, part.images, part.labels, strict=False):
            i = ids.index(sid)
            assert img[0, 0, 0] == i and y == i % 2
    other = split_site(data, salt="another-federation")[1]
    assert set(other.subject_ids) != set(hold.subject_ids)
    assert len(split_site(data, holdout_fraction=0.5)[1]) > len(hold)


def test_split_is_stable_when_a_subject_is_added():
    ids = [f"s{i}" for i in range(80)]
    labels = [i % 2 for i in range(80)]
    _, hold = split_site(fake_site(ids, labels))
    for extra in ("new-a", "new-b", "new-c"):
        _, hold_more = split_site(fake_site(ids + [extra], labels + [1]))
        assert set(hold_more.subject_ids) - {extra} == set(hold.subject_ids)


def test_a_small_site_gets_two_patients_on_each_side_for_its_audit():
    # the 3-D demo's lesion-free site: 20 patients of one class, the hash holds out just one at 0.25
    ids = [f"site2-sub{i:04d}" for i in range(20)]
    hashed = sum(_unit_hash(HOLDOUT_SALT, p) < 0.25 for p in ids)
    assert hashed == 1  # what the hash alone gives: no audit possible
    side = assign_holdout(fake_site(ids, [0] * 20), 0.25)
    assert sum(s == "holdout" for s in side.values()) == MIN_PER_SIDE
    # the patient moved is the one nearest the threshold; nobody else moves
    moved = {p for p in ids if side[p] == "holdout" and _unit_hash(HOLDOUT_SALT, p) >= 0.25}
    assert moved == {
        min(
            (p for p in ids if _unit_hash(HOLDOUT_SALT, p) >= 0.25),
            key=lambda p: _unit_hash(HOLDOUT_SALT, p),
        )
    }
    # patients already in the ledger keep their side, even if that leaves the site short
    known = {p: "train" for p in ids}
    assert set(assign_holdout(fake_site(ids, [0] * 20), 0.25, known=known).values()) == {"train"}
    # and the other way round: a fraction that holds out nearly everyone still leaves two to train on
    side = assign_holdout(fake_site(ids, [0] * 20), 0.99)
    assert sum(s == "train" for s in side.values()) == MIN_PER_SIDE
    # too small a site for both: as the hash says (and the audit says why it cannot run)
    assert len(assign_holdout(fake_site(ids[:3], [0] * 3), 0.25)) == 3
    # a move never takes the only training patient of its class: "les-3" is the one lesion patient and the new
    # patient nearest the threshold (hash 0.288, the nearest healthy one 0.302); the healthy one moves instead
    side = assign_holdout(fake_site(ids + ["les-3"], [0] * 20 + [1]), 0.25)
    assert side["les-3"] == "train"
    assert sum(s == "holdout" for s in side.values()) == MIN_PER_SIDE


def test_split_stratifies_small_classes():
    # many tiny classes: whatever the hash says, a class with >= 2 patients has one on each side
    names = tuple(f"c{k}" for k in range(30))
    ids, labels = [], []
    for k in range(30):
        for j in range(2 + k % 3):
            ids.append(f"c{k}-p{j}")
            labels.append(k)
    ids.append("lonely")
    labels.append(0)
    names_single = names + ("rare",)
    ids.append("only-rare")
    labels.append(30)
    data = fake_site(ids, labels, names_single)
    train, hold = split_site(data)
    for k in range(30):
        assert k in train.labels and k in hold.labels, f"class c{k} not on both sides"
    assert (30 in train.labels) != (30 in hold.labels)  # a single patient sits on exactly one side
    with pytest.raises(ValueError):
        split_site(data, holdout_fraction=1.0)


def test_scans_of_one_patient_never_straddle_the_split():
    ids = [f"scan{i:03d}" for i in range(300)]
    patients = [f"patient{i // 3:03d}" for i in range(300)]  # three scans each
    data = fake_site(ids, [(i // 3) % 2 for i in range(300)])
    data.patient_ids = patients
    train, hold = split_site(data)
    assert not set(train.patient_ids) & set(hold.patient_ids)
    assert len(train.patients) + len(hold.patients) == 100 and len(hold) % 3 == 0


def test_patient_id_column_groups_scans_and_site_check_says_where_ids_come_from(tmp_path):
    from common.phantoms import make_phantom_sites

    site = make_phantom_sites(tmp_path, n_sites=1, n_subjects=6, size=16, seed=1)[0]
    report = check_site(site, image_size=16)
    assert "subject_id (labels.csv has no patient_id column" in report.to_text()
    assert report.usable_patients == report.usable_subjects == 6
    rows = (site / "labels.csv").read_text().splitlines()
    out = [rows[0] + ",patient_id"]
    for i, row in enumerate(rows[1:]):
        out.append(row + ("," if i == 5 else f",P{i // 2}"))  # pairs of scans; the last cell empty
    (site / "labels.csv").write_text("\n".join(out) + "\n")
    data = load_site(site, image_size=16)
    assert data.patients == ["P0", "P1", "P2"] and len(data) == 5
    assert any("empty patient_id" in p.problem for p in data.problems)
    report = check_site(site, image_size=16)
    assert "the patient_id column of labels.csv" in report.to_text()
    assert "patients (the privacy unit): 3" in report.to_text()


# ---- the report -------------------------------------------------------------------------------------------


def test_check_site_reports_counts_shapes_spacings_and_problems(tmp_path):
    site = tmp_path / "clinic"
    site.mkdir()
    for i in range(6):
        write_nifti(
            site / f"h{i}.nii.gz", volume((10, 12, 9), seed=i), np.diag([1.0, 1.0, 2.5, 1.0])
        )
    for i in range(3):
        write_nifti(site / f"l{i}.nii.gz", volume((8, 8, 8), seed=10 + i))
    (site / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not really")
    (site / "notes.txt").write_text("hello")
    write_labels(
        site,
        [(f"h{i}", "healthy") for i in range(6)]
        + [(f"l{i}", "lesion") for i in range(3)]
        + [("broken", "lesion")],
    )
    report = check_site(site, image_size=8)
    assert report.images_found == 10 and report.labelled_subjects == 10
    assert report.usable_subjects == 9
    assert report.train_subjects + report.holdout_subjects == 9 and report.holdout_subjects >= 2
    assert report.class_counts == {"healthy": 6, "lesion": 3}
    assert all(v >= 1 for v in report.holdout_class_counts.values())
    assert report.shapes == {"10x12x9": 6, "8x8x8": 3}
    assert report.spacings == {"1x1x2.5": 6, "1x1x1": 3}
    text = report.to_text()
    assert "usable subjects: 9" in text and "healthy: 6" in text and "lesion: 3" in text
    assert "problems: 2" in text and "broken.nii.gz" in text and "notes.txt" in text
    assert json.loads(json.dumps(report.to_dict()))["usable_subjects"] == 9


def test_check_site_never_raises(tmp_path):
    report = check_site(tmp_path / "missing")
    assert report.usable_subjects == 0 and "not a folder" in report.to_text()
    site = tmp_path / "bad"
    site.mkdir()
    (site / "x.nii").write_text("nope")
    write_labels(site, [("x", "healthy")])
    report = check_site(site, image_size=8)
    assert report.usable_subjects == 0
    assert any("x.nii" in p for p in report.problems) and "no usable subjects" in report.to_text()
