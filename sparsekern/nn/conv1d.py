"""``SparseConv1D``: the sparse twin of Hugging Face's ``transformers.pytorch_utils.Conv1D``.

HF's ``Conv1D(nf, nx)`` (GPT-2's attention and MLP projections) is a linear layer whose
weight is stored transposed, ``[nx, nf]`` = ``[in, out]``: ``y = x @ weight + bias``. The
sparse twin stores ``weight.T`` as an ordinary ``[out, in]`` topology and computes the same
function with the linear kernels; its ``weight`` reads as the ``[in, out]`` tensor. No
import of transformers is needed except by :meth:`SparseConv1D.to_dense` when the dense
module's class is not known.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsekern.nn._common import block_of, check_layout, magnitude_mask, make_topology, structure_topology
from sparsekern.nn.linear import SparseLinear


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D`` (a model can hold one only
    if transformers is imported, so this never imports it)."""
    import sys
    mod = sys.modules.get("transformers.pytorch_utils")
    return mod is not None and isinstance(module, mod.Conv1D)


class SparseConv1D(SparseLinear):
    """``y = x @ W + b`` with W ``[nx, nf]`` (in, out) stored sparse as W^T.

    Build one with :meth:`from_dense` from an HF ``Conv1D``. Shapes: input float [..., nx]
    -> output float [..., nf]. ``nf``/``nx`` are ``out_features``/``in_features``;
    ``topology`` is the ``[nf, nx]`` CSR/BSR weight and ``weight`` a view of shape ``[nx, nf]``
    (so ``x @ layer.weight`` and ``torch.addmm(b, x, layer.weight)`` run the sparse kernel).
    """

    _weight_transposed = True

    @property
    def nf(self) -> int:
        return self.out_features

    @property
    def nx(self) -> int:
        return self.in_features

    @classmethod
    def from_dense(cls, conv1d: nn.Module, mask: torch.Tensor | None = None, density: float | None = None,
                   layout: str = "csr", block_size: int | None = None, backend: str = "auto", *,
                   structure=None):
        """Sparse copy of an HF ``Conv1D`` (weight float [nx, nf], bias [nf]).

        Exactly one of ``mask`` (bool in the Conv1D weight's orientation ``[nx, nf]``: keep
        exactly its True positions, or for BSR every block of W^T holding one), ``density``
        (keep the largest-magnitude weights, or blocks by L2 norm) and ``structure``
        ((row_offsets, col_indices) int32 of W^T [nf, nx], the layer's own orientation,
        block units for BSR: kept as is, O(nnz), no mask) is given.
        """
        check_layout(layout, block_size)
        w = getattr(conv1d, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not hasattr(conv1d, "nf"):
            raise TypeError(f"conv1d must be a transformers Conv1D (weight [nx, nf]), got {type(conv1d).__name__}")
        if sum(a is not None for a in (mask, density, structure)) != 1:
            raise ValueError("give exactly one of mask=, density= or structure=")
        wt = w.detach().t()                                          # [nf, nx] = [out, in]
        if structure is not None:
            topo = structure_topology(structure, wt, layout, block_size)
        elif mask is None:
            mask_t = magnitude_mask(wt, density, block_of(layout, block_size))
        elif tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the Conv1D weight's {tuple(w.shape)}")
        else:
            mask_t = mask.t()
        if structure is None:
            topo = make_topology(mask_t.to(w.device), layout, block_size, values=wt)
        self = cls.from_topology(topo, conv1d.bias, backend)
        self._dense_cls = type(conv1d)
        return self

    def to_dense(self) -> nn.Module:
        """The dense ``Conv1D`` holding the same function (zeros off the topology)."""
        cls = getattr(self, "_dense_cls", None)
        if cls is None:
            from sparsekern._optional import require
            cls = require("transformers.pytorch_utils", "SparseConv1D.to_dense", "hf").Conv1D
        v = self.topology.values
        dense = cls(self.nf, self.nx).to(device=v.device, dtype=v.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.topology.to_dense().t())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            else:
                dense.bias.zero_()                  # Conv1D always adds a bias
        return dense

    def mask(self) -> torch.Tensor:
        """Dense bool [nx, nf], the Conv1D weight's orientation (for inspection only)."""
        return self.topology.mask().t()

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, " + super().extra_repr()
