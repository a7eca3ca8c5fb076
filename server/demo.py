"""`fedsynth demo`: three phantom hospitals, public pretraining, a TLS federation on loopback, DP fine-tuning at
the sites, a synthetic cohort, its audit and a release candidate.

Everything a real consortium would run, on one machine: a public data folder that differs from the hospitals the
way real public data does (healthy volunteers only, one protocol no site uses: common/phantoms.py), `fedsynth
pretrain` on it (once: the checkpoint is cached in the demo's folder, keyed by the preset, the steps and the public
data's hash, and reused by later runs), a SuperLink with TLS and SuperNode authentication, one SuperNode per
hospital pointed at its own folder, the Flower app, then synthesis. Every process it starts is stopped when it
ends, on failure and on Ctrl-C (server.deployment owns that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import RunConfig, model_config
from common.phantoms import PUBLIC_PROTOCOL, make_phantom_sites, make_public_phantoms
from server.checkpoint import Checkpoint
from server.deployment import DeploymentError, run_federation
from server.pretrain import PretrainConfig, pretrain, public_data_hash
from server.run_folder import RunFolder
from server.terminal import Console, format_seconds

APP_PYPROJECT = """\
# Written by `fedsynth demo`: the Flower app is the installed fedsynth package; this folder only names it.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedsynth-demo-app"
version = "0.1.0"
description = "fedsynth's Flower app (ServerApp and ClientApp of the installed fedsynth package)"
license = "Apache-2.0"
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
    preset: str = ""  # "" -> the demo preset for `dims`: small (2-D) or tiny3d (3-D)
    dims: int = 2  # 2: one axial slice per patient; 3: whole volumes
    rounds: int | None = None
    subjects: int | None = None
    public_subjects: int | None = None
    threads: int = (
        0  # pretraining and each site; 0: torch's default at the server, cores / sites at each site
    )
    sites: int = 3
    utility_cnn_steps: int = (
        0  # steps of each site's utility CNNs in the audit; 0: the recipe's (privacy/utility.py)
    )
    insecure: bool = False
    epsilon: float = 10.0
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise ValueError("dims must be 2 or 3")
        if self.utility_cnn_steps < 0:
            raise ValueError("--utility-cnn-steps must be >= 0 (0: the recipe's steps)")
        preset = self.preset or ("tiny3d" if self.dims == 3 else "small")
        if model_config(preset).spatial_dims != self.dims:
            raise ValueError(
                f"preset {preset!r} is {model_config(preset).spatial_dims}-D but --dims is {self.dims}: "
                "choose a 3-D preset (tiny3d, base3d) for --dims 3, a 2-D one otherwise"
            )
        object.__setattr__(self, "preset", preset)


@dataclass(frozen=True)
class DemoPlan:
    """One preset's demo: the phantom hospitals' size, the public set's size and pretraining, the federated plan.
    `demo_plan` gives the one for a run, the options' overrides applied; the stages read it, never the options."""

    subjects: int  # patients per phantom hospital
    holdout: float  # share held out for the audit
    public: int  # healthy volunteers in the public set
    ae_steps: int  # public pretraining (server/pretrain.py)
    unet_steps: int
    pretrain_batch: int
    rounds: int  # federated rounds, the autoencoder's included
    ae_rounds: int
    per_class: int  # synthetic images per class
    # DP fine-tuning: privacy/recipe.py's dp_recipe for the sites' training patients and budget (public facts);
    # without it, the three fields below
    recipe: bool = False
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3


