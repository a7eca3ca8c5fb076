"""`fedsynth demo`: three phantom hospitals, a TLS federation on loopback, DP training, a synthetic cohort.

Everything a real consortium would run, on one machine: a SuperLink with TLS and SuperNode authentication, one
SuperNode per hospital pointed at its own folder, the Flower app, then synthesis. Every process it starts is
stopped when it ends, on failure and on Ctrl-C (server.deployment owns that).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.config import RunConfig
from common.phantoms import make_phantom_sites
from server.deployment import run_federation

APP_PYPROJECT = """\
# Written by `fedsynth demo`: the Flower app is the installed fedsynth package; this folder only names it.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsynth-demo-app"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fedsynth"

[tool.flwr.app.components]
serverapp = "server.server_app:app"
clientapp = "client.client_app:app"

[tool.flwr.app.config]
"""


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("fedsynth-demo")
    preset: str = "small"
    rounds: int | None = None
    subjects: int | None = None
    sites: int = 3
    insecure: bool = False
    epsilon: float = 10.0
    timeout_s: float = 1800.0


def demo_run_config(opts: DemoOptions, run_dir: Path) -> RunConfig:
    """The demo's plan: a public-phantom autoencoder and UNet warm start, then DP fine-tuning at the sites."""
    tiny = opts.preset == "tiny"
    return RunConfig(
        preset=opts.preset,
        num_server_rounds=opts.rounds or 2,
        autoencoder_rounds=0,
        autoencoder_source="public",
        public_autoencoder_steps=40 if tiny else 400,
        public_unet_steps=40 if tiny else 1200,
        public_phantoms=24 if tiny else 120,
        local_epochs=1 if tiny else 3,
        batch_size=8 if tiny else 32,
        lr_diffusion=1e-3 if tiny else 5e-5,  # DP fine-tuning of a warm-started model: small steps
        min_sites=min(2, opts.sites),
        run_dir=str(run_dir),
        synthesize_per_class=4 if tiny else 8,
    )


def write_app_dir(app_dir: Path, run: RunConfig) -> Path:
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [APP_PYPROJECT]
    for key, value in run.to_flwr().items():
        lines.append(f"{key} = {json.dumps(value)}")
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


def demo_node_configs(out: Path, epsilon: float) -> list[dict]:
    site_dirs = sorted(p for p in (out / "sites").iterdir() if p.is_dir() and (p / "labels.csv").exists())
    return [
        {"site-dir": str(d), "site-name": d.name, "state-dir": str(out / "site-state" / d.name),
         "epsilon": epsilon, "threads": max(1, (os.cpu_count() or 1) // len(site_dirs))}
        for d in site_dirs
    ]


def run_demo_audit(out: Path, insecure: bool = False, progress: Callable[[str], None] = print) -> int:
    """Audit the demo's cohort again: the same hospitals, a new loopback federation, the ServerApp in audit mode."""
    out = out.resolve()
    run_dir = out / "run"
    record = json.loads((run_dir / "run.json").read_text())
    run = RunConfig(**{**record["run_config"], "mode": "audit", "cohort_dir": str(run_dir / "cohort"),
                       "checkpoint": str(run_dir / "checkpoints" / "latest.pt")})
    app_dir = write_app_dir(out / "app-audit", run)
    run_federation(app_dir, out / "deployment-audit", demo_node_configs(out, 10.0), run.to_flwr(),
                   insecure=insecure, progress=progress)
    verdict = json.loads((run_dir / "audit" / "audit.json").read_text())["verdict"]
    progress(f"audit report: {run_dir / 'audit' / 'audit.html'} (verdict: {verdict['status']})")
    return 0


def run_demo(opts: DemoOptions, progress: Callable[[str], None] = print) -> int:
    out = opts.out.resolve()
    run_dir = out / "run"
    sites_dir = out / "sites"
    if run_dir.exists() and (run_dir / "cohort").exists():
        raise FileExistsError(f"{run_dir / 'cohort'} exists: choose another --out or remove it")
    subjects = opts.subjects or (16 if opts.preset == "tiny" else 120)
    if not sites_dir.exists():
        progress(f"[1/3] making {opts.sites} phantom hospitals with {subjects} patients each in {sites_dir}")
        make_phantom_sites(sites_dir, n_sites=opts.sites, n_subjects=subjects, size=64, seed=0, progress=progress)
    else:
        progress(f"[1/3] reusing phantom hospitals in {sites_dir}")
    run = demo_run_config(opts, run_dir)
    node_configs = demo_node_configs(out, opts.epsilon)
    app_dir = write_app_dir(out / "app", run)
    progress(f"[2/3] federated training: {len(node_configs)} sites, {run.num_server_rounds} rounds, "
             f"{'INSECURE (no TLS)' if opts.insecure else 'TLS + SuperNode authentication'} on loopback")
    run_federation(app_dir, out / "deployment", node_configs, run.to_flwr(), insecure=opts.insecure,
                   timeout_s=opts.timeout_s, progress=progress)
    record = json.loads((run_dir / "run.json").read_text())
    cohort = run_dir / "cohort"
    progress("[3/3] done")
    progress(f"  run record:  {run_dir / 'run.json'} (status: {record['status']}{', ' + record['reason'] if record['reason'] else ''})")
    progress(f"  metrics:     {run_dir / 'metrics.jsonl'}")
    progress(f"  privacy:     {run_dir / 'privacy.json'}")
    if cohort.exists():
        progress(f"  cohort:      {cohort}")
        progress(f"  preview:     {cohort / 'preview.png'}")
        audit = run_dir / "audit" / "audit.json"
        if audit.exists():
            verdict = json.loads(audit.read_text())["verdict"]
            progress(f"  audit:       {run_dir / 'audit' / 'audit.html'} (verdict: {verdict['status']})")
        progress(f"  verify:      fedsynth verify {cohort}")
        return 0
    progress("  no cohort was produced (see the run record)")
    return 1
