"""Sparse weight topologies: :class:`CSRTopology` and :class:`BSRTopology`.

A topology is an ``nn.Module`` holding one sparse weight W of shape
``[out_features, in_features]``:

=============  ==========================  ===========================================
field          dtype / shape               meaning
=============  ==========================  ===========================================
values         float ``[nnz]`` (CSR),      the nonzeros, an ``nn.Parameter``; the only
               ``[nnzb, b, b]`` (BSR)      trainable tensor
row_offsets    int32 ``[R + 1]``           row r's entries are ``[row_offsets[r], row_offsets[r+1])``
col_indices    int32 ``[nnz]``             column of each entry, sorted and unique per row
t_offsets      int32 ``[C + 1]``           offsets of W^T's rows (= W's columns)
t_indices      int32 ``[nnz]``             row of W of each W^T entry
t_perm         int32 ``[nnz]``             W^T entry j is ``values[t_perm[j]]``
meta           int64 ``[3]``               ``(out_features, in_features, block_size)``
=============  ==========================  ===========================================

For BSR, R = out/b and C = in/b count blocks; CSR is b = 1. The transpose is
a gather permutation into the same values: values are never copied to
transpose. Every tensor is in the ``state_dict`` (safetensors-friendly), and
loading a malformed one raises ``ValueError`` naming the field, before anything
is written (see :class:`AtomicLoadMixin`); an accepted load stores contiguous copies.
"""
from __future__ import annotations


import torch
from torch import nn

BSR_BLOCK_SIZES = (4, 8, 16, 32, 64)
_INDEX_FIELDS = ("row_offsets", "col_indices", "t_offsets", "t_indices", "t_perm")
_STATE_FIELDS = ("meta", "values") + _INDEX_FIELDS      # a topology's state_dict entries


def row_ids(offsets: torch.Tensor, nnz: int | None = None) -> torch.Tensor:
    """Row index of every stored entry, int64 [nnz], from offsets [rows + 1].

    Give ``nnz`` (the entry count, known from the indices' length) to keep a
    CUDA structure on the device with no host read.
    """
    counts = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts,
                                   output_size=nnz)


def count_per_index(index: torch.Tensor, n: int) -> torch.Tensor:
    """int64 [n]: how often each value of ``index`` (int, in [0, n)) occurs.

    ``torch.bincount`` reads the maximum back to the host on CUDA; an integer
    ``index_add_`` is exact, deterministic and stays on the device.
    """
    index = index.long()
    return torch.zeros(n, dtype=torch.int64, device=index.device).index_add_(
        0, index, torch.ones_like(index))


def transpose_metadata(row_offsets: torch.Tensor, col_indices: torch.Tensor, n_cols: int):
    """(t_offsets, t_indices, t_perm) of W^T, all int32, from W's CSR structure: a stable sort
    of the entries by column, so each transposed row stays ordered by W's row.

    ``sparsekern::csr_transpose`` (:mod:`sparsekern.ops.transpose`): a counting sort on CPU;
    elsewhere device-side torch ops only (sort, index_add, cumsum; no host read), so it
    stays on the structure's device: this is the GPU topology rebuild of the DST engine.
    """
    from sparsekern.ops import library  # noqa: F401  (loads the compiled CPU kernel, when built)
    from sparsekern.ops.transpose import csr_transpose
    return tuple(csr_transpose(row_offsets, col_indices, n_cols))


