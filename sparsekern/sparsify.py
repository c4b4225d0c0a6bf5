"""Whole-model sparsification: ``sparsify`` swaps every matmul layer it supports for its
genuinely sparse twin at a per-layer budget, and ``densify`` swaps back.

Layers are matched by ``isinstance``, so subclasses count:

=================================  =============================================  ==============
module                             budget layers (names in ``dense_layers`` etc.)  becomes
=================================  =============================================  ==============
``nn.Linear`` (and subclasses)     the module                                     ``SparseLinear``
``nn.Conv2d`` (padding "zeros")    the module                                     ``SparseConv2d``
HF ``pytorch_utils.Conv1D``        the module (weight [in, out])                  ``SparseConv1D``
``nn.MultiheadAttention``          ``<name>.q_proj``, ``.k_proj``, ``.v_proj``     ``SparseMultihead-
                                   ([E, E], [E, kdim], [E, vdim]), ``.out_proj``   Attention``
=================================  =============================================  ==============

Budgets come from :mod:`sparsekern.budget` (uniform, ER, ERK). The target density applies
to the *free* layers; layers kept dense or given a pinned density are outside the budget
(as RigL's custom sparsity map). A free layer that ERK saturates at density 1 stays the
original dense module.

Left dense, and said so in the report (every module holding parameters appears in it):
``dense (kept)`` (``dense_layers``), ``pinned dense``, ``dense (saturated)``, ``dense (tied
to <param>)`` (a weight or bias shared with another module, e.g. GPT-2's ``lm_head`` and
``wte``: both stay dense, so the tie is kept), ``dense (embedding)``, ``dense (norm)`` and
``dense (unsupported type <T>)`` (anything else with parameters, e.g. ``nn.Conv1d``, a
``Conv2d`` with ``padding_mode="reflect"``, an RNN, or raw parameters such as ViT's
``cls_token``). The "all layers" line counts every matmul weight of the model once:
the supported and unsupported matmul types above (Linear, ConvNd, ConvTransposeNd,
Bilinear, RNNs, attention, Conv1D) and, of any other module, its 2-D+ parameters whose
name ends in ``weight``; embeddings, norms and other parameters are listed but not counted.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparsekern.budget import LayerShape, allocate
from sparsekern.nn import SparseConv1D, SparseConv2d, SparseLinear, SparseMultiheadAttention
from sparsekern.nn._common import check_layout
from sparsekern.sampling import random_structure
from sparsekern.nn.attention import dense_projections
from sparsekern.nn.conv1d import is_hf_conv1d

INITS = ("dense", "fanin")
_SPARSE = (SparseLinear, SparseConv2d)
_MATMUL = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm,
          *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))


@dataclass
class LayerReport:
    name: str
    kind: str                 # "Linear", "Conv2d", "Conv1D", "MHA" (a projection), or the module's type
    shape: tuple[int, ...]    # dense weight shape
    numel: int
    nnz: int
    density: float
    status: str               # "sparse", "pinned <d>", "dense (kept)", "dense (saturated)", "dense (tied ...)", ...
    layout: str = "dense"
    in_budget: bool = False   # a free layer of the budget (sparse or saturated)
    matmul: bool = True       # counted in the "all layers" line


@dataclass
class SparsityReport:
    """What :func:`sparsify` did, layer by layer (``str()`` prints a table)."""
    layers: list[LayerReport] = field(default_factory=list)
    distribution: str = "erk"
    target_density: float = 0.0
    budget: int = 0             # target nnz of the free layers

    @property
    def free_nnz(self) -> int:
        return sum(r.nnz for r in self.layers if r.in_budget)

    @property
    def total_nnz(self) -> int:
        """Nonzeros of every matmul weight of the model (dense ones count in full)."""
        return sum(r.nnz for r in self.layers if r.matmul)

    @property
    def total_numel(self) -> int:
        return sum(r.numel for r in self.layers if r.matmul)

    def to_dict(self) -> dict:
        return {"distribution": self.distribution, "target_density": self.target_density,
                "budget": self.budget, "free_nnz": self.free_nnz, "total_nnz": self.total_nnz,
                "total_numel": self.total_numel, "layers": [asdict(r) for r in self.layers]}

    def __str__(self) -> str:
        width = max([28] + [len(r.name) for r in self.layers])
        kw = max([7] + [len(r.kind) for r in self.layers])
        head = f"{'layer':<{width}} {'kind':<{kw}} {'shape':<20} {'nnz':>10} {'density':>8}  status"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(f"{r.name:<{width}} {r.kind:<{kw}} {str(list(r.shape)):<20} {r.nnz:>10} "
                        f"{r.density:>8.4f}  {r.status}{'' if r.layout == 'dense' else ' ' + r.layout}"
                        f"{'' if r.matmul else '  (not a matmul weight)'}")
        rows.append(f"free layers: {self.free_nnz} nnz (budget {self.budget}, {self.distribution}); "
                    f"all layers: {self.total_nnz}/{self.total_numel} = "
                    f"{self.total_nnz / max(self.total_numel, 1):.4f}")
        return "\n".join(rows)


@dataclass
class _Unit:
    """One layer of the budget: ``source`` is the dense module to convert (for an attention
    projection, a dense copy of it; ``parent`` is then the attention module and ``part`` its name)."""
    name: str
    kind: str
    source: nn.Module
    shape: LayerShape
    params: tuple                       # the parameters it reads (for tie detection)
    parent: nn.Module | None = None
    part: str = ""


def _matches(name: str, module: nn.Module, selectors) -> bool:
    for s in selectors:
        if isinstance(s, nn.Module) and s is module:
            return True
        if isinstance(s, str) and (name == s or fnmatch.fnmatchcase(name, s)):
            return True
    return False


def _weight_shape(u: _Unit) -> tuple[int, ...]:
    return tuple(u.source.weight.shape)


def _units(name: str, m: nn.Module) -> list[_Unit] | None:
    """The budget layers of module ``m``, or None if it is not a supported matmul layer."""
    own = tuple(p for p in m.parameters(recurse=False))
    if isinstance(m, nn.MultiheadAttention):
        parts = dense_projections(m)
        shared = tuple(m.parameters())
        return [_Unit(f"{name}.{p}", "MHA", lin, LayerShape(lin.out_features, lin.in_features),
                      shared if p != "out_proj" else tuple(m.out_proj.parameters()), m, p)
                for p, lin in parts.items()]
    if isinstance(m, nn.Linear):
        return [_Unit(name, "Linear", m, LayerShape(m.out_features, m.in_features), own)]
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return [_Unit(name, "Conv2d", m, LayerShape(m.out_channels, m.in_channels // m.groups, kh, kw), own)]
    if is_hf_conv1d(m):
        return [_Unit(name, "Conv1D", m, LayerShape(m.nf, m.nx), own)]
    return None


def _owners(model: nn.Module) -> dict[int, list[tuple[int, str]]]:
    """id(parameter) -> [(id(module), "module.param")] over every module reference (shared too)."""
    owners: dict[int, list[tuple[int, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((id(mod), f"{mname}.{pname}" if mname else pname))
    return owners


def _tied_to(params, module_ids: set[int], owners) -> str | None:
    """The name of another module's reference to one of ``params``, if any (a tie)."""
    for p in params:
        for mid, pname in owners.get(id(p), []):
            if mid not in module_ids:
                return pname
    return None


