"""End to end over a real deployment: SuperLink + SuperNodes over TLS with node authentication on loopback.

Three phantom hospitals; one has already spent its privacy budget on the same patients in an earlier run, so it
must refuse and the run must go on with the other two. Two rounds (autoencoder, then diffusion) with DP-SGD at
the sites, a cohort whose manifest verifies, and the federated audit report.
"""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from client.client_app import SITE_LOG
from client.task import load_training_data
from common.config import RunConfig, SiteConfig, model_config
from common.phantoms import make_phantom_sites
from common.signing import generate_keypair
from privacy.policy import DEFAULT_POLICY
from server.demo import write_app_dir
from server.deployment import run_federation
from server.release.manifest import build_release, release_status, verify_release
from server.synthesis import verify_cohort
from tests.conftest import record_spend

pytestmark = pytest.mark.slow


def test_tls_federation_trains_synthesizes_and_audits(tmp_path, node_configs_for, tiny_run):
    sites = make_phantom_sites(tmp_path / "sites", n_sites=3, n_subjects=16, size=32, seed=11)
    # one torch thread per site, as the demo gives three sites on two cores: more oversubscribes the CPU
    node_configs = node_configs_for(sites, tmp_path / "state", threads=1)
    node_configs[0]["report-training-stats"] = True  # site-0 opts in; site-1 keeps the default
    # site-2 spent its budget on these patients before: its ledger must make it refuse.
    exhausted = SiteConfig.from_flwr(node_configs[2])
    train, _ = load_training_data(exhausted, model_config("tiny"))
    record_spend(
        exhausted,
        "earlier",
        train.patients,
        noise_multiplier=0.5,
        sample_rate=1.0,
        steps=500,
        delta=1e-3,
    )
    run_dir = tmp_path / "run"
    run = tiny_run(run_dir, synthesize_per_class=3)
    app_dir = write_app_dir(tmp_path / "app", run)
    lines = []
    result = run_federation(
        app_dir,
        tmp_path / "deploy",
        node_configs,
        run.to_flwr(),
        insecure=False,
        timeout_s=600,
        progress=lines.append,
    )
    assert result.returncode == 0, "\n".join(lines[-40:])

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["completed_round"] == 2
    assert record["sites"]["site-2"]["status"] == "refused"
    assert "budget" in record["sites"]["site-2"]["reason"]
    assert {record["sites"][s]["status"] for s in ("site-0", "site-1")} == {"active"}

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ok = [m for m in metrics if m["status"] == "ok"]
    assert sorted((m["round"], m["site"]) for m in ok) == [
        (1, "site-0"),
        (1, "site-1"),
        (2, "site-0"),
        (2, "site-1"),
    ]
    trained = {
        s.name: len(load_training_data(SiteConfig.from_flwr(c), model_config("tiny"))[0])
        for s, c in zip(sites, node_configs, strict=False)
    }
    assert all(m["seconds"] > 0 and m["steps"] > 0 for m in ok)
    opted_in = [m for m in ok if m["site"] == "site-0"]
    assert all(m["loss"] > 0 and m["num-examples"] == trained["site-0"] for m in opted_in)
    # by default neither the loss nor the patient count leaves a site (issue 9, item 5)
    assert not any("loss" in m or "num-examples" in m for m in ok if m["site"] == "site-1")
    # ... they stay in the site's own log, which the real ClientApp processes wrote, with the refusal at site-2
    site_logs = {c["site-name"]: Path(c["state-dir"]) / SITE_LOG for c in node_configs}
    for s in ("site-0", "site-1"):
        assert len(re.findall(rf"site {s} round \d \w+: loss", site_logs[s].read_text())) == 2, s
    assert "site site-2 refuses round 1" in site_logs["site-2"].read_text()

    record_privacy = json.loads((run_dir / "privacy.json").read_text())
    assert record_privacy["client_level"]["protection"] == "none"  # central DP is off in this run
    privacy = record_privacy["sample_level"]
    assert record_privacy["aggregation_weights"].startswith("uniform")
    assert privacy["site-0"]["patients_trained_on"] == trained["site-0"]
    assert "patients_trained_on" not in privacy["site-1"]
    assert privacy["site-1"]["training_stats_reported"] is False
    for s in ("site-0", "site-1"):
        assert 0 < float(privacy[s]["epsilon"]) <= 8.0
        assert "formal sample-level DP" in privacy[s]["protection"]
    assert float(privacy["site-2"]["epsilon"]) > 8.0  # what it had already spent, reported honestly

    cohort = run_dir / "cohort"
    assert verify_cohort(cohort) == []
    manifest = json.loads((cohort / "manifest.json").read_text())
    assert manifest["n_images"] == 6 and set(manifest["privacy"]["sample_level"]) == {
        "site-0",
        "site-1",
        "site-2",
    }
    assert (run_dir / "checkpoints" / "round-002.pt").exists()

    audit = json.loads((run_dir / "audit" / "audit.json").read_text())
    # Every site audits (site-2 too: it holds patients the model never saw) unless its hold-out is too small, and
    # then the report names it among the failures.
    assert {"site-0", "site-1"} <= set(audit["sites"])
    assert "site-2" in audit["sites"] or any("site" in f or "node" in f for f in audit["failures"])
    assert "<html" in (run_dir / "audit" / "audit.html").read_text().lower()
    # each site says where its audit's time went (its log and the server's progress line show the same)
    assert all(
        set(site["seconds"])
        == {"data", "memorization", "extraction", "membership", "fidelity", "utility"}
        for site in audit["sites"].values()
    )

    # The real cohort and audit become a signed release candidate that verifies; with 4 hold-out patients per site
    # no membership attack has the 10 records the default policy needs, so the gate refuses ("not measured").
    keys = tmp_path / "keys"
    consortium, consortium_pub = generate_keypair(keys, "consortium")
    officer_pub = generate_keypair(keys, "officer")[1]
    release = build_release(
        cohort,
        run_dir / "audit",
        tmp_path / "release",
        policy=replace(DEFAULT_POLICY, required_approvals=1),
        consortium_key=consortium,
        officer_keys={"officer": officer_pub},
        server_privacy=run_dir / "privacy.json",
    )
    assert verify_release(release, consortium_pub) == []
    gate = json.loads((release / "gate.json").read_text())
    # The sites that trained claim at the audit exactly what the server recorded while they trained.
    claims = next(r for r in gate["rules"] if r["rule"] == "claims_match_training")
    assert "site-0" not in claims["where"] and "site-1" not in claims["where"], claims
    auc_rule = next(r for r in gate["rules"] if r["rule"] == "max_membership_auc")
    assert (
        not gate["passed"]
        and not auc_rule["passed"]
        and auc_rule["note"].startswith("not measured")
    )
    assert release_status(release, []) == "blocked"

    # Resume with one more round: rounds 1-2 are not redone. site-1 now fails (its labels are gone) and drops out,
    # site-2 still refuses, so only one site can train: the run stops cleanly and says why.
    (sites[1] / "labels.csv").unlink()
    more = RunConfig(**{**run.__dict__, "num_server_rounds": 3})
    result = run_federation(
        write_app_dir(tmp_path / "app2", more),
        tmp_path / "deploy2",
        node_configs,
        more.to_flwr(),
        timeout_s=600,
        progress=lines.append,
    )
    assert result.returncode == 0
    assert any("resuming run" in line and "after round 2" in line for line in lines)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "stopped" and "min-sites" in record["reason"]
    assert (
        record["sites"]["site-1"]["status"] == "dropped"
        and "labels.csv" in record["sites"]["site-1"]["reason"]
    )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics if m["status"] == "ok"].count(
        1
    ) == 2  # round 1 was not trained again
    assert not (run_dir / "checkpoints" / "round-003.pt").exists()
