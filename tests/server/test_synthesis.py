import dataclasses
import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from common.config import RunConfig, model_config
from common.io import sha256_file
from common.messages import AuditRequest
from common.model import build_autoencoder, build_unet
from server import synthesis
from server.checkpoint import Checkpoint, RunState
from server.synthesis import SynthesisRequest, synthesize_cohort, verify_cohort


@pytest.fixture()
def checkpoint(tmp_path):
    cfg = model_config("tiny", ddim_steps=3)
    torch.manual_seed(0)
    state = RunState(run_id="test", completed_round=2, latent_scale=1.0)
    return Checkpoint(
        cfg,
        dataclasses.asdict(RunConfig(preset="tiny")),
        state,
        build_autoencoder(cfg).state_dict(),
        build_unet(cfg).state_dict(),
    ).save(tmp_path / "run")


def test_cohort_has_images_labels_datalist_preview_and_verifiable_manifest(tmp_path, checkpoint):
    out = tmp_path / "cohort"
    messages = []
    synthesize_cohort(
        SynthesisRequest(checkpoint, out, per_class=3, seed=7, batch_size=4),
        privacy={"site-0": {"epsilon": 1.0}},
        progress=messages.append,
    )
    images = sorted((out / "images").glob("*.nii.gz"))
    assert len(images) == 6
    img = nib.load(images[0])
    assert img.shape == (32, 32, 1) and np.allclose(img.header.get_zooms()[:2], 6.0)
    data = img.get_fdata()
    assert data.min() >= 0 and data.max() <= 1
    labels = (out / "labels.csv").read_text().splitlines()
    assert labels[0] == "synthetic_id,class" and len(labels) == 7
    assert sum(",lesion" in line for line in labels) == 3
    datalist = json.loads((out / "dataset.json").read_text())
    assert datalist["numTraining"] == 6 and (out / datalist["training"][0]["image"]).exists()
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["privacy"] == {"site-0": {"epsilon": 1.0}}
    assert manifest["sampler"] == {
        "kind": "DDIM",
        "steps": 3,
        "eta": 0.0,
        "seed": 7,
        "guidance_scale": 3.0,  # the run's, recorded in the checkpoint
    }
    assert set(manifest["files"]) >= {"labels.csv", "dataset.json", "preview.png"}
    assert manifest["software"]["torch"] and manifest["checkpoint"]["sha256"]
    assert verify_cohort(out) == []
    assert any("batch" in m for m in messages)


def test_same_seed_same_cohort(tmp_path, checkpoint):
    a = synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "a", per_class=2, seed=3))
    b = synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "b", per_class=2, seed=3))
    name = "images/synth-healthy-00001.nii.gz"
    assert np.array_equal(nib.load(a / name).get_fdata(), nib.load(b / name).get_fdata())


def test_tampering_is_detected(tmp_path, checkpoint):
    out = synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "c", per_class=1))
    (out / "labels.csv").write_text("synthetic_id,class\nx,lesion\n")
    (out / "extra.txt").write_text("smuggled")
    (out / "images" / "synth-healthy-00001.nii.gz").unlink()
    problems = verify_cohort(out)
    assert any("labels.csv" in p and "sha256" in p for p in problems)
    assert any("extra.txt" in p for p in problems)
    assert any("synth-healthy-00001" in p and "missing" in p for p in problems)


