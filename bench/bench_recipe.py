"""The DP fine-tuning recipe (privacy/recipe.py), measured on PUBLIC phantoms only, and what it does at a site.

    python -m bench.bench_recipe [--out bench-results/recipe] [--threads 1] [--grid all:1e-3 ...] [--clip 1.0 ...]
                                 [--site-patients 1000] [--stage grid|site|both]

Stage `grid` (chooses the recipe; every image is a public phantom, nothing from a site):
1. public pretraining: the autoencoder and the diffusion UNet (class dropout 0.1) on healthy phantoms of ONE
   protocol (t1_se_1.5t), as a consortium's public data would be;
2. DP fine-tuning (client/task.py run_training_round: the sites' own code, ledger and DP-SGD, epsilon 10) on a
   second public phantom set with a protocol pretraining never saw (t1_gre_3t) and 30 % simulated lesions, for
   each (trainable set, learning rate, clipping norm) of the grid; batch and steps from privacy.recipe.dp_recipe;
3. scored on public validation phantoms of that protocol: the conditional diffusion loss (fixed timesteps and
   noise), and the share of guided lesion-class / healthy-class samples that a lesion reader calls "lesion". The
   reader (LesionReader) is trained with the lesion masks of its own public phantoms of the validation protocol,
   as the public autoencoder reconstructs them; on the validation images through the autoencoder it shows what a
   perfect generator in this latent space would reach.
Stage `site` (reports, chooses nothing): the chosen recipe on a phantom site like the benchmark's (another
protocol, t1_se_3t, 15 % lesions, `--site-patients` patients), same scores.

Everything is cached in --out (public data, the pretrained checkpoint, one line per finished configuration in
results.jsonl), so an interrupted run goes on where it stopped. The figures go into docs/RECIPE.md by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.task import run_training_round
from common.config import SiteConfig, model_config
from common.messages import RoundPlan
from common.model import (
    build_autoencoder,
    build_unet,
    ddpm_scheduler,
    decode,
    diffusion_loss,
    encode,
    estimate_latent_scale,
    init_unseen_classes,
    sample_latents,
)
from common.noise import silence_known_noise
from common.phantoms import PROTOCOLS, SiteSpec, make_phantom_sites
from common.site import load_lesion_masks, load_site
from privacy.recipe import dp_recipe
from server.pretrain import PretrainConfig, train_autoencoder, train_unet

PRETRAIN = SiteSpec("public-pretrain", PROTOCOLS["t1_se_1.5t"], 0.0)
TUNE = SiteSpec("public-tune", PROTOCOLS["t1_gre_3t"], 0.3)
VALID = SiteSpec("public-valid", PROTOCOLS["t1_gre_3t"], 0.5)
SITE = SiteSpec("site", PROTOCOLS["t1_se_3t"], 0.15)
SITE_VALID = SiteSpec("site-valid", PROTOCOLS["t1_se_3t"], 0.5)
# the lesion readers' own phantoms: the validation protocols, half with lesions, other draws
READERS = {
    "public-valid": SiteSpec("public-reader", PROTOCOLS["t1_gre_3t"], 0.5),
    "site-valid": SiteSpec("site-reader", PROTOCOLS["t1_se_3t"], 0.5),
}
SEEDS = {
    "public-pretrain": 7001,
    "public-reader": 7005,
    "site-reader": 7006,
    "public-tune": 7002,
    "public-valid": 7003,
    "site": 11,
    "site-valid": 7004,
}


def render(out: Path, spec: SiteSpec, n: int, size: int) -> Path:
    folder = out / f"{spec.name}-{n}"
    if not folder.exists():
        shutil.rmtree(out / f".{spec.name}-{n}", ignore_errors=True)  # an interrupted render
        made = make_phantom_sites(
            out / f".{spec.name}-{n}", n_subjects=n, size=size, seed=SEEDS[spec.name], specs=[spec]
        )[0]
        made.rename(folder)
        (out / f".{spec.name}-{n}").rmdir()
    return folder


def load(folder: Path, cfg, masks: bool = False) -> tuple[torch.Tensor, ...]:
    data = load_site(folder, class_names=cfg.class_names, spatial_dims=2, image_size=cfg.image_size)
    out = (torch.from_numpy(data.images), torch.from_numpy(data.labels))
    if not masks:
        return out
    found, _ = load_lesion_masks(
        folder, data.subject_ids, spatial_dims=2, image_size=cfg.image_size
    )
    blank = np.zeros((1,) + (cfg.image_size,) * 2, dtype=bool)
    return out + (torch.from_numpy(np.stack([blank if m is None else m for m in found])),)


def pretrain(cfg, images, labels, ae_steps: int, unet_steps: int, batch: int, log) -> dict:
    """Public pretraining with the server's own loops (server/pretrain.py: optimiser, schedule, losses)."""
    pre = PretrainConfig(
        public_dir="", out="", preset=cfg.name, autoencoder_steps=ae_steps, unet_steps=unet_steps,
        batch_size=batch,
    )  # fmt: skip
    torch.manual_seed(pre.seed)
    ae_state = train_autoencoder(cfg, pre, images)
    ae = build_autoencoder(cfg)
    ae.load_state_dict(ae_state)
    ae.eval()
    scale = estimate_latent_scale(ae, images)
    mu, sigma = encode(ae, images)
    log(f"  autoencoder: {ae_steps} steps ({pre.lr_schedule}); latent scale {scale:.3f}")
    unet_state = train_unet(cfg, pre, mu, sigma, labels, scale)
    log(f"  UNet: {unet_steps} steps ({pre.lr_schedule})")
    return {"autoencoder": ae_state, "unet": unet_state, "latent_scale": scale}


