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
from sparsekern.ops.backends import block_size_of


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


# ------------------------------------------------------------------ conv2d
def _element_entries(values, row_offsets, col_indices):
    """(rows, cols, vals) of every weight element: int64 [E], int64 [E], values.flatten()."""
    rows, cols = row_ids(row_offsets), col_indices.long()
    if values.dim() == 1:
        return rows, cols, values
    b = values.shape[-1]
    r = torch.arange(b, device=values.device)
    erows = (rows[:, None, None] * b + r[None, :, None]).expand(-1, b, b)
    ecols = (cols[:, None, None] * b + r[None, None, :]).expand(-1, b, b)
    return erows.reshape(-1), ecols.reshape(-1), values.reshape(-1)


def _acc(t):
    """Half-precision inputs accumulate in float32 (as PyTorch's own kernels do)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _unfold(x, geometry):
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, _ = geometry
    xp = torch.nn.functional.pad(x, (pl, pr, pt, pb))
    return torch.nn.functional.unfold(xp, (kh, kw), dilation=(dh, dw), stride=(sh, sw))  # [N, Cin*kh*kw, L]


def _gcols(values, row_offsets, col_indices, geometry, cin):
    """Rows and global unfold columns of every element."""
    kh, kw, groups = geometry[0], geometry[1], geometry[10]
    rows, cols, vals = _element_entries(values, row_offsets, col_indices)
    cout = (row_offsets.numel() - 1) * block_size_of(values)
    kg = (cin // groups) * kh * kw
    return rows, cols + (rows // (cout // groups)) * kg, vals, cout


def conv2d(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias, geometry):
    """y [N, Cout, OH, OW]: F.unfold, then a gather of each nonzero's column and an index_add."""
    from sparsekern.ops.library import conv_output_hw
    N, cin, H, W = x.shape
    rows, gcols, vals, cout = _gcols(values, row_offsets, col_indices, geometry, cin)
    cols = _unfold(_acc(x), geometry)                                     # [N, K, L]
    y = cols.new_zeros(N, cout, cols.shape[-1]).index_add_(1, rows, cols[:, gcols, :] * _acc(vals)[:, None])
    y = y.reshape(N, cout, *conv_output_hw(H, W, geometry))
    y = y if bias is None else y + _acc(bias)[:, None, None]
    return y.to(x.dtype)


def conv2d_dx(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry, input_size):
    """dx [N, Cin, H, W]: the adjoint of :func:`conv2d` (index_add into columns, then F.fold)."""
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, _ = geometry
    N, cin, H, W = input_size
    rows, gcols, vals, _ = _gcols(values, row_offsets, col_indices, geometry, cin)
    g = _acc(dy).reshape(N, dy.shape[1], -1)                              # [N, Cout, L]
    dcols = g.new_zeros(N, cin * kh * kw, g.shape[-1]).index_add_(1, gcols, g[:, rows, :] * _acc(vals)[:, None])
    dxp = torch.nn.functional.fold(dcols, (H + pt + pb, W + pl + pr), (kh, kw), dilation=(dh, dw),
                                   stride=(sh, sw))
    return dxp[:, :, pt:pt + H, pl:pl + W].to(dy.dtype)


def conv2d_dw(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry, block_size):
    """dW values-shaped: sum over images and positions of dy[row] * unfolded x[column]."""
    probe = x.new_empty(col_indices.numel()) if block_size == 1 else \
        x.new_empty(col_indices.numel(), block_size, block_size)
    rows, gcols, _, _ = _gcols(probe, row_offsets, col_indices, geometry, x.shape[1])
    cols = _unfold(_acc(x), geometry)
    g = _acc(dy).reshape(dy.shape[0], dy.shape[1], -1)
    return (g[:, rows, :] * cols[:, gcols, :]).sum((0, 2)).reshape(probe.shape).to(x.dtype)
