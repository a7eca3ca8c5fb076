"""Central (client-level) DP on top of the sites' sample-level DP, in the real deployment: SuperLink + two
SuperNodes over TLS with node authentication. Deliberately tiny (2 sites, 2 rounds, 8 patients each, no audit):
the full federation, synthesis and audit are covered by test_federation_tls.py; this checks that the ClientApp's
clipping mod, Flower's DP strategy wrapper and the accountant work across real processes, and that the run's
records name both kinds of protection.
"""

import json
import math

import pytest

from common.phantoms import make_phantom_sites
from server.demo import write_app_dir
from server.deployment import run_federation

pytestmark = pytest.mark.slow


def test_central_dp_with_sample_level_dp_over_tls(tmp_path, node_configs_for, tiny_run):
    sites = make_phantom_sites(tmp_path / "sites", n_sites=2, n_subjects=8, size=32, seed=5)
    node_configs = node_configs_for(sites, tmp_path / "state", threads=1)
    run_dir = tmp_path / "run"
    run = tiny_run(
        run_dir,
        synthesize_per_class=1,
        audit=False,
        central_dp="client-side-fixed",
        central_dp_noise_multiplier=1.0,
        central_dp_clipping_norm=0.1,
    )
    lines: list[str] = []
    result = run_federation(
        write_app_dir(tmp_path / "app", run),
        tmp_path / "deploy",
        node_configs,
        run.to_flwr(),
        insecure=False,
        timeout_s=480,
        progress=lines.append,
    )
    assert result.returncode == 0, "\n".join(lines[-40:])

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["completed_round"] == 2

    privacy = json.loads((run_dir / "privacy.json").read_text())
    for s in ("site-0", "site-1"):
        site = privacy["sample_level"][s]
        assert "formal sample-level DP" in site["protection"] and 0 < float(site["epsilon"]) <= 8.0
    client = privacy["client_level"]
    assert client["protection"].startswith("client-level DP, replace-one")
    assert client["neighboring_relation"] == "replace-one"
    assert client["rounds"] == 2 and client["sites"] == 2 and client["delta"] == pytest.approx(1e-5)
    assert math.isfinite(client["epsilon"]) and client["epsilon"] > 0
    assert client["noise_std_on_aggregate"] == pytest.approx(1.0 * 0.1 / 2)

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    agg = [m for m in metrics if m["status"] == "aggregated"]
    assert [m["round"] for m in agg] == [1, 2]
    assert (
        0
        < agg[0]["client-level-epsilon"]
        < agg[1]["client-level-epsilon"]
        == pytest.approx(client["epsilon"])
    )
    assert sorted((m["round"], m["site"]) for m in metrics if m["status"] == "ok") == [
        (1, "site-0"),
        (1, "site-1"),
        (2, "site-0"),
        (2, "site-1"),
    ]
    assert any("client-level epsilon so far" in line for line in lines)
    assert client["ledger"] == str(tmp_path / "central_dp_ledger.sqlite")
    assert client["releases_in_ledger"] == 2 and set(client["epsilon_per_site"]) == {
        "site-0",
        "site-1",
    }
    # A tiny model's update after a round of DP-SGD is longer than 0.1 (about 0.25 for the autoencoder, 0.4 for the
    # UNet): the sites' mod clipped it, so the server, which re-checks every update, never had to.
    assert not any("clipped at the server" in line for line in lines)

    manifest = json.loads((run_dir / "cohort" / "manifest.json").read_text())
    assert manifest["privacy"]["client_level"]["epsilon"] == pytest.approx(client["epsilon"])
    assert set(manifest["privacy"]["sample_level"]) == {"site-0", "site-1"}
