"""rigl-torch (``pip install --no-deps rigl-torch``, 0.5.2) as a peer in the DST benchmark.

Its API: ``rigl_torch.RigL.RigLScheduler(model, optimizer, dense_allocation, T_end,
sparsity_distribution='uniform', ignore_linear_layers=True, delta=100, alpha=0.3,
grad_accumulation_n=1, state_dict=None)`` masks the weights of a *dense* model (masked dense:
a gradient hook multiplies each weight's gradient by its mask, and it wraps
``optimizer.step`` to re-mask weights and momentum), and the training loop calls
``if scheduler(): optimizer.step()``: ``scheduler()`` counts the step and, every ``delta``
steps before ``T_end``, runs a RigL update (drop by magnitude, grow by the dense gradient,
drop fraction ``alpha`` cosine-annealed) and returns False, skipping that step's update.

It draws its own random uniform masks (first layer dense) and knows only 'uniform'; to run it
on sparsekern's very masks (ERK or uniform, every layer sparse), :func:`scheduler` hands them
in through its ``state_dict`` argument, the route it restores checkpoints by.

``rigl_torch.util`` imports torchvision only to test ``isinstance(m,
torchvision.models.resnet.Bottleneck/BasicBlock)``; torchvision does not import against CPU
torch 2.13 here, so :func:`load` puts a stub torchvision (those two classes, which nothing
is an instance of) into ``sys.modules`` for the import only, and takes it out again.
"""
from __future__ import annotations

import sys
import types

import torch
from torch import nn

STUB = ("torchvision", "torchvision.models", "torchvision.models.resnet")


def stub_torchvision() -> dict:
    """Stub modules for ``torchvision.models.resnet.{BasicBlock, Bottleneck}``, by name."""
    tv, models, resnet = (types.ModuleType(n) for n in STUB)
    for cls in ("BasicBlock", "Bottleneck"):
        setattr(resnet, cls, type(cls, (nn.Module,), {"__doc__": "stub: rigl_torch's isinstance checks"}))
    models.resnet, tv.models = resnet, models
    return dict(zip(STUB, (tv, models, resnet)))


def torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:                     # torchvision built for another torch raises RuntimeError too
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def load():
    """``(RigLScheduler, None)``, or ``(None, reason)``: "not installed" or why the import failed."""
    stubbed = {} if torchvision_importable() else stub_torchvision()
    sys.modules.update(stubbed)
    try:
        from rigl_torch.RigL import RigLScheduler
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "rigl_torch":
            return None, "not installed"
        return None, f"import failed: {exc}"
    except ImportError as exc:
        return None, f"import failed: {exc}"
    finally:
        for name, mod in stubbed.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
    return RigLScheduler, None


def scheduler(cls, model: nn.Module, optimizer, masks: dict, total_steps: int, update_every: int,
              drop_fraction: float):
    """A RigLScheduler on ``model`` with exactly ``masks`` ({module name: bool mask of its weight's
    shape, or [out, in]}); layers without a mask stay dense. RigL updates every ``update_every``
    steps until ``total_steps``, drop fraction ``drop_fraction`` cosine-annealed."""
    from rigl_torch.util import get_W
    weights, linear_flags = get_W(model, return_linear_layers_mask=True)
    names = {id(m.weight): n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    unknown = set(masks) - set(names.values())
    if unknown:
        raise ValueError(f"masks name no weighted layer of the model: {sorted(unknown)}")
    backward_masks, sparsity = [], []
    for w in weights:
        m = masks.get(names[id(w)])
        if m is None:
            backward_masks.append(None)
            sparsity.append(0.0)
            continue
        if m.numel() != w.numel():
            raise ValueError(f"mask of {names[id(w)]} has {m.numel()} entries, its weight {w.numel()}")
        m = m.reshape(w.shape).to(torch.bool).clone()
        backward_masks.append(m)
        sparsity.append(1.0 - m.float().mean().item())
    kept = sum(w.numel() * (1 - s) for w, s in zip(weights, sparsity)) / sum(w.numel() for w in weights)
    state = {"dense_allocation": kept, "S": sparsity, "N": [w.numel() for w in weights],
             "hyperparams": {"delta_T": update_every, "alpha": drop_fraction, "T_end": total_steps,
                             "ignore_linear_layers": False, "static_topo": False,
                             "sparsity_distribution": "uniform", "grad_accumulation_n": 1},
             "step": 0, "rigl_steps": 0, "backward_masks": backward_masks, "_linear_layers_mask": linear_flags}
    return cls(model, optimizer, dense_allocation=kept, T_end=total_steps, delta=update_every,
               alpha=drop_fraction, state_dict=state)


class SchedulerStep:
    """An optimizer facade for the benchmark's training loop whose ``step()`` is rigl-torch's idiom,
    ``if scheduler(): optimizer.step()``; ``state`` is the wrapped optimizer's."""

    def __init__(self, optimizer, sched):
        self.optimizer, self.scheduler = optimizer, sched

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        if self.scheduler():
            self.optimizer.step()

    def masks(self) -> dict:
        """The scheduler's masks, by position (for the memory count)."""
        return {i: m for i, m in enumerate(self.scheduler.backward_masks) if m is not None}
