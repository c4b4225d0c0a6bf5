"""Trainable-threshold dynamic sparse training (Liu, Xu, Shi, Cheung, So 2020).

Masked ``nn.Linear``/``nn.Conv2d`` variants with one trainable threshold per
output neuron (channel), initialised to 0: ``mask = step(|W| - t)``. The step's
backward is the paper's long-tailed estimator, exactly::

    d step(x) / dx ~= 2 - 4|x|   for |x| <= 0.4
                      0.4        for 0.4 < |x| <= 1
                      0          beyond

A sparsity regulariser ``alpha * sum(exp(-t))`` (:func:`threshold_regularizer`)
pushes thresholds up, and a layer left with at most 1% of its weights has its
thresholds reset to 0 (:func:`reset_collapsed`).

**This method is dense-to-sparse by nature**: the thresholds and the pruned
weights need the gradient of every weight, so training keeps the dense weight
and runs a dense, masked forward and backward. That masked product is the
method's own training path, not sparsekern's product path. The sparse kernels
take over where it pays: in eval mode each layer runs its current mask on the
sparse kernels (``sparse_eval=True``, the default; the CSR/BSR topology is rebuilt
only when the mask changed), and :func:`export_sparse` turns the model into plain
``SparseLinear``/``SparseConv2d`` layers with the current masks at any time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear


class LongTailedStep(torch.autograd.Function):
    """step(x) = 1[x > 0] forward; backward g * (2 - 4|x| | 0.4 | 0) as in the paper."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * estimator(x)


def estimator(x: torch.Tensor) -> torch.Tensor:
    """The long-tailed derivative of the step at x (same shape and dtype)."""
    a = x.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))


@torch.no_grad()
def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    dst.weight.copy_(src.weight)
    if src.bias is not None:
        dst.bias.copy_(src.bias)


class _ThresholdMixin:
    def _init_threshold(self, out: int, sparse_eval: bool) -> None:
        self.threshold = nn.Parameter(torch.zeros(out, device=self.weight.device, dtype=self.weight.dtype))
        self.sparse_eval = sparse_eval
        self._eval_cache = None           # (mask, sparse layer) of the last eval forward

    def mask(self) -> torch.Tensor:
        """Float mask in the weight's shape (1 kept, 0 pruned), differentiable in W and t."""
        w2 = self.weight.reshape(self.weight.shape[0], -1)
        m = LongTailedStep.apply(w2.abs() - self.threshold[:, None])
        return m.reshape(self.weight.shape)

    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        """Bool mask in the weight's shape."""
        return self.weight.abs() > self.threshold.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def kept_fraction(self) -> float:
        return float(self.hard_mask().float().mean())

    def _sparse_twin(self):
        """The sparse layer of the current mask, rebuilt only after W, t or b changed."""
        stamp = tuple(p._version for p in (self.weight, self.threshold, self.bias) if p is not None)
        if self._eval_cache is None or self._eval_cache[0] != stamp:
            self._eval_cache = (stamp, self.to_sparse())
        return self._eval_cache[1]

    def forward(self, x):
        if not self.training and self.sparse_eval and not torch.is_grad_enabled():
            return self._sparse_twin()(x)
        return self._masked_forward(x, self.weight * self.mask())


class ThresholdLinear(_ThresholdMixin, nn.Linear):
    """``nn.Linear`` with a trainable per-output threshold ``threshold`` [out] (init 0).

    Training forward: ``F.linear(x, W * step(|W| - t), b)`` (dense, see module doc).
    Eval forward with ``sparse_eval`` and no grad: the same layer on the sparse kernels.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, sparse_eval=True):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_threshold(out_features, sparse_eval)

    @classmethod
    def from_dense(cls, lin: nn.Linear, sparse_eval=True) -> "ThresholdLinear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.device, lin.weight.dtype,
                sparse_eval)
        _copy_params(m, lin)
        return m

    def _masked_forward(self, x, w):
        return F.linear(x, w, self.bias)

    def to_sparse(self) -> SparseLinear:
        """A ``SparseLinear`` (CSR) with the current mask and weights."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        _copy_params(lin, self)
        return SparseLinear.from_dense(lin, mask=self.hard_mask())


class ThresholdConv2d(_ThresholdMixin, nn.Conv2d):
    """``nn.Conv2d`` with a trainable per-output-channel threshold [out_channels] (init 0)."""

    def __init__(self, *args, sparse_eval=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_threshold(self.out_channels, sparse_eval)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, sparse_eval=True) -> "ThresholdConv2d":
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype, sparse_eval=sparse_eval)
        _copy_params(m, conv)
        return m

    def _masked_forward(self, x, w):
        return self._conv_forward(x, w, self.bias)

    def to_sparse(self) -> SparseConv2d:
        """A ``SparseConv2d`` (CSR) with the current mask and weights."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, device=self.weight.device,
                         dtype=self.weight.dtype)
        _copy_params(conv, self)
        return SparseConv2d.from_dense(conv, mask=self.hard_mask())


THRESHOLD_LAYERS = (ThresholdLinear, ThresholdConv2d)


def thresholdify(model: nn.Module, skip=(), sparse_eval: bool = True) -> list[str]:
    """Replace every ``nn.Linear``/``nn.Conv2d`` (except names in ``skip``) by its threshold
    variant, in place, keeping the weights. Returns the replaced names."""
    skip = set(skip)

    def walk(module, prefix):
        out = []
        for name, child in list(module.named_children()):
            full = f"{prefix}{name}"
            if full in skip:
                continue
            if type(child) is nn.Linear:
                setattr(module, name, ThresholdLinear.from_dense(child, sparse_eval))
                out.append(full)
            elif type(child) is nn.Conv2d and child.padding_mode == "zeros":
                setattr(module, name, ThresholdConv2d.from_dense(child, sparse_eval))
                out.append(full)
            else:
                out += walk(child, full + ".")
        return out

    return walk(model, "")


def threshold_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, THRESHOLD_LAYERS)}


def threshold_regularizer(model: nn.Module, alpha: float) -> torch.Tensor:
    """alpha * sum over every threshold of exp(-t): add it to the loss."""
    ts = [m.threshold for m in threshold_layers(model).values()]
    if not ts:
        raise ValueError("the model has no threshold layers; call thresholdify first")
    return alpha * sum(torch.exp(-t).sum() for t in ts)


@torch.no_grad()
def reset_collapsed(model: nn.Module, min_keep: float = 0.01) -> list[str]:
    """Reset to 0 the thresholds of every layer keeping <= ``min_keep`` of its weights.
    Returns the names of the layers reset (call after each optimizer step)."""
    reset = []
    for name, m in threshold_layers(model).items():
        if m.kept_fraction() <= min_keep:
            m.threshold.zero_()
            reset.append(name)
    return reset


def model_density(model: nn.Module) -> float:
    """Kept fraction over all threshold layers' weights."""
    layers = threshold_layers(model).values()
    kept = sum(int(m.hard_mask().sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    return kept / total if total else 1.0


@torch.no_grad()
def export_sparse(model: nn.Module) -> list[str]:
    """Replace every threshold layer by a ``SparseLinear``/``SparseConv2d`` (CSR) holding its
    current mask and weights, in place. Returns the replaced names."""
    def walk(module, prefix):
        out = []
        for name, child in list(module.named_children()):
            if isinstance(child, THRESHOLD_LAYERS):
                setattr(module, name, child.to_sparse())
                out.append(prefix + name)
            else:
                out += walk(child, f"{prefix}{name}.")
        return out

    return walk(model, "")
