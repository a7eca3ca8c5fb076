"""What the command line prints: `site check` prints its report and nothing else; -v/-q are accepted anywhere."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from common.config import model_config
from common.phantoms import make_phantom_sites
from common.site import check_site
from server.cli import add_global_flags, build_parser

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_site_check_on_a_clean_folder_prints_its_report_and_nothing_else(tmp_path):
    site = make_phantom_sites(tmp_path, n_sites=1, n_subjects=4, size=64, seed=0)[0]
    # DICOM too: MONAI's reader warning used to follow the report once per DICOM file
    dcm = Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm"
    shutil.copy(dcm, site / "images" / "p99.dcm")
    with open(site / "labels.csv", "a") as f:
        f.write("p99,healthy,site0\n")
    cfg = model_config("small")
    report = check_site(
        site, class_names=cfg.class_names, spatial_dims=2, image_size=cfg.image_size
    )
    assert report.usable_subjects == 5 and not report.problems  # a clean folder

    proc = _cli("site", "check", str(site))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == report.to_text() + "\n"
    assert proc.stderr == ""


def test_verbosity_flags_before_or_after_the_command():
    parser = build_parser()
    add_global_flags(parser)
    assert parser.parse_args(["-v", "site", "check", "x"]).verbose
    assert parser.parse_args(["site", "check", "x", "-q"]).quiet
    args = parser.parse_args(["demo"])
    assert not args.verbose and not args.quiet
    assert _cli("-v", "-q", "verify", "x").returncode == 2  # they exclude each other
