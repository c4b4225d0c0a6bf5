"""Sup-tickets (Yin et al. 2022): superpose the tickets of a cyclic phase into one sparse model.

The last ``cycle_fraction`` of training is a cyclic phase. The ordinary DST
updates stop; the learning rate runs a cosine from ``lr_high`` down to ``lr_low``
in every cycle of ``cycle_length`` epochs; each cycle starts with a drop-and-regrow
of ``cycle_drop`` of every layer's nonzeros (by the engine's own grow rule: RigL's
gradient, SET's random draw). At each cycle end the current subnetwork (a ticket)
is superposed into a running model at the sparse level
(:func:`sparsekern.methods.superpose.superpose`): ``"caa"`` keeps the cumulative
average, with the model at the end of pretraining as ticket 0; ``"cima"`` an
exponential moving average with factor 0.5. The union is pruned back to exactly
each layer's nnz, BatchNorm statistics of the running model are recomputed
(``torch.optim.swa_utils.update_bn``), and training continues from the
un-averaged current model. The result is the superposed model::

    engine = sparsekern.dst.RigL(model, opt, total_steps)
    sup = SupTickets(model, engine, total_steps, steps_per_epoch, lr=0.1, bn_batches=lambda: loader)
    for step in range(total_steps):
        for g in opt.param_groups:
            g["lr"] = sup.lr(step)
        ...; opt.step(); engine.step(); sup.after_step()
    final = sup.result()
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
from torch import nn

from sparsekern.dst.engine import DSTEngine
from sparsekern.methods.superpose import superpose

MODES = ("caa", "cima")


class SupTickets:
    """Cyclic phase and ticket superposition on top of a :class:`~sparsekern.dst.engine.DSTEngine`.

    Args:
        model: the sparse model being trained (its layers are the engine's).
        engine: the DST engine; its scheduled updates are frozen for the cyclic phase.
        total_steps: training steps planned; steps_per_epoch: for ``cycle_length``.
        lr: the base learning rate (pretraining runs a cosine from it down to ``lr_low``).
        cycle_fraction: share of training given to the cyclic phase, in (0, 1).
        cycle_length: epochs per cycle (>= 1); the phase holds
            ``max(1, round(cycle_fraction * total_steps / cycle_steps))`` cycles.
        lr_low, lr_high: the cycle's range (defaults ``lr/100`` and ``lr/20``, the
            paper's 0.001/0.005 for a base of 0.1).
        cycle_drop: fraction of each layer's nnz dropped and regrown at each cycle start.
        mode: "caa" or "cima".
        bn_batches: callable returning an iterable of input batches (tensors or
            ``(x, y)`` pairs) for the BatchNorm recomputation; None skips it (no BN).
    """

    def __init__(self, model: nn.Module, engine: DSTEngine, total_steps: int, steps_per_epoch: int, lr: float,
                 cycle_fraction: float = 0.1, cycle_length: int = 1, lr_low: float | None = None,
                 lr_high: float | None = None, cycle_drop: float = 0.5, mode: str = "caa",
                 bn_batches: Callable[[], Iterable] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 < cycle_fraction < 1.0:
            raise ValueError(f"cycle_fraction must be in (0, 1), got {cycle_fraction!r}")
        if not isinstance(cycle_length, int) or cycle_length < 1:
            raise ValueError(f"cycle_length must be an int >= 1 (epochs), got {cycle_length!r}")
        if not 0.0 < cycle_drop < 1.0:
            raise ValueError(f"cycle_drop must be in (0, 1), got {cycle_drop!r}")
        self.model, self.engine, self.mode, self.bn_batches = model, engine, mode, bn_batches
        self.total_steps, self.base_lr = total_steps, lr
        self.lr_low = lr / 100 if lr_low is None else lr_low
        self.lr_high = lr / 20 if lr_high is None else lr_high
        self.cycle_steps = cycle_length * steps_per_epoch
        self.n_cycles = max(1, round(cycle_fraction * total_steps / self.cycle_steps))
        self.cyclic_start = total_steps - self.n_cycles * self.cycle_steps
        if self.cyclic_start < 1:
            raise ValueError(f"{self.n_cycles} cycles of {self.cycle_steps} steps do not fit in {total_steps} "
                             f"steps with any pretraining; lower cycle_length or cycle_fraction")
        engine.freeze(self.cyclic_start + 1)
        for c in range(self.n_cycles):
            step = self.cyclic_start + c * self.cycle_steps + 1
            if step > engine.step_count:
                engine.force_update(step, cycle_drop)
        self.running: nn.Module | None = None
        self.tickets = 0          # tickets superposed into `running`, ticket 0 included
        self.log: list[dict] = []

    # ------------------------------------------------------------------ LR
    def lr(self, step: int) -> float:
        """Learning rate for training step ``step`` (0-based)."""
        if step < self.cyclic_start:
            t = step / self.cyclic_start
            return self.lr_low + (self.base_lr - self.lr_low) * 0.5 * (1 + math.cos(math.pi * t))
        t = ((step - self.cyclic_start) % self.cycle_steps) / self.cycle_steps
        return self.lr_low + (self.lr_high - self.lr_low) * 0.5 * (1 + math.cos(math.pi * t))

    def in_cyclic_phase(self, step: int) -> bool:
        return step >= self.cyclic_start

    # -------------------------------------------------------------- tickets
    def after_step(self) -> bool:
        """Call once per step after ``engine.step()``. Returns True when a ticket was superposed."""
        s = self.engine.step_count
        if s == self.cyclic_start:
            self.running = copy.deepcopy(self.model)
            self.tickets = 1
            self.log.append({"step": s, "event": "ticket 0 (end of pretraining)"})
            return False
        if s > self.cyclic_start and (s - self.cyclic_start) % self.cycle_steps == 0 and self.running is not None:
            k = self.tickets
            w_run, w_new = (k / (k + 1), 1 / (k + 1)) if self.mode == "caa" else (0.5, 0.5)
            superpose(self.running, self.model, w_run, w_new)
            self.recompute_bn(self.running)
            self.tickets += 1
            self.log.append({"step": s, "event": f"ticket {k} superposed", "weights": [w_run, w_new]})
            return True
        return False

    def recompute_bn(self, model: nn.Module) -> None:
        if self.bn_batches is None or not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                              for m in model.modules()):
            return
        torch.optim.swa_utils.update_bn(self.bn_batches(), model)

    def result(self) -> nn.Module:
        """The superposed model (the current model if no cycle has ended yet)."""
        return self.running if self.tickets > 1 else self.model

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"tickets": self.tickets, "log": list(self.log),
                "running": None if self.running is None else self.running.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tickets, self.log = int(state["tickets"]), list(state["log"])
        if state["running"] is not None:
            self.running = copy.deepcopy(self.model)
            self.running.load_state_dict(state["running"])
