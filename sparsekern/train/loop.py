"""The training loop: a :class:`Trainer` owns one run's state, and a :class:`StopRequest`
turns SIGINT/SIGTERM into a stop at the next step boundary with a checkpoint.

The loop is the same for every method and task; what a method adds goes through its
hooks (:mod:`sparsekern.train.methods`), what the data asks (loss, evaluation) through its
task (:mod:`sparsekern.train.tasks`), and the ranks of a torchrun job through
:class:`sparsekern.train.distributed.Ranks`.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sparsekern.models import ModelInputError, make_model
from sparsekern.train import checkpoint, results
from sparsekern.train.cli import UsageError, flag
from sparsekern.train.distributed import Ranks
from sparsekern.train.methods import METHODS, resolve_update_every
from sparsekern.train.tasks import task_of


class Interrupted(Exception):
    """Training stopped early (Ctrl-C, SIGTERM or --stop-after) after saving a checkpoint."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{why}: checkpoint saved to {path}; continue with --resume {path}")
        self.path = path


class Aborted(BaseException):
    """A second Ctrl-C/SIGTERM: stop at once, without saving (a write in progress is abandoned
    whole, so the checkpoint on disk stays the previous one). Not an ``Exception``: nothing
    on the way out may swallow it."""


class StopRequest:
    """While active (``with StopRequest() as stop:``, main thread only), SIGINT and SIGTERM
    ask for a stop: ``stop.requested`` becomes true and the training loop saves a checkpoint
    at the next step boundary. A second signal raises :class:`Aborted` wherever the program
    is. ``saved`` is the last checkpoint written under it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: str | None = None
        self.saved: Path | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (a first signal arrived)."""
        return self.signal is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise Aborted(name)
        self.signal = name
        try:      # os.write, not print: a handler may run while the main thread is inside a print
            os.write(2, f"sparsekern-train: {name}: stopping at the next step boundary with a checkpoint "
                        f"(send it again to stop at once, without saving)\n".encode())
        except OSError:
            pass

    def aborted_message(self, exc: BaseException) -> str:
        """The one line reporting a stop by a second signal (or a KeyboardInterrupt raised past the loop)."""
        why = f"{exc.args[0]} again" if isinstance(exc, Aborted) and exc.args else "interrupted"
        if self.saved is not None:
            return f"{why}: stopped at once; the last checkpoint is {self.saved}; continue with --resume {self.saved}"
        return f"{why}: stopped at once; no checkpoint was written"

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False


@dataclass(frozen=True)
class Plan:
    """The step counts the schedules are planned over: ``total_steps`` (the LR, DST and method
    schedules span them), ``steps_per_epoch``, and the topology ``update_every``."""
    total_steps: int
    steps_per_epoch: int
    update_every: int


