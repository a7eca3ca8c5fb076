"""The privacy-utility curve: what a synthetic cohort is worth to the sites, per epsilon.

    python -m bench.bench_utility [--quick] [--checkpoint PRETRAINED.pt] [--patients 1000] [--epsilons 1 4 10 inf]

Three phantom hospitals (non-IID protocols, lesions only at the sites: the public data is healthy subjects of a
protocol no site uses). For each epsilon (inf: DP off, the ceiling) the real federation code trains the diffusion
UNet from the public checkpoint: server.training.Federation drives the rounds and aggregates, each site answers
through the ClientApp's train handler (client.task.run_training_round: the site's ledger, DP-SGD, accounting), here
in one process instead of over TLS. The plan is `privacy.recipe.dp_recipe` (public facts only: budget, patient
count, preset). The cohort is sampled as `fedsynth synthesize` does (server.synthesis.generate, guidance as in the
run). Then every site scores it on its own data with the audit's functions (client.audit.fidelity,
privacy.utility): TSTR vs TRTR balanced accuracy of the small CNN and of the radiomics classifier, on the site's
real hold-out; the share of lesion-class synthetic images in which the real-trained CNN detects a lesion;
radiomics Frechet distance and precision / recall / coverage against the site's training patients; wall times.

Nothing is chosen by looking at evaluation data: the recipe, the classifiers and their hyper-parameters are fixed
before the run (privacy/recipe.py, privacy/utility.py), the cohort size and seeds are arguments.
Writes `docs/utility_vs_epsilon.png` and a table into docs/PERFORMANCE.md (bench/report.py), and the raw figures
as JSON to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.report import write_block
from client.task import select_device

ROOT = Path(__file__).resolve().parents[1]
# Lesion prevalence per site: all three carry lesions (so TSTR is measurable everywhere), at different rates.
PREVALENCE = (0.25, 0.10, 0.15)
SEED = 11


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark configuration (what the table's header states)."""

    preset: str = "small"
    patients: int = 1000  # per site
    public: int = 600  # public (healthy, one protocol) subjects for the pretrained checkpoint
    epsilons: tuple[float, ...] = (1.0, 4.0, 10.0, math.inf)
    diffusion_rounds: int = 2
    # DP rounds of the public autoencoder at the sites first (privacy/recipe.py AE_*: chosen on public stand-ins)
    autoencoder_rounds: int = 0
    per_class: int = 200  # synthetic images per class
    ddim_steps: int = 0  # 0: the preset's (what `fedsynth synthesize` uses)
    cnn_steps: int = 0  # 0: privacy.utility.CNN_RECIPE's (the audit's); quick runs use fewer
    threads: int = 1  # torch threads (1 is fastest on a busy 2-core machine)
    # where the sites train, the cohort is sampled and the CNNs train: auto (a GPU when there is one) | cpu | cuda
    device: str = "auto"
    pretrain_ae_steps: int = 400
    pretrain_unet_steps: int = 1200


QUICK = Setting(
    preset="small",
    patients=120,
    public=120,
    per_class=24,
    ddim_steps=20,
    cnn_steps=150,
    pretrain_ae_steps=150,
    pretrain_unet_steps=300,
)


