"""`fedsynth pull` against the real portal: a released cohort arrives verified; a changed file, a changed
release.json or an audit report changed after signing is caught, named, and leaves no folder that looks complete."""

from __future__ import annotations

import json
import os

import pytest

from common.signing import fingerprint, load_public_key
from server.cli import main as cli_main
from server.release import api, state
from server.release.manifest import verify_release, write_approval
from server.release.portal import register_release
from server.release.pull import PullError, pull
from server.release.store import Store
from tests.server.portal_helpers import PortalServer, approve, make_consortium

os.environ.setdefault("OMP_NUM_THREADS", "1")
RELEASED = ("ok-1", "resume-1", "file-1", "relj-1", "report-1", "approval-1", "cli-1", "cli-2")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pull")
    c = make_consortium(root / "consortium")
    data = root / "data"
    for name in (
        RELEASED
    ):  # approved by both officers on the command line, then registered with their approvals
        rel = c.release(name)
        for officer in ("alice", "bob"):
            write_approval(rel, approve(rel, c, officer))
        register_release(data, rel, consortium_key=c.consortium_pub)
    register_release(data, c.release("pending-1"))
    register_release(data, c.release("officer-1"))
    store = Store(data)
    tokens = {
        name: store.issue_token(role, name)[1]
        for role, name in (
            ("partner", "acme"),
            ("admin", "root"),
            ("officer", "alice"),
            ("officer", "bob"),
        )
    }
    with PortalServer(data, root / "pki") as server:
        yield {"c": c, "data": data, "server": server, "tok": tokens, "root": root}


def _pull(env, cohort, out, **kw):
    kw.setdefault("consortium_key", env["c"].consortium_pub)
    return pull(
        cohort,
        env["server"].url,
        env["tok"]["acme"],
        out,
        ca=env["server"].ca,
        progress=lambda m: None,
        **kw,
    )


def _looks_complete(out) -> bool:
    return out.exists()


def _lying_portal(monkeypatch):
    """A compromised portal: it neither checks its files against release.json nor hides what does not match."""
    monkeypatch.setattr(state.Portal, "integrity_problems", lambda self, release_dir: [])
    real = api.cohort_files
    monkeypatch.setattr(api, "cohort_files", lambda cohort, who: dict.fromkeys(real(cohort, who)))


def test_pull_downloads_and_verifies_a_released_cohort(env, tmp_path):
    out = _pull(env, "ok-1", tmp_path / "ok-1")
    assert verify_release(out, env["c"].consortium_pub, role="partner") == []
    assert sorted(p.name for p in (out / "approvals").iterdir()) == ["alice.json", "bob.json"]
    assert (out / "cohort" / "labels.csv").read_bytes() == (
        env["data"] / "cohorts" / "ok-1" / "cohort" / "labels.csv"
    ).read_bytes()
    assert not (tmp_path / "ok-1.partial").exists()
    with pytest.raises(PullError, match="already exists"):
        _pull(env, "ok-1", out)


def test_pull_without_a_consortium_key_warns_with_the_fingerprint(env, tmp_path):
    warnings = []
    _pull(env, "ok-1", tmp_path / "tofu", consortium_key=None, warn=warnings.append)
    fp = fingerprint(load_public_key(env["c"].consortium_pub))
    assert any("trust on first use" in w and fp in w for w in warnings)


