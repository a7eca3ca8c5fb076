"""The release gate: a consortium's written policy, applied to an audit (audit.json, privacy/audit_schema.py).

A policy is a TOML file of flat keys (`deploy/policy.example.toml` documents each; every key is required, so the
file says everything that was decided). `evaluate_policy` turns it into one rule result per line of the policy,
each judged on the WORST value the audit reports: the worst site, the worst class (where the audit reports per
class) and the worst attack. A figure the audit does not report fails its rule ("not measured"): the gate refuses
rather than assumes.

Rules:
    max_epsilon, max_delta       each site's claimed (epsilon, delta) from its privacy ledger; a site without
                                 a finite epsilon (no formal DP) fails. A site's delta must also be at most
                                 1 / (10 n), n its training patients: the limit is min(max_delta, 1 / (10 n))
    claims_match_training        each site's audit-time claim equals what the server recorded while it trained
                                 (the run's privacy.json: protection, epsilon, delta), every site that trained
                                 answered the audit, and no other site did; without privacy.json: not measured
    max_membership_auc           white- and black-box attacks, overall and per class; only attacks with at least
    max_tpr_at_1pct_fpr          `min_attack_records` members and non-members count (and TPR at 1 % FPR only where
                                 the site had the 100+ non-members to resolve it), as in the audit's worst case.
                                 Each is judged on its one-sided 95 % lower confidence bound, Bonferroni-corrected
                                 over the attacks judged (see ATTACK_CONFIDENCE); the note gives the highest estimate
    near-copies                  synthetic images the sites flagged as near-copies of a training patient. With
                                 `withhold_near_copies` they are withheld from the release (`GateResult.withheld_ids`)
                                 and the rule counts the near-copies LEFT in the release against `max_near_copies`;
                                 without it, all of them are left in. `max_withheld_share` caps the share of the
                                 cohort that may be withheld: many near-copies mean a memorising model, and
                                 dropping the ones that were caught does not make the rest safe
    min_precision, min_coverage  radiomics fidelity (privacy/fidelity.py), overall and per class, every site
    min_tstr_balanced_accuracy   train-synthetic-test-real balanced accuracy at every site
    audit_verdict                the audit's own verdict must be "pass" ("inconclusive" too with
                                 `allow_inconclusive`, but NEVER when a site did not answer: an unanswered audit is
                                 not evidence); a "fail" caused only by near-copies counts as the verdict the
                                 audit's rule gives once they are discounted, when they are withheld
    not_an_experiment            the cohort does not come from an experiment (`fedsynth experiment memorize`, a
                                 deliberately memorising control without DP): such a cohort is never releasable,
                                 whatever the other rules say
`required_approvals` is not a rule of the gate: it is how many privacy officers must sign a release that passed.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from privacy.audit_schema import (
    attacks,
    claimed_privacy,
    enough_records,
    finite,
    flagged_ids,
    sites,
    tpr_resolvable,
)
from privacy.audit_stats import auc_interval, tpr_lower_bound
from privacy.verdict import build_audit


@dataclass(frozen=True)
class Policy:
    """What a cohort's audit must show before the consortium may release it."""

    max_epsilon: float
    max_delta: float
    max_membership_auc: float
    max_tpr_at_1pct_fpr: float
    min_attack_records: int
    max_near_copies: int
    withhold_near_copies: bool
    max_withheld_share: float
    min_precision: float
    min_coverage: float
    min_tstr_balanced_accuracy: float
    allow_inconclusive: bool
    required_approvals: int
    # Rules that may pass when the audit could not measure their figure (at some or all sites), e.g. TPR at 1 % FPR
    # with fewer than 100 hold-out patients per site. Only the rules in ALLOWED_UNMEASURED: formal privacy,
    # near-copies and the audit's verdict must always be measured. The gate line says what was not measured.
    allow_unmeasured: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_POLICY = Policy(
    max_epsilon=10.0,
    max_delta=1e-5,
    max_membership_auc=0.6,
    max_tpr_at_1pct_fpr=0.05,
    min_attack_records=10,
    max_near_copies=0,
    withhold_near_copies=True,
    max_withheld_share=0.05,
    min_precision=0.5,
    min_coverage=0.3,
    min_tstr_balanced_accuracy=0.6,
    allow_inconclusive=False,
    required_approvals=2,
    allow_unmeasured=(),
)
ALLOWED_UNMEASURED = (
    "max_tpr_at_1pct_fpr",
    "min_precision",
    "min_coverage",
    "min_tstr_balanced_accuracy",
)

