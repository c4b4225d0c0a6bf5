"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is genuinely sparse."""
from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.formats import BSR_BLOCK_SIZES, BSRTopology, CSRTopology, random_block_mask, row_ids
from sparsekern.ops.dispatch import sparse_linear

LAYOUTS = ("csr", "bsr")


def _check_layout(layout, block_size):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "bsr" and block_size not in BSR_BLOCK_SIZES:
        raise ValueError(f"layout='bsr' needs block_size in {BSR_BLOCK_SIZES}, got {block_size}")
    if layout == "csr" and block_size not in (None, 1):
        raise ValueError(f"layout='csr' takes no block_size, got {block_size}")


def _make_topology(mask, layout, block_size, values=None, dtype=None):
    if layout == "csr":
        return CSRTopology.from_mask(mask, values, dtype=dtype)
    return BSRTopology.from_mask(mask, block_size, values, dtype=dtype)


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as CSR or BSR; forward and backward touch only nonzeros.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: learn an additive bias [out_features].
        density: fraction of weights (CSR) or blocks (BSR) kept, in [0, 1];
            the topology is uniform random with exactly round(density * total).
        layout: "csr" (unstructured) or "bsr" (square blocks).
        block_size: BSR block size in {4, 8, 16, 32, 64}; must divide both features.
        device, dtype: of the values and bias (float32/float64 run on the CPU kernels).
        backend: "auto", "cpu" or "reference" (see :mod:`sparsekern.ops.dispatch`).
        generator: optional ``torch.Generator`` for the random topology and init.

    Shapes: input float [..., in_features] -> output float [..., out_features].

    Parameters are ``weight.values`` ([nnz] or [nnzb, b, b]) and ``bias``; the
    topology tensors are buffers, so any ``torch.optim`` optimizer works.
    Initialisation: each output neuron's weights (and its bias) are drawn from
    U(-1/sqrt(f), 1/sqrt(f)) with f its *actual* nonzero fan-in, the sparse
    analogue of ``nn.Linear``'s default.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, density: float = 0.1,
                 layout: str = "csr", block_size: int | None = None, device=None, dtype=None, *,
                 backend: str = "auto", generator: torch.Generator | None = None):
        super().__init__()
        _check_layout(layout, block_size)
        self.in_features, self.out_features, self.backend = int(in_features), int(out_features), backend
        b = block_size if layout == "bsr" else 1
        if in_features % b or out_features % b:
            raise ValueError(f"in_features={in_features} and out_features={out_features} must be "
                             f"multiples of block_size={b}")
        dtype = dtype or torch.get_default_dtype()
        block_mask = random_block_mask(out_features // b, in_features // b, density, generator)
        mask = block_mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
        self.weight = _make_topology(mask, layout, block_size, dtype=dtype).to(device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    @classmethod
    def _wrap(cls, topology, bias, backend="auto"):
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = topology.shape
        self.backend = backend
        self.weight = topology
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        return self

    def fan_in(self) -> torch.Tensor:
        """Actual nonzero fan-in of every output neuron, int64 [out_features]."""
        w = self.weight
        per_block_row = (w.row_offsets[1:] - w.row_offsets[:-1]).long() * w.block_size
        return per_block_row.repeat_interleave(w.block_size)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Per-neuron U(-1/sqrt(fan_in), 1/sqrt(fan_in)) over the actual fan-in."""
        bound = 1.0 / self.fan_in().clamp(min=1).double().sqrt()          # [out]
        w = self.weight
        rows = row_ids(w.row_offsets).to(bound.device)                  # (block) row per value
        if w.layout == "csr":
            per_value = bound[rows]
        else:
            b = w.block_size
            per_value = bound.reshape(-1, b)[rows][:, :, None].expand(-1, b, b)
        u = torch.rand(w.values.shape, generator=generator, dtype=torch.float64)
        w.values.copy_(((2 * u - 1) * per_value.cpu()).to(w.values))
        if self.bias is not None:
            ub = torch.rand(self.out_features, generator=generator, dtype=torch.float64)
            self.bias.copy_(((2 * ub - 1) * bound.cpu()).to(self.bias))

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None, density: float | None = None,
                   layout: str = "csr", block_size: int | None = None, backend: str = "auto"):
        """Sparse copy of ``linear``.

        Exactly one of ``mask`` (bool [out, in]: keep exactly its True positions,
        or for BSR every block containing one) and ``density`` (keep the
        largest-magnitude weights, or blocks by L2 norm for BSR) is given.
        """
        _check_layout(layout, block_size)
        if (mask is None) == (density is None):
            raise ValueError("give exactly one of mask= or density=")
        w = linear.weight.detach()
        if mask is None:
            if not 0.0 <= density <= 1.0:
                raise ValueError(f"density must be in [0, 1], got {density}")
            b = block_size if layout == "bsr" else 1
            R, C = w.shape[0] // b, w.shape[1] // b
            score = w.reshape(R, b, C, b).pow(2).sum((1, 3)).flatten()
            k = int(round(density * R * C))
            keep = torch.zeros(R * C, dtype=torch.bool, device=w.device)
            keep[torch.topk(score, k).indices] = True
            mask = keep.reshape(R, C).repeat_interleave(b, 0).repeat_interleave(b, 1)
        elif mask.shape != w.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(w.shape)}")
        return cls._wrap(_make_topology(mask.to(w.device), layout, block_size, values=w), linear.bias, backend)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the same function (zeros off the topology)."""
        v = self.weight.values
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=v.device, dtype=v.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    @property
    def nnz(self) -> int:
        return self.weight.nnz

    @property
    def density(self) -> float:
        return self.weight.density

    def mask(self) -> torch.Tensor:
        """Dense bool [out_features, in_features] (for inspection only)."""
        return self.weight.mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.weight, self.bias, self.backend)

    def extra_repr(self) -> str:
        bs = f", block_size={self.weight.block_size}" if self.weight.layout == "bsr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, layout={self.weight.layout}{bs}, "
                f"density={self.density:.4f}, nnz={self.nnz}")
