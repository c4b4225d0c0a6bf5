"""Which GPU kernels run a linear op: the CUDA C++ kernels or Triton, by declared capability.

The CUDA implementations of ``sparsekern::spmm``, ``spmm_t`` and ``sddmm`` come
here. BSR always runs on the Triton kernels (``tl.dot`` on tensor cores). CSR
runs on the CUDA C++ kernels of ``csrc/cuda`` (Sputnik-style SpMM, warp-reduced
SDDMM, and a tensor-core SpMM for 70-90% sparsity) when they are built, and on
Triton otherwise. ``SPARSEKERN_GPU_BACKEND=triton|cuda`` forces one (``cuda``
refuses, with the reasons, what it cannot run).

The C++ kernels take the dense operands transposed (``[features, M]``, M
contiguous, as Sputnik's dense operand), so this layer transposes ``x``/``dy``
in and the result out; the topology is validated first (cached per version,
:func:`sparsekern.gpu.schedule.validated`), and the CSR column indices are
narrowed to 16 bits when the weight has at most 65536 columns (cached).
"""
from __future__ import annotations

import os

import torch

from sparsekern.gpu import DTYPES, check_inputs, schedule, values_probe

ENV = "SPARSEKERN_GPU_BACKEND"
# The tensor-core path pays at 70-90% sparsity (a densified tile still has work);
# below 10% density the CUDA-core path is used. To be tuned on a GPU.
TENSOR_CORE_MIN_DENSITY = 0.1


def cpp_ops():
    """The compiled CUDA C++ ops (``torch.ops.sparsekern_cuda``), or None when not built."""
    try:
        ns = torch.ops.sparsekern_cuda
        ns.csr_spmm_t  # noqa: B018  (raises when the library is not registered)
        return ns
    except (AttributeError, RuntimeError):
        return None


def cuda_cpp_reasons(values: torch.Tensor, device: torch.device) -> list[str]:
    """Why the CUDA C++ kernels cannot run this weight (empty when they can)."""
    reasons = []
    if cpp_ops() is None:
        reasons.append("the CUDA C++ kernels are not built (built only with a CUDA torch and nvcc)")
    if device.type != "cuda":
        reasons.append(f"device {device.type} is not CUDA")
    if values.dim() == 3:
        reasons.append("BSR weights run on the Triton kernels")
    if values.dtype not in DTYPES:
        reasons.append(f"dtype {values.dtype} not in {[str(d) for d in DTYPES]}")
    return reasons


def choose(values: torch.Tensor, device: torch.device) -> str:
    """"cuda" (C++ kernels) or "triton" for this weight, following SPARSEKERN_GPU_BACKEND."""
    want = os.environ.get(ENV, "auto")
    if want not in ("auto", "triton", "cuda"):
        raise ValueError(f"{ENV}={want!r}; expected auto, triton or cuda")
    if want == "triton":
        return "triton"
    reasons = cuda_cpp_reasons(values, device)
    if want == "cuda" and reasons:
        raise NotImplementedError(f"{ENV}=cuda, but the CUDA C++ kernels cannot run this: {'; '.join(reasons)}")
    return "cuda" if not reasons else "triton"


def narrow_indices(offsets: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """int16 bit patterns of the columns when they fit 16 unsigned bits, else the int32 indices (cached)."""
    if n_cols > 65536:
        return indices

    def build():
        wide = indices.to(torch.int32)
        return torch.where(wide >= 32768, wide - 65536, wide).to(torch.int16)

    return schedule._cached(offsets, ("idx16",), (offsets, indices), build)


def _launch():
    from sparsekern.gpu import triton_missing_reason
    reason = triton_missing_reason()
    if reason is not None:
        raise NotImplementedError(f"this op runs on the Triton kernels here, but {reason}")
    from sparsekern.gpu import launch
    return launch


def _flat_t(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [F, M] contiguous (M = product of the leading dims)."""
    return t.reshape(-1, t.shape[-1]).t().contiguous()


def _density(values, R, C):
    return values.shape[0] / (R * C) if R * C else 0.0


def spmm(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias=None):
    """y [..., R] = x [..., C] . W^T + bias (see :func:`sparsekern.gpu.launch.spmm`)."""
    if choose(values, x.device) == "triton":
        return _launch().spmm(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    check_inputs("spmm", x, values, (row_offsets, col_indices, t_offsets, t_indices, t_perm), 1, C, False)
    tc = values.dtype != torch.float32 and _density(values, R, C) >= TENSOR_CORE_MIN_DENSITY
    y_t = cpp_ops().csr_spmm_t(_flat_t(x), values, row_offsets, narrow_indices(row_offsets, col_indices, C),
                                None, schedule.row_order(row_offsets, col_indices), bias, False, tc)
    return y_t.t().contiguous().reshape(*x.shape[:-1], R)


def spmm_t(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm):
    """dx [..., C] = dy [..., R] . W, walking W^T (t_offsets, t_indices) through t_perm."""
    if choose(values, dy.device) == "triton":
        return _launch().spmm_t(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    check_inputs("spmm_t", dy, values, (row_offsets, col_indices, t_offsets, t_indices, t_perm), 1, R, False)
    tc = values.dtype != torch.float32 and _density(values, R, C) >= TENSOR_CORE_MIN_DENSITY
    dx_t = cpp_ops().csr_spmm_t(_flat_t(dy), values, t_offsets, narrow_indices(t_offsets, t_indices, R), t_perm,
                                 schedule.row_order(t_offsets, t_indices), None, False, tc)
    return dx_t.t().contiguous().reshape(*dy.shape[:-1], C)


def sddmm(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, block_size):
    """dW [nnz] (CSR) or [nnz, b, b]: (dy^T x) at W's nonzeros, summed over leading dims."""
    b = int(block_size)
    nnz = col_indices.numel()
    probe = values_probe(x, nnz, b)
    if choose(probe, x.device) == "triton":
        return _launch().sddmm(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, b)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    check_inputs("sddmm", x, probe, (row_offsets, col_indices, t_offsets, t_indices, t_perm), 1, C, False)
    if dy.shape[:-1] != x.shape[:-1] or dy.shape[-1] != R or dy.dtype != x.dtype:
        raise ValueError(f"sddmm: dy is {dy.dtype} {tuple(dy.shape)}; expected {x.dtype} "
                         f"{tuple(x.shape[:-1]) + (R,)}")
    return cpp_ops().csr_sddmm_t(_flat_t(dy), _flat_t(x), schedule.row_ids(row_offsets, col_indices),
                                  narrow_indices(row_offsets, col_indices, C))
