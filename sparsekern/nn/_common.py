"""What ``SparseLinear``, ``SparseConv2d`` and ``SparseConv1D`` share: layout checks, topology
construction, magnitude masks, fan-in based initialisation and inspection, the
``weight`` view and the loading of last version's state_dict keys."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from sparsekern.formats import (_STATE_FIELDS, BSR_BLOCK_SIZES, AtomicLoadMixin, BSRTopology, CSRTopology,
                                row_ids)
from sparsekern.nn.weight import SparseWeight
from sparsekern.sampling import random_structure

LAYOUTS = ("csr", "bsr")


def check_layout(layout, block_size):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "bsr" and block_size not in BSR_BLOCK_SIZES:
        raise ValueError(f"layout='bsr' needs block_size in {BSR_BLOCK_SIZES}, got {block_size}")
    if layout == "csr" and block_size not in (None, 1):
        raise ValueError(f"layout='csr' takes no block_size, got {block_size}")


def make_topology(mask, layout, block_size, values=None, dtype=None):
    """A CSR/BSR topology over the True positions of the bool [out, in] ``mask``."""
    if layout == "csr":
        return CSRTopology.from_mask(mask, values, dtype=dtype)
    return BSRTopology.from_mask(mask, block_size, values, dtype=dtype)


def structure_topology(structure, w: torch.Tensor, layout: str, block_size):
    """A CSR/BSR topology over ``structure`` = (row_offsets int32 [R + 1], col_indices int32
    [nnz], in block units for BSR), its values gathered from the dense [out, in] ``w``: O(nnz)
    memory, no mask (``sparsify`` builds every layer this way from a drawn structure)."""
    if not (isinstance(structure, (tuple, list)) and len(structure) == 2
            and all(isinstance(t, torch.Tensor) for t in structure)):
        raise TypeError("structure must be a (row_offsets, col_indices) pair of int32 tensors")
    row_offsets, col_indices = (t.to(w.device) for t in structure)
    b = block_of(layout, block_size)
    R, C = w.shape[0] // b, w.shape[1] // b
    if row_offsets.dim() != 1 or row_offsets.numel() != R + 1:
        raise ValueError(f"structure: row_offsets has shape {tuple(row_offsets.shape)}, expected ({R + 1},) "
                         f"for a [{w.shape[0]}, {w.shape[1]}] weight" + (f" in {b}x{b} blocks" if b > 1 else ""))
    if col_indices.numel() and (int(col_indices.min()) < 0 or int(col_indices.max()) >= C):
        raise ValueError(f"structure: col_indices must be in [0, {C}), got [{int(col_indices.min())}, "
                         f"{int(col_indices.max())}]")
    rows, cols = row_ids(row_offsets, col_indices.numel()).long(), col_indices.long()
    if layout == "csr":
        return CSRTopology(tuple(w.shape), row_offsets, col_indices, w[rows, cols].clone())
    return BSRTopology(tuple(w.shape), row_offsets, col_indices,
                       w.reshape(R, b, C, b)[rows, :, cols, :].contiguous(), b)


def random_topology(rows: int, cols: int, layout: str, block_size, count: int, dtype, generator=None):
    """A CSR/BSR [rows, cols] topology of exactly ``count`` uniformly random (block) positions, zero
    values, built in O(count) memory: no dense mask (:func:`sparsekern.sampling.random_structure`)."""
    b = block_of(layout, block_size)
    row_offsets, col_indices = random_structure(rows // b, cols // b, count, generator)
    if layout == "csr":
        return CSRTopology((rows, cols), row_offsets, col_indices, torch.zeros(count, dtype=dtype))
    return BSRTopology((rows, cols), row_offsets, col_indices, torch.zeros(count, b, b, dtype=dtype), b)


def block_count(rows: int, cols: int, block_size: int, density) -> int:
    """round(density * blocks) for a density in [0, 1] (``ValueError`` naming it otherwise)."""
    if density is None or isinstance(density, bool) or not 0.0 <= density <= 1.0 or math.isnan(density):
        raise ValueError(f"density must be in [0, 1], got {density}")
    return int(round(density * (rows // block_size) * (cols // block_size)))


def magnitude_mask(w: torch.Tensor, density: float, block_size: int = 1) -> torch.Tensor:
    """Bool [out, in] keeping the round(density * count) largest weights (or b x b blocks by L2 norm)."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    b = block_size
    R, C = w.shape[0] // b, w.shape[1] // b
    score = w.reshape(R, b, C, b).pow(2).sum((1, 3)).flatten()
    k = int(round(density * R * C))
    keep = torch.zeros(R * C, dtype=torch.bool, device=w.device)
    keep[torch.topk(score, k).indices] = True
    return keep.reshape(R, C).repeat_interleave(b, 0).repeat_interleave(b, 1)


