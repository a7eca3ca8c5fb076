"""Known-harmless third-party messages, silenced once at start-up where they are emitted.

Each entry names the emitting logger and the EXACT message, so nothing else from that library, and nothing of ours,
is hidden. Every process that loads images or runs Flower calls `silence_known_noise()` first: the CLI, the
ServerApp and the ClientApp (SuperNodes start those in processes of their own). `fedsynth -v` leaves the CLI's own
process unfiltered. No Python `warnings` warning shows in a demo today (tests/server/test_demo_terminal.py checks
stdout and stderr), so none is filtered.
"""

from __future__ import annotations

import logging

# (logger name, exact message): why it is harmless
KNOWN_LOG_NOISE: dict[tuple[str, str], str] = {
    (
        "monai.data.nvimgcodec_pydicom_plugin",
        "nvImageCodec is not available; skipping pydicom decoder plugin registration.",
    ): "MONAI's LoadImage builds its GPU DICOM reader on every call; without CUDA it falls back to pydicom",
    (
        "flwr",
        "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
    ): "fedsynth evaluates through its own audit round, never through Flower's federated evaluation",
}


class _DropExact(logging.Filter):
    """Drops records whose message is exactly one of `messages`; lets everything else through."""

    def __init__(self, messages: set[str]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return record.getMessage() not in self.messages
        except Exception:  # a malformed record is not ours to judge: let it through
            return True


def silence_known_noise() -> None:
    """Install the filters (idempotent). Filters sit on the emitting logger, so they apply before any handler."""
    by_logger: dict[str, set[str]] = {}
    for name, message in KNOWN_LOG_NOISE:
        by_logger.setdefault(name, set()).add(message)
    for name, messages in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExact) for f in logger.filters):
            logger.addFilter(_DropExact(messages))
