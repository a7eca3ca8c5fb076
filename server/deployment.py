"""Flower in deployment mode on one machine: a SuperLink with TLS and SuperNode authentication, one SuperNode per
site, `flwr run` — and every process stopped afterwards, on failure and on Ctrl-C too.

This is what `fedsynth demo` and the integration tests use; a real consortium runs the same commands on several
machines (deploy/README.md). Flower 1.41: Fleet, Control and Runtime APIs share one HTTP port on the SuperLink;
each SuperNode has its own Runtime port for its ClientApp process; `flwr` reads its connection from
$FLWR_HOME/config.toml (we use a private FLWR_HOME, never ~/.flwr).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from server.pki import make_pki

CONNECTION = "fedsynth-local"


class DeploymentError(RuntimeError):
    """A Flower process failed to start or the run failed; the message carries the relevant log tail."""


@dataclass
class FederationResult:
    returncode: int
    logs: dict[str, Path] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _toml_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))


def node_config_arg(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


class Processes:
    """Processes started in their own process groups, all stopped by `stop_all` (idempotent)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        f = open(log, "ab")
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        f.close()
        self.procs[name] = (proc, log)
        return proc

    def stop(self, name: str, grace: float = 10.0) -> None:
        proc, _ = self.procs[name]
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children that outlived their parent in the same group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def check_alive(self, name: str) -> None:
        proc, log = self.procs[name]
        if proc.poll() is not None:
            raise DeploymentError(f"{name} exited with code {proc.returncode}; last log lines:\n{_tail(log)}")


def _wait_port(port: int, procs: Processes, name: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs.check_alive(name)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeploymentError(f"{name} did not open port {port} within {timeout:.0f}s:\n{_tail(procs.procs[name][1])}")


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM (and SIGHUP) become KeyboardInterrupt so `finally` blocks stop what was started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum, frame):
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
    progress: Callable[[str], None] = print,
) -> FederationResult:
    """Start a SuperLink and one SuperNode per node config, run the app, stop everything; raise on failure."""
    work_dir = Path(work_dir).resolve()
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = work_dir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    # Flower spawns flower-superexec / flwr-serverapp / flwr-clientapp by name: our environment's bin goes first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1", "PATH": path}
    port = free_port()
    pki = None if insecure else make_pki(work_dir / "pki", len(node_configs))
    conn = [f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]', f'address = "127.0.0.1:{port}"']
    conn.append("insecure = true" if insecure else f'root-certificates = "{pki.ca_cert}"')
    (flwr_home / "config.toml").write_text("\n".join(conn) + "\n")
    overrides = work_dir / "run_config.toml"
    overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))

    procs = Processes(log_dir)
    logs: dict[str, Path] = {}
    with _stop_on_signals():
        try:
            link = [_bin("flower-superlink"), "--port", str(port), "--disable-runtime-dependency-installation",
                    "--database", str(work_dir / "superlink.db")]
            if insecure:
                link.append("--insecure")
            else:
                link += ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert),
                         "--ssl-keyfile", str(pki.server_key), "--enable-supernode-auth"]
            procs.start("superlink", link, env)
            _wait_port(port, procs, "superlink")
            progress(f"SuperLink up on 127.0.0.1:{port} ({'insecure' if insecure else 'TLS, SuperNode auth'})")
            for i, config in enumerate(node_configs):
                name = f"supernode-{i}"
                node = [_bin("flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                        "--node-config", node_config_arg(config)]
                if insecure:
                    node.append("--insecure")
                else:
                    key = pki.node_keys[i]
                    _flwr(["supernode", "register", str(key) + ".pub", CONNECTION], env, log_dir / "register.log")
                    node += ["--root-certificates", str(pki.ca_cert), "--auth-supernode-private-key", str(key)]
                procs.start(name, node, env)
                progress(f"SuperNode {i} started for {config.get('site-name', config.get('site-dir'))}")
            for i in range(len(node_configs)):
                time.sleep(0.2)
                procs.check_alive(f"supernode-{i}")
            logs = {name: log for name, (_, log) in procs.procs.items()}
            logs["run"] = log_dir / "run.log"
            code = _stream_run(app_dir, overrides, env, logs["run"], procs, timeout_s, progress)
            status = _run_status(logs["run"], env, log_dir / "ls.log")
            if code != 0 or not status.endswith("completed"):
                raise DeploymentError(f"the Flower run ended with status {status!r} (flwr run exit code {code}); "
                                      f"last lines:\n{_tail(logs['run'])}")
            return FederationResult(code, logs)
        finally:
            procs.stop_all()
            progress("stopped the SuperLink and SuperNodes")


def _flwr(args: list[str], env: dict[str, str], log: Path) -> str:
    proc = subprocess.run([_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=120)
    with open(log, "a") as f:
        f.write(f"$ flwr {' '.join(args)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise DeploymentError(f"flwr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _run_status(run_log: Path, env: dict[str, str], log: Path) -> str:
    """The run's final status from the SuperLink (`flwr run --stream` exits 0 even when the ServerApp failed)."""
    match = re.search(r"Successfully started run (\d+)", run_log.read_text(errors="replace"))
    if not match:
        return "not started"
    out = _flwr(["ls", CONNECTION, "--run-id", match.group(1), "--format", "json"], env, log)
    try:
        runs = json.loads(out).get("runs", [])
        return str(runs[0].get("status", "unknown")) if runs else "unknown"
    except (json.JSONDecodeError, AttributeError):
        return "unknown"


def _stream_run(app_dir: Path, overrides: Path, env: dict[str, str], log: Path, procs: Processes,
                timeout_s: float, progress: Callable[[str], None]) -> int:
    """`flwr run --stream`, its lines passed to `progress`; fails fast if the SuperLink dies or time runs out."""
    argv = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream", "--run-config", str(overrides)]
    deadline = time.time() + timeout_s
    lines: queue.Queue[str | None] = queue.Queue()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            start_new_session=True)
    procs.procs["flwr-run"] = (proc, log)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    with open(log, "w") as f:
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                return proc.wait()
            if line:
                f.write(line)
                f.flush()
                if line.strip():
                    progress(line.rstrip())
            if time.time() > deadline:
                raise DeploymentError(f"the run did not finish within {timeout_s:.0f}s")
            procs.check_alive("superlink")
