"""Superposing sparse subnetworks at the sparse level (Sup-tickets' merge).

:func:`merge_topologies` takes several tickets of one layer, each a sorted CSR/BSR
structure with its values, forms the union of their positions with the weighted
sum of their values (a position absent from a ticket counts as 0), and keeps the
``nnz`` largest by magnitude (the L2 norm of the block for BSR). It works on the
sorted index arrays (concatenate, stable sort, segment-sum, top-k): no dense
weight matrix is ever built.

Tie rule (documented, and the test's dense reference follows it): among equal
magnitudes the lower linear position (row-major, in block coordinates) is kept;
a union member whose merged value is exactly 0 is still a member and is kept
before any position outside the union.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsekern.dst.selection import top_k_stable
from sparsekern.formats import count_per_index, row_ids
from sparsekern.nn import SparseConv2d, SparseLinear


def merge_topologies(parts, weights, nnz: int, n_cols: int):
    """The union of ``parts`` with weighted values, pruned to the ``nnz`` largest.

    Args:
        parts: sequence of ``(row_offsets int32 [R+1], col_indices int32 [n_i], values [n_i] or
            [n_i, b, b])``, all of one layer (same R, block size, dtype).
        weights: one float per part (CAA: 1/(k+1) and k/(k+1); CIMA: 0.5 and 0.5).
        nnz: (block) entries to keep; at most the size of the union.
        n_cols: C, columns in block units.

    Returns:
        ``(row_offsets int32 [R+1], col_indices int32 [nnz], values [nnz, ...])``, sorted.
    """
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"{len(parts)} parts but {len(weights)} weights; need one weight per part")
    R = parts[0][0].numel() - 1
    lin, vals = [], []
    for ro, ci, v in parts:
        if ro.numel() - 1 != R:
            raise ValueError(f"parts have different row counts ({ro.numel() - 1} vs {R})")
        lin.append(row_ids(ro, ci.numel()) * n_cols + ci.long())
    lin = torch.cat(lin)
    vals = torch.cat([v.detach() * w for (_, _, v), w in zip(parts, weights)])
    lin, order = torch.sort(lin, stable=True)
    uniq, inv = torch.unique_consecutive(lin, return_inverse=True)
    summed = torch.zeros((uniq.numel(),) + tuple(vals.shape[1:]), dtype=vals.dtype, device=vals.device)
    summed.index_add_(0, inv, vals[order])
    if nnz > uniq.numel():
        raise ValueError(f"the union has {uniq.numel()} positions, fewer than nnz={nnz}")
    magnitude = summed.abs() if summed.dim() == 1 else summed.reshape(uniq.numel(), -1).norm(dim=1)
    keep = top_k_stable(magnitude.double(), nnz)                   # ascending: sorted output
    pos = uniq[keep]
    offsets = torch.zeros(R + 1, dtype=torch.int32, device=pos.device)
    offsets[1:] = torch.cumsum(count_per_index(pos // n_cols, R), 0)
    return offsets, (pos % n_cols).to(torch.int32), summed[keep]


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}


@torch.no_grad()
def superpose(running: nn.Module, ticket: nn.Module, w_running: float, w_ticket: float) -> None:
    """running <- w_running * running + w_ticket * ticket, in place, at the sparse level.

    Every sparse layer is merged with :func:`merge_topologies` and pruned back to its own
    nnz (so the budget is exact); every other parameter and floating buffer (biases,
    BatchNorm affine and statistics, dense layers) is averaged with the same weights.
    The two models must have the same architecture (a ``copy.deepcopy`` of each other).
    """
    rl, tl = sparse_layers(running), sparse_layers(ticket)
    if set(rl) != set(tl):
        raise ValueError(f"models differ in sparse layers: {sorted(set(rl) ^ set(tl))}")
    for name, m in rl.items():
        a, b = m.topology, tl[name].topology
        if a.shape != b.shape or a.block_size != b.block_size:
            raise ValueError(f"layer {name!r}: {a.shape}/b={a.block_size} vs {b.shape}/b={b.block_size}")
        C = a.shape[1] // a.block_size
        merged = merge_topologies([(a.row_offsets, a.col_indices, a.values), (b.row_offsets, b.col_indices, b.values)],
                                  [w_running, w_ticket], a.values.shape[0], C)
        a.assign_(*merged)
    sparse_params = {id(m.topology.values) for m in rl.values()}
    t_params = dict(ticket.named_parameters())
    for n, p in running.named_parameters():
        if id(p) not in sparse_params:
            p.mul_(w_running).add_(t_params[n].detach(), alpha=w_ticket)
    t_bufs = dict(ticket.named_buffers())
    for n, buf in running.named_buffers():
        if buf.is_floating_point():     # index buffers are integer and were merged above
            buf.mul_(w_running).add_(t_bufs[n], alpha=w_ticket)
