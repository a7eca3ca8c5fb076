"""`fedsynth`: the command line for consortia, sites, privacy officers and partners.

    fedsynth demo [--out DIR]                        the whole path on loopback: phantoms -> TLS federation -> cohort
    fedsynth phantoms --sites N --subjects M --out DIR [--dims 2|3] [--seed S]
    fedsynth site check DIR                          what a site's folder holds, and every problem in it
    fedsynth synthesize --checkpoint CKPT --per-class N --out DIR
    fedsynth verify COHORT                           re-hash a cohort against its manifest
    fedsynth audit --demo DIR                        re-run the federated privacy audit of a demo's cohort
    fedsynth pki --out DIR --nodes N                 CA, SuperLink certificate, SuperNode auth keys
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ensure_fedsynth_packages


def _say(msg: str) -> None:
    print(msg, flush=True)


def cmd_phantoms(args: argparse.Namespace) -> int:
    from common.phantoms import make_phantom_sites

    sites = make_phantom_sites(Path(args.out), n_sites=args.sites, n_subjects=args.subjects, dims=args.dims,
                               size=args.size, seed=args.seed, progress=_say)
    _say(f"{len(sites)} phantom sites in {args.out}")
    return 0


def cmd_site_check(args: argparse.Namespace) -> int:
    from common.config import model_config
    from common.site import check_site

    cfg = model_config(args.preset)
    report = check_site(Path(args.dir), class_names=cfg.class_names, spatial_dims=cfg.spatial_dims,
                        image_size=cfg.image_size)
    _say(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.to_text())
    return 0 if report.usable_subjects > 0 else 1


def cmd_synthesize(args: argparse.Namespace) -> int:
    from server.synthesis import SynthesisRequest, synthesize_cohort

    ckpt = Path(args.checkpoint)
    privacy_path = ckpt.parent.parent / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else None
    req = SynthesisRequest(checkpoint=ckpt, out_dir=Path(args.out), per_class=args.per_class, seed=args.seed,
                           batch_size=args.batch_size, steps=args.steps, device=args.device)
    synthesize_cohort(req, privacy=privacy, progress=_say)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from server.synthesis import verify_cohort

    problems = verify_cohort(Path(args.cohort))
    for p in problems:
        _say(f"FAIL {p}")
    _say("cohort intact: every file matches the manifest" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


def cmd_pki(args: argparse.Namespace) -> int:
    from server.pki import make_pki

    paths = make_pki(Path(args.out), args.nodes)
    _say(f"PKI written to {args.out}: {paths}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from server.demo import DemoOptions, run_demo

    opts = DemoOptions(out=Path(args.out), preset=args.preset, rounds=args.rounds, subjects=args.subjects,
                       insecure=args.insecure, epsilon=args.epsilon)
    return run_demo(opts, progress=_say)


def cmd_audit(args: argparse.Namespace) -> int:
    from server.demo import run_demo_audit

    return run_demo_audit(Path(args.demo), insecure=args.insecure, progress=_say)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsynth", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole pipeline on loopback with phantom hospitals")
    d.add_argument("--out", default="fedsynth-demo")
    d.add_argument("--preset", default="small")
    d.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the preset's demo plan)")
    d.add_argument("--subjects", type=int, default=None, help="patients per phantom site")
    d.add_argument("--epsilon", type=float, default=10.0, help="each site's privacy budget")
    d.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (debugging only)")
    d.set_defaults(fn=cmd_demo)

    ph = sub.add_parser("phantoms", help="write physics-phantom hospitals (NIfTI + labels.csv)")
    ph.add_argument("--sites", type=int, default=3)
    ph.add_argument("--subjects", type=int, default=24)
    ph.add_argument("--out", required=True)
    ph.add_argument("--dims", type=int, choices=(2, 3), default=2)
    ph.add_argument("--size", type=int, default=64)
    ph.add_argument("--seed", type=int, default=0)
    ph.set_defaults(fn=cmd_phantoms)

    site = sub.add_parser("site", help="site data tools")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    chk = site_sub.add_parser("check", help="report counts, shapes, spacing, class balance and problems")
    chk.add_argument("dir")
    chk.add_argument("--preset", default="small")
    chk.add_argument("--json", action="store_true")
    chk.set_defaults(fn=cmd_site_check)

    sy = sub.add_parser("synthesize", help="sample a synthetic cohort from a checkpoint")
    sy.add_argument("--checkpoint", required=True)
    sy.add_argument("--per-class", type=int, default=8)
    sy.add_argument("--out", required=True)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the preset's)")
    sy.add_argument("--batch-size", type=int, default=32)
    sy.add_argument("--device", default="auto")
    sy.set_defaults(fn=cmd_synthesize)

    v = sub.add_parser("verify", help="verify a cohort's files against its manifest")
    v.add_argument("cohort")
    v.set_defaults(fn=cmd_verify)

    a = sub.add_parser("audit", help="re-run the federated privacy audit on a demo's cohort (sites compute locally)")
    a.add_argument("--demo", required=True, help="the demo's --out folder")
    a.add_argument("--insecure", action="store_true")
    a.set_defaults(fn=cmd_audit)

    k = sub.add_parser("pki", help="make a CA, a SuperLink certificate and SuperNode auth keys")
    k.add_argument("--out", required=True)
    k.add_argument("--nodes", type=int, default=3)
    k.set_defaults(fn=cmd_pki)
    return p


def main(argv: list[str] | None = None) -> int:
    ensure_fedsynth_packages()
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        _say(f"error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
