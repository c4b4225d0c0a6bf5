"""Whole-model sparsification: ``sparsify`` swaps every ``nn.Linear``/``nn.Conv2d``
for its genuinely sparse twin at a per-layer budget, and ``densify`` swaps back.

Budgets come from :mod:`sparsekern.budget` (uniform, ER, ERK). The target
density applies to the *free* layers; layers kept dense or given a pinned
density are outside the budget (as RigL's custom sparsity map). A free layer
that ERK saturates at density 1 stays the original dense module.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sparsekern.budget import LayerShape, allocate
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.nn._common import check_layout, random_mask

INITS = ("dense", "fanin")


@dataclass
class LayerReport:
    name: str
    kind: str                 # "Linear" or "Conv2d"
    shape: tuple[int, ...]    # dense weight shape
    numel: int
    nnz: int
    density: float
    status: str               # "sparse", "dense (kept)", "dense (saturated)"
    layout: str = "dense"


@dataclass
class SparsityReport:
    """What :func:`sparsify` did, layer by layer (``str()`` prints a table)."""
    layers: list[LayerReport] = field(default_factory=list)
    distribution: str = "erk"
    target_density: float = 0.0
    budget: int = 0             # target nnz of the free layers

    @property
    def free_nnz(self) -> int:
        return sum(r.nnz for r in self.layers if r.status != "dense (kept)" and not r.status.startswith("pinned"))

    @property
    def total_nnz(self) -> int:
        return sum(r.nnz for r in self.layers)

    @property
    def total_numel(self) -> int:
        return sum(r.numel for r in self.layers)

    def to_dict(self) -> dict:
        return {"distribution": self.distribution, "target_density": self.target_density,
                "budget": self.budget, "free_nnz": self.free_nnz, "total_nnz": self.total_nnz,
                "total_numel": self.total_numel, "layers": [asdict(r) for r in self.layers]}

    def __str__(self) -> str:
        head = f"{'layer':<28} {'kind':<7} {'shape':<20} {'nnz':>10} {'density':>8}  status"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(f"{r.name:<28} {r.kind:<7} {str(list(r.shape)):<20} {r.nnz:>10} "
                        f"{r.density:>8.4f}  {r.status}{'' if r.layout == 'dense' else ' ' + r.layout}")
        rows.append(f"free layers: {self.free_nnz} nnz (budget {self.budget}, {self.distribution}); "
                    f"all layers: {self.total_nnz}/{self.total_numel} = "
                    f"{self.total_nnz / max(self.total_numel, 1):.4f}")
        return "\n".join(rows)


def _matches(name: str, module: nn.Module, selectors) -> bool:
    for s in selectors:
        if isinstance(s, nn.Module) and s is module:
            return True
        if isinstance(s, str) and (name == s or fnmatch.fnmatchcase(name, s)):
            return True
    return False


def _shape(m: nn.Module) -> LayerShape:
    if isinstance(m, nn.Linear):
        return LayerShape(m.out_features, m.in_features)
    kh, kw = m.kernel_size
    return LayerShape(m.out_channels, m.in_channels // m.groups, kh, kw)


def _replace(model: nn.Module, new: dict[int, nn.Module]) -> None:
    """Point every parent's attribute that holds an old module at its replacement (shared ones too)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):   # every name, shared ones too
            if id(child) in new:
                setattr(parent, child_name, new[id(child)])


