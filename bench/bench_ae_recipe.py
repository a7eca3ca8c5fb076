"""The DP autoencoder round's recipe (privacy/recipe.py AE_*), chosen on PUBLIC phantoms only.

    python -m bench.bench_ae_recipe --checkpoint PUBLIC.pt [--out bench-results/ae-recipe] [--patients 2400]
                                    [--grid all:3e-4 decoder:1e-3 norms:1e-2 ...] [--epsilon 10]

The public autoencoder denoises and was never shown the sites' protocols (docs/PERFORMANCE.md, session 16: without
DP, 400 steps on the sites brought one site's reconstructions from precision 0.15 to 0.52). Can one DP round at
each site buy part of that, and with which parameters and learning rate? That choice may not look at a site, so it
is made here on a public stand-in: phantoms of a protocol that neither the public data nor any benchmark site uses
(t1_gre_1.5t: gradient echo, 3.5 mm voxels, noise 0.025; the public set is a 1 T spin echo), at a site's size, so
the DP-SGD's batch, steps and noise are the benchmark site's.

For each `trainable:lr` of the grid: one autoencoder round of the sites' own code (client/task.py
run_training_round: ledger, Poisson sampling of patients, DP-SGD, epsilon over the run's 1 autoencoder + 2
diffusion rounds, the recipe's batch and epochs), then the stand-in's hold-out patients through the round's
autoencoder, with the stand-in's noise level added (what a site releases under DP), scored against its training
patients as the audit scores a cohort (radiomics Frechet distance, prdc precision / coverage). The rule, fixed
before any run: the lowest Frechet distance wins; "none" (the public autoencoder unchanged) is a row too, so a
round that does not help is not taken. One JSON line per configuration in --out/results.jsonl (an interrupted run
goes on where it stopped); the table goes into docs/RECIPE.md by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from bench.bench_autoencoder_texture import fidelity_row, rician
from client.audit import autoencoder_reconstructions
from client.task import load_training_data, run_training_round
from common.config import SiteConfig
from common.messages import RoundPlan
from common.noise import silence_known_noise
from common.phantoms import PROTOCOLS, SiteSpec, make_phantom_sites
from privacy.accounting import default_delta
from privacy.fidelity import radiomics_features
from privacy.noise_level import patient_noise_levels
from privacy.recipe import dp_recipe
from server.checkpoint import Checkpoint

STAND_IN = SiteSpec("public-ae-tune", PROTOCOLS["t1_gre_1.5t"], 0.15)
SEED = 7011  # its own phantom draws
DIFFUSION_ROUNDS = 2  # the benchmark's run: 1 autoencoder round, then 2 diffusion rounds
GRID = ("all:3e-4", "all:1e-3", "decoder:3e-4", "decoder:1e-3", "norms:3e-3", "norms:1e-2")


def one_round(
    site_dir: Path, state: Path, ckpt: Checkpoint, ae_state: dict, trainable: str, lr: float, args
):
    """One DP autoencoder round at the stand-in, planned as the run's first of 1 + DIFFUSION_ROUNDS."""
    shutil.rmtree(
        state, ignore_errors=True
    )  # a fresh ledger: each configuration is its own experiment
    n_train = min(
        round(args.patients * 0.75), args.patients - 1
    )  # the sites' default hold-out fraction
    recipe = dp_recipe(
        args.epsilon,
        default_delta(n_train),
        n_train,
        ckpt.model_config.name,
        DIFFUSION_ROUNDS,
        autoencoder_rounds=1,
    )
    site = SiteConfig(
        site_dir=str(site_dir),
        state_dir=str(state),
        epsilon=args.epsilon,
        max_grad_norm=recipe.max_grad_norm,
        canaries=0,
        threads=args.threads,
    )
    plan = RoundPlan(
        run_id=state.name,
        server_round=1,
        phase="autoencoder",
        num_server_rounds=1 + DIFFUSION_ROUNDS,
        federated_autoencoder_rounds=1,
        preset=ckpt.model_config.name,
        local_epochs=recipe.local_epochs,
        batch_size=recipe.batch_size,
        lr=lr,
        kl_weight=1e-6,
        latent_scale=ckpt.run_state.latent_scale,
        proximal_mu=0.0,
        seed=0,
        dp_trainable_autoencoder=trainable,
    )
    result = run_training_round(site, plan, ae_state)
    if result.refused:
        raise SystemExit(f"{trainable}:{lr}: refused: {result.refused}")
    return result, recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a public checkpoint (fedsynth pretrain)")
    ap.add_argument("--out", default="bench-results/ae-recipe")
    ap.add_argument(
        "--patients", type=int, default=2400, help="stand-in patients (a benchmark site's count)"
    )
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--grid", nargs="+", default=list(GRID), help="trainable:lr (AE_TRAINABLE)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    silence_known_noise()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - t_start:7.0f}s] {line}", flush=True)

    ckpt = Checkpoint.load(args.checkpoint)
    cfg = ckpt.model_config
    site_dir = out / "sites" / "site-0"
    if not site_dir.exists():
        log(f"rendering {args.patients} stand-in patients ({STAND_IN.protocol.name})")
        make_phantom_sites(
            out / "sites",
            n_subjects=args.patients,
            size=cfg.image_size,
            seed=SEED,
            specs=[STAND_IN],
        )
    train, holdout = load_training_data(
        SiteConfig(site_dir=str(site_dir), state_dir=str(out / "load")), cfg
    )
    levels, _ = patient_noise_levels(train.images, train.records_by_patient())
    level = float(
        levels.mean()
    )  # the stand-in is public: its own level stands for the one a site releases
    f_real, names = radiomics_features(train.images)
    log(
        f"stand-in {site_dir.name}: {len(train)} training / {len(holdout)} hold-out images, noise level {level:.4f}"
    )

    results = out / "results.jsonl"
    done = (
        {json.loads(x)["key"] for x in results.read_text().splitlines()}
        if results.exists()
        else set()
    )

    def score(ae) -> dict:
        recon = autoencoder_reconstructions(
            ae.eval(), holdout, ckpt.run_state.latent_scale, torch.device("cpu")
        )
        return {
            "through_autoencoder": fidelity_row(f_real, names, recon),
            "with_noise_level": fidelity_row(f_real, names, rician(recon, level)),
        }

    rows = [("none", None)] + [(key, key.split(":")) for key in args.grid]
    for key, spec in rows:
        if key in done:
            continue
        t0 = time.time()
        ae = ckpt.models()[0]  # the public autoencoder, afresh for each row
        row: dict = {"key": key, "stand_in": STAND_IN.protocol.name, "noise_level": round(level, 4)}
        if spec is not None:
            trainable, lr = spec[0], float(spec[1])
            state = out / "states" / key.replace(":", "-")
            result, recipe = one_round(site_dir, state, ckpt, ae.state_dict(), trainable, lr, args)
            ae.load_state_dict(result.state_dict)
            row |= {
                "trainable": trainable,
                "lr": lr,
                "loss": round(float(result.metrics["loss"]), 5),
                "steps": int(result.metrics["steps"]),
                "batch": recipe.batch_size,
                "noise_multiplier": round(float(result.privacy["noise_multiplier"]), 3),
                "epsilon_after_round": round(float(result.privacy["epsilon"]), 3),
                "train_seconds": round(float(result.metrics["seconds"]), 1),
            }
        row |= score(ae) | {"seconds": round(time.time() - t0, 1)}
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log(json.dumps(row))
    finished = [json.loads(x) for x in results.read_text().splitlines()]
    best = min(finished, key=lambda r: r["with_noise_level"]["frechet"])
    log(f"chosen (lowest Frechet distance with the noise level): {best['key']}")
    print(
        "\n".join(
            f"| {r['key']} | {r['through_autoencoder']['frechet']} / {r['through_autoencoder']['precision']} / "
            f"{r['through_autoencoder']['coverage']} | {r['with_noise_level']['frechet']} / "
            f"{r['with_noise_level']['precision']} / {r['with_noise_level']['coverage']} | {r.get('loss', '')} |"
            for r in finished
        )
    )


if __name__ == "__main__":
    main()