def check_structure(shape, block_size, values, row_offsets, col_indices,
                    t_offsets=None, t_indices=None, t_perm=None):
    """Raise ``ValueError``/``TypeError`` naming the first malformed field.

    Checks dtypes, devices, lengths, monotone offsets, columns in range and
    strictly increasing within each row, and (when given) that the transpose
    metadata matches the structure exactly.
    """
    out_f, in_f = shape
    b = block_size
    if b != 1 and b not in BSR_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BSR_BLOCK_SIZES} (BSR) or 1 (CSR), got {b}")
    if out_f < 0 or in_f < 0 or out_f % b or in_f % b:
        raise ValueError(f"shape {tuple(shape)} must be non-negative multiples of block_size={b}")
    R, C = out_f // b, in_f // b
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got "
                        f"{getattr(values, 'dtype', type(values).__name__)}")
    tensors = {"row_offsets": row_offsets, "col_indices": col_indices}
    if t_perm is not None:
        tensors.update(t_offsets=t_offsets, t_indices=t_indices, t_perm=t_perm)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != values.device:
            raise ValueError(f"{name} is on {t.device} but values are on {values.device}")
    expect_vals = (values.shape[0],) if b == 1 else (values.shape[0], b, b)
    if tuple(values.shape) != expect_vals or (b > 1 and values.dim() != 3) or (b == 1 and values.dim() != 1):
        want = "[nnz]" if b == 1 else f"[nnzb, {b}, {b}]"
        raise ValueError(f"values has shape {tuple(values.shape)}, expected {want}")
    nnz = values.shape[0]
    if row_offsets.numel() != R + 1:
        raise ValueError(f"row_offsets has {row_offsets.numel()} entries, expected rows+1={R + 1}")
    if col_indices.numel() != nnz:
        raise ValueError(f"col_indices has {col_indices.numel()} entries, expected nnz={nnz} "
                         f"(the length of values)")
    ro = row_offsets.long()
    if ro[0].item() != 0:
        raise ValueError(f"row_offsets[0] must be 0, got {ro[0].item()}")
    if ro[-1].item() != nnz:
        raise ValueError(f"row_offsets[-1]={ro[-1].item()} but values has nnz={nnz} entries; they must agree")
    if R > 0 and bool((ro[1:] < ro[:-1]).any()):
        r = int(torch.nonzero(ro[1:] < ro[:-1])[0]) + 1
        raise ValueError(f"row_offsets must be non-decreasing, but row_offsets[{r}]={ro[r].item()} "
                         f"< row_offsets[{r - 1}]={ro[r - 1].item()}")
    if nnz:
        ci = col_indices.long()
        bad = (ci < 0) | (ci >= C)
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"col_indices[{k}]={ci[k].item()} is out of range [0, {C})")
        same_row = row_ids(row_offsets)
        step = (ci[1:] <= ci[:-1]) & (same_row[1:] == same_row[:-1])
        if bool(step.any()):
            k = int(torch.nonzero(step)[0]) + 1
            what = "duplicate" if ci[k] == ci[k - 1] else "unsorted"
            raise ValueError(f"col_indices must be sorted and unique within each row: {what} "
                             f"column {ci[k].item()} at entry {k} (row {same_row[k].item()})")
    if t_perm is not None:
        for name, t, n in (("t_offsets", t_offsets, C + 1), ("t_indices", t_indices, nnz),
                           ("t_perm", t_perm, nnz)):
            if t.numel() != n:
                raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
        expect = transpose_metadata(row_offsets, col_indices, C)
        for name, got, want in zip(("t_offsets", "t_indices", "t_perm"),
                                   (t_offsets, t_indices, t_perm), expect):
            if not torch.equal(got, want):
                raise ValueError(f"{name} does not match the transpose of (row_offsets, col_indices); "
                                 f"rebuild it with rebuild_transpose()")


class AtomicLoadMixin:
    """For ``nn.Module`` subclasses: a refused ``load_state_dict`` changes nothing.

    ``torch.nn.Module.load_state_dict`` reports missing and unexpected keys (strict) and
    size mismatches only after it has copied everything else. Here a strict load with
    missing or unexpected keys raises the same ``RuntimeError`` before anything is written,
    and :meth:`check_own_entries` lets ``_load_from_state_dict`` refuse bad values first.
    """

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if strict:
            expected, given = set(self.state_dict(keep_vars=True)), set(state_dict)
            errors = []
            if expected - given:
                errors.append("Missing key(s) in state_dict: {}. ".format(
                    ", ".join(f'"{k}"' for k in sorted(expected - given))))
            if given - expected:
                errors.append("Unexpected key(s) in state_dict: {}. ".format(
                    ", ".join(f'"{k}"' for k in sorted(given - expected))))
            if errors:
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                                   + "\n\t".join(errors))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def check_own_entries(self, state_dict, prefix: str = "") -> None:
        """Raise ``ValueError`` naming the first entry of ``state_dict`` for this module's own
        parameters and persistent buffers (not its children's) that is not a tensor, has
        another shape, or is not floating-point for a floating-point tensor. Writes nothing."""
        own = [*self._parameters.items(),
               *((n, b) for n, b in self._buffers.items() if n not in self._non_persistent_buffers_set)]
        for name, t in own:
            key = prefix + name
            if t is None or key not in state_dict:
                continue
            v = state_dict[key]
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"checkpoint entry {key!r} must be a tensor, got {type(v).__name__}")
            if v.shape != t.shape:
                raise ValueError(f"checkpoint entry {key!r} has shape {tuple(v.shape)}, but this "
                                 f"layer's {name} has shape {tuple(t.shape)}")
            if t.is_floating_point() and not v.is_floating_point():
                raise ValueError(f"checkpoint entry {key!r} is {v.dtype}; {name} must be floating-point")