def sparsify(model: nn.Module, density: float, distribution: str = "erk", *,
             dense_layers=(), densities: dict[str, float] | None = None, init: str = "dense",
             init_scale: float = 2.0, layout: str = "csr", block_size: int | None = None,
             backend: str = "auto", power_scale: float = 1.0,
             generator: torch.Generator | None = None) -> SparsityReport:
    """Replace, in place, every ``nn.Linear``/``nn.Conv2d`` of ``model`` by its sparse twin.

    Args:
        model: any module; it is modified in place.
        density: target density of the free layers, in [0, 1].
        distribution: "uniform", "er" or "erk" (see :mod:`sparsekern.budget`).
        dense_layers: names (fnmatch patterns allowed, e.g. ``"conv1"``,
            ``"*.downsample.0"``) or module objects to keep dense.
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
        A :class:`SparsityReport` with each layer's shape, nnz and density.
        The free layers' total nnz is exactly round(density * their weights)
        for CSR, and within one block of it for BSR.
    """
    check_layout(layout, block_size)
    if type(model) in (nn.Linear, nn.Conv2d):
        raise ValueError("sparsify replaces submodules in place; wrap a bare layer in nn.Sequential "
                         "or use SparseLinear/SparseConv2d.from_dense")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    densities = dict(densities or {})
    candidates = [(n, m) for n, m in model.named_modules()
                  if type(m) in (nn.Linear, nn.Conv2d)]
    known = {n for n, _ in candidates}
    for n in densities:
        if n not in known:
            raise ValueError(f"densities names {n!r}, which is not an nn.Linear/nn.Conv2d of the model; "
                             f"layers are: {sorted(known)}")
    keep = {n for n, m in candidates if _matches(n, m, dense_layers)}
    for s in dense_layers:
        if isinstance(s, str) and not any(n == s or fnmatch.fnmatchcase(n, s) for n in known):
            raise ValueError(f"dense_layers entry {s!r} matches no nn.Linear/nn.Conv2d; layers are: {sorted(known)}")
    for n, m in candidates:
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros" and n not in keep:
            raise ValueError(f"layer {n!r} uses padding_mode={m.padding_mode!r}; SparseConv2d supports "
                             f"'zeros' only: list it in dense_layers")

    active = [(n, m) for n, m in candidates if n not in keep]
    shapes = {n: _shape(m) for n, m in active}
    layouts, units = {}, {}
    for n, s in shapes.items():
        rows, cols = s.out, s.inp * s.kh * s.kw
        b = block_size if layout == "bsr" else 1
        layouts[n] = layout if rows % b == 0 and cols % b == 0 else "csr"
        units[n] = b * b if layouts[n] == "bsr" else 1
    counts = allocate(shapes, density, distribution, pinned=densities, units=units, power_scale=power_scale)
    budget = int(round(density * sum(s.numel for n, s in shapes.items() if n not in densities)))

    report = SparsityReport(distribution=distribution, target_density=density, budget=budget)
    new: dict[int, nn.Module] = {}
    for n, m in candidates:
        s = _shape(m)
        kind = "Linear" if isinstance(m, nn.Linear) else "Conv2d"
        if n in keep or counts[n] == s.numel:
            status = "dense (kept)" if n in keep else (
                "pinned dense" if n in densities else "dense (saturated)")
            report.layers.append(LayerReport(n, kind, tuple(m.weight.shape), s.numel, s.numel, 1.0, status))
            continue
        b = block_size if layouts[n] == "bsr" else 1
        rows, cols = s.out, s.inp * s.kh * s.kw
        mask = random_mask(rows, cols, b, count=counts[n] // (b * b), generator=generator)
        bs = block_size if layouts[n] == "bsr" else None
        cls = SparseLinear if kind == "Linear" else SparseConv2d
        sm = cls.from_dense(m, mask=mask.to(m.weight.device), layout=layouts[n], block_size=bs, backend=backend)
        if init == "fanin":
            sm.init_fanin_normal(init_scale, generator)
        new[id(m)] = sm
        status = f"pinned {densities[n]:g}" if n in densities else "sparse"
        report.layers.append(LayerReport(n, kind, tuple(m.weight.shape), s.numel, sm.nnz,
                                         sm.nnz / s.numel, status, layouts[n]))
    _replace(model, new)
    return report


def densify(model: nn.Module) -> int:
    """Replace, in place, every ``SparseLinear``/``SparseConv2d`` by its dense ``to_dense()``; returns how many."""
    new = {id(m): m.to_dense() for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d))}
    _replace(model, new)
    return len(new)
