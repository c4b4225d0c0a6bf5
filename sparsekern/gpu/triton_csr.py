"""Triton kernels for unstructured (CSR) weights: SpMM (forward and dX) and SDDMM (dW).

Kernel layer only; see :mod:`sparsekern.gpu.launch` for validation and grids and
:mod:`sparsekern.gpu.schedule` for the row-length schedule.

``csr_spmm_kernel`` is load-balanced by a *segment schedule*: every row is cut
into segments of at most ``seg_cap`` entries (long rows are split; an empty row
keeps one empty segment so its output is still written), the segments are
sorted by length, longest first, and each program takes ``BLOCK_R`` consecutive
segments (so lengths within a program are nearly equal) times ``BLOCK_M`` batch
rows. Step t of its loop reads entry t of all ``BLOCK_R`` segments at once and
gathers the matching ``BLOCK_M x BLOCK_R`` inputs. When a row was split, partial
sums meet in an fp32 buffer through atomics (``ATOMIC``); otherwise each output
is written exactly once. The dX pass runs the same kernel over W^T's rows and
reads values through ``t_perm`` (``HAS_PERM``): no transposed copy of the values.

``csr_sddmm_kernel`` is parallel over nonzeros (``BLOCK_NZ`` per program), the
batch optionally split over grid axis 1 with fp32 atomics.

All arithmetic is fp32 whatever the storage dtype. The dense operands are read through
both strides, so the launcher can hand them over row-major (``[M, features]``) or
feature-major (a transposed copy, ``LaunchConfig.transpose_dense``): feature-major makes
each gathered column a contiguous run of ``BLOCK_M`` batch rows (coalesced), at the cost
of one transpose. Which wins is for the GPU tuning sweep to decide.
"""
import triton
import triton.language as tl


@triton.jit
def csr_spmm_kernel(
    x_ptr, v_ptr, cols_ptr, perm_ptr, seg_row_ptr, seg_start_ptr, seg_len_ptr, bias_ptr, y_ptr,
    M, n_groups, stride_xm, stride_xk, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid % n_groups                    # segment groups fastest: they share the X tile
    pid_m = pid // n_groups
    offs_s = g * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = tl.load(seg_row_ptr + offs_s)           # -1 for padding
    starts = tl.load(seg_start_ptr + offs_s)
    lens = tl.load(seg_len_ptr + offs_s)
    max_len = tl.load(seg_len_ptr + g * BLOCK_R)   # sorted descending: the group's longest
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for t in range(0, max_len):
        valid = t < lens
        idx = starts + t
        c = tl.load(cols_ptr + idx, mask=valid, other=0).to(tl.int64)
        if HAS_PERM:
            vi = tl.load(perm_ptr + idx, mask=valid, other=0)
        else:
            vi = idx
        v = tl.load(v_ptr + vi, mask=valid, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + c[None, :] * stride_xk,
                    mask=m_mask[:, None] & valid[None, :], other=0.0).to(tl.float32)
        acc += x * v[None, :]
    live = rows >= 0
    out_cols = tl.where(live, rows, 0).to(tl.int64)
    out = y_ptr + offs_m[:, None] * stride_ym + out_cols[None, :]
    omask = m_mask[:, None] & live[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=omask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + out_cols, mask=live, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def csr_sddmm_kernel(
    dy_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr,
    nnz, M, m_per_split, stride_dym, stride_dyr, stride_xm, stride_xk,
    BLOCK_NZ: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC: tl.constexpr,
):
    # dW[k] = sum_m dY[m, row_k] * X[m, col_k] over this program's share of the batch.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs = pid * BLOCK_NZ + tl.arange(0, BLOCK_NZ)
    nz_mask = offs < nnz
    r = tl.load(rows_ptr + offs, mask=nz_mask, other=0).to(tl.int64)
    c = tl.load(cols_ptr + offs, mask=nz_mask, other=0).to(tl.int64)
    m_lo = split * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    acc = tl.zeros((BLOCK_NZ,), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mk = (offs_m < m_hi)[:, None] & nz_mask[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + r[None, :] * stride_dyr, mask=mk, other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + c[None, :] * stride_xk, mask=mk, other=0.0)
        acc += tl.sum(dy.to(tl.float32) * x.to(tl.float32), axis=0)
    if ATOMIC:
        tl.atomic_add(out_ptr + offs, acc, mask=nz_mask)
    else:
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=nz_mask)
