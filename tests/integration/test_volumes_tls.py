"""3-D end to end, as a user runs it: `fedsynth demo --dims 3` (the `tiny3d` preset) over a real deployment,
a SuperLink and SuperNodes over TLS with node authentication on loopback.

Three phantom hospitals of 32^3 volumes and a public set of healthy volumes: public pretraining, one DP autoencoder
round and one DP diffusion round at the sites (book-keeping DP-SGD), a cohort of NIfTI volumes with their affines
and spacing, the federated audit on volumes, a preview of three orthogonal mid-slices, and a signed release
candidate that verifies. Small (12 patients per site) so that it fits CI: the audit may call membership
inference unassessable at this size, and the gate may block; both must be said, and the release still signed.
"""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from server.release.manifest import verify_release
from server.synthesis import NOMINAL_FOV_MM, read_cohort, verify_cohort
from tests.conftest import run_demo

pytestmark = pytest.mark.slow


def test_the_3d_demo_trains_synthesizes_audits_and_signs_volumes_over_tls(tmp_path):
    out = tmp_path / "demo"
    # the utility CNNs at 20 steps as in every deployment test (tests/integration/conftest.py): their figures are
    # not what this test reads
    proc = run_demo(
        out, "--dims", "3", "--subjects", "12", "--threads", "1", "--utility-cnn-steps", "20"
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "3 sites, 2 DP rounds" in proc.stdout and "TLS + SuperNode authentication" in proc.stdout
    run_dir = out / "run"

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["completed_round"] == 2, record
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ok = {(m["round"], m["site"]) for m in metrics if m["status"] == "ok"}
    assert ok == {(r, f"site-{i}") for r in (1, 2) for i in range(3)}, metrics
    privacy = json.loads((run_dir / "privacy.json").read_text())["sample_level"]
    for s in ("site-0", "site-1", "site-2"):
        assert 0 < float(privacy[s]["epsilon"]) <= 10.0
        assert "formal sample-level DP" in privacy[s]["protection"]

    cohort_dir = run_dir / "cohort"
    assert verify_cohort(cohort_dir) == []
    cohort = read_cohort(cohort_dir)
    assert cohort.spatial_dims == 3 and len(cohort.ids) == 8
    img = nib.load(cohort_dir / "images" / f"{cohort.ids[0]}.nii.gz")
    assert img.shape == (32, 32, 32) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms(), NOMINAL_FOV_MM / 32)
    volumes = cohort.images()
    assert volumes.shape == (8, 1, 32, 32, 32) and 0 <= volumes.min() and volumes.max() <= 1
    # the preview: a row per class and view (sagittal, coronal, axial mid-slices of each volume)
    assert Image.open(cohort_dir / "preview.png").size[1] >= 2 * 3 * 32

    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert set(audit["sites"]) == {"site-0", "site-1", "site-2"}, audit.get("failures")
    for site in audit["sites"].values():  # measured on volumes: distances, features, fidelity
        assert {"pixel", "feature", "extraction"} <= set(site["memorization"])
        assert site["fidelity"]["overall"]
    html = (run_dir / "audit" / "audit.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64" in html
    summary = proc.stdout[proc.stdout.index("== fedsynth demo: summary ==") :]
    assert f"audit:     {audit['verdict']['status'].upper()}" in summary

    # the release candidate is signed whatever the gate said, and verifies against the demo's consortium key
    assert verify_release(out / "release", out / "keys" / "consortium.pub") == []
    gate = json.loads((out / "release" / "gate.json").read_text())
    assert ("gate:      passed" in summary) == bool(gate["passed"])
