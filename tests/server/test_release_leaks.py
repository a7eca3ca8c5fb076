"""Attack: plant exact copies of training patients in a cohort, audit it, gate it and build the release, then read
every byte a partner can download (NIfTI images, PNG files, PNG images inlined in HTML as base64, JSON, text) and
look for the planted patients' pixels. The officers' report must show them (the officers decide on them); no
partner-visible file may carry them."""

import base64
import dataclasses
import io
import json
import re
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.signal import fftconvolve

from client.task import load_training_data
from common.config import RunConfig, SiteConfig, model_config
from common.model import build_autoencoder, build_unet
from common.phantoms import make_phantom_sites
from common.signing import generate_keypair
from privacy.memorization import memorization_audit
from privacy.policy import DEFAULT_POLICY
from server.audit import load_cohort, write_cohort_audit
from server.checkpoint import Checkpoint, RunState
from server.release.access import visible_files
from server.release.manifest import build_release, verify_release
from server.synthesis import (
    SynthesisRequest,
    synthesize_cohort,
    write_datalist,
    write_image,
    write_labels,
    write_manifest,
    write_preview,
)
from tests.privacy.test_policy import site

PLANT_AT = (
    0,
    3,
    7,
)  # cohort positions overwritten with training patients (two healthy, one lesion)
OFFICERS = (
    "officers/"  # release files for privacy officers only (never served to partners, never pulled)
)
PNG_B64 = re.compile(rb"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _gray(png: bytes) -> np.ndarray:
    """The PNG in grey, at half resolution (a drawn image cell stays 25+ pixels wide; searching is 4x cheaper)."""
    im = Image.open(io.BytesIO(png)).convert("L")
    im = im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BOX)
    return np.asarray(im, dtype=np.float64) / 255.0


