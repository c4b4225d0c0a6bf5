"""``sparsekern::free_candidates``: RigL growth's scan of one tile of scores.

``free_candidates(scores, threshold, absolute, kept, start, stride=0) -> (positions, values)``

* ``scores``: float32/float64. With ``stride = 0``: any shape, read flat, the scores of
  positions ``start .. start + scores.numel() - 1`` (a band of rows of the dense gradient,
  row-major). With ``stride > 0``: 2-D ``[h, w]``, ``w <= stride``, entry ``(i, j)`` the
  score of position ``start + i * stride + j`` (a cache-sized block of the gradient,
  whose rows are ``stride`` positions apart);
* ``absolute``: score each entry by its absolute value (a raw gradient tile) or as it is;
* ``kept``: int64, 1-D, ascending: positions that may not be taken (the active weights);
* returns the positions (int64, ascending) whose score ``s`` is finite, ``s > threshold``
  and not in ``kept``, and those scores (``scores``' dtype).

This is :class:`~sparsekern.dst.selection.RunningTopK`'s filter once its best k are k
finite scores: an entry of a later tile can enter only above their smallest one. The CPU
kernel (``csrc/cpu/free_candidates_cpu.cpp``) reads the tile once; :func:`reference` is
the same in torch ops, which runs on every other device and on a CPU without the compiled
extension (and is what the tests compare the kernel with).
"""
from __future__ import annotations

import torch

from sparsekern.sampling import is_member

# Defined before sparsekern.ops.library imports the extension, whose CPU kernel registers
# against this schema.

SCHEMA = ("free_candidates(Tensor scores, float threshold, bool absolute, Tensor kept, int start, int stride=0) "
          "-> (Tensor, Tensor)")

_lib = torch.library.Library("sparsekern", "FRAGMENT")
_lib.define(SCHEMA)


def reference(scores: torch.Tensor, threshold: float, absolute: bool, kept: torch.Tensor,
              start: int, stride: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch-ops form of the op (device-agnostic; a few passes over ``scores``)."""
    s = scores.reshape(-1)
    if absolute:
        s = s.abs()
    cand = torch.nonzero(s > threshold).flatten()
    if cand.numel():
        cand = cand[torch.isfinite(s[cand])]          # +Inf ranks below every finite score
    pos = cand + start if not stride else start + cand // scores.shape[1] * stride + cand % scores.shape[1]
    if cand.numel():
        lo, hi = torch.searchsorted(kept, torch.stack([pos[0], pos[-1] + 1])).tolist()
        free = ~is_member(kept[lo:hi], pos)
        cand, pos = cand[free], pos[free]
    return pos, s[cand]


def _checked(scores, threshold, absolute, kept, start, stride=0):
    if stride < 0:
        raise ValueError(f"free_candidates: stride must be >= 0, got {stride}")
    if stride and scores.dim() != 2:
        raise ValueError(f"free_candidates: with stride > 0, scores must be 2-D, got {scores.dim()}-D")
    if stride and scores.shape[1] > stride:
        raise ValueError(f"free_candidates: a row of scores ({scores.shape[1]} entries) is wider than "
                         f"stride ({stride})")
    if scores.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"free_candidates: scores must be float32 or float64, got {scores.dtype}")
    if kept.dtype != torch.int64 or kept.dim() != 1:
        raise TypeError(f"free_candidates: kept must be a 1-D int64 tensor, got {kept.dim()}-D {kept.dtype}")
    if kept.device != scores.device:
        raise ValueError(f"free_candidates: kept is on {kept.device} but scores on {scores.device}")
    return reference(scores, threshold, absolute, kept, start, stride)


# The torch form for every backend (CUDA, MPS, XPU, ..., and CPU when the extension is not
# built): a backend's own kernel, the compiled CPU one, takes precedence over it.
_lib.impl("free_candidates", _checked, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsekern::free_candidates")
def _fake(scores, threshold, absolute, kept, start, stride=0):
    n = torch.library.get_ctx().new_dynamic_size()
    return scores.new_empty(n, dtype=torch.int64), scores.new_empty(n)


free_candidates = torch.ops.sparsekern.free_candidates.default
