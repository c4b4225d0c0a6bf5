"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is genuinely sparse."""
from __future__ import annotations

import torch
from torch import nn

from sparsekern._checks import check_int
from sparsekern.nn._common import (SparseWeightMixin, block_of, check_layout, magnitude_mask, make_topology,
                                   structure_topology)
from sparsekern.ops.dispatch import sparse_linear


class SparseLinear(SparseWeightMixin, nn.Module):
    """y = x W^T + b with W stored as CSR or BSR; forward and backward touch only nonzeros.

    Args:
        in_features, out_features: as ``nn.Linear`` (ints >= 0; a zero-sized layer has no
            weights and gives nn.Linear's result: zeros [..., 0], or the bias for in_features=0).
        bias: learn an additive bias [out_features].
        density: fraction of weights (CSR) or blocks (BSR) kept, in [0, 1];
            the topology is uniform random with exactly round(density * total).
        layout: "csr" (unstructured) or "bsr" (square blocks).
        block_size: BSR block size in {4, 8, 16, 32, 64}; must divide both features.
        device, dtype: of the values and bias (float32, float64, bfloat16, float16 run on the CPU
            kernels; bf16/fp16 accumulate in fp32).
        backend: "auto", "cpu" or "reference" (see :mod:`sparsekern.ops.dispatch`).
        generator: optional ``torch.Generator`` for the random topology and init.

    Shapes: input float [..., in_features] -> output float [..., out_features].

    ``topology`` holds the sparse weight (a ``CSRTopology``/``BSRTopology``); its
    ``values`` ([nnz] or [nnzb, b, b]) and ``bias`` are the parameters, the index tensors
    are buffers, so any ``torch.optim`` optimizer works. ``weight`` reads as
    ``nn.Linear``'s [out_features, in_features] tensor without storing it
    (:mod:`sparsekern.nn.weight`): ``F.linear(x, layer.weight)`` runs the sparse kernel.
    Initialisation: each output neuron's weights (and its bias) are drawn from
    U(-1/sqrt(f), 1/sqrt(f)) with f its *actual* nonzero fan-in, the sparse
    analogue of ``nn.Linear``'s default.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, density: float = 0.1,
                 layout: str = "csr", block_size: int | None = None, device=None, dtype=None, *,
                 backend: str = "auto", generator: torch.Generator | None = None):
        super().__init__()
        self.in_features = check_int(in_features, "in_features")      # 0 is allowed, as in nn.Linear
        self.out_features = check_int(out_features, "out_features")
        self.backend = backend
        self._init_weight(self.out_features, self.in_features, "(out_features, in_features)", bias,
                          density, layout, block_size, device, dtype, generator)

    @classmethod
    def from_topology(cls, topology, bias: torch.Tensor | None = None, backend: str = "auto"):
        """The layer holding ``topology`` ([out_features, in_features], used as is, not copied)
        and a copy of ``bias`` (float [out_features], or None for no bias)."""
        out_f, in_f = topology.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},) for a topology "
                             f"of shape {tuple(topology.shape)}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = out_f, in_f
        self.backend = backend
        self.topology = topology
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        return self

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None, density: float | None = None,
                   layout: str = "csr", block_size: int | None = None, backend: str = "auto", *,
                   structure=None):
        """Sparse copy of ``linear``.

        Exactly one of ``mask`` (bool [out, in]: keep exactly its True positions,
        or for BSR every block containing one), ``density`` (keep the
        largest-magnitude weights, or blocks by L2 norm for BSR) and ``structure``
        ((row_offsets, col_indices) int32 of [out, in], block units for BSR: kept as
        is, O(nnz), no mask) is given.
        """
        check_layout(layout, block_size)
        if sum(a is not None for a in (mask, density, structure)) != 1:
            raise ValueError("give exactly one of mask=, density= or structure=")
        w = linear.weight.detach()
        if structure is not None:
            return cls.from_topology(structure_topology(structure, w, layout, block_size), linear.bias, backend)
        if mask is None:
            mask = magnitude_mask(w, density, block_of(layout, block_size))
        elif mask.shape != w.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(w.shape)}")
        return cls.from_topology(make_topology(mask.to(w.device), layout, block_size, values=w),
                                 linear.bias, backend)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the same function (zeros off the topology)."""
        v = self.topology.values
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=v.device, dtype=v.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.topology.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def mask(self) -> torch.Tensor:
        """Dense bool [out_features, in_features] (for inspection only)."""
        return self.topology.mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tapped(x, sparse_linear(x, self.topology, self.bias, self.backend))

    def extra_repr(self) -> str:
        bs = f", block_size={self.topology.block_size}" if self.topology.layout == "bsr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layout={self.topology.layout}{bs}, "
                f"density={self.density:.4f}, nnz={self.nnz}")
