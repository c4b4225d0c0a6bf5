"""DST under non-finite numbers: NaN/Inf scores never win, nnz stays exact, all-NaN layers are skipped."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.dst import engine as dst_engine
from sparsekern.dst.engine import pick_drop, rigl_grow, top_k_stable
from sparsekern.dst.rebuild import active_positions
from sparsekern.models import mlp

NAN, INF = float("nan"), float("inf")


def stable_order_non_finite_last(scores):
    """The rule, spelled out: a full stable descending sort with every NaN/Inf ranked below every finite."""
    key = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, -INF))
    return torch.sort(key, descending=True, stable=True).indices


# ------------------------------------------------------------ selection rules
@pytest.mark.parametrize("n,k", [(50, 5), (50, 30), (50, 50), (200_000, 3_000), (200_000, 150_000)])
def test_top_k_stable_ranks_nan_and_inf_below_every_finite_score(n, k):
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, 20, (n,), generator=g).float()            # many exact ties
    bad = torch.randperm(n, generator=g)[: n // 4]
    scores[bad[0::3]], scores[bad[1::3]], scores[bad[2::3]] = NAN, INF, -INF
    got = top_k_stable(scores, k)
    assert got.numel() == k                                              # exactly k, NaN or not
    assert torch.equal(got, torch.sort(stable_order_non_finite_last(scores)[:k]).values)
    finite = int(torch.isfinite(scores).sum())
    assert int(torch.isfinite(scores[got]).sum()) == min(k, finite)     # finite ones first


def test_top_k_stable_never_takes_an_ineligible_position():
    scores = torch.tensor([NAN, 5.0, INF, 1.0, -INF, 9.0, 2.0, NAN])
    eligible = torch.tensor([True, False, True, True, True, False, True, True])
    assert top_k_stable(scores, 2, eligible).tolist() == [3, 6]          # the finite eligible ones
    assert top_k_stable(scores, 4, eligible).tolist() == [0, 2, 3, 6]    # then non-finite, by position
    assert top_k_stable(scores, 6, eligible).tolist() == [0, 2, 3, 4, 6, 7]
    assert top_k_stable(scores, 9, eligible).tolist() == [0, 2, 3, 4, 6, 7]   # all there is


def test_pick_drop_drops_non_finite_weights_before_any_finite_one():
    mag = torch.tensor([0.5, NAN, 0.1, INF, 0.3, 0.1, NAN, 2.0])
    assert pick_drop(mag, 2).tolist() == [1, 3]                          # NaN/Inf first, storage order
    assert pick_drop(mag, 3).tolist() == [1, 3, 6]
    assert pick_drop(mag, 5).tolist() == [1, 2, 3, 5, 6]                 # then the smallest (tie: earlier)
    assert pick_drop(torch.tensor([0.2, 0.1, 0.1]), 1).tolist() == [1]   # unchanged without NaN
    with pytest.raises(dst_engine.NonFiniteScores, match="magnitude"):
        pick_drop(torch.tensor([NAN, INF, -INF]), 1)


def test_rigl_grow_ranks_non_finite_gradient_last_and_never_regrows_a_kept_position():
    grad = torch.tensor([NAN, 3.0, 0.5, INF, 2.0, 7.0, 1.0, NAN])
    kept = torch.tensor([1, 5])
    assert rigl_grow(grad.clone(), kept, 2).tolist() == [4, 6]
    assert rigl_grow(grad.clone(), kept, 5).tolist() == [0, 2, 3, 4, 6]  # 3 finite, then NaN/Inf by position
    with pytest.raises(dst_engine.NonFiniteScores, match="gradient"):
        rigl_grow(torch.full((8,), NAN), kept, 2)


# ------------------------------------------------------ the engine in training
class ConvNet(nn.Module):
    def __init__(self, layout, b):
        super().__init__()
        kw = dict(layout=layout, block_size=b)
        self.conv = SparseConv2d(4, 8, 3, padding=1, density=0.4, **kw)
        self.fc1 = SparseLinear(8, 16, density=0.5, **kw)
        self.fc2 = SparseLinear(16, 8, density=0.5, **kw)

    def forward(self, x):
        return self.fc2(self.fc1(self.conv(x).relu().mean((2, 3))).relu())


def non_finite_blocks(topo):
    v = topo.values.detach()
    return int((~torch.isfinite(v.reshape(v.shape[0], -1).sum(1))).sum())


def batch_loss(out, y, mode):
    if mode == "mean":                          # the NaN sample makes the loss (and every layer) NaN
        return F.cross_entropy(out, y)
    keep = torch.isfinite(out).all(1)           # drop bad samples: the weight gradients still get
    return F.cross_entropy(out[keep], y[keep])  # 0 * NaN = NaN wherever the NaN sample's activations are


@pytest.mark.parametrize("loss", ["mean", "finite-only"])
@pytest.mark.parametrize("method", [sk.dst.RigL, sk.dst.SET])
@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
def test_training_through_a_nan_sample_keeps_every_budget_exact(method, layout, b, loss):
    torch.manual_seed(0)
    model = ConvNet(layout, b)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = method(model, opt, total_steps=40, update_every=2, drop_fraction=0.3, schedule="constant",
                    stop_at=1.0, seed=3)
    nnz = {n: m.nnz for n, m in engine.layers}
    g = torch.Generator().manual_seed(1)
    updates, partial, skipped = 0, 0, 0
    for step in range(1, 13):
        x = torch.randn(6, 4, 6, 6, generator=g)
        y = torch.randint(0, 8, (6,), generator=g)
        if step == 4:                                               # an update step: RigL scores it
            x[2, 1, 3, 4] = NAN                                     # one NaN in one sample
        opt.zero_grad()
        batch_loss(model(x), y, loss).backward()
        opt.step()
        bad_before = {n: non_finite_blocks(m.topology) for n, m in engine.layers}
        if engine.step():
            updates += 1
            rec = engine.history[-1]["layers"]
            for n, m in engine.layers:
                m.topology.validate()
                assert m.nnz == nnz[n], (n, engine.step_count)
                skipped += "skipped" in rec[n]
                if "skipped" not in rec[n]:
                    partial += bad_before[n] > 0
                    k = rec[n]["pruned"]
                    assert rec[n]["grown"] == k > 0
                    # NaN/Inf weights go first: exactly max(0, bad - k) are left (grown ones start at 0)
                    assert non_finite_blocks(m.topology) == max(0, bad_before[n] - k), (n, engine.step_count)
    assert updates == 6 and skipped > 0                 # all-NaN layers were met ...
    assert partial > 0 or loss == "mean"               # ... and layers with some NaN weights
    model(torch.randn(2, 4, 6, 6)).sum().backward()                 # the layers still run
    assert engine.diagnostics()["step"] == 12


class TwoBranches(nn.Module):
    """Two sparse layers on separate inputs: one branch can be all-NaN, the other clean."""

    def __init__(self, layout="csr", b=None):
        super().__init__()
        self.clean = SparseLinear(16, 8, density=0.4, bias=False, layout=layout, block_size=b)
        self.poisoned = SparseLinear(16, 8, density=0.4, bias=False, layout=layout, block_size=b)

    def forward(self, x):
        return self.clean(x[0]).sum() + self.poisoned(x[1]).sum()


@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
def test_a_layer_whose_gradient_is_all_nan_is_skipped_and_recorded(layout, b):
    torch.manual_seed(0)
    model = TwoBranches(layout, b)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sk.dst.RigL(model, opt, total_steps=10, update_every=1, drop_fraction=0.5,
                         schedule="constant", stop_at=1.0)
    before = {n: m.topology.mask().clone() for n, m in engine.layers}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 16, generator=g)
    x[1] = NAN                                                      # every input of one layer is NaN
    model(x).backward()
    assert not bool(torch.isfinite(model.poisoned.topology.values.grad).any())
    # no optimizer step: even lr=0 would write w - 0 * NaN = NaN and skip the layer for its weights
    assert engine.step()
    rec = engine.history[-1]["layers"]
    assert "skipped" in rec["poisoned"] and "gradient" in rec["poisoned"]["skipped"]
    assert rec["poisoned"]["pruned"] == rec["poisoned"]["grown"] == 0
    assert torch.equal(model.poisoned.topology.mask(), before["poisoned"])   # untouched
    assert "skipped" not in rec["clean"] and rec["clean"]["pruned"] > 0
    assert not torch.equal(model.clean.topology.mask(), before["clean"])     # the other layer rewired
    diag = engine.diagnostics()["layers"]
    assert diag["poisoned"]["skipped"] == rec["poisoned"]["skipped"]
    assert diag["poisoned"]["skipped_updates"] == 1 and diag["clean"]["skipped_updates"] == 0


@pytest.mark.parametrize("method", [sk.dst.RigL, sk.dst.SET])
def test_a_layer_whose_weights_are_all_nan_is_skipped(method):
    torch.manual_seed(0)
    model = TwoBranches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = method(model, opt, total_steps=10, update_every=1, drop_fraction=0.5, schedule="constant",
                    stop_at=1.0)
    with torch.no_grad():
        model.poisoned.topology.values.fill_(NAN)
    before = model.poisoned.topology.mask().clone()
    model(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4))).backward()
    opt.step()
    assert engine.step()
    assert "skipped" not in engine.history[-1]["layers"]["clean"]
    rec = engine.history[-1]["layers"]["poisoned"]
    assert "magnitude" in rec["skipped"] and rec["pruned"] == 0
    assert torch.equal(model.poisoned.topology.mask(), before)
    assert engine.diagnostics()["layers"]["poisoned"]["skipped"] == rec["skipped"]


# ---------------------------------------- the masked-dense reference shares the rule
@pytest.mark.parametrize("method", ["set", "rigl"])
def test_engine_and_reference_drop_nan_weights_alike(method):
    from sparsekern.dst.reference import MaskedDenseDST
    torch.manual_seed(0)
    dense = mlp((12, 24, 5)).double()
    ref_model, sparse_model = copy.deepcopy(dense), copy.deepcopy(dense)
    sk.sparsify(sparse_model, 0.4, "uniform", init="dense", generator=torch.Generator().manual_seed(1))
    layers = {n: m for n, m in sparse_model.named_modules() if isinstance(m, SparseLinear)}
    masks = {n: m.topology.mask() for n, m in layers.items()}
    kw = dict(total_steps=20, update_every=2, drop_fraction=0.3, schedule="constant", stop_at=1.0, seed=5)
    opt_s = torch.optim.SGD(sparse_model.parameters(), lr=0.05)
    opt_r = torch.optim.SGD(ref_model.parameters(), lr=0.05)
    engine = (sk.dst.SET if method == "set" else sk.dst.RigL)(sparse_model, opt_s, **kw)
    ref = MaskedDenseDST(ref_model, opt_r, masks, method=method, **kw)
    mods = dict(ref_model.named_modules())
    g = torch.Generator().manual_seed(2)
    for step in range(1, 7):
        x = torch.randn(8, 12, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (8,), generator=g)
        for model, opt in ((sparse_model, opt_s), (ref_model, opt_r)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if step % 2 == 0:                      # NaN/Inf weights right before the update, in both
            with torch.no_grad():
                for n, m in layers.items():
                    pos = active_positions(m.topology)
                    pick = torch.tensor([1, 4, 6]) + step
                    m.topology.values[pick] = torch.tensor([NAN, INF, -INF], dtype=torch.float64)
                    mods[n].weight.view(-1)[pos[pick]] = torch.tensor([NAN, INF, -INF], dtype=torch.float64)
        assert engine.step() == ref.step()
        for n, m in layers.items():
            assert m.nnz == int(ref.masks[n].sum()) == int(masks[n].sum())
            assert torch.equal(m.topology.mask(), ref.masks[n]), (n, step)
            assert bool(torch.isfinite(m.topology.values).all())     # every NaN/Inf was dropped first
