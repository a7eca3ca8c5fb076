"""audit.json: the one owner of its format. Writing, reading, and the accessors every reader uses (the verdict in
privacy/verdict.py, the gate in privacy/policy.py, the reports in privacy/report.py).

Schema 1.3 (strict JSON: a number that is not finite, e.g. the claimed epsilon of a site without DP, is null):
    schema_version: "1.3"; created_at: ISO 8601 UTC; confidence: 0.95 (of every interval and bound)
    threat_model: {black_box, white_box, out_of_scope}
    definitions: {figure name: what it means}
    cohort: {path, n_images, class_names, checkpoint_sha256, run_id, experiment ("" or the experiment's label)}
    run: {run_id, status, ..., central_dp: the run's client-level DP label} (from the run record, when given)
    sites: {site: {n_members, n_nonmembers,
                   claimed_privacy: {protection, epsilon, delta, accountant, ...}   (from the site's ledger)
                   memorization: privacy.memorization.memorization_audit(...)       (pixel, feature, per_class,
                                 flagged_ids: SYNTHETIC ids only); each space block: share_closer_to_member and
                                 its permutation test (share_p_value, n_permutations, share_null_mean,
                                 share_null_q95, n_distinct_nearest_members / _nonmembers, n_synthetic_tested,
                                 synthetic_subsampled), share_ci95 (binomial, not used), n_near_copies, and
                                 histogram: {edges, counts per distance kind, min_count} on FIXED bins merged
                                 until each holds min_count values; extraction:
                                 privacy.extraction.extraction_audit(...) (samples requested / drawn at the site,
                                 flagged per space for released and drawn samples, distinct patients copied,
                                 lesion_regions {applicable, why_not, counts}, relative-distance histograms on
                                 fixed bins; flagged released ids also in flagged_ids)
                   membership: {white_box, black_box, calibrated (when the site has a reference model;
                               else calibrated_unavailable: why), per_class: {class: {same attacks}},
                               class_coverage: {class: {n_members, n_nonmembers, status, min_records}},
                               canaries: the one-run audit (client/canaries.py)}, each attack
                               privacy.audit_stats.roc_summary (AUC and interval, TPR at fixed FPR points,
                               roc_at_fpr, resolvable, nonmembers_needed) + epsilon_lower_bound (counts only)
                               + per_member (privacy.audit_stats.per_member_tests: counts only)
                   fidelity: {overall, per_class, reference: {holdout_patients, holdout_through_autoencoder,
                             holdout_through_autoencoder_with_site_noise, synthetic_with_site_noise}}
                   utility: {classifier, n_test, train_synthetic_test_real, train_real_test_real  (radiomics
                             logistic regression; each {balanced_accuracy, auc[, note]}),
                             cnn: {classifier, n_test, train_synthetic_test_real, train_real_test_real,
                                   recognised: {class: share of that class's synthetic images the CNN trained
                                                on real patients assigns to it (lesion: lesion detectable)},
                                   recognised_holdout: {class: the same share on the real hold-out}}}
                             (privacy/utility.py; figures rounded to 0.01)}
                   seconds: {stage: wall seconds at the site} (data, memorization, extraction, membership,
                            fidelity, utility; where an audit's minutes go; absent from audits made before)}
    worst_case: {figure: {value, site, class, attack}}
    failures: [sites that did not answer]
    flags: [human-readable findings and caveats]
    verdict: {status: "pass" | "fail" | "inconclusive", reasons, findings, caveats, thresholds, dp_suspect,
              power: {site: privacy.power figures}, membership_tests: {n_tests, correction, alpha},
              share_tests: {n_tests, correction, alpha}}

1.3 (issue 12): memorization.extraction (the extraction search by many samples drawn at the site) and
membership.class_coverage (every class with its counts: tested, pooled, untestable; nothing dropped silently).
1.3 also (issue 11) adds utility.cnn; a utility block with an unknown key, or a cnn block with a missing or
unknown key, is an error (check_utility).
1.2 (coarse aggregates, issue 9): a site no longer returns a near-copy threshold, median distances, data-derived
histogram edges or a full ROC curve (each is, or pins down, a distance between one synthetic image and one
patient); the rest is 1.1. 1.1 added the permutation test to 1.0. `load_audit` reads 1.0 to 1.3; a 1.0
memorization block (no share_p_value) is judged by the 1.0 rule (binomial interval), with a caveat.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from common.io import write_json_atomic

AUDIT_SCHEMA_VERSION = "1.3"
READABLE_SCHEMA_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
REQUIRED_KEYS = (
    "schema_version",
    "created_at",
    "confidence",
    "threat_model",
    "sites",
    "worst_case",
    "verdict",
)
# A membership figure from fewer records than this (per side) is reported but not used for the verdict or the
# worst case: one member and one non-member give an AUC of 0 or 1 by chance.
MIN_RECORDS = 10
ATTACKS = ("white_box", "black_box", "calibrated")
SPACES = ("pixel", "feature")

REFERENCE_LABELS = {
    "holdout_patients": "hold-out patients (real images never trained on)",
    "holdout_through_autoencoder": "hold-out patients through the autoencoder (the best a generator in this "
    "latent space could reach)",
    "holdout_through_autoencoder_with_site_noise": "the same with the scanner noise level this site released "
    "under DP added back",
    "synthetic_with_site_noise": "the cohort with the scanner noise level this site released under DP added "
    "(release-noise-levels)",
}

THREAT_MODEL = {
    "black_box": "an honest-but-curious server or any partner who receives the released cohort (images only)",
    "white_box": "an auditor holding the global model's weights, bounding what the model itself leaks",
    "out_of_scope": "a malicious server forging messages; sites poisoning the model",
}

DEFINITIONS = {
    "membership_auc": "area under the ROC curve of a membership-inference attack separating a site's training "
    "patients (members) from its hold-out patients (non-members, never trained on); 0.5 = no better than "
    "chance; 95 % interval by Hanley-McNeil; judged by its one-sided p-value, Holm-corrected over every attack of "
    "the audit",
    "tpr_at_fpr_1pct": "share of members the attack identifies while wrongly accusing at most 1 % of "
    "non-members (needs at least 100 non-members to be measured; 0.1 % needs 1000)",
    "white_box": "attack score: minus the diffusion loss of the record under the global model at fixed timesteps",
    "black_box": "attack score: minus the distance from the record to the closest synthetic image",
    "calibrated": "attack score (LiRA / RMIA style, offline): the record's diffusion loss under a reference UNet "
    "minus under the global model, for the same timesteps and noise, averaged over the draws (a log-likelihood "
    "ratio under the diffusion ELBO). The reference is the UNet the run started from at the site (public warm "
    "start or pretrained checkpoint), which never saw the site's records, so every hold-out patient stays a "
    "non-member; absent when the site kept no reference for the run",
    "per_member": "one test per member: its p-value is its rank among the non-members' scores, (1 + #non-members "
    "scoring at least as high) / (1 + #non-members); reported: how many members are rejected under "
    "Benjamini-Hochberg (false discovery rate 5 %) and Holm (family-wise 5 %), and the smallest p-value the "
    "non-members allow (Holm cannot reject any member when it exceeds 5 % / #members)",
    "canaries": "one-run audit (Steinke, Nasr & Jagielski 2023): each site includes each of its m gradient "
    "canaries (a fixed per-sample gradient of norm C on a few UNet coordinates, drawn like a patient; never a "
    "patient, never in the cohort) in training with probability 1/2, scores them after training with the attack "
    "named, and guesses included / excluded / abstains; the number of correct guesses bounds epsilon from below at "
    "95 %",
    "power": "the largest lower bound an audit of that size could give with a perfect attack; a site whose best "
    "audit cannot reach the claim's range of interest is underpowered, and its 'no finding' says nothing",
    "experiment": "a cohort from an experiment (cohort.experiment non-empty, e.g. the positive control "
    "`fedsynth experiment memorize`, trained without DP on purpose) is never releasable; the gate refuses it",
    "epsilon_lower_bound": "a lower bound on epsilon, valid at 95 % confidence, implied by the attack: the "
    "threshold is chosen on a random half of the records and Clopper-Pearson bounds on its true- and "
    "false-positive rates are taken on the other half. A bound above the claimed epsilon means the DP "
    "implementation or its accounting is suspect; a bound below it does not prove the claim",
    "share_closer_to_member": "share of synthetic images whose nearest real image is a training patient rather "
    "than a hold-out patient, with equal set sizes (averaged exactly over all matched subsamples); about 0.5 "
    "when nothing is memorised. Judged by a one-sided label-permutation test: the member / non-member labels of "
    "the pooled real patients are shuffled B times (B reported, 999 for small problems) and the p-value is "
    "(1 + #shuffles with a share >= the observed one) / (1 + B); Holm-corrected over all share tests of the "
    "audit. The binomial interval also shown assumes independent synthetic images and is not used: images "
    "sharing a few nearest real images (hubs) are not independent, which the numbers of distinct nearest "
    "members / non-members show",
    "near_copy": "a synthetic image closer to a training patient than 99 % of hold-out patients are to their "
    "nearest training patient (the distance that separates two different real patients; with fewer than 99 "
    "hold-out patients, half the smallest such distance), and closer to that training patient than to any "
    "hold-out patient; checked on pixels, on image features and per class. The threshold itself stays at the "
    "site (it is a distance between two patients)",
    "extraction": "each site draws many samples from the audited model itself (the run's audit-oversample x "
    "the cohort size, capped by the site; its own randomness; never released) and searches them and the released "
    "cohort for copies of its training patients with Carlini et al.'s (2023) relative distance: the distance to "
    "the nearest training patient divided by half the mean distance to the 50 nearest, in pixel space, against "
    "the patients' autoencoder reconstructions (so the autoencoder's blur does not hide a copy) and in latent "
    "space; flagged when below half the smallest of the hold-out patients' own relative distances (through the "
    "same autoencoder) and closer to a training than to any hold-out patient. Lesion "
    "regions are compared on the training patients' lesion masks where the site has them. A copy among the "
    "drawn samples fails the audit; a search that drew none cannot pass",
    "class_coverage": "how each class was tested for membership: tested (10+ members and non-members), pooled "
    "(fewer: its own figures are not judged, its patients count in the all-class attacks), untestable "
    "(training patients but no hold-out patient: the audit cannot pass on it)",
    "distance_histogram": "counts of nearest-neighbour distances on fixed bins, merged with their neighbours "
    "until every reported bin holds at least its minimum count: no bin edge comes from the data and no bin "
    "singles out a few records",
    "frechet_distance": "distance between Gaussian fits of radiomics features (real vs synthetic); 0 = identical",
    "precision_recall": "precision: share of synthetic images inside the real feature manifold; recall: share of "
    "real images covered by the synthetic one; density and coverage (Naeem et al. 2020) are robust variants "
    "(k-nearest-neighbour balls)",
    "utility": "balanced accuracy / AUC of a classifier trained on the synthetic cohort and tested on a site's "
    "hold-out (train-synthetic-test-real), beside one trained on the site's own training data; two classifiers, "
    "both fixed in advance and never tuned on site data: a logistic regression on radiomics features and a small "
    "CNN on the images",
    "recognised": "share of a class's synthetic images that the CNN trained on the site's real patients assigns to "
    "that class: for the lesion class, the share of synthetic lesion images in which a lesion is detectable; "
    "beside it the same share on the real hold-out, which is what a perfect generator would reach",
}
# utility blocks (privacy/utility.py): the keys each may hold; the cnn block must hold all of its keys
UTILITY_KEYS = {"classifier", "n_test", "train_synthetic_test_real", "train_real_test_real", "cnn"}
CNN_UTILITY_KEYS = {
    "classifier",
    "n_test",
    "train_synthetic_test_real",
    "train_real_test_real",
    "recognised",
    "recognised_holdout",
}
SCORE_KEYS = {"balanced_accuracy", "auc", "note"}


# ---- values -----------------------------------------------------------------------------------------------


def finite(x: Any) -> float | None:
    """A finite number, else None (audit.json writes non-finite numbers as null; booleans are not numbers)."""
    if isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def json_safe(x: Any) -> Any:
    """Plain JSON: numpy scalars and arrays become numbers and lists, non-finite numbers null."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


