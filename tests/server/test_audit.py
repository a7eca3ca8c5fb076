"""The server's side of the federated audit: what it says as each site's reply arrives."""

from server.audit import site_audit_line


def test_each_sites_reply_line_says_where_its_audit_minutes_went():
    reply = {"site": "site-0", "n_members": 206, "n_nonmembers": 104}
    seconds = {"data": 5.5, "memorization": 6.0, "extraction": 62.3, "utility": 60.8}
    assert site_audit_line({**reply, "seconds": seconds}) == (
        "  audit from site-0: 206 members, 104 non-members; 135 s at the site (data 6 s, memorization 6 s, "
        "extraction 62 s, utility 61 s)"
    )
    # a site of an earlier version sends none; a malformed field is named, and never stops the round
    assert site_audit_line(reply) == "  audit from site-0: 206 members, 104 non-members"
    assert site_audit_line({**reply, "seconds": {"data": "slow"}}).endswith(
        "; its stage times are malformed"
    )
    assert site_audit_line({**reply, "seconds": [1, 2]}) == site_audit_line(reply)
