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

RigL's growth gradient: on the batch of an update step only, forward/backward
hooks keep the layer's input and output gradient, and the dense weight
gradient is formed once (dY^T X, or ``torch.nn.grad.conv2d_weight``): one
dense GEMM of the layer every ``update_every`` steps, i.e. about
``1 / (density * update_every)`` of a sparse forward per step (0.1 at 90%
sparsity, update_every=100). Under ``torch.distributed`` the scores are
all-reduced and the random streams are seeded alike, so every rank takes the
same decision.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern._checks import check_int
from sparsekern.dst.rebuild import active_positions, permute_optimizer_state, update_topology
from sparsekern.nn import SparseConv2d, SparseLinear

SCHEDULES = ("cosine", "constant")


def scheduled_fraction(step: int, total_steps: int, drop_fraction: float, schedule: str, stop_at: float) -> float:
    """Fraction of nnz rewired at ``step``: cosine decay (or constant) to ``stop_at * total_steps``, then 0."""
    end = stop_at * total_steps
    if step > end:
        return 0.0
    if schedule == "constant":
        return drop_fraction
    return drop_fraction / 2 * (1 + math.cos(math.pi * step / end))


def is_update(step: int, update_every: int, total_steps: int, stop_at: float) -> bool:
    return step > 0 and step % update_every == 0 and step <= stop_at * total_steps


class NonFiniteScores(ValueError):
    """Every score of a layer is NaN or +-Inf: there is no ranking to rewire it by.

    Raised by :func:`pick_drop` and :func:`rigl_grow`; the engine (and the
    masked-dense reference) then skip that layer's update and record why.
    """


