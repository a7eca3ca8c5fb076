"""The release side: from an audited cohort to a partner's verified download.

    manifest.py   the release format: build (gate, withheld images, signing), officers' approvals, status, verify
    access.py     who may see what: the one rule the portal and `fedsynth pull` apply
    store.py      the portal's SQLite state: tokens, sessions, cohorts, decisions, access log
    portal.py     the HTTPS portal: the app, its access log, registering releases, serving (uvicorn)
    api.py        its JSON routes (/api/...);  pages.py  its HTML pages (templates/, static/)
    state.py      what the routers share: who is asking, cohort status, hash checks of served files
    limits.py     what keeps it up under abuse: body cap, request deadline, connections per client, throttling
    remote.py     the command line's HTTPS client and `fedsynth portal approve|reject` (signed locally)
    pull.py       `fedsynth pull`: download, verify, and only then keep

Depends only on `common/` and `privacy/` (building a release also reads the cohort through server/synthesis.py, its
format's owner). Importing this package, `access`, `manifest`, `remote` or `pull` loads neither torch nor flwr nor
MONAI: a partner installs `fedsynth[pull]` without them.
"""
