"""Builders of test and benchmark cases: the one place that turns a case into a layer.

A case names its weight by ``(layout, block)``: ``("csr", 1)`` (or ``("csr", None)``)
and ``("bsr", b)``. The CPU tests, the GPU tests (real GPU or Triton interpreter)
and ``benchmarks/bench_gpu.py`` all build their layers here, so a builder bug
cannot hide in a branch that only a GPU run takes (``SparseLinear(layout="csr",
block_size=16)`` once crashed the GPU benchmark and a GPU-only test for that reason).
"""
from __future__ import annotations

import torch

from sparsekern.formats import BSRTopology, CSRTopology, SparseTopology
from sparsekern.nn import SparseConv2d, SparseLinear


def layer_kwargs(layout: str, block_size: int | None = None) -> dict:
    """The ``layout``/``block_size`` keywords of ``SparseLinear``/``SparseConv2d`` for a case.

    CSR takes no block size (``block_size`` 1 or None); BSR needs one. Anything
    else is passed on, so the layer's own check names what is wrong.
    """
    if layout == "csr" and block_size in (None, 1):
        return {"layout": "csr"}
    return {"layout": layout, "block_size": block_size}


def make_linear(in_features: int, out_features: int, layout: str = "csr", block_size: int | None = None, *,
                density: float, bias: bool = True, seed: int = 0, device=None, dtype=None,
                backend: str = "auto") -> SparseLinear:
    """A ``SparseLinear`` for the case ``(layout, block_size)``, its topology and init from ``seed``.

    Built on the CPU (the random topology and the init are the same on every
    device), then moved to ``device``/``dtype`` (default float32).
    """
    g = torch.Generator().manual_seed(seed)
    lin = SparseLinear(in_features, out_features, bias=bias, density=density, generator=g, backend=backend,
                       **layer_kwargs(layout, block_size))
    return lin.to(device=device, dtype=dtype)


def make_conv(in_channels: int, out_channels: int, kernel_size, layout: str = "csr",
              block_size: int | None = None, *, density: float, seed: int = 0, device=None, dtype=None,
              **conv_kwargs) -> SparseConv2d:
    """A ``SparseConv2d`` for the case ``(layout, block_size)``; ``conv_kwargs`` as ``nn.Conv2d``'s."""
    g = torch.Generator().manual_seed(seed)
    conv = SparseConv2d(in_channels, out_channels, kernel_size, density=density, generator=g,
                        **layer_kwargs(layout, block_size), **conv_kwargs)
    return conv.to(device=device, dtype=dtype)


def make_topology(out_f: int, in_f: int, density: float, layout: str = "csr", block_size: int = 4,
                  dtype=torch.float64, empty_rows=(), seed: int | None = None) -> SparseTopology:
    """Random topology with exactly round(density * blocks) nonzero blocks; rows in
    ``empty_rows`` (block rows for BSR) hold nothing. Values ~ N(0, 1).

    ``seed`` None draws one from torch's global generator (seeded per test by
    tests/conftest.py); ``block_size`` is ignored for CSR.
    """
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(1 << 30, ()).item())
    b = 1 if layout == "csr" else block_size
    R, C = out_f // b, in_f // b
    keep = torch.rand(R, C, generator=g) < density
    if density >= 1:
        keep[:] = True
    for r in empty_rows:
        keep[r] = False
    mask = keep.repeat_interleave(b, 0).repeat_interleave(b, 1)
    dense = torch.randn(out_f, in_f, generator=g, dtype=torch.float64).to(dtype)
    if layout == "csr":
        return CSRTopology.from_mask(mask, dense)
    return BSRTopology.from_mask(mask, b, dense)
