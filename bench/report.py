"""Write a benchmark's figures into docs/PERFORMANCE.md between its own markers (replacing an earlier block), and
its pictures of images as grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_block(out: Path | str, name: str, lines: list[str]) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = "\n".join([start, *lines, end])
    out = Path(out)
    text = out.read_text() if out.exists() else "# Performance\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return block


def figure(rows: list[tuple[str, np.ndarray]], path: Path, per_row: int = 8) -> None:
    """A grid of images (N, 1, H, W) in [0, 1]: one titled row per (title, images), the first `per_row` of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(rows), per_row, figsize=(1.3 * per_row, 1.45 * len(rows)), squeeze=False
    )
    for r, (name, images) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r, c]
            ax.imshow(images[c, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
