"""The demo's last words about its release: steps that work when the gate passed, a plain BLOCKED and why when not."""

import json

from server.demo import release_lines
from tests.server.portal_helpers import make_consortium


def _info(release, root):
    return {
        "release": release,
        "cohort_id": release.name,
        "portal": root / "portal",
        "tokens": root / "portal" / "tokens.txt",
        "cert": root / "tls" / "superlink.crt",
        "key": root / "tls" / "superlink.key",
        "ca": root / "tls" / "ca.crt",
        "officer_key": root / "keys" / "officer.key",
        "consortium_pub": root / "keys" / "consortium.pub",
    }


def test_a_blocked_release_says_so_and_why_and_offers_no_step_that_cannot_work(tmp_path):
    c = make_consortium(tmp_path)
    release = c.release("blocked-1", epsilon=50.0)  # over the policy's epsilon limit
    text = "\n".join(release_lines(_info(release, tmp_path)))
    gate = json.loads((release / "gate.json").read_text())
    assert not gate["passed"]
    assert "gate:      BLOCKED" in text and "release status: blocked" in text
    for rule in gate["rules"]:
        assert (f"- {rule['rule']}:" in text) == (not rule["passed"])
    assert "max_epsilon: measured 50" in text
    assert "nothing can be approved or pulled" in text
    assert "fedsynth pull" not in text and "portal serve" not in text
    assert (
        "fedsynth release gate --audit" in text
    )  # the one command offered works on a blocked release


def test_a_releasable_cohort_gets_serve_approve_and_pull(tmp_path):
    c = make_consortium(tmp_path)
    release = c.release("pending-1")
    text = "\n".join(release_lines(_info(release, tmp_path)))
    assert "gate:      passed" in text and "pending-1: pending" in text
    assert "fedsynth portal serve --data" in text
    assert "fedsynth portal approve pending-1 --portal https://127.0.0.1:8443" in text
    tokens = tmp_path / "portal" / "tokens.txt"
    assert f'--token "$(awk \'$1=="officer"{{print $3}}\' {tokens})"' in text
    assert "fedsynth pull pending-1 --portal https://127.0.0.1:8443" in text
    assert "BLOCKED" not in text