_PROBABILITIES = {
    "max_membership_auc",
    "max_tpr_at_1pct_fpr",
    "max_withheld_share",
    "min_precision",
    "min_coverage",
    "min_tstr_balanced_accuracy",
}


def _check_value(where: str, name: str, kind: type, value: Any) -> Any:
    if kind is tuple:  # allow_unmeasured: a list of rule names
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: key {name!r} must be a list of rule names, got {value!r}")
        bad = sorted(set(value) - set(ALLOWED_UNMEASURED))
        if bad:
            raise ValueError(
                f"{where}: key {name!r}: {', '.join(map(repr, bad))} may not pass unmeasured (allowed: "
                f"{', '.join(ALLOWED_UNMEASURED)})"
            )
        return tuple(value)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # float: an integer is fine (max_epsilon = 8)
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        value = float(value) if ok else value
    if not ok:
        raise ValueError(
            f"{where}: key {name!r} must be {'a finite number' if kind is float else kind.__name__}, "
            f"got {value!r}"
        )
    if kind is not bool and value < 0:
        raise ValueError(f"{where}: key {name!r} must not be negative, got {value!r}")
    if name in _PROBABILITIES and value > 1:
        raise ValueError(f"{where}: key {name!r} is a share or rate between 0 and 1, got {value!r}")
    return value


def policy_from_dict(data: dict[str, Any], where: str = "policy") -> Policy:
    """A Policy from a dict of every key, checked (ValueError naming `where` and the key)."""
    kinds = {
        f.name: {"float": float, "int": int, "bool": bool, "tuple[str, ...]": tuple}[f.type]
        for f in fields(Policy)
    }
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} (known: {', '.join(kinds)})"
        )
    missing = [k for k in kinds if k not in data]
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {', '.join(map(repr, missing))} (every key must be set; see "
            "deploy/policy.example.toml)"
        )
    return Policy(**{k: _check_value(where, k, kind, data[k]) for k, kind in kinds.items()})


def load_policy(path: Path) -> Policy:
    """Read and check a policy TOML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: policy file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the policy ({err})") from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from err
    return policy_from_dict(data, str(path))


def policy_toml(policy: Policy) -> str:
    """The policy as TOML text that `load_policy` reads back to an equal Policy."""
    lines = [
        "# fedsynth release policy (written by fedsynth; keys documented in deploy/policy.example.toml)"
    ]
    for k, v in policy.to_dict().items():
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, (tuple, list)):
            v = json.dumps(list(v))  # a TOML array of strings
        else:
            v = repr(v)
        lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


# ---- evaluation -----------------------------------------------------------------------------------------------


@dataclass
class RuleResult:
    """One line of the gate: the worst value measured, the policy's threshold, and where the worst value was."""

    rule: str
    passed: bool
    measured: Any
    threshold: Any
    where: str = ""
    note: str = ""


@dataclass
class GateResult:
    """The gate's decision on one audit: passed only if every rule passed."""

    rules: list[RuleResult]
    withheld_ids: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)

    def failed(self) -> list[RuleResult]:
        return [r for r in self.rules if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "rules": [asdict(r) for r in self.rules],
            "withheld_ids": self.withheld_ids,
        }


def _limit(
    rule: str,
    values: list[tuple[float | None, str]],
    threshold: float,
    *,
    upper: bool,
    what: str,
    policy: Policy,
) -> RuleResult:
    """Judge the worst of (value, where) pairs against an upper (or lower) limit; a missing value fails, unless the
    policy lists the rule in allow_unmeasured (then the measured values are judged, and the line says what was not)."""
    allowed = rule in policy.allow_unmeasured
    missing = [where for v, where in values if v is None]
    present = [(v, where) for v, where in values if v is not None]
    if not present:
        where = missing[0] if missing else ""
        why = (
            f"not measured: no {what} at {missing[0]}"
            if missing
            else f"not measured: the audit reports no {what}"
        )
        return RuleResult(
            rule,
            allowed,
            None,
            threshold,
            where,
            why + ("; the policy allows it (allow_unmeasured)" if allowed else ""),
        )
    if missing and not allowed:
        return RuleResult(
            rule, False, None, threshold, missing[0], f"not measured: no {what} at {missing[0]}"
        )
    value, where = (max if upper else min)(present, key=lambda vw: vw[0])
    passed = value <= threshold if upper else value >= threshold
    note = (
        f"not measured at {', '.join(missing[:5])}; the policy allows it (allow_unmeasured)"
        if missing
        else ""
    )
    return RuleResult(rule, passed, value, threshold, where, note)


def delta_limit(policy: Policy, n_patients: Any) -> float:
    """The largest delta a site with n training patients may claim: min(max_delta, 1 / (10 n))."""
    n = finite(n_patients)
    return min(policy.max_delta, 1 / (10 * n)) if n and n > 0 else policy.max_delta


