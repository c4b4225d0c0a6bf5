"""Which build of the CPU kernels this machine runs.

On x86-64, ``setup.py`` builds the same C++ sources once per instruction-set
variant, each a complete extension module: ``_C_avx512`` (``-march=x86-64-v4``),
``_C_avx2`` (``x86-64-v3``) and ``_C_base`` (``x86-64-v2``). Importing sparsekern
loads exactly one, the best this CPU's flags allow, so one wheel runs everywhere
at the speed of a build for that CPU class, and the choice costs nothing per call
(the ops are registered once, by the module that was loaded). A build made with
``SPARSEKERN_CPU_ARCH`` (e.g. ``native``) is a single module ``_C`` and is used as is.

``SPARSEKERN_CPU_ISA=avx2`` (or ``base``, ``avx512``) asks for a variant, for
example to compare variants or to run under valgrind on an AVX-512 machine; a
variant the CPU cannot run, or that is not built, is refused with a warning that
says why, and the best runnable one is used instead.
"""
from __future__ import annotations

import os
import platform

# Best first. The flags are /proc/cpuinfo's names for what each -march level needs
# (GCC's x86-64 micro-architecture levels; "abm" is LZCNT).
_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_V3 = _V2 + ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_V4 = _V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
VARIANTS = {"avx512": ("x86-64-v4", _V4), "avx2": ("x86-64-v3", _V3), "base": ("x86-64-v2", _V2)}
SINGLE = "_C"          # the module of a one-arch (SPARSEKERN_CPU_ARCH) or non-x86 build
REQUEST_ENV = "SPARSEKERN_CPU_ISA"


def module_name(variant: str | None) -> str:
    """``sparsekern._C_<variant>``, or ``sparsekern._C`` for the single build (None)."""
    return f"sparsekern.{SINGLE}" if variant is None else f"sparsekern.{SINGLE}_{variant}"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _torch_flags() -> set[str]:
    """A conservative flag set from torch's own CPU capability, where /proc/cpuinfo is missing."""
    import torch
    cap = torch.backends.cpu.get_cpu_capability()
    return set({"AVX512": _V4, "AVX2": _V3}.get(cap, ()))


def missing_flags(variant: str, flags: set[str]) -> list[str]:
    """The flags ``variant`` needs that ``flags`` lacks (empty: it runs here)."""
    return [f for f in VARIANTS[variant][1] if f not in flags]


def choose(built: list[str | None], flags: set[str], requested: str | None = None):
    """(variant or None for the single build, notes): what to load from ``built``.

    ``built`` lists the variants present (None stands for the single ``_C`` build);
    ``requested`` is ``SPARSEKERN_CPU_ISA``'s value. Returns (False, notes) when no
    built variant can run on this CPU. Each note is a sentence for a warning.
    """
    notes = []
    if None in built:
        if requested:
            notes.append(f"{REQUEST_ENV}={requested} ignored: this is a single "
                         f"SPARSEKERN_CPU_ARCH build (sparsekern._C)")
        return None, notes
    if requested:
        if requested not in VARIANTS:
            notes.append(f"{REQUEST_ENV}={requested} is not a variant; choose from {tuple(VARIANTS)}")
        elif requested not in built:
            notes.append(f"{REQUEST_ENV}={requested}: that variant is not built (built: {built})")
        elif missing_flags(requested, flags):
            notes.append(f"{REQUEST_ENV}={requested}: this CPU lacks "
                         f"{', '.join(missing_flags(requested, flags))}")
        else:
            return requested, notes
    for v in VARIANTS:
        if v in built and not missing_flags(v, flags):
            return v, notes
    notes.append(f"no built CPU kernel variant runs on this CPU (built: {built}; "
                 f"x86-64-v2 needs {', '.join(_V2)})")
    return False, notes


def select(available) -> tuple[str | None | bool, list[str]]:
    """What to load, given ``available(module_name) -> bool`` (see :func:`choose`)."""
    built = [v for v in (None, *VARIANTS) if available(module_name(v))]
    if not built:
        return False, []
    flags = cpu_flags()
    if flags is None:
        flags = _torch_flags() if platform.machine().lower() in ("x86_64", "amd64") else set()
    return choose(built, flags, os.environ.get(REQUEST_ENV) or None)


def best_here() -> str:
    """The best variant this machine runs (``base`` when none of the others)."""
    flags = cpu_flags()
    if flags is None:
        flags = _torch_flags()
    return next((v for v in VARIANTS if not missing_flags(v, flags)), "base")


def describe(variant: str | None) -> str:
    """e.g. ``"avx2 (sparsekern._C_avx2, -march=x86-64-v3)"``."""
    if variant is None:
        return "single build (sparsekern._C, -march from SPARSEKERN_CPU_ARCH at build time)"
    return f"{variant} ({module_name(variant)}, -march={VARIANTS[variant][0]})"