class LesionReader(nn.Module):
    """A small fully convolutional net that marks lesion pixels on a 16 x 16 grid; an image reads "lesion" when its
    highest mark passes the threshold chosen on the reader's own training images. Trained with the masks, it reads
    far better than a classifier trained on image labels alone (measured: balanced accuracy 0.86 against 0.61 on
    real validation phantoms)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(32, 1, 1),
        )  # fmt: skip
        self.threshold = 0.0

    def forward(self, x):  # the image's highest lesion mark
        return self.net(x).amax(dim=(1, 2, 3)) - self.threshold


def train_reader(images, masks, labels, epochs: int = 30) -> LesionReader:
    """Fit on public images and their lesion masks (left-right flips), then set the threshold that maximises the
    balanced accuracy on those same training images (nothing evaluated is looked at)."""
    torch.manual_seed(0)
    reader = LesionReader()
    opt = torch.optim.Adam(reader.parameters(), lr=2e-3)
    target = (nn.functional.avg_pool2d(masks.float(), 4) > 0.25).float()
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            x, t = images[idx], target[idx]
            flip = torch.rand(len(x), 1, 1, 1) < 0.5
            x, t = torch.where(flip, x.flip(-1), x), torch.where(flip, t.flip(-1), t)
            loss = nn.functional.binary_cross_entropy_with_logits(
                reader.net(x), t, pos_weight=torch.tensor(20.0)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    reader.eval()
    with torch.no_grad():
        score = torch.cat([reader(c) for c in images.split(200)])
    reader.threshold = max(score.tolist(), key=lambda th: balanced_accuracy(score > th, labels))
    return reader


def file_name(key: str) -> str:
    """A results.jsonl key as the name of its state and samples files."""
    return key.replace(" ", "_").replace("/", "-")


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return 0.5 * (
        float(pred[labels == 1].float().mean()) + float((~pred[labels == 0]).float().mean())
    )


@torch.no_grad()
def lesion_share(reader, images) -> float:
    return float((reader(images) > 0).float().mean())


@torch.no_grad()
def val_loss(unet, cfg, scale, mu, labels) -> float:
    g = torch.Generator().manual_seed(123)
    t = torch.linspace(20, 980, len(mu)).long()
    noise = torch.randn(mu.shape, generator=g)
    return float(
        diffusion_loss(unet.eval(), ddpm_scheduler(cfg), mu * scale, labels, t, noise).mean()
    )


@torch.no_grad()
def samples(ae, unet, cfg, scale, per_class: int, guidance: float, steps: int):
    out = {}
    for c in range(cfg.num_classes):
        g = torch.Generator().manual_seed(1000 + c)
        labels = torch.full((per_class,), c)
        z = sample_latents(
            unet.eval(), cfg, labels, steps=steps, generator=g, guidance_scale=guidance
        )
        out[cfg.class_names[c]] = decode(ae, z, scale)
    return out


def score(ae, unet, cfg, scale, valid, reader, args) -> dict:
    mu, _ = encode(ae, valid[0])
    y = valid[1]
    lesion = y == 1
    row = {
        "val_loss": round(val_loss(unet, cfg, scale, mu, y), 5),
        # class conditioning, measured by likelihood: the lesion images' loss with their true label and with the
        # healthy label (same timesteps and noise); "label_gain" > 0 means the model uses the lesion label
        "val_loss_lesion_true": round(val_loss(unet, cfg, scale, mu[lesion], y[lesion]), 5),
        "val_loss_lesion_as_healthy": round(
            val_loss(unet, cfg, scale, mu[lesion], torch.zeros_like(y[lesion])), 5
        ),
    }
    row["label_gain"] = round(row["val_loss_lesion_as_healthy"] - row["val_loss_lesion_true"], 5)
    for w in args.guidance:
        s = samples(ae, unet, cfg, scale, args.per_class, w, args.ddim_steps)
        row[f"lesion_share_lesion_w{w:g}"] = round(lesion_share(reader, s["lesion"]), 3)
        row[f"lesion_share_healthy_w{w:g}"] = round(lesion_share(reader, s["healthy"]), 3)
    return row, s  # the samples at the last guidance scale


def samples_figure(rows: list[tuple[str, torch.Tensor]], path: Path) -> None:
    """One row of 8 samples per (label, images), brain crops, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(
        len(rows), 8, figsize=(13, 1.75 * len(rows)), squeeze=False,
        gridspec_kw=dict(wspace=0.02, hspace=0.04),
    )  # fmt: skip
    for i, (label, images) in enumerate(rows):
        for j in range(8):
            ax[i, j].imshow(images[j, 0, 6:-6, 6:-6], cmap="gray", vmin=0, vmax=1)
            ax[i, j].set_xticks([])
            ax[i, j].set_yticks([])
        lines = [w for part in label.split("\n") for w in textwrap.wrap(part, 26)]
        ax[i, 0].set_ylabel("\n".join(lines), fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=64, bbox_inches="tight")
    plt.close(fig)


