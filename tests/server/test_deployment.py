"""A real loopback deployment (SuperLink + 2 SuperNodes over TLS with node authentication) running a tiny app.

The tiny app is written into tmp_path with its own pyproject.toml: Flower builds a FAB from that folder, so its
modules must be importable in the ServerApp/ClientApp processes Flower spawns.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.deployment import (
    DeploymentError,
    flwr_processes,
    local_superlink,
    local_supernodes,
    run_federation,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path("/proc/self/environ").exists(), reason="the orphan checks read Linux /proc"
    ),
]

PYPROJECT = """\
[project]
name = "tinyapp"
version = "0.1.0"
description = "deployment test app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsynthtest"

[tool.flwr.app.components]
serverapp = "tinyapp.apps:server"
clientapp = "tinyapp.apps:client"

[tool.flwr.app.config]
out = "unset"
nodes = 2
fail = false
"""

APPS = """\
import json, time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if cfg["fail"]:
        raise RuntimeError("tiny app failed on purpose")
    deadline = time.time() + 30
    while len(nodes := list(grid.get_node_ids())) < cfg["nodes"] and time.time() < deadline:
        time.sleep(0.5)
    msgs = [Message(RecordDict({"q": ConfigRecord({"ask": "site"})}), dst_node_id=n, message_type="query")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=30))
    answers = {str(r.metadata.src_node_id): dict(r.content["a"]) for r in replies if r.has_content()}
    Path(cfg["out"]).write_text(json.dumps(answers))