def _other_row(name: str, m: nn.Module) -> LayerReport | None:
    """The report row of a module with parameters that ``sparsify`` does not convert."""
    params = dict(m.named_parameters(recurse=False))
    if not params:
        return None
    numel = sum(p.numel() for p in params.values())
    w = params.get("weight")
    shape = tuple(w.shape) if w is not None else (numel,)
    kind = type(m).__name__
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return LayerReport(name, kind, shape, numel, numel, 1.0, "dense (embedding)", matmul=False)
    if isinstance(m, _NORMS) or ("Norm" in kind and all(p.dim() <= 1 for p in params.values())):
        return LayerReport(name, kind, shape, numel, numel, 1.0, "dense (norm)", matmul=False)
    # matmul weights: every "*weight*" parameter of a known matmul type (an RNN has several);
    # of any other module, the 2-D+ ones named "*weight"
    known = isinstance(m, _MATMUL)
    weights = [p for n, p in params.items() if ("weight" in n if known else n.endswith("weight")) and p.dim() >= 2]
    mat = sum(p.numel() for p in weights)
    if len(weights) == 1:
        shape = tuple(weights[0].shape)
    return LayerReport(name, kind, shape, mat or numel, mat or numel, 1.0, f"dense (unsupported type {kind})",
                       matmul=bool(mat))


