"""Masked-dense RigL and SET: the test oracle (and the benchmark's baseline), never the product.

A dense ``nn.Linear``/``nn.Conv2d`` model whose weights are multiplied by a
0/1 mask after every optimizer step, with gradients masked by a hook: what
rigl-torch and sparse_learning do. It makes the same choices as
:mod:`sparsekern.dst.engine` in the same order (same schedule, stable
magnitude drop in row-major position order, same random stream per layer, RigL
scores from the unmasked dense gradient, ties to the lower position, NaN/Inf ranked
last and all-NaN/Inf layers skipped: the selection functions are the engine's own,
:mod:`sparsekern.dst.selection`; RigL here scores the whole dense gradient as one tile), so
with equal data and seed both must arrive at identical topologies. Masked entries are
set to exactly 0 (not multiplied by 0, which would keep a NaN). CSR (unstructured) layers only.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsekern.dst.selection import NonFiniteScores, is_update, pick_drop, rigl_grow, sample_free, scheduled_fraction

METHODS = ("set", "rigl")


class MaskedDenseDST:
    """Args:
        model: dense model; ``masks`` maps layer names (of ``model.named_modules()``) to
            bool [out, in/groups*kh*kw] masks (the others stay dense).
        optimizer, total_steps, update_every, drop_fraction, schedule, stop_at, seed: as the engine.
        method: "set" or "rigl".
    """

    def __init__(self, model: nn.Module, optimizer, masks: dict, total_steps: int, update_every: int = 100,
                 drop_fraction: float = 0.3, schedule: str = "cosine", stop_at: float = 0.75, seed: int = 0,
                 method: str = "rigl"):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        mods = dict(model.named_modules())
        self.layers = [(n, mods[n]) for n, _ in model.named_modules() if n in masks]
        self.masks = {n: masks[n].reshape(mods[n].weight.shape[0], -1).clone() for n, _ in self.layers}
        self.optimizer, self.method = optimizer, method
        self.total_steps, self.update_every, self.drop_fraction = total_steps, update_every, drop_fraction
        self.schedule, self.stop_at = schedule, stop_at
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.dense_grad: dict[str, torch.Tensor] = {}
        for n, m in self.layers:
            m.weight.register_hook(self._mask_grad(n))
        self.apply_masks()

    def _mask_grad(self, name):
        def hook(g):
            self.dense_grad[name] = g.detach().reshape(g.shape[0], -1).clone()   # unmasked, for RigL
            return g.masked_fill(~self.masks[name].reshape(g.shape), 0)
        return hook

    @torch.no_grad()
    def apply_masks(self) -> None:
        for n, m in self.layers:
            m.weight.masked_fill_(~self.masks[n].reshape(m.weight.shape), 0)

    def step(self) -> bool:
        self.step_count += 1
        self.apply_masks()
        if not is_update(self.step_count, self.update_every, self.total_steps, self.stop_at):
            return False
        f = scheduled_fraction(self.step_count, self.total_steps, self.drop_fraction, self.schedule, self.stop_at)
        with torch.no_grad():
            for n, m in self.layers:
                mask = self.masks[n]
                flat = mask.flatten()
                active = torch.nonzero(flat).flatten()
                k = min(int(round(f * active.numel())), active.numel())
                if k == 0:
                    continue
                w = m.weight.reshape(mask.shape[0], -1).flatten()
                try:
                    dropped = active[pick_drop(w[active].abs(), k)]
                    keep = flat.clone()
                    keep[dropped] = False
                    kept = torch.nonzero(keep).flatten()            # ascending
                    if self.method == "set":
                        grown = sample_free(flat.numel(), kept, k, self.generator)
                    else:
                        grown = rigl_grow(self.dense_grad[n].flatten().abs(), kept, k)
                except NonFiniteScores:                 # the engine skips such a layer too
                    continue
                new = keep.clone()
                new[grown] = True
                fresh = torch.zeros_like(flat)
                fresh[grown] = True
                # grown weights start at 0 and with fresh optimizer state, as in the sparse engine
                reset = ~(new & ~fresh).reshape(m.weight.shape)
                m.weight.masked_fill_(reset, 0)
                for v in self.optimizer.state.get(m.weight, {}).values():
                    if torch.is_tensor(v) and v.shape == m.weight.shape:
                        v.masked_fill_(reset, 0)
                self.masks[n] = new.reshape(mask.shape)
        self.dense_grad.clear()
        return True
