"""The SuperLink crashes mid-run and comes back on its database: the run survives in place.

Real deployment, TLS and SuperNode authentication, two phantom hospitals. The SuperLink is killed with SIGKILL at a
fixed point, while round 2 is under way (round 1 is checkpointed and a site has already paid for round 2 in its
ledger, so its update is in flight), and `run_app`'s supervision starts it again on the same database and port,
as systemd's `Restart=always` would. Its state (registered SuperNodes, the run, the messages, the ServerApp's task
token) is in that file; the SuperExec and the ServerApp are processes of their own (`--isolation process`), so
they outlive the SuperLink and reconnect, as do the SuperNodes. Checked against the sites' privacy ledgers, the
source of truth: the same Flower run finishes (not a resubmitted one), no round is lost or trained twice, every
mechanism a site ran is in its ledger exactly once, and what the run reports is exactly what the ledgers hold.

The second test reboots the whole coordinating machine instead (SuperLink, SuperExec and ServerApp killed at
once) at the worst point: both sites have trained round 2, the run's last, and released their updates, but the
server never aggregated them, so round 2 is not checkpointed. The ServerApp is gone, so `run_app` stops the run,
submits it again, and it resumes after round 1 and asks for round 2 again: each site answers with the update it
released (client/replay.py), training nothing and spending nothing, so the run finishes with each round in each
ledger exactly once (before replay, the sites refused the redo of a last round: no budget left).

The database file is on tmpfs when the machine has one.
"""

import json
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client.task import open_ledger
from common.config import SiteConfig
from common.phantoms import make_phantom_sites
from server.checkpoint import Checkpoint
from server.demo import write_app_dir
from server.deployment import local_superlink, local_supernodes, run_app
from server.deployment import serverapps as deployment_serverapps

pytestmark = pytest.mark.slow


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


@pytest.fixture
def federation(tmp_path, node_configs_for, tiny_run):
    """Two phantom hospitals, a tiny two-round run (autoencoder, then diffusion) and its app folder."""
    sites = make_phantom_sites(tmp_path / "sites", n_sites=2, n_subjects=8, size=32, seed=17)
    node_configs = node_configs_for(sites, tmp_path / "state", threads=1)
    run = tiny_run(tmp_path / "run", synthesize_per_class=0, audit=False)
    app_dir = write_app_dir(tmp_path / "app", run)
    return node_configs, run, app_dir


def _wait_until(
    condition, what: str, running, lines: list[str], link, timeout: float, every: float
) -> None:
    """Until `condition()`; fail with the run's log tail and the last lines of every Flower process's log (SuperLink,
    SuperExec, SuperNodes) if the run ends first or `timeout` seconds pass, so that a failure says where it stood."""
    deadline = time.time() + timeout
    while not condition():
        ended = running is not None and running.done()
        if ended or time.time() > deadline:
            tails = [
                f"--- {log.name}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                for log in sorted(link.procs.log_dir.glob("*.log"))
            ]
            why = (
                f"the run ended first ({running.result()!r})"
                if ended
                else f"not within {timeout:.0f}s"
            )
            pytest.fail(f"{what}: {why}; the run's log:\n" + "\n".join(lines[-60:] + tails))
        time.sleep(every)


def _assert_each_round_charged_once(run_dir: Path, node_configs: list[dict]) -> str:
    """run.json says completed with both rounds checkpointed; every site's ledger holds each round of the run
    exactly once; privacy.json reports exactly the ledgers' spend. Returns the run id."""
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["completed_round"] == 2
    assert {s["status"] for s in record["sites"].values()} == {"active"}
    run_id = record["run_id"]
    for r in (1, 2):  # no round lost
        assert (
            Checkpoint.load(run_dir / "checkpoints" / f"round-{r:03d}.pt").run_state.completed_round
            == r
        )
    privacy = json.loads((run_dir / "privacy.json").read_text())["sample_level"]
    for config in node_configs:
        name = config["site-name"]
        ledger = _ledger(config)
        entries = ledger.entries()
        # every mechanism the site ran is in its ledger once, and it ran each round of the run once
        assert Counter((e["run_id"], e["server_round"]) for e in entries) == {
            (run_id, 1): 1,
            (run_id, 2): 1,
        }, (name, entries)
        # what the run reports is what the site's ledger holds: nothing lost, nothing counted twice
        ledger_eps = ledger.epsilon(privacy[name]["delta"], privacy[name]["accountant"])
        assert float(privacy[name]["epsilon"]) == pytest.approx(ledger_eps, rel=1e-9)
        assert 0 < ledger_eps <= 8.0
    return run_id


