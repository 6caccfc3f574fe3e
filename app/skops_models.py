"""scikit-learn models saved with skops (model.skops): loaded without
unpickling, trusting only the types their publisher listed.

skops rebuilds an object from a description of its parts and refuses any type
it was not told to trust, beyond its own safe defaults (plain containers,
numpy arrays, scikit-learn estimators). A file may list more, as MLflow 3
does in MLmodel (`skops_trusted_types`, e.g. sklearn.tree._tree.Tree for a
forest). Those are trusted only when they come from scikit-learn, numpy or
scipy: a type from anywhere else could run code as it is rebuilt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from app.errors import InvalidModel

TRUSTABLE_MODULES = ("sklearn.", "numpy.", "scipy.")


def check_trusted(types: Any) -> list[str]:
    """The listed types as a list, or InvalidModel naming one that may not be trusted."""
    if types is None:
        return []
    if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
        raise InvalidModel(f"trusted types must be a list of type names, got {str(types)[:100]!r}")
    for name in types:
        if not name.startswith(TRUSTABLE_MODULES):
            raise InvalidModel(f"skops type {name[:100]!r} is not trusted: only types from scikit-learn, "
                               "numpy and scipy can be")
    return list(types)


def load_skops(path: Path, trusted: Any = None) -> Any:
    """The estimator in a .skops file; InvalidModel when it holds a type that
    is neither one of skops' defaults nor listed in trusted."""
    import skops.io

    allowed = check_trusted(trusted)
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as exc:  # a damaged file raises whatever its zip or JSON parser raises
        raise InvalidModel(f"{Path(path).name} is not a readable skops file ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None
    missing = sorted(set(untrusted) - set(allowed))
    if missing:
        raise InvalidModel(f"{Path(path).name} holds types that are not trusted: {', '.join(missing)}; "
                           "list them as trusted types if you trust where the file came from")
    try:
        return skops.io.load(path, trusted=allowed or None)
    except Exception as exc:
        raise InvalidModel(f"{Path(path).name} could not be loaded with skops ({type(exc).__name__}: "
                           f"{str(exc).strip()[:200]})") from None


def untrusted_types(path: Path) -> list[str]:
    """The types in a .skops file that skops does not trust by default."""
    import skops.io

    return sorted(skops.io.get_untrusted_types(file=path))
