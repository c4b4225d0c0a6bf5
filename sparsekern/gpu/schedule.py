"""Per-topology GPU metadata, built with device-side torch ops and cached.

* :func:`validated` runs :func:`sparsekern.formats.check_structure` on a
  topology once per version, so the kernels only ever see a validated structure
  (the CPU launcher checks every call in C++; on the GPU the check is cached).
* :func:`csr_schedule` is the row-length schedule of the CSR SpMM kernel
  (segments of at most ``seg_cap`` entries, sorted by length, longest first).
* :func:`row_order` orders BSR block rows by length, longest first.
* :func:`row_ids` gives each stored entry its row (for the SDDMM kernels), cached.

Everything is built with sort, cumsum, searchsorted and index arithmetic on the
structure's own device; a schedule reads two scalars back to the host (the
longest row and the segment count), once per topology version, never one per
nonzero.

Cache: keyed weakly by the offsets tensor's identity and stamped with every
input tensor's ``(data_ptr, _version, numel)``. The DST engine rewrites a
topology in place (``copy_``), which bumps ``_version``, so a rebuilt topology
is re-validated and re-scheduled on its next use; a tensor that is freed drops
its entries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparsekern import formats
from sparsekern.ops.backends import block_size_of

_CACHE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _stamp(tensors) -> tuple:
    return tuple((t.data_ptr(), t._version, t.numel(), tuple(t.shape)) for t in tensors)


def _cached(anchor: torch.Tensor, key, tensors, build):
    entries = _CACHE.get(anchor)
    if entries is None:
        entries = {}
        _CACHE[anchor] = entries
    stamp = _stamp(tensors)
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    obj = build()
    entries[key] = (stamp, obj)
    return obj


def clear_cache() -> None:
    """Forget every cached schedule and validation (they rebuild on next use)."""
    _CACHE.clear()


def validated(values, row_offsets, col_indices, t_offsets, t_indices, t_perm) -> None:
    """Raise ``ValueError``/``TypeError`` naming the field if the topology is malformed.

    The structure checks run once per version of the index tensors (cached).
    """
    b = block_size_of(values)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    tensors = (values, row_offsets, col_indices, t_offsets, t_indices, t_perm)

    def check():
        formats.check_structure((R * b, C * b), b, values, row_offsets, col_indices,
                                t_offsets, t_indices, t_perm)
        return True

    # values' version changes every optimizer step; only its shape matters here.
    _cached(row_offsets, ("valid", b, tuple(values.shape), values.dtype, values.device),
            tensors[1:], check)


def mark_validated(values, row_offsets, col_indices, t_offsets, t_indices, t_perm) -> None:
    """Record a topology as valid at its current version without checking it.

    Only for structures built by sparsekern itself from a validated one (the DST
    rebuild, :func:`sparsekern.dst.rebuild.update_topology`, checks the grown
    positions and derives everything else), so a GPU rebuild is not followed by
    a full re-validation on the next call.
    """
    b = block_size_of(values)
    _cached(row_offsets, ("valid", b, tuple(values.shape), values.dtype, values.device),
            (row_offsets, col_indices, t_offsets, t_indices, t_perm), lambda: True)


@dataclass(frozen=True)
class CSRSchedule:
    """Segments of a CSR structure, sorted by length (longest first), padded to ``block_r``.

    seg_row, seg_start, seg_len: int32 [n_groups * block_r]; padding has row -1, length 0.
    split: True when some row was cut into several segments (the kernel then
    accumulates with atomics into an fp32 buffer).
    """

    seg_row: torch.Tensor
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    n_groups: int
    block_r: int
    seg_cap: int
    split: bool


def _build_csr_schedule(offsets: torch.Tensor, seg_cap: int, block_r: int) -> CSRSchedule:
    dev = offsets.device
    ro = offsets.long()
    R = ro.numel() - 1
    lens = ro[1:] - ro[:-1]
    max_len = int(lens.max()) if R else 0                  # host read 1
    nseg = torch.clamp((lens + seg_cap - 1) // seg_cap, min=1)  # an empty row keeps one empty segment
    ends = torch.cumsum(nseg, 0)
    S = int(ends[-1]) if R else 0                          # host read 2
    s = torch.arange(S, device=dev)
    row = torch.searchsorted(ends, s, right=True)
    first = ends[row] - nseg[row]
    start = ro[row] + (s - first) * seg_cap
    length = torch.clamp(torch.minimum(ro[row + 1] - start, torch.full_like(start, seg_cap)), min=0)
    order = torch.argsort(length, descending=True, stable=True)
    n_groups = -(-S // block_r)
    padded = n_groups * block_r

    def pad(t, fill):
        out = torch.full((padded,), fill, dtype=torch.int32, device=dev)
        out[:S] = t[order].to(torch.int32)
        return out

    return CSRSchedule(pad(row, -1), pad(start, 0), pad(length, 0), n_groups, block_r, seg_cap,
                       max_len > seg_cap)


def csr_schedule(offsets: torch.Tensor, indices: torch.Tensor, seg_cap: int, block_r: int) -> CSRSchedule:
    """The (cached) :class:`CSRSchedule` of the CSR structure ``(offsets, indices)``."""
    return _cached(offsets, ("csr", seg_cap, block_r), (offsets, indices),
                   lambda: _build_csr_schedule(offsets, seg_cap, block_r))


def row_order(offsets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int32 [R]: rows ordered by length, longest first (stable), cached."""
    def build():
        lens = offsets[1:] - offsets[:-1]
        return torch.argsort(lens, descending=True, stable=True).to(torch.int32)

    return _cached(offsets, ("order",), (offsets, indices), build)


def row_ids(offsets: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int32 [nnz]: the row of every stored entry (:func:`sparsekern.formats.row_ids`), cached."""
    return _cached(offsets, ("rows",), (offsets, indices),
                   lambda: formats.row_ids(offsets, indices.numel()).to(torch.int32))


def mean_row_length(offsets: torch.Tensor, nnz: int) -> float:
    rows = offsets.numel() - 1
    return nnz / rows if rows else 0.0


def block_density(values: torch.Tensor, rows: int, cols: int) -> float:
    """Fraction of the rows x cols (block) positions stored: values [nnz] or [nnz, b, b] (0 when empty)."""
    cells = rows * cols
    return values.shape[0] / cells if cells else 0.0


__all__ = ["CSRSchedule", "csr_schedule", "row_order", "row_ids", "validated", "mark_validated", "clear_cache",
           "mean_row_length", "block_density"]
