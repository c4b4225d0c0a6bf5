"""Backend dispatch by declared capability, and the functional ``sparse_linear``.

Each backend declares the devices and dtypes it supports and explains a
refusal through ``not_supported_reasons``. ``backend="auto"`` picks the first
automatic backend that accepts the inputs; when none does, the error lists
every backend with its reasons. The reference backend only runs when asked
for by name: it is never a silent fallback.

Which path runs where:

=============  ========  ===================  ============================================
backend        device    dtypes               implementation
=============  ========  ===================  ============================================
``cpu``        CPU       float32, float64     C++/OpenMP kernels (``torch.ops.sparsekern``)
``cuda``       CUDA      float16, bfloat16,   :mod:`sparsekern.gpu` behind the same ops: CSR on
                         float32              the CUDA C++ kernels (csrc/cuda) when built, else
                                              Triton; BSR 16/32/64 on Triton; conv as im2col +
                                              those kernels
``reference``  any       any floating         pure torch gather/scatter (tests, debugging)
=============  ========  ===================  ============================================
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsekern import _ext, gpu
from sparsekern.ops import library, reference


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating dtype
    automatic: bool
    ops: object
    kinds: tuple[str, ...] = ("linear", "conv")  # op families with a kernel

    def not_supported_reasons(self, x: torch.Tensor, values: torch.Tensor, kind: str = "linear") -> list[str]:
        reasons = []
        if self.devices and x.device.type not in self.devices:
            return [f"device {x.device.type} not in {list(self.devices)}"]
        if kind not in self.kinds:
            reasons.append(f"no {kind} kernel (this backend has {'/'.join(self.kinds)} only)")
        if self.name == "cuda":
            from sparsekern.gpu import route
            block = values.shape[-1] if values.dim() == 3 else 1
            need_triton = block > 1 or route.cpp_ops() is None     # CSR may run on the C++ kernels
            return reasons + gpu.not_supported_reasons(x.device, values.dtype, block, need_triton)
        if self.dtypes is not None and values.dtype not in self.dtypes:
            reasons.append(f"dtype {values.dtype} not in {[str(d) for d in self.dtypes]}")
        if self.name == "cpu" and not _ext.available():
            reasons.append(_ext.missing_reason())
        return reasons


BACKENDS = {
    "cpu": Backend("cpu", ("cpu",), (torch.float32, torch.float64), True, library),
    "cuda": Backend("cuda", ("cuda",), gpu.DTYPES, True, library),
    "reference": Backend("reference", (), None, False, reference),
}


def select_backend(x: torch.Tensor, values: torch.Tensor, backend: str = "auto", kind: str = "linear") -> Backend:
    """The backend that will run ``kind`` ("linear" or "conv") ops, or an error explaining every refusal."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}")
        chosen = BACKENDS[backend]
        reasons = chosen.not_supported_reasons(x, values, kind)
        if reasons:
            raise NotImplementedError(f"backend {backend!r} cannot run these inputs: {'; '.join(reasons)}")
        return chosen
    refusals = []
    for be in BACKENDS.values():
        reasons = be.not_supported_reasons(x, values, kind) if be.automatic else ["only used when asked for by name"]
        if not reasons:
            return be
        refusals.append(f"  {be.name}: {'; '.join(reasons)}")
    raise NotImplementedError("no sparsekern backend supports these inputs:\n" + "\n".join(refusals))


def sparse_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """y = x . W^T + bias with a sparse W, computed on the nonzeros only.

    Args:
        x: float [..., in_features], same dtype and device as ``weight.values``.
        weight: a :class:`~sparsekern.formats.CSRTopology` or ``BSRTopology``
            of shape (out_features, in_features).
        bias: optional float [out_features].
        backend: "auto", "cpu", "cuda" or "reference" (see module doc).

    Returns:
        float [..., out_features], contiguous. A zero-sized weight (out_features or
        in_features 0) gives what ``nn.Linear`` gives.
    """
    values = weight.values
    out_f, in_f = weight.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected [..., in_features={in_f}]")
    if x.dtype != values.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weight's values are {values.dtype}")
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {values.device}")
    if bias is not None:
        if bias.shape != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        if bias.dtype != values.dtype or bias.device != values.device:
            raise TypeError(f"bias is {bias.dtype} on {bias.device}; expected {values.dtype} on {values.device}")
    be = select_backend(x, values, backend)
    if out_f == 0 or in_f == 0:
        # An empty weight has no entries: ``values`` (0 elements) *is* the dense [out, in]
        # matrix, so torch's linear gives nn.Linear's output and gradients (zeros [..., 0],
        # or the bias for in_features = 0); the kernels need at least one row and column.
        return torch.nn.functional.linear(x, values.reshape(out_f, in_f), bias)
    return be.ops.spmm(x, values, *weight.topology(), bias)
