"""GPU kernels of sparsekern (Triton), for the ``sparsekern`` ops on CUDA tensors.

Layers, bottom up: kernels (:mod:`~sparsekern.gpu.triton_bsr`,
:mod:`~sparsekern.gpu.triton_csr`) -> launchers (:mod:`~sparsekern.gpu.launch`,
with :mod:`~sparsekern.gpu.schedule` and :mod:`~sparsekern.gpu.tuning`) ->
the ``torch.library`` ops' CUDA implementations (:mod:`sparsekern.ops.library`).

Nothing here is imported by ``import sparsekern``: the launchers (and triton)
load on the first CUDA call, or when a test imports them under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import importlib.util
import os

import torch

# Read once, as triton.jit itself does: kernels imported in this process are
# interpreted (numpy on CPU tensors) when it is set.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZES = (1, 16, 32, 64)


def triton_missing_reason() -> str | None:
    """None when triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    return None


def not_supported_reasons(device: torch.device, dtype: torch.dtype, block_size: int,
                          need_triton: bool = True) -> list[str]:
    """Why the GPU kernels (Triton, or with ``need_triton=False`` the CUDA C++ ones) cannot
    run ``dtype`` values of ``block_size`` on ``device`` (empty when they can). Does not import triton."""
    reasons = []
    missing = triton_missing_reason() if need_triton else None
    if missing:
        reasons.append(missing)
    if device.type == "cuda":
        if INTERPRET:
            reasons.append("TRITON_INTERPRET=1 is set: the Triton kernels run on CPU tensors only")
        else:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                reasons.append(f"compute capability {major}.{minor} < 8.0 (bf16 tl.dot needs Ampere or newer)")
    elif not (device.type == "cpu" and INTERPRET):
        reasons.append(f"device {device.type}: the Triton kernels need a CUDA GPU "
                       f"(or CPU tensors under TRITON_INTERPRET=1)")
    if dtype not in DTYPES:
        reasons.append(f"dtype {dtype} not in {[str(d) for d in DTYPES]}")
    if block_size not in BLOCK_SIZES:
        reasons.append(f"block_size {block_size} not in {list(BLOCK_SIZES[1:])} (tl.dot needs tiles "
                       f">= 16), and not CSR")
    return reasons


def values_probe(like: torch.Tensor, nnz: int, block_size: int) -> torch.Tensor:
    """A values-shaped stand-in ([nnz] or [nnz, b, b], ``like``'s dtype and device) with one
    element of storage: describes the weight to the checks when only its structure is an input."""
    shape = (nnz,) if block_size == 1 else (nnz, block_size, block_size)
    return like.new_empty_strided(shape, (0,) * len(shape))


def check_inputs(name, dense, values, topo, block_size, cols_expected, need_triton=True) -> None:
    """Refuse (NotImplementedError) what the GPU kernels cannot run, raise ValueError/TypeError
    naming a malformed input, and validate the topology (cached per version)."""
    from sparsekern.gpu import schedule
    reasons = not_supported_reasons(dense.device, values.dtype, block_size, need_triton)
    if reasons:
        raise NotImplementedError(f"sparsekern::{name} ({'triton' if need_triton else 'cuda'}): "
                                  f"{'; '.join(reasons)}")
    if dense.dtype != values.dtype:
        raise TypeError(f"{name}: dense operand is {dense.dtype} but values are {values.dtype}")
    for t_name, t in zip(("values", "row_offsets", "col_indices", "t_offsets", "t_indices", "t_perm"),
                         (values,) + tuple(topo)):
        if t.device != dense.device:
            raise ValueError(f"{name}: {t_name} is on {t.device} but the dense operand is on {dense.device}")
    if dense.dim() < 1 or dense.shape[-1] != cols_expected:
        raise ValueError(f"{name}: dense operand has shape {tuple(dense.shape)}; expected [..., {cols_expected}]")
    schedule.validated(values, *topo)
