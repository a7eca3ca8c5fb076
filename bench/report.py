"""Write a benchmark's figures into docs/PERFORMANCE.md between its own markers (replacing an earlier block)."""

from __future__ import annotations

from pathlib import Path


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
