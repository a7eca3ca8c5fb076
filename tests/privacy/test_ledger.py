"""The privacy ledger: durable, keyed by the data, append-only, and it refuses rounds over budget."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from privacy.accounting import MechanismStep, epsilon_for
from privacy.ledger import PrivacyLedger

DELTA = 1e-5
ROUND = dict(noise_multiplier=1.1, sample_rate=0.05, steps=100, clipping_norm=1.0, accountant="rdp")
ROUND_STEP = MechanismStep(1.1, 0.05, 100)


def _record(
    ledger: PrivacyLedger, run_id: str = "run-a", server_round: int = 1, phase: str = "diffusion"
) -> None:
    ledger.record(run_id=run_id, server_round=server_round, phase=phase, **ROUND)


def test_spend_survives_reopening_and_new_runs(tmp_path):
    path = tmp_path / "site-1" / "privacy_ledger.sqlite"
    first = PrivacyLedger(path, "data-A")
    assert first.epsilon(DELTA) == 0.0
    _record(first, server_round=1)
    one_round = first.epsilon(DELTA)
    assert one_round == pytest.approx(epsilon_for([ROUND_STEP], DELTA))

    reopened = PrivacyLedger(path, "data-A")  # a restarted site
    assert reopened.epsilon(DELTA) == pytest.approx(one_round)
    _record(
        reopened, run_id="run-b", server_round=1
    )  # a new run on the same patients keeps counting
    assert reopened.epsilon(DELTA) == pytest.approx(epsilon_for([ROUND_STEP] * 2, DELTA))
    assert reopened.epsilon(DELTA) > one_round
    assert [e["run_id"] for e in PrivacyLedger(path, "data-A").entries()] == ["run-a", "run-b"]

    other = PrivacyLedger(path, "data-B")  # other patients: their own, empty, history
    assert other.epsilon(DELTA) == 0.0 and other.entries() == []


def test_a_retried_round_adds_spend_instead_of_overwriting(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.sqlite", "data-A")
    _record(ledger, server_round=3, phase="autoencoder")
    before = ledger.epsilon(DELTA)
    _record(ledger, server_round=3, phase="autoencoder")
    assert len(ledger.entries()) == 2
    assert ledger.epsilon(DELTA) > before
    entry = ledger.entries()[0]
    assert entry["status"] == "committed" and entry["dataset_fingerprint"] == "data-A"
    assert (
        entry["phase"] == "autoencoder"
        and entry["server_round"] == 3
        and entry["clipping_norm"] == 1.0
    )


def test_check_budget_refuses_a_round_that_would_exceed(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.sqlite", "data-A")
    for r in range(3):
        _record(ledger, server_round=r)
    now = ledger.epsilon(DELTA)
    after = ledger.epsilon_if([ROUND_STEP], DELTA)
    assert after > now

    ok = ledger.check_budget([ROUND_STEP], epsilon_budget=after + 0.01, delta=DELTA)
    assert (
        ok.allowed
        and ok.epsilon_now == pytest.approx(now)
        and ok.epsilon_after == pytest.approx(after)
    )

    refused = ledger.check_budget([ROUND_STEP], epsilon_budget=(now + after) / 2, delta=DELTA)
    assert not refused.allowed
    assert "exceed" in refused.reason and f"{after:.3f}" in refused.reason
    # PRV composes the same history to a different (tighter) number; the decision uses the one asked for
    prv = ledger.check_budget([ROUND_STEP], epsilon_budget=100.0, delta=DELTA, accountant="prv")
    assert prv.allowed and prv.epsilon_after < after


def test_bad_entries_and_bad_files_are_refused_with_the_path(tmp_path):
    path = tmp_path / "privacy_ledger.sqlite"
    ledger = PrivacyLedger(path, "data-A")
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.record(
            run_id="r", server_round=1, phase="diffusion", **{**ROUND, "sample_rate": 0.0}
        )
    with pytest.raises(ValueError, match="privacy_ledger.sqlite"):
        ledger.record(
            run_id="r", server_round=1, phase="diffusion", **{**ROUND, "accountant": "moments"}
        )
    assert ledger.entries() == []
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="junk.sqlite"):
        PrivacyLedger(junk, "data-A")


def test_killing_the_site_after_recording_never_loses_the_spend(tmp_path):
    """SIGKILL between 'ledger written' and 'update sent': on restart the spend is still there."""
    path = tmp_path / "privacy_ledger.sqlite"
    script = textwrap.dedent(f"""
        import sys, time
        from privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger({str(path)!r}, "data-A")
        ledger.record(run_id="run-a", server_round=7, phase="diffusion", noise_multiplier=1.1, sample_rate=0.05,
                      steps=100, clipping_norm=1.0, accountant="rdp")
        print("recorded", flush=True)
        time.sleep(60)  # 'sending the update': killed here
        print("sent", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "recorded"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "sent" not in proc.stdout.read()

    reopened = PrivacyLedger(path, "data-A")
    assert [(e["server_round"], e["steps"]) for e in reopened.entries()] == [(7, 100)]
    assert reopened.epsilon(DELTA) == pytest.approx(epsilon_for([ROUND_STEP], DELTA))
    # the entry is in the committed database, not only in the killed process' memory
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 1
