import json

import nibabel as nib
import numpy as np
import pytest
import torch

from common.config import RunConfig, model_config
from common.io import sha256_file
from common.messages import AuditRequest
from common.model import build_autoencoder, build_unet
from server import synthesis
from server.synthesis import SynthesisRequest, synthesize_cohort, verify_cohort
from server.training import RunState, checkpoint_payload, save_checkpoint


@pytest.fixture()
def checkpoint(tmp_path):
    cfg = model_config("tiny", ddim_steps=3)
    torch.manual_seed(0)
    state = RunState(run_id="test", completed_round=2, latent_scale=1.0)
    payload = checkpoint_payload(
        cfg,
        RunConfig(preset="tiny"),
        state,
        build_autoencoder(cfg).state_dict(),
        build_unet(cfg).state_dict(),
    )
    return save_checkpoint(tmp_path / "run", payload)


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
    assert manifest["sampler"] == {"kind": "DDIM", "steps": 3, "eta": 0.0, "seed": 7}
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


def test_crash_leaves_no_half_cohort(tmp_path, checkpoint, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthesis, "write_preview", boom)
    with pytest.raises(RuntimeError):
        synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "cohort", per_class=1))
    assert list(tmp_path.glob("cohort*")) == [] and not list(tmp_path.glob(".cohort*"))


def test_refuses_to_overwrite(tmp_path, checkpoint):
    synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "d", per_class=1))
    with pytest.raises(FileExistsError):
        synthesize_cohort(SynthesisRequest(checkpoint, tmp_path / "d", per_class=1))


def test_audit_task_tells_the_sites_what_the_checkpoints_unet_predicts(
    tmp_path, checkpoint, monkeypatch
):
    """The sites' white-box attack scores records with the checkpoint's own loss: same prediction type."""
    from flwr.supercore.task_identity import TaskIdentity

    from server.audit import audit_messages

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
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