def _selected(u: _Unit, selectors) -> bool:
    """``u`` is named (or its attention module is named) by one of ``selectors``."""
    return _matches(u.name, u.source, selectors) or (
        u.parent is not None and _matches(u.name.rsplit(".", 1)[0], u.parent, selectors))


def _walk(model: nn.Module) -> list:
    """Every budget unit (:class:`_Unit`) and a report row for every other module holding
    parameters, in module order."""
    entries: list = []
    inside: set[int] = set()            # modules owned by a converted parent (an attention's out_proj)
    for n, m in model.named_modules():
        if id(m) in inside:
            continue
        if isinstance(m, (nn.MultiheadAttention, SparseMultiheadAttention)) and m.bias_k is not None:
            entries.append(LayerReport(f"{n}.bias_k/bias_v", "MHA", (2, m.embed_dim), 2 * m.embed_dim,
                                       2 * m.embed_dim, 1.0, "dense (attention bias)", matmul=False))
        if isinstance(m, SparseMultiheadAttention):
            continue                    # its projections are modules of their own
        if isinstance(m, _SPARSE):
            inside.update(id(c) for c in m.modules())
            entries.append(LayerReport(n, type(m).__name__, tuple(m.weight.shape), m.weight.numel(), m.nnz,
                                       m.density, "sparse (before sparsify)", m.topology.layout))
            continue
        units = _units(n, m)
        if units is None:
            row = _other_row(n, m)
            if row is not None:
                entries.append(row)
            continue
        inside.update(id(c) for c in m.modules())
        entries.extend(units)
    return entries


def _dense_reasons(model: nn.Module, units: list[_Unit], dense_layers) -> dict[str, str]:
    """Unit name -> why it stays dense and outside the budget: kept, tied, or unsupported."""
    owners = _owners(model)
    reason = {}
    for u in units:
        module = u.parent if u.parent is not None else u.source
        if _selected(u, dense_layers):
            reason[u.name] = "dense (kept)"
        elif (tie := _tied_to(u.params, {id(c) for c in module.modules()}, owners)) is not None:
            reason[u.name] = f"dense (tied to {tie})"
        elif isinstance(u.source, nn.Conv2d) and u.source.padding_mode != "zeros":
            reason[u.name] = f"dense (unsupported type Conv2d, padding_mode={u.source.padding_mode!r})"
    return reason


