"""The training command's checkpoints: :data:`KEYS` is the one list of what a checkpoint
holds, each entry with its type check, how a :class:`~sparsekern.train.loop.Trainer` gives
it and how it goes back on ``--resume``.

Files go through :mod:`sparsekern.checkpoint_io`: written atomically (temporary file,
fsync, rename), read with ``torch.load(weights_only=True)`` (no code from the file runs)
and checked against :data:`KEYS` before anything is used, so a checkpoint holds only
tensors and plain values. Together the entries give a bitwise-exact continuation:
model, optimizer, LR schedule, DST engine, method state, the data-order and torch RNGs,
and the position inside the epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Callable

import torch

from sparsekern import checkpoint_io
from sparsekern.checkpoint_io import (Field, is_int, is_number, is_plain, list_of, optional, table_of,
                                      tensor_of)
from sparsekern.train import cli

VERSIONS = (1,)      # checkpoint layouts this code reads (it writes the last)


@dataclass(frozen=True)
class Key:
    """One checkpoint entry: its :class:`~sparsekern.checkpoint_io.Field` (type check, required or
    not), ``get(trainer)`` -> the value to store, and ``put(trainer, value)`` to restore it (None:
    read before the trainer exists, by the options layer)."""
    field: Field
    get: Callable[[Any], Any]
    put: Callable[[Any, Any], None] | None = None


def _options_value(v) -> bool:
    # paths as strings; a pathlib path only in checkpoints written before paths were stored as strings
    return is_plain(v) or isinstance(v, PurePath)


def _load_into(attr: str) -> Callable[[Any, Any], None]:
    """put: ``trainer.<attr>.load_state_dict(value)`` (attr may be dotted; value None only for None)."""
    def put(trainer, value):
        obj = _resolve(trainer, attr)
        if (obj is None) != (value is None):
            raise ValueError(f"it {'has no' if value is None else 'has a'} {attr.split('.')[-1]} state, "
                             f"this run {'has' if obj is not None else 'has none'}")
        if obj is not None:
            obj.load_state_dict(value)
    return put


def _state_of(attr: str) -> Callable[[Any], Any]:
    def get(trainer):
        obj = _resolve(trainer, attr)
        return None if obj is None else obj.state_dict()
    return get


def _resolve(trainer, attr: str):
    obj = trainer
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _set(attr: str, convert=lambda v: v) -> Callable[[Any, Any], None]:
    return lambda trainer, value: setattr(trainer, attr, convert(value))


def _check_world(trainer, world) -> None:
    if world != trainer.ranks.world:
        raise ValueError(f"it was written by a {world}-rank run and this run has {trainer.ranks.world} "
                         f"(the float sums would differ); resume it with torchrun --nproc_per_node {world}"
                         if world > 1 else f"it was written by a single-process run and this run has "
                         f"{trainer.ranks.world} ranks; resume it without torchrun")


KEYS: dict[str, Key] = {
    "version": Key(Field(lambda v: is_int(v) and v in VERSIONS, f"one of {VERSIONS}"), lambda t: VERSIONS[-1]),
    "args": Key(Field(table_of(_options_value), "a table of options with plain values"),
                lambda t: cli.checkpoint_args(t.a)),
    "plan_epochs": Key(Field(optional(lambda v: is_int(v) and v >= 1), "None or an int >= 1", required=False),
                       lambda t: t.a.plan_epochs),
    "method": Key(Field(lambda v: isinstance(v, str), "a method name"), lambda t: t.method.name),
    "world_size": Key(Field(lambda v: is_int(v) and v >= 1, "an int >= 1", required=False, default=1),
                      lambda t: t.ranks.world, _check_world),
    "epoch": Key(Field(lambda v: is_int(v) and v >= 0, "an int >= 0"), lambda t: t.epoch, _set("epoch")),
    "step": Key(Field(lambda v: is_int(v) and v >= 0, "an int >= 0"), lambda t: t.step, _set("step")),
    "order": Key(Field(optional(tensor_of(torch.int64)), "None or a 1-D int64 tensor"),
                 lambda t: t.order, _set("order")),
    "epoch_loss": Key(Field(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and is_number(v[0])
                            and is_int(v[1]) and v[1] >= 0, "a (loss sum, steps) pair",
                            required=False, default=(0.0, 0)),
                      lambda t: tuple(t.epoch_loss), _set("epoch_loss", tuple)),
    "model": Key(Field(table_of(lambda v: isinstance(v, torch.Tensor)), "a state_dict (names -> tensors)"),
                 _state_of("model"), _load_into("model")),
    "optimizer": Key(Field(lambda v: isinstance(v, dict) and {"state", "param_groups"} <= set(v),
                           "an optimizer state_dict"), _state_of("opt"), _load_into("opt")),
    "scheduler": Key(Field(lambda v: isinstance(v, dict), "an LR scheduler state_dict"),
                     _state_of("sched"), _load_into("sched")),
    "dst": Key(Field(optional(lambda v: isinstance(v, dict)), "None or a DST engine state_dict"),
               _state_of("method.engine"), _load_into("method.engine")),
    "method_state": Key(Field(optional(lambda v: isinstance(v, dict)), "None or a method state_dict",
                              required=False),
                        _state_of("method.controller"), _load_into("method.controller")),
    "data_rng": Key(Field(tensor_of(torch.uint8), "a generator state (1-D uint8 tensor)"),
                    lambda t: t.g.get_state(), lambda t, v: t.g.set_state(v)),
    "torch_rng": Key(Field(tensor_of(torch.uint8), "a generator state (1-D uint8 tensor)"),
                     lambda t: torch.get_rng_state(), lambda t, v: torch.set_rng_state(v)),
    "history": Key(Field(list_of(table_of(is_plain)), "a list of tables of plain values"),
                   lambda t: t.history, _set("history", list)),
    "step_times": Key(Field(list_of(is_number), "a list of numbers"),
                      lambda t: t.step_times, _set("step_times", list)),
    "density_log": Key(Field(list_of(table_of(is_plain)), "a list of tables of plain values"),
                       lambda t: t.log, _set("log", list)),
}
FIELDS = {k: key.field for k, key in KEYS.items()}


def load(path) -> dict:
    """The checkpoint at ``path``, read without running code and checked against :data:`KEYS`
    (:class:`~sparsekern.checkpoint_io.CheckpointError` naming the entry otherwise)."""
    return checkpoint_io.load(path, FIELDS)


def save(trainer, path: Path) -> None:
    """Write every entry of :data:`KEYS` of ``trainer`` to ``path``, atomically."""
    checkpoint_io.save({k: key.get(trainer) for k, key in KEYS.items()}, path)


def restore(trainer, ck: dict) -> None:
    """Put checkpoint ``ck`` (from :func:`load`) back into ``trainer``, after checking that its
    position lies inside this run; a checkpoint that does not fit is a UsageError naming why."""
    try:
        _check_position(ck, trainer)
        for name, key in KEYS.items():
            if key.put is not None:
                key.put(trainer, ck[name])
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise cli.UsageError(f"checkpoint does not fit this run ({trainer.method.name}): {exc}") from None


def _check_position(ck: dict, trainer) -> None:
    """Refuse (ValueError) a checkpoint whose position does not lie inside this run."""
    a, n_train, steps_per_epoch = trainer.a, len(trainer.split.x_train), trainer.plan.steps_per_epoch
    epoch, step, order = ck["epoch"], ck["step"], ck["order"]
    if epoch > a.epochs or step >= steps_per_epoch or (epoch == a.epochs and step):
        raise ValueError(f"it stopped at epoch {epoch} step {step}; this run has {a.epochs} epochs of "
                         f"{steps_per_epoch} steps")
    if len(ck["history"]) != epoch or len(ck["step_times"]) != epoch * steps_per_epoch + step:
        raise ValueError(f"its history ({len(ck['history'])} epochs, {len(ck['step_times'])} steps) "
                         f"does not match its position (epoch {epoch} step {step})")
    if order is not None and (len(order) != n_train or not torch.equal(order.sort().values, torch.arange(n_train))):
        raise ValueError(f"its data order is not a permutation of the {n_train} training examples")