def rename_legacy_keys(state_dict, prefix: str = "") -> None:
    """Rename, in place, a sparse layer's entries saved by the last version, when the topology was
    the module ``weight`` (``<prefix>weight.values``, ``.row_offsets``, ... ``.meta``), to today's
    ``<prefix>topology.<field>``. A state_dict holding both spellings of one field is refused."""
    old, new = prefix + "weight.", prefix + "topology."
    for key in [k for k in state_dict if k.startswith(old) and k[len(old):] in _STATE_FIELDS]:
        field = key[len(old):]
        if new + field in state_dict:
            raise ValueError(f"checkpoint holds both {key!r} (the last version's key) and {new + field!r}; keep one")
        state_dict[new + field] = state_dict.pop(key)


class SparseWeightMixin(AtomicLoadMixin):
    _dst_tap = None          # a sparsekern.dst.capture.Tap while a RigL engine trains the layer

    """For modules holding ``self.topology`` (a CSR/BSR topology) and ``self.bias``.

    ``weight`` is a :class:`~sparsekern.nn.weight.SparseWeight`, a tensor view of the
    topology with the dense weight's shape (``_weight_view_shape``; transposed when
    ``_weight_transposed``); it cannot be assigned.

    ``load_state_dict`` is all-or-nothing for the layer: the topology entries
    (``topology.*``, or last version's ``weight.*``, renamed on load) and the bias are all
    checked before any of them is written, so a refused load (``ValueError`` naming the
    entry; ``RuntimeError`` for missing or unexpected keys) leaves every tensor as it was.
    Inside a larger model each sparse layer is checked before its own tensors are written.
    """

    _weight_transposed = False

    @property
    def _weight_view_shape(self) -> tuple[int, ...]:
        return tuple(self.topology.shape)

    @property
    def weight(self) -> SparseWeight:
        """The weight as a tensor of the dense weight's shape, a view of ``self.topology`` (no copy):
        see :mod:`sparsekern.nn.weight` for what it supports."""
        return SparseWeight(self.topology, self._weight_view_shape, transposed=self._weight_transposed,
                            backend=self.backend)

    def __setattr__(self, name, value):
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}.weight is a view of the layer's sparse topology and cannot be "
                f"assigned (got {type(value).__name__}): write the stored values through "
                f"layer.topology.values or load_state_dict, or keep the layer dense "
                f"(sparsify(..., dense_layers=[...])) to tie or replace its weight")
        super().__setattr__(name, value)

    def __setstate__(self, state):
        mods = state.get("_modules", {})
        if "weight" in mods and "topology" not in mods:          # pickled by the last version
            state["_modules"] = {("topology" if k == "weight" else k): v for k, v in mods.items()}
        super().__setstate__(state)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        metadata = getattr(state_dict, "_metadata", None)
        state_dict = OrderedDict(state_dict)              # renamed in a copy, as torch copies it too
        if metadata is not None:
            state_dict._metadata = metadata
        rename_legacy_keys(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # torch hands each child a filtered copy of this dict, so a rename here reaches the topology
        rename_legacy_keys(state_dict, prefix)
        # torch writes this module's bias here, then calls the topology's loader: check both first
        self.topology.loadable(state_dict, prefix + "topology.")
        self.check_own_entries(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _init_weight(self, rows: int, cols: int, names: str, bias: bool, density: float, layout: str,
                     block_size, device, dtype, generator) -> None:
        """A random [rows, cols] topology at ``density``, a bias [rows], then the fan-in init."""
        check_layout(layout, block_size)
        b = block_of(layout, block_size)
        if rows % b or cols % b:
            raise ValueError(f"{names} = ({rows}, {cols}) must be multiples of block_size={b}")
        dtype = dtype or torch.get_default_dtype()
        count = block_count(rows, cols, b, density)
        self.topology = random_topology(rows, cols, layout, block_size, count, dtype, generator).to(device)
        self.bias = torch.nn.Parameter(torch.empty(rows, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(generator)

    def _tapped(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y``, after showing (x, y) to the DST engine's tap when it is armed (see
        :mod:`sparsekern.dst.capture`)."""
        tap = self._dst_tap
        if tap is not None and tap.armed:
            tap(x, y)
        return y

    def fan_in(self) -> torch.Tensor:
        """Actual nonzero fan-in of every output neuron / channel, int64 [out]."""
        w = self.topology
        per_block_row = (w.row_offsets[1:] - w.row_offsets[:-1]).long() * w.block_size
        return per_block_row.repeat_interleave(w.block_size)

    def _per_value(self, per_row: torch.Tensor) -> torch.Tensor:
        """Broadcast a float64 [out] per-neuron quantity to the values' shape (on the CPU)."""
        w = self.topology
        rows = row_ids(w.row_offsets).cpu()
        per_row = per_row.cpu()
        if w.layout == "csr":
            return per_row[rows]
        b = w.block_size
        return per_row.reshape(-1, b)[rows][:, :, None].expand(-1, b, b)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Per-neuron U(-1/sqrt(f), 1/sqrt(f)) with f the actual nonzero fan-in (weights and bias)."""
        bound = 1.0 / self.fan_in().clamp(min=1).double().sqrt()
        w = self.topology
        u = torch.rand(w.values.shape, generator=generator, dtype=torch.float64)
        w.values.copy_(((2 * u - 1) * self._per_value(bound)).to(w.values))
        if self.bias is not None:
            ub = torch.rand(self.bias.shape, generator=generator, dtype=torch.float64)
            self.bias.copy_(((2 * ub - 1) * bound.cpu()).to(self.bias))

    @torch.no_grad()
    def init_fanin_normal(self, scale: float = 2.0, generator: torch.Generator | None = None) -> None:
        """Sparse-aware init (Evci et al., 2020): w ~ N(0, std^2), std = sqrt(scale / f) per neuron.

        ``f`` is each neuron's own nonzero fan-in, so the pre-activation
        variance is ``scale * Var(input)`` whatever the density (scale=1:
        unit variance; scale=2: He, for ReLU networks). This is a standard
        deviation, not a variance. The bias is left as it is.
        """
        std = (scale / self.fan_in().clamp(min=1).double()).sqrt()
        w = self.topology
        z = torch.randn(w.values.shape, generator=generator, dtype=torch.float64)
        w.values.copy_((z * self._per_value(std)).to(w.values))

    @property
    def nnz(self) -> int:
        """Stored weight elements (nonzero blocks * b * b for BSR)."""
        return self.topology.nnz

    @property
    def density(self) -> float:
        return self.topology.density


def block_of(layout, block_size):
    return block_size if layout == "bsr" else 1


def random_mask(rows: int, cols: int, block_size: int = 1, *, density: float | None = None,
                count: int | None = None, generator=None) -> torch.Tensor:
    """Bool [rows, cols] of uniformly random b x b blocks: exactly ``count`` blocks,
    or round(density * blocks). The same draw as :func:`random_topology` (for a model that is
    dense already: ``sparsify``); a new layer never builds this mask."""
    b = block_size
    R, C = rows // b, cols // b
    if count is None:
        count = block_count(rows, cols, b, density)
    row_offsets, col_indices = random_structure(R, C, count, generator)
    flat = torch.zeros(R * C, dtype=torch.bool)
    flat[row_ids(row_offsets, count) * C + col_indices.long()] = True
    return flat.reshape(R, C).repeat_interleave(b, 0).repeat_interleave(b, 1)
