"""Sparse convolution on the GPU: im2col, then the sparse matmul kernels.

The CUDA implementations of ``sparsekern::conv2d``, ``conv2d_dx`` and
``conv2d_dw``. The image is unfolded (``F.unfold``, after an explicit pad so
asymmetric 'same' padding works) into a row-major ``[N*OH*OW, Cin*kh*kw]``
matrix, and the weight's nonzeros multiply it through the linear ops
(``spmm``, ``spmm_t``, ``sddmm``): forward is ``cols . W^T``, dX is ``F.fold``
of ``dy . W``, dW is the SDDMM of ``dy`` and ``cols``. Only the weight is
sparse; the unfolded image is dense (kh*kw times the input), the usual im2col
cost. Implicit GEMM (no materialised columns) is the alternative the GPU
benchmark is to decide between; it is not written yet.

Groups: W is ``[Cout, Cin/groups*kh*kw]``; group g's rows read unfold columns
``[g*K, (g+1)*K)``. The launcher shifts each row's column indices by its group
offset into an expanded structure (cached per topology version, entries in the
same order, so dW needs no permutation). For BSR this needs K to be a multiple
of the block size, else it refuses and says so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.formats import row_ids, transpose_metadata
from sparsekern.gpu import schedule, values_probe
from sparsekern.ops.backends import block_size_of


def _ops():
    return torch.ops.sparsekern


def grouped_topology(values, row_offsets, col_indices, t_offsets, t_indices, t_perm, groups: int, cin: int,
                     kh: int, kw: int):
    """The topology over all ``Cin*kh*kw`` unfold columns (block units for BSR)."""
    if groups == 1:
        return row_offsets, col_indices, t_offsets, t_indices, t_perm
    b = block_size_of(values)
    R = row_offsets.numel() - 1
    k_group = (cin // groups) * kh * kw
    if k_group % b:
        raise NotImplementedError(f"sparse conv on GPU: groups={groups} with BSR block {b} needs "
                                  f"Cin/groups*kh*kw={k_group} to be a multiple of {b}; use CSR")

    def build():
        rows = row_ids(row_offsets, col_indices.numel())
        shift = (rows // (R // groups)) * (k_group // b)
        cols = (col_indices.long() + shift).to(torch.int32)
        t = transpose_metadata(row_offsets, cols, groups * k_group // b)
        return (row_offsets, cols) + tuple(t)

    return schedule._cached(row_offsets, ("groups", groups, cin, kh, kw), (row_offsets, col_indices), build)


def _unfold_rows(x, geometry):
    """x [N, Cin, H, W] -> row-major [N*L, Cin*kh*kw] and (OH, OW)."""
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, _ = geometry
    xp = F.pad(x, (pl, pr, pt, pb))
    cols = F.unfold(xp, (kh, kw), dilation=(dh, dw), stride=(sh, sw))           # [N, K, L]
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), (oh, ow)


def conv2d(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias, geometry, ops=None):
    """y [N, Cout, OH, OW] (contiguous) of x [N, Cin, H, W]; ``ops`` defaults to ``torch.ops.sparsekern``."""
    ops = ops or _ops()
    kh, kw, groups = geometry[0], geometry[1], geometry[10]
    N = x.shape[0]
    topo = grouped_topology(values, row_offsets, col_indices, t_offsets, t_indices, t_perm, groups, x.shape[1],
                            kh, kw)
    cols, (oh, ow) = _unfold_rows(x.contiguous(), geometry)
    y = ops.spmm(cols, values, *topo, bias)                                       # [N*L, Cout]
    return y.reshape(N, oh, ow, -1).permute(0, 3, 1, 2).contiguous()


def conv2d_dx(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry, input_size, ops=None):
    """dx [N, Cin, H, W]: F.fold of dy . W over the unfold columns."""
    ops = ops or _ops()
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups = geometry
    N, cin, H, W = input_size
    topo = grouped_topology(values, row_offsets, col_indices, t_offsets, t_indices, t_perm, groups, cin, kh, kw)
    g = dy.permute(0, 2, 3, 1).reshape(-1, dy.shape[1])                           # [N*L, Cout]
    dcols = ops.spmm_t(g.contiguous(), values, *topo)                             # [N*L, Cin*kh*kw]
    dcols = dcols.reshape(N, -1, dcols.shape[-1]).transpose(1, 2)
    dxp = F.fold(dcols, (H + pt + pb, W + pl + pr), (kh, kw), dilation=(dh, dw), stride=(sh, sw))
    return dxp[:, :, pt:pt + H, pl:pl + W].contiguous()


def conv2d_dw(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry, block_size, ops=None):
    """dW values-shaped: the SDDMM of dy [N*L, Cout] and the unfold columns."""
    ops = ops or _ops()
    kh, kw, groups = geometry[0], geometry[1], geometry[10]
    b = int(block_size)
    nnz = col_indices.numel()
    probe = values_probe(x, nnz, b)
    topo = grouped_topology(probe, row_offsets, col_indices, t_offsets, t_indices, t_perm, groups, x.shape[1],
                            kh, kw)
    cols, _ = _unfold_rows(x.contiguous(), geometry)
    g = dy.permute(0, 2, 3, 1).reshape(-1, dy.shape[1]).contiguous()
    return ops.sddmm(g, cols, *topo, b)