# Per preset. `small` (the default, and the plan of a preset without one here) is sized for a 2-core CPU: see the
# README's demo section.
DEMO_PLANS: dict[str, DemoPlan] = {
    "tiny": DemoPlan(
        subjects=16,
        holdout=0.25,
        public=24,
        ae_steps=40,
        unet_steps=40,
        pretrain_batch=8,
        rounds=2,
        ae_rounds=0,
        local_epochs=1,
        batch_size=8,
        lr=1e-3,
        per_class=4,
    ),
    "small": DemoPlan(
        # 310 patients per site, 35 % held out for the audit: 101-115 hold-out patients at each site, so TPR at
        # 1 % FPR is measurable (it needs 100), and about 200 training patients each (DP time grows with them)
        subjects=310,
        holdout=0.35,
        public=300,
        # one-cycle schedules (server/pretrain.py); 800 autoencoder steps keep the ventricles (400: faint), see
        # docs/RECIPE.md
        ae_steps=800,
        unet_steps=1200,
        pretrain_batch=16,
        rounds=2,
        ae_rounds=0,
        recipe=True,
        per_class=200,
    ),
    "tiny3d": DemoPlan(
        # one DP autoencoder round at the sites, from the public autoencoder; the samples are noise at this size.
        # 40 patients, 35 % held out: 10+ hold-out patients at each site, what membership inference needs for the
        # audit to say anything (with 20 at 25 % every site fell short and the audit was inconclusive). The gate
        # still blocks: TPR at 1 % FPR needs 100+ hold-out patients (310 per site: a 10-minute demo, README)
        subjects=40,
        holdout=0.35,
        public=12,
        ae_steps=10,
        unet_steps=10,
        pretrain_batch=4,
        rounds=2,
        ae_rounds=1,
        local_epochs=1,
        batch_size=8,
        lr=1e-3,
        per_class=4,
    ),
}


def demo_plan(opts: DemoOptions) -> DemoPlan:
    """The plan of `opts.preset` with the options' patients, public volunteers and rounds where they are given."""
    plan = DEMO_PLANS.get(opts.preset, DEMO_PLANS["small"])
    return dataclasses.replace(
        plan,
        subjects=opts.subjects or plan.subjects,
        public=opts.public_subjects or plan.public,
        rounds=opts.rounds or plan.rounds,
    )


def demo_run_config(
    opts: DemoOptions, plan: DemoPlan, run_dir: Path, pretrained: Path | str = ""
) -> RunConfig:
    """The demo's plan: DP fine-tuning at the sites of the public pretrained checkpoint, then a cohort and its
    audit. With `recipe`, the DP settings are privacy/recipe.py's for the sites' approximate training-patient count
    and the budget (never chosen by looking at site data)."""
    dp: dict[str, Any] = dict(
        local_epochs=plan.local_epochs, batch_size=plan.batch_size, lr_diffusion=plan.lr
    )
    if plan.recipe:
        r = demo_recipe(opts, plan)
        dp = dict(
            local_epochs=r.local_epochs,
            batch_size=r.batch_size,
            lr_diffusion=r.lr,
            dp_trainable=r.dp_trainable,
            class_dropout=r.class_dropout,
            guidance_scale=r.guidance_scale,
            lesion_weight=r.lesion_weight,
            lr_autoencoder=r.lr_autoencoder,
            dp_trainable_autoencoder=r.dp_trainable_autoencoder,
        )
    return RunConfig(
        preset=opts.preset,
        pretrained=str(pretrained),
        num_server_rounds=plan.rounds,
        autoencoder_rounds=plan.ae_rounds,
        min_sites=min(2, opts.sites),
        run_dir=str(run_dir),
        synthesize_per_class=plan.per_class,
        # each site's scanner noise level under DP: the audit scores the cohort with it added back
        release_noise_levels=True,
        **dp,
    )


def demo_recipe(opts: DemoOptions, plan: DemoPlan):
    """privacy/recipe.py's DP settings for the demo's sites and rounds (autoencoder and diffusion): their expected training-patient
    count (the phantom sites' size times the share not held out), their budget and delta 1e-5."""
    from privacy.recipe import dp_recipe

    n = round(plan.subjects * (1 - plan.holdout))
    return dp_recipe(
        opts.epsilon,
        1e-5,
        max(1, n),
        opts.preset,
        max(1, plan.rounds - plan.ae_rounds),
        autoencoder_rounds=plan.ae_rounds,
    )


def demo_pretrain_config(
    opts: DemoOptions, plan: DemoPlan, public_dir: Path, out: Path
) -> PretrainConfig:
    return PretrainConfig(
        public_dir=str(public_dir),
        out=str(out),
        preset=opts.preset,
        autoencoder_steps=plan.ae_steps,
        unet_steps=plan.unet_steps,
        batch_size=plan.pretrain_batch,
        threads=opts.threads,
    )


