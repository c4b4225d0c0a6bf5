"""DST selection (sparsekern/dst/selection.py): the tiled RigL growth picks exactly what one pass over
the whole dense gradient picks (ties and NaN/Inf included), SET's sampler draws what the dense-mask
sampler drew, selection stays on the weights' device, and the topology owns its in-place writes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.dst import growth
from sparsekern.dst.rebuild import active_positions, update_topology
from sparsekern.dst.selection import RunningTopK, rigl_grow, sample_free, top_k_stable

NAN, INF = float("nan"), float("inf")


def full_rule(scores, kept, k):
    """The rule spelled out: stable descending sort, NaN/Inf last, kept positions excluded."""
    key = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -INF))
    free = torch.ones(scores.numel(), dtype=torch.bool)
    free[kept] = False
    order = torch.sort(key, descending=True, stable=True).indices
    return torch.sort(order[free[order]][:k]).values


@pytest.mark.parametrize("tile", [1, 7, 64, 1000, 5000, 100_000])
@pytest.mark.parametrize("k", [0, 1, 50, 900, 3000])
def test_running_top_k_over_tiles_equals_one_pass(tile, k):
    g = torch.Generator().manual_seed(tile * 7 + k)
    n = 5000
    scores = torch.randint(0, 12, (n,), generator=g).float()          # many exact ties
    bad = torch.randperm(n, generator=g)[:300]
    scores[bad[0::3]], scores[bad[1::3]], scores[bad[2::3]] = NAN, INF, -INF
    kept = torch.sort(torch.randperm(n, generator=g)[:1500]).values
    top = RunningTopK(k, kept)
    for start in range(0, n, tile):
        top.add(scores[start:start + tile].clone(), start)
    got = top.result()
    assert torch.equal(got, full_rule(scores, kept, k))
    assert torch.equal(got, rigl_grow(scores, kept, k))               # the one-tile form agrees


def test_running_top_k_refuses_tiles_out_of_order_and_all_nan():
    top = RunningTopK(2, torch.empty(0, dtype=torch.int64))
    top.add(torch.ones(4), 4)
    with pytest.raises(ValueError, match="ascending order"):
        top.add(torch.ones(4), 0)
    top = RunningTopK(2, torch.empty(0, dtype=torch.int64))
    top.add(torch.full((4,), NAN), 0)
    top.add(torch.full((4,), INF), 4)
    with pytest.raises(sk.dst.engine.NonFiniteScores, match="gradient"):
        top.result()


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("k", [1, 3000, 150_000])
def test_running_top_k_in_bands_of_blocks_with_pruned_merges_equals_one_pass(monkeypatch, continuous, k):
    """Large enough that merges prune by a sampled threshold (more than 2^17 held entries), blocks
    offered out of position order inside each band, many exact ties (integer scores) or none."""
    from sparsekern.dst import selection
    R, C, band, bw = 600, 1000, 40, 300
    g = torch.Generator().manual_seed(k + continuous)
    scores = (torch.rand(R, C, generator=g, dtype=torch.float64) if continuous
              else torch.randint(0, 2000, (R, C), generator=g).double())
    kept = torch.sort(torch.randperm(R * C, generator=g)[: R * C // 5]).values
    pruned = []
    real = selection._prune

    def spy(val, pos, kk):
        out = real(val, pos, kk)
        pruned.append(out[0].numel() > kk)        # the sampled threshold held (no exact selection)
        return out

    monkeypatch.setattr(selection, "_prune", spy)
    top = RunningTopK(k, kept)
    for r0 in range(0, R, band):
        r1 = min(R, r0 + band)
        if top.threshold is None:             # as grow_top_k: whole bands until the best k fill
            top.add(scores[r0:r1].flatten().clone(), r0 * C)
            continue
        blocks = [(scores[r0:r1, c0:c0 + bw].contiguous(), r0 * C + c0) for c0 in range(0, C, bw)][::-1]
        top.offer_band(iter(blocks), C, r1 * C)
    got = top.result()
    assert torch.equal(got, full_rule(scores.flatten(), kept, k))
    if k == 150_000:
        assert any(pruned)


def test_offer_band_refuses_blocks_outside_the_band_and_needs_a_threshold():
    top = RunningTopK(2, torch.empty(0, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="needs a threshold"):
        top.offer_band(iter([]), 10, 10)
    top.add(torch.arange(10.0), 0)
    with pytest.raises(ValueError, match=r"outside the band \[10, 30\)"):
        top.offer_band(iter([(torch.ones(2, 5), 5)]), 10, 30)


def old_dense_mask_sampler(free, k, generator):
    """The SET sampler before the sorted-set version (a bool [n] of free positions): the oracle."""
    n = free.numel()
    avail = free.clone()
    out, need = [], k
    while need > 0:
        draw = torch.randint(n, (max(2 * need, 64),), generator=generator)
        draw = draw[avail[draw]]
        uniq, inv = torch.unique(draw, return_inverse=True)
        first = torch.full((uniq.numel(),), draw.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inv, torch.arange(draw.numel()), "amin")
        take = draw[torch.sort(first).values][:need]
        avail[take] = False
        out.append(take)
        need -= take.numel()
    return torch.cat(out)


@pytest.mark.parametrize("n,kept_n,k", [(1000, 0, 10), (10_000, 7000, 2500), (50_000, 500, 20_000)])
def test_sample_free_draws_what_the_dense_mask_sampler_drew(n, kept_n, k):
    g = torch.Generator().manual_seed(n + k)
    kept = torch.sort(torch.randperm(n, generator=g)[:kept_n]).values
    free = torch.ones(n, dtype=torch.bool)
    free[kept] = False
    want = old_dense_mask_sampler(free, k, torch.Generator().manual_seed(3))
    assert torch.equal(sample_free(n, kept, k, torch.Generator().manual_seed(3)), want)


def integer_model(kind, layout, b):
    """A one-layer model whose growth gradient is an exact integer (no rounding, so any summation
    order gives the same scores) with many exact ties."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = SparseLinear(48, 32, bias=False, density=0.3, layout=layout, block_size=b, dtype=torch.float64)
    else:
        layer = SparseConv2d(8, 16, 3, padding=1, groups=2 if layout == "csr" else 1, bias=False, density=0.3,
                             layout=layout, block_size=b, dtype=torch.float64)
    with torch.no_grad():
        layer.topology.values.copy_(torch.randint(-3, 4, layer.topology.values.shape).double())
    return nn.Sequential(layer)