def sparsify(model: nn.Module, density: float, distribution: str = "erk", *,
             dense_layers=(), densities: dict[str, float] | None = None, init: str = "dense",
             init_scale: float = 2.0, layout: str = "csr", block_size: int | None = None,
             backend: str = "auto", power_scale: float = 1.0,
             generator: torch.Generator | None = None) -> SparsityReport:
    """Replace, in place, every supported matmul layer of ``model`` by its sparse twin (see the
    module doc for which layers, and which stay dense and why).

    Args:
        model: any module; it is modified in place.
        density: target density of the free layers, in [0, 1].
        distribution: "uniform", "er" or "erk" (see :mod:`sparsekern.budget`).
        dense_layers: names (fnmatch patterns allowed, e.g. ``"conv1"``,
            ``"*.downsample.0"``, ``"*.self_attn.out_proj"``; an attention module's name keeps
            all four of its projections) or module objects to keep dense.
        densities: layer name -> pinned density (outside the budget).
        init: "dense" keeps each layer's current (dense) init on the kept
            positions; "fanin" redraws the kept weights as N(0, scale / f_i)
            with f_i output neuron i's own nonzero fan-in (Evci et al., 2020).
        init_scale: the ``scale`` of "fanin" (2.0: He, for ReLU; 1.0: unit variance).
        layout, block_size: "csr", or "bsr" with a block size; a layer whose
            weight does not tile into blocks falls back to CSR (see the report).
        backend: the sparse modules' backend.
        generator: for the random topologies and the init.

    Returns:
        A :class:`SparsityReport` with each layer's shape, nnz, density and status.
        The free layers' total nnz is exactly round(density * their weights)
        for CSR, and within one block of it for BSR.
    """
    check_layout(layout, block_size)
    if _units("", model) is not None:
        raise ValueError("sparsify replaces submodules in place; wrap a bare layer in nn.Sequential "
                         "or use SparseLinear/SparseConv2d.from_dense")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    densities = dict(densities or {})
    entries = _walk(model)              # budget units and rows for everything else, in module order
    units = [u for u in entries if isinstance(u, _Unit)]
    known = {u.name for u in units}
    for n in densities:
        if n not in known:
            raise ValueError(f"densities names {n!r}, which is not an nn.Linear/nn.Conv2d/Conv1D/attention "
                             f"projection of the model; layers are: {sorted(known)}")
    for s in dense_layers:
        if isinstance(s, str) and not any(_selected(u, [s]) for u in units):
            raise ValueError(f"dense_layers entry {s!r} matches no layer sparsify can convert; "
                             f"layers are: {sorted(known)}")
    reason = _dense_reasons(model, units, dense_layers)
    for n in densities:
        if n in reason:
            raise ValueError(f"layer {n!r} has a pinned density but stays {reason[n]}")

    active = [u for u in units if u.name not in reason]
    shapes = {u.name: u.shape for u in active}
    layouts, unit_size = {}, {}
    for n, s in shapes.items():
        rows, cols = s.out, s.inp * s.kh * s.kw
        b = block_size if layout == "bsr" else 1
        layouts[n] = layout if rows % b == 0 and cols % b == 0 else "csr"
        unit_size[n] = b * b if layouts[n] == "bsr" else 1
    counts = allocate(shapes, density, distribution, pinned=densities, units=unit_size, power_scale=power_scale)
    budget = int(round(density * sum(s.numel for n, s in shapes.items() if n not in densities)))

    report = SparsityReport(distribution=distribution, target_density=density, budget=budget)
    new: dict[int, nn.Module] = {}
    attention_parts: dict[int, dict[str, nn.Module]] = {}
    counted: set[int] = set()           # matmul weights in the "all layers" line: a tied one once
    for e in entries:
        if isinstance(e, LayerReport):
            report.layers.append(e)
            continue
        u, s = e, e.shape
        if u.parent is None:
            if id(u.source.weight) in counted:
                report.layers.append(LayerReport(u.name, u.kind, _weight_shape(u), s.numel, s.numel, 1.0,
                                                 reason[u.name], matmul=False))
                continue
            counted.add(id(u.source.weight))
        if u.parent is not None:
            attention_parts.setdefault(id(u.parent), {"_mha": u.parent})[u.part] = u.source
        if u.name in reason or counts[u.name] == s.numel:
            status = reason.get(u.name) or ("pinned dense" if u.name in densities else "dense (saturated)")
            report.layers.append(LayerReport(u.name, u.kind, _weight_shape(u), s.numel, s.numel, 1.0, status,
                                             in_budget=u.name not in reason and u.name not in densities))
            continue
        b = block_size if layouts[u.name] == "bsr" else 1
        structure = random_structure(s.out // b, s.inp * s.kh * s.kw // b, counts[u.name] // (b * b), generator)
        sm = _convert(u, structure, layouts[u.name], block_size if layouts[u.name] == "bsr" else None, backend)
        if init == "fanin":
            sm.init_fanin_normal(init_scale, generator)
        if u.parent is not None:
            attention_parts[id(u.parent)][u.part] = sm
        else:
            new[id(u.source)] = sm
        status = f"pinned {densities[u.name]:g}" if u.name in densities else "sparse"
        report.layers.append(LayerReport(u.name, u.kind, _weight_shape(u), s.numel, sm.nnz, sm.nnz / s.numel,
                                         status, layouts[u.name], in_budget=u.name not in densities))
    for parts in attention_parts.values():
        mha = parts.pop("_mha")
        if any(isinstance(p, SparseLinear) for p in parts.values()):
            new[id(mha)] = SparseMultiheadAttention.from_dense(mha, parts)
    _replace(model, new)
    _bypass_nested_tensor_fast_path(model)
    return report


def _convert(u: _Unit, structure, layout: str, block_size, backend) -> nn.Module:
    """The sparse twin of ``u.source`` keeping exactly ``structure`` ((row_offsets, col_indices) of
    its [out, in] matrix, block units for BSR; for a Conv1D, of W^T): O(nnz), no mask."""
    cls = {"Conv1D": SparseConv1D, "Conv2d": SparseConv2d}.get(u.kind, SparseLinear)
    return cls.from_dense(u.source, structure=structure, layout=layout, block_size=block_size, backend=backend)


def _replace(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Point every parent's attribute that holds an old module at its replacement (shared ones too)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):   # every name, shared ones too
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])


