"""The SuperLink crashes mid-run and comes back: its state (registered SuperNodes, runs) is in a database file.

Real deployment, TLS and SuperNode authentication, two phantom hospitals. The SuperLink is killed (SIGKILL)
while a round is under way, after the sites have started paying for it, and started again with the same database
and port: the SuperNodes reconnect by themselves with their keys (the registrations survive). Flower 1.41 does not
carry a ServerApp across a SuperLink restart (its task token is gone), so the operator submits the run again with
the same run-dir and it resumes from its last checkpoint. Checked against the sites' privacy ledgers, the source of
truth: no round is lost or trained twice except the one in flight, every mechanism a site ran is in its ledger once,
and what the run reports is exactly what the ledgers hold.

The database file is on tmpfs when the machine has one.

Known to fail on a heavily loaded machine (xfail, not strict: it runs, and passes where Flower keeps up). Measured
on this project's shared 2-core box at load 20-29, 4 attempts: Flower 1.41's SQLite state ("database is locked",
its 5 s busy timeout, on disk and on tmpfs alike) made the SuperLink answer HTTP 500; a SuperNode that gets a 500
on pull-messages stops working, and the SuperLink's SuperExec exits on one and is never started again, so a run
submitted after that never gets a ServerApp. The restart itself (registrations kept, SuperNodes reconnecting with
their keys, the run failing and resuming from its checkpoint) worked in every attempt that got that far.
"""

import json
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client.task import open_ledger
from common.config import RunConfig, SiteConfig
from common.phantoms import make_phantom_sites
from server.checkpoint import Checkpoint
from server.demo import write_app_dir
from server.deployment import (
    DeploymentError,
    local_superlink,
    local_supernodes,
    restart_superlink,
    run_app,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xfail(
        strict=False,
        reason="Flower 1.41's SQLite state answers 500 under heavy CPU load (database is locked), which stops "
        "SuperNodes and the SuperExec (measured at load 20+ on 2 cores; see the module docstring)",
    ),
]


def _ledger(config: dict):
    return open_ledger(SiteConfig.from_flwr(config))


@pytest.fixture
def database_dir(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path / "superlink-state"
        return
    folder = Path(tempfile.mkdtemp(prefix="fedsynth-superlink-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_superlink_killed_mid_run_restarts_from_its_database_and_the_run_resumes(
    tmp_path, wait_for_file, database_dir
):
    sites = make_phantom_sites(tmp_path / "sites", n_sites=2, n_subjects=8, size=32, seed=17)
    node_configs = [
        {
            "site-dir": str(s),
            "site-name": s.name,
            "state-dir": str(tmp_path / "state" / s.name),
            "epsilon": 8.0,
            "threads": 1,
        }
        for s in sites
    ]
    run_dir = tmp_path / "run"
    run = RunConfig(
        preset="tiny",
        num_server_rounds=2,
        autoencoder_rounds=1,
        batch_size=4,
        min_sites=2,
        run_dir=str(run_dir),
        synthesize_per_class=0,
        audit=False,
        round_timeout=300.0,
    )
    app_dir = write_app_dir(tmp_path / "app", run)
    database = database_dir / "superlink.db"
    lines: list[str] = []
    with local_superlink(
        tmp_path / "deploy", len(sites), database=database, progress=lines.append
    ) as link:
        with local_supernodes(link, node_configs, progress=lines.append):
            with ThreadPoolExecutor(max_workers=1) as pool:
                first = pool.submit(
                    run_app, link, app_dir, run.to_flwr(), timeout_s=600, progress=lines.append
                )
                wait_for_file(run_dir / "checkpoints" / "round-001.pt", first, timeout=420)
                # kill while round 2 is under way: as soon as a site has paid for it
                ledgers = [_ledger(c) for c in node_configs]
                deadline = time.time() + 300
                while not any(e["server_round"] >= 2 for led in ledgers for e in led.entries()):
                    assert time.time() < deadline and not first.done(), "round 2 never started"
                    time.sleep(0.5)
                checkpoint_before = Checkpoint.load(run_dir / "checkpoints" / "latest.pt")
                done_before = checkpoint_before.run_state.completed_round
                restart_superlink(link, progress=lines.append)
                try:
                    first_result = first.result(timeout=600)
                except DeploymentError as err:  # Flower 1.41: the ServerApp does not survive
                    first_result = None
                    assert "finished:failed" in str(err) or "status" in str(err)
            assert database.exists()
            if first_result is None:  # the operator submits the run again: it resumes
                result = run_app(link, app_dir, run.to_flwr(), timeout_s=600, progress=lines.append)
                assert result.status == "finished:completed"
                assert any(
                    f"resuming run {checkpoint_before['run_state']['run_id']} after round {done_before}"
                    in line
                    for line in lines
                ), "\n".join(lines[-40:])
    assert any("SuperLink up again" in line for line in lines)
    superlink_log = (tmp_path / "deploy" / "logs" / "superlink.log").read_text()
    assert superlink_log.count("Starting Flower SuperLink") == 2

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["completed_round"] == 2
    assert {s["status"] for s in record["sites"].values()} == {"active"}
    run_id = record["run_id"]
    assert run_id == checkpoint_before["run_state"]["run_id"]  # the same run, resumed
    for r in (1, 2):  # no round lost
        assert (
            Checkpoint.load(run_dir / "checkpoints" / f"round-{r:03d}.pt").run_state.completed_round
            == r
        )

    privacy = json.loads((run_dir / "privacy.json").read_text())["sample_level"]
    for config in node_configs:
        name = config["site-name"]
        entries = [e for e in _ledger(config).entries() if e["run_id"] == run_id]
        per_round = Counter(e["server_round"] for e in entries)
        assert set(per_round) == {1, 2}, (name, per_round)
        # rounds the checkpoint held before the crash were not trained again; the round in flight may have
        # been paid for twice (once before the crash, once when redone): both are in the ledger, each once
        for r in range(1, done_before + 1):
            assert per_round[r] == 1, (name, per_round)
        assert per_round[done_before + 1] in (1, 2), (name, per_round)
        for r in range(done_before + 2, 3):
            assert per_round[r] == 1, (name, per_round)
        # what the run reports is what the site's ledger holds: nothing lost, nothing counted twice
        ledger_eps = _ledger(config).epsilon(privacy[name]["delta"], privacy[name]["accountant"])
        assert float(privacy[name]["epsilon"]) == pytest.approx(ledger_eps, rel=1e-9)
        assert 0 < ledger_eps <= 8.0
