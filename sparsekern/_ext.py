"""Loading of the compiled extension ``sparsekern._C``.

Importing sparsekern never fails because the extension is missing: it warns
once, the ops stay defined (and traceable), and calling a compiled kernel then
raises :class:`ExtensionNotBuiltError` saying how to build it.
"""
from __future__ import annotations

import importlib
import warnings

BUILD_HINT = (
    "build it from the repository root with `bash scripts/setup.sh` "
    "(or, with torch already installed, `pip install --no-build-isolation -e .`)"
)


class ExtensionNotBuiltError(RuntimeError):
    """A compiled sparsekern kernel was called but ``sparsekern._C`` is not built."""


_module = None
_import_error: Exception | None = None


def load() -> bool:
    """Import ``sparsekern._C`` once (registering its kernels); True if present."""
    global _module, _import_error
    if _module is not None or _import_error is not None:
        return _module is not None
    try:
        _module = importlib.import_module("sparsekern._C")
    except ImportError as exc:  # missing or built against another torch
        _import_error = exc
        warnings.warn(
            f"sparsekern's compiled kernels are unavailable ({exc}); only "
            f"backend='reference' will run. To use the kernels, {BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module is not None


def available() -> bool:
    """True when the compiled extension was imported."""
    return load()


def missing_reason() -> str | None:
    """Why the extension is unavailable, or None when it is loaded."""
    return None if load() else f"sparsekern._C is not built ({_import_error})"


def raise_not_built(op: str):
    raise ExtensionNotBuiltError(
        f"sparsekern::{op} needs the compiled extension, which is not built "
        f"({_import_error}); {BUILD_HINT}."
    )
