"""``SparseConv2d``: a drop-in ``nn.Conv2d`` whose weight is genuinely sparse."""
from __future__ import annotations

import torch
from torch import nn

from sparsekern._checks import check_int
from sparsekern.nn._common import (SparseWeightMixin, block_of, check_layout, magnitude_mask, make_topology,
                                   structure_topology)
from sparsekern.ops.conv import _pair, conv_geometry, sparse_conv2d


class SparseConv2d(SparseWeightMixin, nn.Module):
    """2-D convolution with its weight stored as CSR or BSR; forward and backward touch only nonzeros.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias: as ``nn.Conv2d`` (``padding`` may be an int, a pair,
            ``"same"`` or ``"valid"``; only ``padding_mode="zeros"``). Channels
            are ints >= 0, kernel_size/stride/dilation >= 1, padding >= 0,
            groups >= 1; a ``ValueError`` names the argument that is not.
        density: fraction of weights (CSR) or blocks (BSR) kept, in [0, 1];
            exactly round(density * total), uniformly random.
        layout: "csr" (unstructured) or "bsr" (square blocks).
        block_size: BSR block size in {4, 8, 16, 32, 64}; must divide
            out_channels and in_channels/groups * kh * kw.
        device, dtype: of the values and bias (float32, float64, bfloat16, float16 run on the CPU
            kernels; bf16/fp16 accumulate in fp32).
        backend: "auto", "cpu" or "reference" (see :mod:`sparsekern.ops.dispatch`).
        generator: optional ``torch.Generator`` for the topology and the init.

    Shapes: input float [N, in_channels, H, W] or [in_channels, H, W], NCHW or
    channels-last -> output float [N, out_channels, OH, OW] in the same memory format.

    ``topology`` holds the weight over [out_channels, in_channels/groups * kh * kw]
    (columns in ``nn.Conv2d``'s ``weight.view(out, -1)`` order). Parameters are
    ``topology.values`` and ``bias``. ``weight`` reads as ``nn.Conv2d``'s
    [out, in/groups, kh, kw] tensor without storing it (:mod:`sparsekern.nn.weight`):
    ``F.conv2d(x, layer.weight, ...)`` runs the sparse kernel. Initialisation: per-output-channel
    U(-1/sqrt(f), 1/sqrt(f)), f the channel's actual nonzero fan-in.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 density: float = 0.1, layout: str = "csr", block_size: int | None = None,
                 device=None, dtype=None, *, backend: str = "auto",
                 generator: torch.Generator | None = None):
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                           padding_mode)
        self.backend = backend
        self._init_weight(*self.weight_shape_2d, "(out_channels, in_channels/groups*kh*kw)", bias,
                          density, layout, block_size, device, dtype, generator)

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                      padding_mode):
        """Check and store the ``nn.Conv2d`` geometry; a ``ValueError`` names the first bad argument."""
        in_channels = check_int(in_channels, "in_channels")       # 0 is allowed, as in nn.Conv2d
        out_channels = check_int(out_channels, "out_channels")
        if padding_mode != "zeros":
            raise ValueError(f"SparseConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        # kernel_size, stride, dilation >= 1, padding >= 0, groups >= 1, each named when wrong
        self.geometry = conv_geometry(kernel_size, stride, padding, dilation, groups)
        kh, kw, sh, sw, _, _, _, _, dh, dw, groups = self.geometry
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be "
                             f"divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = (kh, kw), (sh, sw), (dh, dw)
        self.padding = padding if isinstance(padding, str) else _pair(padding, "padding")
        self.padding_mode = padding_mode

    @property
    def weight_shape_2d(self) -> tuple[int, int]:
        """(out_channels, in_channels/groups * kh * kw): the topology's shape."""
        kh, kw = self.kernel_size
        return self.out_channels, self.in_channels // self.groups * kh * kw

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        """``nn.Conv2d``'s weight shape [out, in/groups, kh, kw]."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    _weight_view_shape = weight_shape

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: torch.Tensor | None = None, density: float | None = None,
                   layout: str = "csr", block_size: int | None = None, backend: str = "auto", *,
                   structure=None):
        """Sparse copy of ``conv`` (same geometry, weights and bias).

        Exactly one of ``mask`` (bool [out, in/groups, kh, kw] or its 2-D view
        [out, in/groups*kh*kw]: keep exactly its True positions, or for BSR
        every block containing one), ``density`` (keep the largest-magnitude
        weights, or blocks by L2 norm for BSR) and ``structure`` ((row_offsets,
        col_indices) int32 of the 2-D view, block units for BSR: kept as is, O(nnz),
        no mask) is given.
        """
        check_layout(layout, block_size)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if sum(a is not None for a in (mask, density, structure)) != 1:
            raise ValueError("give exactly one of mask=, density= or structure=")
        shape_2d = (conv.out_channels, conv.weight.shape[1:].numel())
        w = conv.weight.detach().reshape(shape_2d)
        if structure is not None:
            return cls.from_topology(conv, structure_topology(structure, w, layout, block_size), backend)
        if mask is None:
            mask = magnitude_mask(w, density, block_of(layout, block_size))
        else:
            if tuple(mask.shape) not in (tuple(conv.weight.shape), shape_2d):
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(conv.weight.shape)} "
                                 f"or {shape_2d}")
            mask = mask.reshape(shape_2d)
        return cls.from_topology(conv, make_topology(mask.to(w.device), layout, block_size, values=w), backend)

    @classmethod
    def from_topology(cls, conv: nn.Conv2d, topology, backend: str = "auto"):
        """The layer with ``conv``'s geometry and a copy of its bias, holding ``topology``
        ([out_channels, in_channels/groups * kh * kw], used as is, not copied)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_geometry(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                           conv.padding, conv.dilation, conv.groups, conv.padding_mode)
        if tuple(topology.shape) != self.weight_shape_2d:
            raise ValueError(f"topology has shape {tuple(topology.shape)}, expected {self.weight_shape_2d} "
                             f"(out_channels, in_channels/groups*kh*kw)")
        self.backend = backend
        self.topology = topology
        self.bias = nn.Parameter(conv.bias.detach().clone()) if conv.bias is not None else None
        return self

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` holding the same function (zeros off the topology)."""
        v = self.topology.values
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=self.bias is not None,
                         device=v.device, dtype=v.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.topology.to_dense().reshape(self.weight_shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def mask(self) -> torch.Tensor:
        """Dense bool [out, in/groups, kh, kw] (for inspection only)."""
        return self.topology.mask().reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tapped(x, sparse_conv2d(x, self.topology, self.geometry, self.bias, self.backend))

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        bs = f", block_size={self.topology.block_size}" if self.topology.layout == "bsr" else ""
        return s + f", layout={self.topology.layout}{bs}, density={self.density:.4f}, nnz={self.nnz}"
