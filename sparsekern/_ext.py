"""Loading of the compiled extensions: the CPU kernels (one module among the
per-ISA variants, chosen by :mod:`sparsekern._cpu_isa`) and, in a CUDA build,
``sparsekern._C_cuda``.

Importing sparsekern never fails because the extension is missing: it warns
once, the ops stay defined (and traceable), and calling a compiled kernel then
raises :class:`ExtensionNotBuiltError` saying how to build it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

from sparsekern import _cpu_isa

BUILD_HINT = (
    "build it from the repository root with `bash scripts/setup.sh` "
    "(or, with torch already installed, `pip install --no-build-isolation -e .`)"
)


class ExtensionNotBuiltError(RuntimeError):
    """A compiled sparsekern kernel was called but no compiled CPU kernel module is built."""


_module = None
_variant: str | None = None
_import_error: Exception | None = None
_cuda_error: Exception | None = None


_HERE = os.path.dirname(os.path.abspath(__file__))


def _built(name: str) -> bool:
    """Whether module ``name`` is built *in this package's directory*: an editable install
    can put another checkout's directory on ``sparsekern.__path__``, and its modules are
    not this tree's build."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and os.path.dirname(os.path.abspath(spec.origin or "")) == _HERE


def _import_cpu():
    """Import the CPU kernel module this CPU runs best; returns (module, variant)."""
    variant, notes = _cpu_isa.select(_built)
    for note in notes:
        warnings.warn(f"sparsekern: {note}", RuntimeWarning, stacklevel=4)
    if variant is False:
        raise ImportError(notes[-1] if notes else "no compiled CPU kernel module (sparsekern._C*) is built")
    return importlib.import_module(_cpu_isa.module_name(variant)), variant


def load() -> bool:
    """Import the compiled kernels once (registering them); True if the CPU kernels are present."""
    global _module, _variant, _import_error, _cuda_error
    if _module is not None or _import_error is not None:
        return _module is not None
    if _built("sparsekern._C_cuda"):
        try:
            importlib.import_module("sparsekern._C_cuda")
        except ImportError as exc:
            _cuda_error = exc
            warnings.warn(f"sparsekern's CUDA C++ kernels did not load ({exc}); CUDA runs Triton.",
                          RuntimeWarning, stacklevel=3)
    try:
        _module, _variant = _import_cpu()
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


def cpu_variant() -> str | None:
    """Which CPU kernel build runs, e.g. ``"avx2 (sparsekern._C_avx2, -march=x86-64-v3)"``;
    None when none is loaded."""
    return _cpu_isa.describe(_variant) if load() else None


def cpu_bf16_dot_supported() -> bool:
    """Whether the bf16 CPU linear kernels take the AVX512-BF16 path (``vdpbf16ps``) on
    this CPU: the loaded build has it and the CPU reports avx512_bf16. Setting
    ``SPARSEKERN_CPU_BF16_DOT=0`` makes them widen bf16 to fp32 instead (read per call)."""
    return bool(load() and getattr(_module, "bf16_dot_supported", lambda: False)())


def missing_reason() -> str | None:
    """Why the extension is unavailable, or None when it is loaded."""
    return None if load() else f"sparsekern's CPU kernels are not built ({_import_error})"


def raise_not_built(op: str):
    raise ExtensionNotBuiltError(
        f"sparsekern::{op} needs the compiled extension, which is not built "
        f"({_import_error}); {BUILD_HINT}."
    )