# ---- walking a site's results -------------------------------------------------------------------------------


def sites(audit: dict) -> dict[str, dict]:
    return audit.get("sites") or {}


def attacks(site: dict) -> list[tuple[str, str, dict]]:
    """(class or 'all', attack kind, result) for every membership attack the site ran."""
    mem = site.get("membership") or {}
    out = [("all", kind, mem[kind]) for kind in ATTACKS if kind in mem]
    for cls, per in (mem.get("per_class") or {}).items():
        out += [(cls, kind, per[kind]) for kind in ATTACKS if kind in per]
    return out


def shares(site: dict) -> list[tuple[str, str, dict]]:
    """(class or 'all', space, memorization block) for every share the site computed."""
    m = site.get("memorization") or {}
    out = [("all", space, m[space]) for space in SPACES if space in m]
    for cls, per in (m.get("per_class") or {}).items():
        out += [(cls, space, per[space]) for space in SPACES if space in per]
    return out


def eps_lower_bound(res: dict) -> float:
    """An attack's empirical epsilon lower bound (0 when it has none)."""
    return finite((res.get("epsilon_lower_bound") or {}).get("epsilon_lower_bound")) or 0.0


def enough_records(res: dict, min_records: int = MIN_RECORDS) -> bool:
    """Does an attack rest on at least `min_records` members and non-members?"""
    return min(res.get("n_members") or 0, res.get("n_nonmembers") or 0) >= min_records