@client.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"a": ConfigRecord(dict(context.node_config))}), reply_to=msg)
"""


def _tiny_app(root: Path) -> Path:
    app = root / "app"
    (app / "tinyapp").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "tinyapp" / "__init__.py").write_text("")
    (app / "tinyapp" / "apps.py").write_text(APPS)
    return app


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ports(work_dir: Path) -> list[int]:
    """The SuperLink port (from the private flwr config) and every SuperNode runtime port (from their logs)."""
    config = (work_dir / "flwr-home" / "config.toml").read_text()
    ports = [int(re.search(r'address = "127.0.0.1:(\d+)"', config).group(1))]
    for log in (work_dir / "logs").glob("supernode-*.log"):
        ports.append(int(re.search(r"--port (\d+)", log.read_text()).group(1)))
    return ports


def _command(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "(gone)"
    script = next(
        (a for a in argv[:2] if b"/bin/" in a and not a.endswith((b"python", b"python3"))), argv[0]
    )
    return Path(script.decode()).name


def _assert_all_stopped(work_dir: Path, n_nodes: int) -> None:
    assert (
        flwr_processes(work_dir.resolve() / "flwr-home") == []
    )  # SuperExec, serverapp, clientapp included
    ports = _ports(work_dir)
    assert len(ports) == 1 + n_nodes
    assert not [p for p in ports if _port_open(p)]


def test_tls_federation_reaches_every_node_and_stops_everything(tmp_path):
    app = _tiny_app(tmp_path)
    out = tmp_path / "answers.json"
    nodes = [
        {"site-name": f"site-{i}", "site-dir": str(tmp_path / f'site {i} "q"'), "threads": i + 1}
        for i in range(2)
    ]
    lines: list[str] = []
    result = run_federation(
        app,
        tmp_path / "deploy",
        nodes,
        {"out": str(out), "nodes": 2},
        timeout_s=120,
        progress=lines.append,
    )
    assert result.returncode == 0 and result.status == "finished:completed" and result.run_id
    answers = json.loads(out.read_text())
    assert (
        sorted(answers.values(), key=lambda a: a["site-name"]) == nodes
    )  # quotes and spaces survive
    assert any("TLS, SuperNode auth" in line for line in lines)
    assert "registered successfully" in result.logs["flwr"].read_text()
    assert "Successfully started run" in result.logs["run"].read_text()
    assert {"superlink", "supernode-0", "supernode-1", "run"} <= set(result.logs)
    _assert_all_stopped(tmp_path / "deploy", 2)


def test_failing_server_app_raises_with_log_tail_and_cleans_up(tmp_path):
    app = _tiny_app(tmp_path)
    with pytest.raises(DeploymentError) as err:
        run_federation(
            app,
            tmp_path / "deploy",
            [{"site-name": "site-0"}],
            {"fail": True, "nodes": 1},
            timeout_s=120,
            progress=lambda _: None,
        )
    assert "finished:failed" in str(err.value)
    assert "tiny app failed on purpose" in str(err.value)
    _assert_all_stopped(tmp_path / "deploy", 1)


def test_ctrl_c_during_a_run_stops_every_process(tmp_path):
    app = _tiny_app(tmp_path)
    work = tmp_path / "deploy"
    script = (
        f"from pathlib import Path; from server.deployment import run_federation\n"
        f"run_federation(Path({str(app)!r}), Path({str(work)!r}), [{{'site-name': 'site-0'}}], "
        f"{{'nodes': 5}}, timeout_s=120, progress=lambda line: print(line, flush=True))\n"
    )
    # A shell's background job (e.g. `.ci/run &`) ignores SIGINT and its children inherit that, so Python would
    # install no Ctrl-C handler: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen, live = [], set()
    for line in (
        proc.stdout
    ):  # the ServerApp waits for 5 nodes that never come: interrupt it while it waits
        seen.append(line)
        if "Start `flwr-serverapp` process" in line:
            time.sleep(1.0)
            live = {_command(pid) for pid in flwr_processes(work.resolve() / "flwr-home")}
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=60)[0]
    # the orphan check below can fail: Flower's own detached processes carry the private FLWR_HOME too
    assert {
        "flower-superlink",
        "flower-superexec",
        "flower-supernode",
        "flwr",
        "flwr-serverapp",
    } <= live, live
    assert proc.returncode != 0, "".join(seen) + rest
    assert "KeyboardInterrupt" in rest and "stopped the SuperLink and SuperNodes" in rest
    _assert_all_stopped(work, 1)


def test_a_supernode_that_cannot_start_is_reported_and_everything_stops(tmp_path):
    work = tmp_path / "deploy"
    with pytest.raises(DeploymentError) as err:
        with local_superlink(work, 1, progress=lambda _: None) as link:
            link.pki.node_keys[0].write_text("not a key\n")
            with local_supernodes(link, [{"site-name": "site-0"}], progress=lambda _: None):
                pytest.fail("the SuperNode started with a broken key")
    assert "supernode-0 exited" in str(err.value) and "Unable to parse the private key" in str(
        err.value
    )
    assert flwr_processes(work.resolve() / "flwr-home") == []


def test_bad_config_value_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="nested"):
        run_federation(
            tmp_path, tmp_path / "deploy", [{"nested": {"a": 1}}], {}, progress=lambda _: None
        )
    with pytest.raises(ValueError, match="pyproject.toml not found"):
        run_federation(
            tmp_path, tmp_path / "deploy", [{"site-name": "a"}], {}, progress=lambda _: None
        )
    assert not (tmp_path / "deploy").exists()


def test_a_supernode_that_exits_on_its_own_is_started_again_and_one_stopped_on_purpose_is_not(
    tmp_path,
):
    """What a site's service manager does (systemd Restart=always): Flower 1.41 SuperNodes exit on an HTTP 500 from
    a SuperLink that restarted or starved (CI saw one stay down while the resumed run waited for its site)."""
    import os
    from types import SimpleNamespace

    from server.deployment import MAX_SUPERNODE_RESTARTS, Processes, _supervise_supernodes

    procs = Processes(tmp_path)
    link = SimpleNamespace(procs=procs, env=dict(os.environ))
    crashing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    procs.start("supernode-0", crashing, link.env)
    procs.start("supernode-1", [sys.executable, "-c", "import time; time.sleep(60)"], link.env)
    procs.stop("supernode-1")  # the hospital shuts its SuperNode down: it stays down
    restarts, reported, lines = {}, set(), []
    for _ in range(MAX_SUPERNODE_RESTARTS + 2):
        procs.procs["supernode-0"][0].wait()
        _supervise_supernodes(link, restarts, reported, lines.append)
    assert restarts == {"supernode-0": MAX_SUPERNODE_RESTARTS} and reported == {"supernode-0"}
    assert sum("starting it again" in line for line in lines) == MAX_SUPERNODE_RESTARTS
    assert "left down" in lines[-1] and len(lines) == MAX_SUPERNODE_RESTARTS + 1
    assert procs.procs["supernode-0"][0].args == crashing  # the same command line each time
    assert "supernode-1" not in " ".join(lines)


def test_a_supernode_being_stopped_on_purpose_is_not_started_again_by_a_supervisor_that_runs_meanwhile(
    tmp_path, monkeypatch
):
    """CI's ten-site run: the hospital's SuperNode, stopped while the run was supervised, was started again (it
    exited on the SIGTERM before `stop` had marked it stopped) and trained round 2 instead of dropping out."""
    import os
    from types import SimpleNamespace

    import server.deployment as deployment

    procs = deployment.Processes(tmp_path)
    link = SimpleNamespace(procs=procs, env=dict(os.environ))
    procs.start("supernode-9", [sys.executable, "-c", "import time; time.sleep(60)"], link.env)
    restarts, reported, lines = {}, set(), []
    signal_groups = deployment._signal_groups

    def supervisor_runs_right_after_the_signal(group, sig, **kwargs):
        signal_groups(group, sig, **kwargs)
        for proc in group:
            proc.wait()  # exited on the SIGTERM, `stop` not yet returned
        deployment._supervise_supernodes(link, restarts, reported, lines.append)

    monkeypatch.setattr(deployment, "_signal_groups", supervisor_runs_right_after_the_signal)
    procs.stop("supernode-9")
    assert restarts == {} and lines == [], lines
    assert procs.procs["supernode-9"][0].poll() is not None  # still down


def test_a_run_ended_by_the_superlinks_own_server_error_is_told_from_an_app_failure(tmp_path):
    """A ServerApp whose heartbeat the SuperLink answered with HTTP 500 (its SQLite busy under load; CI) failed
    because of the coordinating machine: it is submitted again and resumes. An app's own exception is not."""
    from server.deployment import _superlink_server_error

    superlink_failed = tmp_path / "flwr-run-1.log"
    superlink_failed.write_text(
        "2026-11-30 11:40:18,938 fedsynth.server INFO round 2/2 (diffusion): asking 2 sites\n"
        "Exception in thread Thread-2 (_run):\nTraceback (most recent call last):\n"
        "httpx.HTTPStatusError: Server error '500 Internal Server Error' for url "
        "'https://127.0.0.1:45263/v1/runtime/send-task-heartbeat'\n"
    )
    app_failed = tmp_path / "flwr-run-2.log"
    app_failed.write_text(
        'Traceback (most recent call last):\n  File "server/training.py", line 1\n'
        "ValueError: checkpoint round 3 does not match run config 'num-server-rounds' = 2\n"
        "httpx.HTTPStatusError: Client error '401 Unauthorized' for url 'https://127.0.0.1:1/v1/runtime/push-logs'\n"
    )
    assert _superlink_server_error(superlink_failed) == (
        "500 Internal Server Error on /v1/runtime/send-task-heartbeat"
    )
    assert _superlink_server_error(app_failed) == ""
    assert _superlink_server_error(tmp_path / "missing.log") == ""

    # CI: the SuperLink dropped the push session of a round's messages while the ServerApp was still sending them
    push_refused = tmp_path / "flwr-run-3.log"
    push_refused.write_text(
        '  File "/app/server/training.py", line 351, in _round\n'
        "    replies = list(self.grid.send_and_receive(messages, timeout=self.run.round_timeout))\n"
        "flwr.supercore.inflatable.inflatable_utils.ObjectPushError: Failed to push object with ID "
        "'6e4bbfb71d788e7eccb096f6f8ee11fafd29b51f14f1b6e2060b41c30afe19a3' for run 812 using session 'ab-12'. "
        "The push session may have expired or been replaced.\n"
    )
    assert _superlink_server_error(push_refused) == (
        "refusal to store object 6e4bbfb7... of a message (ObjectPushError)"
    )


