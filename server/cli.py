"""`fedsynth`: the command line for consortia, sites, privacy officers and partners.

fedsynth [-v|-q] COMMAND ...   -v: every log line at the terminal; -q: warnings, errors and results only.
Full logs always go to a file in the run folder (demo: DIR/run/demo.log); the terminal shows progress per stage.

fedsynth demo [--out DIR] [--dims 2|3]           the whole path on loopback: phantoms -> TLS federation -> cohort -> release
fedsynth phantoms --sites N --subjects M --out DIR [--dims 2|3] [--seed S]   (--public: the demo's public set)
fedsynth pretrain --public DIR --preset P --out FILE [--autoencoder-steps N] [--unet-steps N] [--batch-size B]
                                                 the autoencoder and UNet on PUBLIC data only: RunConfig `pretrained`
fedsynth experiment memorize [--out DIR]        EXPERIMENT: the audit's positive control (no DP; must FAIL; never releasable)
fedsynth site check DIR                          what a site's folder holds, and every problem in it
fedsynth site migrate-ledger --site-dir DIR      convert an old (fingerprint-keyed) privacy ledger, conservatively
fedsynth synthesize --checkpoint CKPT --per-class N --out DIR [--device D] [--workers W]   (resumes a half-written DIR)
fedsynth verify COHORT                           re-hash a cohort against its manifest
fedsynth audit --demo DIR                        re-run the federated privacy audit of a demo's cohort
fedsynth pki --out DIR --nodes N                 CA, SuperLink certificate, SuperNode auth keys
fedsynth keys new --name NAME --out DIR          Ed25519 key pair for the consortium or an officer
fedsynth release gate --audit DIR --policy FILE --privacy FILE   apply a release policy to an audit (exit 1 if it fails)
fedsynth release build --cohort DIR --audit DIR --policy FILE --privacy FILE --consortium-key KEY
                       --officer NAME=PUB ... --out DIR
fedsynth release approve RELEASE --officer NAME --key KEY [--reject --reason TEXT]
fedsynth release verify RELEASE --consortium-key PUB
fedsynth portal serve --data DIR --cert C --key K   the partner portal (HTTPS): officers approve, partners download
fedsynth portal token --data DIR --role R --name N  issue a portal token (printed once); portal revoke, portal add
fedsynth portal approve|reject COHORT --portal URL --token T --key KEY   an officer's decision, signed locally
fedsynth pull COHORT --portal URL --token T [--out DIR] [--ca CA] [--consortium-key PUB]   download + verify
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import ensure_fedsynth_packages


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_phantoms(args: argparse.Namespace) -> int:
    from common.phantoms import PUBLIC_PROTOCOL, make_phantom_sites, make_public_phantoms

    if args.public:
        out = make_public_phantoms(
            Path(args.out), n_subjects=args.subjects, dims=args.dims, size=args.size, seed=args.seed
        )
        args.console.result(
            f"public set in {out}: {args.subjects} healthy subjects, protocol {PUBLIC_PROTOCOL} (no site uses it)"
        )
        return 0
    sites = make_phantom_sites(
        Path(args.out),
        n_sites=args.sites,
        n_subjects=args.subjects,
        dims=args.dims,
        size=args.size,
        seed=args.seed,
        progress=args.console.say,
    )
    args.console.result(f"{len(sites)} phantom sites in {args.out}")
    return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    from common.config import model_config
    from common.site import check_site

    cfg = model_config(args.preset)
    report = check_site(
        Path(args.dir),
        class_names=cfg.class_names,
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
    )
    args.console.result(
        json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.to_text()
    )
    return 0 if report.usable_subjects > 0 else 1


def cmd_site_migrate_ledger(args: argparse.Namespace) -> int:
    from common.config import SiteConfig, model_config
    from common.site import load_site
    from privacy.ledger import LEDGER_FILENAME, migrate_fingerprint_ledger

    site = SiteConfig(site_dir=args.site_dir, state_dir=args.state_dir or "")
    path = site.state_path / LEDGER_FILENAME
    if not path.is_file():
        _say(f"{path}: no privacy ledger there; nothing to migrate")
        return 1
    cfg = model_config(args.preset)
    data = load_site(
        site.site_dir,
        class_names=cfg.class_names,
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
    )
    for problem in data.problems:
        _say(f"warning: {problem} (a patient left out here is not charged the old spend)")
    backup = migrate_fingerprint_ledger(path, data.patients)
    _say(
        f"{path}: every old entry is now charged to each of the {len(data.patients)} patients at the site, all "
        f"kept out of the audit hold-out; the old file is {backup}"
    )
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from server.run_folder import RunFolder
    from server.synthesis import SynthesisRequest, synthesize_cohort

    ckpt, out = Path(args.checkpoint), Path(args.out)
    folder = RunFolder.of_checkpoint(ckpt)
    args.console.log_to((folder or RunFolder(out.parent)).log(f"synthesize-{out.name}"))
    privacy = RunFolder(ckpt.parent.parent).read_privacy()
    req = SynthesisRequest(
        checkpoint=ckpt,
        out_dir=out,
        per_class=args.per_class,
        seed=args.seed,
        batch_size=args.batch_size,
        steps=args.steps,
        device=args.device,
        workers=args.workers,
    )
    synthesize_cohort(req, privacy=privacy, progress=args.console.detail)
    args.console.result(f"cohort written to {out}; full log: {args.console.log_file}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from server.pretrain import PretrainConfig, pretrain

    out = Path(args.out)
    args.console.log_to(out.parent / f"{out.name}.log")
    pre = PretrainConfig(
        public_dir=args.public,
        out=str(out),
        preset=args.preset,
        autoencoder_steps=args.autoencoder_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        class_dropout=args.class_dropout,
        unseen_classes=args.unseen_classes,
        lr_schedule=args.lr_schedule,
        seed=args.seed,
        threads=args.threads,
    )
    path = pretrain(pre, say=args.console.say)
    args.console.result(
        f'pretrained checkpoint {path}: use it with the run config `pretrained = "{path.resolve()}"`; '
        f"full log: {args.console.log_file}"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from server.synthesis import verify_cohort

    problems = verify_cohort(Path(args.cohort))
    for p in problems:
        _say(f"FAIL {p}")
    _say(
        "cohort intact: every file matches the manifest"
        if not problems
        else f"{len(problems)} problem(s)"
    )
    return 0 if not problems else 1


def cmd_pki(args: argparse.Namespace) -> int:
    from server.pki import make_pki

    paths = make_pki(Path(args.out), args.nodes)
    _say(f"PKI written to {args.out}: {paths}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import DemoOptions, run_demo

    opts = DemoOptions(
        out=Path(args.out),
        preset=args.preset,
        dims=args.dims,
        rounds=args.rounds,
        subjects=args.subjects,
        public_subjects=args.public_subjects,
        threads=args.threads,
        utility_cnn_steps=args.utility_cnn_steps,
        insecure=args.insecure,
        epsilon=args.epsilon,
    )
    return run_demo(opts, args.console)


def cmd_experiment_memorize(args: argparse.Namespace) -> int:
    from server.control import ControlOptions, run_control

    opts = ControlOptions(
        out=Path(args.out),
        preset=args.preset,
        sites=args.sites,
        subjects=args.subjects,
        canaries=args.canaries,
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        insecure=args.insecure,
    )
    return run_control(opts, args.console)


def cmd_audit(args: argparse.Namespace) -> int:
    from server.demo import run_demo_audit

    return run_demo_audit(Path(args.demo), insecure=args.insecure, console=args.console)


# ---- keys and releases (privacy/policy.py, common/signing.py, server/release/manifest.py) ----


def cmd_keys_new(args: argparse.Namespace) -> int:
    from common.signing import fingerprint, generate_keypair, load_public_key

    key, pub = generate_keypair(Path(args.out), args.name)
    _say(
        f"private key {key} (mode 0600: keep it secret)\npublic key  {pub}\n"
        f"fingerprint {fingerprint(load_public_key(pub))}"
    )
    return 0


def cmd_release_gate(args: argparse.Namespace) -> int:
    from privacy.audit_schema import load_audit
    from privacy.policy import evaluate_policy, gate_table, load_policy

    audit_path = Path(args.audit) / "audit.json" if Path(args.audit).is_dir() else Path(args.audit)
    privacy = json.loads(Path(args.privacy).read_text()) if args.privacy else None
    gate = evaluate_policy(
        load_policy(Path(args.policy)), load_audit(audit_path), server_privacy=privacy
    )
    _say(gate_table(gate))
    return 0 if gate.passed else 1


def cmd_release_build(args: argparse.Namespace) -> int:
    from privacy.policy import GateResult, RuleResult, gate_table, load_policy
    from server.release.manifest import build_release

    officers = {}
    for item in args.officer:
        name, sep, pub = item.partition("=")
        if not sep or not name or not pub:
            raise ValueError(f"--officer {item!r}: expected NAME=PUBLIC_KEY_FILE")
        officers[name] = Path(pub)
    out = build_release(
        Path(args.cohort),
        Path(args.audit),
        Path(args.out),
        policy=load_policy(Path(args.policy)),
        consortium_key=Path(args.consortium_key),
        officer_keys=officers,
        cohort_id=args.cohort_id,
        server_privacy=Path(args.privacy) if args.privacy else None,
    )
    gate = json.loads((out / "gate.json").read_text())
    _say(gate_table(GateResult([RuleResult(**r) for r in gate["rules"]], gate["withheld_ids"])))
    _say(
        f"release candidate written to {out}"
        + ("" if gate["passed"] else " (BLOCKED by the gate: built so the officers can see why)")
    )
    return 0 if gate["passed"] else 1


def cmd_release_approve(args: argparse.Namespace) -> int:
    from server.release.manifest import approval_statement, sign_approval, summary, write_approval

    decision = "reject" if args.reject else "approve"
    statement = approval_statement(Path(args.release), args.officer, decision, args.reason or "")
    path = write_approval(Path(args.release), sign_approval(statement, Path(args.key)))
    _say(
        f"{decision} by {args.officer} signed and stored in {path}\n"
        + summary(Path(args.release)).rstrip()
    )
    return 0


def cmd_release_verify(args: argparse.Namespace) -> int:
    from server.release.manifest import summary, verify_release

    problems = verify_release(Path(args.release), Path(args.consortium_key))
    for p in problems:
        _say(f"FAIL {p}")
    if problems:
        _say(f"{len(problems)} problem(s): do not use this release")
        return 1
    _say(
        "release intact: signed by the consortium key, every file matches release.json, every approval valid\n"
        + summary(Path(args.release)).rstrip()
    )
    return 0


def _add_release_commands(sub) -> None:
    keys = sub.add_parser(
        "keys", help="Ed25519 signing keys for the consortium and privacy officers"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kn = keys_sub.add_parser("new", help="write NAME.key (private, 0600) and NAME.pub")
    kn.add_argument("--name", required=True)
    kn.add_argument("--out", required=True)
    kn.set_defaults(fn=cmd_keys_new)

    rel = sub.add_parser(
        "release", help="policy gate, signed release candidates, officer approvals"
    )
    rel_sub = rel.add_subparsers(dest="release_command", required=True)
    g = rel_sub.add_parser(
        "gate", help="apply a policy to an audit and print every rule (exit 1 if it fails)"
    )
    g.add_argument("--audit", required=True, help="the audit folder (or its audit.json)")
    g.add_argument("--policy", required=True, help="policy TOML (see deploy/policy.example.toml)")
    g.add_argument(
        "--privacy",
        default=None,
        help="the run's privacy.json (what the server recorded while the sites trained); the gate checks "
        "the sites' audit-time claims against it, and fails that rule without it",
    )
    g.set_defaults(fn=cmd_release_gate)
    b = rel_sub.add_parser(
        "build", help="build a signed release candidate (exit 1 if the gate blocks it)"
    )
    b.add_argument("--cohort", required=True)
    b.add_argument("--audit", required=True)
    b.add_argument("--policy", required=True)
    b.add_argument(
        "--consortium-key", required=True, help="the consortium's private key (NAME.key)"
    )
    b.add_argument(
        "--officer",
        action="append",
        required=True,
        metavar="NAME=PUBKEY",
        help="a privacy officer who may approve, with their public key file (repeat)",
    )
    b.add_argument(
        "--privacy",
        default=None,
        help="the run's privacy.json (what the server recorded while the sites trained); the gate checks "
        "the sites' audit-time claims against it, and fails that rule without it",
    )
    b.add_argument("--cohort-id", default=None)
    b.add_argument("--out", required=True)
    b.set_defaults(fn=cmd_release_build)
    ap = rel_sub.add_parser(
        "approve", help="sign an officer's approval (or --reject) of a release candidate"
    )
    ap.add_argument("release")
    ap.add_argument("--officer", required=True)
    ap.add_argument("--key", required=True, help="the officer's private key")
    ap.add_argument("--reject", action="store_true")
    ap.add_argument("--reason", default="", help="why (required with --reject)")
    ap.set_defaults(fn=cmd_release_approve)
    vr = rel_sub.add_parser("verify", help="check a release's signature, files and approvals")
    vr.add_argument("release")
    vr.add_argument(
        "--consortium-key", required=True, help="the consortium's PUBLIC key (NAME.pub)"
    )
    vr.set_defaults(fn=cmd_release_verify)


def cmd_portal_serve(args: argparse.Namespace) -> int:
    from server.release.limits import Limits
    from server.release.portal import PortalSettings, serve

    limits = Limits(
        max_body=args.max_body,
        request_timeout=args.request_timeout,
        max_per_client=args.max_connections_per_client,
        max_auth_failures=args.max_auth_failures,
    )
    settings = PortalSettings(
        limits=limits,
        log_retention_days=args.log_retention_days,
        trusted_proxies=tuple(args.trusted_proxy or ()),
    )
    _say(f"portal on https://{args.host}:{args.port}/ serving {args.data}")
    serve(
        Path(args.data),
        host=args.host,
        port=args.port,
        cert=Path(args.cert),
        key=Path(args.key),
        settings=settings,
    )
    return 0


def cmd_portal_token(args: argparse.Namespace) -> int:
    from server.release.store import Store

    token_id, token = Store(Path(args.data)).issue_token(args.role, args.name, args.days)
    valid = f"valid {args.days:g} days" if args.days else "valid until revoked"
    _say(
        f"token id {token_id} ({args.role} {args.name}, {valid}); the token, shown only now:\n{token}"
    )
    return 0


def cmd_portal_revoke(args: argparse.Namespace) -> int:
    from server.release.store import Store

    if not Store(Path(args.data)).revoke_token(args.token_id):
        raise ValueError(f"no unrevoked token with id {args.token_id} in {args.data}")
    _say(f"token {args.token_id} revoked")
    return 0


def cmd_portal_add(args: argparse.Namespace) -> int:
    from server.release.portal import register_release

    key = Path(args.consortium_key) if args.consortium_key else None
    cohort_id = register_release(
        Path(args.data), Path(args.release), consortium_key=key, move=args.move
    )
    _say(f"cohort {cohort_id} registered in {Path(args.data) / 'cohorts' / cohort_id}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from server.release.pull import pull
    from server.release.remote import PortalError

    try:
        pull(
            args.cohort,
            args.portal,
            args.token or os.environ.get("FEDSYNTH_TOKEN", ""),
            Path(args.out) if args.out else None,
            ca=Path(args.ca) if args.ca else None,
            consortium_key=Path(args.consortium_key) if args.consortium_key else None,
            progress=_say,
        )
    except PortalError as err:
        print(f"PULL FAILED: {err}", file=sys.stderr, flush=True)
        partial = Path(f"{args.out or args.cohort}.partial")
        if partial.exists():
            print(
                f"{partial} is NOT a verified cohort; it is kept so that the same command resumes it",
                file=sys.stderr,
            )
        return 1
    return 0


def cmd_portal_decide(args: argparse.Namespace) -> int:
    from server.release.remote import PortalError, decide

    decision = args.portal_command  # approve | reject
    try:
        res = decide(
            args.cohort,
            args.portal,
            args.token or os.environ.get("FEDSYNTH_TOKEN", ""),
            Path(args.key),
            decision,
            args.reason or "",
            ca=Path(args.ca) if args.ca else None,
            consortium_key=Path(args.consortium_key) if args.consortium_key else None,
        )
    except PortalError as err:
        print(f"{decision.upper()} FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    _say(
        f"{res['decision']} of cohort {res['cohort_id']} by officer {res['officer']} signed with "
        f"{args.key} and recorded; cohort status: {res['status']}"
    )
    return 0


def _add_portal_commands(sub) -> None:
    po = sub.add_parser(
        "portal", help="the partner portal: officers approve releases, partners download them"
    )
    po_sub = po.add_subparsers(dest="portal_command", required=True)
    s = po_sub.add_parser("serve", help="serve the portal over HTTPS")
    s.add_argument(
        "--data", required=True, help="the portal data folder (portal.db, cohorts/, consortium.pub)"
    )
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8443)
    s.add_argument(
        "--cert", required=True, help="TLS certificate (e.g. fedsynth pki's superlink.crt)"
    )
    s.add_argument("--key", required=True, help="its private key")
    s.add_argument(
        "--max-body", type=int, default=64 * 1024, help="largest request body, bytes (413 above)"
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=10.0,
        help="seconds a client has to send a whole request (headers and body)",
    )
    s.add_argument(
        "--max-connections-per-client",
        type=int,
        default=16,
        help="open connections per client address (503 above); trusted proxies are exempt",
    )
    s.add_argument(
        "--max-auth-failures",
        type=int,
        default=10,
        help="failed sign-ins per client address in 5 minutes before 429",
    )
    s.add_argument(
        "--log-retention-days",
        type=float,
        default=90.0,
        help="access-log rows older than this are deleted",
    )
    s.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDRESS",
        help="a reverse proxy whose X-Forwarded-For names the real client (repeat; see deploy/README.md)",
    )
    s.set_defaults(fn=cmd_portal_serve)
    t = po_sub.add_parser(
        "token", help="issue an access token (printed once; only its hash is stored)"
    )
    t.add_argument("--data", required=True)
    t.add_argument("--role", required=True, choices=("partner", "officer", "admin"))
    t.add_argument(
        "--name",
        required=True,
        help="who holds it; an officer's name is its key name in release.json",
    )
    t.add_argument(
        "--days", type=float, default=None, help="valid for this many days (default: until revoked)"
    )
    t.set_defaults(fn=cmd_portal_token)
    r = po_sub.add_parser("revoke", help="revoke a token by its id")
    r.add_argument("--data", required=True)
    r.add_argument("--token-id", required=True)
    r.set_defaults(fn=cmd_portal_revoke)
    a = po_sub.add_parser(
        "add", help="verify a release candidate and register it (copied into DATA/cohorts/)"
    )
    a.add_argument("--data", required=True)
    a.add_argument("release")
    a.add_argument(
        "--consortium-key", default=None, help="consortium PUBLIC key (required the first time)"
    )
    a.add_argument("--move", action="store_true", help="move the folder instead of copying it")
    a.set_defaults(fn=cmd_portal_add)
    for decision in ("approve", "reject"):
        d = po_sub.add_parser(
            decision,
            help=f"{decision} a cohort on the portal, signed here with your officer key (never uploaded)",
        )
        d.add_argument("cohort")
        d.add_argument("--portal", required=True, help="https://HOST:PORT")
        d.add_argument(
            "--token", default=None, help="your officer token (default: $FEDSYNTH_TOKEN)"
        )
        d.add_argument("--key", required=True, help="your officer private key (NAME.key)")
        d.add_argument(
            "--reason", default="", required=decision == "reject", help="why (required to reject)"
        )
        d.add_argument("--ca", default=None, help="CA certificate of the portal's TLS certificate")
        d.add_argument(
            "--consortium-key",
            default=None,
            help="consortium PUBLIC key: check release.json's signature before signing",
        )
        d.set_defaults(fn=cmd_portal_decide)

    pl = sub.add_parser("pull", help="download a released cohort from the portal and verify it")
    pl.add_argument("cohort")
    pl.add_argument("--portal", required=True, help="https://HOST:PORT")
    pl.add_argument("--token", default=None, help="partner token (default: $FEDSYNTH_TOKEN)")
    pl.add_argument("--out", default=None, help="folder to create (default: ./COHORT)")
    pl.add_argument("--ca", default=None, help="CA certificate of the portal's TLS certificate")
    pl.add_argument(
        "--consortium-key",
        default=None,
        help="consortium PUBLIC key (without it: trust on first use)",
    )
    pl.set_defaults(fn=cmd_pull)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedsynth", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole pipeline on loopback with phantom hospitals")
    d.add_argument("--out", default="fedsynth-demo")
    d.add_argument(
        "--preset",
        default="",
        help="model preset (default: small for --dims 2, tiny3d for --dims 3)",
    )
    d.add_argument(
        "--dims", type=int, choices=(2, 3), default=2, help="2: axial slices; 3: whole volumes"
    )
    d.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="federated rounds (default: the preset's demo plan)",
    )
    d.add_argument("--subjects", type=int, default=None, help="patients per phantom site")
    d.add_argument(
        "--public-subjects", type=int, default=None, help="healthy subjects in the public data set"
    )
    d.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of the server's pretraining and of each site (0: auto; 1 on a busy machine)",
    )
    d.add_argument(
        "--utility-cnn-steps",
        type=int,
        default=0,
        help="steps of each site's utility classifiers in the audit (0: the recipe's; fewer on a slow machine, "
        "at the cost of the train-on-synthetic figures)",
    )
    d.add_argument("--epsilon", type=float, default=10.0, help="each site's privacy budget")
    d.add_argument(
        "--insecure", action="store_true", help="no TLS, no node authentication (debugging only)"
    )
    d.set_defaults(fn=cmd_demo)

    ex = sub.add_parser(
        "experiment",
        help="EXPERIMENTS, never releasable (labelled so everywhere; the gate refuses them)",
    )
    ex_sub = ex.add_subparsers(dest="experiment_command", required=True)
    mz = ex_sub.add_parser(
        "memorize",
        help="the audit's positive control: a memorising NON-DP federation with planted patient copies; the "
        "audit must fail (server/control.py)",
    )
    mz.add_argument("--out", default="fedsynth-control")
    mz.add_argument("--preset", default="tiny")
    mz.add_argument("--sites", type=int, default=2)
    mz.add_argument("--subjects", type=int, default=16, help="patients per phantom site")
    mz.add_argument("--canaries", type=int, default=1000, help="gradient canaries per site")
    mz.add_argument("--rounds", type=int, default=2)
    mz.add_argument("--local-epochs", type=int, default=30, help="full-batch steps per round")
    mz.add_argument("--insecure", action="store_true", help="no TLS (debugging only)")
    mz.set_defaults(fn=cmd_experiment_memorize)

    ph = sub.add_parser("phantoms", help="write physics-phantom hospitals (NIfTI + labels.csv)")
    ph.add_argument("--sites", type=int, default=3)
    ph.add_argument("--subjects", type=int, default=24)
    ph.add_argument("--out", required=True)
    ph.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ph.add_argument("--size", type=int, default=64)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument(
        "--public",
        action="store_true",
        help="write ONE public folder at --out instead: healthy subjects only, a protocol no site uses",
    )
    ph.set_defaults(fn=cmd_phantoms)

    pt = sub.add_parser(
        "pretrain",
        help="train the autoencoder and the diffusion UNet on a PUBLIC folder (site format); the checkpoint "
        "starts runs (run config `pretrained`)",
    )
    pt.add_argument(
        "--public", required=True, help="the public data folder (NIfTI/DICOM + labels.csv)"
    )
    pt.add_argument("--preset", default="small", help="model preset (the runs using it must match)")
    pt.add_argument("--out", required=True, help="the checkpoint file to write (atomically)")
    pt.add_argument(
        "--autoencoder-steps",
        type=int,
        default=3200,
        help="3200 (default) keeps the scanner's fine structure; the demo's first run uses 800 for its time",
    )
    pt.add_argument("--unet-steps", type=int, default=1200)
    pt.add_argument("--batch-size", type=int, default=16)
    pt.add_argument(
        "--class-dropout",
        type=float,
        default=0.1,
        help="share of labels replaced by the null class (classifier-free guidance)",
    )
    pt.add_argument(
        "--unseen-classes",
        choices=("null", "random"),
        default="null",
        help="where a class the public data never shows starts: the null class's embedding, or random",
    )
    pt.add_argument(
        "--lr-schedule",
        choices=("one-cycle", "constant"),
        default="one-cycle",
        help="learning-rate schedule of both models (one-cycle: warm up, then anneal)",
    )
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    pt.set_defaults(fn=cmd_pretrain)

    site = sub.add_parser("site", help="site data tools")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    chk = site_sub.add_parser(
        "check", help="report counts, shapes, spacing, class balance and problems"
    )
    chk.add_argument("dir")
    chk.add_argument("--preset", default="small")
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(fn=cmd_site_check)
    mig = site_sub.add_parser(
        "migrate-ledger",
        help="convert an old privacy ledger (spend keyed by a dataset fingerprint) to the per-patient one: "
        "every old entry is charged to every patient now at the site (an over-count, never an under-count)",
    )
    mig.add_argument("--site-dir", required=True)
    mig.add_argument("--state-dir", default="", help="default: SITE_DIR/.fedsynth")
    mig.add_argument("--preset", default="small", help="the model preset, for reading the images")
    mig.set_defaults(fn=cmd_site_migrate_ledger)

    sy = sub.add_parser("synthesize", help="sample a synthetic cohort from a checkpoint")
    sy.add_argument("--checkpoint", required=True)
    sy.add_argument("--per-class", type=int, default=8)
    sy.add_argument("--out", required=True)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the preset's)")
    sy.add_argument("--batch-size", type=int, default=32)
    sy.add_argument(
        "--device",
        default="auto",
        help="auto (every visible GPU, else the CPU), cpu, cuda (every GPU) or a list: cuda:0,cuda:1",
    )
    sy.add_argument(
        "--workers", type=int, default=0, help="CPU worker processes when on the CPU (default 1)"
    )
    sy.set_defaults(fn=cmd_synthesize)

    v = sub.add_parser("verify", help="verify a cohort's files against its manifest")
    v.add_argument("cohort")
    v.set_defaults(fn=cmd_verify)

    a = sub.add_parser(
        "audit",
        help="re-run the federated privacy audit on a demo's cohort (sites compute locally)",
    )
    a.add_argument("--demo", required=True, help="the demo's --out folder")
    a.add_argument("--insecure", action="store_true")
    a.set_defaults(fn=cmd_audit)

    k = sub.add_parser("pki", help="make a CA, a SuperLink certificate and SuperNode auth keys")
    k.add_argument("--out", required=True)
    k.add_argument("--nodes", type=int, default=3)
    k.set_defaults(fn=cmd_pki)
    _add_release_commands(sub)
    _add_portal_commands(sub)
    return p


def add_global_flags(parser: argparse.ArgumentParser) -> None:
    """-v/-q before the command (`fedsynth -v demo`) and after it (`fedsynth demo -v`), on every sub-command."""

    def add(p: argparse.ArgumentParser, default) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=default,
            help="every log line at the terminal (ours, Flower's, the libraries'), no progress bars",
        )
        g.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            default=default,
            help="only warnings, errors and results (the full log still goes to the log file)",
        )

    def walk(p: argparse.ArgumentParser, default) -> None:
        add(p, default)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child, argparse.SUPPRESS)

    walk(parser, False)


def main(argv: list[str] | None = None) -> int:
    from server.terminal import NORMAL, QUIET, VERBOSE, Console

    ensure_fedsynth_packages()
    parser = build_parser()
    add_global_flags(parser)
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v/--verbose and -q/--quiet exclude each other")
    args.console = Console(VERBOSE if args.verbose else QUIET if args.quiet else NORMAL).install()
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        where = f"; full log: {args.console.log_file}" if args.console.log_file else ""
        _say(f"interrupted{where}")
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        _say(f"error: {err}")
        return 2
    except ModuleNotFoundError as err:  # a light install (fedsynth[pull]) running a site command
        _say(
            f"error: `fedsynth {args.command}` needs the full install ({err.name} is missing): "
            'pip install "fedsynth[all]"; the light install (fedsynth[pull]) only pulls and verifies'
        )
        return 2
    finally:
        args.console.close()


if __name__ == "__main__":
    sys.exit(main())
