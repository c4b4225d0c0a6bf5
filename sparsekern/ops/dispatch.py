"""The functional ``sparse_linear``: checks its inputs, selects a backend, runs the ops.

Backends (``cpu``, ``cuda_cpp``, ``triton``, ``reference``), what each declares and
the one selection function are in :mod:`sparsekern.ops.backends`; ``backend`` here
is "auto", "cpu", "cuda" (the GPU kernels, chosen per call) or "reference".
"""
from __future__ import annotations

import torch

from sparsekern.ops.autocast import autocast_dtype, run_dtype
from sparsekern.ops.backends import BACKENDS, select_backend  # noqa: F401  (public here too)


def as_operand(weight):
    """``weight`` (a topology) as is, or a sparse layer's ``weight`` view as the ops' operand;
    a dense tensor is refused, naming what is expected."""
    if isinstance(weight, torch.Tensor):
        if not hasattr(weight, "sparse_operand"):
            raise TypeError(f"weight must be a CSRTopology/BSRTopology or a sparse layer's weight, got a "
                            f"dense tensor of shape {tuple(weight.shape)}")
        return weight.sparse_operand()
    return weight


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """y = x . W^T + bias with a sparse W, computed on the nonzeros only.

    Args:
        x: float [..., in_features], same dtype and device as ``weight.values`` (under
            ``torch.autocast`` any floating dtype: the op runs in autocast's dtype).
        weight: a :class:`~sparsekern.formats.CSRTopology` or ``BSRTopology``
            of shape (out_features, in_features), or a sparse layer's ``weight`` view.
        bias: optional float [out_features].
        backend: "auto", "cpu", "cuda" or "reference" (see :func:`~sparsekern.ops.backends.select_backend`).

    Returns:
        float [..., out_features], contiguous. A zero-sized weight (out_features or
        in_features 0) gives what ``nn.Linear`` gives.
    """
    weight = as_operand(weight)
    values = weight.values
    out_f, in_f = weight.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., in_features={in_f}]")
    dtype = run_dtype(x, values)
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {values.device}")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        if (bias.dtype != values.dtype and autocast_dtype(x.device) is None) or bias.device != values.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}; expected {values.dtype} on {values.device}")
    be = select_backend(x, values, backend, dtype=dtype)
    if out_f == 0 or in_f == 0:
        # An empty weight has no entries: ``values`` (0 elements) *is* the dense [out, in]
        # matrix, so torch's linear gives nn.Linear's output and gradients (zeros [..., 0],
        # or the bias for in_features = 0); the kernels need at least one row and column.
        return torch.nn.functional.linear(x, values.reshape(out_f, in_f), bias)
    return be.ops.spmm(x, values, *weight.topology(), bias)
