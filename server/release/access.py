"""Who may see what on the release side: the one rule the portal (API and pages) and `fedsynth pull` apply.

- A *partner* sees a cohort only while it is "released" (signed, gate passed, enough officers approved, every
  file still matching the signed release.json). Any other cohort does not exist for a partner: the portal answers
  404, exactly as for a cohort it never had, so a partner cannot tell blocked, pending, rejected or invalid
  cohorts from missing ones.
- Officers and admins see every registered cohort, with its status and, when invalid, why.
- Files under `officers/` in a release (the officers-only report) are listed and served to officers and admins
  only; a partner never sees their names, and `fedsynth pull` never asks for them.
"""

from __future__ import annotations

from collections.abc import Iterable

ROLES = ("partner", "officer", "admin")
REVIEWERS = ("officer", "admin")  # roles that review candidates: every cohort, every file
PARTNER_STATUS = "released"  # the only status a partner may see
OFFICERS_DIR = "officers"  # release sub-folder for officers' eyes only


def may_see_cohort(role: str, status: str) -> bool:
    """May a holder of `role` know that a cohort with this status exists (list it, open it, download from it)?"""
    return role in REVIEWERS or (role == "partner" and status == PARTNER_STATUS)


def officers_only(rel: str) -> bool:
    """Is the release file `rel` (a relative path inside a release) for officers' eyes only?"""
    return rel.split("/", 1)[0] == OFFICERS_DIR


def may_read_file(role: str, rel: str) -> bool:
    """May a holder of `role` list or download the release file `rel` (of a cohort it may see)?"""
    return role in REVIEWERS or (role == "partner" and not officers_only(rel))


def visible_files(role: str, files: Iterable[str]) -> list[str]:
    """The files of a release a holder of `role` may list and download, sorted."""
    return sorted(rel for rel in files if may_read_file(role, rel))