def test_crash_leaves_no_half_cohort_and_a_rerun_resumes_it(tmp_path, checkpoint, monkeypatch):
    """Images are written as they come; a crash leaves no cohort folder, only the partial one, and the same
    request finishes it without sampling the images already written and verified again."""
    real_preview = synthesis.write_preview

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthesis, "write_preview", boom)
    req = SynthesisRequest(checkpoint, tmp_path / "cohort", per_class=3, seed=5, batch_size=2)
    with pytest.raises(RuntimeError, match="disk full"):
        synthesize_cohort(req)
    assert not (tmp_path / "cohort").exists()
    partial = synthesis.partial_dir(tmp_path / "cohort")
    assert len(list((partial / "images").glob("*.nii.gz"))) == 6
    # One image is corrupted on disk, one was being written (a temp file) when the process died.
    broken = partial / "images" / "synth-lesion-00002.nii.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    (partial / "images" / ".synth-lesion-00003.nii.gz.x.tmp.nii.gz").write_bytes(b"half")

    monkeypatch.setattr(synthesis, "write_preview", real_preview)
    sampled = []
    real_noise = synthesis.image_noise
    monkeypatch.setattr(
        synthesis, "image_noise", lambda cfg, seed, i: sampled.append(i) or real_noise(cfg, seed, i)
    )
    messages = []
    synthesize_cohort(req, progress=messages.append)
    assert sampled == [4]  # only the corrupted image was sampled again
    assert any("5 images already written and verified" in m for m in messages)
    assert verify_cohort(tmp_path / "cohort") == [] and not partial.exists()
    fresh = synthesize_cohort(replace(req, out_dir=tmp_path / "fresh"))
    for name in ("synth-lesion-00002", "synth-healthy-00001"):
        a = nib.load(tmp_path / "cohort" / "images" / f"{name}.nii.gz").get_fdata()
        b = nib.load(fresh / "images" / f"{name}.nii.gz").get_fdata()
        assert np.allclose(a, b, atol=1e-4)  # batches of 1 and 2: the same up to float rounding


def test_a_partial_cohort_from_another_request_is_not_mixed_in(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(synthesis, "write_preview", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "c", per_class=1, seed=1))
    with pytest.raises(FileExistsError, match="different request"):
        synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "c", per_class=1, seed=2))


def test_images_do_not_depend_on_batching_or_sharding(tmp_path, checkpoint):
    """Two CPU worker processes, batch 1, give the images one process with batch 4 gives; the format's reader
    returns them with their labels."""
    one = synthesize_cohort(
        SynthesisRequest(checkpoint, tmp_path / "one", per_class=2, batch_size=4)
    )
    two = synthesize_cohort(
        SynthesisRequest(checkpoint, tmp_path / "two", per_class=2, batch_size=1, workers=2)
    )
    assert json.loads((two / "manifest.json").read_text())["synthesis"]["devices"] == ["cpu", "cpu"]
    a, b = synthesis.read_cohort(one), synthesis.read_cohort(two)
    assert a.ids == b.ids and list(a.labels) == [0, 0, 1, 1]
    assert np.allclose(a.images(), b.images(), atol=1e-4)
    assert verify_cohort(two) == []


def test_refuses_to_overwrite(tmp_path, checkpoint):
    synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "d", per_class=1))
    with pytest.raises(FileExistsError):
        synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "d", per_class=1))


def test_audit_task_tells_the_sites_what_the_checkpoints_unet_predicts(
    tmp_path, checkpoint, task_identity
):
    """The sites' white-box attack scores records with the checkpoint's own loss: same prediction type."""
    from server.audit import audit_messages

    cohort = synthesize_cohort(
        SynthesisRequest(checkpoint, tmp_path / "cohort", per_class=1, batch_size=2)
    )
    [msg] = audit_messages(None, [5], cohort, checkpoint)
    assert (
        msg.content["config"]["prediction-type"]
        == model_config("tiny").prediction_type
        == "v_prediction"
    )
    payload = torch.load(checkpoint, weights_only=False)
    del payload["model_config"][
        "prediction_type"
    ]  # a checkpoint from before the field: the UNet predicted noise
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    with pytest.raises(ValueError, match="synthesized from checkpoint sha256"):
        audit_messages(None, [5], cohort, old)  # not the checkpoint this cohort came from
    old_cohort = synthesize_cohort(
        SynthesisRequest(old, tmp_path / "old-cohort", per_class=1, batch_size=2)
    )
    [msg] = audit_messages(None, [5], old_cohort, old)
    assert msg.content["config"]["prediction-type"] == "epsilon"
    request = AuditRequest.from_record(msg.content["config"])
    assert request.run_id == payload["run_state"]["run_id"]
    assert request.checkpoint_sha256 == sha256_file(old)
    assert request.cohort_manifest_sha256 == sha256_file(old_cohort / "manifest.json")


