"""Launchers of the Triton kernels, with the signatures of the ``sparsekern`` ops.

These are the CUDA implementations of ``sparsekern::spmm``, ``spmm_t`` and
``sddmm`` (registered in :mod:`sparsekern.ops.library`). Each one checks its
inputs, validates the topology (cached per version, see
:mod:`sparsekern.gpu.schedule`), allocates the output, builds the grid and
launches. Under ``TRITON_INTERPRET=1`` they also accept CPU tensors inside
:func:`sparsekern.gpu.interpret.cuda_path_on_cpu` (where CPU tensors count as CUDA
ones), which is how CI runs every kernel on a machine without a GPU.

Supported: float16, bfloat16 and float32 values; CSR, and BSR with block size
16, 32 or 64 (``tl.dot`` needs tiles of at least 16). fp32 uses TF32 exactly
when ``torch.backends.cuda.matmul.allow_tf32`` is True (PyTorch's default is
False), as F.linear does.
"""
from __future__ import annotations

import torch
import triton

from sparsekern.gpu import INTERPRET, check_inputs, schedule, tuning, values_probe
from sparsekern.gpu.triton_bsr import bsr_sddmm_kernel, bsr_spmm_kernel
from sparsekern.gpu.triton_csr import csr_sddmm_kernel, csr_spmm_kernel
from sparsekern.ops.backends import block_size_of


def _INTERPRET_BF16(dtype):  # noqa: N802
    """Under the interpreter a kernel's fp32->bf16 cast truncates (numpy has no bfloat16;
    measured: 513 of 1024 values differ from round-to-nearest), so there the kernels
    store fp32 and the launcher rounds with torch. Compiled kernels round correctly."""
    return INTERPRET and dtype == torch.bfloat16


def _flat(t):
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _precision():
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _launch(kernel, grid, device, *args, **meta):
    if grid[0] == 0 or (len(grid) > 1 and grid[1] == 0):
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


