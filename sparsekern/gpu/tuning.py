"""Launch parameters of the Triton kernels, table-driven.

A lookup is keyed by ``(op, block_size, density bucket, dtype)``; the batch
size picks the SDDMM split. Lookup order: the exact key, then the key with any
density (``None``), then :func:`_heuristic`. Any shape runs: the table only
changes speed, never results.

**Status of the numbers:** no GPU has been lent to this project's sessions yet,
so every entry below is a starting point derived from the Triton matmul
tutorial's H100 configs and the tile sizes in the anchors (stk, PyTorch's BSR
kernels), not a measured optimum. ``benchmarks/bench_gpu.py --tune`` sweeps the
candidates of :data:`CANDIDATES` on a GPU (:func:`sweep`) and prints the rows to
paste here (:func:`table_row`); ``--tune --interpret`` runs the same plumbing on
CPU tensors at a tiny size (tests/test_bench_gpu.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

DENSITY_BUCKETS = (0.5, 0.2, 0.1, 0.05, 0.02)
_DT = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


@dataclass(frozen=True)
class LaunchConfig:
    """BLOCK_M batch rows per program; BLOCK_R (CSR SpMM) segments per program;
    BLOCK_NZ (CSR SDDMM) nonzeros per program; seg_mult: CSR segment cap as a multiple
    of the mean row length; num_warps/num_stages as in ``triton.Config``; transpose_dense (CSR):
    hand the kernels feature-major copies of the dense operands (coalesced gathers)."""

    block_m: int = 64
    block_r: int = 32
    block_nz: int = 64
    seg_mult: float = 2.0
    num_warps: int = 4
    num_stages: int = 3
    transpose_dense: bool = False   # CSR: read the dense operands feature-major (a transposed copy)


def density_bucket(density: float) -> float:
    """The bucket of DENSITY_BUCKETS nearest to ``density`` in log scale."""
    d = min(max(density, 1e-6), 1.0)
    return min(DENSITY_BUCKETS, key=lambda b: abs(math.log(d / b)))


# (op, block_size, density bucket or None, dtype) -> LaunchConfig. op is
# "spmm" (forward and dX, same kernel) or "sddmm". block_size 1 is CSR.
TABLE: dict[tuple, LaunchConfig] = {}
for _dt in ("f16", "bf16"):
    TABLE[("spmm", 16, None, _dt)] = LaunchConfig(block_m=128, num_warps=4, num_stages=4)
    TABLE[("spmm", 32, None, _dt)] = LaunchConfig(block_m=128, num_warps=4, num_stages=4)
    TABLE[("spmm", 64, None, _dt)] = LaunchConfig(block_m=128, num_warps=8, num_stages=3)
    TABLE[("sddmm", 16, None, _dt)] = LaunchConfig(block_m=128, num_warps=4, num_stages=4)
    TABLE[("sddmm", 32, None, _dt)] = LaunchConfig(block_m=128, num_warps=4, num_stages=4)
    TABLE[("sddmm", 64, None, _dt)] = LaunchConfig(block_m=64, num_warps=8, num_stages=3)
    TABLE[("spmm", 1, None, _dt)] = LaunchConfig(block_m=64, block_r=32, num_warps=4, num_stages=2)
    TABLE[("spmm", 1, 0.02, _dt)] = LaunchConfig(block_m=64, block_r=16, num_warps=4, num_stages=2)
    TABLE[("sddmm", 1, None, _dt)] = LaunchConfig(block_m=32, block_nz=128, num_warps=4, num_stages=2)
for _b in (16, 32, 64):
    TABLE[("spmm", _b, None, "f32")] = LaunchConfig(block_m=64, num_warps=4, num_stages=3)
    TABLE[("sddmm", _b, None, "f32")] = LaunchConfig(block_m=64, num_warps=4, num_stages=3)
TABLE[("spmm", 1, None, "f32")] = LaunchConfig(block_m=64, block_r=32, num_warps=4, num_stages=2)
TABLE[("sddmm", 1, None, "f32")] = LaunchConfig(block_m=32, block_nz=128, num_warps=4, num_stages=2)

# What `bench_gpu.py --tune` sweeps.
CANDIDATES = {
    "bsr": [LaunchConfig(block_m=m, num_warps=w, num_stages=s)
            for m in (64, 128) for w in (4, 8) for s in (2, 3, 4)],
    "csr": [LaunchConfig(block_m=m, block_r=r, block_nz=n, num_warps=w, num_stages=2, transpose_dense=t)
            for m in (32, 64, 128) for r in (16, 32) for n in (64, 128) for w in (4, 8) for t in (False, True)],
}


def _heuristic(op: str, block_size: int) -> LaunchConfig:
    if block_size == 1:
        return LaunchConfig()
    return LaunchConfig(block_m=64, num_warps=4 if block_size <= 32 else 8, num_stages=3)


def dtype_key(dtype: torch.dtype) -> str:
    """The dtype field of a :data:`TABLE` key ("f16", "bf16" or "f32")."""
    return _DT.get(dtype, "f32")


def table_key(op: str, block_size: int, density: float, dtype: torch.dtype) -> tuple:
    """The :data:`TABLE` key :func:`lookup` tries first (and the one ``--tune`` prints)."""
    return (op, block_size, density_bucket(density), dtype_key(dtype))


def lookup(op: str, block_size: int, density: float, dtype: torch.dtype, interpret: bool = False) -> LaunchConfig:
    """Launch parameters for ``op`` ("spmm" or "sddmm") on this weight and dtype."""
    cfg = (TABLE.get(table_key(op, block_size, density, dtype))
           or TABLE.get((op, block_size, None, dtype_key(dtype)))
           or _heuristic(op, block_size))
    if interpret:   # the interpreter runs tiles as numpy arrays: small tiles keep CI fast
        cfg = replace(cfg, block_m=16, block_r=min(cfg.block_r, 16), block_nz=min(cfg.block_nz, 32))
    return cfg


def candidates(block_size: int) -> list[LaunchConfig]:
    """What the tuning sweep tries for a weight of ``block_size`` (1: CSR)."""
    return CANDIDATES["csr" if block_size == 1 else "bsr"]


def sweep(time_ms, configs) -> tuple[tuple[LaunchConfig, float] | None, list[tuple[LaunchConfig, str]]]:
    """The fastest of ``configs``: ``((config, ms) or None when none ran, skipped)``.

    ``time_ms(config)`` returns a time in ms, or raises when the config cannot run
    these inputs (a refusal, or a tile the compiler rejects, e.g. Triton's
    ``OutOfResources``): that config is skipped and listed in ``skipped`` with why.
    """
    best, skipped = None, []
    for cfg in configs:
        try:
            ms = time_ms(cfg)
        except Exception as exc:  # noqa: BLE001 - any failing candidate is a result of the sweep
            skipped.append((cfg, f"{type(exc).__name__}: {str(exc).strip()[:160]}"))
            continue
        if best is None or ms < best[1]:
            best = (cfg, ms)
    return best, skipped


def table_row(op: str, block_size: int, density: float, dtype: torch.dtype, best) -> str:
    """The line to paste into this file for a :func:`sweep` result (a comment when none ran)."""
    key = table_key(op, block_size, density, dtype)
    if best is None:
        return f"# TABLE[{key!r}]: no candidate ran"
    cfg, ms = best
    return f"TABLE[{key!r}] = {cfg!r}  # {ms:.3f} ms"


def sddmm_split(M: int, n_items: int, block_m: int, target_programs: int) -> int:
    """Batch splits for an SDDMM with ``n_items`` programs per split: enough programs
    to fill the GPU (``target_programs``), each split at least one BLOCK_M tile."""
    if n_items <= 0 or M <= 0:
        return 1
    tiles = -(-M // block_m)
    want = -(-target_programs // n_items)
    return max(1, min(tiles, want))
