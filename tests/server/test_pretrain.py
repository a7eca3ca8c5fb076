"""`fedsynth pretrain`: public data in, a checkpoint with its provenance out; a run starts from it and records it."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig, model_config
from common.io import sha256_file
from common.phantoms import PUBLIC_PROTOCOL, default_site_specs, make_public_phantoms
from server.checkpoint import Checkpoint
from server.pretrain import (
    PretrainConfig,
    load_pretrained,
    lr_scheduler,
    pretrain,
    public_data_hash,
)
from server.training import Federation
from tests.server.test_central_dp import FakeGrid

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    return make_public_phantoms(tmp_path_factory.mktemp("pub") / "public", n_subjects=8, size=32)


@pytest.fixture(scope="module")
def pretrained(public, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    pre = PretrainConfig(
        public_dir=str(public),
        out=str(out),
        preset="tiny",
        autoencoder_steps=4,
        unet_steps=12,
        batch_size=4,
        class_dropout=0.5,
    )
    return pretrain(pre)


def test_the_public_set_is_healthy_only_and_imaged_with_a_protocol_no_site_uses(public):
    rows = (public / "labels.csv").read_text().splitlines()[1:]
    assert rows and all(r.split(",")[1] == "healthy" for r in rows)
    meta = json.loads((public / "site.json").read_text())
    assert meta["protocol"]["name"] == PUBLIC_PROTOCOL
    site_protocols = {s.protocol for s in default_site_specs(10)}
    assert PUBLIC_PROTOCOL not in {p.name for p in site_protocols}
    public_p = meta["protocol"]
    for p in site_protocols:  # no site has the public set's acquisition (field, timing, resolution)
        same = (p.field_t, p.tr_ms, p.te_ms, p.voxel_mm) == (
            public_p["field_t"],
            public_p["tr_ms"],
            public_p["te_ms"],
            public_p["voxel_mm"],
        )
        assert not same, p.name


def test_public_data_hash_covers_every_file_and_its_name(public, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(public, copy)
    digest, n = public_data_hash(copy)
    assert (digest, n) == public_data_hash(public)
    assert n == 2 * 8 + 2  # images, masks, labels.csv, site.json
    first = sorted((copy / "images").iterdir())[0]
    first.rename(first.with_name("renamed.nii.gz"))
    assert public_data_hash(copy)[0] != digest
    (copy / "labels.csv").write_text((copy / "labels.csv").read_text() + "\n")
    assert public_data_hash(copy)[0] != digest


def test_the_checkpoint_records_where_it_came_from_and_is_written_atomically(pretrained, public):
    ckpt = Checkpoint.load(pretrained)
    p = ckpt.pretraining
    assert (p["public_data_sha256"], p["public_files"]) == public_data_hash(public)
    assert (p["preset"], p["autoencoder_steps"], p["unet_steps"], p["seed"]) == ("tiny", 4, 12, 0)
    assert p["public_class_counts"] == {"healthy": 8, "lesion": 0} and p["seconds"] > 0
    assert (p["lr_schedule"], p["lr_autoencoder"], p["lr_diffusion"]) == ("one-cycle", 2e-3, 1e-3)
    assert ckpt.run_state.latent_scale == pytest.approx(p["latent_scale"]) != 1.0
    assert [f.name for f in pretrained.parent.iterdir() if f.name.startswith(".")] == []
    # trained channels-last, stored in the plain layout every reader expects
    for part in (ckpt.autoencoder, ckpt.unet):
        assert all(w.dtype == torch.float32 and w.is_contiguous() for w in part.values())


def test_healthy_only_public_data_trains_the_null_class_and_starts_the_unseen_class_at_null(
    pretrained, public, tmp_path
):
    """Classifier-free guidance's class dropout: the public set has one class, yet the UNet learns the null
    (unconditional) path; the lesion class, never seen in public, starts at the null class's embedding (so its
    label means "no information yet"), or keeps its random initialisation when asked (`unseen_classes="random"`)."""
    cfg = model_config("tiny")
    ckpt = Checkpoint.load(pretrained)
    torch.manual_seed(0 + 1)  # the UNet's initial weights: seed + 1
    from common.model import build_unet

    init = build_unet(cfg).state_dict()["class_embedding.weight"]
    trained = ckpt.unet["class_embedding.weight"]
    healthy, lesion = cfg.class_names.index("healthy"), cfg.class_names.index("lesion")
    assert not torch.equal(trained[cfg.null_class], init[cfg.null_class])
    assert not torch.equal(trained[healthy], init[healthy])
    assert torch.equal(trained[lesion], trained[cfg.null_class])
    p = ckpt.pretraining
    assert (p["unseen_classes"], p["unseen_classes_start"]) == (["lesion"], "null")

    pre = dataclasses.replace(
        PretrainConfig(**ckpt.run_config), out=str(tmp_path / "random.pt"), unseen_classes="random"
    )
    kept = Checkpoint.load(pretrain(pre)).unet["class_embedding.weight"]
    assert torch.equal(kept[lesion], init[lesion])
    assert torch.equal(kept[cfg.null_class], trained[cfg.null_class])  # the same training otherwise


def test_the_learning_rate_warms_up_then_anneals_and_an_unknown_schedule_is_refused(
    public, tmp_path
):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    schedule = lr_scheduler(opt, "one-cycle", 2e-3, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[0] < 2e-4 and max(lrs) == pytest.approx(2e-3) and 9 <= lrs.index(max(lrs)) <= 10
    assert lrs[-1] < 1e-6  # annealed: the last steps settle into what the first ones found
    assert lr_scheduler(opt, "constant", 2e-3, 100) is None
    for steps in range(
        1, 41
    ):  # short runs (the --dims 3 demo's 10 steps divided by zero in torch) step cleanly
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        schedule = lr_scheduler(opt, "one-cycle", 2e-3, steps)
        for _ in range(steps):
            opt.step()
            if schedule is not None:
                schedule.step()
        assert schedule is None or 0 <= opt.param_groups[0]["lr"] <= 2e-3
    with pytest.raises(
        ValueError, match="--lr-schedule: 'cosine'; choose one of one-cycle, constant"
    ):
        PretrainConfig(public_dir=str(public), out=str(tmp_path / "x.pt"), lr_schedule="cosine")


def test_bad_public_folders_are_refused_naming_the_file(public, tmp_path):
    base = dict(out=str(tmp_path / "x.pt"), preset="tiny", autoencoder_steps=1, unet_steps=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pretrain(PretrainConfig(public_dir=str(tmp_path / "nope"), **base))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: no labels\.csv"):
        pretrain(PretrainConfig(public_dir=str(empty), **base))
    broken = tmp_path / "broken"
    shutil.copytree(public, broken)
    for f in (broken / "images").iterdir():
        f.write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match=r"public-sub0000\.nii\.gz"):
        pretrain(PretrainConfig(public_dir=str(broken), **base))
    assert not (tmp_path / "x.pt").exists()


def test_a_run_refuses_a_checkpoint_of_another_preset_or_a_run_checkpoint(pretrained, tmp_path):
    with pytest.raises(ValueError, match="made for preset 'tiny' but this run uses 'small'"):
        load_pretrained(pretrained, model_config("small"))
    with pytest.raises(FileNotFoundError, match="fedsynth pretrain"):
        load_pretrained(tmp_path / "missing.pt", model_config("tiny"))
    run = _run(tmp_path / "a", pretrained)
    latest = Federation(FakeGrid(3, step_norm=0.1), run).run_rounds()
    with pytest.raises(ValueError, match="not a pretrained checkpoint"):
        load_pretrained(latest, model_config("tiny"))


def test_a_checkpoint_sampled_with_other_steps_still_fits_but_another_shape_does_not(
    pretrained, tmp_path
):
    """A preset's sampler step count changes (small: DDIM 50 -> 25) without changing the model: a checkpoint made
    before still starts runs; a checkpoint whose UNet has another shape is refused, naming the field."""
    ckpt = Checkpoint.load(pretrained)
    cfg = model_config("tiny")
    other_steps = dataclasses.replace(
        ckpt, model_config=dataclasses.replace(cfg, ddim_steps=cfg.ddim_steps + 40)
    )
    loaded, _ = load_pretrained(other_steps.write(tmp_path / "steps.pt"), cfg)
    assert loaded.model_config.ddim_steps == cfg.ddim_steps + 40
    other_shape = dataclasses.replace(
        ckpt, model_config=dataclasses.replace(cfg, unet_channels=(16, 64))
    )
    with pytest.raises(ValueError, match="differs in unet_channels"):
        load_pretrained(other_shape.write(tmp_path / "shape.pt"), cfg)


def _run(run_dir, pretrained, **kw) -> RunConfig:
    return RunConfig(
        **{
            **dict(
                preset="tiny",
                pretrained=str(pretrained),
                num_server_rounds=1,
                autoencoder_rounds=0,
                min_sites=2,
                run_dir=str(run_dir),
                synthesize_per_class=0,
                round_timeout=5.0,
                audit=False,
            ),
            **kw,
        }
    )


def test_a_run_starts_from_the_pretrained_checkpoint_and_records_it(pretrained, tmp_path):
    grid = FakeGrid(3, step_norm=0.1)
    latest = Federation(grid, _run(tmp_path / "run", pretrained)).run_rounds()
    ckpt, saved = Checkpoint.load(pretrained), Checkpoint.load(latest)
    # the sites were sent the pretrained UNet and the pretrained (frozen) autoencoder
    sent = grid.seen[0].content
    assert all(
        torch.equal(torch.from_numpy(a), ckpt.unet[k].cpu())
        for k, a in zip(sent["arrays"].keys(), sent["arrays"].to_numpy_ndarrays(), strict=True)
    )
    assert sent["config"]["latent-scale"] == pytest.approx(ckpt.run_state.latent_scale)
    assert all(torch.equal(saved.autoencoder[k], v) for k, v in ckpt.autoencoder.items())
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    want = {
        "checkpoint_sha256": sha256_file(pretrained),
        "public_data_sha256": ckpt.pretraining["public_data_sha256"],
    }
    for where in (record["pretraining"], saved.pretraining):
        assert {k: where[k] for k in want} == want
    assert record["latent_scale"] == pytest.approx(ckpt.run_state.latent_scale)
    assert (
        "public data" in record["autoencoder"]
        and "fine-tuned with DP" in record["diffusion_warm_start"]
    )


def test_a_resumed_run_refuses_another_pretrained_checkpoint(pretrained, tmp_path):
    run = _run(tmp_path / "run", pretrained, num_server_rounds=2)
    Federation(
        FakeGrid(3, step_norm=0.1), dataclasses.replace(run, num_server_rounds=1)
    ).run_rounds()
    other = tmp_path / "other.pt"
    ckpt = Checkpoint.load(pretrained)
    dataclasses.replace(ckpt, pretraining={**ckpt.pretraining, "seed": 99}).write(other)
    with pytest.raises(ValueError, match="started from a pretrained checkpoint with sha256"):
        Federation(FakeGrid(3), dataclasses.replace(run, pretrained=str(other))).run_rounds()


def test_without_a_pretrained_checkpoint_the_autoencoder_must_train_at_the_sites():
    with pytest.raises(ValueError, match="autoencoder-rounds 0 needs `pretrained`"):
        RunConfig(preset="tiny", num_server_rounds=1, autoencoder_rounds=0)


def test_cli_pretrain_writes_the_checkpoint_and_names_a_bad_folder(public, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = tmp_path / "cli.pt"
    argv = [sys.executable, "-m", "server.cli", "pretrain", "--preset", "tiny", "--out", str(out)]
    steps = ["--autoencoder-steps", "2", "--unet-steps", "2", "--batch-size", "2"]
    ok = subprocess.run(
        [*argv, "--public", str(public), *steps], capture_output=True, text=True, env=env
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "public pretraining: diffusion UNet: 2/2 steps" in ok.stdout
    assert f"pretrained checkpoint {out}" in ok.stdout
    assert Checkpoint.load(out).pretraining["unet_steps"] == 2
    bad = subprocess.run(
        [*argv, "--public", str(tmp_path), *steps], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and f"{tmp_path}: no labels.csv" in bad.stdout


def test_the_pretrain_commands_defaults_are_the_configs():
    """`fedsynth pretrain` builds its parser without importing torch, so it spells its defaults again: they must
    be PretrainConfig's (one source of truth for the recipe)."""
    from server.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--public", "p", "--out", "o.pt"])
    pre = PretrainConfig(public_dir="p", out="o.pt")
    for field in ("autoencoder_steps", "unet_steps", "batch_size", "class_dropout", "seed"):
        assert getattr(args, field) == getattr(pre, field), field
