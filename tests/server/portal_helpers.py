"""Shared fixtures for the portal, pull and browser tests: a real tiny cohort, a real audit, a signed release
candidate, TLS certificates, and the portal served by uvicorn over TLS on a free loopback port."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn

from common.config import RunConfig, model_config
from common.model import build_autoencoder, build_unet
from common.signing import generate_keypair
from privacy.audit_schema import load_audit
from privacy.audit_stats import empirical_epsilon_lower_bound, roc_summary
from privacy.memorization import memorization_audit
from privacy.policy import DEFAULT_POLICY
from privacy.report import write_audit_report
from privacy.verdict import build_audit
from server.audit import load_cohort
from server.checkpoint import Checkpoint, RunState
from server.pki import make_pki
from server.release.manifest import build_release
from server.release.portal import PortalSettings, server_config
from server.synthesis import SynthesisRequest, synthesize_cohort
from tests.privacy.test_policy import privacy_json

OFFICERS = ("alice", "bob")


def make_cohort(root: Path) -> Path:
    """A real cohort (NIfTI + labels + manifest) from a tiny untrained model: 2 images per class."""
    cfg = model_config("tiny", ddim_steps=2)
    torch.manual_seed(0)
    state = RunState(run_id="portal-test", completed_round=2, latent_scale=1.0)
    ckpt = Checkpoint(
        cfg,
        dataclasses.asdict(RunConfig(preset="tiny")),
        state,
        build_autoencoder(cfg).state_dict(),
        build_unet(cfg).state_dict(),
    ).save(root / "run")
    return synthesize_cohort(
        SynthesisRequest(ckpt, root / "cohort", per_class=2, seed=1, batch_size=4)
    )


def _attack(rng, n=120, delta=1e-5):
    m, nm = rng.normal(0, 1, n), rng.normal(0, 1, n)
    return {
        **roc_summary(m, nm),
        "epsilon_lower_bound": empirical_epsilon_lower_bound(m, nm, delta),
    }


def make_audit(cohort: Path, out: Path, *, epsilon: float = 4.0) -> Path:
    """A real audit.json + audit.html of `cohort` from two sites' aggregates (real memorization and membership
    statistics on random records); epsilon above the default policy's 10 makes the gate block the release."""
    images, ids, labels, class_names = load_cohort(cohort)
    rng = np.random.default_rng(0)
    sites = {}
    for name in ("hospital-a", "hospital-b"):
        members = rng.uniform(0, 1, (12, *images.shape[1:])).astype(np.float32)
        nonmembers = rng.uniform(0, 1, (12, *images.shape[1:])).astype(np.float32)
        sites[name] = {
            "site": name,
            "n_members": 120,
            "n_nonmembers": 120,
            "claimed_privacy": {
                "protection": "formal sample-level DP per patient (RDP accountant, delta=1e-05)",
                "epsilon": epsilon,
                "delta": 1e-5,
                "accountant": "rdp",
                "epsilon_budget": 10.0,
            },
            "memorization": memorization_audit(images, ids, members, nonmembers),
            "membership": {"white_box": _attack(rng), "black_box": _attack(rng)},
            "fidelity": {
                "overall": {
                    "frechet_distance": 1.0,
                    "precision": 0.8,
                    "recall": 0.7,
                    "density": 0.9,
                    "coverage": 0.8,
                }
            },
            "utility": {"train_synthetic_test_real": {"balanced_accuracy": 0.8, "auc": 0.85}},
        }
    manifest = json.loads((cohort / "manifest.json").read_text())
    audit = build_audit(
        sites,
        cohort={
            "path": str(cohort),
            "n_images": len(ids),
            "class_names": class_names,
            "checkpoint_sha256": manifest["checkpoint"]["sha256"],
            "run_id": manifest["checkpoint"]["run_id"],
        },
    )
    write_audit_report(audit, out)
    return out


@dataclasses.dataclass
class Consortium:
    root: Path
    cohort: Path
    audit: Path
    consortium_key: Path
    consortium_pub: Path
    officer_keys: dict[str, Path]  # name -> private key
    officer_pubs: dict[str, Path]

    def release(self, name: str, *, epsilon: float = 4.0, cohort_id: str | None = None) -> Path:
        """A fresh signed release candidate (gate passed unless `epsilon` > 10)."""
        audit = (
            self.audit
            if epsilon == 4.0
            else make_audit(self.cohort, self.root / f"audit-{name}", epsilon=epsilon)
        )
        return build_release(
            self.cohort,
            audit,
            self.root / "releases" / name,
            policy=DEFAULT_POLICY,
            consortium_key=self.consortium_key,
            officer_keys=self.officer_pubs,
            cohort_id=cohort_id or name,
            server_privacy=privacy_json(load_audit(audit / "audit.json")),
        )


def make_consortium(root: Path) -> Consortium:
    root.mkdir(parents=True, exist_ok=True)
    cohort = make_cohort(root)
    audit = make_audit(cohort, root / "audit")
    keys = root / "keys"
    ckey, cpub = generate_keypair(keys, "consortium")
    officer_keys, officer_pubs = {}, {}
    for n in OFFICERS:
        officer_keys[n], officer_pubs[n] = generate_keypair(keys, n)
    return Consortium(root, cohort, audit, ckey, cpub, officer_keys, officer_pubs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortalServer:
    """The real portal app under uvicorn with TLS, in a background thread, on a free loopback port."""

    def __init__(self, data: Path, pki_dir: Path, settings: PortalSettings | None = None):
        self.data = data
        self.pki = make_pki(pki_dir, 0) if not (pki_dir / "ca.crt").exists() else None
        self.ca = pki_dir / "ca.crt"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        config = server_config(
            data,
            host="127.0.0.1",
            port=self.port,
            cert=pki_dir / "superlink.crt",
            key=pki_dir / "superlink.key",
            settings=settings,
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> PortalServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the portal did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, token: str | None = None) -> httpx.Client:
        import ssl

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(
            base_url=self.url,
            verify=ssl.create_default_context(cafile=str(self.ca)),
            headers=headers,
            timeout=30,
        )


def raw_request(
    server: PortalServer, target: str, token: str | None = None, method: str = "GET"
) -> tuple[int, bytes]:
    """Send a request line exactly as given (no client-side URL normalisation) over TLS; (status, whole reply)."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(server.ca))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(
                f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode()
            )
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


def approve(
    release_dir: Path,
    consortium: Consortium,
    officer: str,
    decision: str = "approve",
    reason: str = "",
) -> dict:
    """An officer's signed decision, made on the command line (server.release.sign_approval)."""
    from server.release.manifest import approval_statement, sign_approval

    return sign_approval(
        approval_statement(release_dir, officer, decision, reason), consortium.officer_keys[officer]
    )
