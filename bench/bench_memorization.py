"""Memorization-audit time: exact nearest neighbours of N synthetic among N real 64x64 images, batched, and the
label-permutation test of the share closer to a member (N synthetic vs N/2 members + N/2 non-members).

    python -m bench.bench_memorization [--n 10000] [--size 64] [--batch 1024 2048] [--out docs/PERFORMANCE.md]

Measures `privacy.memorization.pairwise_min_distances` (matrix-product form, torch) at the given batch sizes side by
side, checks it against a brute-force reference on a subset, times `share_permutation_test` (distance matrix capped
at PERM_MAX_CELLS, synthetic subsampled above it; B as the audit picks it), and writes the figures into --out
between markers.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from bench.report import write_block
from privacy.memorization import PERM_MAX_CELLS, pairwise_min_distances, share_permutation_test


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    synth = rng.random((args.n, 1, args.size, args.size), dtype=np.float32)
    real = rng.random((args.n, 1, args.size, args.size), dtype=np.float32)
    # correctness on a subset, against brute force
    nq, nr = min(200, args.n), min(500, args.n)
    d, i = pairwise_min_distances(synth[:nq], real[:nr])
    ref = np.sqrt(((synth[:nq].reshape(nq, 1, -1) - real[:nr].reshape(1, nr, -1)) ** 2).mean(-1))
    assert np.allclose(d, ref.min(1), atol=1e-4) and (i == ref.argmin(1)).mean() > 0.99
    rows = []
    for b in args.batch:
        t0 = time.perf_counter()
        pairwise_min_distances(synth, real, batch=b)
        s = time.perf_counter() - t0
        pairs = args.n * args.n
        rows.append(f"| {b} | {s:.1f} | {pairs / s / 1e6:.1f} |")
        print(rows[-1], flush=True)
    t0 = time.perf_counter()
    test = share_permutation_test(
        synth, real[: args.n // 2], real[args.n // 2 :], rng=np.random.default_rng(0)
    )
    s_perm = time.perf_counter() - t0
    perm = (
        f"| share permutation test, {args.n:,} synthetic vs {args.n // 2:,} members + {args.n - args.n // 2:,} "
        f"non-members ({test['n_synthetic_tested']:,} synthetic tested"
        + (
            f", subsampled: cap {PERM_MAX_CELLS:,} distances"
            if test["synthetic_subsampled"]
            else ""
        )
        + f"; B = {test['n_permutations']}) | {s_perm:.1f} | p = {test['share_p_value']:.3f} |"
    )
    print(perm, flush=True)
    block = write_block(
        args.out,
        "bench_memorization",
        [
            f"### Memorization audit (`bench/bench_memorization.py --n {args.n} --size {args.size}`)",
            "",
            f"Machine: CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. Exact nearest "
            f"neighbour of each of {args.n:,} synthetic among {args.n:,} real {args.size}x{args.size} images (pixel space, "
            "float32 matrix products in blocks), checked against brute force on a subset.",
            "",
            "| block size | seconds | million pairs/s |",
            "|---|---|---|",
            *rows,
            "",
            "Share closer to a member, label-permutation test (one distance matrix, window of the nearest pooled records, "
            "near-ties re-measured in float64, permutations vectorised over that window; random images, so p is uniform):",
            "",
            "| what | seconds | result |",
            "|---|---|---|",
            perm,
        ],
    )
    print(block)


if __name__ == "__main__":
    main()