def fine_tune(
    site_dir: Path, state: Path, cfg, public: dict, recipe, lr, clip, trainable, args, lesion_weight
):
    shutil.rmtree(
        state, ignore_errors=True
    )  # a fresh ledger: each configuration is its own experiment
    site = SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(state),
        epsilon=args.epsilon,
        max_grad_norm=clip,
        canaries=0,
        threads=args.threads,
        dp=not args.no_dp,
    )
    plan = RoundPlan(
        run_id=state.name,
        server_round=1,
        phase="diffusion",
        num_server_rounds=1,
        federated_autoencoder_rounds=0,
        preset=cfg.name,
        local_epochs=recipe.local_epochs,
        batch_size=recipe.batch_size,
        lr=lr,
        kl_weight=1e-6,
        latent_scale=public["latent_scale"],
        proximal_mu=0.0,
        seed=0,
        class_dropout=recipe.class_dropout,
        lesion_weight=lesion_weight,
        dp_trainable=trainable,
    )
    result = run_training_round(site, plan, public["unet"], public["autoencoder"])
    if result.refused:
        raise SystemExit(f"refused: {result.refused}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-results/recipe")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument(
        "--no-dp",
        action="store_true",
        help="control: the epsilon's plan (batch, steps) trained without DP, to tell the noise from the plan",
    )
    ap.add_argument("--stage", choices=("grid", "site", "both"), default="both")
    ap.add_argument(
        "--grid",
        nargs="+",
        default=[
            f"{t}:{lr}"
            for t in ("attention-conditioning", "all")
            for lr in ("3e-4", "1e-3", "3e-3")
        ],
        help="trainable:lr[:steps[:init]] (steps: DP-SGD steps, default the recipe's; init: random|null, how the "
        "class the public data never showed starts, default null as server/pretrain.py does)",
    )
    ap.add_argument("--clip", nargs="+", type=float, default=[1.0])
    ap.add_argument(
        "--lesion-weight",
        nargs="+",
        type=float,
        default=[0.0, 20.0],
        help="the diffusion loss's extra weight on lesion regions (RoundPlan lesion_weight; 0: the plain loss)",
    )
    ap.add_argument("--pretrain-patients", type=int, default=300)
    ap.add_argument("--tune-patients", type=int, default=400)
    ap.add_argument("--valid-patients", type=int, default=240)
    ap.add_argument("--reader-patients", type=int, default=1200)
    ap.add_argument("--site-patients", type=int, default=1000)
    ap.add_argument("--ae-steps", type=int, default=400)
    ap.add_argument("--unet-steps", type=int, default=800)
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--ddim-steps", type=int, default=25)
    ap.add_argument("--guidance", nargs="+", type=float, default=[1.0, 3.0])
    ap.add_argument(
        "--chosen", default="", help="trainable:lr:clip for stage site (default: recipe)"
    )
    ap.add_argument(
        "--figure",
        nargs="+",
        default=[],
        metavar=("PNG", "KEY"),
        help="draw PNG: guided samples (8 per class, the last --guidance) of the finished configurations KEY ... "
        "(results.jsonl keys, their states in --out/states; 'LABEL|KEY' names a row; 'KEY@DIR' takes the state from another --out made from the same public.pt), then stop",
    )
    ap.add_argument(
        "--reread",
        nargs="+",
        default=[],
        metavar="KEY",
        help="re-read finished configurations KEY[@DIR] ... with THIS --out's lesion reader at --per-class samples "
        "per class (the last --guidance), one JSON line each, then stop: one reader for rows of several runs",
    )
    args = ap.parse_args()
    silence_known_noise()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args.preset)
    t_start = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - t_start:7.0f}s] {line}", flush=True)

    results = out / "results.jsonl"
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row

    def record(row: dict) -> None:
        done[row["key"]] = row
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(json.dumps(row))

    ckpt = out / "public.pt"
    if ckpt.exists():
        public = torch.load(ckpt, weights_only=False)
    else:
        log("public pretraining data and models")
        images, labels = load(render(out, PRETRAIN, args.pretrain_patients, cfg.image_size), cfg)
        public = pretrain(cfg, images, labels, args.ae_steps, args.unet_steps, 32, log)
        torch.save(public, ckpt)
    ae, unet0 = build_autoencoder(cfg), build_unet(cfg)
    ae.load_state_dict(public["autoencoder"])
    ae.eval()
    unet0.load_state_dict(public["unet"])

    # the public checkpoint with the never-seen lesion class as pretraining left it (random) or at null, made once
    with_null = build_unet(cfg)
    with_null.load_state_dict(public["unet"])
    init_unseen_classes(with_null, [1, 0], cfg.null_class)  # the public set is healthy only
    starts = {"random": public, "null": {**public, "unet": with_null.state_dict()}}
    readers: dict[str, LesionReader] = {}
    figure_rows: dict[str, list] = {}

    def through_ae(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(
                [decode(ae, encode(ae, c)[0] * public["latent_scale"], public["latent_scale"]) for c in images.split(200)]
            )  # fmt: skip

    def reader_for(valid_spec: SiteSpec) -> LesionReader:
        """The lesion reader of the validation protocol: trained on ITS OWN public phantoms (never the evaluated
        ones) as the public autoencoder reconstructs them, i.e. in the domain the generator's samples live in."""
        if valid_spec.name not in readers:
            # kept in --out with the public checkpoint it reads through: one reader for every run on this folder
            path = out / f"reader-{valid_spec.name}-{args.reader_patients}.pt"
            if path.exists():
                saved = torch.load(path, weights_only=False)
                reader = LesionReader()
                reader.load_state_dict(saved["state"])
                reader.threshold = saved["threshold"]
                reader.eval()
            else:
                spec = READERS[valid_spec.name]
                images, labels, masks = load(
                    render(out, spec, args.reader_patients, cfg.image_size), cfg, masks=True
                )
                reader = train_reader(through_ae(images), masks, labels)
                torch.save({"state": reader.state_dict(), "threshold": reader.threshold}, path)
            readers[valid_spec.name] = reader
            log(
                f"  lesion reader for {valid_spec.name}: {args.reader_patients} public phantoms of its protocol"
            )
        return readers[valid_spec.name]

    def evaluate(key: str, valid_spec: SiteSpec, unet_state, extra: dict) -> None:
        images, labels = load(render(out, valid_spec, args.valid_patients, cfg.image_size), cfg)
        reader = reader_for(valid_spec)
        test_x, test_y = images[len(images) * 2 // 3 :], labels[len(images) * 2 // 3 :]
        recon = through_ae(test_x)
        unet = build_unet(cfg)
        unet.load_state_dict(unet_state)
        (out / "states").mkdir(exist_ok=True)
        torch.save(unet_state, out / "states" / f"{file_name(key)}.pt")
        row = {
            "key": key,
            **extra,
            # the ceiling: what a perfect generator in this latent space would reach
            "reader_balanced_accuracy_through_ae": round(
                balanced_accuracy(reader(recon) > 0, test_y), 3
            ),
            "lesion_share_real_lesion_through_ae": round(
                lesion_share(reader, recon[test_y == 1]), 3
            ),
            "lesion_share_real_healthy_through_ae": round(
                lesion_share(reader, recon[test_y == 0]), 3
            ),
        }
        scores, shown = score(ae, unet, cfg, public["latent_scale"], (test_x, test_y), reader, args)
        record({**row, **scores})
        name = file_name(key)
        figure_rows[key] = [(f"{key}\n{c} class", shown[c]) for c in ("healthy", "lesion")]
        samples_figure(figure_rows[key], out / "samples" / f"{name}.png")

    def state_of(item: str) -> dict:
        # KEY@DIR: a configuration of another --out made from the same public.pt
        key, _, other = item.partition("@")
        states = Path(other) / "states" if other else out / "states"
        return torch.load(states / f"{file_name(key)}.pt", weights_only=False)

    if args.reread:
        reader = reader_for(VALID)
        for item in args.reread:
            unet = build_unet(cfg)
            unet.load_state_dict(state_of(item))
            w = args.guidance[-1]
            with torch.no_grad():
                s = samples(
                    ae, unet, cfg, public["latent_scale"], args.per_class, w, args.ddim_steps
                )
            les, hea = lesion_share(reader, s["lesion"]), lesion_share(reader, s["healthy"])
            print(json.dumps({"key": item, "per_class": args.per_class, "guidance": w, "lesion": round(les, 3),
                              "healthy": round(hea, 3), "gap": round(les - hea, 3)}), flush=True)  # fmt: skip
        return

    if args.figure:
        rows = []
        for item in args.figure[1:]:
            label, _, key = item.rpartition("|")
            unet = build_unet(cfg)
            unet.load_state_dict(state_of(key))
            shown = samples(
                ae, unet, cfg, public["latent_scale"], 8, args.guidance[-1], args.ddim_steps
            )
            rows += [(f"{label or key}\n{c} class", shown[c]) for c in ("healthy", "lesion")]
        samples_figure(rows, Path(args.figure[0]))
        log(f"wrote {args.figure[0]}")
        return

    if args.stage in ("grid", "both"):
        tune_dir = render(out, TUNE, args.tune_patients, cfg.image_size)
        n_train = round(args.tune_patients * 0.75)
        recipe = dp_recipe(args.epsilon, 1e-5, n_train, args.preset)
        log(f"recipe for the public tuning set ({n_train} training patients): {recipe}")
        for item in args.grid:
            trainable, lr, *rest = item.split(":")
            steps = (
                int(rest[0]) if rest else dp_recipe(args.epsilon, 1e-5, n_train, args.preset).steps
            )
            init = rest[1] if len(rest) > 1 else "null"
            recipe = dp_recipe(args.epsilon, 1e-5, n_train, args.preset, target_steps=steps)
            for clip, weight in [(c, w) for c in args.clip for w in args.lesion_weight]:
                key = f"grid {trainable} lr={lr} C={clip:g} T={steps} init={init} W={weight:g}"
                if key in done:
                    continue
                if f"pretrained init={init}" not in done:
                    evaluate(
                        f"pretrained init={init}",
                        VALID,
                        starts[init]["unet"],
                        {"note": "public only"},
                    )
                t0 = time.time()
                result = fine_tune(
                    tune_dir, out / "state" / key.replace(" ", "_"), cfg, starts[init], recipe,
                    float(lr), clip, trainable, args, weight,
                )  # fmt: skip
                extra = {
                    "trainable": trainable,
                    "lr": float(lr),
                    "clip": clip,
                    "lesion_weight": weight,
                    "init": init,
                    "batch": recipe.batch_size,
                    "steps": int(result.metrics["steps"]),
                    "sigma": round(result.privacy["noise_multiplier"], 3),
                    "epsilon": round(result.privacy["epsilon"], 3),
                    "train_seconds": round(time.time() - t0, 1),
                }
                evaluate(key, VALID, result.state_dict, extra)

    if args.stage in ("site", "both"):
        site_dir = render(out, SITE, args.site_patients, cfg.image_size)
        n_train = math.ceil(args.site_patients * 0.75)
        recipe = dp_recipe(args.epsilon, 1e-5, n_train, args.preset)
        trainable, lr, clip = recipe.dp_trainable, recipe.lr, recipe.max_grad_norm
        if args.chosen:
            trainable, lr, clip = args.chosen.split(":")
            lr, clip = float(lr), float(clip)
        log(f"site recipe ({n_train} training patients): {recipe}")
        key = (
            f"site n={args.site_patients} {trainable} lr={lr:g} C={clip:g} eps={args.epsilon:g} "
            f"W={recipe.lesion_weight:g}"
        )
        if "site pretrained" not in done:
            evaluate("site pretrained", SITE_VALID, starts["null"]["unet"], {"note": "public only"})
        if key not in done:
            t0 = time.time()
            result = fine_tune(
                site_dir, out / "state" / key.replace(" ", "_"), cfg, starts["null"], recipe, lr, clip,
                trainable, args, recipe.lesion_weight,
            )  # fmt: skip
            extra = {
                **dataclasses.asdict(recipe),
                "trainable": trainable,
                "lr": lr,
                "clip": clip,
                "sigma": round(result.privacy["noise_multiplier"], 3),
                "epsilon": round(result.privacy["epsilon"], 3),
                "train_seconds": round(time.time() - t0, 1),
            }
            evaluate(key, SITE_VALID, result.state_dict, extra)
    log("done")


if __name__ == "__main__":
    main()