def _privacy_rules(policy: Policy, audit: dict) -> list[RuleResult]:
    eps, deltas = [], []
    for name, site in sites(audit).items():
        cp = claimed_privacy(site)
        eps.append(
            (
                finite(cp.get("epsilon")),
                f"site {name} ({cp.get('protection', 'protection unknown')})",
            )
        )
        deltas.append((name, finite(cp.get("delta")), delta_limit(policy, site.get("n_members"))))
    out = [
        _limit(
            "max_epsilon",
            eps,
            policy.max_epsilon,
            upper=True,
            what="finite claimed epsilon",
            policy=policy,
        ),
        _delta_rule(policy, deltas),
    ]
    if out[0].measured is None and eps:
        out[0].note = "no formal DP guarantee (claimed epsilon is null or infinite)"
    return out


def _delta_rule(policy: Policy, deltas: list[tuple[str, float | None, float]]) -> RuleResult:
    """Each site's delta against its own limit min(max_delta, 1/(10 n)); the line shows the worst site."""
    missing = [name for name, d, _ in deltas if d is None]
    if missing or not deltas:
        where = f"site {missing[0]}" if missing else ""
        why = "not measured: " + (f"no claimed delta at {where}" if missing else "no site")
        return RuleResult("max_delta", False, None, policy.max_delta, where, why)
    name, d, lim = max(deltas, key=lambda x: x[1] / x[2])
    note = (
        f"limit min(max_delta, 1/(10 n)) = {lim:.3g} for site {name}'s training patients"
        if lim < policy.max_delta
        else ""
    )
    return RuleResult("max_delta", d <= lim, d, lim, f"site {name}", note)


def _claims_rule(audit: dict, server_privacy: dict | None) -> RuleResult:
    """The sites' audit-time claims against what the server recorded while they trained (privacy.json)."""
    rule = "claims_match_training"
    if server_privacy is None:
        return RuleResult(
            rule, False, None, "equal", "", "not measured: the run's privacy.json was not given"
        )
    recorded = server_privacy.get("sample_level", server_privacy)
    recorded = {k: v for k, v in recorded.items() if k != "client_level" and isinstance(v, dict)}
    answered = sites(audit)
    problems = [
        f"site {n} trained in this run but its audit claim is missing"
        for n in recorded
        if n not in answered
    ]
    problems += [
        f"site {n} answered the audit but did not train in this run"
        for n in answered
        if n not in recorded
    ]
    for name in sorted(set(recorded) & set(answered)):
        trained, claimed = recorded[name], claimed_privacy(answered[name])
        formal_t = str(trained.get("protection", "none")) != "none"
        formal_c = str(claimed.get("protection", "none")) != "none"
        if formal_t != formal_c:
            problems.append(
                f"site {name}: trained with protection {trained.get('protection', 'none')!r}, claims "
                f"{claimed.get('protection', 'none')!r} at the audit"
            )
            continue
        for key in ("epsilon", "delta"):
            t, c = finite(trained.get(key)), finite(claimed.get(key))
            if (t is None) != (c is None) or (
                t is not None and not math.isclose(t, c, rel_tol=1e-6, abs_tol=1e-12)
            ):
                problems.append(
                    f"site {name}: {key} {c if c is not None else 'none'} at the audit, "
                    f"{t if t is not None else 'none'} recorded by the server while it trained"
                )
    return RuleResult(
        rule,
        not problems,
        "equal" if not problems else f"{len(problems)} mismatch(es)",
        "equal",
        "; ".join(problems[:5]),
        "" if problems else f"{len(recorded)} site claim(s) match privacy.json",
    )


# The attack rules judge what the audit SHOWS, not its noise: each attack's one-sided lower confidence bound, at
# ATTACK_CONFIDENCE with a Bonferroni correction over the attacks the rule judges (a site's hold-out of about 100
# non-members makes TPR at 1 % FPR the TPR at one false positive: the worst of a dozen chance-level attacks passed
# 0.05 in one demo run and not in the next). An estimate above the limit that the data cannot confirm is said in
# the rule's note, as the audit's own verdict treats a membership AUC that is not significantly above chance.
ATTACK_CONFIDENCE = 0.95


