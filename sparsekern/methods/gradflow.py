"""The gradient-flow study (Evci et al. 2020): per-layer gradient norms in early training.

:func:`record_gradient_flow` trains a model for a few epochs and records, at every
step, the L2 norm of each layer's weight gradient (the sparse values' gradient
for sparse layers) and of the whole model. :func:`compare_inits` does so for the
paper's three initialisations of one sparse topology:

* ``"dense-masked"``: the dense init (Kaiming-uniform over the dense fan-in) with the
  mask applied: each neuron's variance shrinks with its density;
* ``"fanin"``: the sparse-aware init, std = sqrt(2 / fan_in_i) with fan_in_i the
  neuron's actual nonzero fan-in (``sparsify(..., init="fanin")``);
* ``"lottery-rewind"``: a lottery ticket: train the dense model for
  ``ticket_epochs``, keep the largest weights per layer (the same per-layer
  counts), and rewind the survivors to their initial values.

The paper's qualitative claim is that the sparse-aware init has a larger
gradient norm at initialisation than the masked dense init (whose signal
shrinks layer by layer), and that the lottery ticket does not owe its success
to better gradient flow at initialisation. ``examples/gradient_flow.py`` plots it.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.nn import SparseConv2d, SparseLinear

INITS = ("dense-masked", "fanin", "lottery-rewind")


def layer_gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each weight layer's gradient (sparse: its values), plus "total"."""
    out, total = {}, 0.0
    for name, m in model.named_modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            g = m.topology.values.grad
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            g = m.weight.grad
        else:
            continue
        if g is not None:
            n = float(g.norm())
            out[name] = n
            total += n * n
    out["total"] = total ** 0.5
    return out


def record_gradient_flow(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 2,
                         batch_size: int = 64, lr: float = 0.05, seed: int = 0) -> list[dict]:
    """Train with SGD (momentum 0.9) and return, per step, ``{"step", "loss", <layer>: norm, "total"}``.

    The first record is the gradient at initialisation (before any update).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    log, step = [], 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            log.append({"step": step, "loss": loss.item(), **layer_gradient_norms(model)})
            opt.step()
            step += 1
    return log


def _dense_train(model, x, y, epochs, batch_size, lr, seed):
    record_gradient_flow(model, x, y, epochs, batch_size, lr, seed)


def lottery_ticket(make_dense: Callable[[], nn.Module], density_model: nn.Module, x, y, ticket_epochs: int,
                   batch_size: int, lr: float, seed: int) -> nn.Module:
    """A lottery ticket with ``density_model``'s per-layer nnz: train a dense copy, keep the
    largest trained weights of each layer, rewind them to their initial values."""
    torch.manual_seed(seed)
    dense = make_dense()
    init = copy.deepcopy(dense)
    _dense_train(dense, x, y, ticket_epochs, batch_size, lr, seed)
    trained = dict(dense.named_modules())
    ticket = copy.deepcopy(init)
    counts = {n: m.nnz for n, m in density_model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
    for name, k in counts.items():
        w = trained[name].weight.detach()
        keep = torch.zeros(w.numel(), dtype=torch.bool)
        keep[torch.topk(w.abs().flatten(), k).indices] = True
        mask = keep.reshape(w.shape)
        parent_name, _, child = name.rpartition(".")
        parent = ticket.get_submodule(parent_name) if parent_name else ticket
        dense_layer = getattr(parent, child)
        sparse_cls = SparseLinear if isinstance(dense_layer, nn.Linear) else SparseConv2d
        setattr(parent, child, sparse_cls.from_dense(dense_layer, mask=mask))
    return ticket


def compare_inits(make_dense: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, density: float = 0.1,
                  distribution: str = "erk", epochs: int = 2, ticket_epochs: int = 5, batch_size: int = 64,
                  lr: float = 0.05, seed: int = 0, inits=INITS) -> dict[str, list[dict]]:
    """Gradient-norm logs of :func:`record_gradient_flow` for each initialisation in ``inits``.

    ``make_dense()`` builds the dense model (called once per init, under the same seed).
    The dense-masked and fan-in models share one topology; the lottery ticket has the same
    per-layer nnz.
    """
    logs = {}
    reference = None
    for init in inits:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        torch.manual_seed(seed)
        model = make_dense()
        if init == "lottery-rewind":
            if reference is None:
                reference = make_dense()
                sk.sparsify(reference, density, distribution, generator=torch.Generator().manual_seed(seed))
            model = lottery_ticket(make_dense, reference, x, y, ticket_epochs, batch_size, lr, seed)
        else:
            sk.sparsify(model, density, distribution, init="dense" if init == "dense-masked" else "fanin",
                        generator=torch.Generator().manual_seed(seed))
            reference = reference or model
        logs[init] = record_gradient_flow(model, x, y, epochs, batch_size, lr, seed)
    return logs


def plot_gradient_flow(logs: dict[str, list[dict]], path, title: str = "gradient flow") -> None:
    """Total gradient norm per step (left) and per layer at initialisation (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for init, log in logs.items():
        ax[0].plot([r["step"] for r in log], [r["total"] for r in log], label=init)
        layers = [k for k in log[0] if k not in ("step", "loss", "total")]
        ax[1].plot(range(len(layers)), [log[0][k] for k in layers], marker="o", label=init)
        ax[1].set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
    ax[0].set(xlabel="step", ylabel="gradient L2 norm (all layers)", yscale="log", title=title)
    ax[1].set(ylabel="gradient L2 norm at init", yscale="log", title="per layer, step 0")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
