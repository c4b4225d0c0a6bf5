"""Per-layer nonzero budgets: ``uniform``, ``er`` and ``erk`` (Evci et al., RigL, 2020).

All layers share one budget ``B = round(density * total)`` over the layers
that are free (not pinned). A layer's density is ``eps * raw`` with

* ``uniform``: raw = 1;
* ``er`` (Erdos-Renyi): raw = (n_in + n_out) / (n_in * n_out);
* ``erk`` (Erdos-Renyi-Kernel): raw = (n_in + n_out + kh + kw) / (n_in * n_out * kh * kw),

each raised to ``power_scale``, and eps solved so the densities sum to B.
A layer whose density would exceed 1 is made dense and the others are
re-solved, as in RigL's ``get_sparsities_erdos_renyi``. The counts are then
made integral in each layer's unit (1 for CSR, b*b for BSR): the total is
exactly B for CSR, and within one block of B otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DISTRIBUTIONS = ("uniform", "er", "erk")


@dataclass(frozen=True)
class LayerShape:
    """The weight of one layer: ``out, in_per_group`` and the kernel (1, 1 for Linear)."""
    out: int
    inp: int
    kh: int = 1
    kw: int = 1

    @property
    def numel(self) -> int:
        return self.out * self.inp * self.kh * self.kw

    def raw(self, distribution: str, power_scale: float = 1.0) -> float:
        if distribution == "uniform":
            return 1.0
        n_in, n_out = self.inp, self.out
        if distribution == "er":
            r = (n_in + n_out) / (n_in * n_out)
        else:
            r = (n_in + n_out + self.kh + self.kw) / (n_in * n_out * self.kh * self.kw)
        return r ** power_scale


def allocate(shapes: dict[str, LayerShape], density: float, distribution: str = "erk",
             pinned: dict[str, float] | None = None, units: dict[str, int] | None = None,
             power_scale: float = 1.0) -> dict[str, int]:
    """Nonzero count (in elements) of every layer.

    Args:
        shapes: layer name -> :class:`LayerShape`.
        density: target density of the free (not pinned) layers, in [0, 1].
        distribution: "uniform", "er" or "erk".
        pinned: layer name -> its own density; these layers are outside the budget.
        units: layer name -> allocation unit (b*b for BSR layers; default 1).
        power_scale: exponent on ERK's raw scores (RigL's ``erk_power_scale``).

    Returns:
        name -> nnz, a multiple of the layer's unit and at most its numel. The
        free layers' total is round(density * their numel), exactly with unit 1.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if not isinstance(density, (int, float)) or math.isnan(density) or not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    pinned, units = dict(pinned or {}), dict(units or {})
    for name, d in pinned.items():
        if name not in shapes:
            raise ValueError(f"pinned layer {name!r} is not among the layers {sorted(shapes)}")
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"pinned density of {name!r} must be in [0, 1], got {d}")
    unit = {n: units.get(n, 1) for n in shapes}
    for n, s in shapes.items():
        if s.numel % unit[n]:
            raise ValueError(f"layer {n!r} has {s.numel} weights, not a multiple of its unit {unit[n]}")

    out = {n: _round_to_unit(pinned[n] * shapes[n].numel, unit[n]) for n in pinned}
    free = [n for n in shapes if n not in pinned]
    budget = int(round(density * sum(shapes[n].numel for n in free)))

    # RigL: saturate the layer(s) with the largest raw score until eps * raw <= 1 everywhere.
    dense: set[str] = set()
    raw = {n: shapes[n].raw(distribution, power_scale) for n in free}
    eps = 0.0
    while True:
        rest = [n for n in free if n not in dense]
        if not rest:
            break
        rhs = budget - sum(shapes[n].numel for n in dense)
        eps = rhs / sum(raw[n] * shapes[n].numel for n in rest)
        top = max(raw[n] for n in rest)
        if eps * top <= 1.0:
            break
        dense.update(n for n in rest if raw[n] == top)
    target = {n: float(shapes[n].numel) if n in dense else eps * raw[n] * shapes[n].numel for n in free}

    # Integral counts in units: floor, then hand the remainder out by largest fraction.
    k = {n: min(int(math.floor(target[n] / unit[n] + 1e-9)), shapes[n].numel // unit[n]) for n in free}
    remainder = budget - sum(k[n] * unit[n] for n in free)
    order = sorted(free, key=lambda n: target[n] / unit[n] - k[n], reverse=True)
    for n in reversed(order):  # rounding noise can overshoot by a unit: take it back
        while remainder < 0 and k[n] > 0:
            k[n] -= 1
            remainder += unit[n]
    progress = True
    while remainder > 0 and progress:
        progress = False
        for n in order:
            if unit[n] <= remainder and k[n] < shapes[n].numel // unit[n]:
                k[n] += 1
                remainder -= unit[n]
                progress = True
                if remainder <= 0:
                    break
    out.update({n: k[n] * unit[n] for n in free})
    return out


def _round_to_unit(x: float, unit: int) -> int:
    return int(round(x / unit)) * unit
