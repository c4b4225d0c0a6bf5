"""``torch.autocast`` for the sparse ops.

Under ``torch.autocast("cpu" | "cuda", dtype=...)`` every sparse op runs in the
autocast dtype, as ``F.linear`` and ``F.conv2d`` do (torch's "lower precision"
list): its floating operands -- activations, the weight's values (fp32 master
values stay fp32 in the module; the cast is an O(nnz) copy per call) and the bias
-- are cast to that dtype, and the output comes out in it. Autograd records the
casts, so the master values get fp32 gradients. The cast happens in an
``Autocast<device>`` kernel registered for each op, below autograd's view of the
op, and the CPU kernels run bf16/fp16 through fp32 accumulation
(csrc/cpu/reduced_precision.h). A dtype no kernel implements is refused by the
backend selection with the reason; nothing falls back to fp32 silently.
"""
from __future__ import annotations

import torch

DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts this device's ops to, or None when it is off there."""
    kind = device.type
    if kind not in DEVICE_KEYS or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def run_dtype(x: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    """The dtype an op on ``x`` with a weight's ``values`` runs in: autocast's when it is
    on for x's device, else values' dtype, which x must have (``TypeError`` otherwise)."""
    cast = autocast_dtype(x.device)
    if cast is not None:
        return cast
    if x.dtype != values.dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weight's values are {values.dtype}")
    return values.dtype


def _kernel(op, device_type: str):
    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        cast = [a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast(device_type, enabled=False):   # (excludes this key: no recursion)
            return op(*cast)
    return kernel


def register(lib: torch.library.Library, names) -> None:
    """Register the autocast kernels of ops ``names`` of ``lib``'s namespace."""
    for name in names:
        op = getattr(getattr(torch.ops, lib.ns), name).default
        for device_type, key in DEVICE_KEYS.items():
            lib.impl(name, _kernel(op, device_type), key)
