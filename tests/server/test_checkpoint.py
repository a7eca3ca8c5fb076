"""The checkpoint format and the run folder: what is saved loads back; a file from another version fails loudly,
naming the file; the legacy cases (no prediction_type: the noise; no server_optimizer; no noise_levels) still
load."""

import dataclasses

import pytest
import torch

from common.config import RunConfig, model_config
from common.model import build_autoencoder, build_unet
from server.checkpoint import Checkpoint, RunState
from server.run_folder import RunFolder


@pytest.fixture()
def saved(tmp_path):
    cfg = model_config("tiny")
    torch.manual_seed(0)
    ckpt = Checkpoint(
        cfg,
        dataclasses.asdict(RunConfig(preset="tiny")),
        RunState(run_id="r", completed_round=3, latent_scale=0.5, sites={"a": {"status": "ok"}}),
        build_autoencoder(cfg).state_dict(),
        build_unet(cfg).state_dict(),
    )
    return ckpt, ckpt.save(tmp_path / "run")


def _rewrite(path, tmp_path, change):
    payload = torch.load(path, weights_only=False)
    change(payload)
    out = tmp_path / "edited.pt"
    torch.save(payload, out)
    return out


def test_a_saved_checkpoint_loads_back_as_round_and_latest(saved, tmp_path):
    ckpt, path = saved
    folder = RunFolder(tmp_path / "run")
    assert path == folder.checkpoint(3) and folder.latest_checkpoint.exists()
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["latest.pt", "round-003.pt"]
    loaded = Checkpoint.load(folder.latest_checkpoint)
    assert loaded.model_config == ckpt.model_config and loaded.run_state == ckpt.run_state
    assert loaded.server_optimizer is None and loaded.run_config["preset"] == "tiny"
    ae, unet = loaded.models()
    assert all(torch.equal(v, ckpt.unet[k]) for k, v in unet.state_dict().items())
    assert not ae.training


def test_old_checkpoints_predicted_noise_and_had_no_server_optimizer(saved, tmp_path):
    def legacy(payload):
        del payload["model_config"]["prediction_type"]
        del payload["server_optimizer"]
        del payload["run_state"]["noise_levels"]  # before the sites' noise-level releases

    loaded = Checkpoint.load(_rewrite(saved[1], tmp_path, legacy))
    assert saved[0].model_config.prediction_type == "v_prediction"
    assert loaded.model_config.prediction_type == "epsilon" and loaded.server_optimizer is None
    assert loaded.run_state.noise_levels == {}
    loaded.models()


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda p: p.update(extra=1), "unknown keys ['extra']"),
        (lambda p: p.pop("unet"), "missing keys ['unet']"),
        (lambda p: p["model_config"].update(latent_size=4), "model_config"),
        (lambda p: p["model_config"].pop("image_size"), "missing keys ['image_size']"),
        (lambda p: p["run_state"].update(round=1), "run_state"),
        (lambda p: p["run_state"].pop("sites"), "missing keys ['sites']"),
        (lambda p: p.update(format="fedsynth-checkpoint/2"), "not a fedsynth checkpoint"),
    ],
)
def test_a_checkpoint_from_another_version_fails_naming_the_file(saved, tmp_path, change, words):
    path = _rewrite(saved[1], tmp_path, change)
    with pytest.raises(ValueError) as err:
        Checkpoint.load(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_a_file_that_is_not_a_checkpoint_fails_naming_it(tmp_path):
    path = tmp_path / "latest.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        Checkpoint.load(path)


def test_the_run_folder_names_its_files_and_reads_what_it_wrote(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert RunFolder.of_checkpoint(folder.latest_checkpoint) == folder
    assert RunFolder.of_checkpoint(tmp_path / "elsewhere.pt") is None
    assert folder.read_privacy() is None and folder.read_metrics() == []
    with pytest.raises(FileNotFoundError, match="run.json: not found"):
        folder.read_record()
    folder.write_record({"status": "running"})
    folder.write_privacy({"sample_level": {}})
    folder.append_metrics({"round": 1})
    assert folder.read_record() == {"status": "running"}
    assert folder.read_privacy() == {"sample_level": {}}
    assert folder.read_metrics() == [{"round": 1}]
    folder.run_json.write_text("{")
    with pytest.raises(ValueError, match="run.json: not valid JSON"):
        folder.read_record()


def test_a_checkpoint_from_before_classifier_free_guidance_is_refused_naming_the_file(
    saved, tmp_path
):
    _, path = saved

    def two_embeddings(p):  # what build_unet wrote before the null class: one embedding per class
        p["unet"]["class_embedding.weight"] = p["unet"]["class_embedding.weight"][:2].clone()

    old = _rewrite(path, tmp_path, two_embeddings)
    with pytest.raises(ValueError, match="edited.pt.*2 class embeddings.*before classifier-free"):
        Checkpoint.load(old)
