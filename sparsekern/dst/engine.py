"""Dynamic sparse training: RigL, SET and Static, on genuinely sparse layers.

The engine edits each ``SparseLinear``/``SparseConv2d`` topology in place (see
:mod:`sparsekern.dst.rebuild`) at a fixed nonzero budget: there is no dense
weight and no mask multiply. Use it like a second optimizer::

    dst = sparsekern.dst.RigL(model, optimizer, total_steps, update_every=100,
                              drop_fraction=0.3, schedule="cosine", stop_at=0.75)
    for x, y in data:
        loss_fn(model(x), y).backward()
        optimizer.step()
        dst.step()            # after optimizer.step(); every update_every steps it rewires
        optimizer.zero_grad()

An update step still applies the optimizer step: ``dst.step()`` runs after it
and then drops and grows (RigL's reference skips the optimizer step on update
steps; here every batch trains, and the grown weights start at exactly 0).

Per update and per layer, ``k = round(f_t * nnz)`` (block) entries are dropped,
the smallest by magnitude (L2 norm of the block for BSR), and ``k`` are grown
among all positions not kept (so a dropped position may come straight back):
RigL by the largest dense-gradient magnitude, SET at random. ``f_t`` decays from
``drop_fraction`` by a cosine (or stays constant) and no update happens after
``stop_at * total_steps``. Optimizer state moves with the values.

NaN and Inf never win a selection: a non-finite weight is dropped before any
finite one, and a non-finite gradient score is grown only when no finite free
position is left, so every layer keeps exactly its nnz. A layer whose
magnitudes (or, for RigL, gradient scores) are all non-finite has nothing to be
ranked by: that update leaves it as it is and records ``"skipped"`` (the
reason) in ``history`` and :meth:`DSTEngine.diagnostics`.

RigL's growth gradient: for the step before an update only, each layer's
:class:`~sparsekern.dst.capture.Tap` keeps the (input, output gradient) pairs of every
forward and backward of that step (all micro-batches under gradient accumulation; a
forward without a backward, e.g. evaluation under ``no_grad``, adds nothing; it works under
``torch.compile``). The dense weight gradient is never formed whole:
:mod:`sparsekern.dst.growth` computes it a tile of rows at a time (dY^T X, or
``conv2d_weight``, per tile) and keeps an exact running top-k of the free positions, so an
update needs O(nnz + batch * (in + out)) memory (the tile follows ``growth_memory``) and
costs about one dense GEMM of the layer every ``update_every`` steps, i.e. about
``1 / (density * update_every)`` of a sparse forward per step (0.1 at 90% sparsity,
update_every=100). Under ``torch.distributed`` the ranks all-gather the captured
activations (or all-reduce tile by tile, whichever moves fewer bytes: ``ddp_scores``)
and the random streams are seeded alike, so every rank takes the same decision with no
dense tensor reduced or held.

Selection runs on the device of the weights (:mod:`sparsekern.dst.selection`), and the
in-time over-parameterisation tracker is a sorted set of ever-active positions
(``ever_active``: int64, ascending): 8 bytes per ever-active position, where a bitmap would
take 1 bit per position of the dense shape (at 0.5% density and an ITOP rate under 1.5%
the set is the smaller).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping

import torch
from torch import nn

from sparsekern._checks import check_int
from sparsekern.dst import growth
from sparsekern.dst.capture import Tap
from sparsekern.dst.rebuild import active_positions, permute_optimizer_state, update_topology
from sparsekern.dst.selection import (NonFiniteScores, is_update, pick_drop, rigl_grow, sample_free,  # noqa: F401
                                      scheduled_fraction, top_k_stable)
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.sampling import is_member, merge_sorted

SCHEDULES = ("cosine", "constant")


class DSTEngine:
    """Base class: schedule, layer bookkeeping, drop, in-place rebuild, diagnostics.

    Args:
        model: holds the sparse layers (``SparseLinear``/``SparseConv2d``).
        optimizer: holds every sparse layer's ``topology.values``.
        total_steps: training steps planned (for the schedule).
        update_every: steps between topology updates (>= 1).
        drop_fraction: initial fraction of each layer's nnz rewired per update, in (0, 1).
        schedule: "cosine" (decay to 0 at stop_at) or "constant".
        stop_at: fraction of total_steps after which the topology is frozen, in (0, 1].
        seed: seeds the engine's random stream (random growth, tie-breaking).
        growth_memory: RigL only: bytes for one tile of the growth scores, per layer (an int for
            every layer, or a dict by layer name; default: ``growth.GROWTH_BUDGET_FACTOR`` x the
            layer's stored value bytes, at least one block row). ``ValueError`` if it cannot
            hold one block row of a layer.
        ddp_scores: RigL under torch.distributed: "gather" (all-gather the captured activations),
            "reduce" (all-reduce the gradient tile by tile) or "auto" (per layer, whichever moves
            fewer bytes). See :mod:`sparsekern.dst.growth`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 update_every: int = 100, drop_fraction: float = 0.3, schedule: str = "cosine",
                 stop_at: float = 0.75, seed: int = 0, growth_memory: int | dict | None = None,
                 ddp_scores: str = "auto"):
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        if not 0.0 < drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in (0, 1), got {drop_fraction!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not 0.0 < stop_at <= 1.0:
            raise ValueError(f"stop_at must be in (0, 1], got {stop_at!r}")
        if ddp_scores not in growth.DDP_MODES:
            raise ValueError(f"ddp_scores must be one of {growth.DDP_MODES}, got {ddp_scores!r}")
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))]
        if not self.layers:
            raise ValueError("the model has no SparseLinear/SparseConv2d layers; call sparsekern.sparsify first")
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for n, m in self.layers:
            if id(m.topology.values) not in held:
                raise ValueError(f"the optimizer does not hold layer {n!r}'s topology.values; build the "
                                 f"optimizer from model.parameters() after sparsify")
        self.model, self.optimizer = model, optimizer
        self.total_steps, self.update_every, self.drop_fraction = total_steps, update_every, drop_fraction
        self.schedule, self.stop_at = schedule, stop_at
        self.step_count = 0
        # Set by the superposition/ensemble methods (sparsekern.methods): steps with a forced
        # rewiring fraction, and the step from which the ordinary schedule is off.
        self.extra_updates: dict[int, float] = {}
        self.freeze_from: int | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.ddp_scores = ddp_scores
        self.tile_rows = self._tile_rows(growth_memory)
        self.ever_active = {n: active_positions(m.topology).clone() for n, m in self.layers}   # ascending
        self.history: list[dict] = []
        self._taps: dict[str, Tap] = {}
        for n, m in self.layers:
            self._taps[n] = m._dst_tap = Tap()
        self._arm_if_next_updates()

    def _tile_rows(self, growth_memory) -> dict[str, int]:
        """Block rows per growth tile of every layer (checked now, so a budget too small fails here)."""
        if not self._needs_gradient():
            return {}
        if isinstance(growth_memory, Mapping):
            unknown = sorted(set(growth_memory) - {n for n, _ in self.layers})
            if unknown:
                raise ValueError(f"growth_memory names layers {unknown} that are not sparse layers of the model")
        rows = {}
        for n, m in self.layers:
            budget = growth_memory.get(n) if isinstance(growth_memory, Mapping) else growth_memory
            if budget is None:
                budget = growth.default_budget(m)
            elif isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(f"growth_memory for layer {n!r} must be a positive int (bytes), got {budget!r}")
            rows[n] = growth.tile_rows(m, budget, n)
        return rows

    # ------------------------------------------------------------ schedule
    def fraction_at(self, step: int) -> float:
        """Fraction of nnz rewired at ``step`` (0 after stop_at; a forced update's own fraction)."""
        if step in self.extra_updates:
            return self.extra_updates[step]
        return scheduled_fraction(step, self.total_steps, self.drop_fraction, self.schedule, self.stop_at)

    def is_update_step(self, step: int) -> bool:
        if step in self.extra_updates:
            return True
        if self.freeze_from is not None and step >= self.freeze_from:
            return False
        return self._ordinary_update(step)

    def _ordinary_update(self, step: int) -> bool:
        return is_update(step, self.update_every, self.total_steps, self.stop_at)

    def force_update(self, step: int, fraction: float) -> None:
        """Rewire ``fraction`` of every layer's nnz at ``step`` (counted as ``dst.step()`` calls),
        whatever the schedule: the cycle/phase starts of Sup-tickets and EDST."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
        if step <= self.step_count:
            raise ValueError(f"step {step} is not in the future (now at {self.step_count})")
        self.extra_updates[int(step)] = float(fraction)
        self._arm_if_next_updates()

    def freeze(self, from_step: int) -> None:
        """No ordinary (scheduled) update from ``from_step`` on; forced updates still happen."""
        self.freeze_from = int(from_step)

    # ---------------------------------------------------------------- step
    def step(self) -> bool:
        """Count a training step; rewire every layer on update steps. Returns whether it rewired."""
        self.step_count += 1
        updated = False
        if self.is_update_step(self.step_count):
            self._update(self.fraction_at(self.step_count))
            updated = True
        self._arm_if_next_updates()
        return updated

    @torch.no_grad()
    def _update(self, fraction: float) -> None:
        record = {"step": self.step_count, "fraction": fraction, "layers": {}}
        for name, m in self.layers:
            t0 = time.perf_counter()
            topo = m.topology
            nnzb = topo.values.shape[0]
            R, C = topo.shape[0] // topo.block_size, topo.shape[1] // topo.block_size
            k = min(int(round(fraction * nnzb)), nnzb)
            if k == 0:
                record["layers"][name] = {"pruned": 0, "grown": 0, "regrown": 0}
                continue
            values = topo.values.detach()
            magnitude = values.abs() if values.dim() == 1 else values.reshape(nnzb, -1).norm(dim=1)
            drop = torch.zeros(nnzb, dtype=torch.bool, device=values.device)
            lin = active_positions(topo)                            # ascending, on the weights' device
            try:
                drop[pick_drop(magnitude, k)] = True
                grow = self.grow_positions(name, m, lin[~drop], R * C, k).to(lin.device)
            except NonFiniteScores as exc:                          # nothing has been changed yet
                record["layers"][name] = {"pruned": 0, "grown": 0, "regrown": 0, "skipped": str(exc)}
                continue
            dropped = lin[drop]                                     # ascending
            regrown = int(is_member(dropped, grow).sum())
            src = update_topology(topo, drop, grow, lin)
            permute_optimizer_state(self.optimizer, topo.values, src)
            ever = self.ever_active[name].to(grow.device)          # a loaded state may sit on the CPU
            fresh = torch.sort(grow).values
            self.ever_active[name] = merge_sorted(ever, fresh[~is_member(ever, fresh)])
            record["layers"][name] = {"pruned": k, "grown": k, "regrown": regrown,
                                      "ms": (time.perf_counter() - t0) * 1e3}
        self.history.append(record)
        self._disarm()

    def grow_positions(self, name: str, module: nn.Module, kept: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """int64 [k] block positions in [0, n) to grow, none of them in ``kept`` (int64, ascending,
        on the weights' device)."""
        raise NotImplementedError

    # -------------------------------------------------- gradient capture
    def _needs_gradient(self) -> bool:
        return False

    def _arm_if_next_updates(self) -> None:
        if self._needs_gradient() and self.is_update_step(self.step_count + 1):
            for tap in self._taps.values():
                if not tap.armed:
                    tap.reset(armed=True)

    def _disarm(self) -> None:
        for tap in self._taps.values():
            tap.reset(armed=False)

    def captured_pairs(self, name: str) -> list:
        """The (x, dy) pairs captured for layer ``name`` in this step, or a ``RuntimeError``."""
        pairs = self._taps[name].pairs
        if not pairs:
            raise RuntimeError(f"no captured input/gradient for layer {name!r} on update step "
                               f"{self.step_count}: call dst.step() once per step, after a forward and "
                               f"backward through the model")
        return pairs

    def dense_gradient(self, name: str, module: nn.Module) -> torch.Tensor:
        """Dense dL/dW [out, in] (block-aligned 2-D view for conv) of the captured step, summed over its
        micro-batches, this rank's only: for inspection and tests. The engine never forms it
        (it scores tiles: :mod:`sparsekern.dst.growth`)."""
        pairs = growth.prepared_pairs(module, self.captured_pairs(name))
        R = module.topology.shape[0] // module.topology.block_size
        return growth.gradient_rows(module, pairs, 0, R)

    # --------------------------------------------------------- diagnostics
    def _positions(self, m) -> int:
        topo = m.topology
        return (topo.shape[0] // topo.block_size) * (topo.shape[1] // topo.block_size)

    def itop_rate(self) -> float:
        """In-time over-parameterisation: fraction of all (block) positions ever active."""
        ever = sum(v.numel() for v in self.ever_active.values())
        return ever / max(1, sum(self._positions(m) for _, m in self.layers))

    def diagnostics(self) -> dict:
        """Per-layer density, ITOP rate, gradient norm of the values, the last update's counts
        (``pruned``/``grown``/``regrown``, and ``skipped``: the reason, when that update left the
        layer alone because all its scores were NaN/Inf) and ``skipped_updates`` so far."""
        last = self.history[-1]["layers"] if self.history else {}
        out = {"step": self.step_count, "itop_rate": self.itop_rate(), "layers": {}}
        for n, m in self.layers:
            g = m.topology.values.grad
            out["layers"][n] = {
                "density": m.topology.density,
                "itop_rate": self.ever_active[n].numel() / max(1, self._positions(m)),
                "grad_norm": None if g is None else float(g.norm()),
                "skipped_updates": sum("skipped" in h["layers"].get(n, {}) for h in self.history),
                **last.get(n, {"pruned": 0, "grown": 0}),
            }
        return out

    # ----------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        return {"step": self.step_count, "rng": self.generator.get_state(),
                "extra_updates": dict(self.extra_updates), "freeze_from": self.freeze_from,
                "ever_active": {n: v.clone() for n, v in self.ever_active.items()},
                "history": list(self.history),
                "layers": {n: {"shape": list(m.topology.shape), "block_size": m.topology.block_size,
                               "nnz": m.topology.nnz} for n, m in self.layers},
                "config": {"total_steps": self.total_steps, "update_every": self.update_every,
                           "drop_fraction": self.drop_fraction, "schedule": self.schedule,
                           "stop_at": self.stop_at, "method": type(self).__name__}}

    def load_state_dict(self, state: dict) -> None:
        """Restore step, schedule position, RNG and diagnostics from :meth:`state_dict`.

        Everything is checked first: a mismatched or malformed state raises ``ValueError``
        naming the entry and leaves the engine (step, RNG, history, hooks) as it was.
        """
        checked = self._checked_state(state)
        self._disarm()
        self.step_count = checked["step"]
        self.generator.set_state(checked["rng"])
        self.ever_active = checked["ever_active"]
        self.history = checked["history"]
        self.extra_updates = checked["extra_updates"]
        self.freeze_from = checked["freeze_from"]
        self._arm_if_next_updates()

    def _checked_state(self, state) -> dict:
        """The entries of a :meth:`state_dict` ``state``, checked and converted (copies, never
        views of ``state``), or a ``ValueError`` naming the first entry that is wrong."""
        if not isinstance(state, Mapping):
            raise ValueError(f"DST state must be a dict, got {type(state).__name__}")
        for key in ("step", "rng", "ever_active", "history", "config", "layers"):
            if key not in state:
                raise ValueError(f"DST state is missing {key!r}")
        here = {n: {"shape": list(m.topology.shape), "block_size": m.topology.block_size, "nnz": m.topology.nnz}
                for n, m in self.layers}
        layers = state["layers"]
        if not isinstance(layers, Mapping):
            raise ValueError(f"DST state 'layers' must be a dict, got {type(layers).__name__}")
        if layers != here:
            diff = [n for n in sorted(set(here) | set(layers)) if here.get(n) != layers.get(n)]
            raise ValueError(f"DST state does not match the model's sparse layers {diff}: state has "
                             f"{[layers.get(n) for n in diff]}, the model has {[here.get(n) for n in diff]} "
                             f"(load the model's state_dict first)")
        config = state["config"]
        if not isinstance(config, Mapping):
            raise ValueError(f"DST state 'config' must be a dict, got {type(config).__name__}")
        if config.get("method") != type(self).__name__:
            raise ValueError(f"DST state is for {config.get('method')}, not {type(self).__name__}")
        ever = state["ever_active"]
        if not isinstance(ever, Mapping) or set(ever) != set(self.ever_active):
            raise ValueError(f"DST state 'ever_active' has layers "
                             f"{sorted(ever) if isinstance(ever, Mapping) else type(ever).__name__}, "
                             f"the model has layers {sorted(self.ever_active)}")
        mods = dict(self.layers)
        ever_sets = {n: _ever_active_set(v, n, self._positions(mods[n])) for n, v in ever.items()}
        step = _state_int(state["step"], "step")
        rng = state["rng"]
        try:
            torch.Generator().set_state(rng)                         # a scratch generator checks it
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"DST state 'rng' is not a generator state: {exc}") from None
        history = state["history"]
        if not isinstance(history, (list, tuple)) or not all(
                isinstance(h, Mapping) and isinstance(h.get("layers"), Mapping) for h in history):
            raise ValueError("DST state 'history' must be a list of update records, each a dict with "
                             "a 'layers' dict")
        extra = state.get("extra_updates", {})
        if not isinstance(extra, Mapping):
            raise ValueError(f"DST state 'extra_updates' must be a dict, got {type(extra).__name__}")
        extra_updates = {}
        for k, f in extra.items():
            at = _state_int(k, "extra_updates step")
            if not isinstance(f, (int, float)) or not 0.0 < float(f) < 1.0:
                raise ValueError(f"DST state 'extra_updates' at step {at} must be a fraction in (0, 1), got {f!r}")
            extra_updates[at] = float(f)
        freeze_from = state.get("freeze_from")
        if freeze_from is not None:
            freeze_from = _state_int(freeze_from, "freeze_from")
        return {"step": step, "rng": rng.clone(), "ever_active": ever_sets,
                "history": copy.deepcopy(list(history)), "extra_updates": extra_updates,
                "freeze_from": freeze_from}