def _attack_rules(policy: Policy, audit: dict) -> list[RuleResult]:
    auc, tpr = [], []
    for name, site in sites(audit).items():
        for cls, kind, res in attacks(site):
            if not enough_records(res, policy.min_attack_records):
                continue
            where = f"site {name}, class {cls}, {kind.replace('_', '-')} attack"
            auc.append((res, where))
            if tpr_resolvable(res):
                tpr.append((res, where))

    def lower_auc(res: dict, alpha: float) -> float | None:
        a = finite(res.get("auc"))
        if a is None:
            return None
        return float(auc_interval(a, int(res["n_members"]), int(res["n_nonmembers"]), 2 * alpha)[0])

    def lower_tpr(res: dict, alpha: float) -> float | None:
        t = finite(res.get("tpr_at_fpr_1pct"))
        return None if t is None else tpr_lower_bound(t, int(res["n_members"]), alpha)

    def judged(rule, items, key, bound, method, threshold, what) -> RuleResult:
        alpha = (1 - ATTACK_CONFIDENCE) / max(1, len(items))
        r = _limit(
            rule,
            [(bound(res, alpha), where) for res, where in items],
            threshold,
            upper=True,
            what=what,
            policy=policy,
        )
        estimates = [(finite(res.get(key)), where) for res, where in items]
        estimates = [(v, w) for v, w in estimates if v is not None]
        if estimates and r.measured is not None:
            v, w = max(estimates, key=lambda vw: vw[0])
            said = (
                f"judged on each attack's one-sided {ATTACK_CONFIDENCE:.0%} lower bound ({method}, Bonferroni "
                f"over {len(items)} attacks); the highest estimate is {v:.3f} ({w})"
                + (": above the limit, but not significantly" if v > threshold and r.passed else "")
            )
            r.note = "; ".join(x for x in (said, r.note) if x)
        return r

    return [
        judged(
            "max_membership_auc",
            auc,
            "auc",
            lower_auc,
            "Hanley-McNeil",
            policy.max_membership_auc,
            f"membership AUC from {policy.min_attack_records}+ members and non-members",
        ),
        judged(
            "max_tpr_at_1pct_fpr",
            tpr,
            "tpr_at_fpr_1pct",
            lower_tpr,
            "Clopper-Pearson on the members",
            policy.max_tpr_at_1pct_fpr,
            "resolvable TPR at 1 % FPR (needs 100+ non-members at a site)",
        ),
    ]


def flagged_near_copies(audit: dict) -> dict[str, list[str]] | None:
    """{synthetic id: [sites that flagged it]} from every site's memorization block; None when a site has none."""
    flagged: dict[str, list[str]] = {}
    for name, site in sites(audit).items():
        ids = flagged_ids(site)
        if ids is None:
            return None
        for sid in ids:
            flagged.setdefault(sid, []).append(name)
    return flagged if sites(audit) else None


def _near_copy_rules(policy: Policy, audit: dict) -> tuple[list[RuleResult], list[str]]:
    flagged = flagged_near_copies(audit)
    if flagged is None:
        note = "not measured: a site reports no memorization audit (flagged_ids)"
        return [
            RuleResult("max_near_copies", False, None, policy.max_near_copies, "", note),
            RuleResult("max_withheld_share", False, None, policy.max_withheld_share, "", note),
        ], []
    withheld = sorted(flagged) if policy.withhold_near_copies else []
    left = len(flagged) - len(withheld)
    where = "; ".join(f"{sid} (site {', '.join(s)})" for sid, s in sorted(flagged.items())[:10])
    rules = [
        RuleResult(
            "max_near_copies",
            left <= policy.max_near_copies,
            left,
            policy.max_near_copies,
            where,
            f"{len(flagged)} near-copies found, {len(withheld)} withheld, {left} left in the release",
        )
    ]
    n_images = finite((audit.get("cohort") or {}).get("n_images"))
    if not n_images:
        rules.append(
            RuleResult(
                "max_withheld_share",
                False,
                None,
                policy.max_withheld_share,
                "",
                "not measured: the audit does not say how many images the cohort has",
            )
        )
    else:
        share = len(withheld) / n_images
        rules.append(
            RuleResult(
                "max_withheld_share",
                share <= policy.max_withheld_share,
                share,
                policy.max_withheld_share,
                f"{len(withheld)} of {int(n_images)} images",
            )
        )
    return rules, withheld