def test_pull_resumes_a_partial_download_with_range(env, tmp_path):
    src = env["data"] / "cohorts" / "resume-1"
    manifest = json.loads((src / "release.json").read_text())
    images = sorted(r for r in manifest["files"] if r.endswith(".nii.gz"))
    partial = tmp_path / "resume-1.partial"
    first = partial / images[0]
    first.parent.mkdir(parents=True)
    data = (src / images[0]).read_bytes()
    first.write_bytes(data[: len(data) // 2])  # interrupted half-way
    (partial / images[1]).write_bytes(b"garbage that is not a prefix of the file")
    (partial / "cohort" / "stale.txt").write_text("left over from another attempt")
    out = _pull(env, "resume-1", tmp_path / "resume-1")
    assert (
        verify_release(out, env["c"].consortium_pub, role="partner") == [] and not partial.exists()
    )
    assert not (out / "cohort" / "stale.txt").exists()
    with env["server"].client(env["tok"]["root"]) as admin:
        log = admin.get("/api/access-log").json()["entries"]
    resumed = [e for e in log if e["what"] == f"/api/cohorts/resume-1/files/{images[0]}"]
    assert [e["status"] for e in resumed] == [206] and resumed[0]["bytes"] == len(data) - len(
        data
    ) // 2


def test_pull_detects_a_file_changed_on_the_portal(env, tmp_path, monkeypatch):
    (env["data"] / "cohorts" / "file-1" / "cohort" / "labels.csv").write_text(
        "synthetic_id,class\nx,lesion\n"
    )
    # an honest portal no longer offers the cohort: it is invalid
    with pytest.raises(PullError, match="404: not available to you") as err:
        _pull(env, "file-1", tmp_path / "file-1")
    assert not err.value.resumable and not (tmp_path / "file-1.partial").exists()
    _lying_portal(monkeypatch)  # a lying one serves it anyway: pull checks every file itself
    with pytest.raises(PullError, match=r"cohort/labels\.csv: .*sha256.* release\.json"):
        _pull(env, "file-1", tmp_path / "file-1")
    assert not _looks_complete(tmp_path / "file-1")
    assert not (tmp_path / "file-1.partial").exists()  # nothing left that could ever complete


def test_pull_detects_a_changed_release_json_even_from_a_lying_portal(env, tmp_path, monkeypatch):
    rel = env["data"] / "cohorts" / "relj-1"
    manifest = json.loads((rel / "release.json").read_text())
    manifest["required_approvals"] = 0
    (rel / "release.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    with pytest.raises(PullError, match="404"):  # the portal itself no longer vouches for it
        _pull(env, "relj-1", tmp_path / "relj-1")
    # a compromised portal that claims the cohort is released anyway: pull checks the signature itself
    monkeypatch.setattr(state.Portal, "cohort", lambda self, row: state.Cohort(row, "released"))
    with pytest.raises(
        PullError, match=r"release\.json: the signature in release\.sig does not verify"
    ):
        _pull(env, "relj-1", tmp_path / "relj-1")
    assert not _looks_complete(tmp_path / "relj-1")


def test_pull_detects_an_audit_report_changed_after_signing(env, tmp_path, capsys, monkeypatch):
    _lying_portal(monkeypatch)
    report = env["data"] / "cohorts" / "report-1" / "audit" / "report.html"
    text = report.read_text()
    edited = text.replace("</body>", "<p>Verdict overruled: fine to share.</p></body>")
    assert edited != text
    report.write_text(edited)
    code = cli_main(
        [
            "pull",
            "report-1",
            "--portal",
            env["server"].url,
            "--token",
            env["tok"]["acme"],
            "--out",
            str(tmp_path / "report-1"),
            "--ca",
            str(env["server"].ca),
            "--consortium-key",
            str(env["c"].consortium_pub),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "PULL FAILED" in err and "audit/report.html" in err
    assert not _looks_complete(tmp_path / "report-1")


def test_pull_refuses_a_cohort_whose_approvals_do_not_hold(env, tmp_path):
    # the portal's database still counts bob's approval, but the file it serves is gone: pull counts for itself
    (env["data"] / "cohorts" / "approval-1" / "approvals" / "bob.json").unlink()
    with pytest.raises(PullError, match="status 'pending'"):
        _pull(env, "approval-1", tmp_path / "approval-1")
    assert not _looks_complete(tmp_path / "approval-1")
    assert not (tmp_path / "approval-1.partial").exists()


def test_pull_refuses_unreleased_wrong_key_bad_token_and_plain_http(env, tmp_path):
    stale = tmp_path / "p.partial"
    stale.mkdir()
    (stale / "release.json").write_text("{}")
    with pytest.raises(PullError, match="not released .pending, blocked by the release policy"):
        _pull(env, "pending-1", tmp_path / "p")
    assert not stale.exists()  # a pull that cannot complete leaves nothing to resume
    other = env["root"] / "other"
    from common.signing import generate_keypair

    _, other_pub = generate_keypair(other, "impostor")
    with pytest.raises(PullError, match="signature"):
        _pull(env, "cli-1", tmp_path / "k", consortium_key=other_pub)
    with pytest.raises(PullError, match="401"):
        pull(
            "cli-1",
            env["server"].url,
            "wrong",
            tmp_path / "t",
            ca=env["server"].ca,
            consortium_key=env["c"].consortium_pub,
        )
    with pytest.raises(PullError, match="https"):
        pull(
            "cli-1", env["server"].url.replace("https", "http"), env["tok"]["acme"], tmp_path / "h"
        )
    with pytest.raises(PullError, match="not a valid cohort id"):
        _pull(env, "../etc", tmp_path / "x")
    with pytest.raises(PullError, match="pass the CA certificate of the portal with --ca"):
        pull(
            "cli-1",
            env["server"].url,
            env["tok"]["acme"],
            tmp_path / "c",
            consortium_key=env["c"].consortium_pub,
        )
    for token in ("", "two words", "line\nbreak"):
        with pytest.raises(PullError, match="no token: pass --token|copy it again"):
            pull("cli-1", env["server"].url, token, tmp_path / "n", ca=env["server"].ca)
    assert not list(tmp_path.iterdir())


def test_cli_pull_without_a_token_or_ca_says_what_to_do(env, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDSYNTH_TOKEN", raising=False)
    args = ["pull", "cli-1", "--portal", env["server"].url, "--out", str(tmp_path / "x")]
    assert cli_main(args + ["--ca", str(env["server"].ca)]) == 1
    assert "no token: pass --token TOKEN or set FEDSYNTH_TOKEN" in capsys.readouterr().err
    assert cli_main(args + ["--token", env["tok"]["acme"]]) == 1
    err = capsys.readouterr().err
    assert "--ca" in err and "resume" not in err and not list(tmp_path.iterdir())


def test_officer_approves_and_rejects_on_the_command_line(env, tmp_path, capsys):
    c, url, ca = env["c"], env["server"].url, str(env["server"].ca)

    def officer(decision, name, key, *extra):
        return cli_main(
            [
                "portal",
                decision,
                "officer-1",
                "--portal",
                url,
                "--token",
                env["tok"][name],
                "--key",
                str(key),
                "--ca",
                ca,
                "--consortium-key",
                str(c.consortium_pub),
                *extra,
            ]
        )

    assert officer("approve", "alice", c.officer_keys["bob"]) == 1  # bob's key under alice's token
    assert "not the key release.json names for officer 'alice'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        officer("reject", "alice", c.officer_keys["alice"])  # a rejection needs --reason
    capsys.readouterr()
    assert officer("approve", "alice", c.officer_keys["alice"]) == 0
    assert "cohort status: pending" in capsys.readouterr().out
    assert officer("approve", "bob", c.officer_keys["bob"]) == 0
    assert "cohort status: released" in capsys.readouterr().out
    assert officer("reject", "bob", c.officer_keys["bob"], "--reason", "late") == 1
    assert "HTTP 409" in capsys.readouterr().err
    out = _pull(env, "officer-1", tmp_path / "officer-1")
    assert verify_release(out, c.consortium_pub, role="partner") == []


def test_cli_pull_succeeds(env, tmp_path, capsys):
    code = cli_main(
        [
            "pull",
            "cli-2",
            "--portal",
            env["server"].url,
            "--token",
            env["tok"]["acme"],
            "--out",
            str(tmp_path / "cli-2"),
            "--ca",
            str(env["server"].ca),
            "--consortium-key",
            str(env["c"].consortium_pub),
        ]
    )
    assert code == 0 and "verified" in capsys.readouterr().out
    assert verify_release(tmp_path / "cli-2", env["c"].consortium_pub, role="partner") == []