def integer_batch(kind, g):
    shape = (6, 48) if kind == "linear" else (3, 8, 5, 5)
    return torch.randint(-2, 3, shape, generator=g).double()


def grown(model, x, w, **engine_kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = sk.dst.RigL(model, opt, total_steps=4, update_every=1, drop_fraction=0.5, schedule="constant",
                         stop_at=1.0, **engine_kw)
    (model(x) * w).sum().backward()
    assert engine.step()
    return active_positions(model[0].topology), engine


@pytest.mark.parametrize("block", [None, (8, 16)])
@pytest.mark.parametrize("kind,layout,b", [("linear", "csr", None), ("linear", "bsr", 4),
                                           ("conv", "csr", None), ("conv", "bsr", 8)])
def test_tiled_growth_equals_one_tile_and_the_dense_gradient(monkeypatch, kind, layout, b, block):
    """``block``: linear layers form and scan their gradient in blocks of 8 x 16 (rows x columns)
    once a threshold exists (growth.GROWTH_BLOCK, 1024 x 1024 by default)."""
    if block:
        monkeypatch.setattr(growth, "GROWTH_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    base = integer_model(kind, layout, b)
    x = integer_batch(kind, g)
    w = torch.randint(-2, 3, base(x).shape, generator=g).double()
    one_row = growth.row_bytes(base[0])
    results = {}
    for budget in (one_row, 3 * one_row + 5, None):                 # 1 row, 3 rows, one tile
        model = copy.deepcopy(base)
        results[budget], engine = grown(model, x, w, growth_memory=budget)
        expect_rows = {one_row: 1, 3 * one_row + 5: 3}.get(budget)
        if expect_rows:
            topo = model[0].topology
            assert engine.tile_rows["0"] == min(expect_rows, topo.shape[0] // topo.block_size)
    assert torch.equal(results[one_row], results[None]) and torch.equal(results[3 * one_row + 5], results[None])
    # and the same as the whole dense gradient scored at once with the reference rule
    model = copy.deepcopy(base)
    layer = model[0]
    wd = layer.to_dense().weight.detach().clone().requires_grad_()
    if kind == "linear":
        (F.linear(x, wd) * w).sum().backward()
    else:
        (F.conv2d(x, wd, None, layer.stride, layer.padding, layer.dilation, layer.groups) * w).sum().backward()
    topo = layer.topology
    bb = topo.block_size
    dense = wd.grad.reshape(topo.shape)
    R, C = topo.shape[0] // bb, topo.shape[1] // bb
    scores = dense.abs() if bb == 1 else dense.reshape(R, bb, C, bb).pow(2).sum((1, 3)).sqrt()
    nnzb = topo.values.shape[0]
    k = round(0.5 * nnzb)
    mags = topo.values.detach().reshape(nnzb, -1).norm(dim=1)
    old = active_positions(topo)
    kept = old[torch.sort(torch.sort(mags, stable=True).indices[k:]).values]
    want = torch.sort(torch.cat([kept, full_rule(scores.flatten(), kept, k)])).values
    assert torch.equal(results[None], want)


def test_growth_memory_is_checked_at_construction_with_the_numbers():
    model = integer_model("linear", "csr", None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    need = growth.row_bytes(model[0])
    with pytest.raises(ValueError, match=rf"growth_memory=10 bytes is too small .*'0'.*needs {need} bytes"):
        sk.dst.RigL(model, opt, 10, growth_memory=10)
    with pytest.raises(ValueError, match="growth_memory for layer '0' must be a positive int"):
        sk.dst.RigL(model, opt, 10, growth_memory=-5)
    with pytest.raises(ValueError, match=r"names layers \['fc'\]"):
        sk.dst.RigL(model, opt, 10, growth_memory={"fc": 1 << 20})
    with pytest.raises(ValueError, match="ddp_scores"):
        sk.dst.RigL(model, opt, 10, ddp_scores="allreduce")
    sk.dst.SET(model, opt, 10, growth_memory=10)                      # SET never scores a gradient


@pytest.mark.parametrize("method", [sk.dst.RigL, sk.dst.SET])
def test_an_update_makes_no_host_copy(monkeypatch, method):
    """Selection runs where the weights live: no tensor goes through .cpu() during an update (on the
    CPU that is a no-op, so this checks the code path; a GPU run checks the device)."""
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(16, 12, density=0.4), nn.ReLU(), SparseLinear(12, 4, density=0.5,
                                                                                      layout="bsr", block_size=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = method(model, opt, total_steps=4, update_every=1, drop_fraction=0.4, schedule="constant", stop_at=1.0)
    model(torch.randn(5, 16)).sum().backward()
    calls = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert engine.step()
    assert calls == []


def test_top_k_stable_keeps_the_scores_device():
    scores = torch.tensor([3.0, 1.0, 3.0, 2.0])
    for k, want in ((0, []), (2, [0, 2]), (4, [0, 1, 2, 3])):
        got = top_k_stable(scores, k)
        assert got.tolist() == want and got.device == scores.device and got.dtype == torch.int64


# ------------------------------------------------ the topology owns its in-place writes
def test_assign_keeps_storage_rebuilds_the_transpose_and_keeps_nnz():
    lin = SparseLinear(10, 6, density=0.5, generator=torch.Generator().manual_seed(0))
    other = SparseLinear(10, 6, density=0.5, generator=torch.Generator().manual_seed(1))
    topo = lin.topology
    ptrs = [t.data_ptr() for t in (topo.values, *topo.topology())]
    topo.assign_(other.topology.row_offsets, other.topology.col_indices, other.topology.values.detach())
    topo.validate()                                        # transpose rebuilt to match
    assert [t.data_ptr() for t in (topo.values, *topo.topology())] == ptrs
    assert torch.equal(topo.to_dense(), other.topology.to_dense())
    short = SparseLinear(10, 6, density=0.2).topology
    with pytest.raises(ValueError, match="assign_ keeps nnz"):
        topo.assign_(short.row_offsets, short.col_indices, short.values.detach())


def test_the_rebuild_and_superposition_write_through_assign(monkeypatch):
    from sparsekern.formats import SparseTopology
    from sparsekern.methods.superpose import superpose
    calls = []
    real = SparseTopology.assign_
    monkeypatch.setattr(SparseTopology, "assign_", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    lin = SparseLinear(8, 8, density=0.5, generator=torch.Generator().manual_seed(0))
    drop = torch.zeros(lin.topology.values.shape[0], dtype=torch.bool)
    drop[0] = True
    free = torch.ones(64, dtype=torch.bool)
    free[active_positions(lin.topology)] = False
    update_topology(lin.topology, drop, torch.nonzero(free).flatten()[:1])
    assert calls == [{"trusted": True}]
    a, b = nn.Sequential(copy.deepcopy(lin)), nn.Sequential(SparseLinear(8, 8, density=0.5))
    superpose(a, b, 0.5, 0.5)
    assert len(calls) == 2
    a[0].topology.validate()