def _quality_rules(policy: Policy, audit: dict) -> list[RuleResult]:
    precision, coverage, tstr = [], [], []
    for name, site in sites(audit).items():
        fid = site.get("fidelity") or {}
        blocks = [("all", fid.get("overall") or {})] + list((fid.get("per_class") or {}).items())
        for cls, blk in blocks:
            precision.append((finite(blk.get("precision")), f"site {name}, class {cls}"))
            coverage.append((finite(blk.get("coverage")), f"site {name}, class {cls}"))
        ts = (site.get("utility") or {}).get("train_synthetic_test_real") or {}
        tstr.append((finite(ts.get("balanced_accuracy")), f"site {name}"))
    return [
        _limit(
            "min_precision",
            precision,
            policy.min_precision,
            upper=False,
            what="fidelity precision",
            policy=policy,
        ),
        _limit(
            "min_coverage",
            coverage,
            policy.min_coverage,
            upper=False,
            what="fidelity coverage",
            policy=policy,
        ),
        _limit(
            "min_tstr_balanced_accuracy",
            tstr,
            policy.min_tstr_balanced_accuracy,
            upper=False,
            what="train-synthetic-test-real balanced accuracy",
            policy=policy,
        ),
    ]


def _verdict_rule(policy: Policy, audit: dict, withheld: list[str]) -> RuleResult:
    verdict = audit.get("verdict") or {}
    status = verdict.get("status")
    allowed = ["pass", "inconclusive"] if policy.allow_inconclusive else ["pass"]
    threshold = " or ".join(allowed)
    if status not in ("pass", "fail", "inconclusive"):
        return RuleResult(
            "audit_verdict", False, None, threshold, "", "not measured: the audit has no verdict"
        )
    note = "; ".join(map(str, verdict.get("reasons") or []))[:500]
    unanswered = [str(f) for f in audit.get("failures") or []]
    if unanswered:  # no answer is no evidence: allow_inconclusive never covers it
        return RuleResult(
            "audit_verdict",
            False,
            status,
            "pass, every site answered",
            "; ".join(unanswered[:5]),
            f"{len(unanswered)} site(s) did not answer the audit; a release needs every site's answer",
        )
    if status == "fail" and withheld:
        # The audit's own rule, re-applied with the withheld near-copies discounted.
        discounted = copy.deepcopy(sites(audit))
        for site in discounted.values():
            if isinstance(site.get("memorization"), dict):
                site["memorization"]["n_near_copies"] = 0
        again = build_audit(
            discounted, cohort=audit.get("cohort") or {}, failures=audit.get("failures") or []
        )
        status = again["verdict"]["status"]
        note = (
            f"audit verdict 'fail'; with the {len(withheld)} near-copies withheld: '{status}' ("
            + "; ".join(map(str, again["verdict"]["reasons"]))[:500]
            + ")"
        )
    return RuleResult("audit_verdict", status in allowed, status, threshold, "", note)


def evaluate_policy(
    policy: Policy, audit: dict, *, server_privacy: dict | None = None
) -> GateResult:
    """Apply every rule of `policy` to an audit dict (as loaded from audit.json). `server_privacy` is the run's
    privacy.json (what the server recorded while the sites trained); the sites' audit-time claims must match it,
    and without it that rule fails as not measured."""
    if not isinstance(audit, dict):
        raise ValueError(
            f"evaluate_policy: the audit must be a dict (audit.json), got {type(audit).__name__}"
        )
    near, withheld = _near_copy_rules(policy, audit)
    rules = [
        *_privacy_rules(policy, audit),
        _claims_rule(audit, server_privacy),
        *_attack_rules(policy, audit),
        *near,
        *_quality_rules(policy, audit),
        _verdict_rule(policy, audit, withheld),
    ]
    experiment = str((audit.get("cohort") or {}).get("experiment") or "")
    if experiment:
        rules.insert(
            0,
            RuleResult(
                "not_an_experiment",
                False,
                "experiment",
                "not an experiment",
                "",
                f"this cohort comes from an experiment and is never releasable: {experiment}",
            ),
        )
    if not sites(audit):
        rules.insert(
            0,
            RuleResult(
                "sites_audited", False, 0, ">= 1", "", "not measured: no site returned an audit"
            ),
        )
    return GateResult(rules=rules, withheld_ids=withheld)


def format_value(v: Any) -> str:
    """A measured value or threshold as people read it in the gate table ("n/a" when not measured)."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def gate_table(gate: GateResult) -> str:
    """The gate as a plain-text table: rule, measured, threshold, pass/fail, where / why."""
    fmt = format_value
    rows = [("rule", "measured", "threshold", "result", "where / why")]
    rows += [
        (
            r.rule,
            fmt(r.measured),
            fmt(r.threshold),
            "pass" if r.passed else "FAIL",
            "; ".join(x for x in (r.where, r.note) if x),
        )
        for r in gate.rules
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=False)) + "  " + row[4]
        for row in rows
    ]
    lines.append(
        f"gate: {'PASSED' if gate.passed else 'FAILED'}"
        + (f"; {len(gate.withheld_ids)} near-copies withheld" if gate.withheld_ids else "")
    )
    return "\n".join(lines)