def pretrained_cache_path(pre: PretrainConfig, public_sha256: str, cache_dir: Path) -> Path:
    """Where the demo keeps the checkpoint of this pretraining: named by a hash of everything that decides it
    (the preset, the steps, the batch, the class dropout, the seed, the public data's content hash)."""
    key = {
        **{
            k: v
            for k, v in dataclasses.asdict(pre).items()
            if k not in ("public_dir", "out", "threads")
        },
        "public_data_sha256": public_sha256,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{pre.preset}-{digest}.pt"


def make_public_set(opts: DemoOptions, plan: DemoPlan, out: Path, console: Console) -> Path:
    public = out / "public"
    if public.exists():
        console.say(f"[2/5] reusing the public data set in {public}")
        return public
    console.say(
        f"[2/5] making the public data set in {public}: {plan.public} healthy volunteers, one protocol "
        f"({PUBLIC_PROTOCOL}) that no hospital uses"
    )
    size = 64 if opts.dims == 2 else model_config(opts.preset).image_size
    return make_public_phantoms(public, n_subjects=plan.public, dims=opts.dims, size=size, seed=0)


def demo_pretrained(
    opts: DemoOptions, plan: DemoPlan, out: Path, public: Path, console: Console
) -> tuple[Path, bool]:
    """The public pretrained checkpoint and whether it was reused: made once by `fedsynth pretrain`'s code, then
    reused from the cache."""
    digest, _ = public_data_hash(public)
    pre = demo_pretrain_config(opts, plan, public, out / "pretrained" / "pending.pt")
    path = pretrained_cache_path(pre, digest, out / "pretrained")
    if path.exists():
        made = (Checkpoint.load(path).pretraining or {}).get("created", "an unknown date")
        console.say(f"[3/5] reusing the public checkpoint made on {made}: {path}")
        return path, True
    console.say(
        f"[3/5] public pretraining (once; later runs reuse it): autoencoder {pre.autoencoder_steps} steps, "
        f"diffusion UNet {pre.unet_steps} steps on {public} -> {path}"
    )
    return pretrain(dataclasses.replace(pre, out=str(path)), say=console.detail), False


def write_app_dir(app_dir: Path, run: RunConfig) -> Path:
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = [APP_PYPROJECT]
    for key, value in run.to_flwr().items():
        lines.append(f"{key} = {json.dumps(value)}")
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


DEMO_EXTRACTION_SAMPLES = 200


def demo_node_configs(
    out: Path,
    epsilon: float,
    threads: int = 0,
    holdout: float = 0.25,
    max_grad_norm: float = 1.0,
    utility_cnn_steps: int = 0,
) -> list[dict]:
    site_dirs = sorted(
        p for p in (out / "sites").iterdir() if p.is_dir() and (p / "labels.csv").exists()
    )
    return [
        {
            "site-dir": str(d),
            "site-name": d.name,
            "state-dir": str(out / "site-state" / d.name),
            "epsilon": epsilon,
            "threads": threads or max(1, (os.cpu_count() or 1) // len(site_dirs)),
            "holdout-fraction": holdout,
            # each site's extraction search draws at most this many extra samples (default 1000, about 6 min per
            # site on one CPU thread): the demo's three sites share two cores and the demo has 10 minutes
            "max-extraction-samples": DEMO_EXTRACTION_SAMPLES,
            "max-grad-norm": max_grad_norm,
            "utility-cnn-steps": utility_cnn_steps,
        }
        for d in site_dirs
    ]


def run_demo_audit(out: Path, insecure: bool = False, console: Console | None = None) -> int:
    """Audit the demo's cohort again: the same hospitals, a new loopback federation, the ServerApp in audit mode."""
    console = console or Console()
    out = out.resolve()
    folder = RunFolder(out / "run")
    record = folder.read_record()
    console.log_to(folder.log("audit-again"))
    run = RunConfig(
        **{
            **record["run_config"],
            "mode": "audit",
            "cohort_dir": str(folder.cohort),
            "checkpoint": str(folder.latest_checkpoint),
        }
    )
    app_dir = write_app_dir(out / "app-audit", run)
    console.say(f"auditing {folder.cohort} again at every site (a new loopback federation)")
    run_federation(
        app_dir,
        out / "deployment-audit",
        demo_node_configs(out, 10.0),
        run.to_flwr(),
        insecure=insecure,
        progress=console.detail,
        on_output=console.flower_line,
    )
    verdict = json.loads((folder.audit / "audit.json").read_text())["verdict"]
    console.result(
        f"audit report: {folder.audit / 'audit.html'} (verdict: {verdict['status']}); "
        f"full log: {console.log_file}"
    )
    return 0


def demo_policy(default):
    """The demo's release policy: fedsynth's default PRIVACY limits, unchanged (epsilon, delta, membership
    inference including TPR at 1 % FPR, near-copies, withheld share, the audit verdict): a demo that passes only
    because its limits were relaxed would teach the wrong thing. Where three small phantom sites cannot meet a
    privacy figure (TPR at 1 % FPR needs 100+ hold-out patients per site), the demo's release is blocked and the
    gate says why.

    Relaxed, and labelled in the gate table: fidelity and utility are not demanded (thresholds 0; utility may be
    unmeasured at a site without lesion patients): two short DP rounds on phantoms show the pipeline, not a useful
    generator. One approval: the demo names one privacy officer.
    """
    return dataclasses.replace(
        default,
        min_precision=0.0,
        min_coverage=0.0,
        min_tstr_balanced_accuracy=0.0,
        allow_unmeasured=("min_tstr_balanced_accuracy",),
        required_approvals=1,
    )


def publish_demo_release(out: Path) -> dict[str, Any]:
    """After a demo with a cohort and an audit: a consortium key and one privacy officer key (out/keys/), the
    release candidate under `demo_policy` (one approval: the demo has one officer), and a portal data
    folder (out/portal/) with the candidate registered and an officer and a partner token in out/portal/tokens.txt
    (0600). Returns where everything is; `demo_summary` says what to do next."""

    from common.io import atomic_path
    from common.signing import generate_keypair
    from privacy.policy import DEFAULT_POLICY
    from server.pki import make_pki
    from server.release.manifest import build_release
    from server.release.portal import register_release
    from server.release.store import Store

    out = Path(out).resolve()
    keys, portal = out / "keys", out / "portal"
    if portal.exists():
        raise FileExistsError(f"{portal} exists: the demo's portal was already prepared")
    consortium_key, consortium_pub = generate_keypair(keys, "consortium")
    _, officer_pub = generate_keypair(keys, "officer")
    policy = demo_policy(DEFAULT_POLICY)
    folder = RunFolder(out / "run")
    release = build_release(
        folder.cohort,
        folder.audit,
        out / "release",
        policy=policy,
        consortium_key=consortium_key,
        officer_keys={"officer": officer_pub},
        server_privacy=folder.privacy_json,
    )
    cohort_id = register_release(portal, release, consortium_key=consortium_pub)
    store = Store(portal)
    tokens = {
        role: store.issue_token(role, name)
        for role, name in (("officer", "officer"), ("partner", "partner"), ("admin", "admin"))
    }
    with atomic_path(portal / "tokens.txt") as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(
            "".join(f"{role} {tid} {secret}\n" for role, (tid, secret) in tokens.items())
        )
    tls = out / "deployment" / "pki"
    if not (tls / "superlink.crt").exists():
        tls = out / "portal-tls"
        make_pki(tls, 0, overwrite=True)
    return {
        "cohort_id": cohort_id,
        "status": store.cohort(cohort_id)["status"],
        "release": release,
        "portal": portal,
        "tokens": portal / "tokens.txt",
        "consortium_pub": consortium_pub,
        "officer_key": keys / "officer.key",
        "cert": tls / "superlink.crt",
        "key": tls / "superlink.key",
        "ca": tls / "ca.crt",
    }


def make_demo_sites(opts: DemoOptions, plan: DemoPlan, out: Path, console: Console) -> None:
    sites_dir = out / "sites"
    if sites_dir.exists():
        console.say(f"[1/5] reusing the phantom hospitals in {sites_dir}")
        return
    console.say(
        f"[1/5] making {opts.sites} phantom hospitals with {plan.subjects} patients each in {sites_dir}"
    )
    make_phantom_sites(
        sites_dir,
        n_sites=opts.sites,
        n_subjects=plan.subjects,
        dims=opts.dims,
        size=64 if opts.dims == 2 else model_config(opts.preset).image_size,
        seed=0,
        progress=console.detail,
    )


def train_in_federation(
    opts: DemoOptions, plan: DemoPlan, out: Path, pretrained: Path, console: Console
) -> None:
    """Federated training, synthesis and the sites' audit: one Flower run over TLS on loopback."""
    run = demo_run_config(opts, plan, out / "run", pretrained)
    clip = demo_recipe(opts, plan).max_grad_norm if plan.recipe else 1.0
    node_configs = demo_node_configs(
        out, opts.epsilon, opts.threads, plan.holdout, clip, opts.utility_cnn_steps
    )
    app_dir = write_app_dir(out / "app", run)
    console.say(
        f"[4/5] federation on loopback ({'INSECURE: no TLS' if opts.insecure else 'TLS + SuperNode authentication'}): "
        f"{len(node_configs)} sites, {run.num_server_rounds} DP rounds from the public checkpoint, synthesis of "
        f"{run.synthesize_per_class * model_config(run.preset).num_classes} images, audit"
    )
    run_federation(
        app_dir,
        out / "deployment",
        node_configs,
        run.to_flwr(),
        insecure=opts.insecure,
        timeout_s=opts.timeout_s,
        progress=console.detail,
        on_output=console.flower_line,
    )


# What one demo run leaves (kept: the phantom hospitals, the public set and the pretrained checkpoints)
RUN_OUTPUTS = ("run", "release", "portal", "keys", "site-state", "app", "deployment", "portal-tls")


def set_aside_previous_run(out: Path) -> Path | None:
    """A second `fedsynth demo` in the same folder starts a new run: the previous one moves, whole, to
    out/previous/<time>/ (nothing is deleted); returns where, or None when there was none. Its phantom hospitals'
    privacy ledgers go with it, so the new run has the budget again: a demo convenience on phantom patients; a real
    site's ledger is never reset."""
    if not (out / "run").exists():
        return None
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = out / "previous" / stamp
    dest.mkdir(parents=True)
    for name in found:
        shutil.move(str(out / name), str(dest / name))
    return dest


def run_demo(opts: DemoOptions, console: Console | None = None) -> int:
    """The whole path; ends with `demo_summary`. 0 when it produced a cohort (released, pending or blocked: the
    summary says which), 1 when the federation failed or produced none."""
    console = console or Console()
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    moved = set_aside_previous_run(out)
    folder = RunFolder(out / "run")
    console.log_to(folder.log("demo"))
    if moved:
        console.say(
            f"the previous demo run moved to {moved} (with its phantom hospitals' privacy ledgers: a new demo run "
            "starts with the full budget on the same phantom patients; a real site's ledger is never reset)"
        )
    plan = demo_plan(opts)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    make_demo_sites(opts, plan, out, console)
    seconds["phantom hospitals"] = time.monotonic() - t0
    t1 = time.monotonic()
    public = make_public_set(opts, plan, out, console)
    seconds["public data set"] = time.monotonic() - t1
    t1 = time.monotonic()
    pretrained, reused = demo_pretrained(opts, plan, out, public, console)
    seconds["public pretraining (reused)" if reused else "public pretraining"] = (
        time.monotonic() - t1
    )
    t1, failed = time.monotonic(), False
    try:
        train_in_federation(opts, plan, out, pretrained, console)
    except DeploymentError as err:  # the summary below still says where things stand
        console.warn(f"ERROR: the federation failed: {err}")
        failed = True
    seconds["federation"] = time.monotonic() - t1
    release = None
    if folder.cohort.exists() and (folder.audit / "audit.json").exists():
        console.say("[5/5] release candidate: policy gate, signed release, portal folder")
        t2 = time.monotonic()
        try:
            release = publish_demo_release(out)
        except Exception as err:  # the cohort and its audit stand without the portal
            console.warn(f"the release was not prepared ({type(err).__name__}: {err})")
        seconds["release"] = time.monotonic() - t2
    seconds["total"] = time.monotonic() - t0
    console.say("done")
    console.result(demo_summary(out, stage_times(seconds, console.stage_seconds), release))
    console.result(f"full log: {console.log_file}")
    return 0 if folder.cohort.exists() and not failed else 1


def stage_times(measured: dict[str, float], reported: dict[str, float]) -> list[tuple[str, float]]:
    """Time per stage: what the demo measured itself, the federation split by what the ServerApp's stages
    reported."""
    inside = [
        ("federated rounds", reported.get("round", 0.0)),
        ("synthesis", reported.get("synthesis", 0.0)),
        ("audit", reported.get("audit", 0.0)),
    ]
    rows = [
        (name, measured[name])
        for name in (
            "phantom hospitals",
            "public data set",
            "public pretraining",
            "public pretraining (reused)",
        )
        if name in measured
    ]
    if "federation" in measured:
        rows += [(name, s) for name, s in inside if s > 0]
        rows.append(
            (
                "federation set-up and hand-offs",
                max(0.0, measured["federation"] - sum(s for _, s in inside)),
            )
        )
    if "release" in measured:
        rows.append(("release and portal", measured["release"]))
    rows.append(("total", measured.get("total", sum(s for _, s in rows))))
    return rows


SUMMARY_TITLE = "== fedsynth demo: summary =="


def demo_summary(out: Path, times: list[tuple[str, float]], release: dict[str, Any] | None) -> str:
    """The end of the demo: time per stage, privacy spent per site, cohort, audit, gate, and the next command that
    will work. Read from the files the run left (run.json, privacy.json, audit.json, the release)."""
    folder = RunFolder(Path(out) / "run")
    lines = [SUMMARY_TITLE]
    if not folder.run_json.exists():
        lines.append("run:       did not start (see the error above and the full log)")
        return "\n".join(lines)
    record = folder.read_record()
    lines += _wrap_items("time:", [f"{name} {format_seconds(s)}" for name, s in times])
    status = f"{record['status']}, {record['completed_round']}/{record['num_server_rounds']} rounds"
    lines.append(f"run:       {status}" + (f" ({record['reason']})" if record["reason"] else ""))
    lines += public_lines(record.get("pretraining"))
    lines += privacy_lines(folder.root)
    audit_path = folder.audit / "audit.json"
    if not folder.cohort.exists():
        lines.append(f"cohort:    none was produced; see {folder.run_json}")
        lines.append(
            "next:      nothing to release; fix what run.json names and run the demo again"
        )
        return "\n".join(lines)
    manifest = json.loads((folder.cohort / "manifest.json").read_text())
    per_class = ", ".join(f"{manifest['per_class']} {c}" for c in manifest["class_names"])
    lines.append(
        f"cohort:    {manifest['n_images']} synthetic images ({per_class}) in {folder.cohort}"
    )
    if not audit_path.exists():
        lines.append("audit:     none (no site audited the cohort); nothing can be released")
        return "\n".join(lines)
    verdict = json.loads(audit_path.read_text())["verdict"]
    reasons = verdict.get("reasons") or ["(no reason given)"]
    more = f" (+{len(reasons) - 1} more in the report)" if len(reasons) > 1 else ""
    lines.append(f"audit:     {verdict['status'].upper()}: {reasons[0]}{more}")
    lines.append(f"           report {folder.audit / 'audit.html'}")
    lines += release_lines(release)
    return "\n".join(lines)


def _wrap_items(label: str, items: list[str], width: int = 110) -> list[str]:
    """`label` and comma-separated items, wrapped between items (never inside one), continued under the first."""
    lines = [label.ljust(11)]
    for i, item in enumerate(items):
        text = item + ("," if i < len(items) - 1 else "")
        if len(lines[-1]) > 11 and len(lines[-1]) + 1 + len(text) > width:
            lines.append(" " * 11)
        lines[-1] += ("" if len(lines[-1]) == 11 else " ") + text
    return lines


def public_lines(p: dict[str, Any] | None) -> list[str]:
    """Where the run's starting weights came from: the public checkpoint and its data, as run.json records them."""
    if not p:
        return ["public:    none: the models were trained from scratch at the sites"]
    counts = ", ".join(f"{n} {c}" for c, n in p["public_class_counts"].items())
    return _wrap_items(
        "public:",
        [
            f"pretrained on {p['public_images']} public images ({counts})",
            f"data sha256 {p['public_data_sha256'][:12]}",
            f"autoencoder {p['autoencoder_steps']} + UNet {p['unet_steps']} steps in "
            f"{format_seconds(p['seconds'])}",
            f"checkpoint {Path(p['checkpoint']).name} (sha256 {p['checkpoint_sha256'][:12]}, made {p['created']})",
        ],
    )


def privacy_lines(run_dir: Path) -> list[str]:
    from server.central_dp import sample_level

    record = RunFolder(run_dir).read_privacy()
    if record is None:
        return ["privacy:   no privacy record (no round ran)"]
    lines = []
    for site, p in sorted(sample_level(record).items()):
        lines.append(
            f"{'privacy:' if not lines else ''}".ljust(11)
            + f"{site} epsilon {_num(p.get('epsilon'))} of {_num(p.get('epsilon_budget'))}: {p.get('protection')}"
        )
    if not lines:
        lines.append("privacy:   no site reported any spend")
    for site, level in sorted((record.get("noise_levels") or {}).items()):
        lines.append(
            f"           {site} scanner noise level {level['sigma']:.4f} (DP release, noise std "
            f"{level['std']:.4f}; in its epsilon above)"
        )
    client = record.get("client_level") or {}
    if client.get("protection") == "none":
        lines.append("           the model as a whole: no client-level DP (central DP off)")
    else:
        lines.append(
            f"           the model as a whole: client-level epsilon {_num(client.get('epsilon'))}: "
            f"{client.get('protection')}"
        )
    return lines


TOKEN_FROM_FILE = '"$(awk \'$1=="{role}"{{print $3}}\' {path})"'


def release_lines(release: dict[str, Any] | None) -> list[str]:
    """Gate, release status and the next step that works: approve when the gate passed, else why it is blocked."""
    if release is None:
        return ["release:   not prepared (see the warning above); the cohort and audit stand alone"]
    from privacy.policy import format_value
    from server.release.manifest import load_approvals, release_status

    gate = json.loads((Path(release["release"]) / "gate.json").read_text())
    status = release_status(Path(release["release"]), load_approvals(Path(release["release"])))
    withheld = len(gate.get("withheld_ids") or [])
    if not gate["passed"]:
        failed = [r for r in gate["rules"] if not r["passed"]]
        lines = [
            f"gate:      BLOCKED by {len(failed)} rule(s) of the demo policy; release status: {status}"
        ]
        for r in failed:
            why = "; ".join(x for x in (r.get("where"), r.get("note")) if x)
            why = why if len(why) <= 160 else why[:157] + "..."
            lines.append(
                f"           - {r['rule']}: measured {format_value(r['measured'])}, limit "
                f"{format_value(r['threshold'])}" + (f" ({why})" if why else "")
            )
        lines.append(
            "next:      nothing can be approved or pulled: a blocked cohort is never released to partners."
        )
        lines.append(
            f"           See every rule: fedsynth release gate --audit {Path(release['release']) / 'audit'} "
            f"--policy {Path(release['release']) / 'policy.toml'}"
        )
        return lines
    lines = [
        f"gate:      passed ({withheld} near-copies withheld); release {release['cohort_id']}: {status} "
        "(one officer approval needed)"
    ]
    portal = "https://127.0.0.1:8443"

    def token(role: str) -> str:
        """The shell reads the token from tokens.txt when the command runs; it is never printed."""
        return TOKEN_FROM_FILE.format(role=role, path=release["tokens"])

    trust = f"--ca {release['ca']} --consortium-key {release['consortium_pub']}"
    lines += [
        f"next:      1. serve the portal (it keeps running; use a second terminal for 2 and 3): "
        f"fedsynth portal serve --data {release['portal']} --cert {release['cert']} --key {release['key']}",
        f"           2. the officer approves (or opens {portal}/ in a browser with the officer token): "
        f"fedsynth portal approve {release['cohort_id']} --portal {portal} --token {token('officer')} "
        f"--key {release['officer_key']} {trust}",
        f"           3. a partner pulls the released cohort: fedsynth pull {release['cohort_id']} "
        f"--portal {portal} --token {token('partner')} {trust}",
    ]
    return lines


def _num(value: Any) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return "?"
    return "inf" if x == float("inf") else f"{x:.2f}"
