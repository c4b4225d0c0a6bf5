"""Triton kernels for block-sparse (BSR) weights: SpMM (forward and dX) and SDDMM (dW).

Kernel layer only: pointers, sizes and strides in, math out. The launcher
(:mod:`sparsekern.gpu.launch`) validates, allocates and builds the grid.

W is [R*B, C*B] in BSR with ``values[k]`` the B x B block ``W[rB:rB+B, cB:cB+B]``
stored row-major (``values[k, i, j] = W[rB+i, cB+j]``).

* ``bsr_spmm_kernel`` walks one block row of a BSR structure per program:
  forward (Y = X W^T) walks W's rows with ``TRANS_W`` (each block is read
  transposed through its strides, never copied); dX (dX = dY W) walks W^T's rows
  (``t_offsets``/``t_indices``) and reads each block through ``t_perm`` with
  ``HAS_PERM``: the same values, no transposed copy.
* ``bsr_sddmm_kernel`` computes one nonzero block per program (axis 0), with the
  batch optionally split over axis 1 and reduced with fp32 atomics: parallel over
  nonzero blocks, never a serial loop over a block row.

Both accumulate in fp32 with ``tl.dot`` (tensor cores for fp16/bf16; for fp32
``PRECISION`` is "tf32" or "ieee", from ``torch.backends.cuda.matmul.allow_tf32``).
``UPCAST`` casts the operands to fp32 before the dot: the launcher sets it only
under ``TRITON_INTERPRET=1`` for bf16, whose interpreted ``tl.dot`` is wrong
(numpy has no bfloat16; see DEVELOPERS.md).
"""
import triton
import triton.language as tl


@triton.jit
def _dot_acc(a, b, acc, UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IS_FP32:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def bsr_spmm_kernel(
    x_ptr, v_ptr, offsets_ptr, cols_ptr, perm_ptr, order_ptr, bias_ptr, y_ptr,
    M, R, stride_xm, stride_ym,
    B: tl.constexpr, BLOCK_M: tl.constexpr, TRANS_W: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # 1-D grid, block rows fastest: consecutive programs share one X tile (kept in
    # L2) and sweep the whole weight, which is small at 80-98% sparsity.
    pid = tl.program_id(0)
    pid_r = pid % R
    pid_m = pid // R
    r = tl.load(order_ptr + pid_r)              # block rows by length, longest first
    start = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_b = tl.arange(0, B)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    for k in range(start, end):
        c = tl.load(cols_ptr + k).to(tl.int64)
        if HAS_PERM:
            vi = tl.load(perm_ptr + k).to(tl.int64)
        else:
            vi = tl.full((), 0, tl.int64) + k     # 64-bit: k * B * B may pass 2^31
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (c * B + offs_b)[None, :],
                    mask=m_mask[:, None], other=0.0)
        w_base = v_ptr + vi * (B * B)
        if TRANS_W:     # tile[j, i] = W[r, c][i, j]: forward needs the block transposed
            w = tl.load(w_base + offs_b[None, :] * B + offs_b[:, None])
        else:
            w = tl.load(w_base + offs_b[:, None] * B + offs_b[None, :])
        acc = _dot_acc(x, w, acc, UPCAST, IS_FP32, PRECISION)
    out_cols = r.to(tl.int64) * B + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out_cols).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + out_cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def bsr_sddmm_kernel(
    dy_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr,
    M, m_per_split, stride_dym, stride_xm,
    B: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
):
    # dW[k] = dY[:, rB:rB+B]^T X[:, cB:cB+B] over this program's share of the batch.
    k = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.load(rows_ptr + k).to(tl.int64)
    c = tl.load(cols_ptr + k).to(tl.int64)
    offs_b = tl.arange(0, B)
    m_lo = split * m_per_split
    m_hi = tl.minimum(M, m_lo + m_per_split)
    acc = tl.zeros((B, B), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        mm = offs_m < m_hi
        # both tiles load row-contiguous (coalesced); the dot takes dy transposed
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + (r * B + offs_b)[None, :],
                     mask=mm[:, None], other=0.0)                      # [BLOCK_M, B]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (c * B + offs_b)[None, :],
                    mask=mm[:, None], other=0.0)                       # [BLOCK_M, B]
        acc = _dot_acc(tl.trans(dy), x, acc, UPCAST, IS_FP32, PRECISION)
    out = out_ptr + k.to(tl.int64) * (B * B) + offs_b[:, None] * B + offs_b[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty))