def test_a_failed_runs_error_carries_the_superlinks_own_complaints(tmp_path):
    """The SuperLink's account of a failure may lie far above its log's last lines (CI: 15 lines of polling after
    it): the error quotes its last ERROR and WARNING lines, whatever follows them."""
    from server.deployment import _superlink_complaints

    log = tmp_path / "superlink.log"
    log.write_text(
        "INFO :      Starting\n"
        "\x1b[91mERROR \x1b[0m:     Failed to store object 6e4b: database is locked\n"
        "WARNING :   heartbeat late\n" + "INFO :      ControlServicer.ListRuns\n" * 40
    )
    assert _superlink_complaints(log) == (
        "ERROR :     Failed to store object 6e4b: database is locked\nWARNING :   heartbeat late"
    )
    assert _superlink_complaints(tmp_path / "none.log") == f"(no log at {tmp_path / 'none.log'})"


@pytest.mark.parametrize(
    "status, expected, done",
    [
        ("finished:stopped", "its ServerApp died with the SuperExec; stopped the run", True),
        ("running", "", False),  # the SuperLink failed and the run is still open: asked again
    ],
)
def test_a_stop_answered_with_the_superlinks_internal_error_is_judged_by_the_runs_status(
    tmp_path, status, expected, done
):
    """CI: `flwr stop` made the stop, then the SuperLink's SQLite was locked and it answered "Internal server
    error"; the run WAS stopped, and reporting that it could not be stopped made the restart test fail."""
    import json
    from types import SimpleNamespace

    from server.deployment import DeploymentError, _stop_run

    def flwr(args, timeout=120.0):
        if args[0] == "stop":
            raise DeploymentError(
                "flwr stop 7 fedsynth-local failed (1): Error: Internal server error."
            )
        return json.dumps({"success": True, "runs": [{"run-id": "7", "status": status}]})

    lines: list[str] = []
    assert _stop_run(SimpleNamespace(flwr=flwr), 7, lines.append) is done
    assert (expected in lines[0]) if expected else lines == []