class InProcessGrid:
    """The sites answer in this process through the ClientApp's train handler (no deployment)."""

    def __init__(self, node_configs: list[dict]):
        self.contexts = {i + 1: SimpleNamespace(node_config=c) for i, c in enumerate(node_configs)}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from client.client_app import train

        return [train(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def make_sites(work: Path, s: Setting) -> list[Path]:
    from common.config import model_config
    from common.phantoms import default_site_specs, make_phantom_sites

    specs = [
        dataclasses.replace(spec, lesion_prevalence=p)
        for spec, p in zip(default_site_specs(3), PREVALENCE, strict=True)
    ]
    size = model_config(s.preset).image_size
    return make_phantom_sites(
        work / "sites", n_subjects=s.patients, size=size, seed=SEED, specs=specs
    )


def public_checkpoint(work: Path, s: Setting) -> Path:
    """`fedsynth pretrain` on a public phantom folder (healthy subjects, a protocol of its own)."""
    from common.config import model_config
    from common.phantoms import make_public_phantoms
    from server.pretrain import PretrainConfig, pretrain

    size = model_config(s.preset).image_size
    public = make_public_phantoms(work / "public", n_subjects=s.public, size=size, seed=SEED)
    return pretrain(
        PretrainConfig(
            public_dir=str(public),
            out=str(work / "pretrained.pt"),
            preset=s.preset,
            autoencoder_steps=s.pretrain_ae_steps,
            unet_steps=s.pretrain_unet_steps,
            threads=s.threads,
        )
    )


def pretraining_provenance(path: Path) -> dict:
    """What `fedsynth pretrain` recorded in the checkpoint (public data, steps, seconds)."""
    from server.checkpoint import Checkpoint

    return dict(Checkpoint.load(path).pretraining or {})


def train_federated(
    work: Path, sites: list[Path], s: Setting, epsilon: float, checkpoint: Path
) -> tuple[Path, dict]:
    """The federation at one epsilon from the public checkpoint; returns its final checkpoint and the recipe."""
    from common.config import RunConfig
    from privacy.accounting import default_delta
    from privacy.recipe import dp_recipe
    from server.training import Federation

    name = f"eps-{epsilon:g}"
    n_train = min(round(s.patients * 0.75), s.patients - 1)  # the sites' default hold-out fraction
    delta = default_delta(n_train)
    # DP off (the ceiling) trains with the epsilon-10 recipe's plan, without clipping or noise
    recipe = dp_recipe(
        epsilon if math.isfinite(epsilon) else 10.0,
        delta,
        n_train,
        s.preset,
        diffusion_rounds=s.diffusion_rounds,
        autoencoder_rounds=s.autoencoder_rounds,
    )
    node_configs = [
        {
            "site-dir": str(d),
            "site-name": d.name,
            "state-dir": str(work / name / "state" / d.name),
            "epsilon": epsilon if math.isfinite(epsilon) else 10.0,
            "dp": math.isfinite(epsilon),
            "max-grad-norm": recipe.max_grad_norm,
            "threads": s.threads,
            "device": s.device,
            "canaries": 0,  # canaries serve the audit, not utility
        }
        for d in sites
    ]
    run = RunConfig(
        preset=s.preset,
        num_server_rounds=s.autoencoder_rounds + s.diffusion_rounds,
        autoencoder_rounds=s.autoencoder_rounds,
        pretrained=str(checkpoint),
        batch_size=recipe.batch_size,
        local_epochs=recipe.local_epochs,
        lr_diffusion=recipe.lr,
        lr_autoencoder=recipe.lr_autoencoder,
        dp_trainable_autoencoder=recipe.dp_trainable_autoencoder,
        dp_trainable=recipe.dp_trainable,
        class_dropout=recipe.class_dropout,
        lesion_weight=recipe.lesion_weight,
        guidance_scale=recipe.guidance_scale,
        min_sites=len(sites),
        run_dir=str(work / name / "run"),
        synthesize_per_class=0,
        audit=False,
        seed=0,
        release_noise_levels=True,  # each site's scanner noise level under DP (privacy/noise_level.py)
    )
    ckpt = Federation(InProcessGrid(node_configs), run, progress=say).run_rounds()
    if ckpt is None:
        raise RuntimeError(f"{name}: the federation stopped early (see {run.run_dir}/run.json)")
    return ckpt, recipe.as_dict()


def draw_images(
    cfg,
    ae,
    unet,
    labels,
    latent_scale: float,
    guidance_scale: float,
    seed: int = SEED,
    steps: int = 0,
    device: str = "cpu",
) -> np.ndarray:
    """Images (N, 1, ...) for `labels` as `fedsynth synthesize` draws them (server.synthesis.generate: image i
    depends only on (seed, i)); DDIM `steps`, 0: the preset's."""
    from server.synthesis import generate

    labels = torch.as_tensor(labels)
    out = np.zeros((len(labels), *cfg.image_shape), np.float32)
    with torch.no_grad():
        for idx, images in generate(
            cfg,
            ae,
            unet,
            list(range(len(labels))),
            labels,
            latent_scale,
            seed=seed,
            batch_size=32,
            steps=steps or cfg.ddim_steps,
            device=select_device(device),
            guidance_scale=guidance_scale,
        ):
            out[idx] = images
    return out


def synthesize(ckpt_path: Path, s: Setting, guidance_scale: float) -> tuple[np.ndarray, np.ndarray]:
    from common.config import model_config
    from server.checkpoint import Checkpoint

    ckpt = Checkpoint.load(ckpt_path)
    cfg = model_config(s.preset)
    ae, unet = ckpt.models(select_device(s.device))
    labels = torch.arange(cfg.num_classes).repeat_interleave(s.per_class)
    latent_scale = ckpt.run_state.latent_scale
    images = draw_images(
        cfg, ae, unet, labels, latent_scale, guidance_scale, steps=s.ddim_steps, device=s.device
    )
    return images, labels.numpy()


def noise_levels(ckpt_path: Path) -> dict[str, float]:
    """Each site's scanner noise level as it released it under DP in the run (none for runs made before)."""
    from server.checkpoint import Checkpoint

    return {
        site: float(v["sigma"])
        for site, v in Checkpoint.load(ckpt_path).run_state.noise_levels.items()
    }


class SiteScorer:
    """A site's real data and its TRTR classifier, trained once (fixed recipe and seed: the audit would train the
    very same model each time)."""

    def __init__(self, site_dir: Path, state_dir: Path, s: Setting):
        from client.task import load_training_data
        from common.config import SiteConfig, model_config
        from privacy.utility import CNN_RECIPE, train_cnn

        self.cfg = model_config(s.preset)
        self.device = select_device(s.device)
        site = SiteConfig(site_dir=str(site_dir), state_dir=str(state_dir))
        self.name = site.name
        self.train, self.holdout = load_training_data(site, self.cfg)
        recipe = CNN_RECIPE.fixed(s.cnn_steps) if s.cnn_steps else CNN_RECIPE
        self.recipe = recipe.for_training_size(len(self.train))
        self.trtr = train_cnn(
            self.train.images, self.train.labels, self.cfg.num_classes, self.recipe, self.device
        )

    def score(
        self, synthetic: np.ndarray, labels: np.ndarray, noise_level: float | None = None
    ) -> dict:
        """The audit's figures for the cohort; with the site's released `noise_level`, also its fidelity and
        radiomics utility with Rician noise of that level added (as decoding with the site's level would give)."""
        from client.audit import fidelity
        from privacy.noise_level import add_rician_noise
        from privacy.utility import cnn_utility, radiomics_utility

        args = (
            synthetic,
            labels,
            self.train.images,
            self.train.labels,
            self.holdout.images,
            self.holdout.labels,
        )
        fid = fidelity(synthetic, labels, self.train, self.cfg.class_names)
        noisy = {}
        if noise_level is not None:
            images = add_rician_noise(synthetic, noise_level, np.random.default_rng(SEED))
            noisy = {
                "with_noise_level": {
                    "sigma": noise_level,
                    "fidelity": fidelity(images, labels, self.train, self.cfg.class_names)[
                        "overall"
                    ],
                    "radiomics": radiomics_utility(images, *args[1:]),
                    # a CNN trained on the noisy cohort (TRTR: the same real-trained model as below)
                    "cnn": cnn_utility(
                        images,
                        *args[1:],
                        list(self.cfg.class_names),
                        self.recipe,
                        device=self.device,
                        trtr_model=self.trtr,
                    ),
                }
            }
        return {
            **noisy,
            "fidelity": {"overall": fid["overall"], "per_class": fid["per_class"]},
            "radiomics": radiomics_utility(*args),
            "cnn": cnn_utility(
                *args,
                list(self.cfg.class_names),
                self.recipe,
                device=self.device,
                trtr_model=self.trtr,
            ),
            "n_train": len(self.train),
            "n_holdout": len(self.holdout),
            "holdout_lesions": int((self.holdout.labels == 1).sum()),
        }


def _device_name(device: str) -> str:
    d = select_device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "CPU"


def say(line: str) -> None:
    """A progress line, flushed at once (a benchmark's output is usually a file it is followed in)."""
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def run_bench(s: Setting, work: Path, checkpoint: Path | None, on_row=None) -> dict:
    """The whole curve; `on_row(result so far)` after each epsilon (the bench writes its outputs each time, so a
    run cut short still leaves what it measured, labelled as partial)."""
    torch.set_num_threads(s.threads)
    t0 = time.time()
    say(f"making 3 phantom sites of {s.patients} patients in {work / 'sites'}")
    sites = make_sites(work, s)
    t_sites = time.time() - t0
    t0 = time.time()
    if not checkpoint:
        say(f"public pretraining on {s.public} phantoms")
    pretrained = Path(checkpoint) if checkpoint else public_checkpoint(work, s)
    t_pretrain = time.time() - t0 if not checkpoint else None
    t0 = time.time()
    say("training each site's TRTR classifier on its real training patients")
    scorers = [SiteScorer(d, work / "scoring" / d.name, s) for d in sites]
    t_trtr = time.time() - t0
    result = {
        "setting": dataclasses.asdict(s),
        "prevalence": PREVALENCE,
        "device": _device_name(s.device),
        "pretrained": str(pretrained) if checkpoint else "made by this run (fedsynth pretrain)",
        "pretraining": pretraining_provenance(pretrained),
        "seconds": {
            "sites": round(t_sites, 1),
            "pretrain": None if t_pretrain is None else round(t_pretrain, 1),
            "trtr": round(t_trtr, 1),
        },
        "rows": [],
    }
    for eps in s.epsilons:
        t0 = time.time()
        say(f"epsilon {eps_label(eps)}: the federation")
        ckpt, recipe = train_federated(work, sites, s, eps, pretrained)
        t_train = time.time() - t0
        t0 = time.time()
        say(f"epsilon {eps_label(eps)}: sampling {s.per_class} images per class")
        synthetic, labels = synthesize(ckpt, s, recipe["guidance_scale"])
        t_synth = time.time() - t0
        t0 = time.time()
        say(f"epsilon {eps_label(eps)}: scoring the cohort at each site")
        levels = noise_levels(ckpt)
        per_site = {sc.name: sc.score(synthetic, labels, levels.get(sc.name)) for sc in scorers}
        t_score = time.time() - t0
        result["rows"].append(
            {
                "epsilon": eps,
                "recipe": recipe,
                "sites": per_site,
                "seconds": {
                    "train": round(t_train, 1),
                    "synthesize": round(t_synth, 1),
                    "score": round(t_score, 1),
                },
            }
        )
        print(json.dumps(result["rows"][-1], default=str), flush=True)
        if on_row is not None:
            on_row(result)
    return result


def rescore(result: dict, work: Path, on_row=None) -> dict:
    """An earlier run's cohorts scored again with the current classifiers (privacy/utility.py): each epsilon's final
    checkpoint in `work` (that run's --work) is sampled again with the same seed and scored at the same sites; the
    training, its recipe and its seconds are the earlier run's. What a change of the scorers alone does."""
    s = Setting(**{**result["setting"], "epsilons": tuple(result["setting"]["epsilons"])})
    torch.set_num_threads(s.threads)
    sites = sorted((work / "sites").glob("site-*"))
    t0 = time.time()
    scorers = [SiteScorer(d, work / "scoring" / d.name, s) for d in sites]
    out = {**result, "rows": [], "rescored": "classifiers of this checkout, cohorts re-sampled"}
    out["seconds"] = {**result["seconds"], "trtr": round(time.time() - t0, 1)}
    for row in result["rows"]:
        ckpt = work / f"eps-{float(row['epsilon']):g}" / "run" / "checkpoints" / "latest.pt"
        t0 = time.time()
        synthetic, labels = synthesize(ckpt, s, row["recipe"]["guidance_scale"])
        t_synth = time.time() - t0
        t0 = time.time()
        levels = noise_levels(ckpt)
        per_site = {sc.name: sc.score(synthetic, labels, levels.get(sc.name)) for sc in scorers}
        seconds = {**row["seconds"], "synthesize": round(t_synth, 1)}
        out["rows"].append(
            {**row, "sites": per_site, "seconds": {**seconds, "score": round(time.time() - t0, 1)}}
        )
        print(json.dumps(out["rows"][-1], default=str), flush=True)
        if on_row is not None:
            on_row(out)
    return out


def _mean(values: list) -> float:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


# A site's TSTR / TRTR ratio reads 0.94 when both classifiers are at chance (0.50 / 0.53): the share of the real
# data's gain over chance that the synthetic data keeps, (TSTR - 0.5) / (TRTR - 0.5), says what the ratio cannot.
# It is only taken where TRTR is at least this far above chance (a rule fixed before any run, not tuned).
MIN_TRTR_GAIN = 0.05


def summary(row: dict) -> dict:
    """Means over the sites of one epsilon's figures."""
    sites = row["sites"].values()

    def ba(s, clf, which):
        return s[clf][which]["balanced_accuracy"]

    out = {}
    for clf in ("cnn", "radiomics"):
        tstr = [ba(s, clf, "train_synthetic_test_real") for s in sites]
        trtr = [ba(s, clf, "train_real_test_real") for s in sites]
        out[f"{clf}_tstr"], out[f"{clf}_trtr"] = _mean(tstr), _mean(trtr)
        out[f"{clf}_ratio"] = _mean(
            [a / b if a is not None and b else None for a, b in zip(tstr, trtr, strict=True)]
        )
        out[f"{clf}_gain"] = _mean(
            [
                (a - 0.5) / (b - 0.5)
                for a, b in zip(tstr, trtr, strict=True)
                if a is not None and b is not None and b - 0.5 >= MIN_TRTR_GAIN
            ]
        )
    out["lesion_detectable"] = _mean([s["cnn"]["recognised"].get("lesion") for s in sites])
    out["lesion_detectable_holdout"] = _mean(
        [s["cnn"]["recognised_holdout"].get("lesion") for s in sites]
    )
    out["healthy_recognised"] = _mean([s["cnn"]["recognised"].get("healthy") for s in sites])
    for k in ("frechet_distance", "precision", "recall", "coverage"):
        out[k] = _mean([s["fidelity"]["overall"].get(k) for s in sites])
        out[f"min_{k}"] = float(np.nanmin([s["fidelity"]["overall"].get(k) for s in sites]))
    noisy = [s["with_noise_level"] for s in sites if "with_noise_level" in s]
    if len(noisy) == len(sites):  # every site released its level in this run
        for k in ("frechet_distance", "precision", "coverage"):
            out[f"noise_{k}"] = _mean([n["fidelity"].get(k) for n in noisy])
            out[f"noise_min_{k}"] = float(np.nanmin([n["fidelity"].get(k) for n in noisy]))
        out["noise_radiomics_tstr"] = _mean(
            [n["radiomics"]["train_synthetic_test_real"]["balanced_accuracy"] for n in noisy]
        )
        # runs before session 18 scored only the radiomics with noise
        if all("cnn" in n for n in noisy):
            tstr = [ba(n, "cnn", "train_synthetic_test_real") for n in noisy]
            trtr = [ba(s, "cnn", "train_real_test_real") for s in sites]
            out["noise_cnn_tstr"] = _mean(tstr)
            out["noise_cnn_gain"] = _mean(
                [
                    (a - 0.5) / (b - 0.5)
                    for a, b in zip(tstr, trtr, strict=True)
                    if a is not None and b is not None and b - 0.5 >= MIN_TRTR_GAIN
                ]
            )
    return out


def eps_label(eps: float) -> str:
    return f"{eps:g}" if math.isfinite(eps) else "no DP"


def plot(result: dict, path: Path) -> Path:
    """Three panels over epsilon: balanced accuracies (TSTR and TRTR, both classifiers, chance at 0.5), the share
    of synthetic images the real-trained CNN recognises (lesion detectable, beside the real hold-out's), and
    radiomics precision / recall / coverage. Means over the sites."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [eps_label(r["epsilon"]) for r in rows]
    x = np.arange(len(rows))
    sums = [summary(r) for r in rows]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, label, style in (
        ("cnn_tstr", "CNN: train synthetic, test real", "C0o-"),
        ("cnn_trtr", "CNN: train real, test real", "C0o--"),
        ("radiomics_tstr", "radiomics: train synthetic, test real", "C1s-"),
        ("radiomics_trtr", "radiomics: train real, test real", "C1s--"),
    ):
        a.plot(x, [m[key] for m in sums], style, label=label)
    a.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    a.set_ylim(0.3, 1.02)
    a.set_title("balanced accuracy on the sites' real hold-out")
    for key, label, style in (
        ("lesion_detectable", "lesion-class synthetic: lesion detected", "C2^-"),
        ("lesion_detectable_holdout", "real hold-out lesions: detected", "C2^--"),
        ("healthy_recognised", "healthy-class synthetic: called healthy", "C4v-"),
    ):
        b.plot(x, [m[key] for m in sums], style, label=label)
    b.set_ylim(0, 1.05)
    b.set_title("the real-trained CNN on the synthetic images")
    for key, label, style in (
        ("precision", "precision", "o-"),
        ("recall", "recall", "s-"),
        ("coverage", "coverage", "^-"),
    ):
        c.plot(x, [m[key] for m in sums], style, label=label)
    c.set_ylim(0, 1.05)
    c.set_title("radiomics fidelity (prdc, k = 5)")
    for ax in (a, b, c):
        ax.set_xticks(x, labels)
        ax.set_xlabel("epsilon per site (delta 1e-5)")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    s = result["setting"]
    fig.suptitle(
        f"bench_utility: 3 sites x {s['patients']} patients, preset {s['preset']}, "
        f"{s['per_class']} synthetic images per class; means over the sites",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _f(v, d: int = 2) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.{d}f}"


def table_row(row: dict) -> str:
    """One epsilon's row of the report's table: each figure with, in brackets, what it is read against (TSTR / TRTR
    with their ratio, the real hold-out's lesions, the minimum over the sites)."""
    m = summary(row)
    rc, t = row["recipe"], row["seconds"]

    def versus(key: str, bracket: str) -> str:
        return f"{_f(m[key])} ({_f(m[bracket])})"

    sigma = f"{rc['noise_multiplier']:.2f}" if math.isfinite(row["epsilon"]) else "0"
    cells = [
        eps_label(row["epsilon"]),
        f"{_f(m['cnn_tstr'])} / {_f(m['cnn_trtr'])} ({_f(m['cnn_ratio'])}; **{_f(m['cnn_gain'])}**)",
        f"{_f(m['radiomics_tstr'])} / {_f(m['radiomics_trtr'])} ({_f(m['radiomics_ratio'])}; "
        f"**{_f(m['radiomics_gain'])}**)",
        versus("lesion_detectable", "lesion_detectable_holdout"),
        _f(m["healthy_recognised"]),
        _f(m["frechet_distance"], 1),
        *(versus(k, f"min_{k}") for k in ("precision", "recall", "coverage")),
        (
            f"{_f(m['noise_frechet_distance'], 1)} / {versus('noise_precision', 'noise_min_precision')} / "
            f"{versus('noise_coverage', 'noise_min_coverage')}; {_f(m['noise_radiomics_tstr'])}"
            + (
                f"; {_f(m['noise_cnn_tstr'])} (**{_f(m['noise_cnn_gain'])}**)"
                if "noise_cnn_tstr" in m
                else ""
            )
            if "noise_precision" in m
            else "-"
        ),
        f"{rc['batch_size']}, {rc['steps']}, {sigma}",
        f"{t['train']:.0f} + {t['synthesize']:.0f} + {t['score']:.0f} s",
    ]
    return "| " + " | ".join(cells) + " |"


def report_lines(result: dict, command: str, figure: str) -> list[str]:
    from common.config import model_config

    s = result["setting"]
    rows = result["rows"]
    p = result.get("pretraining") or {}
    public = (
        f"`fedsynth pretrain` on {p.get('public_images', '?')} public healthy phantoms of one protocol, "
        f"{p.get('autoencoder_steps', '?')} autoencoder + {p.get('unet_steps', '?')} UNet steps"
        + (", made beforehand and given" if result["seconds"]["pretrain"] is None else "")
    )
    cnn = "recipe of the audit" if not s["cnn_steps"] else f"{s['cnn_steps']} steps (quick)"
    pre = result["seconds"]["pretrain"]
    done = (
        f"{len(rows)} of {len(s['epsilons'])} epsilons measured: "
        if len(rows) < len(s["epsilons"])
        else ""
    )
    lines = [
        f"### Privacy-utility curve (`{command}`)",
        "",
        f"**{done}a partial run (the rest did not finish in time).**" if done else "",
        "Scored again with the classifiers of a later checkout (`--replot RESULT.json --rescore WORK`): each "
        "epsilon's final checkpoint re-sampled with the same seed and scored at the same sites; the training and "
        "its seconds are the first run's."
        if result.get("rescored")
        else "",
        f"Setting: 3 phantom sites x {s['patients']} patients (lesion prevalence "
        f"{', '.join(f'{p:g}' for p in result['prevalence'])}; 25 % of each site's patients held out for "
        f"scoring), preset `{s['preset']}`, the public checkpoint "
        f"({public}), "
        + (
            f"{s['autoencoder_rounds']} DP autoencoder round(s) at the sites (training "
            f"{rows[0]['recipe'].get('dp_trainable_autoencoder', '?')} of it at lr "
            f"{rows[0]['recipe'].get('lr_autoencoder', '?')}) then "
            if s.get("autoencoder_rounds") and rows
            else ""
        )
        + f"{s['diffusion_rounds']} diffusion rounds planned by `privacy.recipe.dp_recipe`, {s['per_class']} synthetic "
        f"images per class (DDIM-{s['ddim_steps'] or model_config(s['preset']).ddim_steps}), CNN "
        f"{cnn}; "
        f"torch threads {s['threads']}"
        + (f", device {result['device']}" if result.get("device") else "")
        + ". Figures are means over the 3 sites (per site in the JSON the "
        "bench prints); TSTR / TRTR is the mean of the per-site ratios; the gain kept is the mean of the per-site "
        "(TSTR - 0.5) / (TRTR - 0.5), the share of the real data's accuracy above chance that the synthetic data "
        f"keeps, over the sites whose TRTR is at least {MIN_TRTR_GAIN} above chance (n/a: none); precision / recall / coverage are against "
        "each site's training patients (min over sites in brackets). With each site's DP noise level: the same cohort with Rician noise added at the "
        "level each site released under DP in the run (`release-noise-levels`, privacy/noise_level.py), scored "
        "against that site (the autoencoder denoises; the radiomics read the scanner's noise), and the CNN trained on "
        "that noisy cohort, tested on the site's real hold-out.",
        "",
        "| epsilon | CNN TSTR / TRTR (ratio; **gain kept**) | radiomics TSTR / TRTR (ratio; **gain kept**) | "
        "lesion detectable (real hold-out) | "
        "healthy recognised | Frechet distance | precision | recall | coverage | with each site's DP noise "
        "level: Frechet / precision / coverage; radiomics TSTR; CNN TSTR (**gain kept**) | batch, steps, sigma | "
        "wall time (train + sample + score) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [table_row(r) for r in rows]
    sec = result["seconds"]
    total = sum(sum(r["seconds"].values()) for r in rows) + sum(v or 0 for v in sec.values())
    lines += [
        "",
        f"Wall time in all: {total / 60:.1f} min (sites {sec['sites']:.0f} s, public pretraining "
        f"{'-' if pre is None else f'{pre:.0f} s'}, TRTR classifiers {sec['trtr']:.0f} s). "
        f"![utility vs epsilon]({figure})",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sites and few steps (development)")
    ap.add_argument(
        "--checkpoint", default="", help="a `fedsynth pretrain` checkpoint (default: make one)"
    )
    ap.add_argument("--preset", default="", help="model preset (default: the setting's, small)")
    ap.add_argument("--patients", type=int, default=0, help="patients per site (0: the setting's)")
    ap.add_argument("--epsilons", type=float, nargs="+", default=None, help="inf: DP off")
    ap.add_argument("--per-class", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=0, help="diffusion rounds (0: the setting's)")
    ap.add_argument(
        "--autoencoder-rounds",
        type=int,
        default=0,
        help="DP autoencoder rounds at the sites before the diffusion rounds (the recipe's AE set and lr)",
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--device",
        default="",
        choices=["", "auto", "cpu", "cuda"],
        help="where the sites train, the cohort is sampled and the CNNs train (default: auto, a GPU if any)",
    )
    ap.add_argument("--work", default="", help="keep the sites, runs and checkpoints here")
    ap.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "utility_vs_epsilon.png"))
    ap.add_argument("--json", default="", help="also write the raw results here")
    ap.add_argument(
        "--rescore",
        default="",
        help="with --replot JSON: re-sample that run's checkpoints in this --work and score them with the current "
        "classifiers (no training)",
    )
    ap.add_argument(
        "--replot",
        default="",
        help="redraw the figure and the table from a --json file of an earlier run (no training)",
    )
    args = ap.parse_args()
    s = QUICK if args.quick else Setting()
    s = dataclasses.replace(
        s,
        **{
            k: v
            for k, v in (
                ("preset", args.preset),
                ("patients", args.patients),
                ("per_class", args.per_class),
                ("diffusion_rounds", args.rounds),
                ("autoencoder_rounds", args.autoencoder_rounds),
                ("threads", args.threads),
                ("device", args.device),
            )
            if v
        },
        **({"epsilons": tuple(args.epsilons)} if args.epsilons else {}),
    )
    from flwr.supercore.task_identity import TaskIdentity

    from common.noise import silence_known_noise

    silence_known_noise()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # no deployment
    argv, skip = [], False
    for a in sys.argv[1:]:  # the command as others would rerun it: no scratch or output paths
        if skip or a.startswith(("--work", "--json", "--out", "--figure", "--replot")):
            skip = not skip and "=" not in a
            continue
        argv.append(a)
    command = " ".join(["python -m bench.bench_utility", *argv])
    out, figure_path = Path(args.out), Path(args.figure)

    def write(result: dict) -> None:
        result.setdefault("command", command)
        text = json.dumps(result, indent=1, default=str)
        if args.json:
            Path(args.json).write_text(text)
        figure = plot(result, figure_path)
        try:
            rel = str(figure.resolve().relative_to(out.resolve().parent))
        except ValueError:
            rel = str(figure)
        print(write_block(out, "bench_utility", report_lines(result, command, rel)), flush=True)

    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        command = result.get("command", command)
        if args.rescore:
            rescore(result, Path(args.rescore), on_row=write)
            return
        args.json = ""
        write(result)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_bench(s, work, Path(args.checkpoint) if args.checkpoint else None, on_row=write)


if __name__ == "__main__":
    main()
