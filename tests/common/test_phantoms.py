"""Physics and file-format checks of the MRI phantom sites (common/phantoms.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common import phantoms
from common.io import sha256_file
from common.phantoms import (
    CLASS_NAMES,
    PROTOCOLS,
    TISSUES,
    Protocol,
    default_site_specs,
    make_phantom_sites,
    render_subject,
    signal,
    tissue_properties,
    weighting,
)


def _tissue_signals(protocol: Protocol) -> dict[str, float]:
    return {
        name: signal(protocol, *props)
        for name, props in tissue_properties(protocol.field_t).items()
    }


@pytest.mark.parametrize(
    "name", ["t1_se_1.5t", "t1_se_3t", "t1_se_1.5t_lowres", "t1_gre_3t", "t1_gre_1.5t"]
)
def test_t1_weighted_orders_white_grey_csf(name):
    s = _tissue_signals(PROTOCOLS[name])
    assert s["fat"] > s["white"] > s["grey"] > s["csf"] > 0
    assert weighting(PROTOCOLS[name]) == "T1"


@pytest.mark.parametrize("name", ["t2_se_1.5t", "t2_se_3t"])
def test_t2_weighted_spin_echo_orders_csf_grey_white(name):
    s = _tissue_signals(PROTOCOLS[name])
    assert s["csf"] > s["grey"] > s["white"]
    assert s["lesion"] > s["grey"]  # oedema is bright on T2
    assert weighting(PROTOCOLS[name]) == "T2"


@pytest.mark.parametrize("name", ["flair_1.5t", "flair_3t"])
def test_flair_nulls_csf_and_keeps_lesion_bright(name):
    s = _tissue_signals(PROTOCOLS[name])
    assert s["csf"] < min(s["white"], s["grey"], s["lesion"])
    assert s["csf"] < 0.1 * s["grey"]  # TI chosen near the CSF null point
    assert s["lesion"] > s["grey"] > s["white"]


def test_flair_is_magnitude_of_inversion_recovery():
    p = PROTOCOLS["flair_1.5t"]
    t1 = np.array([300.0, 3462.0, 4000.0, 8000.0])  # both sides of the null
    expected = np.abs(1 - 2 * np.exp(-p.ti_ms / t1) + np.exp(-p.tr_ms / t1)) * np.exp(
        -p.te_ms / 100.0
    )
    np.testing.assert_allclose(signal(p, t1, 100.0, 1.0), expected, rtol=1e-12)
    assert np.all(signal(p, t1, 100.0, 1.0) >= 0)


def test_gre_follows_ernst_equation():
    base = PROTOCOLS["t1_gre_3t"]
    t1 = np.linspace(200.0, 4000.0, 7)
    a = math.radians(base.flip_deg)
    e1 = np.exp(-base.tr_ms / t1)
    expected = 0.8 * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * np.exp(-base.te_ms / 60.0)
    np.testing.assert_allclose(signal(base, t1, 60.0, 0.8), expected, rtol=1e-12)
    # the signal over flip angles peaks at the Ernst angle arccos(exp(-TR/T1))
    flips = np.arange(1.0, 90.0, 0.25)
    curve = [signal(dataclasses.replace(base, flip_deg=f), 900.0, 60.0, 1.0) for f in flips]
    ernst = math.degrees(math.acos(math.exp(-base.tr_ms / 900.0)))
    assert abs(flips[int(np.argmax(curve))] - ernst) <= 0.25


def test_spin_echo_equation_and_vectorisation():
    p = PROTOCOLS["t1_se_1.5t"]
    assert signal(p, 650.0, 80.0, 0.7) == pytest.approx(
        0.7 * (1 - math.exp(-500 / 650)) * math.exp(-15 / 80)
    )
    out = signal(p, np.full((2, 3), 650.0), 80.0, 0.7)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    assert isinstance(signal(p, 650.0, 80.0, 0.7), float)


def test_three_tesla_raises_t1_not_t2():
    low, high = tissue_properties(1.5), tissue_properties(3.0)
    assert low["white"] == (650.0, 80.0, 0.70) and low["csf"][0] == 4000.0
    for name in ("white", "grey", "lesion"):
        assert 1.2 <= high[name][0] / low[name][0] <= 1.4
        assert 0.85 <= high[name][1] / low[name][1] <= 1.05
        assert high[name][2] == low[name][2]
    assert high["csf"][0] >= low["csf"][0]


def test_protocol_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="TI"):
        Protocol("x", "flair", 1.5, 9000.0, 120.0)
    with pytest.raises(ValueError, match="flip"):
        Protocol("x", "gre", 3.0, 25.0, 4.0)
    with pytest.raises(ValueError, match="sequence"):
        Protocol("x", "epi", 1.5, 500.0, 15.0)
    with pytest.raises(ValueError, match="TE"):
        Protocol("x", "se", 1.5, 10.0, 15.0)
    with pytest.raises(ValueError, match="dims"):
        render_subject(np.random.default_rng(0), PROTOCOLS["t1_se_1.5t"], dims=4)


def test_background_noise_is_rician():
    p = dataclasses.replace(PROTOCOLS["t1_se_1.5t"], noise_sigma=0.05)
    image, labels, _ = render_subject(np.random.default_rng(7), p, size=64)
    far = (
        ndimage.distance_transform_edt(labels[..., 0] == 0) > 4
    )  # air well away from the head (and skull)
    bg = image[..., 0][far].astype(np.float64)
    assert bg.size > 800
    # no signal: the magnitude of complex Gaussian noise is Rayleigh
    assert bg.mean() == pytest.approx(0.05 * math.sqrt(math.pi / 2), rel=0.06)
    assert np.mean(bg**2) == pytest.approx(2 * 0.05**2, rel=0.1)
    assert bg.min() >= 0


def test_partial_volume_and_bias_field():
    flat = dataclasses.replace(PROTOCOLS["t1_se_1.5t"], noise_sigma=0.0, bias_strength=0.0)
    image, labels, _ = render_subject(np.random.default_rng(3), flat, size=64)
    img, lab = image[..., 0], labels[..., 0]
    core_wm = ndimage.binary_erosion(lab == TISSUES["white"], iterations=3)
    assert core_wm.sum() > 50
    wm = np.median(img[core_wm])
    assert (
        np.isclose(img[core_wm], wm, rtol=1e-5).mean() > 0.8
    )  # pure white matter: one value, no noise/bias
    csf = np.median(img[lab == TISSUES["csf"]])
    between = (img > csf + 0.02) & (img < wm - 0.02) & (lab == TISSUES["white"])
    assert between.sum() > 5  # mixed voxels at tissue boundaries carry intermediate signal
    biased = dataclasses.replace(flat, bias_strength=0.3)
    image_b, _, _ = render_subject(np.random.default_rng(3), biased, size=64)
    p10, p50, p90 = np.percentile(image_b[..., 0][core_wm], [10, 50, 90])
    assert (p90 - p10) / p50 > 0.05  # the smooth bias field modulates a pure tissue


@pytest.mark.parametrize("site", default_site_specs(3), ids=lambda s: s.protocol.name)
def test_rendered_t1_tissue_means_order(site):
    for k in range(3):
        image, labels, _ = render_subject(
            np.random.default_rng(k), site.protocol, size=64, lesion=k == 1
        )
        mean = {
            name: image[labels == idx].mean() for name, idx in TISSUES.items() if name != "lesion"
        }
        assert mean["white"] > mean["grey"] > mean["csf"] > mean["background"]
        assert mean["fat"] > mean["white"]


def test_shapes_affine_and_lesion_labels():
    p = PROTOCOLS["t1_se_1.5t_lowres"]
    image, labels, affine = render_subject(np.random.default_rng(0), p, dims=2, size=32)
    assert image.shape == labels.shape == (32, 32, 1)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    np.testing.assert_allclose(np.diag(affine), [4.0, 4.0, p.slice_mm, 1.0])
    np.testing.assert_allclose(affine @ [15.5, 15.5, 0, 1], [0, 0, 0, 1], atol=1e-9)  # centred FOV
    image3, labels3, affine3 = render_subject(
        np.random.default_rng(0), p, dims=3, size=16, lesion=True
    )
    assert image3.shape == labels3.shape == (16, 16, 16)
    np.testing.assert_allclose(np.diag(affine3), [4.0, 4.0, 4.0, 1.0])
    assert (labels3 == TISSUES["lesion"]).any()
    for seed in range(12):
        for size in (16, 64):
            rng = np.random.default_rng(seed)
            _, lab, _ = render_subject(rng, PROTOCOLS["t1_gre_3t"], size=size, lesion=seed % 2 == 0)
            assert (lab == TISSUES["lesion"]).any() == (
                seed % 2 == 0
            )  # >= 2 voxels radius, so never lost
            if size == 64:
                assert set(range(5)) <= set(np.unique(lab).tolist())


def test_subjects_differ_in_anatomy():
    p = PROTOCOLS["t1_se_1.5t"]
    masks = [render_subject(np.random.default_rng(k), p, size=32)[1] for k in range(4)]
    brain = [np.isin(m, [TISSUES["grey"], TISSUES["white"]]).sum() for m in masks]
    ventricles = [(m == TISSUES["csf"]).sum() for m in masks]
    assert len(set(brain)) == 4 and len(set(ventricles)) > 1


def test_default_sites_are_non_iid():
    specs = default_site_specs(7)
    assert [s.name for s in specs] == [f"site{i}" for i in range(7)]
    assert len({s.protocol.name for s in specs}) == 7
    assert {s.protocol.field_t for s in specs} == {1.5, 3.0}
    assert {s.protocol.sequence for s in specs[:3]} == {"se", "gre"}
    assert all(weighting(s.protocol) == "T1" for s in specs)
    assert (
        specs[2].lesion_prevalence == 0.0
        and specs[0].lesion_prevalence > specs[1].lesion_prevalence > 0
    )
    assert specs[2].protocol.voxel_mm > specs[0].protocol.voxel_mm
    assert specs[2].protocol.noise_sigma > specs[0].protocol.noise_sigma
    assert specs[1].protocol.bias_strength > specs[0].protocol.bias_strength
    with pytest.raises(ValueError):
        default_site_specs(0)


def _read_labels(site_dir):
    with open(site_dir / "labels.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["subject_id", "class", "site"]
        return list(reader)


def test_make_phantom_sites_writes_valid_sites(tmp_path):
    messages = []
    sites = make_phantom_sites(
        tmp_path, n_sites=3, n_subjects=8, size=32, seed=5, progress=messages.append
    )
    assert sites == [tmp_path / f"site-{i}" for i in range(3)] and len(messages) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "site-0",
        "site-1",
        "site-2",
    ]  # no partial dirs left
    for i, (site_dir, spec) in enumerate(zip(sites, default_site_specs(3), strict=False)):
        rows = _read_labels(site_dir)
        ids = [r["subject_id"] for r in rows]
        assert ids == [f"site{i}-sub{j:04d}" for j in range(8)]
        assert sorted(p.name for p in (site_dir / "images").iterdir()) == [
            f"{s}.nii.gz" for s in ids
        ]
        assert sorted(p.name for p in (site_dir / "masks").iterdir()) == [
            f"{s}.nii.gz" for s in ids
        ]
        assert {r["site"] for r in rows} == {f"site{i}"} and {r["class"] for r in rows} <= set(
            CLASS_NAMES
        )
        n_lesion = sum(r["class"] == "lesion" for r in rows)
        assert (n_lesion > 0) == (spec.lesion_prevalence > 0)
        public = json.loads((site_dir / "site.json").read_text())
        assert public["protocol"] == dataclasses.asdict(spec.protocol)
        assert public["classes"] == [c for c in CLASS_NAMES if any(r["class"] == c for r in rows)]
        assert public["class_counts"]["lesion"] == n_lesion
        p = spec.protocol
        for row in rows:
            img = nib.load(site_dir / "images" / f"{row['subject_id']}.nii.gz")
            mask = nib.load(site_dir / "masks" / f"{row['subject_id']}.nii.gz")
            assert img.shape == mask.shape == (32, 32, 1)
            assert img.header.get_zooms() == pytest.approx((p.voxel_mm, p.voxel_mm, p.slice_mm))
            assert img.header.get_xyzt_units()[0] == "mm"
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.affine, mask.affine)
            np.testing.assert_allclose(
                np.diag(img.affine)[:3], [p.voxel_mm, p.voxel_mm, p.slice_mm]
            )
            assert img.get_data_dtype() == np.float32 and mask.get_data_dtype() == np.uint8
            labels = np.asarray(mask.dataobj)
            assert set(np.unique(labels).tolist()) <= set(TISSUES.values())
            assert (labels == TISSUES["lesion"]).any() == (row["class"] == "lesion")
            assert np.isfinite(img.get_fdata()).all() and img.get_fdata().min() >= 0


def test_make_phantom_sites_is_deterministic(tmp_path):
    def hashes(root):
        return {
            p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    make_phantom_sites(tmp_path / "a", n_sites=2, n_subjects=3, size=24, seed=11)
    make_phantom_sites(tmp_path / "b", n_sites=2, n_subjects=3, size=24, seed=11)
    make_phantom_sites(tmp_path / "c", n_sites=2, n_subjects=3, size=24, seed=12)
    a, b, c = hashes(tmp_path / "a"), hashes(tmp_path / "b"), hashes(tmp_path / "c")
    assert a == b
    assert a["site-0/images/site0-sub0000.nii.gz"] != c["site-0/images/site0-sub0000.nii.gz"]


def test_make_phantom_sites_3d(tmp_path):
    (site,) = make_phantom_sites(tmp_path, n_sites=1, n_subjects=2, dims=3, size=16)
    img = nib.load(site / "images" / "site0-sub0000.nii.gz")
    assert img.shape == (16, 16, 16)
    assert img.header.get_zooms() == pytest.approx((3.0, 3.0, 3.0))
    assert json.loads((site / "site.json").read_text())["shape"] == [16, 16, 16]


def test_crash_leaves_no_half_site(tmp_path, monkeypatch):
    real = phantoms.render_subject
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("scanner crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(phantoms, "render_subject", failing)
    with pytest.raises(RuntimeError, match="scanner crashed"):
        make_phantom_sites(tmp_path, n_sites=2, n_subjects=3, size=16)
    assert [p.name for p in tmp_path.iterdir()] == ["site-0"]  # site-1 never appears half-written
    assert len(_read_labels(tmp_path / "site-0")) == 3
    with pytest.raises(FileExistsError):
        make_phantom_sites(tmp_path, n_sites=1, n_subjects=1, size=16)


def test_the_public_set_is_deterministic_healthy_and_never_shares_a_draw_with_a_site(tmp_path):
    """The demo's public data: healthy volunteers only, the public protocol, reproducible for a seed, and no image
    equal to any site's (its draws come from a stream no site index uses)."""
    a = phantoms.make_public_phantoms(tmp_path / "a", n_subjects=4, size=24, seed=0)
    b = phantoms.make_public_phantoms(tmp_path / "b", n_subjects=4, size=24, seed=0)
    sites = phantoms.make_phantom_sites(
        tmp_path / "sites", n_sites=2, n_subjects=4, size=24, seed=0
    )
    files = sorted((a / "images").iterdir())
    assert [sha256_file(f) for f in files] == [sha256_file(b / "images" / f.name) for f in files]
    with open(a / "labels.csv", newline="") as f:
        assert {row["class"] for row in csv.DictReader(f)} == {"healthy"}
    assert json.loads((a / "site.json").read_text())["protocol"]["name"] == phantoms.PUBLIC_PROTOCOL
    public_images = [np.asarray(nib.load(f).dataobj) for f in files]
    for site in sites:
        for f in (site / "images").iterdir():
            img = np.asarray(nib.load(f).dataobj)
            assert not any(np.array_equal(img, p) for p in public_images)
    with pytest.raises(FileExistsError):
        phantoms.make_public_phantoms(a, n_subjects=1, size=24)