def best_matches(canvas: np.ndarray, images: np.ndarray) -> list[float]:
    """For each image, the highest normalised cross-correlation of it (as matplotlib draws it: rot90, grey, 0..1)
    anywhere on `canvas`, over the sizes a report or preview grid draws a cell at. 1.0 = the image is there."""
    best = [0.0] * len(images)
    templates = [Image.fromarray((np.rot90(im) * 255).astype(np.uint8)) for im in images]
    for size in range(
        24, 74, 2
    ):  # cell sizes at half resolution (reports: ~45-55, previews: ~55-65)
        if size > min(canvas.shape):
            break
        ones = np.ones((size, size))
        s1 = fftconvolve(canvas, ones, mode="valid")
        var = np.maximum(
            fftconvolve(canvas * canvas, ones, mode="valid") - s1 * s1 / ones.size, 1e-9
        )
        flat = var < 1e-3 * ones.size  # flat regions carry no image
        for i, template in enumerate(templates):
            t = np.asarray(template.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0
            t = t - t.mean()
            ncc = fftconvolve(canvas, t[::-1, ::-1], mode="valid") / (np.sqrt((t * t).sum() * var))
            ncc[flat] = 0
            best[i] = max(best[i], float(ncc.max()))
    return best


def pngs_in(data: bytes, rel: str) -> list[tuple[str, bytes]]:
    """Every PNG a file carries: the file itself, or base64 PNGs inlined in it (HTML, JSON, anything)."""
    out = [(rel, data)] if data[:8] == b"\x89PNG\r\n\x1a\n" else []
    out += [
        (f"{rel} (inline #{i})", base64.b64decode(m)) for i, m in enumerate(PNG_B64.findall(data))
    ]
    return out


def leaks(files: dict[str, bytes], planted: np.ndarray, tmp_path) -> list[str]:
    """Where the planted images show up in these files."""
    found = []
    for rel, data in files.items():
        if rel.endswith((".nii", ".nii.gz")):
            path = tmp_path / "probe.nii.gz"
            path.write_bytes(data)
            vol = np.asarray(nib.load(path).dataobj, dtype=np.float32)
            img = vol[:, :, 0] if vol.ndim == 3 else vol
            found += [
                f"{rel}: planted image {i}" for i, p in enumerate(planted) if np.allclose(img, p)
            ]
        for where, png in pngs_in(data, rel):
            for i, score in enumerate(best_matches(_gray(png), planted)):
                if score > 0.9:
                    found.append(f"{where}: planted image {i} (correlation {score:.3f})")
        if rel.endswith(".json"):
            numbers = re.findall(rb"-?\d+\.\d{4,}", data)
            values = {round(float(x), 5) for x in numbers}
            for i, p in enumerate(planted):
                pixels = {round(float(v), 5) for v in p.ravel()} - {0.0, 1.0}
                if len(pixels & values) > 20:
                    found.append(f"{rel}: {len(pixels & values)} pixel values of planted image {i}")
        for i, p in enumerate(planted):
            if p.astype(np.float32).tobytes()[:256] in data:
                found.append(f"{rel}: raw bytes of planted image {i}")
    return found


@pytest.fixture(scope="module")
def planted_release(tmp_path_factory):
    root = tmp_path_factory.mktemp("leak")
    site_dir = make_phantom_sites(root / "sites", n_sites=1, n_subjects=24, size=32, seed=3)[0]
    cfg = model_config("tiny", ddim_steps=2)
    train, holdout = load_training_data(
        SiteConfig(site_dir=str(site_dir), state_dir=str(root / "state"), dp=False), cfg
    )
    torch.manual_seed(0)
    checkpoint = Checkpoint(
        cfg,
        dataclasses.asdict(RunConfig(preset="tiny")),
        RunState(run_id="r", completed_round=1, latent_scale=1.0),
        build_autoencoder(cfg).state_dict(),
        build_unet(cfg).state_dict(),
    )
    ckpt = checkpoint.save(root / "run")
    req = SynthesisRequest(ckpt, root / "generated", per_class=6, seed=1, batch_size=16)
    images, ids, labels, _ = load_cohort(synthesize_cohort(req))
    # The attack: the cohort carries exact copies of training patients of the right class.
    planted = []
    for pos in PLANT_AT:
        patient = int(np.flatnonzero(train.labels == labels[pos])[len(planted)])
        images[pos] = train.images[patient]
        planted.append(train.images[patient][0])
    cohort = root / "cohort"
    (cohort / "images").mkdir(parents=True)
    req = replace(req, out_dir=cohort)
    for sid, image in zip(ids, images, strict=True):
        write_image(cohort, sid, image, cfg)
    order = [(sid, int(c)) for sid, c in zip(ids, labels, strict=True)]
    write_labels(cohort, order, cfg.class_names)
    write_datalist(cohort, order, cfg)
    write_preview(cohort / "preview.png", images, labels, cfg.class_names)
    write_manifest(cohort, req, cfg, checkpoint, len(ids), None, ["cpu"])
    # The audit the site runs (its real memorization audit against its own patients), then the report.
    mem = memorization_audit(
        images,
        ids,
        train.images,
        holdout.images,
        synthetic_labels=labels,
        member_labels=train.labels,
        nonmember_labels=holdout.labels,
        class_names=list(cfg.class_names),
    )
    result = {**site("site-0"), "memorization": mem}
    write_cohort_audit({"site-0": result}, cohort, root / "audit")
    keys = {n: generate_keypair(root / "keys", n) for n in ("consortium", "alice")}
    policy = replace(DEFAULT_POLICY, max_withheld_share=0.5, required_approvals=1)
    release = build_release(
        cohort,
        root / "audit",
        root / "release",
        policy=policy,
        consortium_key=keys["consortium"][0],
        officer_keys={"alice": keys["alice"][1]},
        cohort_id="leak",
    )
    return {
        "release": release,
        "planted": np.stack(planted),
        "planted_ids": sorted(ids[p] for p in PLANT_AT),
        "pub": keys["consortium"][1],
    }


@pytest.mark.slow
def test_no_partner_visible_byte_carries_a_withheld_patient(planted_release, tmp_path):
    release, planted = planted_release["release"], planted_release["planted"]
    manifest = json.loads((release / "release.json").read_text())
    assert manifest["withheld"]["ids"] == planted_release["planted_ids"]
    assert verify_release(release, planted_release["pub"]) == []
    visible = visible_files(
        "partner", manifest["files"]
    )  # what the portal serves and pull downloads
    assert visible and not any(rel.startswith("officers/") for rel in visible)
    files = {rel: (release / rel).read_bytes() for rel in [*visible, "release.json", "release.sig"]}
    assert any(pngs_in(data, rel) for rel, data in files.items())  # the check looks at images
    assert leaks(files, planted, tmp_path) == []
    # The detector is not blind: the officers' report shows the flagged images.
    officer = {
        rel: (release / rel).read_bytes()
        for rel in manifest["files"]
        if rel.startswith("officers/")
    }
    found = leaks(officer, planted, tmp_path)
    assert {int(f.split("planted image ")[1].split()[0]) for f in found} == set(range(len(planted)))