def _bypass_nested_tensor_fast_path(model: nn.Module) -> None:
    """``nn.TransformerEncoder`` decides at construction whether eval mode may turn its input
    into a nested tensor; it would not have with a layer whose attention has separate
    projections (``_qkv_same_embed_dim`` False), so neither may it now."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), SparseMultiheadAttention) for layer in m.layers):
            m.use_nested_tensor = False


def densify(model: nn.Module) -> int:
    """Replace, in place, every sparse layer (``SparseLinear``, ``SparseConv2d``, ``SparseConv1D``)
    by its dense ``to_dense()``, and every ``SparseMultiheadAttention`` by an
    ``nn.MultiheadAttention`` with its projections' dense weights; returns how many modules."""
    new = {}
    for m in model.modules():
        if isinstance(m, SparseMultiheadAttention):
            new[id(m)] = _dense_attention(m)
        elif isinstance(m, (SparseLinear, SparseConv2d)) and id(m) not in new:
            new[id(m)] = m.to_dense()
    inner = {id(c) for m in model.modules() if isinstance(m, SparseMultiheadAttention) for c in m.modules()
             if c is not m}
    new = {k: v for k, v in new.items() if k not in inner}
    _replace(model, new)
    return len(new)


def _dense_attention(m: SparseMultiheadAttention) -> nn.MultiheadAttention:
    parts = {p: getattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    parts = {p: (lin.to_dense() if isinstance(lin, SparseLinear) else lin) for p, lin in parts.items()}
    q = parts["q_proj"]
    bias = q.bias is not None
    mha = nn.MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=bias,
                                add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn,
                                kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first,
                                device=q.weight.device, dtype=q.weight.dtype)
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([parts[p].weight for p in ("q_proj", "k_proj", "v_proj")]))
        else:
            for p in ("q_proj", "k_proj", "v_proj"):
                getattr(mha, f"{p}_weight").copy_(parts[p].weight)
        if bias:
            mha.in_proj_bias.copy_(torch.cat([parts[p].bias for p in ("q_proj", "k_proj", "v_proj")]))
        mha.out_proj.weight.copy_(parts["out_proj"].weight)
        if mha.out_proj.bias is not None:
            mha.out_proj.bias.copy_(parts["out_proj"].bias)
        if m.bias_k is not None:
            mha.bias_k.copy_(m.bias_k)
            mha.bias_v.copy_(m.bias_v)
    return mha
