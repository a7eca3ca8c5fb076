"""How many steps the audit's utility CNN needs to see a faint lesion, on phantoms no benchmark site uses.

    python -m bench.bench_cnn_steps [--patients 2400] [--runs 1800:500 1800:1000 1800:2000 1800:4000 200:500 ...]

The audit's TSTR / TRTR classifier (privacy/utility.py SmallCNN, trained by `train_cnn`) is an instrument: if it
cannot tell lesion from healthy on REAL images, no cohort can score above chance with it. This bench trains it on
phantoms of one protocol at 15 % lesion prevalence, from a draw (seed) that no benchmark or demo site uses, for each
TRAIN:STEPS pair, and reports balanced accuracy on 600 other phantoms of the same draw. No site data is read, so the
step rule chosen from it (privacy/utility.py CNN_RECIPE: 70 epochs of the real training set, 500-4,000 steps) costs
no privacy and was not tuned on any evaluation set.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

from common.phantoms import PROTOCOLS, SiteSpec, make_phantom_sites
from common.site import load_site
from privacy.utility import CNN_RECIPE, predict_proba, train_cnn

SEED = 4242  # a draw of its own
PROTOCOL = "t1_gre_3t"
TEST = 600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=2400)
    ap.add_argument(
        "--runs",
        nargs="+",
        default=[
            "1800:500",
            "1800:1000",
            "1800:2000",
            "1800:4000",
            "200:500",
            "200:2000",
            "600:2000",
        ],
        help="TRAIN:STEPS pairs (training images, CNN steps)",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        (site,) = make_phantom_sites(
            Path(tmp), n_subjects=args.patients, size=64, seed=SEED,
            specs=[SiteSpec("cnn-steps", PROTOCOLS[PROTOCOL], 0.15)],
        )  # fmt: skip
        data = load_site(site, class_names=("healthy", "lesion"), spatial_dims=2, image_size=64)
    x, y = data.images.astype(np.float32), np.asarray(data.labels)
    order = np.random.default_rng(0).permutation(len(x))
    test, pool = order[-TEST:], order[:-TEST]
    for run in args.runs:
        n, steps = (int(v) for v in run.split(":"))
        idx = pool[:n]
        t = time.perf_counter()
        model = train_cnn(x[idx], y[idx], 2, CNN_RECIPE.fixed(steps))
        ba = balanced_accuracy_score(y[test], predict_proba(model, x[test])[:, 1] > 0.5)
        print(
            json.dumps(
                {
                    "train_images": n,
                    "train_lesions": int(y[idx].sum()),
                    "steps": steps,
                    "balanced_accuracy": round(float(ba), 3),
                    "test_lesions": int(y[test].sum()),
                    "seconds": round(time.perf_counter() - t),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