def _ever_active_set(v, name: str, n: int) -> torch.Tensor:
    """A state's ever-active positions of a layer of ``n`` positions as a fresh ascending int64 set:
    the set itself (int64, 1-D, strictly increasing, in [0, n)) or a bool [n] mask (states saved
    before the set); anything else is a ``ValueError`` naming it."""
    want = f"expected ascending unique int64 positions in [0, {n}) (or a bool [{n}] mask)"
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"DST state ever_active[{name!r}] is {type(v).__name__}, {want}")
    if v.dtype == torch.bool and v.shape == (n,):
        return torch.nonzero(v).flatten()
    ok = v.dtype == torch.int64 and v.dim() == 1
    if ok and v.numel():
        ok = int(v[0]) >= 0 and int(v[-1]) < n and bool((v[1:] > v[:-1]).all())
    if not ok:
        raise ValueError(f"DST state ever_active[{name!r}] is {v.dtype} {tuple(v.shape)}, {want}")
    return v.clone()


def _state_int(value, name: str) -> int:
    """A DST state entry as an int >= 0 (bools refused), or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise ValueError(f"DST state {name!r} must be an int >= 0, got {value!r}")
    try:
        return check_int(value, name, minimum=0)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"DST state {exc}") from None


class Static(DSTEngine):
    """No scheduled topology updates (the sparse baseline); same bookkeeping and diagnostics.
    Forced updates (:meth:`DSTEngine.force_update`) grow at random, as SET."""

    def _ordinary_update(self, step: int) -> bool:
        return False

    def grow_positions(self, name, module, kept, n, k):
        return SET.grow_positions(self, name, module, kept, n, k)


class SET(DSTEngine):
    """Sparse Evolutionary Training (Mocanu et al., 2018): drop by magnitude, grow at random."""

    def grow_positions(self, name, module, kept, n, k):
        return sample_free(n, kept, k, self.generator)


class RigL(DSTEngine):
    """Rigging the Lottery (Evci et al., 2020): drop by magnitude, grow by largest |dense gradient|
    (L2 norm of the block for BSR). Exact ties go to the lower position.
    """

    def _needs_gradient(self) -> bool:
        return True

    def grow_positions(self, name, module, kept, n, k):
        return growth.grow_top_k(module, self.captured_pairs(name), kept, k, self.tile_rows[name], self.ddp_scores)
