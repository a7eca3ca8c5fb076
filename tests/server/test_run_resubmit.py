"""Which failed runs `run_app` submits again on its own: only a ServerApp that failed on a transport error before
it ever ran (it sent nothing to a site); a ServerApp that ran and failed is the app's own failure."""

import json

from server.deployment import _failed_before_running


class Link:
    def __init__(self, run: dict):
        self.run = run

    def flwr(self, args, timeout=None):
        assert args[:1] == ["ls"] and "--run-id" in args
        return json.dumps({"success": True, "runs": [self.run]})


SSL_EOF = (
    "ServerApp failed with exception: [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of "
    "protocol (_ssl.c:1006)"
)


def test_a_serverapp_that_never_ran_because_of_the_transport_is_submitted_again():
    run = {"status": "finished:failed", "status-details": SSL_EOF, "running-at": "N/A"}
    assert "UNEXPECTED_EOF" in _failed_before_running(Link(run), 1)


def test_a_serverapp_that_ran_and_failed_or_a_completed_run_is_not():
    ran = {
        "status": "finished:failed",
        "status-details": SSL_EOF,
        "running-at": "2026-11-29 16:20:54Z",
    }
    app_error = {
        "status": "finished:failed",
        "status-details": "ValueError: bad",
        "running-at": "N/A",
    }
    done = {
        "status": "finished:completed",
        "status-details": "",
        "running-at": "2026-11-29 16:20:54Z",
    }
    for run in (ran, app_error, done):
        assert _failed_before_running(Link(run), 1) == "", run
    assert _failed_before_running(Link(ran), None) == ""