def test_a_superlink_stopped_during_the_supervisors_restart_delay_is_not_started_again(
    tmp_path, monkeypatch
):
    """A teardown that stops the SuperLink while a supervisor waits out its restart delay: started after that, the
    SuperLink would outlive the deployment (nothing would stop it again)."""
    import os
    import threading
    from types import SimpleNamespace

    import server.deployment as deployment

    procs = deployment.Processes(tmp_path)
    env = dict(os.environ)
    dead = procs.start("superlink", [sys.executable, "-c", "pass"], env)
    dead.wait()  # crashed: the supervisor will restart it
    procs.start("superexec", [sys.executable, "-c", "import time; time.sleep(60)"], env)
    link = SimpleNamespace(
        procs=procs,
        database=tmp_path / "superlink.db",
        lock=threading.Lock(),
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        env=env,
        restarts=0,
        superexec_restarts=0,
    )
    sleep = time.sleep

    def teardown_during_the_delay(seconds):
        procs.stop("superlink")  # the deployment's exit, from another thread in real life
        sleep(0)

    monkeypatch.setattr(deployment.time, "sleep", teardown_during_the_delay)
    lines: list[str] = []
    try:
        deployment.supervise(link, lines.append)
        assert procs.procs["superlink"][0] is dead and link.restarts == 0, lines
        assert "not started again" in lines[-1]
    finally:
        monkeypatch.undo()
        procs.stop("superlink", "superexec")


@pytest.mark.parametrize(
    "status, served_by_current, stopped, handled",
    [
        (
            "running",
            True,
            False,
            True,
        ),  # CI: the resubmitted run's ServerApp, started by the new SuperExec
        ("running", False, True, True),  # its ServerApp died with the SuperExec before: stopped now
        ("pending", False, False, False),  # the current SuperExec will start it: asked again later
        ("finished:completed", False, False, True),
    ],
)
def test_after_a_superexec_restart_only_a_run_whose_serverapp_died_with_it_is_stopped(
    tmp_path, status, served_by_current, stopped, handled
):
    """CI: the SuperExec restarted while a resubmitted run was pending; the new SuperExec started its ServerApp,
    and the deployment, taking any restart for the death of the run's ServerApp, stopped the live run."""
    import os
    from types import SimpleNamespace

    from server.deployment import _stop_if_orphaned

    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home)}
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    superexec = subprocess.Popen(sleep, env=env)
    parent = superexec.pid if served_by_current else 1  # 1: reparented, its SuperExec dead
    serverapp = subprocess.Popen([*sleep, "flwr-serverapp", "--parent-pid", str(parent)], env=env)
    calls: list[list[str]] = []

    def flwr(args, timeout=120.0):
        calls.append(args)
        return json.dumps({"success": True, "runs": [{"run-id": "7", "status": status}]})

    link = SimpleNamespace(
        flwr=flwr, flwr_home=home, procs=SimpleNamespace(procs={"superexec": (superexec, None)})
    )
    try:
        lines: list[str] = []
        assert _stop_if_orphaned(link, 7, lines.append) is handled
        assert any(c[0] == "stop" for c in calls) is stopped, calls
    finally:
        for p in (superexec, serverapp):
            p.kill()
            p.wait()
