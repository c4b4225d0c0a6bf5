"""What RigL's growth gradient is made of: each sparse layer's (input, output gradient) pairs.

A :class:`Tap` sits on a ``SparseLinear``/``SparseConv2d`` (``layer._dst_tap``; the layers call
it at the end of ``forward`` while it is armed). The engine arms it for the step before an
update only. It records a pair when the output's gradient arrives, so:

* every forward *and* backward of the step counts: under gradient accumulation (several
  micro-batches per optimizer step) the growth gradient is the sum over all of them, the
  step's whole dense gradient;
* a forward whose output never gets a gradient (evaluation, logging, ``torch.no_grad()``)
  records nothing, so it cannot pair its input with another forward's gradient;
* it works under ``torch.compile``: the layer reads ``_dst_tap`` and ``armed`` in its
  forward, which Dynamo guards (arming recompiles once, then both graphs are cached), and
  ``Tap.__call__`` runs eagerly (``torch._dynamo.disable``) to hook the real output.

A tap is not copied with its module (``copy.deepcopy``, pickling give None): a copy of the
model is not the engine's.
"""
from __future__ import annotations

import torch


def _no_tap():
    return None


class Tap:
    """Per layer: (x, dy) pairs of the forwards, while armed, whose output received a gradient.

    ``pairs`` is a list of ``(x, dy)`` detached tensors, x as the layer's input
    (``[..., in]`` or ``[N, C, H, W]``/``[C, H, W]``) and dy as its output.
    """

    def __init__(self):
        self.armed = False
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch._dynamo.disable
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and y.requires_grad):
            return
        pairs, x = self.pairs, x.detach()     # a later reset() starts a new list: late hooks go to this one
        y.register_hook(lambda g: pairs.append((x, g.detach())))

    def reset(self, armed: bool = False) -> None:
        """Forget the pairs; arm or disarm."""
        self.pairs = []
        self.armed = armed

    def __deepcopy__(self, memo):
        return None

    def __reduce__(self):
        return (_no_tap, ())