def tpr_resolvable(res: dict, key: str = "tpr_at_fpr_1pct") -> bool:
    """Could the attack resolve this false-positive rate (1 / FPR non-members or more)?"""
    need = {"tpr_at_fpr_1pct": 100, "tpr_at_fpr_0_1pct": 1000}[key]
    return bool((res.get("resolvable") or {}).get(key, (res.get("n_nonmembers") or 0) >= need))


def flagged_ids(site: dict) -> set[str] | None:
    """Synthetic ids the site flagged as near-copies (any space or class); None when it sent no memorization."""
    m = site.get("memorization")
    if not isinstance(m, dict) or not isinstance(m.get("flagged_ids"), list):
        return None
    ids = set(map(str, m["flagged_ids"]))
    for per in (m.get("per_class") or {}).values():
        ids |= set(map(str, per.get("flagged_ids") or []))
    return ids


def claimed_privacy(site: dict) -> dict:
    return site.get("claimed_privacy") or {}


def check_utility(block: Any, where: str = "utility") -> dict:
    """A site's utility block, or ValueError naming the unknown or missing key (schema 1.3)."""

    def keys(d: Any, allowed: set[str], required: set[str], at: str) -> None:
        if not isinstance(d, dict):
            raise ValueError(f"{at}: expected an object, got {type(d).__name__}")
        unknown, missing = set(d) - allowed, required - set(d)
        if unknown or missing:
            raise ValueError(
                f"{at}: "
                + "; ".join(
                    f"{what} key(s) {', '.join(sorted(ks))}"
                    for what, ks in (("unknown", unknown), ("missing", missing))
                    if ks
                )
                + " (the format is privacy/audit_schema.py's; utility blocks come from privacy/utility.py)"
            )

    keys(block, UTILITY_KEYS, set(), where)
    for k in ("train_synthetic_test_real", "train_real_test_real"):
        if k in block:
            keys(block[k], SCORE_KEYS, {"balanced_accuracy", "auc"}, f"{where}.{k}")
    if "cnn" in block:
        cnn = block["cnn"]
        keys(cnn, CNN_UTILITY_KEYS, CNN_UTILITY_KEYS, f"{where}.cnn")
        for k in ("train_synthetic_test_real", "train_real_test_real"):
            keys(cnn[k], SCORE_KEYS, {"balanced_accuracy", "auc"}, f"{where}.cnn.{k}")
        for k in ("recognised", "recognised_holdout"):
            if not isinstance(cnn[k], dict) or not all(
                v is None or finite(v) is not None for v in cnn[k].values()
            ):
                raise ValueError(f"{where}.cnn.{k}: expected {{class: share}}")
    return block