def rss_mb() -> float:
    """Current resident memory of the process in MB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """One run of ``method`` on ``split`` with options ``a``.

    It builds the model (seeded by ``--seed``), makes it sparse through the method's hooks,
    and owns everything a checkpoint holds (:data:`sparsekern.train.checkpoint.KEYS`): the
    model, optimizer, LR schedule, the method's engine and controller, the data-order
    generator, and the position (``epoch``, ``step``: the next step to run; ``order``: the
    epoch's permutation; ``epoch_loss``: its (loss sum, steps) so far), with the ``history``,
    ``step_times`` and the method's log. :meth:`run` trains to ``--epochs`` and returns the
    results (:func:`sparsekern.train.results.summarise`); ``stop`` (a :class:`StopRequest`)
    ends it at a step boundary with a checkpoint (:class:`Interrupted`).
    """

    def __init__(self, a, split, method: str, stop: StopRequest, ranks: Ranks | None = None):
        self.a, self.split, self.stop = a, split, stop
        self.ranks = ranks or Ranks()
        self.task = task_of(split)
        self.method = METHODS[method](a)
        steps_per_epoch = math.ceil(len(split.x_train) / a.batch_size)
        self._check_batches(steps_per_epoch)
        total = steps_per_epoch * a.plan_epochs          # what the LR, DST and method schedules span
        self.plan = Plan(total, steps_per_epoch, resolve_update_every(a.update_every, total))
        torch.manual_seed(a.seed)
        try:
            model = make_model(a.model, split.input_shape, split.num_classes, tokens=split.task != "classification",
                               width=a.width, layers=a.layers, heads=a.heads)
        except ModelInputError as exc:
            raise UsageError(str(exc)) from None
        self.model = model.to(a.device)
        self.report = self.method.make_sparse(self.model)
        params = self.model.parameters()
        self.opt = (torch.optim.SGD(params, lr=a.lr, momentum=0.9, nesterov=True) if a.optimizer == "sgd"
                    else torch.optim.AdamW(params, lr=a.lr))
        try:
            self.method.attach(self)
        except ValueError as exc:
            raise UsageError(f"--method {method}: {exc}") from None
        self.sched = self._schedule()
        self.g = torch.Generator().manual_seed(a.seed)
        self.epoch, self.step, self.order, self.epoch_loss = 0, 0, None, (0.0, 0)
        self.history, self.step_times, self.log = [], [], []
        self.path = a.out / f"checkpoint_{method}.pt"
        self.forward = None          # the model as the steps call it (DDP-wrapped on several ranks)
        self.digests: list[str] = []

    def _check_batches(self, steps_per_epoch: int) -> None:
        world = self.ranks.world
        last = len(self.split.x_train) - (steps_per_epoch - 1) * self.a.batch_size
        if world > 1 and min(self.a.batch_size, last) < world:
            raise UsageError(f"{flag('batch_size')} {self.a.batch_size} over {len(self.split.x_train)} examples "
                             f"leaves a batch of {min(self.a.batch_size, last)}, fewer than the {world} ranks: "
                             f"every rank needs at least one example per step")

    def _schedule(self):
        a, total = self.a, self.plan.total_steps
        if self.method.controller is not None or a.lr_schedule == "constant":   # a controller sets the LR itself
            return torch.optim.lr_scheduler.LambdaLR(self.opt, lambda _: 1.0)
        if a.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, total)
        return torch.optim.lr_scheduler.MultiStepLR(self.opt, [total // 2, 3 * total // 4], 0.1)

    # ------------------------------------------------------------------ state
    def resume(self, ck: dict) -> None:
        """Continue from checkpoint ``ck`` (already read and checked): every entry of
        :data:`~sparsekern.train.checkpoint.KEYS` goes back where it came from."""
        checkpoint.restore(self, ck)

    def save(self) -> None:
        """Write the checkpoint of the current position (rank 0; the other ranks wait for it)."""
        if self.ranks.main:
            checkpoint.save(self, self.path)
        self.ranks.barrier()
        self.stop.saved = self.path

    def _interrupt(self, why: str):
        self.save()
        return Interrupted(self.path, why)

    # ------------------------------------------------------------------- loop
    def run(self) -> dict:
        """Train from the current position to ``--epochs``; returns the run's results (with its "model")."""
        a, split, plan = self.a, self.split, self.plan
        self.digests = self.ranks.check_same_model(self.model, "before training")
        self.forward = self.ranks.wrap(self.model)
        stopping = self.ranks.any(self.stop.requested)
        peak = rss_mb()
        show = not a.quiet and self.ranks.main
        bar = tqdm(range(self.epoch, a.epochs), desc=self.method.name, disable=not show, unit="epoch",
                   initial=self.epoch, total=a.epochs)
        for epoch in bar:
            self.epoch = epoch
            if self.order is None:
                self.order = torch.randperm(len(split.x_train), generator=self.g)
            steps = tqdm(range(self.step, plan.steps_per_epoch), desc=f"epoch {epoch + 1}", disable=not show,
                         leave=False, unit="step")
            try:
                for i in steps:
                    self.step = i
                    if a.stop_after and len(self.step_times) >= a.stop_after:
                        raise self._interrupt(f"stopped after {a.stop_after} steps")
                    if stopping if self.ranks.distributed else self.stop.requested:   # ranks: agreed after each step
                        raise self._interrupt("interrupted")
                    stopping = self._train_step(epoch * plan.steps_per_epoch + i)
                    peak = max(peak, rss_mb())
                    loss_sum, done = self.epoch_loss
                    if done % 10 == 0:
                        steps.set_postfix(loss=f"{loss_sum / done:.3f}", ms=f"{1e3 * self.step_times[-1]:.1f}")
            except KeyboardInterrupt:
                raise self._interrupt("interrupted") from None
            self._end_epoch(bar)
        self.save()
        self.digests = self.ranks.check_same_model(self.model, "at the end of training")
        final = self.method.final_model(self)
        return results.summarise(self, final, peak)

    def _train_step(self, global_step: int) -> bool:
        """One optimizer step on the batch of ``global_step``; returns whether the ranks agreed to stop."""
        a, split = self.a, self.split
        i = self.step
        idx = self.order[i * a.batch_size:(i + 1) * a.batch_size]
        local = self.ranks.shard(idx)
        t0 = time.perf_counter()
        lr = self.method.lr(global_step)
        if lr is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = self.task.loss(self.forward(split.x_train[local]), split.y_train[local])
        if self.ranks.distributed:
            weight = self.ranks.weight(len(local), len(idx))
            objective = loss * weight
        else:
            objective = loss
        extra = self.method.extra_loss(self.model)
        if extra is not None:
            objective = objective + extra
        objective.backward()
        self.opt.step()
        updates = self.method.after_step(self)
        self.log += updates
        if updates and self.method.engine is not None and self.ranks.distributed:
            self.ranks.check_same_model(self.model, f"after the topology update at step {global_step + 1}")
        self.sched.step()
        self.step_times.append(time.perf_counter() - t0)
        if self.ranks.distributed:
            value, stopping = self.ranks.reduce_step(loss * (weight / self.ranks.world), self.stop.requested)
            value += 0.0 if extra is None else extra.item()
        else:
            value, stopping = objective.item(), self.stop.requested
        loss_sum, done = self.epoch_loss
        self.epoch_loss = (loss_sum + value, done + 1)
        return stopping

    def _end_epoch(self, bar) -> None:
        a, split = self.a, self.split
        loss_sum, done = self.epoch_loss
        self.epoch, self.step, self.order, self.epoch_loss = self.epoch + 1, 0, None, (0.0, 0)
        metrics = self.task.evaluate(self.model, split.x_test, split.y_test)
        self.history.append({"epoch": self.epoch, "train_loss": loss_sum / max(done, 1), **metrics})
        spe = self.plan.steps_per_epoch
        bar.set_postfix(loss=f"{self.history[-1]['train_loss']:.3f}",
                        **{self.task.short: f"{metrics[self.task.headline]:.3f}"},
                        density=f"{results.model_density(self.model):.3f}",
                        ms_step=f"{1e3 * sum(self.step_times[-spe:]) / spe:.1f}")
        if a.checkpoint_every and self.epoch % a.checkpoint_every == 0:
            self.save()