class SparseTopology(AtomicLoadMixin, nn.Module):
    """Base class of :class:`CSRTopology` and :class:`BSRTopology` (see module doc)."""

    layout: str = ""

    def __init__(self, shape, row_offsets, col_indices, values, block_size=1, validate=True):
        super().__init__()
        out_f, in_f = (int(s) for s in shape)
        # Python ints for the hot path (no tensor reads under torch.compile);
        # `meta` carries the same numbers in the state_dict.
        self._shape, self._block_size = (out_f, in_f), int(block_size)
        self.register_buffer("meta", torch.tensor([out_f, in_f, block_size], dtype=torch.int64))
        self.register_buffer("row_offsets", row_offsets)
        self.register_buffer("col_indices", col_indices)
        self.values = nn.Parameter(values)
        if validate:
            check_structure((out_f, in_f), block_size, values, row_offsets, col_indices)
        self.register_buffer("t_offsets", None)
        self.register_buffer("t_indices", None)
        self.register_buffer("t_perm", None)
        self.rebuild_transpose()

    # ------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return self._shape

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def nnz(self) -> int:
        """Number of stored scalar values (nnzb * b * b for BSR)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    def topology(self) -> tuple[torch.Tensor, ...]:
        """(row_offsets, col_indices, t_offsets, t_indices, t_perm), as the ops take them."""
        return tuple(getattr(self, f) for f in _INDEX_FIELDS)

    # ----------------------------------------------------------- structure
    def rebuild_transpose(self) -> None:
        """Recompute t_offsets/t_indices/t_perm from row_offsets/col_indices."""
        t = transpose_metadata(self.row_offsets, self.col_indices, self.shape[1] // self.block_size)
        self.t_offsets, self.t_indices, self.t_perm = t

    @torch.no_grad()
    def assign_(self, row_offsets: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                *, trusted: bool = False) -> None:
        """Overwrite the structure and values in place, at the same nnz; rebuild the transpose in place.

        Every tensor keeps its storage (modules, optimizers and compiled graphs holding them stay
        valid; the in-place copies bump the index tensors' versions, which the GPU schedules watch).

        Args:
            row_offsets: int [R + 1]; col_indices: int [nnzb], sorted and unique per row.
            values: float [nnz] or [nnzb, b, b], cast to the values' dtype.
            trusted: the caller built the structure from a valid one (the DST rebuild): on a GPU the
                kernels then skip their re-validation of it (:func:`sparsekern.gpu.schedule.mark_validated`).
        """
        if col_indices.numel() != self.col_indices.numel() or values.shape != self.values.shape:
            raise ValueError(f"assign_ keeps nnz: the new structure has {col_indices.numel()} entries and values "
                             f"{tuple(values.shape)}, the topology {self.col_indices.numel()} and "
                             f"{tuple(self.values.shape)}")
        if row_offsets.numel() != self.row_offsets.numel():
            raise ValueError(f"row_offsets has {row_offsets.numel()} entries, expected {self.row_offsets.numel()}")
        self.row_offsets.copy_(row_offsets)
        self.col_indices.copy_(col_indices)
        self.values.data.copy_(values)
        t = transpose_metadata(self.row_offsets, self.col_indices, self.shape[1] // self.block_size)
        for name, new in zip(("t_offsets", "t_indices", "t_perm"), t):
            getattr(self, name).copy_(new)
        if trusted and self.values.is_cuda:
            from sparsekern.gpu import schedule
            schedule.mark_validated(self.values, *self.topology())

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first malformed field."""
        check_structure(self.shape, self.block_size, self.values, *self.topology())

    def _block_coords(self):
        return row_ids(self.row_offsets), self.col_indices.long()

    def mask(self) -> torch.Tensor:
        """Dense bool [out, in] mask of the stored positions (for inspection only)."""
        return self.to_dense(dtype=torch.bool, values=torch.ones_like(self.values, dtype=torch.bool))

    def to_dense(self, dtype=None, values=None) -> torch.Tensor:
        """Dense [out, in] copy of W (for inspection and tests, never the compute path)."""
        vals = self.values.detach() if values is None else values
        out_f, in_f = self.shape
        b = self.block_size
        rows, cols = self._block_coords()
        dense = torch.zeros(out_f // b, in_f // b, b, b, dtype=dtype or vals.dtype, device=vals.device)
        dense[rows, cols] = vals.reshape(-1, b, b).to(dense.dtype)
        return dense.permute(0, 2, 1, 3).reshape(out_f, in_f)

    # --------------------------------------------------------- constructors
    @classmethod
    def _from_block_mask(cls, shape, block_mask, values_dense, block_size, dtype, device):
        R, C = block_mask.shape
        block_mask = block_mask.to(device=device, dtype=torch.bool)
        counts = block_mask.sum(1)
        row_offsets = torch.zeros(R + 1, dtype=torch.int32, device=device)
        row_offsets[1:] = torch.cumsum(counts, 0)
        nz = torch.nonzero(block_mask)                      # row-major: sorted per row
        col_indices = nz[:, 1].to(torch.int32).contiguous()
        b = block_size
        if values_dense is None:
            vals = torch.zeros(nz.shape[0], b, b, dtype=dtype, device=device)
        else:
            blocks = values_dense.to(device).reshape(R, b, C, b).permute(0, 2, 1, 3)
            vals = blocks[nz[:, 0], nz[:, 1]].to(dtype or values_dense.dtype)
        if b == 1:
            vals = vals.reshape(-1)
        return cls(shape, row_offsets, col_indices, vals.contiguous(), **cls._extra(b))

    @staticmethod
    def _extra(b):
        return {}

    @torch.no_grad()
    def loadable(self, state_dict, prefix: str = ""):
        """Read and check this topology's entries of ``state_dict`` (keys ``prefix + field``), writing nothing.

        Returns ``(tensors, missing)``. ``missing`` lists the absent keys; when it is empty,
        ``tensors`` maps ``values`` and the five index fields to fresh contiguous tensors on
        this weight's device, ``values`` in its dtype, ready to assign (else ``tensors`` is
        None). A malformed entry (not a tensor, wrong ``meta``, wrong dtype or shape, an
        invalid structure or transpose) raises ``ValueError`` naming it.
        """
        missing = [prefix + n for n in _STATE_FIELDS if prefix + n not in state_dict]
        if missing:
            return None, missing
        got = {n: state_dict[prefix + n] for n in _STATE_FIELDS}
        for n, t in got.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"checkpoint entry {prefix + n!r} must be a tensor, got {type(t).__name__}")
        meta = got["meta"]
        if meta.numel() != 3:
            raise ValueError(f"{prefix}meta must hold (out_features, in_features, block_size)")
        if tuple(int(v) for v in meta.tolist()) != tuple(int(v) for v in self.meta.tolist()):
            raise ValueError(f"{prefix}meta is {meta.tolist()} in the checkpoint but this "
                             f"{self.layout.upper()} weight is {self.meta.tolist()} "
                             f"(out_features, in_features, block_size)")
        # Contiguous copies: the kernels take contiguous tensors only, and nothing is shared
        # with the caller's state_dict. Checked before the cast, so an integer `values` is refused.
        loaded = {n: got[n].to(self.values.device, copy=True, memory_format=torch.contiguous_format)
                  for n in ("values",) + _INDEX_FIELDS}
        try:
            check_structure(self.shape, self.block_size, loaded["values"],
                            *(loaded[n] for n in _INDEX_FIELDS))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint entry {prefix!r} has a malformed topology: {exc}") from None
        loaded["values"] = loaded["values"].to(self.values.dtype)
        return loaded, []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        loaded, missing = self.loadable(state_dict, prefix)        # raises before any write
        unexpected_keys.extend(k for k in state_dict
                               if k.startswith(prefix) and k[len(prefix):] not in _STATE_FIELDS)
        if missing:
            missing_keys.extend(missing)
            return
        with torch.no_grad():
            self.values.data = loaded["values"]
        for n in _INDEX_FIELDS:
            setattr(self, n, loaded[n])

    def extra_repr(self) -> str:
        out_f, in_f = self.shape
        bs = f", block_size={self.block_size}" if self.layout == "bsr" else ""
        return f"shape=({out_f}, {in_f}), nnz={self.nnz}, density={self.density:.4f}{bs}"


class CSRTopology(SparseTopology):
    """Unstructured (CSR) sparse weight. ``values`` is ``[nnz]``.

    Args:
        shape: (out_features, in_features).
        row_offsets: int32 [out_features + 1].
        col_indices: int32 [nnz], sorted and unique within each row.
        values: float [nnz].
        validate: check the structure (default True).
    """

    layout = "csr"

    def __init__(self, shape, row_offsets, col_indices, values, validate=True):
        super().__init__(shape, row_offsets, col_indices, values, 1, validate)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, values: torch.Tensor | None = None, dtype=None):
        """Topology with exactly the True positions of ``mask`` [out, in] (bool).

        ``values`` (dense [out, in]) supplies the stored values; zeros if None.
        """
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        dtype = dtype or (values.dtype if values is not None else torch.get_default_dtype())
        return cls._from_block_mask(tuple(mask.shape), mask, values, 1, dtype, mask.device)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, mask: torch.Tensor | None = None):
        """Keep the nonzeros of ``dense`` [out, in] (or exactly the True positions of ``mask``)."""
        return cls.from_mask(dense != 0 if mask is None else mask, dense.detach())

    @classmethod
    def from_torch_sparse(cls, t: torch.Tensor):
        """From a ``torch.sparse_csr`` (or COO) tensor; duplicates are summed, columns sorted."""
        if t.layout == torch.sparse_csr:
            t = t.to_sparse_coo()
        if t.layout != torch.sparse_coo or t.dim() != 2:
            raise TypeError(f"expected a 2-D sparse_csr or sparse_coo tensor, got {t.layout}")
        t = t.coalesce()
        (rows, cols), vals = t.indices(), t.values()
        R = t.shape[0]
        row_offsets = torch.zeros(R + 1, dtype=torch.int32, device=vals.device)
        row_offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=R), 0)
        return cls(tuple(t.shape), row_offsets, cols.to(torch.int32).contiguous(), vals.detach().clone())

    def to_torch_sparse(self) -> torch.Tensor:
        """``torch.sparse_csr`` tensor sharing nothing with this topology."""
        return torch.sparse_csr_tensor(self.row_offsets.clone(), self.col_indices.clone(),
                                       self.values.detach().clone(), self.shape,
                                       check_invariants=False)  # validated already


