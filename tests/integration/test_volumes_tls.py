"""3-D end to end over a real deployment: SuperLink + SuperNodes over TLS with node authentication on loopback.

Two phantom hospitals of 32^3 volumes, the `tiny3d` preset: one autoencoder round and one diffusion round, both with
book-keeping DP-SGD at the sites, a cohort of NIfTI volumes, the federated audit on volumes, and a signed release
candidate that verifies.
"""

import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from common.phantoms import make_phantom_sites
from common.signing import generate_keypair
from privacy.policy import DEFAULT_POLICY
from server.demo import write_app_dir
from server.deployment import run_federation
from server.release.manifest import build_release, verify_release
from server.synthesis import NOMINAL_FOV_MM, read_cohort, verify_cohort

pytestmark = pytest.mark.slow


def test_tls_federation_trains_synthesizes_and_audits_volumes(tmp_path, node_configs_for, tiny_run):
    sites = make_phantom_sites(
        tmp_path / "sites", n_sites=2, n_subjects=10, dims=3, size=32, seed=21
    )
    node_configs = node_configs_for(sites, tmp_path / "state", threads=1)
    run_dir = tmp_path / "run"
    run = tiny_run(run_dir, preset="tiny3d", synthesize_per_class=2, round_timeout=600.0)
    lines = []
    result = run_federation(
        write_app_dir(tmp_path / "app", run),
        tmp_path / "deploy",
        node_configs,
        run.to_flwr(),
        insecure=False,
        timeout_s=900,
        progress=lines.append,
    )
    assert result.returncode == 0, "\n".join(lines[-40:])

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["completed_round"] == 2, record
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ok = [m for m in metrics if m["status"] == "ok"]
    assert sorted((m["round"], m["site"]) for m in ok) == [
        (1, "site-0"),
        (1, "site-1"),
        (2, "site-0"),
        (2, "site-1"),
    ]
    privacy = json.loads((run_dir / "privacy.json").read_text())["sample_level"]
    for s in ("site-0", "site-1"):
        assert 0 < float(privacy[s]["epsilon"]) <= 8.0
        assert "formal sample-level DP" in privacy[s]["protection"]

    cohort_dir = run_dir / "cohort"
    assert verify_cohort(cohort_dir) == []
    cohort = read_cohort(cohort_dir)
    assert cohort.spatial_dims == 3 and len(cohort.ids) == 4
    img = nib.load(cohort_dir / "images" / f"{cohort.ids[0]}.nii.gz")
    assert img.shape == (32, 32, 32) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms(), NOMINAL_FOV_MM / 32)
    volumes = cohort.images()
    assert volumes.shape == (4, 1, 32, 32, 32) and 0 <= volumes.min() and volumes.max() <= 1

    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    assert set(audit["sites"]) == {"site-0", "site-1"}, audit.get("failures")
    for site in audit["sites"].values():  # measured on volumes: distances, features, fidelity
        mem = site["memorization"]
        assert mem and mem.get("n_synthetic", 4) == 4
        assert site["fidelity"]
    html = (run_dir / "audit" / "audit.html").read_text()
    assert "<html" in html.lower() and "data:image/png;base64" in html

    keys = tmp_path / "keys"
    consortium, consortium_pub = generate_keypair(keys, "consortium")
    release = build_release(
        cohort_dir,
        run_dir / "audit",
        tmp_path / "release",
        policy=replace(DEFAULT_POLICY, required_approvals=1),
        consortium_key=consortium,
        officer_keys={"officer": generate_keypair(keys, "officer")[1]},
        server_privacy=run_dir / "privacy.json",
    )
    assert verify_release(release, consortium_pub) == []
