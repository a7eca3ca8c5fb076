"""deploy/: what runs on the consortium's machines and cannot run here (systemd, Docker) is checked for syntax and
against the installed Flower: every flag a unit, script or compose file passes exists in `flower-superlink --help`
or `flower-supernode --help`, every file they name exists in the repository, TLS and SuperNode authentication are
always on, and the SuperLink keeps its state in a database.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flwr
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
ROLES = ("superlink", "supernode", "superexec")
TLS = {
    "superlink": {
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--database",
        # the ServerApp runs under a SuperExec of its own, which outlives a SuperLink restart
        "--isolation",
        "--superexec-auth-secret-file",
    },
    "supernode": {"--root-certificates", "--auth-supernode-private-key", "--superlink"},
    "superexec": {"--root-certificates", "--superexec-auth-secret-file", "--runtime-api-address"},
}
ENV_FILE = {
    "superlink": "superlink.env",
    "supernode": "supernode.env",
    "superexec": "superlink.env",
}


@pytest.fixture(scope="module")
def flags() -> dict[str, set[str]]:
    """The long options each installed Flower command accepts, from its --help."""
    out = {}
    for role in ROLES:
        text = subprocess.run(
            [str(BIN / f"flower-{role}"), "--help"], capture_output=True, text=True, timeout=120
        ).stdout
        out[role] = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
        assert "--help" in out[role] and len(out[role]) > 5, text
    return out


def _options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _script_options(script: Path) -> list[str]:
    return re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", script.read_text())


# ---- start scripts and env files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ROLES)
def test_start_scripts_parse_and_pass_only_flags_flower_knows(role, flags):
    script = DEPLOY / f"start-{role}.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    used = set(_script_options(script)) - {"--"}
    assert used <= flags[role], used - flags[role]
    assert TLS[role] - {"--superlink"} <= used and "--insecure" not in used
    # every variable the script reads is set in its env file
    env = _env_file(DEPLOY / ENV_FILE[role])
    needed = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", script.read_text()))
    assert needed <= set(env), needed - set(env)
    assert (
        env["FLWR_TELEMETRY_ENABLED"] == "0"
    )  # the script exports it: no usage telemetry leaves the machine


def _env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines and comments only: valid for `source` and for systemd's EnvironmentFile."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(\S*)", line)
        assert m, f"{path}:{n}: not a KEY=VALUE line: {line!r}"
        out[m.group(1)] = m.group(2)
    return out


# ---- systemd units -----------------------------------------------------------------------------------------------
def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string(path.read_text())
    return unit


@pytest.mark.parametrize("role", ROLES)
def test_systemd_units_name_files_that_exist_and_verify(role, tmp_path):
    path = DEPLOY / "systemd" / f"fedsynth-{role}.service"
    unit = _unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    # /opt/fedsynth is the repository's checkout, /etc/fedsynth/NAME.env is deploy/NAME.env edited
    exec_start = service["ExecStart"].split()
    script = ROOT / exec_start[0].removeprefix("/opt/fedsynth/")
    assert exec_start[0].startswith("/opt/fedsynth/") and script.is_file()
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    env_file = Path(service["EnvironmentFile"])
    assert (DEPLOY / env_file.name).is_file() and exec_start[1] == str(env_file)
    assert "/opt/fedsynth/.venv/bin" in service["Environment"]  # Flower spawns its helpers by name
    assert service["Restart"] == "always" and service["KillMode"] == "control-group"
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip(
            "systemd-analyze is not installed: the units were parsed, not verified by systemd"
        )
    local = tmp_path / path.name
    local.write_text(
        path.read_text()
        .replace("/etc/fedsynth/", f"{DEPLOY}/")
        .replace("/opt/fedsynth/", f"{ROOT}/")
    )
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if re.search(r"Unknown|Invalid|not executable|Failed|Missing", line)
    ]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


# ---- Docker ------------------------------------------------------------------------------------------------------
def _volume_target(volume: str) -> str:
    """The container path of a short-syntax volume ("${VAR:?why}:/in/container:ro", "name:/in/container")."""
    return re.sub(r"\$\{[^}]*\}", "", volume).split(":")[1]


def _compose(role: str) -> dict:
    return yaml.safe_load((DEPLOY / "docker" / f"compose.{role}.yaml").read_text())


@pytest.mark.parametrize("role", ROLES)
def test_compose_files_use_flowers_images_tls_auth_and_known_flags(role, flags):
    compose = _compose("supernode" if role == "supernode" else "superlink")
    service = compose["services"][role]
    if role == "superlink":  # runs no fedsynth code (--isolation process): Flower's image as it is
        assert "build" not in service
        base = service["image"]
    else:  # runs the ClientApp or the ServerApp: Flower's image + fedsynth
        base = service["build"]["args"]["BASE_IMAGE"]
        context = (DEPLOY / "docker" / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]).is_file()
    image, version = base.split(":")
    assert image == f"flwr/{role}"  # Flower's official image
    assert (
        version.split(".")[:2] == flwr.__version__.split(".")[:2]
    )  # the Flower the code is tested with
    used = _options(service["command"])
    assert set(used) <= flags[role], set(used) - flags[role]
    assert TLS[role] <= set(used) and "--insecure" not in used
    assert service["restart"] == "unless-stopped"
    assert service["environment"]["FLWR_TELEMETRY_ENABLED"] == "0"
    # every file the command names inside the container is mounted there
    targets = [_volume_target(v) for v in service["volumes"]]
    for arg in service["command"]:
        value = arg.split("=", 1)[1] if "=" in arg else ""
        if value.startswith("/app/"):
            assert any(value == t or value.startswith(t + "/") for t in targets), (arg, targets)
    # named volumes are declared; state (database, ledger) is on one
    named = {v.split(":")[0] for v in service["volumes"] if not v.startswith(("$", ".", "/"))}
    assert named <= set(compose["volumes"])
    assert any(t == "/app/state" for t in targets)
    if role == "superexec":  # the same secret file as the SuperLink's, and the run folders
        link = compose["services"]["superlink"]
        assert "--isolation=process" in link["command"]
        secret = next(
            v for v in service["volumes"] if v.endswith(":/app/secrets/superexec.secret:ro")
        )
        assert secret.split(":")[0].startswith("${SUPEREXEC_SECRET")
        assert any(v.endswith(":/app/secrets/superexec.secret:ro") for v in link["volumes"])
        assert any(_volume_target(v) == "/app/runs" for v in service["volumes"])


def test_superlink_compose_keeps_state_in_a_database_on_a_volume():
    service = _compose("superlink")["services"]["superlink"]
    db = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--database="))
    assert db.startswith("/app/state/") and service["environment"]["FLWR_HOME"].startswith(
        "/app/state/"
    )


def test_dockerfile_copies_only_what_exists_and_builds_on_the_given_image():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=flwr/supernode:", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), src
    assert "USER app" in text  # Flower's images run unprivileged


@pytest.mark.parametrize(
    "path", [DEPLOY / "node-config.example.toml", DEPLOY / "docker" / "node-config.docker.toml"]
)
def test_node_configs_parse_and_carry_the_site_keys(path):
    from common.config import SiteConfig

    config = tomllib.loads(path.read_text())
    site = SiteConfig.from_flwr(config)
    assert site.name == config["site-name"] and str(site.state_path) == config["state-dir"]