# --------------------------------------------------------------------- SpMM
def _spmm_any(name, x2, values, offsets, indices, perm, bias, out_blocks, in_blocks, trans_w,
              cfg: tuning.LaunchConfig | None):
    """y [M, out_blocks*b] from x2 [M, in_blocks*b] over the CSR/BSR structure (offsets, indices)."""
    b = block_size_of(values)
    M = x2.shape[0]
    dev = x2.device
    cfg = cfg or tuning.lookup("spmm", b, schedule.block_density(values, out_blocks, in_blocks), values.dtype,
                               INTERPRET)
    out_cols = out_blocks * b
    if b > 1:
        y = torch.empty(M, out_cols, dtype=torch.float32 if _INTERPRET_BF16(values.dtype) else values.dtype,
                        device=dev)
        order = schedule.row_order(offsets, indices)
        grid = (out_blocks * triton.cdiv(M, cfg.block_m),)
        _launch(bsr_spmm_kernel, grid, dev,
                x2, values, offsets, indices, perm if perm is not None else indices, order,
                bias if bias is not None else values, y,
                M, out_blocks, x2.stride(0), y.stride(0),
                B=b, BLOCK_M=cfg.block_m, TRANS_W=trans_w, HAS_PERM=perm is not None,
                HAS_BIAS=bias is not None, UPCAST=INTERPRET and values.dtype == torch.bfloat16,
                IS_FP32=values.dtype == torch.float32, PRECISION=_precision() if not INTERPRET else "ieee",
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return y.to(values.dtype)
    mean = schedule.mean_row_length(offsets, indices.numel())
    seg_cap = max(16, triton.next_power_of_2(max(1, int(cfg.seg_mult * mean))))
    sch = schedule.csr_schedule(offsets, indices, seg_cap, cfg.block_r)
    atomic = sch.split
    wide = atomic or _INTERPRET_BF16(values.dtype)
    y = (torch.zeros if atomic else torch.empty)(M, out_cols, dtype=torch.float32 if wide else values.dtype,
                                                 device=dev)
    grid = (sch.n_groups * triton.cdiv(M, cfg.block_m),)
    xs = x2.t().contiguous().t() if cfg.transpose_dense else x2       # same shape, feature-major strides
    _launch(csr_spmm_kernel, grid, dev,
            xs, values, indices, perm if perm is not None else indices, sch.seg_row, sch.seg_start,
            sch.seg_len, bias if bias is not None else values, y,
            M, sch.n_groups, xs.stride(0), xs.stride(1), y.stride(0),
            BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, HAS_PERM=perm is not None,
            HAS_BIAS=bias is not None, ATOMIC=atomic,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if atomic and bias is not None:
        y += bias.float()
    return y.to(values.dtype)


def spmm(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias=None, *, config=None):
    """y [..., R*b] = x [..., C*b] . W^T + bias, W in CSR (b = 1) or BSR (b = 16/32/64).

    x: f16/bf16/f32, same dtype and device as values; bias: optional [R*b] of that dtype.
    ``config``: a :class:`~sparsekern.gpu.tuning.LaunchConfig` overriding the table (tests, tuning).
    """
    b = block_size_of(values)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    topo = (row_offsets, col_indices, t_offsets, t_indices, t_perm)
    check_inputs("spmm", "triton", x, values, topo, b, C * b)
    if bias is not None and (bias.shape != (R * b,) or bias.device != x.device):
        raise ValueError(f"spmm: bias has shape {tuple(bias.shape)} on {bias.device}; expected ({R * b},) "
                         f"on {x.device}")
    y = _spmm_any("spmm", _flat(x), values, row_offsets, col_indices, None, bias, R, C, True, config)
    return y.reshape(*x.shape[:-1], R * b)


def spmm_t(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, *, config=None):
    """dx [..., C*b] = dy [..., R*b] . W, walking W^T's rows through ``t_perm`` (no value copy)."""
    b = block_size_of(values)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    topo = (row_offsets, col_indices, t_offsets, t_indices, t_perm)
    check_inputs("spmm_t", "triton", dy, values, topo, b, R * b)
    dx = _spmm_any("spmm_t", _flat(dy), values, t_offsets, t_indices, t_perm, None, C, R, False, config)
    return dx.reshape(*dy.shape[:-1], C * b)


# -------------------------------------------------------------------- SDDMM
def sddmm(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, block_size, *, config=None,
          split=None):
    """dW values-shaped ([nnz] or [nnz, b, b]): (dy^T x) at W's nonzeros, summed over leading dims.

    dy [..., R*b], x [..., C*b]: same dtype (f16/bf16/f32) and device. ``split``
    overrides how many ways the batch is split (>1: fp32 atomics).
    """
    b = int(block_size)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    topo = (row_offsets, col_indices, t_offsets, t_indices, t_perm)
    nnz = col_indices.numel()
    probe = values_probe(x, nnz, b)
    check_inputs("sddmm", "triton", x, probe, topo, b, C * b)
    if dy.shape[:-1] != x.shape[:-1] or dy.shape[-1] != R * b or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"sddmm: dy is {dy.dtype} {tuple(dy.shape)} on {dy.device}; expected "
                         f"{x.dtype} {tuple(x.shape[:-1]) + (R * b,)} on {x.device}")
    dy2, x2 = _flat(dy), _flat(x)
    M, dev = x2.shape[0], x2.device
    cfg = config or tuning.lookup("sddmm", b, schedule.block_density(probe, R, C), x.dtype, INTERPRET)
    items = nnz if b > 1 else triton.cdiv(nnz, cfg.block_nz)
    if split is None:
        split = tuning.sddmm_split(M, items, cfg.block_m, 4 * _num_sms(dev))
    split = max(1, int(split))
    m_per_split = triton.cdiv(triton.cdiv(M, split), cfg.block_m) * cfg.block_m if M else 0
    split = triton.cdiv(M, m_per_split) if M else 1
    atomic = split > 1
    out_dtype = torch.float32 if (atomic or _INTERPRET_BF16(x.dtype)) else x.dtype
    out = (torch.zeros if (atomic or M == 0) else torch.empty)(probe.shape, dtype=out_dtype, device=dev)
    if nnz and M:
        rows = schedule.row_ids(row_offsets, col_indices)
        if b > 1:
            _launch(bsr_sddmm_kernel, (nnz, split), dev,
                    dy2, x2, rows, col_indices, out, M, m_per_split, dy2.stride(0), x2.stride(0),
                    B=b, BLOCK_M=cfg.block_m, ATOMIC=atomic,
                    UPCAST=INTERPRET and x.dtype == torch.bfloat16, IS_FP32=x.dtype == torch.float32,
                    PRECISION=_precision() if not INTERPRET else "ieee",
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        else:
            if cfg.transpose_dense:
                dy2, x2 = dy2.t().contiguous().t(), x2.t().contiguous().t()
            _launch(csr_sddmm_kernel, (items, split), dev,
                    dy2, x2, rows, col_indices, out, nnz, M, m_per_split, dy2.stride(0), dy2.stride(1),
                    x2.stride(0), x2.stride(1),
                    BLOCK_NZ=cfg.block_nz, BLOCK_M=cfg.block_m, ATOMIC=atomic,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.to(x.dtype)
