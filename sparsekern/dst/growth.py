"""RigL's growth scores tile by tile: the dense weight gradient is never formed whole.

The dense gradient of a layer over a step is ``G = sum_p dy_p^T x_p`` (linear) or the
``conv2d_weight`` of each captured pair (conv), over the pairs a :class:`~sparsekern.dst.capture.Tap`
recorded. :func:`grow_top_k` forms it a tile of block rows at a time (``[rows * b, in]``),
scores it (``|g|``, or the L2 norm of each b x b block), and feeds the scores to a
:class:`~sparsekern.dst.selection.RunningTopK`, which keeps the exact top k of the free
positions (active ones excluded) across tiles. Peak memory: the captured pairs
(``batch * (in + out)``) plus one tile, whose size follows a byte budget
(:func:`tile_rows`; default :func:`default_budget`: ``GROWTH_BUDGET_FACTOR`` times the
layer's stored value bytes, at least ``GROWTH_BUDGET_FLOOR`` = 64 MiB). The selection is exactly that
of one pass over the whole gradient (same rule, ties included); the time is about that of
the dense GEMM plus a pass or two over each tile (see the README's "Sparse training beyond
dense memory").

Under ``torch.distributed`` every rank must choose alike without reducing an [out, in]
tensor. Two exact ways, chosen per layer by the bytes each rank receives (``ddp="auto"``):

* ``"gather"``: all-gather the captured x and dy (batch-sized) and compute the same tiles
  on every rank: ``(world - 1) * batch * (in + out)`` elements per rank;
* ``"reduce"``: all-reduce each tile of the gradient as it is formed (peak memory is still
  one tile): about ``2 (world - 1) / world * out * in`` elements per rank (ring).

Linear layers at RigL's sizes gather (batch * (in + out) << out * in); a conv layer whose
activations outweigh its weight reduces tile by tile.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.dst.selection import RunningTopK
from sparsekern.nn import SparseConv2d, SparseLinear

GROWTH_BUDGET_FACTOR = 4
GROWTH_BUDGET_FLOOR = 64 << 20
# Once the best k hold a threshold, a linear layer's gradient is formed and scanned in blocks
# of this many rows x columns (4 MiB in fp32), inside the budget's band: the GEMM (inner
# dimension the batch) runs about 2.5x faster on cache-sized blocks than on full-width
# bands, and the scan reads each block from cache (DEVELOPERS.md, "RigL growth in blocks").
GROWTH_BLOCK = (1024, 1024)
DDP_MODES = ("auto", "gather", "reduce")


def _score_dtype(*tensors) -> torch.dtype:
    dt = tensors[0].dtype
    for t in tensors[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def row_bytes(module) -> int:
    """Bytes of one block row of a tile's working set: the dense gradient rows (b x in; twice for
    BSR, whose block norms square a copy), their scores and the candidate flags."""
    topo = module.topology
    b = topo.block_size
    C = topo.shape[1] // b
    es = max(topo.values.element_size(), 4)
    return C * (b * b * es * (1 if b == 1 else 2) + es + 3)


def default_budget(module) -> int:
    """``GROWTH_BUDGET_FACTOR`` x the layer's stored value bytes, at least ``GROWTH_BUDGET_FLOOR``
    (fewer, larger tiles are faster) and at least one block row."""
    es = max(module.topology.values.element_size(), 4)
    return max(GROWTH_BUDGET_FACTOR * module.topology.nnz * es, GROWTH_BUDGET_FLOOR, row_bytes(module))


def tile_rows(module, budget: int, name: str = "layer") -> int:
    """Block rows per tile within ``budget`` bytes; ``ValueError`` (with the numbers) when not even one fits."""
    per = row_bytes(module)
    if budget < per:
        topo = module.topology
        raise ValueError(f"growth_memory={budget} bytes is too small for one tile of {name!r} "
                         f"(shape {tuple(topo.shape)}, block size {topo.block_size}): one block row of the "
                         f"gradient tile needs {per} bytes")
    return max(1, min(module.topology.shape[0] // module.topology.block_size, budget // per))


def prepared_pairs(module, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The captured pairs as the tiles read them: linear ``(x [n, in], dy [n, out])``, conv
    ``(x padded [N, C, H', W'], dy [N, out, OH, OW])``, both in one float dtype."""
    out = []
    for x, dy in pairs:
        dt = _score_dtype(x, dy)
        x, dy = x.to(dt), dy.to(dt)
        if isinstance(module, SparseLinear):
            out.append((x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])))
        else:
            _, _, _, _, pt, pl, pb, pr, _, _, _ = module.geometry
            if x.dim() == 3:
                x, dy = x.unsqueeze(0), dy.unsqueeze(0)
            out.append((F.pad(x, (pl, pr, pt, pb)), dy))
    return out