def test_superlink_killed_mid_round_restarts_from_its_database_and_the_run_survives(
    tmp_path, wait_for_file, database_dir, federation
):
    node_configs, run, app_dir = federation
    run_dir = Path(run.run_dir)
    database = database_dir / "superlink.db"
    lines: list[str] = []
    with local_superlink(
        tmp_path / "deploy", len(node_configs), database=database, progress=lines.append
    ) as link:
        with local_supernodes(link, node_configs, progress=lines.append):
            with ThreadPoolExecutor(max_workers=1) as pool:
                running = pool.submit(
                    run_app, link, app_dir, run.to_flwr(), timeout_s=600, progress=lines.append
                )
                wait_for_file(run_dir / "checkpoints" / "round-001.pt", running, timeout=420)
                # the fixed point: round 1 is checkpointed and a site has paid for round 2
                ledgers = [_ledger(c) for c in node_configs]
                _wait_until(
                    lambda: any(e["server_round"] >= 2 for led in ledgers for e in led.entries()),
                    "round 2 never started",
                    running,
                    lines,
                    link,
                    timeout=300,
                    every=0.2,
                )
                run_id_before = Checkpoint.load(
                    run_dir / "checkpoints" / "latest.pt"
                ).run_state.run_id
                superlink = link.procs.procs["superlink"][0]
                os.kill(superlink.pid, signal.SIGKILL)  # a crash: nothing is told, nothing flushed
                superlink.wait()
                result = running.result(timeout=600)
    assert result.status == "finished:completed"
    log = "\n".join(lines)
    assert "SuperLink exited (code -9); starting it again" in log, log[-4000:]
    assert "SuperLink up again" in log
    assert link.restarts == 1
    superlink_log = (tmp_path / "deploy" / "logs" / "superlink.log").read_text()
    assert superlink_log.count("Starting Flower SuperLink") == 2
    # the run survived in place: never resubmitted, never resumed from a checkpoint
    assert "submitting it again" not in log and "resuming run" not in log, log[-4000:]

    assert _assert_each_round_charged_once(run_dir, node_configs) == run_id_before


def test_the_coordinating_machine_reboots_after_the_sites_trained_the_last_round_and_the_run_still_finishes(
    tmp_path, wait_for_file, database_dir, federation
):
    node_configs, run, app_dir = federation
    run_dir = Path(run.run_dir)
    lines: list[str] = []
    with local_superlink(
        tmp_path / "deploy", 2, database=database_dir / "superlink.db", progress=lines.append
    ) as link:
        with local_supernodes(link, node_configs, progress=lines.append):
            with ThreadPoolExecutor(max_workers=1) as pool:
                running = pool.submit(
                    run_app, link, app_dir, run.to_flwr(), timeout_s=900, progress=lines.append
                )
                wait_for_file(run_dir / "checkpoints" / "round-001.pt", running, timeout=420)
                run_id = Checkpoint.load(run_dir / "checkpoints" / "latest.pt").run_state.run_id
                serverapps = list(deployment_serverapps(link.flwr_home))
                assert serverapps, "no ServerApp process found"
                # freeze the ServerApp once round 2 is sent (a site has charged its ledger for it): it waits for
                # both sites' updates, so it cannot have aggregated them yet
                ledgers = [_ledger(c) for c in node_configs]
                _wait_until(
                    lambda: any(e["server_round"] == 2 for led in ledgers for e in led.entries()),
                    "round 2 never started",
                    running,
                    lines,
                    link,
                    timeout=300,
                    every=0.1,
                )
                for pid in serverapps:
                    os.kill(pid, signal.SIGSTOP)
                # the sites go on: both train round 2 and release their updates, which nobody aggregates
                _wait_until(
                    lambda: all(led.release_of(run_id, 2, "diffusion") for led in ledgers),
                    "the sites did not release round 2",
                    None,  # the ServerApp is frozen: the run cannot end
                    lines,
                    link,
                    timeout=300,
                    every=0.5,
                )
                assert not (run_dir / "checkpoints" / "round-002.pt").exists(), (
                    "round 2 was checkpointed before the ServerApp could be frozen: the test did not test"
                )
                # ... and the machine goes down: every server-side process dies at once
                for pid in serverapps:
                    os.kill(pid, signal.SIGKILL)
                for name in ("superexec", "superlink"):
                    link.procs.procs[name][0].kill()
                result = running.result(timeout=900)
    assert result.status == "finished:completed"
    log = "\n".join(lines)
    assert "SuperLink exited (code -9); starting it again" in log, log[-4000:]
    assert "SuperExec exited (code -9); starting it again" in log, log[-4000:]
    # the dead SuperExec's ServerApp is gone: the run is stopped at once (not left to Flower's 60 s session
    # timeout), submitted again, and resumes
    assert "its ServerApp died with the SuperExec; stopped the run" in log, log[-4000:]
    assert "after a SuperLink or SuperExec restart; submitting it again" in log, log[-4000:]
    assert _assert_each_round_charged_once(run_dir, node_configs) == run_id
    assert f"resuming run {run_id} after round 1" in log, log[-4000:]
    # round 2 was asked for twice and trained once: the second answer was the released update, replayed (a
    # second training would have been refused by the ledger, and the run stopped)
    for config in node_configs:
        released = [(r["server_round"], r["phase"]) for r in _ledger(config).releases(run_id)]
        assert released == [(1, "autoencoder"), (2, "diffusion")], (config["site-name"], released)
    # ... and the run's metrics say which answers were replays: both sites' round 2, nothing else
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ok = [(r["round"], r["site"], r.get("replayed")) for r in rows if r.get("status") == "ok"]
    names = sorted(c["site-name"] for c in node_configs)
    assert sorted(ok) == [(1, n, None) for n in names] + [(2, n, 1) for n in names], ok
    # the run's log, followed again with `flwr log` after a restart (which replays it from its start), is passed
    # on once: no time-stamped line of the ServerApp twice
    stamped = Counter(line for line in lines if line[:2] == "20")
    assert not [line for line, n in stamped.items() if n > 1], log[-4000:]
