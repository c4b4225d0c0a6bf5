"""Optional dependencies: import one, or say in one line which extra installs it."""
from __future__ import annotations

import importlib


class MissingDependency(ImportError):
    """An optional package is not installed; the message names the extra that brings it."""


def require(module: str, purpose: str, extra: str, alternative: str | None = None):
    """Import ``module`` or raise :class:`MissingDependency`:
    "<purpose> needs <module>: pip install 'sparsekern[<extra>]'[ (or <alternative>)]"."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = f"pip install 'sparsekern[{extra}]'" + (f" (or {alternative})" if alternative else "")
        raise MissingDependency(f"{purpose} needs {module.split('.')[0]}: {hint}") from None
