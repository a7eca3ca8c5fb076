"""What the extraction search costs a site: drawing N samples from the model (DDIM, the preset's steps, guidance
scale 3 as the demo's cohort) and searching them with a released cohort against its patients
(client/extraction.py site_extraction); reported: seconds per drawn sample and for the whole search.

    python -m bench.bench_extraction [--preset small] [--patients 60] [--cohort 16] [--oversample 10]
                                     [--threads 1] [--out docs/PERFORMANCE.md]

Untrained weights: sampling cost does not depend on what the model learned.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import write_block
from client.extraction import draw_samples, site_extraction
from client.task import load_training_data
from common.config import SiteConfig, model_config
from common.model import build_autoencoder, build_unet
from common.phantoms import make_phantom_sites


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--cohort", type=int, default=16)
    ap.add_argument("--oversample", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = model_config(args.preset)
    ae, unet = build_autoencoder(cfg).eval(), build_unet(cfg).eval()
    cpu = torch.device("cpu")
    n = args.cohort * args.oversample
    t0 = time.perf_counter()
    draw_samples(ae, unet, cfg, 1.0, 16, cpu, guidance_scale=args.guidance)
    per_sample = (time.perf_counter() - t0) / 16
    with tempfile.TemporaryDirectory() as tmp:
        site_dir = make_phantom_sites(
            Path(tmp) / "ph", n_sites=1, n_subjects=args.patients, size=cfg.image_size, seed=1
        )[0]
        site = SiteConfig(site_dir=str(site_dir), state_dir=str(Path(tmp) / "s"))
        train, holdout = load_training_data(site, cfg)
        released = np.random.default_rng(0).uniform(0, 1, (args.cohort, *cfg.image_shape))
        t0 = time.perf_counter()
        out = site_extraction(
            site,
            cfg,
            ae,
            unet,
            1.0,
            cpu,
            released.astype(np.float32),
            [f"r{i}" for i in range(args.cohort)],
            train,
            holdout,
            n,
            guidance_scale=args.guidance,
        )
        whole = time.perf_counter() - t0
    lines = [
        f"### Extraction search (`python -m bench.bench_extraction --preset {args.preset} --patients "
        f"{args.patients} --cohort {args.cohort} --oversample {args.oversample} --threads {args.threads}`)",
        "",
        f"Machine: CPU {platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, shared with "
        f"other jobs (load average {' / '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}). "
        f"{cfg.ddim_steps} DDIM steps, guidance scale {args.guidance} (two UNet passes per step).",
        "",
        "| preset | s per drawn sample | samples drawn | whole site search (draw + encode + search), s |",
        "|---|---|---|---|",
        f"| {args.preset} | {per_sample:.3f} | {out['n_samples_drawn']} | {whole:.1f} |",
    ]
    print(write_block(args.out, "bench_extraction", lines))


if __name__ == "__main__":
    main()
