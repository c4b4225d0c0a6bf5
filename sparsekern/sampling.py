"""Uniform draws of distinct positions without a dense mask: O(k + occupied) memory.

:func:`sample_distinct` is the one rejection sampler: the random topology of a new sparse
layer (:func:`random_structure`, uniform or at an ERK count) and SET's random growth
(:func:`sparsekern.dst.selection.sample_free`) both use it. Occupied positions are a
sorted int64 set and membership is a ``searchsorted``, so nothing of size ``n`` (the
number of positions) is ever allocated, except by :func:`random_structure` when more
than half of the positions are drawn (it then draws the complement, and ``n`` is at most
twice the count).
"""
from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1


def is_member(sorted_set: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bool like ``x``: which entries of int64 ``x`` are in the ascending int64 ``sorted_set``."""
    if sorted_set.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    at = torch.searchsorted(sorted_set, x).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[at] == x


def merge_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ascending union of two ascending int64 sets with no common entry, O(len(a) + len(b))
    memory (``b`` is placed by ``searchsorted`` into ``a``; no sort of the whole)."""
    if b.numel() == 0:
        return a
    if a.numel() == 0:
        return b
    return merge_sorted_slots(a, b)[0]


def merge_sorted_slots(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_sorted`'s union ``out`` and ``from_a`` (bool like ``out``: which slots hold
    ``a``'s entries, in ``a``'s order; the others hold ``b``'s), for moving data with them."""
    at = torch.searchsorted(a, b) + torch.arange(b.numel(), device=b.device)
    out = torch.empty(a.numel() + b.numel(), dtype=a.dtype, device=a.device)
    from_a = torch.ones(out.numel(), dtype=torch.bool, device=a.device)
    from_a[at] = False
    out[at] = b
    out[from_a] = a
    return out, from_a


def sample_distinct(n: int, k: int, generator: torch.Generator, occupied: torch.Tensor | None = None,
                    device=None) -> torch.Tensor:
    """k distinct int64 positions drawn uniformly from [0, n) outside ``occupied``, in draw order.

    Args:
        n: number of positions.
        k: positions to draw (>= 0).
        generator: a CPU ``torch.Generator`` (None: torch's global one); the draws are made on
            the CPU and then moved, so a seed gives the same positions on every device.
        occupied: optional ascending int64 [m] positions that may not be drawn.
        device: where the result lives (default: ``occupied``'s device, else the CPU).

    Rejection sampling in draw order (cheap while most positions are free): each round draws
    ``max(2 * need, 64)`` positions, keeps the first occurrence of each one that is free, and
    blocks them. Raises ``ValueError`` when fewer than k positions are free.
    """
    device = torch.device(device) if device is not None else (
        occupied.device if occupied is not None else torch.device("cpu"))
    blocked = (torch.empty(0, dtype=torch.int64, device=device) if occupied is None
               else occupied.to(device=device, dtype=torch.int64))
    if n - blocked.numel() < k:
        raise ValueError(f"only {n - blocked.numel()} free positions for {k} growths")
    out = []
    need = k
    while need > 0:
        draw = torch.randint(n, (max(2 * need, 64),), generator=generator).to(device)
        draw = draw[~is_member(blocked, draw)]
        uniq, inv = torch.unique(draw, return_inverse=True)
        first = torch.full((uniq.numel(),), draw.numel(), dtype=torch.int64, device=device)
        first.scatter_reduce_(0, inv, torch.arange(draw.numel(), device=device), "amin")
        take = draw[torch.sort(first).values][:need]
        blocked = merge_sorted(blocked, torch.sort(take).values)
        out.append(take)
        need -= take.numel()
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=device)


def random_structure(rows: int, cols: int, count: int, generator: torch.Generator | None = None):
    """A uniformly random CSR structure with exactly ``count`` of the rows x cols positions.

    Returns ``(row_offsets int32 [rows + 1], col_indices int32 [count])``, columns sorted within
    each row. Memory O(count) (O(rows * cols) <= O(2 * count) when more than half are kept: the
    free complement is drawn instead). Raises ``ValueError`` when ``count`` is out of
    [0, rows * cols] or too large for int32 indices.
    """
    total = rows * cols
    if not 0 <= count <= total:
        raise ValueError(f"count must be in [0, {total}], got {count}")
    if count > INT32_MAX or cols > INT32_MAX:
        raise ValueError(f"a layer of {rows} x {cols} positions with {count} stored entries is too large "
                         f"for int32 indices (at most {INT32_MAX} entries and columns)")
    if 2 * count <= total:
        pos = torch.sort(sample_distinct(total, count, generator)).values
    else:
        gone = torch.sort(sample_distinct(total, total - count, generator)).values
        keep = torch.ones(total, dtype=torch.bool)
        keep[gone] = False
        pos = torch.nonzero(keep).flatten()
    row_offsets = torch.zeros(rows + 1, dtype=torch.int32)
    if count:
        row_offsets[1:] = torch.cumsum(torch.zeros(rows, dtype=torch.int64).index_add_(
            0, pos // cols, torch.ones_like(pos)), 0)
    return row_offsets, (pos % cols).to(torch.int32)
