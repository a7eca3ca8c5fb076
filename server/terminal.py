"""What a person sees at the terminal, and the full log behind it.

The terminal gets one progress display per stage (a tqdm bar on a TTY; plain, throttled lines without control
characters otherwise, so CI logs stay readable), one line per federated round, every warning and error, and the
commands' results. Everything else (Flower's own lines, our INFO logs, the ServerApp's stream) goes to the log
file only, unless `-v`. `-q` keeps warnings, errors and results.

Progress arrives as `common.progress` events: from log records in this process, or inside the lines
`flwr run --stream` relays from the ServerApp (`flower_line`).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from common.noise import silence_known_noise
from common.progress import LOGGER as PROGRESS_LOGGER
from common.progress import parse_event

QUIET, NORMAL, VERBOSE = -1, 0, 1
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# a non-TTY progress line at most this often per stage (plus the first and the last)
PLAIN_EVERY_S = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# a warning or error in a streamed line: ours ("DATE TIME logger LEVEL msg") or Flower's ("LEVEL :  msg")
_PROBLEM = re.compile(
    r"^(?:\d{4}-\d\d-\d\d[ T]\S+\s+(?:\S+\s+)?)?(WARNING|ERROR|CRITICAL)\b\s*:?\s*(.*)$"
)
_SHOWN = "fedsynth_shown"  # a record the console already printed (it still goes to the log file)


class Console:
    """The CLI's terminal. One per command; `close()` ends open progress bars and the log file."""

    def __init__(
        self, verbosity: int = NORMAL, stream: TextIO | None = None, tty: bool | None = None
    ):
        self.verbosity = verbosity
        self.stream = stream or sys.stdout
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", bool)())
        self.bars: dict[str, Any] = {}  # stage -> open tqdm bar (TTY)
        self.plain_at: dict[str, float] = {}  # stage -> when its last plain line was printed
        self.stage_seconds: dict[
            str, float
        ] = {}  # stage label -> its duration, as the stage reported it
        self.log_file: Path | None = None
        self._file_handler: logging.Handler | None = None
        self._handler = _ConsoleHandler(self)
        self._log = logging.getLogger("fedsynth.cli")

    # ---- set-up ------------------------------------------------------------------------------------------------
    def install(self) -> Console:
        """Route log records here (warnings and progress to the terminal, all to the log file once opened)."""
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.addHandler(self._handler)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if self.verbosity < VERBOSE:
            silence_known_noise()
        return self

    def log_to(self, path: Path) -> Path:
        """Write the full log to `path` (appending), from now until close()."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._file_handler is not None:
            logging.getLogger().removeHandler(self._file_handler)
            self._file_handler.close()
        self._file_handler = logging.FileHandler(path, encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(self._file_handler)
        self.log_file = path
        return path

    def close(self) -> None:
        self._end_bars()
        root = logging.getLogger()
        for h in (self._handler, self._file_handler):
            if h is not None:
                root.removeHandler(h)
        if self._file_handler is not None:
            self._file_handler.close()
            self._file_handler = None

    # ---- what the person sees ----------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """A line for the person (hidden by -q); also in the log file."""
        self._record(text)
        if self.verbosity > QUIET:
            self._print(text)

    def result(self, text: str) -> None:
        """A result: shown even with -q."""
        self._record(text)
        self._print(text)

    def warn(self, text: str) -> None:
        self._record(text, logging.WARNING)
        self._print(text)

    def detail(self, text: str) -> None:
        """The log file; the terminal only with -v."""
        self._record(text)
        if self.verbosity >= VERBOSE:
            self._print(text)

    def flower_line(self, line: str) -> None:
        """A line from a Flower process (`flwr run --stream`, deployment messages)."""
        text = _ANSI.sub("", line).rstrip()
        if not text.strip():
            return
        self._record(text, name="fedsynth.flower")
        event = parse_event(text)
        if event is not None:
            self.event(event)
            return
        problem = _PROBLEM.match(text.strip())
        if problem or self.verbosity >= VERBOSE:
            self._print(f"{problem.group(1)}: {problem.group(2)}" if problem else text)

    def event(self, event: dict[str, Any]) -> None:
        """Draw one progress event: a line event as a line, a bar event as a bar (TTY) or a throttled line."""
        stage = str(event.get("stage"))
        if "line" in event:
            if event.get("elapsed") is not None:
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + float(
                    event["elapsed"]
                )
            self.say(str(event["line"]))
            return
        label, done, total = str(event.get("label", stage)), int(event["done"]), int(event["total"])
        elapsed = float(event.get("elapsed") or 0.0)
        self.stage_seconds[label] = elapsed
        if self.verbosity <= QUIET:
            return
        if self.tty:
            self._bar(stage, label, done, total, str(event.get("unit", "")), event.get("info"))
            return
        now = time.monotonic()
        if (
            done >= total
            or stage not in self.plain_at
            or now - self.plain_at[stage] >= PLAIN_EVERY_S
        ):
            self.plain_at[stage] = now
            self._print(plain_progress(event))
            if done >= total:
                del self.plain_at[stage]

    # ---- internals ---------------------------------------------------------------------------------------------
    def _bar(self, stage: str, label: str, done: int, total: int, unit: str, info: Any) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total, desc=label, unit=f" {unit}" if unit else "it", file=self.stream
            )
        if info:
            bar.set_postfix(info, refresh=False)
        bar.update(max(0, done - bar.n))
        if done >= total:
            bar.close()
            del self.bars[stage]

    def _end_bars(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()

    def _print(self, text: str) -> None:
        self._end_bars()  # a line in the middle of a bar would tear it; the next event starts a new one
        print(text, file=self.stream, flush=True)

    def _record(self, text: str, level: int = logging.INFO, name: str = "fedsynth.cli") -> None:
        logging.getLogger(name).log(level, "%s", text, extra={_SHOWN: True})


class _ConsoleHandler(logging.Handler):
    """Log records of this process: progress events drawn, warnings and errors shown, the rest only with -v."""

    def __init__(self, console: Console):
        super().__init__(logging.DEBUG)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, _SHOWN, False):
            return
        try:
            message = record.getMessage()
            if record.name == PROGRESS_LOGGER:
                event = parse_event(message)
                if event is not None:
                    self.console.event(event)
                    return
            if record.levelno >= logging.WARNING:
                self.console._print(f"{record.levelname}: {message}")
            elif self.console.verbosity >= VERBOSE:
                self.console._print(f"{record.name}: {message}")
        except Exception:  # logging must never break the command
            self.handleError(record)


def plain_progress(event: dict[str, Any]) -> str:
    """One line for a bar event: label, done/total unit (percent), rate, ETA, and the stage's own figures."""
    done, total, unit = int(event["done"]), int(event["total"]), str(event.get("unit", ""))
    elapsed = float(event.get("elapsed") or 0.0)
    text = f"{event.get('label', event['stage'])}: {done}/{total} {unit}s ({100 * done // max(1, total)}%)"
    if done and elapsed > 0:
        rate = done / elapsed
        text += f", {rate:.3g} {unit}s/s" if rate >= 1 else f", {1 / rate:.3g} s/{unit}"
        text += (
            f", ETA {format_seconds((total - done) / rate)}"
            if done < total
            else f", {format_seconds(elapsed)}"
        )
    info = event.get("info") or {}
    if info:
        text += ", " + ", ".join(f"{k} {v}" for k, v in info.items())
    return text


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
