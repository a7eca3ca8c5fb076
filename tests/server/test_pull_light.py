"""A partner's light install: `pip install "fedsynth[pull]"` pulls and verifies a released cohort from the real
portal (TLS, loopback) without torch, flwr or MONAI.

The light virtual environment is `.venv-pull/` at the repository root, made by .ci/run with
`python3 -m venv .venv-pull && .venv-pull/bin/pip install ".[pull]"` (a real, non-editable install of this tree);
without it the second test is skipped and says how to make it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.release.manifest import verify_release, write_approval
from server.release.portal import register_release
from server.release.store import Store
from tests.server.portal_helpers import PortalServer, approve, make_consortium

ROOT = Path(__file__).resolve().parents[2]
LIGHT = ROOT / ".venv-pull"
HEAVY = ("torch", "flwr", "monai", "opacus", "numpy", "nibabel", "fastapi", "uvicorn")


def test_the_partner_and_officer_commands_import_no_heavy_package():
    code = (
        "import sys, json; import server.release.pull, server.release.remote, server.cli; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


@pytest.mark.skipif(
    not (LIGHT / "bin" / "fedsynth").exists(),
    reason="no light partner venv: python3 -m venv .venv-pull && .venv-pull/bin/pip install '.[pull]' "
    "(.ci/run makes it)",
)
def test_a_light_install_pulls_and_verifies_a_released_cohort(tmp_path):
    python = LIGHT / "bin" / "python"
    for module in ("torch", "flwr", "monai"):
        r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
        assert r.returncode != 0, f"{module} is installed in the light venv"
    c = make_consortium(tmp_path / "consortium")
    data = tmp_path / "data"
    rel = c.release("light-1")
    for officer in ("alice", "bob"):
        write_approval(rel, approve(rel, c, officer))
    register_release(data, rel, consortium_key=c.consortium_pub)
    token = Store(data).issue_token("partner", "acme")[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with PortalServer(data, tmp_path / "pki") as server:
        r = subprocess.run(
            [
                LIGHT / "bin" / "fedsynth",
                "pull",
                "light-1",
                "--portal",
                server.url,
                "--token",
                token,
                "--ca",
                server.ca,
                "--consortium-key",
                c.consortium_pub,
                "--out",
                tmp_path / "light-1",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verified" in r.stdout
        demo = subprocess.run(
            [LIGHT / "bin" / "fedsynth", "demo"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert demo.returncode == 2 and 'pip install "fedsynth[all]"' in demo.stdout
    assert verify_release(tmp_path / "light-1", c.consortium_pub, role="partner") == []
    installed = subprocess.run(
        [python, "-c", "import server; print(server.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(LIGHT) in installed  # the light venv's own copy ran, not this checkout
