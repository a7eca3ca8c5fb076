"""Flower in deployment mode on one machine: a SuperLink with TLS and SuperNode authentication, one SuperNode per
site, `flwr run` — and every process stopped afterwards, on failure and on Ctrl-C/SIGTERM too.

This is what `fedsynth demo` and the integration tests use; a real consortium runs the same commands on several
machines (deploy/README.md). Flower 1.41: Fleet, Control and Runtime APIs share one HTTPS port on the SuperLink;
each SuperNode has its own Runtime port for its ClientApp process; `flwr` reads its connection from
$FLWR_HOME/config.toml. Every process gets a private FLWR_HOME (never ~/.flwr), which also marks the processes
Flower spawns itself (SuperExec, flwr-serverapp, flwr-clientapp) so none can outlive the federation.

The SuperLink runs with `--isolation process`: the SuperExec that starts the ServerApp is a process of its own
(`flower-superexec`, authenticated by a shared secret), not the SuperLink's child. With a database file the
SuperLink's state (registered SuperNodes, runs, messages, the ServerApp's task token) survives a crash, so a
SuperLink that is killed and started again on the same database (`restart_superlink`, or `run_app`'s supervision,
as systemd's `Restart=always` would) picks up where it was: the ServerApp, the SuperExec and the SuperNodes retry
their connections and the run goes on in place. Had Flower's own subprocess SuperExec been used, it would have
died with the SuperLink (it watches its parent's pid) and taken the ServerApp with it. A run that still fails
after a restart (the ServerApp's task token expired: down for more than Flower's 60 s heartbeat patience) is
submitted again with the same run-dir and resumes from its last checkpoint (deploy/README.md, section 9).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.io import write_text_atomic
from server.pki import PkiPaths, make_pki

CONNECTION = "fedsynth-local"
SUPERNODE_NICENESS = 10  # local SuperNodes (and their ClientApps) yield the CPU to the SuperLink
SUPERLINK_NICENESS = -5  # and the SuperLink runs above the rest of the machine, where permitted
# Seconds between the SuperExec's AcquireTask polls (Flower's FLWR_SUPEREXEC_TASK_POLL_INTERVAL, default 1 s). Every
# request to a Flower 1.41 SuperLink writes to its SQLite file (sql_corestate._cleanup_expired_task_tokens runs an
# UPDATE first, even for reads), and SQLite has one writer at a time: fewer idle polls, less lock contention.
SUPEREXEC_POLL_S = 3.0
SUPERLINK_RESTART_DELAY_S = (
    2.0  # like systemd's RestartSec: a SuperLink found dead is started again after this
)
MAX_SUPEREXEC_RESTARTS = 5  # a SuperExec that keeps dying is a configuration error, not a glitch
# A SuperNode that exits on its own during a run is started again, as a site's service manager does
# (deploy/systemd/fedsynth-supernode.service: Restart=always): Flower 1.41 SuperNodes exit on an HTTP 500 from
# a SuperLink that restarted or starved (seen in CI). One stopped on purpose (Processes.stop) stays down.
MAX_SUPERNODE_RESTARTS = 3
# a run failed by the SuperLink (restart, HTTP 5xx, refused push) is submitted again (it resumes) at most this often
MAX_RESUBMITS = 2
log = logging.getLogger("fedsynth.deployment")
Progress = Callable[[str], None]


class DeploymentError(RuntimeError):
    """A Flower process failed to start or the run failed; the message carries the relevant log tail."""


@dataclass
class FederationResult:
    returncode: int
    status: str  # the SuperLink's final run status, e.g. "finished:completed"
    run_id: int | None
    logs: dict[str, Path] = field(
        default_factory=dict
    )  # superlink, supernode-K, run, flwr (CLI calls)


def free_port() -> int:
    """A port that is free right now (bound to port 0), so parallel runs don't collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # Flower's coloured log levels


def _log_lines(path: Path) -> list[str] | None:
    """A log's lines without colour codes; None if it cannot be read."""
    try:
        return _COLOURS.sub("", path.read_text(errors="replace")).splitlines()
    except OSError:
        return None


def _tail(path: Path, n: int = 40) -> str:
    lines = _log_lines(path)
    return f"(no log at {path})" if lines is None else "\n".join(lines[-n:])


