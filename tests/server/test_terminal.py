"""The terminal: one display per stage, plain lines without control characters when not a TTY, warnings always,
Flower's chatter only in the log file (and with -v)."""

import io
import json
import logging
import re

import pytest

from common.progress import TAG, Stage, say_line
from server.terminal import NORMAL, QUIET, VERBOSE, Console, plain_progress

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def _event(**kw) -> str:
    base = {"stage": "synthesis", "label": "synthesis", "total": 8, "unit": "image", "info": {}}
    return "2026-11-29 08:10:00,000 fedsynth.progress INFO " + TAG + json.dumps(base | kw)


@pytest.fixture
def console(tmp_path):
    made = []

    def make(verbosity=NORMAL, tty=False):
        out = io.StringIO()
        c = Console(verbosity, stream=out, tty=tty).install()
        c.log_to(tmp_path / "run" / "cli.log")
        made.append(c)
        return c, out

    yield make
    for c in made:
        c.close()


STREAM = [
    "Using SuperLink: fedsynth-local (127.0.0.1:49687)",
    "\x1b[92mINFO \x1b[0m:      Starting logstream for run_id `1`",
    "2026-11-29 08:08:25,558 fedsynth.server INFO training the autoencoder on public phantoms",
    _event(done=1, elapsed=1.0),
    _event(done=8, elapsed=4.0),
    "2026-11-29 08:09:00,000 fedsynth.progress INFO "
    + TAG
    + json.dumps(
        {"stage": "round", "line": "round 1/2 (diffusion): 3/3 sites answered", "elapsed": 30}
    ),
    "2026-11-29 08:09:01,000 fedsynth.server WARNING run stopped: only 1 sites can still train",
    "\x1b[93mWARNING \x1b[0m:   something Flower thinks matters",
]


def test_normal_terminal_shows_progress_rounds_and_warnings_and_logs_everything(console, tmp_path):
    c, out = console()
    for line in STREAM:
        c.flower_line(line)
    c.close()
    shown = out.getvalue()
    assert not CONTROL.search(shown)
    assert shown.splitlines() == [
        "synthesis: 1/8 images (12%), 1 images/s, ETA 7s",
        "synthesis: 8/8 images (100%), 2 images/s, 4s",
        "round 1/2 (diffusion): 3/3 sites answered",
        "WARNING: run stopped: only 1 sites can still train",
        "WARNING: something Flower thinks matters",
    ]
    log = (tmp_path / "run" / "cli.log").read_text()
    for needle in ("Using SuperLink", "Starting logstream", "training the autoencoder"):
        assert needle in log  # the full log keeps what the terminal leaves out
    assert c.stage_seconds == {"synthesis": 4.0, "round": 30.0}


def test_quiet_keeps_warnings_and_results_verbose_shows_every_line(console):
    c, out = console(QUIET)
    for line in STREAM:
        c.flower_line(line)
    c.say("a step")
    c.result("the result")
    assert out.getvalue().splitlines() == [
        "WARNING: run stopped: only 1 sites can still train",
        "WARNING: something Flower thinks matters",
        "the result",
    ]
    v, vout = console(VERBOSE)
    for line in STREAM:
        v.flower_line(line)
    shown = vout.getvalue()
    assert "Using SuperLink" in shown and "training the autoencoder" in shown
    assert "\x1b" not in shown  # colour codes of Flower's lines are stripped


def test_a_tty_gets_one_bar_per_stage_from_log_records_of_this_process(console):
    c, out = console(tty=True)
    bar = Stage("pretrain-autoencoder", "public pretraining: autoencoder", 50, "step", every_s=0)
    for step in range(50):
        bar.update(step + 1, loss=0.5)
    say_line("round", "round 1/1 (diffusion): 2/2 sites answered")
    shown = out.getvalue()
    assert "\r" in shown and "public pretraining: autoencoder" in shown and "50/50" in shown
    assert shown.rstrip().endswith("round 1/1 (diffusion): 2/2 sites answered")
    assert not c.bars  # finished bars are closed


def test_our_own_warnings_and_errors_in_this_process_always_reach_the_terminal(console):
    c, out = console(QUIET)
    logging.getLogger("fedsynth.server").warning("site-2: dropped (no reply)")
    logging.getLogger("some.library").error("it broke")
    logging.getLogger("fedsynth.server").info("detail only")
    assert out.getvalue().splitlines() == [
        "WARNING: site-2: dropped (no reply)",
        "ERROR: it broke",
    ]


def test_plain_progress_reads_like_a_sentence():
    line = plain_progress(
        {
            "stage": "pretrain-unet",
            "label": "public pretraining: diffusion UNet",
            "done": 300,
            "total": 1200,
            "unit": "step",
            "elapsed": 100.0,
            "info": {"loss": 0.1234},
        }
    )
    assert (
        line
        == "public pretraining: diffusion UNet: 300/1200 steps (25%), 3 steps/s, ETA 5m00s, loss 0.1234"
    )
