"""fedsynth's packages have generic names (common, server, ...): a foreign one must be caught loudly."""

import subprocess
import sys

import common


def test_our_packages_pass_the_guard():
    common.ensure_fedsynth_packages()


def test_foreign_common_package_is_refused(tmp_path):
    fake = tmp_path / "common"
    fake.mkdir()
    (fake / "__init__.py").write_text("FOREIGN = True\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\nfrom server.cli import main\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "shadow" in proc.stderr or "cannot import name" in proc.stderr


def test_tests_and_deploy_are_not_installed_packages():
    import importlib.metadata as md

    files = md.files("fedsynth") or []
    tops = {str(f).split("/")[0] for f in files if str(f).endswith(".py")}
    assert not {"tests", "deploy", "bench"} & tops
