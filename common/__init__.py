"""Shared building blocks: config, phantoms, site data, model, file I/O. Imports nothing else of ours."""

from pathlib import Path

FEDSYNTH_PACKAGE = "common"
_ROOT = Path(__file__).resolve().parent.parent


def ensure_fedsynth_packages() -> None:
    """Fail loudly if another distribution's `common`, `client`, `server` or `privacy` shadows fedsynth's.

    Those names are generic; a foreign one earlier on sys.path would otherwise fail much later and obscurely.
    """
    import importlib

    for name in ("common", "client", "server", "privacy"):
        mod = importlib.import_module(name)
        origin = Path(getattr(mod, "__file__", "") or "").resolve().parent.parent
        if getattr(mod, "FEDSYNTH_PACKAGE", None) != name or origin != _ROOT:
            raise ImportError(
                f"package {name!r} was imported from {getattr(mod, '__file__', '?')}, which is not fedsynth's "
                f"(expected it under {_ROOT}); another installed package named {name!r} shadows fedsynth. "
                "Use a separate virtual environment or remove the other package."
            )