def toml_value(key: str, value: Any) -> str:
    """One TOML value for a flat Flower config (run config, node config); other types are refused."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, (int, float)):
        return repr(value)
    raise ValueError(
        f"config value {key}={value!r}: Flower configs hold only str, int, float or bool"
    )


def write_flat_toml(path: Path, config: dict[str, Any]) -> Path:
    write_text_atomic(
        path, "".join(f"{json.dumps(str(k))} = {toml_value(k, v)}\n" for k, v in config.items())
    )
    return path


def flwr_processes(flwr_home: Path) -> list[int]:
    """Pids of live processes whose environment has FLWR_HOME=flwr_home (Linux /proc; [] elsewhere)."""
    marker = f"FLWR_HOME={flwr_home}".encode()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if (
                marker in (entry / "environ").read_bytes().split(b"\0")
                and int(entry.name) != os.getpid()
            ):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return pids


class Processes:
    """Processes started in their own process groups, each with a log file; `stop` is idempotent."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.stopped: set[str] = set()
        # held by `stop` while it marks names stopped and by a supervisor's check-and-start, so a process being
        # stopped on purpose is never taken for one that exited on its own and started again (CI saw it)
        self.lock = threading.RLock()

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start `argv` as `name`; a name started again (a restarted SuperLink) appends to the same log."""
        log = self.log_dir / f"{name}.log"
        self.stopped.discard(name)
        with open(log, "ab" if name in self.procs else "wb") as f:
            f.write(f"$ {' '.join(argv)}\n".encode())
            f.flush()
            proc = subprocess.Popen(
                argv,
                stdout=f,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> Path:
        return self.procs[name][1]

    def stop(self, *names: str, grace: float = 10.0) -> None:
        """SIGTERM the process groups together (Flower shuts down gracefully on it), then SIGKILL what is left."""
        with self.lock:  # marked first: from the SIGTERM on, a supervisor must leave these down
            names = tuple(n for n in names if n not in self.stopped)
            self.stopped.update(names)
        _signal_groups([self.procs[n][0] for n in names], signal.SIGTERM)
        deadline = time.time() + grace
        for name in names:
            try:
                self.procs[name][0].wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        # the leaders that ignored SIGTERM, and children that outlived them in the same group
        _signal_groups([self.procs[n][0] for n in names], signal.SIGKILL, even_if_exited=True)
        for name in names:
            self.procs[name][0].wait()

    def stop_all(self) -> None:
        self.stop(*reversed(list(self.procs)))

    def check_alive(self, name: str) -> None:
        proc, log = self.procs[name]
        if proc.poll() is not None:
            raise DeploymentError(
                f"{name} exited with code {proc.returncode}; last lines of {log}:\n{_tail(log)}"
            )


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM while stopping processes, so a second Ctrl-C cannot leave some of them running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _signal_groups(procs: list[subprocess.Popen], sig: int, even_if_exited: bool = False) -> None:
    for proc in procs:
        if even_if_exited or proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _kill_leftovers(flwr_home: Path, grace: float = 5.0) -> None:
    """Processes Flower detached into sessions of their own (the SuperLink's SuperExec and its apps)."""
    pids = flwr_processes(flwr_home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while pids and time.time() < deadline:
            time.sleep(0.1)
            pids = flwr_processes(flwr_home)
        if not pids:
            return


@dataclass
class SuperLink:
    """A running local SuperLink: its address, the private FLWR_HOME/env, the PKI and every process started."""

    port: int
    work_dir: Path
    bin_dir: Path
    env: dict[str, str]
    procs: Processes
    pki: PkiPaths | None  # None when insecure
    argv: list[str] = field(default_factory=list)  # how it was started: a restart uses the same
    database: Path | None = None  # its state file (--database); None: in memory, lost on exit
    superexec_argv: list[str] = field(default_factory=list)  # the SuperExec that starts ServerApps
    superexec_env: dict[str, str] = field(default_factory=dict)
    restarts: int = (
        0  # how often the SuperLink was started again (by restart_superlink or the supervision)
    )
    superexec_restarts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one restart at a time

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def flwr_home(self) -> Path:
        return Path(self.env["FLWR_HOME"])

    def flwr(self, args: list[str], timeout: float = 120.0) -> str:
        """Run the `flwr` CLI against this SuperLink; its output goes to logs/flwr.log; raise if it fails."""
        argv = [str(self.bin_dir / "flwr"), *args]
        try:
            proc = subprocess.run(
                argv,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise DeploymentError(
                f"flwr {' '.join(args)} did not answer within {timeout:.0f}s"
            ) from e
        with open(self.procs.log_dir / "flwr.log", "a") as f:
            f.write(
                f"$ flwr {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}{proc.stderr}\n"
            )
        if proc.returncode != 0:
            raise DeploymentError(
                f"flwr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc.stdout


def _favour(proc: subprocess.Popen) -> None:
    """Raise the SuperLink's priority where permitted (root): on one busy machine its SQLite state otherwise
    misses its 5 s lock timeout and answers 500 (measured at load 20 on 2 cores). No-op when not permitted."""
    try:
        os.setpriority(os.PRIO_PROCESS, proc.pid, SUPERLINK_NICENESS)
    except (OSError, AttributeError):
        pass


def restart_superlink(link: SuperLink, progress: Progress = print, kill: bool = True) -> None:
    """Stop the SuperLink (SIGKILL, as a crash would, unless `kill` is False) and start it again with the same
    command line, port and database. Only the SuperLink: the SuperExec, the ServerApp and the SuperNodes are
    processes of their own (as on separate machines or services); they retry their connections and carry on."""
    if link.database is None:
        raise DeploymentError(
            "restart_superlink needs a SuperLink with a database: an in-memory one forgets every node and run"
        )
    with link.lock:
        proc = link.procs.procs["superlink"][0]
        if kill:
            proc.kill()  # the leader only, as after a crash
            proc.wait()
        else:
            link.procs.stop("superlink")
        progress(
            f"SuperLink {'killed' if kill else 'stopped'} (exit {proc.returncode}); restarting it"
        )
        _start_superlink_again(link, progress)


def _start_superlink_again(
    link: SuperLink, progress: Progress, *, unless_stopped: bool = False
) -> None:
    """Start the (dead) SuperLink with its command line and database; the caller holds link.lock.
    `unless_stopped`: not if it was stopped on purpose meanwhile (a teardown during a supervisor's restart delay:
    a SuperLink started after it would outlive the deployment)."""
    with link.procs.lock:  # `stop` marks its names under this lock: checked and started as one step
        if unless_stopped and "superlink" in link.procs.stopped:
            progress("SuperLink stopped on purpose during the restart delay; not started again")
            return
        _favour(link.procs.start("superlink", link.argv, link.env))
    link.restarts += 1
    _wait_port(link.port, link.procs, "superlink")
    progress(f"SuperLink up again on {link.address} with its state from {link.database}")


def supervise(link: SuperLink, progress: Progress = print) -> None:
    """What a service manager does for the SuperLink's processes (systemd `Restart=always`), called while a run
    is driven: a SuperLink with a database found dead is started again on that database; a SuperExec found
    dead (Flower 1.41's exits on an HTTP 500) is started again, at most MAX_SUPEREXEC_RESTARTS times."""
    if link.database is not None and link.procs.procs["superlink"][0].poll() is not None:
        with link.lock:  # restart_superlink may be restarting it right now
            proc = link.procs.procs["superlink"][0]
            with link.procs.lock:
                gone = proc.poll() is not None and "superlink" not in link.procs.stopped
            if gone:
                progress(
                    f"SuperLink exited (code {proc.returncode}); starting it again in "
                    f"{SUPERLINK_RESTART_DELAY_S:g}s on its database {link.database}"
                )
                time.sleep(SUPERLINK_RESTART_DELAY_S)
                _start_superlink_again(link, progress, unless_stopped=True)
    with link.procs.lock:
        proc = link.procs.procs["superexec"][0]
        if proc.poll() is not None and "superexec" not in link.procs.stopped:
            if link.superexec_restarts >= MAX_SUPEREXEC_RESTARTS:
                link.procs.check_alive("superexec")  # raises, with its log
            link.superexec_restarts += 1
            progress(f"SuperExec exited (code {proc.returncode}); starting it again")
            link.procs.start("superexec", link.superexec_argv, link.superexec_env)


def _wait_port(port: int, procs: Processes, name: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs.check_alive(name)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(
        f"{name} did not open port {port} within {timeout:.0f}s:\n{_tail(procs.log(name))}"
    )


@contextmanager
def local_superlink(
    work_dir: Path,
    n_nodes: int,
    *,
    insecure: bool = False,
    python_bin_dir: Path | None = None,
    progress: Progress = print,
    database: Path | None = None,
) -> Iterator[SuperLink]:
    """A SuperLink on a free loopback port (TLS + SuperNode auth unless `insecure`), stopped on exit.

    Writes work_dir/pki (CA, server certificate, `n_nodes` SuperNode keys), work_dir/flwr-home/config.toml
    (connection CONNECTION) and work_dir/logs/. With `database` the SuperLink keeps its state (registered
    SuperNodes, runs, messages) in that SQLite file (`--database`), so `restart_superlink` can bring it back.
    """
    work_dir = Path(work_dir).resolve()
    bin_dir = Path(python_bin_dir or Path(sys.executable).parent)
    if not (bin_dir / "flower-superlink").exists():
        raise DeploymentError(
            f"no flower-superlink in {bin_dir}: is flwr installed in this environment?"
        )
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name: our environment's bin goes first.
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        # Flower's usage telemetry (events, platform details to telemetry.flower.ai) stays off, as in deploy/
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    port = free_port()
    pki = None if insecure else make_pki(work_dir / "pki", n_nodes, overwrite=True)
    security = (
        "insecure = true"
        if insecure
        else f"root-certificates = {toml_value('ca', str(pki.ca_cert))}"
    )
    write_text_atomic(
        flwr_home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{security}\n',
    )
    # The SuperExec's credential for the Runtime API's AcquireTask (which hands out a run's ServerApp task token):
    # without it, anything that reaches the SuperLink's port could take the ServerApp's place.
    secret = work_dir / "superexec.secret"
    secret.unlink(missing_ok=True)
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(32).encode())
    argv = [
        str(bin_dir / "flower-superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
    ]
    superexec_argv = [
        str(bin_dir / "flower-superexec"),
        "--runtime-api-address",
        f"127.0.0.1:{port}",
        "--superexec-auth-secret-file",
        str(secret),
        *(["--insecure"] if insecure else ["--root-certificates", str(pki.ca_cert)]),
    ]
    superexec_env = {**env, "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_S)}
    if database is not None:
        database = Path(database).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--database", str(database)]
    if insecure:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(pki.ca_cert),
            "--ssl-certfile",
            str(pki.server_cert),
            "--ssl-keyfile",
            str(pki.server_key),
            "--enable-supernode-auth",
        ]
    procs = Processes(log_dir)
    try:
        _favour(procs.start("superlink", argv, env))
        _wait_port(port, procs, "superlink")
        procs.start("superexec", superexec_argv, superexec_env)
        progress(
            f"SuperLink up on 127.0.0.1:{port} ({'INSECURE, no TLS' if insecure else 'TLS, SuperNode auth'}), "
            "its SuperExec beside it"
        )
        yield SuperLink(
            port, work_dir, bin_dir, env, procs, pki, argv, database, superexec_argv, superexec_env
        )
    finally:
        with _signals_deferred():
            procs.stop_all()
            _kill_leftovers(flwr_home)
        progress("stopped the SuperLink and SuperNodes")


@contextmanager
def local_supernodes(
    link: SuperLink, node_configs: list[dict[str, Any]], progress: Progress = print
) -> Iterator[list[str]]:
    """Register (TLS) and start one SuperNode per node config; yields their names in link.procs ("supernode-K").

    Each node's config goes to work_dir/node-configs/node-K.toml, passed as `--node-config FILE.toml` (Flower reads
    a .toml path there like it does for --run-config; key=value strings would break on quotes in paths).
    """
    if link.pki is not None and len(link.pki.node_keys) < len(node_configs):
        raise DeploymentError(
            f"{len(node_configs)} nodes but only {len(link.pki.node_keys)} node keys"
        )
    if (
        link.pki is not None
    ):  # each registration is a `flwr` process (~2 s to import): do them side by side
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(
                pool.map(
                    lambda pub: link.flwr(["supernode", "register", str(pub), CONNECTION]),
                    link.pki.node_public_keys[: len(node_configs)],
                )
            )
    names = []
    try:
        for i, config in enumerate(node_configs):
            name = f"supernode-{i}"
            config_file = write_flat_toml(link.work_dir / "node-configs" / f"node-{i}.toml", config)
            argv = [
                str(link.bin_dir / "flower-supernode"),
                "--superlink",
                link.address,
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                str(config_file),
            ]
            if link.pki is None:
                argv.append("--insecure")
            else:
                argv += [
                    "--root-certificates",
                    str(link.pki.ca_cert),
                    "--auth-supernode-private-key",
                    str(link.pki.node_keys[i]),
                ]
            _start_supernode(link, name, argv)
            names.append(name)
            progress(
                f"SuperNode {i} started for {config.get('site-name', config.get('site-dir', i))}"
            )
        _wait_connected(link.procs, names)
        progress(f"{len(names)} SuperNode(s) connected")
        yield names
    finally:
        with _signals_deferred():
            link.procs.stop(*names)


def _start_supernode(link: SuperLink, name: str, argv: list[str]) -> None:
    proc = link.procs.start(name, argv, link.env)
    # On one machine the hospitals' training (the SuperNode's ClientApp processes inherit this) yields the CPU to
    # the SuperLink, as on separate machines: a starved SuperLink misses its database's lock timeout and answers
    # 500, which stops Flower 1.41 SuperNodes (measured at load 20 on 2 cores).
    try:
        os.setpriority(os.PRIO_PROCESS, proc.pid, SUPERNODE_NICENESS)
    except (OSError, AttributeError):  # not permitted, or not POSIX: run at normal priority
        pass


def _supervise_supernodes(
    link: SuperLink, restarts: dict[str, int], reported: set[str], progress: Progress
) -> None:
    """Start again a SuperNode that exited on its own (not one stopped on purpose), at most
    MAX_SUPERNODE_RESTARTS times each; one past that is reported once and left down (its site drops out)."""
    for name in [n for n in link.procs.procs if n.startswith("supernode-")]:
        with link.procs.lock:  # `stop` marks a name under it before its SIGTERM
            proc, log_file = link.procs.procs[name]
            if name in link.procs.stopped or name in reported or proc.poll() is None:
                continue
            if restarts.get(name, 0) < MAX_SUPERNODE_RESTARTS:
                restarts[name] = restarts.get(name, 0) + 1
                message = (
                    f"{name} exited with code {proc.returncode} during the run; starting it again, as its service "
                    f"manager would (restart {restarts[name]} of at most {MAX_SUPERNODE_RESTARTS}; see {log_file})"
                )
                _start_supernode(link, name, list(proc.args))
            else:
                reported.add(name)
                message = (
                    f"{name} exited with code {proc.returncode} during the run, after {MAX_SUPERNODE_RESTARTS} "
                    f"restarts; left down (see {log_file})"
                )
        progress(message)
        log.warning("%s", message)  # shown at the terminal whatever `progress` shows


def _wait_connected(procs: Processes, names: list[str], timeout: float = 90.0) -> None:
    """Until every SuperNode has connected (it logs "SuperNode ID: N" once the SuperLink accepted it)."""
    deadline, waiting = time.time() + timeout, list(names)
    while waiting:
        for name in list(waiting):
            procs.check_alive(name)  # a bad key or config makes a SuperNode exit at once
            if "SuperNode ID:" in procs.log(name).read_text(errors="replace"):
                waiting.remove(name)
        if waiting and time.time() > deadline:
            raise DeploymentError(
                f"{waiting[0]} did not connect to the SuperLink within {timeout:.0f}s; last lines "
                f"of {procs.log(waiting[0])}:\n{_tail(procs.log(waiting[0]))}"
            )
        time.sleep(0.2)


def run_app(
    link: SuperLink,
    app_dir: Path,
    run_config: dict[str, Any],
    *,
    timeout_s: float = 1800.0,
    progress: Progress = print,
    on_output: Progress | None = None,
) -> FederationResult:
    """`flwr run APP CONNECTION --stream --run-config FILE.toml`; its lines go to `on_output` (default: `progress`)
    and logs/flwr-run*.log.

    `flwr run --stream` exits 0 even when the ServerApp raised, so the verdict is the SuperLink's run status.
    A SuperNode that exits on its own is started again (MAX_SUPERNODE_RESTARTS); one stopped on purpose stays down
    and its site drops out. Without a database a dead SuperLink fails the run.
    With one, the SuperLink's processes are supervised (`supervise`) and the run is followed across a restart;
    a run that ends failed after a SuperLink restart, or on the SuperLink's own failure (an HTTP 5xx answer, a
    refused object push), is submitted again, at most MAX_RESUBMITS times, with the same run config: the app
    resumes from the run-dir's last checkpoint. So is a run whose ServerApp failed on a transport error before it
    ever ran (it sent nothing to a site).
    """
    overrides = write_flat_toml(link.work_dir / "run-config.toml", run_config)
    argv = [
        str(link.bin_dir / "flwr"),
        "run",
        str(Path(app_dir).resolve()),
        CONNECTION,
        "--stream",
        "--run-config",
        str(overrides),
    ]
    deadline = time.time() + timeout_s
    for attempt in range(MAX_RESUBMITS + 1):
        restarts_before = (link.restarts, link.superexec_restarts)
        result = _follow_run(link, argv, deadline, timeout_s, progress, on_output or progress)
        if result.status == "finished:completed" and result.returncode == 0:
            return result
        never_ran = _failed_before_running(link, result.run_id)
        restarted = (link.restarts, link.superexec_restarts) != restarts_before
        superlink_error = _superlink_server_error(result.logs["run"])
        if not (restarted or never_ran or superlink_error) or attempt == MAX_RESUBMITS:
            break  # the app itself failed (or keeps failing): submitting it again would not help
        if never_ran:
            progress(
                f"run {result.run_id}: its ServerApp failed before it ran ({never_ran}); submitting it again "
                "with the same run config (nothing was sent to a site)"
            )
            continue
        why = (
            "after a SuperLink or SuperExec restart"
            if restarted
            else f"on the SuperLink's {superlink_error}"
        )
        progress(
            f"run {result.run_id} ended {result.status} {why}; submitting it again with the same run config: it "
            "resumes from its last checkpoint (a site answers a round it trained from its ledger)"
        )
    raise DeploymentError(
        f"the Flower run ended with status {result.status!r} (flwr exit code {result.returncode}); last lines "
        f"of {result.logs['run']}:\n{_tail(result.logs['run'])}\nlast lines of {result.logs['superlink']}:\n"
        f"{_tail(result.logs['superlink'], 15)}\nits last errors and warnings:\n"
        f"{_superlink_complaints(result.logs['superlink'])}"
    )


def _follow_run(
    link: SuperLink,
    argv: list[str],
    deadline: float,
    timeout_s: float,
    progress: Progress,
    output: Progress,
) -> FederationResult:
    """Start `argv` (flwr run --stream), pass on its lines, supervise, and return once the run is finished."""
    runs = sum(name.startswith("flwr-run") for name in link.procs.procs)
    run_name = (
        f"flwr-run-{runs}" if runs else "flwr-run"
    )  # one log per run when a SuperLink serves several
    proc = link.procs.start(run_name, argv, link.env)
    run_log = link.procs.log(run_name)
    logs = {
        name: path
        for name, (_, path) in link.procs.procs.items()
        if not name.startswith("flwr-run")
    }
    logs |= {"run": run_log, "flwr": link.procs.log_dir / "flwr.log"}
    pending, left_down, supernode_restarts = b"", set(), {}
    run_id, status = None, "not started"
    # `flwr log` replays the run's log from its start: each line already passed on is passed on once only
    emitted: Counter[str] = Counter()
    already, replayed = Counter(), Counter()
    judged, next_check = link.superexec_restarts, 0.0  # SuperExec restarts whose run was looked at
    with open(run_log, "rb") as f:
        while True:
            done = proc.poll() is not None
            *lines, pending = (pending + f.read()).split(b"\n")
            for line in [*lines, pending] if done else lines:
                text = _COLOURS.sub("", line.decode(errors="replace")).rstrip()
                if not text.strip() or text.startswith("$ "):
                    continue
                replayed[text] += 1
                if replayed[text] <= already[text]:
                    continue
                emitted[text] += 1
                output(text)
            if done:
                pending = b""
                run_id = run_id or _started_run_id(run_log)
                status = _settled_status(link, run_id, deadline, progress)
                if link.database is None or run_id is None or status.startswith("finished"):
                    break
                # The stream broke while the run goes on (the SuperLink restarted): follow it again.
                progress(
                    f"lost the run's log stream (status {status}); following run {run_id} again"
                )
                proc = link.procs.start(
                    run_name, [str(link.bin_dir / "flwr"), "log", str(run_id), CONNECTION], link.env
                )
                already, replayed = Counter(emitted), Counter()
                continue
            if time.time() > deadline:
                link.procs.stop(run_name)
                raise DeploymentError(
                    f"the run did not finish within {timeout_s:.0f}s; last lines:\n{_tail(run_log)}"
                )
            if link.database is None:
                link.procs.check_alive("superlink")
            supervise(link, progress)
            run_id = run_id or _started_run_id(run_log)
            restarts = link.superexec_restarts
            if restarts != judged and run_id and time.time() >= next_check:
                next_check = time.time() + 5.0  # each try is a `flwr` process
                if _stop_if_orphaned(link, run_id, progress):
                    judged = restarts  # a later restart is judged again
            _supervise_supernodes(link, supernode_restarts, left_down, progress)
            time.sleep(0.2)
    return FederationResult(proc.returncode, status, run_id, logs)


def _stop_if_orphaned(link: SuperLink, run_id: int, progress: Progress) -> bool:
    """After a SuperExec restart: stop the run if its ServerApp died with the SuperExec before (it watches its
    parent's pid); its session would only expire after Flower's 60 s heartbeat patience. True once handled, False
    to be asked again.

    The restart is not enough to tell: a run submitted around it (CI: a resubmitted run, the SuperExec restarted
    again while it was pending) has its ServerApp started by the NEW SuperExec, alive, and stopping it failed the
    run. So the run is stopped only if it is running and no live ServerApp of this deployment is a child of the
    current SuperExec (one SuperLink drives one run at a time here). Pending or starting: the current SuperExec
    starts it; asked again until it runs or ends."""
    status = _run_status(link, run_id)
    if status.startswith("finished"):
        return True
    if status != "running":
        return False
    if link.procs.procs["superexec"][0].pid in serverapps(link.flwr_home).values():
        return True  # served by the current SuperExec: nothing died with the one before
    return _stop_run(link, run_id, progress)


def serverapps(flwr_home: Path) -> dict[int, int]:
    """Live ServerApp processes with FLWR_HOME=flwr_home: {pid: the SuperExec pid that started it (`--parent-pid`;
    0 if its command line has none)}."""
    found = {}
    for pid in flwr_processes(flwr_home):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(a.endswith(b"flwr-serverapp") for a in argv):
                found[pid] = (
                    int(argv[argv.index(b"--parent-pid") + 1]) if b"--parent-pid" in argv else 0
                )
        except (OSError, ValueError, IndexError):
            continue
    return found


def _stop_run(link: SuperLink, run_id: int, progress: Progress) -> bool:
    """`flwr stop RUN_ID` for a run whose ServerApp died with its SuperExec; False if the SuperLink cannot answer
    yet (the caller tries again)."""
    try:
        link.flwr(["stop", str(run_id), CONNECTION], timeout=60)
    except DeploymentError as err:
        if "unavailable" in str(err).lower() or "did not answer" in str(err):
            return False
        # CI: the stop was made, then the SuperLink's SQLite was locked and it answered "Internal server error"
        status = _run_status(link, run_id)
        if status.startswith("finished"):
            progress(
                f"run {run_id}: its ServerApp died with the SuperExec; stopped the run (`flwr stop` answered "
                f"{_short_error(err)!r}, and the SuperLink reports the run {status})"
            )
            return True
        if "internal server error" in str(err).lower():
            return False  # the SuperLink's own failure, the run still open: ask again
        progress(
            f"could not stop run {run_id} ({_short_error(err)}); Flower fails it within a minute"
        )
        return True
    progress(f"run {run_id}: its ServerApp died with the SuperExec; stopped the run")
    return True


def _short_error(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def _started_run_id(log: Path) -> int | None:
    match = re.search(r"Successfully started run (\d+)", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


def _settled_status(
    link: SuperLink, run_id: int | None, deadline: float, progress: Progress
) -> str:
    """The run's status; while the SuperLink cannot answer (down, restarting) supervise and ask again until
    `deadline`."""
    while True:
        status = _run_status(link, run_id)
        if not status.startswith("unknown") or link.database is None or time.time() > deadline:
            return status
        supervise(link, progress)
        time.sleep(
            5.0
        )  # each ask is a `flwr` process: do not add to the load of a restarting SuperLink


# A ServerApp that fails on its first connection to the SuperLink (seen once in CI: "[SSL:
# UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol", 1 s after it started) never sent a message
# to a site: submitting the run again is safe and is what an operator would do.
_TRANSPORT_ERRORS = ("ssl", "eof occurred", "connection reset", "connection refused", "unavailable")


def _run_record(link: SuperLink, run_id: int) -> dict:
    """The SuperLink's record of one run (`flwr ls --run-id ... --format json`); raises ValueError if unreadable."""
    try:
        return dict(
            json.loads(link.flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"]))[
                "runs"
            ][0]
        )
    except (
        DeploymentError,
        json.JSONDecodeError,
        KeyError,
        IndexError,
        TypeError,
        ValueError,
    ) as e:
        raise ValueError(str(e)) from e


def _failed_before_running(link: SuperLink, run_id: int | None) -> str:
    """The SuperLink's reason when the run failed before its ServerApp ever ran, on a transport error; "" else."""
    try:
        run = _run_record(link, run_id) if run_id is not None else {}
    except ValueError:
        return ""
    details = str(run.get("status-details", ""))
    if (
        run.get("status") == "finished:failed"
        and run.get("running-at") in (None, "", "N/A")
        and any(e in details.lower() for e in _TRANSPORT_ERRORS)
    ):
        return " ".join(details.split())[:200]
    return ""


_SERVER_ERROR = re.compile(r"Server error '(5\d\d [^']*)' for url '[^']*?(/v1/[^']*)'")
_PUSH_REFUSED = re.compile(r"ObjectPushError: Failed to push object with ID '([0-9a-f]{8})")


def _superlink_server_error(run_log: Path) -> str:
    """The SuperLink's own failure that ended a ServerApp, as the run's log shows it; "" if none. Either an HTTP
    5xx on one of its calls (CI saw a heartbeat answered 500 while the SuperLink's SQLite was busy under load) or
    its refusal to store an object of a message the ServerApp was sending (Flower's ObjectPushError: the SuperLink
    dropped the push session; CI saw it once mid-round, in memory, under load). The ServerApp talks to no one else,
    so such a failure is the coordinating machine's, not the app's."""
    try:
        text = run_log.read_text(errors="replace")
    except OSError:
        return ""
    if found := _SERVER_ERROR.search(text):
        return f"{found[1]} on {found[2]}"
    if found := _PUSH_REFUSED.search(text):
        return f"refusal to store object {found[1]}... of a message (ObjectPushError)"
    return ""


def _superlink_complaints(superlink_log: Path, n: int = 8) -> str:
    """The last `n` ERROR/WARNING lines of the SuperLink's log (its own account of a failure, which may lie far
    above the log's last lines)."""
    lines = _log_lines(superlink_log)
    if lines is None:
        return f"(no log at {superlink_log})"
    complaints = [line for line in lines if line.startswith(("ERROR", "WARNING"))]
    return "\n".join(complaints[-n:]) or "(none)"


def _run_status(link: SuperLink, run_id: int | None) -> str:
    if run_id is None:
        return "not started"
    try:
        return str(_run_record(link, run_id)["status"])
    except (ValueError, KeyError) as e:
        return f"unknown ({e})"


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt (like Ctrl-C) so `finally` blocks stop what was started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_federation(
    app_dir: Path,
    work_dir: Path,
    node_configs: list[dict[str, Any]],
    run_config: dict[str, Any],
    *,
    insecure: bool = False,
    timeout_s: float = 1800.0,
    progress: Progress = print,
    python_bin_dir: Path | None = None,
    on_output: Progress | None = None,
    database: Path | None = None,
) -> FederationResult:
    """Start a SuperLink and one SuperNode per node config, run the app, stop everything; raise on failure.

    `progress` gets this module's own messages, `on_output` the lines of `flwr run --stream` (default: progress).
    With `database` the SuperLink keeps its state in that file (see `local_superlink`).
    """
    if not node_configs:
        raise ValueError("run_federation needs at least one node config")
    for config in (run_config, *node_configs):
        for k, v in config.items():
            toml_value(k, v)  # refuse bad values before starting anything
    if not (Path(app_dir) / "pyproject.toml").is_file():
        raise ValueError(
            f"{Path(app_dir) / 'pyproject.toml'} not found: app_dir must be a Flower app folder"
        )
    with stop_on_signals():
        with local_superlink(
            work_dir,
            len(node_configs),
            insecure=insecure,
            python_bin_dir=python_bin_dir,
            progress=progress,
            database=database,
        ) as link:
            with local_supernodes(link, node_configs, progress=progress):
                return run_app(
                    link,
                    app_dir,
                    run_config,
                    timeout_s=timeout_s,
                    progress=progress,
                    on_output=on_output,
                )