def top_k_stable(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Positions (int64, ascending) of the k largest entries of a 1-D float ``scores``, exact ties
    going to the lower position: the same set as the first k of a stable descending sort.

    Non-finite scores (NaN, +Inf, -Inf) rank below every finite one, among themselves by
    position: they are taken only when fewer than k finite entries are eligible. ``eligible``
    (bool, like ``scores``) excludes the False positions altogether; with fewer than k
    eligible positions, all of them are returned.

    A strided sample bounds the k-th largest value from below; among the entries above
    that bound, ``kthvalue`` finds it exactly. (4096x4096 layer, k = 3% of it: 2.2 s for
    the full stable sort, a few tens of ms here.)
    """
    n = scores.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    ok = torch.isfinite(scores)
    if eligible is not None:
        ok &= eligible
    n_ok = int(ok.sum())
    if n_ok <= k:                       # every finite eligible entry, then non-finite ones by position
        if n_ok == n:
            return torch.arange(n)
        rest = ~ok if eligible is None else eligible & ~ok
        chosen = torch.cat([torch.nonzero(ok).flatten(), torch.nonzero(rest).flatten()[: k - n_ok]])
        return torch.sort(chosen).values
    if n_ok < n:                        # the k-th largest is finite: -inf entries can no longer win
        scores = scores.masked_fill(~ok, -float("inf"))
    idx = None
    if n > (1 << 16):
        sample = torch.sort(scores[:: n // (1 << 15)], descending=True).values
        j = min(sample.numel() - 1, int(sample.numel() * k / n * 1.2) + 64)
        idx = torch.nonzero(scores >= sample[j]).flatten()
        if idx.numel() < k:
            idx = None
    if idx is None:
        idx = torch.arange(n)
    vals = scores[idx]
    v = torch.kthvalue(vals, vals.numel() - k + 1).values          # the k-th largest
    above = idx[vals > v]
    tied = idx[vals == v][: k - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def pick_drop(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k entries to drop: every non-finite magnitude first (a NaN/Inf
    weight is never kept ahead of a finite one; earlier storage order first), then the smallest
    finite magnitudes (stable: earlier storage order first).

    Raises :class:`NonFiniteScores` when no magnitude is finite (and k > 0).
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.int64)
    bad = torch.nonzero(~torch.isfinite(magnitude)).flatten()
    if bad.numel() == magnitude.numel():
        raise NonFiniteScores("every weight magnitude is NaN or Inf")
    if bad.numel() >= k:
        return bad[:k]
    # top_k_stable ranks the non-finite entries last, so with k - len(bad) < finite count none is taken twice
    return torch.sort(torch.cat([bad, top_k_stable(-magnitude, k - bad.numel())])).values


def sample_free(free: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct positions drawn uniformly from the True entries of the bool [n] ``free``
    (rejection sampling in draw order, so it is cheap when most positions are free)."""
    n = free.numel()
    avail = free.clone()
    out = []
    need = k
    while need > 0:
        if not bool(avail.any()):
            raise ValueError(f"only {k - need} free positions for {k} growths")
        draw = torch.randint(n, (max(2 * need, 64),), generator=generator)
        draw = draw[avail[draw]]
        uniq, inv = torch.unique(draw, return_inverse=True)
        first = torch.full((uniq.numel(),), draw.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inv, torch.arange(draw.numel()), "amin")
        take = draw[torch.sort(first).values][:need]
        avail[take] = False
        out.append(take)
        need -= take.numel()
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


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
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                 update_every: int = 100, drop_fraction: float = 0.3, schedule: str = "cosine",
                 stop_at: float = 0.75, seed: int = 0):
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
        self.ever_active = {n: self._blank(m).index_fill_(0, active_positions(m.topology).cpu(), True)
                            for n, m in self.layers}
        self.history: list[dict] = []
        self._hooks: list = []
        self._captured: dict[str, dict] = {}
        self._arm_if_next_updates()

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
            drop = torch.zeros(nnzb, dtype=torch.bool)
            lin = active_positions(topo).cpu()                      # ascending
            try:
                drop[pick_drop(magnitude.cpu(), k)] = True
                grow = self.grow_positions(name, m, lin[~drop], R * C, k)
            except NonFiniteScores as exc:                          # nothing has been changed yet
                record["layers"][name] = {"pruned": 0, "grown": 0, "regrown": 0, "skipped": str(exc)}
                continue
            dropped = lin[drop]                                     # ascending
            at = torch.searchsorted(dropped, grow).clamp_(max=dropped.numel() - 1)
            regrown = int((dropped[at] == grow).sum())
            src = update_topology(topo, drop.to(topo.values.device), grow.to(topo.values.device), lin)
            permute_optimizer_state(self.optimizer, topo.values, src)
            self.ever_active[name][grow] = True
            record["layers"][name] = {"pruned": k, "grown": k, "regrown": regrown,
                                      "ms": (time.perf_counter() - t0) * 1e3}
        self.history.append(record)
        self._disarm()

    def grow_positions(self, name: str, module: nn.Module, kept: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """int64 [k] block positions in [0, n) to grow, none of them in ``kept`` (int64, ascending)."""
        raise NotImplementedError

    # -------------------------------------------------- gradient capture
    def _needs_gradient(self) -> bool:
        return False

    def _arm_if_next_updates(self) -> None:
        if self._needs_gradient() and self.is_update_step(self.step_count + 1) and not self._hooks:
            for name, m in self.layers:
                self._hooks.append(m.register_forward_hook(self._capture(name)))

    def _capture(self, name):
        def hook(module, inputs, output):
            entry = self._captured.setdefault(name, {})
            entry["x"] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: entry.__setitem__("dy", g.detach()))
        return hook

    def _disarm(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._captured.clear()

    def dense_gradient(self, name: str, module: nn.Module) -> torch.Tensor:
        """Dense dL/dW [out, in] (block-aligned 2-D view for conv) of the captured batch."""
        cap = self._captured.get(name, {})
        if "x" not in cap or "dy" not in cap:
            raise RuntimeError(f"no captured input/gradient for layer {name!r} on update step "
                               f"{self.step_count}: call dst.step() once per step, after a forward and "
                               f"backward through the model")
        x, dy = cap["x"], cap["dy"]
        if isinstance(module, SparseLinear):
            g = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        else:
            kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups = module.geometry
            if x.dim() == 3:
                x, dy = x.unsqueeze(0), dy.unsqueeze(0)
            xp = F.pad(x, (pl, pr, pt, pb))
            g = torch.nn.grad.conv2d_weight(xp, module.weight_shape, dy, (sh, sw), 0, (dh, dw), groups)
            g = g.reshape(module.weight_shape_2d)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(g)
        return g

    # --------------------------------------------------------- diagnostics
    @staticmethod
    def _blank(m) -> torch.Tensor:
        topo = m.topology
        return torch.zeros((topo.shape[0] // topo.block_size) * (topo.shape[1] // topo.block_size),
                           dtype=torch.bool)

    def itop_rate(self) -> float:
        """In-time over-parameterisation: fraction of all (block) positions ever active."""
        ever = sum(int(v.sum()) for v in self.ever_active.values())
        return ever / sum(v.numel() for v in self.ever_active.values())

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
                "itop_rate": float(self.ever_active[n].float().mean()),
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
        for n, v in ever.items():
            if not isinstance(v, torch.Tensor) or v.shape != self.ever_active[n].shape or v.dtype != torch.bool:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"DST state ever_active[{n!r}] is {got}, expected "
                                 f"bool {tuple(self.ever_active[n].shape)}")
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
        return {"step": step, "rng": rng.clone(), "ever_active": {n: v.clone() for n, v in ever.items()},
                "history": copy.deepcopy(list(history)), "extra_updates": extra_updates,
                "freeze_from": freeze_from}


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
        free = torch.ones(n, dtype=torch.bool)
        free[kept] = False
        return sample_free(free, k, self.generator)


class RigL(DSTEngine):
    """Rigging the Lottery (Evci et al., 2020): drop by magnitude, grow by largest |dense gradient|
    (L2 norm of the block for BSR). Exact ties go to the lower position.
    """

    def _needs_gradient(self) -> bool:
        return True

    def grow_positions(self, name, module, kept, n, k):
        g = self.dense_gradient(name, module)
        b = module.topology.block_size
        R, C = g.shape[0] // b, g.shape[1] // b
        block = g.abs_() if b == 1 else g.reshape(R, b, C, b).pow(2).sum((1, 3)).sqrt()
        return rigl_grow(block.flatten().cpu(), kept, k)


def rigl_grow(grad_magnitude: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """The k positions (int64, ascending) outside ``kept`` (int64 positions) with the largest
    float [n] ``grad_magnitude`` (ties: lower position first). NaN/Inf scores rank below every
    finite one and are grown only when fewer than k finite free positions remain.

    Raises :class:`NonFiniteScores` when no score of the layer is finite (and k > 0).
    """
    if k > 0 and not bool(torch.isfinite(grad_magnitude).any()):
        raise NonFiniteScores("every dense-gradient score is NaN or Inf")
    free = torch.ones(grad_magnitude.numel(), dtype=torch.bool)
    free[kept] = False
    return top_k_stable(grad_magnitude, k, eligible=free)