def test_3d_cohort_volumes_have_ras_affines_and_read_back_through_the_site_loader(tmp_path):
    """tiny3d volumes: NIfTI with a centred RAS affine and the nominal spacing; a site's loader (which turns every
    scan to RAS and resizes it to the model grid) reads a synthetic volume back unchanged: no flip, no transpose."""
    from common.site import load_image as site_load_image

    cfg = model_config("tiny3d", ddim_steps=2)
    torch.manual_seed(0)
    ckpt = Checkpoint(
        cfg,
        dataclasses.asdict(RunConfig(preset="tiny3d")),
        RunState(run_id="t3", completed_round=1, latent_scale=1.0),
        build_autoencoder(cfg).state_dict(),
        build_unet(cfg).state_dict(),
    ).save(tmp_path / "run")
    out = synthesize_cohort(SynthesisRequest(ckpt, tmp_path / "cohort", per_class=1, batch_size=2))
    assert verify_cohort(out) == []
    path = out / "images" / "synth-lesion-00001.nii.gz"
    img = nib.load(path)
    spacing = synthesis.NOMINAL_FOV_MM / 32
    assert img.shape == (32, 32, 32) and np.allclose(img.header.get_zooms(), spacing)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and int(img.header["sform_code"]) == 1
    assert np.allclose(img.affine[:3, :3] @ np.full(3, 15.5) + img.affine[:3, 3], 0)  # centred
    cohort = synthesis.read_cohort(out)
    volume = cohort.image("synth-lesion-00001")
    assert volume.shape == (1, 32, 32, 32) and cohort.spatial_dims == 3
    back, read_spacing, _ = site_load_image(path, spatial_dims=3, image_size=32)
    lo, hi = np.percentile(volume, [0.5, 99.5])
    assert np.allclose(back, np.clip((volume - lo) / (hi - lo), 0, 1), atol=1e-4)
    assert read_spacing == (round(spacing, 4),) * 3
    views = synthesis.preview_views(volume)  # sagittal, coronal, axial mid-slices
    assert [v.shape for v in views] == [(32, 32)] * 3
    assert np.array_equal(views[2], np.rot90(volume[0, :, :, 16]))
    assert (out / "preview.png").stat().st_size > 0


def test_every_visible_gpu_gets_a_worker(monkeypatch):
    """No GPU here: the device list is checked with torch's view of two GPUs patched in."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert synthesis.resolve_devices("auto") == ["cuda:0", "cuda:1"]
    assert synthesis.resolve_devices("cuda:1") == ["cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert synthesis.resolve_devices("auto", workers=3) == ["cpu"] * 3
    with pytest.raises(ValueError, match="no GPU"):
        synthesis.resolve_devices("cuda")


def test_a_failing_worker_is_named_and_the_rest_is_resumed_on_other_devices(tmp_path, checkpoint):
    """Two worker processes, one on a device that cannot produce images: the run fails naming that worker, keeps
    what the other wrote, and the same request on the CPU alone finishes the cohort."""
    req = SynthesisRequest(checkpoint, tmp_path / "c", per_class=2, batch_size=1, device="cpu,meta")
    with pytest.raises(RuntimeError, match=r"worker 1 on meta.*run the same command again"):
        synthesize_cohort(req)
    partial = synthesis.partial_dir(tmp_path / "c")
    written = {p.name for p in (partial / "images").glob("synth-*.nii.gz")}
    # Only worker 0's share (it is stopped when worker 1 fails, so it may not have finished it).
    assert written <= {"synth-healthy-00001.nii.gz", "synth-lesion-00001.nii.gz"}
    messages = []
    synthesize_cohort(replace(req, device="cpu"), progress=messages.append)
    assert any(f"{len(written)} images already written and verified" in m for m in messages)
    assert verify_cohort(tmp_path / "c") == []


def test_the_preview_has_no_empty_columns(tmp_path):
    """A small cohort's preview is as wide as its largest class, not PREVIEW_PER_ROW columns of blank space."""
    from PIL import Image

    def width(per_class: int, dims: int) -> int:
        n = 2 * per_class
        images = np.random.default_rng(0).random((n, 1) + (16,) * dims, dtype=np.float32)
        labels = np.repeat([0, 1], per_class)
        path = tmp_path / f"preview-{per_class}-{dims}.png"
        synthesis.write_preview(path, images, labels, ("healthy", "lesion"))
        return Image.open(path).size[0]

    assert width(2, 2) < 0.5 * width(synthesis.PREVIEW_PER_ROW, 2)
    assert width(2, 3) < 0.75 * width(synthesis.PREVIEW_PER_ROW, 3)  # the title sets a floor
