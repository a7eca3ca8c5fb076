"""The release side: from an audited cohort to a partner's verified download.

    manifest.py   the release format: build (gate, withheld images, signing), officers' approvals, status, verify
    access.py     who may see what: the one rule the portal and `fedsynth pull` apply
    store.py      the portal's SQLite state: tokens, sessions, cohorts, decisions, access log
    portal.py     the HTTPS portal (FastAPI app, limits, serving); api.py and pages.py are its routers
    pull.py       `fedsynth pull` and `fedsynth portal approve|reject`: the partner's and officer's command lines

Depends only on `common/` and `privacy/`. Importing this package, `access`, `manifest` or `pull` loads neither
torch nor flwr nor MONAI: a partner installs `fedsynth[pull]` without them.
"""