def gradient_block(pairs, o0: int, o1: int, c0: int, c1: int, out: torch.Tensor) -> torch.Tensor:
    """Rows ``[o0, o1)``, columns ``[c0, c1)`` of a linear layer's dense weight gradient, summed
    over the :func:`prepared_pairs` ``pairs``, written into the front of the buffer ``out``
    (contiguous, at least ``(o1 - o0) * (c1 - c0)`` elements) and returned as [o1 - o0, c1 - c0]."""
    g = out.view(-1)[: (o1 - o0) * (c1 - c0)].view(o1 - o0, c1 - c0)
    for i, (x, dy) in enumerate(pairs):
        a, bm = dy[:, o0:o1].t(), x[:, c0:c1]
        if i == 0:
            torch.mm(a, bm, out=g)
        else:
            g.addmm_(a, bm)
    return g


def gradient_rows(module, pairs, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[r0 * b, r1 * b)`` of the dense weight gradient (2-D: [out, in] or conv's
    [out, in/groups * kh * kw]), summed over the :func:`prepared_pairs` ``pairs``.

    ``out`` (linear layers): a 2-D buffer of at least that many rows, written and returned
    (its first rows): reusing one buffer for every tile saves a fresh allocation's page
    faults per tile (~20% of the GEMM's time at 16384 columns)."""
    b = module.topology.block_size
    o0, o1 = r0 * b, r1 * b
    g = None
    for x, dy in pairs:
        if isinstance(module, SparseLinear):
            if out is not None:
                return gradient_block(pairs, o0, o1, 0, x.shape[1], out)
            part = dy[:, o0:o1].t() @ x
        else:
            part = _conv_rows(module, x, dy, o0, o1)
        g = part if g is None else g.add_(part)
    return g


def _conv_rows(module: SparseConv2d, xp, dy, o0: int, o1: int) -> torch.Tensor:
    kh, kw, sh, sw, _, _, _, _, dh, dw, groups = module.geometry
    og, cg = module.out_channels // groups, module.in_channels // groups
    parts, o = [], o0
    while o < o1:                                  # split the tile at group boundaries
        gi = o // og
        e = min(o1, (gi + 1) * og)
        parts.append(torch.nn.grad.conv2d_weight(xp[:, gi * cg:(gi + 1) * cg], (e - o, cg, kh, kw),
                                                 dy[:, o:e], (sh, sw), 0, (dh, dw), 1))
        o = e
    return torch.cat(parts).reshape(o1 - o0, -1)


def block_scores(g: torch.Tensor, b: int) -> torch.Tensor:
    """float [rows / b * C]: |g| (b = 1, in place) or each b x b block's L2 norm, row-major."""
    if b == 1:
        return g.abs_().flatten()
    rows, cols = g.shape
    return g.reshape(rows // b, b, cols // b, b).pow(2).sum((1, 3)).sqrt().flatten()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_gather_batch(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's ``t`` (same trailing shape, ``sizes[r]`` rows on rank r), concatenated in rank order."""
    dist = torch.distributed
    top = max(sizes)
    padded = t if t.shape[0] == top else torch.cat([t, t.new_zeros((top - t.shape[0], *t.shape[1:]))])
    bufs = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(bufs, padded.contiguous())
    return torch.cat([buf[:n] for buf, n in zip(bufs, sizes)])


def ddp_plan(module, pairs, mode: str) -> tuple[list, bool]:
    """Under torch.distributed: ``(pairs every rank shares, reduce each tile?)``, the same on every
    rank. Without it: ``(pairs, False)``. See the module doc for the byte counts."""
    if not _distributed():
        return pairs, False
    dist = torch.distributed
    x = torch.cat([p[0] for p in pairs])
    dy = torch.cat([p[1] for p in pairs])
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
    sizes = [int(s) for s in sizes]
    world = len(sizes)
    gather_elems = (world - 1) * sum(sizes) * (x[:1].numel() + dy[:1].numel())
    topo = module.topology
    reduce_elems = 2 * (world - 1) * topo.shape[0] * topo.shape[1] // world
    if mode == "reduce" or (mode == "auto" and reduce_elems < gather_elems):
        return [(x, dy)], True
    return [(_all_gather_batch(x, sizes), _all_gather_batch(dy, sizes))], False


def grow_top_k(module, pairs, kept: torch.Tensor, k: int, rows_per_tile: int, ddp: str = "auto") -> torch.Tensor:
    """RigL's k growth positions (int64 ascending block positions, on ``kept``'s device) outside
    ``kept`` (ascending), by the largest gradient score, tile by tile (see the module doc).

    ``pairs``: the layer's captured ``(x, dy)``; ``rows_per_tile``: block rows per tile
    (:func:`tile_rows`). Raises :class:`~sparsekern.dst.selection.NonFiniteScores` when no
    score is finite.
    """
    topo = module.topology
    b = topo.block_size
    R, C = topo.shape[0] // b, topo.shape[1] // b
    shared, reduce_tiles = ddp_plan(module, prepared_pairs(module, pairs), ddp)
    top = RunningTopK(k, kept)
    buf = blk = None
    linear = isinstance(module, SparseLinear) and shared and len({x.dtype for x, _ in shared}) == 1
    if linear:
        x0 = shared[0][0]
        buf = x0.new_empty((min(R, rows_per_tile) * b, x0.shape[1]))
        # cache-sized blocks once a threshold exists (not when tiles are all-reduced: one
        # collective per band, as before), never more entries than a band of the budget
        bw = max(1, min(C, GROWTH_BLOCK[1] // b))
        bh = max(1, min(R, GROWTH_BLOCK[0] // b, rows_per_tile * C // bw))
        blocked = not reduce_tiles and bw < C
    r0 = 0
    while r0 < R:
        if linear and blocked and top.threshold is not None:
            if blk is None:
                buf, blk = None, x0.new_empty(bh * b * bw * b)
            r1 = min(R, r0 + bh)
            top.offer_band(_band_blocks(shared, r0, r1, b, C, bw, blk), C, r1 * C, absolute=b == 1)
            r0 = r1
            continue
        r1 = min(R, r0 + rows_per_tile)
        g = gradient_rows(module, shared, r0, r1, out=buf)
        if reduce_tiles:
            torch.distributed.all_reduce(g)
        if b == 1:                             # |g| is taken inside the one-pass scan
            top.add(g, r0 * C, absolute=True)
        else:
            top.add(block_scores(g, b), r0 * C)
        r0 = r1
    return top.result().to(kept.device)


def _band_blocks(pairs, r0: int, r1: int, b: int, C: int, bw: int, out: torch.Tensor):
    """Block rows ``[r0, r1)`` of a linear layer's gradient as ``(scores [h, w], start)`` blocks of
    ``bw`` block columns, each formed into the buffer ``out`` and scored (|g| is left to the
    scan for b = 1) just before it is scanned, while it is still in cache."""
    for c0 in range(0, C, bw):
        c1 = min(C, c0 + bw)
        g = gradient_block(pairs, r0 * b, r1 * b, c0 * b, c1 * b, out)
        yield (g if b == 1 else block_scores(g, b).view(r1 - r0, c1 - c0)), r0 * C + c0
