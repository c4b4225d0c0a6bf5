"""The whole GPU path on CPU tensors, under the Triton interpreter (CI has no GPU).

A GPU run goes module -> functional (backend selection) -> ``torch.ops.sparsekern``
-> the ops' CUDA implementations (:data:`sparsekern.ops.library.CUDA_IMPLS`: the
router :mod:`sparsekern.gpu.route` for the linear ops, :mod:`sparsekern.gpu.conv`
for the conv ops) -> launchers -> Triton kernels, with autograd calling the same
ops backwards. Inside :func:`cuda_path_on_cpu` CPU tensors take exactly that
path: the backends are selected as for a CUDA tensor, and the ops' CPU dispatch
key runs their CUDA implementations, so every layer above the kernels is the
code a GPU runs, and the kernels run in Triton's interpreter (numpy).

What stays different from a real GPU: the CUDA C++ kernels (never under the
interpreter; the router picks Triton for CPU tensors), ``device.type == "cuda"``
branches (``torch.cuda.device`` around a launch, the DST rebuild's
``mark_validated``), timing, and anything a compiler rejects
(:mod:`sparsekern.gpu.compile_check` covers that without a GPU).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from sparsekern import gpu


@contextlib.contextmanager
def cuda_path_on_cpu():
    """Run the sparsekern ops on CPU tensors through their CUDA implementations (a context).

    Needs ``TRITON_INTERPRET=1`` in the environment before triton was first
    imported (tests/conftest.py sets it when no GPU is visible); raises
    ``RuntimeError`` otherwise. The CPU kernels are back when the block exits.
    Contexts nest.
    """
    if not gpu.INTERPRET:
        raise RuntimeError("cuda_path_on_cpu needs TRITON_INTERPRET=1 set before triton is imported "
                           "(the Triton kernels then run on CPU tensors)")
    from sparsekern.ops import backends, library
    lib = torch.library.Library("sparsekern", "IMPL")
    with warnings.catch_warnings():
        # torch warns once that a CPU kernel is overridden: that is the point; destroying
        # the library below restores the C++ kernels.
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        for name, impl in library.CUDA_IMPLS.items():
            lib.impl(name, impl, "CPU")
    backends.CPU_AS_CUDA.append(True)
    try:
        yield
    finally:
        backends.CPU_AS_CUDA.pop()
        lib._destroy()


def gpu_path(device) -> contextlib.AbstractContextManager:
    """The context a GPU-path test runs in: nothing on a CUDA ``device``, else :func:`cuda_path_on_cpu`."""
    return contextlib.nullcontext() if torch.device(device).type == "cuda" else cuda_path_on_cpu()
