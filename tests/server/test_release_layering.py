"""The release side (server/release/) uses only common/, privacy/ and itself, plus one named exception: building a
release reads and redraws the cohort through its format's owner, server/synthesis.py (imported inside the build
functions, so verifying and pulling never load it)."""

import ast
from pathlib import Path

RELEASE = Path(__file__).resolve().parents[2] / "server" / "release"
ALLOWED = ("common", "privacy", "server.release")
EXCEPTIONS = {
    ("manifest.py", "server.synthesis")
}  # the cohort format's owner, used only by build_release


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module, at top level) of every fedsynth import in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
    return [(m, t) for m, t in out if m.split(".")[0] in ("common", "privacy", "server", "client")]


def test_the_release_package_depends_only_on_common_privacy_and_itself():
    bad = []
    for path in sorted(RELEASE.glob("*.py")):
        for module, top in imports(path):
            ok = module == "common" or module.startswith(tuple(f"{a}." for a in ALLOWED))
            ok = ok or module in ("privacy", "server.release")
            if not ok and not ((path.name, module) in EXCEPTIONS and not top):
                bad.append(f"{path.name}: {module}{' (top level)' if top else ''}")
    assert bad == []
