"""Privacy: DP accounting, the site privacy ledger, memorization and membership-inference audits."""

FEDSYNTH_PACKAGE = "privacy"
