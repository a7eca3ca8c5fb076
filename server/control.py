"""`fedsynth experiment memorize`: the audit's positive control. AN EXPERIMENT, NEVER RELEASABLE.

A deliberately memorising configuration WITHOUT differential privacy (few patients per site, many full-batch
steps, no DP) runs through the real deployment path (a SuperLink and one SuperNode per phantom hospital, over TLS
with node authentication, server/deployment.py), synthesizes a cohort, then exact copies of training patients are
planted in it, and every site audits the planted cohort. The audit must catch it: verdict "fail", every planted
copy flagged by the site it was taken from, and the one-run canary audit (each site includes each of its
`canaries` gradient canaries with probability 1/2, client/canaries.py) certifying epsilon >= CANARY_TARGET at every
site, reported beside what a perfect attack could reach.

Why 1,000 canaries: with abstention and Bonferroni over four guess levels, a perfect attack on m canaries certifies
at most 3.35 (m = 128), 4.05 (256), 5.37 (1,000) at delta 1e-5 (privacy/power.py); at 128 every one of the 128
guesses must be right AND the fair coins must have included exactly 64 (the guesses are split half "in", half
"out"), so 3 is out of reach in practice. At 1,000, a perfect separation certifies 4.68 at the 50 % level whatever
the draw. Gradient canaries cost a sparse addition per step, so the count costs no training time.

The experiment label travels with the run: `experiment` in the run config (so in run.json and the cohort
manifest), `cohort.experiment` in audit.json, a banner in both reports, and the release gate's
`not_an_experiment` rule, which refuses the cohort whatever else it says. Planting needs the sites' images: this
command made the phantom hospitals itself and reads them from disk, which no real server can (it is what the
experiment simulates: a generator that copies). What was planted where is written to `OUT/control.json`, outside
the cohort.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, model_config
from common.io import write_json_atomic
from common.phantoms import make_phantom_sites, make_public_phantoms
from common.site import load_site, split_by_assignment
from privacy.ledger import LEDGER_FILENAME, PrivacyLedger
from server.checkpoint import Checkpoint
from server.demo import write_app_dir
from server.deployment import local_superlink, local_supernodes, run_app, stop_on_signals
from server.pretrain import PretrainConfig, pretrain
from server.run_folder import RunFolder
from server.synthesis import (
    SynthesisRequest,
    read_cohort,
    write_datalist,
    write_image,
    write_labels,
    write_manifest,
    write_preview,
)
from server.terminal import Console, format_seconds

LABEL = (
    "EXPERIMENT: positive control (fedsynth experiment memorize): a deliberately memorising model trained "
    "WITHOUT differential privacy, with exact copies of training patients planted in its cohort; NEVER releasable"
)
BANNER = "!" * 20 + " EXPERIMENT: POSITIVE CONTROL, NO DP, NEVER RELEASABLE " + "!" * 20
CANARY_TARGET = 3.0  # the figure for the memorising control's canary lower bound


@dataclass(frozen=True)
class ControlOptions:
    out: Path = Path("fedsynth-control")
    preset: str = "tiny"
    sites: int = 2
    subjects: int = 16  # patients per site (half held out: the hold-out is the audit's non-members)
    canaries: int = (
        1000  # per site; a perfect attack on 1,000 certifies 5.37 at delta 1e-5 (module docstring)
    )
    rounds: int = 2  # diffusion rounds
    local_epochs: int = (
        30  # full-batch steps per round at each site (batch >= patients: every record, every step)
    )
    lr: float = 2e-3
    planted_per_site: int = 3
    public_steps: int = (
        40  # public pretraining steps of the autoencoder and of the UNet warm start (the reference)
    )
    insecure: bool = False
    timeout_s: float = 1800.0
    # the sites' utility-cnn-steps (0: the recipe's): the control judges privacy, never the utility figures
    utility_cnn_steps: int = 0

    def __post_init__(self) -> None:
        if self.sites < 1 or self.subjects < 8:
            raise ValueError("the control needs >= 1 site and >= 8 patients per site")
        if self.canaries < 0 or self.planted_per_site < 1:
            raise ValueError("canaries must be >= 0 and planted-per-site >= 1")
        model_config(self.preset)  # a named preset, or the error that lists them


def control_pretrained(opts: ControlOptions, out: Path) -> Path:
    """The reference: a public autoencoder and a short public UNet warm start (`fedsynth pretrain` on 24 healthy
    public phantoms), made once per output folder."""
    path = out / "public.pt"
    if path.exists():
        return path
    public = out / "public"
    if not public.exists():
        make_public_phantoms(public, n_subjects=24, size=model_config(opts.preset).image_size)
    pre = PretrainConfig(
        public_dir=str(public),
        out=str(path),
        preset=opts.preset,
        autoencoder_steps=opts.public_steps,
        unet_steps=opts.public_steps,
        threads=1,
    )
    return pretrain(pre)


def control_run_config(opts: ControlOptions, run_dir: Path, pretrained: Path | str) -> RunConfig:
    """Memorising on purpose: from the public checkpoint (the calibrated attack's reference), non-DP full-batch
    fine-tuning at the sites for many steps at a high learning rate."""
    return RunConfig(
        preset=opts.preset,
        pretrained=str(pretrained),
        num_server_rounds=opts.rounds,
        autoencoder_rounds=0,
        local_epochs=opts.local_epochs,
        batch_size=max(64, opts.subjects),  # >= patients: sampling rate 1, full-batch steps
        lr_diffusion=opts.lr,
        min_sites=opts.sites,
        run_dir=str(run_dir),
        synthesize_per_class=4,
        audit=False,  # the sites audit the PLANTED cohort (one audit per site: max-audits-per-run stays 2)
        experiment=LABEL,
    )


def control_node_configs(opts: ControlOptions, out: Path) -> list[dict[str, Any]]:
    site_dirs = sorted(p for p in (out / "sites").iterdir() if (p / "labels.csv").exists())
    return [
        {
            "site-dir": str(d),
            "site-name": d.name,
            "state-dir": str(out / "site-state" / d.name),
            "dp": False,
            "canaries": opts.canaries,
            "holdout-fraction": 0.5,
            "threads": 1,
            "utility-cnn-steps": opts.utility_cnn_steps,
        }
        for d in site_dirs
    ]


def training_patients(node: dict[str, Any], preset: str):
    """A site's training records, as its ledger split them (read from the phantom site's own folders)."""
    cfg = model_config(preset)
    ledger = PrivacyLedger(Path(node["state-dir"]) / LEDGER_FILENAME)
    data = load_site(
        node["site-dir"],
        class_names=cfg.class_names,
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
    )
    train, _ = split_by_assignment(data, ledger.assignments())
    return train


def plant_copies(
    cohort_dir: Path,
    checkpoint: Path,
    nodes: list[dict[str, Any]],
    out_dir: Path,
    per_site: int,
    preset: str,
) -> dict[str, list[str]]:
    """A new cohort at `out_dir`: the generated images plus exact copies of `per_site` training patients of each
    site (named like the generated ones, so nothing but the images tells them apart), with a manifest naming the
    same checkpoint. Returns {site: planted synthetic ids}."""
    cohort = read_cohort(cohort_dir)
    cfg = model_config(preset)
    images, labels, ids = list(cohort.images()), [int(c) for c in cohort.labels], list(cohort.ids)
    count = {c: sum(1 for x in labels if x == c) for c in range(len(cfg.class_names))}
    planted: dict[str, list[str]] = {}
    for node in nodes:
        train = training_patients(node, preset)
        chosen = np.linspace(0, len(train) - 1, num=min(per_site, len(train))).round().astype(int)
        planted[node["site-name"]] = []
        for r in sorted(set(chosen.tolist())):
            c = int(train.labels[r])
            count[c] += 1
            sid = f"synth-{cfg.class_names[c]}-{count[c]:05d}"
            images.append(train.images[r])
            labels.append(c)
            ids.append(sid)
            planted[node["site-name"]].append(sid)
    (out_dir / "images").mkdir(parents=True, exist_ok=False)
    for sid, image in zip(ids, images, strict=True):
        write_image(out_dir, sid, np.asarray(image, dtype=np.float32), cfg)
    order = list(zip(ids, labels, strict=True))
    write_labels(out_dir, order, cfg.class_names)
    write_datalist(out_dir, order, cfg)
    write_preview(out_dir / "preview.png", np.stack(images), np.array(labels), cfg.class_names)
    req = SynthesisRequest(checkpoint, out_dir, per_class=int(cohort.manifest["per_class"]))
    write_manifest(
        out_dir,
        req,
        cfg,
        Checkpoint.load(checkpoint),
        len(ids),
        cohort.manifest.get("privacy"),
        ["planted by fedsynth experiment memorize"],
    )
    return planted


def judge(audit: dict, planted: dict[str, list[str]]) -> dict[str, Any]:
    """What the control expects of the audit, each with what was measured."""
    sites = audit.get("sites") or {}
    per_site = {}
    for name, site in sites.items():
        m = site.get("memorization") or {}
        flagged = set(map(str, m.get("flagged_ids") or []))
        for per in (m.get("per_class") or {}).values():
            flagged |= set(map(str, per.get("flagged_ids") or []))
        mem = site.get("membership") or {}
        can = mem.get("canaries") or {}
        per_site[name] = {
            "planted": planted.get(name, []),
            "planted_missed": sorted(set(planted.get(name, [])) - flagged),
            "canary_epsilon_lower_bound": can.get("epsilon_lower_bound"),
            "canary_power": can.get("power"),
            "n_canaries": can.get("n_canaries"),
            "canary_attack": can.get("attack"),
            "attacks": {
                kind: {
                    k: (mem.get(kind) or {}).get(k)
                    for k in ("auc", "tpr_at_fpr_1pct", "tpr_at_fpr_0_1pct")
                }
                | {
                    "per_member_rejected_bh": ((mem.get(kind) or {}).get("per_member") or {}).get(
                        "n_rejected_bh"
                    )
                }
                for kind in ("white_box", "calibrated", "black_box")
                if kind in mem
            },
        }
    missing = [s for s in planted if s not in sites]
    lbs = [p["canary_epsilon_lower_bound"] or 0.0 for p in per_site.values()]
    return {
        "verdict": (audit.get("verdict") or {}).get("status"),
        "verdict_is_fail": (audit.get("verdict") or {}).get("status") == "fail",
        "every_planted_copy_flagged": not missing
        and all(not p["planted_missed"] for p in per_site.values()),
        "sites_not_answering": missing,
        "canary_lower_bound_min": min(lbs) if lbs else 0.0,
        "canary_target": CANARY_TARGET,
        "canary_target_met": bool(lbs) and min(lbs) >= CANARY_TARGET,
        "sites": per_site,
    }


def run_control(opts: ControlOptions, console: Console | None = None) -> int:
    """The whole experiment. 0 when the audit caught it (verdict fail, every planted copy flagged, and a canary
    lower bound >= CANARY_TARGET at every site), 1 when not (the audit missed a deliberate leak: a defect to
    report), 2 on bad options."""
    console = console or Console()
    out = opts.out.resolve()
    folder = RunFolder(out / "run")
    planted_dir = out / "planted" / "cohort"
    if folder.cohort.exists() or planted_dir.exists():
        raise FileExistsError(
            f"{out} holds an earlier experiment: choose another --out or remove it"
        )
    console.log_to(folder.log("control"))
    t0 = time.monotonic()
    console.say(BANNER)
    console.say(LABEL)
    if not (out / "sites").exists():
        console.say(f"[1/4] {opts.sites} phantom hospitals with {opts.subjects} patients each")
        make_phantom_sites(
            out / "sites",
            n_sites=opts.sites,
            n_subjects=opts.subjects,
            size=model_config(opts.preset).image_size,
            seed=7,
            progress=console.detail,
        )
    run = control_run_config(opts, folder.root, control_pretrained(opts, out))
    nodes = control_node_configs(opts, out)
    console.say(
        f"[2/4] federation ({'INSECURE' if opts.insecure else 'TLS + SuperNode authentication'}): "
        f"{len(nodes)} sites, NO DP, {opts.rounds} round(s) x {opts.local_epochs} full-batch steps, "
        f"{opts.canaries} canaries per site"
    )
    # One SuperLink and its SuperNodes serve both Flower runs: training + synthesis, then the planted audit.
    with stop_on_signals():
        with local_superlink(
            out / "deployment", len(nodes), insecure=opts.insecure, progress=console.detail
        ) as link:
            with local_supernodes(link, nodes, progress=console.detail):
                run_app(
                    link,
                    write_app_dir(out / "app", run),
                    run.to_flwr(),
                    timeout_s=opts.timeout_s,
                    progress=console.detail,
                    on_output=console.flower_line,
                )
                checkpoint = folder.latest_checkpoint
                if not folder.cohort.exists() or not checkpoint.exists():
                    console.warn(f"ERROR: the run made no cohort; see {folder.run_json}")
                    return 1
                console.say(
                    f"[3/4] planting {opts.planted_per_site} exact training-patient copies per site"
                )
                planted = plant_copies(
                    folder.cohort,
                    checkpoint,
                    nodes,
                    planted_dir,
                    opts.planted_per_site,
                    opts.preset,
                )
                console.say(
                    "[4/4] every site audits the planted cohort (audit mode, same federation)"
                )
                audit_run = RunConfig(
                    **{
                        **dataclasses.asdict(run),
                        "mode": "audit",
                        "cohort_dir": str(planted_dir),
                        "checkpoint": str(checkpoint),
                    }
                )
                run_app(
                    link,
                    write_app_dir(out / "app-audit", audit_run),
                    audit_run.to_flwr(),
                    timeout_s=opts.timeout_s,
                    progress=console.detail,
                    on_output=console.flower_line,
                )
    audit_path = planted_dir.parent / "audit" / "audit.json"
    audit = json.loads(audit_path.read_text())
    result = judge(audit, planted)
    record = {
        "experiment": LABEL,
        "releasable": False,
        "options": {k: str(v) for k, v in dataclasses.asdict(opts).items()},
        "audit": str(audit_path),
        "report": str(audit_path.with_name("audit.html")),
        "seconds": round(time.monotonic() - t0, 1),
        **result,
    }
    write_json_atomic(out / "control.json", record)
    console.result(control_summary(record))
    caught = (
        result["verdict_is_fail"]
        and result["every_planted_copy_flagged"]
        and result["canary_target_met"]
    )
    return 0 if caught else 1


def control_summary(record: dict[str, Any]) -> str:
    """The experiment's result, labelled as an experiment on its first and last lines."""
    lines = [BANNER, "== fedsynth experiment memorize: positive control (no DP) =="]
    lines.append(
        f"verdict:   {str(record['verdict']).upper()} "
        f"({'as required' if record['verdict_is_fail'] else 'REQUIRED fail: the audit missed a deliberate leak'})"
    )
    for name, s in sorted(record["sites"].items()):
        flagged = len(s["planted"]) - len(s["planted_missed"])
        lines.append(
            f"{name}:    planted copies flagged {flagged}/{len(s['planted'])}"
            + (f" (MISSED {', '.join(s['planted_missed'])})" if s["planted_missed"] else "")
            + f"; canary lower bound {_num(s['canary_epsilon_lower_bound'])} with {s['n_canaries']} canaries "
            f"(a perfect attack: {_num(s['canary_power'])}; target >= {CANARY_TARGET:g})"
        )
        for kind, a in s["attacks"].items():
            lines.append(
                f"           {kind}: AUC {_num(a.get('auc'))}, TPR at 1 % FPR {_num(a.get('tpr_at_fpr_1pct'))}, "
                f"members rejected by per-member tests (BH 5 %) {a.get('per_member_rejected_bh')}"
            )
    lines.append(
        f"canaries:  lowest site bound {_num(record['canary_lower_bound_min'])}: target >= {CANARY_TARGET:g} "
        + ("met" if record["canary_target_met"] else "NOT met")
    )
    lines.append(f"report:    {record['report']} (time {format_seconds(record['seconds'])})")
    lines.append(
        "release:   refused by the gate (not_an_experiment): an experiment is never releasable"
    )
    lines.append(BANNER)
    return "\n".join(lines)


def _num(v: Any) -> str:
    try:
        return f"{float(v):.2f}"
    except (TypeError, ValueError):
        return "n/a"
