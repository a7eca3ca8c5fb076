"""A small real demo, as a newcomer's terminal sees it (stdout captured, not a TTY): progress, no noise, and a
summary that agrees with run.json, privacy.json, audit.json and the release's status."""

import json
import re
from collections import Counter

import pytest

from server.demo import SUMMARY_TITLE
from server.release.manifest import load_approvals, release_status
from tests.conftest import run_demo

pytestmark = pytest.mark.slow
THIRD_PARTY_NOISE = (
    "nvImageCodec",
    "Recommended property",
    "Flower App configuration warnings",
    "fraction_evaluate",
    "UserWarning",
    "FutureWarning",
    "DeprecationWarning",
    "Successfully installed",
    "Starting logstream",
)


def test_small_demo_prints_progress_and_a_summary_that_matches_the_run(tmp_path):
    out = tmp_path / "demo"
    # the utility classifiers' figures are not read here: a few steps (the recipe's are minutes on a loaded CPU)
    proc = run_demo(
        out, "--preset", "tiny", "--subjects", "6", "--rounds", "1", "--utility-cnn-steps", "20"
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]

    # readable in a CI log: no control characters, nothing repeated, no third-party chatter
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", proc.stdout)
    repeated = {line: n for line, n in Counter(lines).items() if n > 3}
    assert not repeated, repeated
    for noise in THIRD_PARTY_NOISE:
        assert noise not in text, noise
    assert proc.stderr == ""

    # one display per stage (at 6 patients one phantom site has too few hold-out patients to audit: the audit
    # line must say how many answered, as audit.json records them)
    audit = json.loads((out / "run" / "audit" / "audit.json").read_text())
    for stage in (
        "public pretraining: autoencoder: 40/40 steps",
        "public pretraining: diffusion UNet: 40/40 steps",
        "round 1/1 (diffusion): 3/3 sites answered",
        "synthesis: 8/8 images",
        f"audit: {len(audit['sites'])}/3 sites answered",
    ):
        assert any(stage in line for line in lines), f"{stage!r} not in:\n{proc.stdout[-3000:]}"

    # the full log went to the run folder, with what the terminal left out
    log = (out / "run" / "demo.log").read_text()
    assert "Starting logstream" in log and "fedsynth-progress" in log

    # the summary block agrees with the files
    summary = proc.stdout[proc.stdout.index(SUMMARY_TITLE) :]
    record = json.loads((out / "run" / "run.json").read_text())
    assert f"run:       {record['status']}, 1/1 rounds" in summary
    privacy = json.loads((out / "run" / "privacy.json").read_text())["sample_level"]
    assert set(privacy) == {"site-0", "site-1", "site-2"}
    for site, p in privacy.items():
        assert f"{site} epsilon {float(p['epsilon']):.2f} of 10.00: {p['protection']}" in summary
    assert "no client-level DP (central DP off)" in summary
    # the run started from the public checkpoint: healthy-only public data, recorded in run.json and the manifest
    pre = record["pretraining"]
    assert pre["public_class_counts"] == {"healthy": 24, "lesion": 0}
    assert "public:    pretrained on 24 public images (24 healthy, 0 lesion)" in summary
    manifest = json.loads((out / "run" / "cohort" / "manifest.json").read_text())
    assert manifest["pretraining"]["checkpoint_sha256"] == pre["checkpoint_sha256"]
    assert manifest["pretraining"]["public_data_sha256"] == pre["public_data_sha256"]
    assert "cohort:    8 synthetic images (4 healthy, 4 lesion)" in summary
    verdict = audit["verdict"]
    assert f"audit:     {verdict['status'].upper()}: {verdict['reasons'][0]}" in summary
    for stage in ("time:", "public pretraining", "federated rounds", "synthesis", "total"):
        assert stage in summary, stage

    # the next step is one that works: approve and pull only when the gate let the cohort through
    status = release_status(out / "release", load_approvals(out / "release"))
    gate = json.loads((out / "release" / "gate.json").read_text())
    if gate["passed"]:
        assert status == "pending"
        assert "gate:      passed" in summary
        assert "fedsynth portal serve --data" in summary and "fedsynth pull" in summary
    else:
        assert status == "blocked"
        assert "gate:      BLOCKED" in summary
        for rule in gate["rules"]:
            assert (f"- {rule['rule']}:" in summary) == (not rule["passed"])
        assert "nothing can be approved or pulled" in summary
        assert "fedsynth pull" not in summary and "fedsynth portal approve" not in summary
