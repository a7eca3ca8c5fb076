"""Signed release candidates: near-copies withheld from every file, every tampering detected, officers' approvals
bound to one release and to the keys the consortium vouched for, status from pending to released or rejected."""

import csv
import dataclasses
import hashlib
import json
import shutil
from dataclasses import replace

import pytest
import torch

from common.config import RunConfig, model_config
from common.model import build_autoencoder, build_unet
from common.signing import fingerprint, generate_keypair, load_public_key
from privacy.policy import load_policy
from privacy.report import write_audit_report
from server.checkpoint import Checkpoint, RunState
from server.cli import main
from server.release.manifest import (
    approval_statement,
    build_release,
    check_approval,
    load_approvals,
    release_sha256,
    release_status,
    sign_approval,
    verify_release,
    write_approval,
)
from server.synthesis import SynthesisRequest, synthesize_cohort
from tests.privacy.test_policy import LENIENT, make_audit, privacy_json, site

WITHHELD = "synth-lesion-00002"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny real cohort (10 images), its audit flagging one near-copy, and keys for the consortium, two listed
    officers (alice, bob) and one outsider (mallory)."""
    root = tmp_path_factory.mktemp("release")
    cfg = model_config("tiny", ddim_steps=2)
    torch.manual_seed(0)
    state = RunState(run_id="r", completed_round=1, latent_scale=1.0)
    ckpt = Checkpoint(
        cfg,
        dataclasses.asdict(RunConfig(preset="tiny")),
        state,
        build_autoencoder(cfg).state_dict(),
        build_unet(cfg).state_dict(),
    ).save(root / "run")
    cohort = synthesize_cohort(
        SynthesisRequest(
            ckpt,
            root / "cohort",
            per_class=5,
            seed=1,
            batch_size=16,
        )
    )
    sha = json.loads((cohort / "manifest.json").read_text())["checkpoint"]["sha256"]
    audit = make_audit({"a": site("a", flagged=[WITHHELD]), "b": site("b")}, checkpoint_sha256=sha)
    write_audit_report(audit, root / "audit")
    (root / "privacy.json").write_text(json.dumps(privacy_json(audit)))
    keys = {
        n: generate_keypair(root / "keys", n) for n in ("consortium", "alice", "bob", "mallory")
    }
    built = build_release(
        cohort,
        root / "audit",
        root / "built",
        policy=LENIENT,
        consortium_key=keys["consortium"][0],
        officer_keys={"alice": keys["alice"][1], "bob": keys["bob"][1]},
        cohort_id="c1",
        server_privacy=root / "privacy.json",
    )
    return {
        "root": root,
        "cohort": cohort,
        "audit": root / "audit",
        "privacy": root / "privacy.json",
        "keys": keys,
        "built": built,
    }


@pytest.fixture()
def rel(world, tmp_path):
    """A fresh copy of the built release, free to tamper with."""
    return shutil.copytree(world["built"], tmp_path / "rel")


def pub(world):
    return world["keys"]["consortium"][1]


def approve(world, release, officer, decision="approve", reason="", key=None):
    statement = approval_statement(release, officer, decision, reason)
    return sign_approval(statement, key or world["keys"][officer][0])


def test_release_withholds_near_copies_and_verifies(world):
    rel = world["built"]
    assert verify_release(rel, pub(world)) == []
    manifest = json.loads((rel / "release.json").read_text())
    assert manifest["format"] == "fedsynth-release/1" and manifest["cohort_id"] == "c1"
    assert manifest["withheld"]["count"] == 1 and manifest["withheld"]["ids"] == [WITHHELD]
    assert manifest["n_images"] == 9 and manifest["gate"]["passed"] is True
    assert not (rel / "cohort" / "images" / f"{WITHHELD}.nii.gz").exists()
    assert len(list((rel / "cohort" / "images").iterdir())) == 9
    with open(rel / "cohort" / "labels.csv") as f:
        ids = [r["synthetic_id"] for r in csv.DictReader(f)]
    assert len(ids) == 9 and WITHHELD not in ids
    dataset = json.loads((rel / "cohort" / "dataset.json").read_text())
    assert dataset["numTraining"] == 9 and all(
        WITHHELD not in e["image"] for e in dataset["training"]
    )
    # The withheld image was in the preview grid: it is redrawn from the released images.
    preview = (rel / "cohort" / "preview.png").read_bytes()
    assert (
        preview[:8] == b"\x89PNG\r\n\x1a\n"
        and preview != (world["cohort"] / "preview.png").read_bytes()
    )
    assert (rel / "cohort" / "manifest.json").read_bytes() == (
        world["cohort"] / "manifest.json"
    ).read_bytes()
    assert {
        "policy.toml",
        "gate.json",
        "audit/report.html",
        "officers/audit.json",
        "officers/audit.html",
        "cohort/labels.csv",
        "cohort/preview.png",
        "cohort/manifest.json",
    } <= set(manifest["files"])
    assert not {"release.json", "release.sig"} & set(manifest["files"])
    assert load_policy(rel / "policy.toml") == LENIENT
    assert json.loads((rel / "gate.json").read_text())["withheld_ids"] == [WITHHELD]
    assert (
        manifest["privacy"]["a"]["epsilon"] == 4.0
        and "formal" in manifest["privacy"]["a"]["protection"]
    )
    assert manifest["consortium_key_fingerprint"] == fingerprint(load_public_key(pub(world)))
    assert set(manifest["officers"]) == {"alice", "bob"} and manifest["required_approvals"] == 2


def _edit_json(path, **changes):
    path.write_text(
        json.dumps({**json.loads(path.read_text()), **changes}, indent=2, sort_keys=True) + "\n"
    )


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (lambda r: _edit_json(r / "release.json", required_approvals=0), "release.sig"),
        (
            lambda r: (r / "cohort" / "images" / "synth-healthy-00001.nii.gz").write_bytes(b"x"),
            "synth-healthy-00001",
        ),
        (
            lambda r: (r / "cohort" / "images" / "smuggled.nii.gz").write_bytes(b"x"),
            "smuggled.nii.gz: not listed",
        ),
        (
            lambda r: (r / "cohort" / "labels.csv").unlink(),
            "labels.csv: listed in release.json but missing",
        ),
        (
            lambda r: (r / "audit" / "report.html").write_text("<p>all fine</p>"),
            "audit/report.html: sha256",
        ),
        (
            lambda r: (r / "officers" / "audit.json").write_text("{}"),
            "officers/audit.json: sha256",
        ),
        (
            lambda r: (r / "policy.toml").write_text(
                (r / "policy.toml").read_text().replace("0.6", "0.9")
            ),
            "policy.toml",
        ),
        (lambda r: (r / "release.sig").unlink(), "release.sig: missing"),
    ],
)
def test_every_tampering_is_detected(rel, world, tamper, expected):
    tamper(rel)
    problems = verify_release(rel, pub(world))
    assert any(expected in p for p in problems), problems


def test_another_consortium_key_does_not_verify(rel, world):
    problems = verify_release(rel, world["keys"]["mallory"][1])
    assert len(problems) == 1 and "release.sig" in problems[0]


def test_approvals_bind_officer_key_and_release(rel, world, tmp_path):
    good = approve(world, rel, "alice")
    assert (
        check_approval(rel, good)
        == []
        == check_approval(json.loads((rel / "release.json").read_text()), good)
    )
    assert json.loads(good["statement"])["release_sha256"] == release_sha256(rel)
    # Signed with a key the consortium did not vouch for.
    forged = approve(world, rel, "alice", key=world["keys"]["mallory"][0])
    assert any("does not verify" in p for p in check_approval(rel, forged))
    # An officer not listed in release.json.
    with pytest.raises(ValueError, match="not listed"):
        approval_statement(rel, "mallory", "approve", "")
    outsider = dict(good, statement=good["statement"].replace('"alice"', '"mallory"'))
    assert any("not listed" in p for p in check_approval(rel, outsider))
    # An approval of another release: same cohort and cohort id, another candidate (another release.json).
    other = build_release(
        world["cohort"],
        world["audit"],
        tmp_path / "other",
        policy=replace(LENIENT, min_coverage=0.2),
        consortium_key=world["keys"]["consortium"][0],
        cohort_id="c1",
        server_privacy=world["privacy"],
        officer_keys={"alice": world["keys"]["alice"][1], "bob": world["keys"]["bob"][1]},
    )
    elsewhere = approve(world, other, "alice")
    assert check_approval(other, elsewhere) == []
    assert any("another release" in p for p in check_approval(rel, elsewhere))
    with pytest.raises(ValueError, match="approval refused"):
        write_approval(rel, elsewhere)
    # A stored approval that does not check is a problem of the release; a valid one is not.
    write_approval(rel, good)
    assert verify_release(rel, pub(world)) == []
    (rel / "approvals" / "bob.json").write_text(json.dumps(forged))
    assert any(p.startswith("approvals/bob.json") for p in verify_release(rel, pub(world)))


def test_status_pending_released_and_rejected(rel, world):
    assert release_status(rel, []) == "pending"
    a = approve(world, rel, "alice")
    write_approval(rel, a)
    assert release_status(rel, load_approvals(rel)) == "pending"
    assert (
        release_status(rel, [a, approve(world, rel, "alice")]) == "pending"
    )  # one officer counts once
    assert (
        release_status(rel, [a, approve(world, rel, "alice", key=world["keys"]["mallory"][0])])
        == "pending"
    )
    write_approval(rel, approve(world, rel, "bob"))
    assert release_status(rel, load_approvals(rel)) == "released"
    assert verify_release(rel, pub(world)) == []  # approvals/ sits outside the signed files
    with pytest.raises(ValueError, match="reason"):
        approval_statement(rel, "bob", "reject", "")
    write_approval(rel, approve(world, rel, "bob", "reject", "near-copy visible in the preview"))
    assert release_status(rel, load_approvals(rel)) == "rejected"


def test_failed_gate_is_built_but_blocked(world, tmp_path):
    strict = replace(LENIENT, max_withheld_share=0.05)
    out = build_release(
        world["cohort"],
        world["audit"],
        tmp_path / "blocked",
        policy=strict,
        server_privacy=world["privacy"],
        consortium_key=world["keys"]["consortium"][0],
        officer_keys={"alice": world["keys"]["alice"][1], "bob": world["keys"]["bob"][1]},
    )
    manifest = json.loads((out / "release.json").read_text())
    assert (
        manifest["gate"]["passed"] is False
        and json.loads((out / "gate.json").read_text())["passed"] is False
    )
    assert verify_release(out, pub(world)) == []
    assert (
        release_status(out, [approve(world, out, "alice"), approve(world, out, "bob")]) == "blocked"
    )


def test_build_refuses_bad_inputs_and_leaves_nothing(world, tmp_path):
    kw = dict(
        policy=LENIENT,
        server_privacy=world["privacy"],
        consortium_key=world["keys"]["consortium"][0],
        officer_keys={"alice": world["keys"]["alice"][1], "bob": world["keys"]["bob"][1]},
    )
    cohort = shutil.copytree(world["cohort"], tmp_path / "cohort")
    audit = shutil.copytree(world["audit"], tmp_path / "audit")
    with pytest.raises(FileExistsError):
        build_release(cohort, audit, world["built"], **kw)
    (audit / "audit.json").write_text(
        json.dumps(
            {
                **json.loads((audit / "audit.json").read_text()),
                "cohort": {"checkpoint_sha256": "f" * 64},
            }
        )
    )
    with pytest.raises(ValueError, match="not this cohort's audit"):
        build_release(cohort, audit, tmp_path / "out", **kw)
    (audit / "audit.json").unlink()
    with pytest.raises(ValueError, match="audit.json: missing"):
        build_release(cohort, audit, tmp_path / "out", **kw)
    (cohort / "labels.csv").write_text("synthetic_id,class\n")
    with pytest.raises(ValueError, match="labels.csv"):
        build_release(cohort, world["audit"], tmp_path / "out", **kw)
    with pytest.raises(ValueError, match="requires 2 approvals"):
        build_release(
            world["cohort"],
            world["audit"],
            tmp_path / "out",
            **{**kw, "officer_keys": {"alice": world["keys"]["alice"][1]}},
        )
    alice = world["keys"]["alice"][1]
    with pytest.raises(ValueError, match="same public key"):  # one key, one vote
        build_release(
            world["cohort"],
            world["audit"],
            tmp_path / "out",
            **{**kw, "officer_keys": {"alice": alice, "alias": alice}},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit",
        "cohort",
    ]  # no half-written release


def test_cli_keys_gate_build_approve_verify(world, tmp_path, capsys):
    keys = world["keys"]
    assert main(["keys", "new", "--name", "officer", "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k" / "officer.key").exists()
    policy = tmp_path / "policy.toml"
    policy.write_text((world["built"] / "policy.toml").read_text())
    gate = ["release", "gate", "--audit", str(world["audit"]), "--policy", str(policy)]
    gate += ["--privacy", str(world["privacy"])]
    assert main(gate) == 0
    assert "max_membership_auc" in capsys.readouterr().out
    out = tmp_path / "rel"
    assert (
        main(
            [
                "release",
                "build",
                "--cohort",
                str(world["cohort"]),
                "--audit",
                str(world["audit"]),
                "--policy",
                str(policy),
                "--privacy",
                str(world["privacy"]),
                "--consortium-key",
                str(keys["consortium"][0]),
                "--officer",
                f"alice={keys['alice'][1]}",
                "--officer",
                f"bob={keys['bob'][1]}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "gate: PASSED" in capsys.readouterr().out
    for officer in ("alice", "bob"):
        assert (
            main(
                [
                    "release",
                    "approve",
                    str(out),
                    "--officer",
                    officer,
                    "--key",
                    str(keys[officer][0]),
                ]
            )
            == 0
        )
    assert "status: released" in capsys.readouterr().out
    verify = ["release", "verify", str(out), "--consortium-key", str(keys["consortium"][1])]
    assert main(verify) == 0
    (out / "cohort" / "dataset.json").write_text("{}")
    assert main(verify) == 1
    assert "FAIL cohort/dataset.json" in capsys.readouterr().out
    assert (
        main(
            [
                "release",
                "approve",
                str(out),
                "--officer",
                "bob",
                "--key",
                str(keys["bob"][0]),
                "--reject",
            ]
        )
        == 2
    )
    policy.write_text(
        policy.read_text().replace("max_withheld_share = 0.2", "max_withheld_share = 0.01")
    )
    assert main(gate) == 1


def test_reports_are_rendered_from_the_audit_json_that_ships(world, tmp_path):
    """Attack (issue 13): an audit folder whose audit.html says something else than its audit.json. The release
    ships reports rendered at build from the audit.json it ships, each naming its sha256."""
    audit = shutil.copytree(world["audit"], tmp_path / "audit")
    (audit / "audit.html").write_text("<h2>Verdict: PASS</h2><p>nothing to see</p>")
    out = build_release(
        world["cohort"],
        audit,
        tmp_path / "rel",
        policy=LENIENT,
        server_privacy=world["privacy"],
        consortium_key=world["keys"]["consortium"][0],
        officer_keys={"alice": world["keys"]["alice"][1], "bob": world["keys"]["bob"][1]},
    )
    manifest = json.loads((out / "release.json").read_text())
    shipped = (out / "officers" / "audit.json").read_bytes()
    assert shipped == (audit / "audit.json").read_bytes()
    sha = hashlib.sha256(shipped).hexdigest()
    assert manifest["audit_sha256"] == sha and manifest["audit_verdict"] == "fail"
    officers = (out / "officers" / "audit.html").read_text()
    partner = (out / "audit" / "report.html").read_text()
    assert "nothing to see" not in officers + partner
    assert (
        "Verdict: FAIL" in officers and "before the flagged images were withheld: FAIL" in partner
    )
    assert sha in officers and sha in partner
    assert WITHHELD in officers and WITHHELD not in partner  # flagged ids: officers only
    assert "1</b> synthetic image(s) were withheld" in partner
