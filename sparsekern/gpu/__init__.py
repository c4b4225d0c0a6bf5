"""GPU kernels of sparsekern (Triton), for the ``sparsekern`` ops on CUDA tensors.

Layers, bottom up: kernels (:mod:`~sparsekern.gpu.triton_bsr`,
:mod:`~sparsekern.gpu.triton_csr`) -> launchers (:mod:`~sparsekern.gpu.launch`,
with :mod:`~sparsekern.gpu.schedule` and :mod:`~sparsekern.gpu.tuning`) ->
the ``torch.library`` ops' CUDA implementations (:mod:`sparsekern.ops.library`).

What each GPU backend declares (devices, dtypes, layouts, block sizes) and the
choice between them live in :mod:`sparsekern.ops.backends`. Nothing here imports
triton at ``import sparsekern``: the launchers (and triton) load on the first
CUDA call, or when a test imports them under ``TRITON_INTERPRET=1``; CPU tensors
reach them only inside :func:`sparsekern.gpu.interpret.cuda_path_on_cpu`.
"""
from __future__ import annotations

import importlib.util
import os

import torch

# Read once, as triton.jit itself does: kernels imported in this process are
# interpreted (numpy on CPU tensors) when it is set.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BSR_BLOCK_SIZES = (16, 32, 64)        # tl.dot needs tiles of at least 16


def triton_missing_reason() -> str | None:
    """None when triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; it ships with CUDA builds of torch)"
    return None


def values_probe(like: torch.Tensor, nnz: int, block_size: int) -> torch.Tensor:
    """A values-shaped stand-in ([nnz] or [nnz, b, b], ``like``'s dtype and device) with one
    element of storage: describes the weight to the checks when only its structure is an input."""
    shape = (nnz,) if block_size == 1 else (nnz, block_size, block_size)
    return like.new_empty_strided(shape, (0,) * len(shape))


def check_inputs(name, backend, dense, values, topo, block_size, cols_expected) -> None:
    """Refuse (NotImplementedError, with the reasons) what ``backend`` ("triton" or
    "cuda_cpp", see :mod:`sparsekern.ops.backends`) cannot run, raise ValueError/TypeError
    naming a malformed input, and validate the topology (cached per version)."""
    from sparsekern.gpu import schedule
    from sparsekern.ops.backends import BACKENDS
    reasons = BACKENDS[backend].not_supported_reasons(dense.device, values.dtype, block_size)
    if reasons:
        raise NotImplementedError(f"sparsekern::{name} ({backend}): {'; '.join(reasons)}")
    if dense.dtype != values.dtype:
        raise TypeError(f"{name}: dense operand is {dense.dtype} but values are {values.dtype}")
    for t_name, t in zip(("values", "row_offsets", "col_indices", "t_offsets", "t_indices", "t_perm"),
                         (values,) + tuple(topo)):
        if t.device != dense.device:
            raise ValueError(f"{name}: {t_name} is on {t.device} but the dense operand is on {dense.device}")
    if dense.dim() < 1 or dense.shape[-1] != cols_expected:
        raise ValueError(f"{name}: dense operand has shape {tuple(dense.shape)}; expected [..., {cols_expected}]")
    schedule.validated(values, *topo)
