"""Progress events: throttled at the source, found again in any log line that carries one."""

import logging

from common.progress import LOGGER, Stage, parse_event, say_line


def _events(caplog) -> list[dict]:
    return [parse_event(r.getMessage()) for r in caplog.records if r.name == LOGGER]


def test_a_long_loop_reports_its_first_and_last_step_and_little_between(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    bar = Stage("pretrain-unet", "public pretraining: diffusion UNet", 1200, "step", every_s=60)
    for step in range(1200):
        bar.update(step + 1, loss=0.123456789)
    events = _events(caplog)
    assert [e["done"] for e in events] == [1, 1200]
    assert events[-1]["total"] == 1200 and events[-1]["unit"] == "step"
    assert events[-1]["info"] == {"loss": 0.1235} and events[-1]["elapsed"] >= 0


def test_events_survive_a_log_format_prefix_and_junk_is_not_an_event(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    say_line("round", "round 1/2 (diffusion): 3/3 sites answered", elapsed=4.5)
    (message,) = [r.getMessage() for r in caplog.records]
    event = parse_event(f"2026-11-29 08:08:25,558 {LOGGER} INFO {message}")
    assert event == {
        "stage": "round",
        "line": "round 1/2 (diffusion): 3/3 sites answered",
        "elapsed": 4.5,
    }
    assert parse_event("fedsynth-progress {not json") is None
    assert parse_event('fedsynth-progress {"no": "stage"}') is None
    assert parse_event("INFO : Starting logstream") is None
