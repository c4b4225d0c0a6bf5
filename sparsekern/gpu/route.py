"""The CUDA implementations of the linear ops: the CUDA C++ kernels or Triton, by declared capability.

The CUDA implementations of ``sparsekern::spmm``, ``spmm_t`` and ``sddmm``
come here; which kernels run is :func:`sparsekern.ops.backends.select_gpu`'s
choice between the declared ``cuda_cpp`` and ``triton`` backends. BSR always runs
on the Triton kernels (``tl.dot`` on tensor cores).
CSR runs on Triton by default: those kernels are the ones CI runs (under the
Triton interpreter, on CPU tensors). The CUDA C++ kernels of ``csrc/cuda``
(Sputnik-style SpMM, warp-reduced SDDMM, a tensor-core SpMM for 70-90%
sparsity) have never executed on a GPU; ``auto`` picks them for CSR only once
:data:`CUDA_CPP_VERIFIED_BY` records a passing ``scripts/gpu_check.sh`` run.
``SPARSEKERN_GPU_BACKEND=triton|cuda`` forces one (``cuda`` opts in to the C++
kernels before that, and refuses, with the reasons, what they cannot run).

The C++ kernels take the dense operands transposed (``[features, M]``, M
contiguous, as Sputnik's dense operand), so this layer transposes ``x``/``dy``
in and the result out; the topology is validated first (cached per version,
:func:`sparsekern.gpu.schedule.validated`), and the CSR column indices are
narrowed to 16 bits when the weight has at most 65536 columns (cached).
"""
from __future__ import annotations

import torch

from sparsekern.gpu import check_inputs, schedule, values_probe
from sparsekern.ops.backends import ENV, block_size_of, select_gpu  # noqa: F401  (ENV: the variable)

# The record that the CUDA C++ kernels passed their suite on a real GPU: the results
# folder of the scripts/gpu_check.sh run whose C++ steps (build, the GPU tests, the tests
# again with SPARSEKERN_GPU_BACKEND=cuda, compute-sanitizer memcheck/racecheck of the C++
# cases) all passed, e.g. "benchmarks/results/gpu_check/2026-12-01_1200_nvidia_h200".
# gpu_check.sh's summary prints the line to set here; commit it with that folder.
# None: not verified, so ``auto`` keeps CSR on Triton (SPARSEKERN_GPU_BACKEND=cuda opts in).
CUDA_CPP_VERIFIED_BY: str | None = None
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


def cpp_runtime_reasons(device: torch.device) -> list[str]:
    """What only run time says against the CUDA C++ kernels on ``device`` (empty when they can
    run; their declared dtypes and layouts are in :mod:`sparsekern.ops.backends`)."""
    reasons = []
    if cpp_ops() is None:
        reasons.append("the CUDA C++ kernels are not built (built only with a CUDA torch and nvcc)")
    if device.type != "cuda":
        reasons.append(f"{device.type} tensors: the CUDA C++ kernels need CUDA tensors "
                       f"(under the Triton interpreter the GPU path runs Triton)")
    return reasons


def choose(values: torch.Tensor, device: torch.device) -> str:
    """"cuda_cpp" or "triton": the GPU backend for this weight (:func:`sparsekern.ops.backends.select_gpu`)."""
    return select_gpu(device, values.dtype, block_size_of(values)).name


def narrow_indices(offsets: torch.Tensor, indices: torch.Tensor, n_cols: int) -> torch.Tensor:
    """int16 bit patterns of the columns when they fit 16 unsigned bits, else the int32 indices (cached)."""
    if n_cols > 65536:
        return indices

    def build():
        wide = indices.to(torch.int32)
        return torch.where(wide >= 32768, wide - 65536, wide).to(torch.int16)

    return schedule._cached(offsets, ("idx16",), (offsets, indices), build)


def _launch():
    from sparsekern.gpu import launch
    return launch


def _flat_t(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [F, M] contiguous (M = product of the leading dims)."""
    return t.reshape(-1, t.shape[-1]).t().contiguous()


def _tensor_cores(values, R, C) -> bool:
    return values.dtype != torch.float32 and schedule.block_density(values, R, C) >= TENSOR_CORE_MIN_DENSITY


def spmm(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias=None):
    """y [..., R] = x [..., C] . W^T + bias (see :func:`sparsekern.gpu.launch.spmm`)."""
    if choose(values, x.device) == "triton":
        return _launch().spmm(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    check_inputs("spmm", "cuda_cpp", x, values, (row_offsets, col_indices, t_offsets, t_indices, t_perm), 1, C)
    y_t = cpp_ops().csr_spmm_t(_flat_t(x), values, row_offsets, narrow_indices(row_offsets, col_indices, C),
                                None, schedule.row_order(row_offsets, col_indices), bias, False,
                                _tensor_cores(values, R, C))
    return y_t.t().contiguous().reshape(*x.shape[:-1], R)


def spmm_t(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm):
    """dx [..., C] = dy [..., R] . W, walking W^T (t_offsets, t_indices) through t_perm."""
    if choose(values, dy.device) == "triton":
        return _launch().spmm_t(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    check_inputs("spmm_t", "cuda_cpp", dy, values, (row_offsets, col_indices, t_offsets, t_indices, t_perm), 1, R)
    dx_t = cpp_ops().csr_spmm_t(_flat_t(dy), values, t_offsets, narrow_indices(t_offsets, t_indices, R), t_perm,
                                 schedule.row_order(t_offsets, t_indices), None, False, _tensor_cores(values, R, C))
    return dx_t.t().contiguous().reshape(*dy.shape[:-1], C)


def sddmm(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, block_size):
    """dW [nnz] (CSR) or [nnz, b, b]: (dy^T x) at W's nonzeros, summed over leading dims."""
    b = int(block_size)
    nnz = col_indices.numel()
    probe = values_probe(x, nnz, b)
    if choose(probe, x.device) == "triton":
        return _launch().sddmm(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, b)
    R, C = row_offsets.numel() - 1, t_offsets.numel() - 1
    check_inputs("sddmm", "cuda_cpp", x, probe, (row_offsets, col_indices, t_offsets, t_indices, t_perm), 1, C)
    if dy.shape[:-1] != x.shape[:-1] or dy.shape[-1] != R or dy.dtype != x.dtype:
        raise ValueError(f"sddmm: dy is {dy.dtype} {tuple(dy.shape)}; expected {x.dtype} "
                         f"{tuple(x.shape[:-1]) + (R,)}")
    return cpp_ops().csr_sddmm_t(_flat_t(dy), _flat_t(x), schedule.row_ids(row_offsets, col_indices),
                                  narrow_indices(row_offsets, col_indices, C))
