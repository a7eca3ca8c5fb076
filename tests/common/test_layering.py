"""The layering rule, read from the imports of every module: common/ imports nothing of ours, privacy/ only
common/, client/ and server/ use both and never each other. Imports inside functions count too: a lazy import
still couples the packages."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("common", "privacy", "client", "server")
ALLOWED = {
    "common": {"common"},
    "privacy": {"common", "privacy"},
    "client": {"common", "privacy", "client"},
    "server": {"common", "privacy", "server"},
}


def fedsynth_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of one of our packages in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in OURS]
    return out


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target in fedsynth_imports(path):
            if target not in ALLOWED[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return bad


@pytest.mark.parametrize("package", OURS)
def test_package_imports_only_what_its_layer_allows(package):
    assert violations(package) == []


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The check is not vacuous: a privacy/ module importing client/ is found, lazy imports included."""
    (tmp_path / "privacy").mkdir()
    (tmp_path / "privacy" / "leak.py").write_text("def f():\n    from client.task import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("privacy") == ["privacy/leak.py:2 imports client"]
