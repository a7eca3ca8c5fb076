"""What a ClientApp process costs before it reads its message: the imports, layer by layer, in fresh processes.

    python -m bench.bench_clientapp_import [--repeats 5] [--out docs/PERFORMANCE.md]

Flower 1.41's SuperNode starts a new `flwr-clientapp` process for every message (a round's training, an audit),
so each one pays for importing the app before it can start. Each row is a fresh interpreter that imports one more
layer than the row above (python itself, torch, opacus, MONAI's networks, Flower's ClientApp API, then fedsynth's
ClientApp module, which is what `flwr-clientapp` loads); the rows run interleaved, `repeats` times each, and the
table gives the median wall seconds of each and what each layer adds. MONAI imports every one of its submodules
when any is imported (monai/__init__.py, load_submodules), and with them the optional libraries it finds installed
(scipy, matplotlib, scikit-image, ...), which is why its row is larger than torch's own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.report import write_block

LAYERS = [
    ("python", "pass"),
    ("+ torch", "import torch"),
    ("+ opacus", "import torch, opacus"),
    ("+ MONAI networks", "import torch, opacus, monai.networks.nets"),
    (
        "+ Flower ClientApp API",
        "import torch, opacus, monai.networks.nets, flwr.clientapp, flwr.app",
    ),
    ("fedsynth's ClientApp module", "import client.client_app"),
]


def time_import(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t


def measure(repeats: int) -> list[tuple[str, float]]:
    times: dict[str, list[float]] = {name: [] for name, _ in LAYERS}
    for _ in range(repeats):
        for name, code in LAYERS:
            times[name].append(time_import(code))
    return [(name, sorted(v)[len(v) // 2]) for name, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="docs/PERFORMANCE.md")
    args = ap.parse_args()
    rows = measure(args.repeats)
    lines = [
        f"A ClientApp process's imports (`python -m bench.bench_clientapp_import --repeats {args.repeats}`): "
        "fresh interpreters, interleaved, median wall seconds; each row imports one more layer.",
        "",
        "| process imports | seconds | the layer adds |",
        "|---|---|---|",
    ]
    previous = 0.0
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.2f} | {seconds - previous:+.2f} |")
        previous = seconds
    print(write_block(Path(args.out), "bench_clientapp_import", lines))


if __name__ == "__main__":
    main()
