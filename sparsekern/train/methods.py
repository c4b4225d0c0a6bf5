"""The training command's methods, each one hook object beside the common loop.

A method is added here, in one place: subclass :class:`Method`, set its ``name`` and
``summary`` (the ``--help`` text), override the hooks it needs, and list it in
:data:`METHODS`. The loop (:class:`sparsekern.train.loop.Trainer`) calls, per run:

* ``make_sparse(model)`` once, on the dense model (returns the sparsify report or None);
* ``attach(trainer)`` once the optimizer exists (DST engines, controllers);
* per step: ``lr(step)`` before it (None: the ``--lr-schedule`` schedule sets the LR),
  ``extra_loss(model)`` added to the task loss, ``after_step(trainer)`` after
  ``optimizer.step()`` (topology updates; returns entries for the run's log);
* ``final_model(trainer)`` at the end: the model(s) to report (:class:`Final`).

``engine`` and ``controller`` (None, or objects with ``state_dict``/``load_state_dict``) are
what the checkpoint stores as ``dst`` and ``method_state``. ``composite`` methods
(``ensemble``) run several whole runs instead of hooking into one (:meth:`Ensemble.run`).
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

import sparsekern as sk
from sparsekern.methods import freetickets, suptickets, threshold as thr

CLASSIFICATION, LANGUAGE_MODEL = "classification", "language-model"


def resolve_update_every(update_every: int | None, total_steps: int) -> int:
    """``--update-every``, or by default min(100, a tenth of the updating phase (the first 75%
    of the ``total_steps``)): RigL's 100 on long runs, about ten rewirings on short ones."""
    if update_every is not None:
        return update_every
    return min(100, max(1, int(0.75 * total_steps) // 10))


@dataclass
class Final:
    """What a run reports: ``model`` (what the run returns: the trained model, the superposed
    one, an ensemble), ``members`` (the models whose weights and FLOPs count), the final test
    ``metrics`` (None: the loop evaluates ``model`` with the task), and the method's ``extra``
    entries for the results."""
    model: nn.Module
    members: list
    metrics: dict | None = None
    extra: dict = field(default_factory=dict)


class Method:
    """Plain training of the model as built: the hooks' defaults (see the module docstring)."""

    name = "dense"
    summary = "plain nn.Linear/nn.Conv2d"
    extendable = True                  # --epochs may extend a resumed run
    composite = False                  # several runs, not hooks into one (ensemble)
    tasks = (CLASSIFICATION, LANGUAGE_MODEL)
    grows_by_gradient = False          # RigL's growth adds a dense gradient every update_every steps

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.engine = None
        self.controller = None

    def make_sparse(self, model: nn.Module):
        """Make the dense ``model`` this method's starting point, in place; the sparsify report or None."""
        return None

    def attach(self, trainer) -> None:
        """Build what the method drives beside the optimizer (``trainer.opt``, ``trainer.plan``)."""

    def lr(self, step: int) -> float | None:
        """The learning rate of training step ``step`` (0-based), or None to leave it to the LR schedule."""
        return None if self.controller is None else self.controller.lr(step)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the task loss of every step (None: nothing)."""
        return None

    def after_step(self, trainer) -> list[dict]:
        """Run after each ``optimizer.step()``; returns entries for the run's log (``itop_log``)."""
        return []

    def final_model(self, trainer) -> Final:
        """The model(s) the run reports."""
        return Final(trainer.model, [trainer.model])

    def train_flops_per_example(self, trainer, flops) -> float:
        """Training FLOPs per example, from ``flops`` (a :class:`sparsekern.flops.FlopReport` of the
        reported model)."""
        return flops.training_step(trainer.plan.update_every if self.grows_by_gradient else None)

    def extra_train_flops(self, trainer, flops) -> float:
        """FLOPs the method spends outside the training steps (the whole run)."""
        return 0.0


class DynamicSparse(Method):
    """A sparse model (``sparsify``) rewired by a DST engine of kind ``kind``."""

    kind = "static"

    def engine_kind(self) -> str:
        """The DST engine's rule: "static", "set" or "rigl"."""
        return self.kind

    def make_sparse(self, model):
        a = self.a
        return sk.sparsify(model, a.density, a.distribution, init=a.init, layout=a.layout,
                           block_size=a.block_size, generator=torch.Generator().manual_seed(a.seed))

    @property
    def grows_by_gradient(self) -> bool:
        """RigL growth: a dense gradient every ``update_every`` steps (counted in the training FLOPs)."""
        return self.engine_kind() == "rigl"

    def attach(self, trainer):
        a, plan = self.a, trainer.plan
        cls = {"static": sk.dst.Static, "set": sk.dst.SET, "rigl": sk.dst.RigL}[self.engine_kind()]
        self.engine = cls(trainer.model, trainer.opt, total_steps=plan.total_steps,
                          update_every=plan.update_every, drop_fraction=a.drop_fraction, seed=a.seed)

    def after_step(self, trainer):
        if self.engine.step():
            return [{"step": self.engine.step_count, "itop_rate": self.engine.itop_rate()}]
        return []


class Static(DynamicSparse):
    name, kind, summary = "static", "static", "a fixed random sparse topology"


class SET(DynamicSparse):
    name, kind, summary = "set", "set", "drop smallest, regrow at random (--update-every, --drop-fraction)"


class RigL(DynamicSparse):
    name, kind, summary = "rigl", "rigl", "drop smallest, regrow by largest dense gradient (same options)"


class SupTickets(DynamicSparse):
    name = "suptickets"
    summary = "RigL/SET with a cyclic final phase whose tickets are superposed (--cycle-*, --superpose)"
    extendable = False

    def engine_kind(self):
        return self.a.grow

    def attach(self, trainer):
        super().attach(trainer)
        a, plan, x = self.a, trainer.plan, trainer.split.x_train
        bs = a.batch_size
        self.controller = suptickets.SupTickets(
            trainer.model, self.engine, plan.total_steps, plan.steps_per_epoch, a.lr, a.cycle_fraction,
            a.cycle_length, a.lr_low, a.lr_high, a.cycle_drop, a.superpose,
            bn_batches=lambda: (x[i:i + bs] for i in range(0, len(x), bs)))

    def after_step(self, trainer):
        log = super().after_step(trainer)
        self.controller.after_step()
        return log

    def final_model(self, trainer):
        model = self.controller.result()
        return Final(model, [model], extra={"tickets": self.controller.tickets,
                                            "superpose_log": self.controller.log,
                                            "current_model": trainer.history[-1]})

    def extra_train_flops(self, trainer, flops):
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trainer.model.modules()):
            return (self.controller.tickets - 1) * len(trainer.split.x_train) * flops.inference()  # BN passes
        return 0.0


class EDST(DynamicSparse):
    name = "edst"
    summary = ("one run, exploration then --tickets refinement phases, ensembled (--exploration-fraction, "
               "--refine-drop)")
    extendable = False
    tasks = (CLASSIFICATION,)

    def engine_kind(self):
        return self.a.grow

    def attach(self, trainer):
        super().attach(trainer)
        a = self.a
        self.controller = freetickets.EDST(trainer.model, self.engine, trainer.plan.total_steps, a.lr, a.tickets,
                                           a.exploration_fraction, a.refine_drop)

    def after_step(self, trainer):
        log = super().after_step(trainer)
        self.controller.after_step()
        return log

    def final_model(self, trainer):
        ens = self.controller.result()
        rep = freetickets.ensemble_report(ens, trainer.split.x_test, trainer.split.y_test)
        return Final(ens, list(self.controller.tickets), metrics=rep["ensemble"],
                     extra={"members": rep["members"], "disagreement": rep["disagreement"], "kl": rep["kl"],
                            "tickets": len(self.controller.tickets)})


class Threshold(Method):
    name = "threshold"
    summary = "trainable per-neuron thresholds, dense-to-sparse (--alpha)"

    def make_sparse(self, model):
        thr.thresholdify(model)
        return None

    def extra_loss(self, model):
        return thr.threshold_regularizer(model, self.a.alpha)

    def after_step(self, trainer):
        return [{"step": len(trainer.step_times) + 1, "reset": name} for name in thr.reset_collapsed(trainer.model)]

    def final_model(self, trainer):
        model = copy.deepcopy(trainer.model)
        thr.export_sparse(model)
        return Final(model, [model], extra={"threshold_density": thr.model_density(trainer.model)})

    def train_flops_per_example(self, trainer, flops):
        from sparsekern.flops import count_flops
        return count_flops(trainer.model, trainer.split.x_test[:1]).training_step()    # dense, masked


class Ensemble(Method):
    name = "ensemble"
    summary = "--tickets independent RigL/SET (--grow) runs, ensembled"
    composite = True
    tasks = (CLASSIFICATION,)

    def run(self, split, train) -> dict:
        """Train ``--tickets`` members (``train(options, method_name)`` -> a run's results with its
        "model"; seeds seed, seed+1, ...; each in ``--out/member_<i>``) and ensemble them."""
        a = self.a
        members = [train(argparse.Namespace(**{**vars(a), "seed": a.seed + i, "out": a.out / f"member_{i}"}),
                         a.grow) for i in range(a.tickets)]
        ens = freetickets.TicketEnsemble([r["model"] for r in members])
        rep = freetickets.ensemble_report(ens, split.x_test, split.y_test)
        first = members[0]
        keep = ("history", "layer_density", "sparsity_report", "peak_rss_mb", "train_flops_per_example",
                "training_state_bytes", "itop_log", "distributed")
        return {**{k: first[k] for k in keep if k in first},
                "method": "ensemble", "final": {"epoch": a.epochs, **rep["ensemble"]}, "members": rep["members"],
                "disagreement": rep["disagreement"], "kl": rep["kl"], "tickets": a.tickets,
                "weights_nnz": sum(r["weights_nnz"] for r in members),
                "param_bytes": sum(r["param_bytes"] for r in members),
                "inference_flops": sum(r["inference_flops"] for r in members),
                "train_flops_total": sum(r["train_flops_total"] for r in members),
                "step_times_ms": [t for r in members for t in r["step_times_ms"]],
                "ms_per_step": sum(r["ms_per_step"] for r in members) / len(members),
                "ms_per_step_median": sorted(r["ms_per_step_median"] for r in members)[len(members) // 2],
                "ms_per_step_iqr": [sorted(r["ms_per_step_iqr"][i] for r in members)[len(members) // 2]
                                    for i in (0, 1)],
                "total_s": sum(r["total_s"] for r in members), "itop_rate": None,
                "state_digest": sum(r["state_digest"] for r in members), "model": ens}


# name -> method; the order is the --help order.
METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, Static, SET, RigL, SupTickets, EDST, Ensemble,
                                                         Threshold)}
