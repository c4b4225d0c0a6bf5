"""FLOPs counted from the real nonzeros (multiply-adds count 2).

For every ``nn.Linear``/``nn.Conv2d``/HF ``Conv1D`` and its sparse twin (the projections of
``SparseMultiheadAttention`` included; a dense ``nn.MultiheadAttention`` is not counted), one forward hook on an example
input records how many output positions each weight is applied at; then

* inference: ``2 * nnz * positions`` per layer (``nnz`` = ``numel`` for a dense layer),
* training step: forward + dX (skipped for a layer whose input needs no gradient, e.g.
  the first) + dW, i.e. ``2 * nnz * positions`` each,
* RigL topology updates add a dense ``dY^T X`` (``2 * numel * positions``) every
  ``update_every`` steps, amortised per step.

Biases, activations and normalisation are left out (the same for sparse and dense).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.nn.conv1d import is_hf_conv1d

_LAYERS = (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)


@dataclass
class LayerFlops:
    name: str
    nnz: int
    numel: int
    positions: int          # output positions per example (1 for Linear, OH*OW for conv)
    needs_input_grad: bool


@dataclass
class FlopReport:
    """Per-example FLOPs of a model (multiply by the batch size for a step)."""
    layers: list[LayerFlops] = field(default_factory=list)

    def inference(self) -> int:
        return sum(2 * lf.nnz * lf.positions for lf in self.layers)

    def training_step(self, update_every: int | None = None) -> float:
        """Forward + backward per example; with ``update_every``, plus RigL's amortised dense gradient."""
        total = 0.0
        for lf in self.layers:
            f = 2 * lf.nnz * lf.positions
            total += f * (3 if lf.needs_input_grad else 2)
            if update_every:
                total += 2 * lf.numel * lf.positions / update_every
        return total


def _numel_nnz(m) -> tuple[int, int]:
    if isinstance(m, (SparseLinear, SparseConv2d)):
        rows, cols = m.topology.shape
        return rows * cols, m.nnz
    return m.weight.numel(), m.weight.numel()


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> FlopReport:
    """Run ``model`` once on ``example`` ([1, ...] or a batch) and count each layer's FLOPs per example."""
    report = FlopReport()
    order: list = []
    hooks = []
    first_input = {"seen": False}

    def hook(name):
        def fn(module, inputs, output):
            numel, nnz = _numel_nnz(module)
            positions = output[0].numel() // output.shape[1] if output.dim() == 4 else \
                output.numel() // (output.shape[0] * output.shape[-1]) if output.dim() > 1 else 1
            needs = first_input["seen"]          # the first weighted layer's input is the data
            first_input["seen"] = True
            order.append(LayerFlops(name, nnz, numel, positions, needs))
        return fn

    for name, m in model.named_modules():
        if isinstance(m, _LAYERS) or is_hf_conv1d(m):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    report.layers = order
    return report