class BSRTopology(SparseTopology):
    """Block-sparse (BSR) weight with square blocks of ``block_size`` in {4, 8, 16, 32, 64}.

    Args:
        shape: (out_features, in_features), both multiples of block_size.
        row_offsets: int32 [out_features / b + 1] over block rows.
        col_indices: int32 [nnzb] block columns, sorted and unique per block row.
        values: float [nnzb, b, b], block k is W[r*b:(r+1)*b, c*b:(c+1)*b].
        block_size: b.
    """

    layout = "bsr"

    def __init__(self, shape, row_offsets, col_indices, values, block_size=None, validate=True):
        b = block_size if block_size is not None else (values.shape[-1] if values.dim() == 3 else -1)
        super().__init__(shape, row_offsets, col_indices, values, b, validate)

    @staticmethod
    def _extra(b):
        return {"block_size": b}

    @staticmethod
    def _block_mask(mask: torch.Tensor, b: int) -> torch.Tensor:
        R, C = mask.shape[0] // b, mask.shape[1] // b
        return mask.reshape(R, b, C, b).any(dim=3).any(dim=1)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int, values: torch.Tensor | None = None,
                  dtype=None):
        """Blocks that hold any True of ``mask`` [out, in] (bool); values from dense ``values``."""
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise TypeError(f"mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        if block_size not in BSR_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BSR_BLOCK_SIZES}, got {block_size}")
        if mask.shape[0] % block_size or mask.shape[1] % block_size:
            raise ValueError(f"mask shape {tuple(mask.shape)} is not a multiple of block_size={block_size}")
        dtype = dtype or (values.dtype if values is not None else torch.get_default_dtype())
        return cls._from_block_mask(tuple(mask.shape), cls._block_mask(mask, block_size), values,
                                    block_size, dtype, mask.device)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, block_size: int, mask: torch.Tensor | None = None):
        """Keep every block of ``dense`` [out, in] with a nonzero (or a True in ``mask``)."""
        return cls.from_mask(dense != 0 if mask is None else mask, block_size, dense.detach())

    @classmethod
    def from_torch_sparse(cls, t: torch.Tensor):
        """From a ``torch.sparse_bsr`` tensor with square blocks."""
        if t.layout != torch.sparse_bsr:
            raise TypeError(f"expected a sparse_bsr tensor, got {t.layout}")
        vals = t.values()
        if vals.dim() != 3 or vals.shape[1] != vals.shape[2]:
            raise ValueError(f"sparse_bsr blocks must be square, got {tuple(vals.shape[1:])}")
        crow = t.crow_indices().to(torch.int32)
        col = t.col_indices().to(torch.int32)
        b = vals.shape[1]
        # Sort blocks by column within each row (torch does not guarantee it).
        rows = row_ids(crow)
        order = torch.argsort(rows * (t.shape[1] // b + 1) + col.long())
        return cls(tuple(t.shape), crow.contiguous(), col[order].contiguous(),
                   vals[order].detach().clone(), b)

    def to_torch_sparse(self) -> torch.Tensor:
        """``torch.sparse_bsr`` tensor sharing nothing with this topology."""
        return torch.sparse_bsr_tensor(self.row_offsets.clone(), self.col_indices.clone(),
                                       self.values.detach().clone(), self.shape,
                                       check_invariants=False)  # validated already
