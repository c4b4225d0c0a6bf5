"""Pure-torch reference implementations of every sparsekern op.

Same signatures as the ``torch.ops.sparsekern`` ops. They gather the nonzeros'
operands and scatter-add the products (memory O(M * nnz)), so they are slow but
plainly correct, run on any device and dtype, and are differentiable through
ordinary torch autograd. They are the test oracle and the explicit
``backend="reference"``; nothing falls back to them silently.
"""
from __future__ import annotations

import torch

from sparsekern.formats import row_ids


def _flat(t):
    return t.reshape(-1, t.shape[-1])


def spmm(x_in, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias=None):
    """y [..., R*b] = x [..., C*b] . W^T (+ bias [R*b])."""
    x = _flat(x_in)
    M = x.shape[0]
    R = row_offsets.numel() - 1
    rows, cols = row_ids(row_offsets), col_indices.long()
    if values.dim() == 1:
        y = x.new_zeros(M, R).index_add_(1, rows, x[:, cols] * values)
    else:
        b = values.shape[-1]
        xg = x.reshape(M, -1, b)[:, cols, :]                      # [M, nnz, b]
        contrib = torch.einsum("krc,mkc->mkr", values, xg)        # [M, nnz, b]
        y = x.new_zeros(M, R, b).index_add_(1, rows, contrib).reshape(M, R * b)
    y = y.reshape(*x_in.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def spmm_t(dy_in, values, row_offsets, col_indices, t_offsets, t_indices, t_perm):
    """dx [..., C*b] = dy [..., R*b] . W."""
    dy = _flat(dy_in)
    M = dy.shape[0]
    C = t_offsets.numel() - 1
    rows, cols = row_ids(row_offsets), col_indices.long()
    if values.dim() == 1:
        dx = dy.new_zeros(M, C).index_add_(1, cols, dy[:, rows] * values)
    else:
        b = values.shape[-1]
        dyg = dy.reshape(M, -1, b)[:, rows, :]                    # [M, nnz, b]
        contrib = torch.einsum("krc,mkr->mkc", values, dyg)
        dx = dy.new_zeros(M, C, b).index_add_(1, cols, contrib).reshape(M, C * b)
    return dx.reshape(*dy_in.shape[:-1], dx.shape[-1])


def sddmm(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, block_size):
    """(dy^T . x) at W's nonzeros, summed over leading dims: [nnz] (block_size 1) or [nnz, b, b]."""
    dy, x = _flat(dy), _flat(x)
    rows, cols = row_ids(row_offsets), col_indices.long()
    if block_size == 1:
        return (dy[:, rows] * x[:, cols]).sum(0)
    M, b = x.shape[0], block_size
    dyg = dy.reshape(M, -1, b)[:, rows, :]
    xg = x.reshape(M, -1, b)[:, cols, :]
    return torch.einsum("mkr,mkc->krc", dyg, xg)