def utility(site: dict) -> dict:
    """A site's utility block, checked ({} when the site sent none)."""
    block = site.get("utility")
    return {} if block is None else check_utility(block, f"site {site.get('site', '?')} utility")


# ---- the file -----------------------------------------------------------------------------------------------


def check_audit(audit: Any, where: str = "audit") -> dict:
    """The audit dict, or ValueError naming what is wrong (missing keys, unreadable schema version)."""
    if not isinstance(audit, dict):
        raise ValueError(f"{where}: not an audit object (got {type(audit).__name__})")
    if audit.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"{where}: audit schema {audit.get('schema_version')!r}, expected one of "
            f"{', '.join(READABLE_SCHEMA_VERSIONS)}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in audit]
    if missing:
        raise ValueError(
            f"{where}: the audit lacks {', '.join(missing)} (build it with privacy.verdict.build_audit)"
        )
    if not isinstance(audit["sites"], dict) or not isinstance(audit.get("cohort", {}), dict):
        raise ValueError(f"{where}: not a valid audit ('sites' and 'cohort' must be objects)")
    if audit["schema_version"] not in ("1.0", "1.1", "1.2"):
        for name, site in audit["sites"].items():
            if isinstance(site, dict) and site.get("utility") is not None:
                check_utility(site["utility"], f"{where}: site {name} utility")
    return audit


def write_audit_json(path: Path, audit: dict) -> Path:
    """Write audit.json atomically (strict JSON) in the current schema."""
    if not isinstance(audit, dict) or audit.get("schema_version") != AUDIT_SCHEMA_VERSION:
        got = audit.get("schema_version") if isinstance(audit, dict) else type(audit).__name__
        raise ValueError(
            f"{path}: audit schema {got!r}, expected {AUDIT_SCHEMA_VERSION} (build it with "
            "privacy.verdict.build_audit)"
        )
    check_audit(audit, str(path))
    write_json_atomic(Path(path), json_safe(audit))
    return Path(path)


def load_audit(path: Path) -> dict:
    """Read an audit.json, checking its schema version and required keys."""
    try:
        audit = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable audit.json ({err})") from err
    return check_audit(audit, str(path))


def audit_sha256(path: Path) -> str:
    """sha256 of an audit.json's exact bytes: what a report generated from it names."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fmt_number(v: Any, digits: int = 3) -> str:
    """A figure as people read it: integers plain, others to `digits` significant digits, "n/a" when absent."""
    f = finite(v)
    if f is None:
        return "n/a" if v is None or isinstance(v, (bool, int, float)) else str(v)
    if f.is_integer() and abs(f) < 1e7:
        return str(int(f))
    return f"{f:.{digits}g}"
