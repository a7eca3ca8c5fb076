"""The per-patient privacy ledger: durable, append-only, a patient's spend is every mechanism they were in, and
it refuses a round that would take any patient past the budget."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from privacy.accounting import MechanismStep, epsilon_for
from privacy.ledger import LedgerSchemaError, PrivacyLedger, migrate_fingerprint_ledger

DELTA = 1e-5
ROUND = dict(
    noise_multiplier=1.1,
    sample_rate=0.05,
    steps=100,
    clipping_norm=1.0,
    accountant="rdp",
    delta=DELTA,
)
ROUND_STEP = MechanismStep(1.1, 0.05, 100)


def _record(ledger: PrivacyLedger, patients, run_id="run-a", server_round=1, **over) -> int:
    return ledger.record(
        run_id=run_id,
        server_round=server_round,
        phase="diffusion",
        patients=patients,
        **{**ROUND, **over},
    )


def test_a_patients_spend_is_every_mechanism_they_were_in(tmp_path):
    path = tmp_path / "site-1" / "privacy_ledger.sqlite"
    ledger = PrivacyLedger(path)
    assert ledger.epsilon(DELTA) == 0.0
    _record(ledger, ["p1", "p2"])
    _record(
        PrivacyLedger(path), ["p1", "p2", "p3"], run_id="run-b"
    )  # a restarted site, a new patient
    one, two = epsilon_for([ROUND_STEP], DELTA), epsilon_for([ROUND_STEP] * 2, DELTA)
    reopened = PrivacyLedger(path)
    assert reopened.epsilon(DELTA, patients=["p3"]) == pytest.approx(one)
    assert reopened.epsilon(DELTA, patients=["p1"]) == pytest.approx(two)
    assert reopened.epsilon(DELTA) == pytest.approx(two)  # the site: its worst patient
    assert reopened.epsilon(DELTA, patients=["nobody"]) == 0.0
    assert reopened.patients_of("run-b") == {"p1", "p2", "p3"}
    assert reopened.run_ids() == {"run-a", "run-b"}
    # the spend as it stood at the end of run-a
    assert reopened.epsilon(DELTA, up_to=reopened.entries()[0]["id"]) == pytest.approx(one)


def test_spend_is_computed_per_distinct_history_not_per_patient(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    many = [f"p{i}" for i in range(5000)]
    _record(ledger, many)
    _record(ledger, many[:4000], run_id="run-b", noise_multiplier=2.0)
    _record(ledger, many[2000:], run_id="run-c", noise_multiplier=3.0)
    # {a, b}, {a, b, c}, {a, c}: {a, b} and {a, c} are contained in {a, b, c}: one history is the worst
    histories = ledger.histories()
    assert len(histories) == 1 and len(histories[0]) == 3
    assert len(ledger.histories(many[:2000] + many[4000:])) == 2  # {a, b} and {a, c}: incomparable


def test_check_budget_refuses_a_round_that_takes_any_patient_past_it(tmp_path):
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.sqlite")
    for r in range(3):
        _record(ledger, ["old"], server_round=r)
    three, four = (epsilon_for([ROUND_STEP] * n, DELTA) for n in (3, 4))
    one = epsilon_for([ROUND_STEP], DELTA)
    # a round of a new patient alone is fine, whatever "old" spent
    assert ledger.check_budget([ROUND_STEP], ["new"], one + 0.01, DELTA).allowed
    # the same round with "old" in it is not: the worst patient decides
    refused = ledger.check_budget([ROUND_STEP], ["new", "old"], (three + four) / 2, DELTA)
    assert not refused.allowed and "exceed" in refused.reason and f"{four:.3f}" in refused.reason
    ok = ledger.check_budget([ROUND_STEP], ["new", "old"], four + 0.01, DELTA)
    assert ok.allowed and ok.epsilon_now == pytest.approx(three)
    assert ok.epsilon_after == pytest.approx(four)
    prv = ledger.check_budget([ROUND_STEP], ["old"], 100.0, DELTA, accountant="prv")
    assert prv.allowed and prv.epsilon_after < four


def test_training_without_dp_leaves_no_guarantee(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    _record(ledger, ["p1"], noise_multiplier=0.0, accountant="none")
    assert ledger.epsilon(DELTA) == float("inf")
    with pytest.raises(ValueError, match="accountant 'none'"):
        _record(ledger, ["p1"], noise_multiplier=0.0)


def test_the_ledger_is_append_only(tmp_path):
    path = tmp_path / "l.sqlite"
    _record(PrivacyLedger(path), ["p1"])
    with sqlite3.connect(path) as db:
        for sql in (
            "DELETE FROM mechanisms",
            "UPDATE mechanisms SET steps = 0",
            "DELETE FROM participants",
        ):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)


def test_one_release_per_run_round_and_phase_and_no_mechanism_after_it(tmp_path):
    """Attack (issue 14): once a round's update is released, the ledger records no second release and no second
    mechanism for that (run id, round, phase), so nothing can train it again; other keys are unaffected."""
    path = tmp_path / "l.sqlite"
    ledger = PrivacyLedger(path)
    first = _record(ledger, ["p1"])
    assert ledger.release_of("run-a", 1, "diffusion") is None
    ledger.record_release(first, '{"plan": 1}', "a" * 64)
    assert ledger.release_of("run-a", 1, "diffusion") == {
        **ledger.releases()[0],
        "mechanism_id": first,
        "run_id": "run-a",
        "server_round": 1,
        "phase": "diffusion",
        "request_json": '{"plan": 1}',
        "update_sha256": "a" * 64,
    }
    with pytest.raises(ValueError, match="already released"):
        _record(ledger, ["p1"])
    with pytest.raises(ValueError, match="already released"):
        ledger.record_release(first, "{}", "b" * 64)
    with pytest.raises(ValueError, match="no mechanism 99"):
        ledger.record_release(99, "{}", "b" * 64)
    with pytest.raises(ValueError, match="sha256"):
        ledger.record_release(first, "{}", "not a digest")
    # a crashed attempt (spend recorded, nothing released) on another key, then its redo released: one release
    crashed, redo = _record(ledger, ["p1"], server_round=2), _record(ledger, ["p1"], server_round=2)
    ledger.record_release(redo, "{}", "c" * 64)
    with pytest.raises(ValueError, match=f"mechanism {redo}"):
        ledger.record_release(crashed, "{}", "d" * 64)
    assert [r["mechanism_id"] for r in PrivacyLedger(path).releases("run-a")] == [first, redo]
    assert PrivacyLedger(path).releases("run-b") == []
    assert len(ledger.entries()) == 3
    with sqlite3.connect(path) as db:
        for sql in ("DELETE FROM releases", "UPDATE releases SET update_sha256 = 'x'"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)


def test_holdout_assignment_is_kept_and_never_given_to_a_trained_patient(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    ledger.assign({"p1": "train", "p2": "holdout"}, 0.25)
    ledger.assign(
        {"p1": "holdout", "p2": "train", "p3": "train"}, 0.9
    )  # known patients keep their side
    assert ledger.assignments() == {"p1": "train", "p2": "holdout", "p3": "train"}
    _record(ledger, ["p4"])
    with pytest.raises(ValueError, match="already trained on"):
        ledger.assign({"p4": "holdout"}, 0.5)


def test_audits_are_counted_per_run_and_bounded(tmp_path):
    path = tmp_path / "l.sqlite"
    sha = "a" * 64
    assert PrivacyLedger(path).admit_audit("run-a", sha, sha, 2)[0]
    assert PrivacyLedger(path).admit_audit("run-a", sha, sha, 2)[0]
    ok, reason = PrivacyLedger(path).admit_audit("run-a", sha, sha, 2)
    assert not ok and "2" in reason and "run-a" in reason
    assert PrivacyLedger(path).audits_answered("run-a") == 2
    assert PrivacyLedger(path).admit_audit("run-b", sha, sha, 2)[0]


def test_bad_entries_and_bad_files_are_refused_with_the_path(tmp_path):
    path = tmp_path / "privacy_ledger.sqlite"
    ledger = PrivacyLedger(path)
    with pytest.raises(ValueError, match="sample_rate"):
        _record(ledger, ["p1"], sample_rate=0.0)
    with pytest.raises(ValueError, match="privacy_ledger.sqlite"):
        _record(ledger, ["p1"], accountant="moments")
    with pytest.raises(ValueError, match="patients"):
        _record(ledger, [])
    assert ledger.entries() == []
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="junk.sqlite"):
        PrivacyLedger(junk)


def _old_ledger(path):
    with sqlite3.connect(path) as db:
        db.executescript(
            """CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, dataset_fingerprint TEXT NOT NULL,
            run_id TEXT NOT NULL, server_round INTEGER NOT NULL, phase TEXT NOT NULL, noise_multiplier REAL NOT NULL,
            sample_rate REAL NOT NULL, steps INTEGER NOT NULL, clipping_norm REAL NOT NULL, accountant TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'committed', created_at REAL NOT NULL)"""
        )
        for fp in ("fingerprint-1", "fingerprint-2"):
            db.execute(
                "INSERT INTO entries (dataset_fingerprint, run_id, server_round, phase, noise_multiplier,"
                " sample_rate, steps, clipping_norm, accountant, created_at)"
                " VALUES (?, 'old-run', 1, 'diffusion', 1.1, 0.05, 100, 1.0, 'rdp', 0)",
                (fp,),
            )


def test_an_old_fingerprint_ledger_is_refused_then_migrated_conservatively(tmp_path):
    path = tmp_path / "privacy_ledger.sqlite"
    _old_ledger(path)
    with pytest.raises(LedgerSchemaError, match="migrate-ledger"):
        PrivacyLedger(path)
    backup = migrate_fingerprint_ledger(path, ["p1", "p2"])
    assert backup.exists()
    ledger = PrivacyLedger(path)
    # both old entries are charged to every patient: an over-count, never an under-count
    assert ledger.epsilon(DELTA, patients=["p1"]) == pytest.approx(
        epsilon_for([ROUND_STEP] * 2, DELTA)
    )
    assert ledger.assignments() == {"p1": "train", "p2": "train"}


def test_killing_the_site_after_recording_never_loses_the_spend(tmp_path):
    """SIGKILL between 'ledger written' and 'update sent': on restart the spend is still there."""
    path = tmp_path / "privacy_ledger.sqlite"
    script = textwrap.dedent(f"""
        import sys, time
        from privacy.ledger import PrivacyLedger
        ledger = PrivacyLedger({str(path)!r})
        ledger.record(run_id="run-a", server_round=7, phase="diffusion", noise_multiplier=1.1, sample_rate=0.05,
                      steps=100, clipping_norm=1.0, accountant="rdp", delta=1e-5, patients=["p1", "p2"])
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

    reopened = PrivacyLedger(path)
    assert [(e["server_round"], e["steps"]) for e in reopened.entries()] == [(7, 100)]
    assert reopened.epsilon(DELTA, patients=["p2"]) == pytest.approx(
        epsilon_for([ROUND_STEP], DELTA)
    )
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM participants").fetchone()[0] == 2
