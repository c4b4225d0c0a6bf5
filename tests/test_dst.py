"""DST engine: in-place rebuild, optimizer state, RigL/SET choices, schedule, checkpoints, errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.dst.rebuild import active_positions, update_topology
from sparsekern.models import mlp


def storage(topo):
    return [t.data_ptr() for t in (topo.values, *topo.topology())]


@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
@pytest.mark.parametrize("seed", range(4))
def test_update_topology_in_place_invariants(layout, b, seed):
    g = torch.Generator().manual_seed(seed)
    lin = SparseLinear(24, 16, density=0.4, layout=layout, block_size=b, generator=g)
    topo = lin.topology
    bb = topo.block_size
    R, C = 16 // bb, 24 // bb
    before = {int(p): topo.values.detach()[i].clone() for i, p in enumerate(active_positions(topo))}
    ptrs, nnz = storage(topo), topo.nnz
    nnzb = topo.values.shape[0]
    drop = torch.rand(nnzb, generator=g) < 0.4
    lin_pos = active_positions(topo)
    free = torch.ones(R * C, dtype=torch.bool)
    free[lin_pos[~drop]] = False
    cand = torch.nonzero(free).flatten()
    grow = cand[torch.randperm(cand.numel(), generator=g)[: int(drop.sum())]]
    src = update_topology(topo, drop, grow)
    topo.validate()                                   # sorted, unique, transpose rebuilt
    assert storage(topo) == ptrs and topo.nnz == nnz  # same tensors, same budget
    after = active_positions(topo)
    expected = set(lin_pos[~drop].tolist()) | set(grow.tolist())
    assert set(after.tolist()) == expected
    for i, p in enumerate(after.tolist()):
        if p in set(grow.tolist()):
            assert src[i] == -1 and bool((topo.values[i] == 0).all())      # grown start at 0
        else:
            assert torch.equal(topo.values.detach()[i], before[p])
    x = torch.randn(3, 24)
    torch.testing.assert_close(lin(x), F.linear(x, topo.to_dense(), lin.bias))


def test_update_topology_rejects_bad_requests():
    lin = SparseLinear(8, 8, density=0.5)
    topo = lin.topology
    nnzb = topo.values.shape[0]
    drop = torch.zeros(nnzb, dtype=torch.bool)
    drop[0] = True
    active = active_positions(topo)
    with pytest.raises(ValueError, match="still active"):
        update_topology(topo, drop, active[1:2])
    with pytest.raises(ValueError, match="nnz must stay fixed"):
        update_topology(topo, drop, torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="in \\[0, 64\\)"):
        update_topology(topo, drop, torch.tensor([64]))
    with pytest.raises(ValueError, match="drop must be bool"):
        update_topology(topo, drop.int(), active[:1])


def train_steps(model, opt, engine, steps, seed=0, shape=(16, 20), classes=5):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(*shape, generator=g)
        y = torch.randint(0, classes, (shape[0],), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if engine is not None:
            engine.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
], ids=["sgd-momentum", "adam", "adamw-amsgrad"])
def test_optimizer_state_follows_the_values(make_opt):
    torch.manual_seed(0)
    model = mlp((20, 48, 5))
    sk.sparsify(model, 0.3, "uniform")
    opt = make_opt(model.parameters())
    engine = sk.dst.SET(model, opt, total_steps=100, update_every=4, drop_fraction=0.3, seed=1)
    train_steps(model, opt, engine, 3)                     # steps 1-3: state builds up, no update
    topo = model[0].topology
    state = opt.state[topo.values]
    slots = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == topo.values.shape]
    assert slots                                          # momentum_buffer / exp_avg(_sq) / max_exp_avg_sq
    old = {k: state[k].clone() for k in slots}
    old_pos = active_positions(topo).tolist()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    # the engine drops the k smallest magnitudes (stable order): the kept ones keep their state
    k = round(engine.fraction_at(4) * topo.nnz)
    dropped = set(torch.sort(topo.values.detach().abs(), stable=True).indices[:k].tolist())
    kept = {p: i for i, p in enumerate(old_pos) if i not in dropped}
    mid = {kk: state[kk].clone() for kk in slots}         # after step 4's optimizer step
    pos_mid = {p: i for i, p in enumerate(old_pos)}
    assert engine.step()                                  # step 4 rewires
    for i, p in enumerate(active_positions(topo).tolist()):
        for name in slots:
            if p in kept:
                assert torch.equal(state[name][i], mid[name][pos_mid[p]]), (name, p)
            else:
                assert state[name][i] == 0, (name, p)      # grown (or regrown): fresh state
    assert old  # state existed before the update
    nnz = [m.nnz for m in model.modules() if isinstance(m, SparseLinear)]
    train_steps(model, opt, engine, 5)                     # training goes on, budget unchanged
    assert nnz == [m.nnz for m in model.modules() if isinstance(m, SparseLinear)]


def test_optimizer_state_exact_slots_with_regrowth():
    """Every kept entry's state travels with it, every grown (or regrown) one is zero."""
    torch.manual_seed(3)
    lin = SparseLinear(10, 6, density=0.5)
    model = nn.Sequential(lin)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, opt, None, 2, shape=(8, 10), classes=6)
    topo = lin.topology
    state = opt.state[topo.values]
    ex, ex2 = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    old_pos = active_positions(topo)
    drop = torch.zeros(topo.nnz, dtype=torch.bool)
    drop[[0, 5, 7]] = True
    free = torch.ones(60, dtype=torch.bool)
    free[old_pos[~drop]] = False
    grow = torch.cat([old_pos[[5]], torch.nonzero(free).flatten()[:2]])   # regrow one dropped
    grow = torch.unique(grow)[:3]
    src = update_topology(topo, drop, grow)
    sk.dst.permute_optimizer_state(opt, topo.values, src)
    for i, s in enumerate(src.tolist()):
        if s < 0:
            assert state["exp_avg"][i] == 0 and state["exp_avg_sq"][i] == 0
        else:
            assert state["exp_avg"][i] == ex[s] and state["exp_avg_sq"][i] == ex2[s]


def test_rigl_grows_where_the_dense_gradient_is_largest():
    torch.manual_seed(0)
    lin = SparseLinear(12, 8, density=0.25, bias=False)
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)      # lr 0: values do not move
    engine = sk.dst.RigL(model, opt, total_steps=10, update_every=1, drop_fraction=0.5,
                         schedule="constant", stop_at=1.0)
    x = torch.randn(5, 12)
    dy = torch.randn(5, 8)
    model(x).backward(dy)
    dense_grad = (dy.t() @ x).abs()
    topo = lin.topology
    mags = topo.values.detach().abs()
    k = int(round(0.5 * topo.nnz))
    old = active_positions(topo)
    dropped = old[torch.sort(mags, stable=True).indices[:k]]
    keep = set(old.tolist()) - set(dropped.tolist())
    free = [p for p in range(96) if p not in keep]
    want = sorted(free, key=lambda p: -float(dense_grad.flatten()[p]))[:k]
    opt.step()
    assert engine.step()
    got = set(active_positions(topo).tolist())
    assert got == keep | set(want)


def test_rigl_conv_dense_gradient_matches_autograd():
    torch.manual_seed(0)
    conv = SparseConv2d(4, 6, 3, stride=2, padding="valid", dilation=1, groups=2, density=0.5)
    model = nn.Sequential(conv)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sk.dst.RigL(model, opt, total_steps=10, update_every=1, drop_fraction=0.3)
    x = torch.randn(3, 4, 9, 8)
    y = model(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    dense = conv.to_dense()
    wd = dense.weight.detach().clone().requires_grad_()
    F.conv2d(x, wd, None, conv.stride, conv.padding, conv.dilation, conv.groups).backward(dy)
    got = engine.dense_gradient("0", conv)
    torch.testing.assert_close(got, wd.grad.reshape(conv.weight_shape_2d))
    opt.step()
    assert engine.step()
    conv.topology.validate()


def test_schedule_counts_and_stop_at():
    torch.manual_seed(0)
    model = mlp((20, 64, 5))
    sk.sparsify(model, 0.25, "uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = sk.dst.SET(model, opt, total_steps=40, update_every=10, drop_fraction=0.4, stop_at=0.5)
    train_steps(model, opt, engine, 40)
    steps = [h["step"] for h in engine.history]
    assert steps == [10, 20]                           # none after stop_at * total = 20
    nnz = model[0].topology.values.shape[0]
    f10 = engine.fraction_at(10)
    assert f10 == pytest.approx(0.4 / 2 * (1 + torch.cos(torch.tensor(torch.pi * 10 / 20)).item()))
    assert engine.history[0]["layers"]["0"]["pruned"] == round(f10 * nnz)
    assert engine.fraction_at(21) == 0.0
    d = engine.diagnostics()
    assert 0 < d["itop_rate"] <= 1 and d["layers"]["0"]["density"] == pytest.approx(0.25, abs=1e-3)
    assert d["layers"]["0"]["grad_norm"] is not None


def test_set_is_deterministic_for_a_seed_and_static_never_moves():
    def run(method, seed):
        torch.manual_seed(0)
        model = mlp((20, 32, 5))
        sk.sparsify(model, 0.3, "uniform", generator=torch.Generator().manual_seed(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        engine = method(model, opt, total_steps=30, update_every=5, seed=seed)
        train_steps(model, opt, engine, 30)
        return [m.topology.mask() for m in model.modules() if isinstance(m, SparseLinear)]
    a, b, c = run(sk.dst.SET, 7), run(sk.dst.SET, 7), run(sk.dst.SET, 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    s0, s1 = run(sk.dst.Static, 0), run(sk.dst.Static, 1)
    assert all(torch.equal(x, y) for x, y in zip(s0, s1))


def test_engine_state_dict_round_trip_and_refusals():
    torch.manual_seed(0)
    model = mlp((20, 32, 5))
    sk.sparsify(model, 0.3, "uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = sk.dst.SET(model, opt, total_steps=50, update_every=5)
    train_steps(model, opt, engine, 12)
    state = engine.state_dict()
    other = sk.dst.SET(model, opt, total_steps=50, update_every=5, seed=99)
    other.load_state_dict(state)
    assert other.step_count == 12 and other.itop_rate() == engine.itop_rate()
    assert torch.equal(other.generator.get_state(), engine.generator.get_state())
    with pytest.raises(ValueError, match="for SET, not RigL"):
        sk.dst.RigL(model, opt, total_steps=50).load_state_dict(state)
    bad = dict(state, ever_active={"0": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="layers"):
        other.load_state_dict(bad)
    wrong_nnz = {**state, "layers": {**state["layers"], "0": {**state["layers"]["0"], "nnz": 1}}}
    with pytest.raises(ValueError, match=r"does not match the model's sparse layers \['0'\]"):
        other.load_state_dict(wrong_nnz)
    assert other.step_count == 12                      # unchanged by the refusal


def test_bad_configuration_is_named():
    model = mlp((8, 16, 4))
    sk.sparsify(model, 0.5, "uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="drop_fraction"):
        sk.dst.RigL(model, opt, 10, drop_fraction=1.0)
    with pytest.raises(ValueError, match="drop_fraction"):
        sk.dst.SET(model, opt, 10, drop_fraction=0.0)
    with pytest.raises(ValueError, match="update_every"):
        sk.dst.SET(model, opt, 10, update_every=0)
    with pytest.raises(ValueError, match="schedule"):
        sk.dst.SET(model, opt, 10, schedule="linear")
    with pytest.raises(ValueError, match="no SparseLinear"):
        sk.dst.SET(mlp(), opt, 10)
    with pytest.raises(ValueError, match="does not hold"):
        sk.dst.SET(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 10)


# ------------------------------------------------- masked-dense reference
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv2(self.conv1(x).relu()).relu()
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("method", ["set", "rigl"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_sparse_engine_and_masked_dense_reference_choose_identical_topologies(method, arch):
    import copy

    from sparsekern.dst.reference import MaskedDenseDST
    torch.manual_seed(0)
    dense = (mlp((12, 40, 40, 5)) if arch == "mlp" else SmallCNN()).double()
    shape = (16, 12) if arch == "mlp" else (6, 3, 8, 8)
    ref_model = copy.deepcopy(dense)
    sparse_model = copy.deepcopy(dense)
    sk.sparsify(sparse_model, 0.3, "erk", init="dense", generator=torch.Generator().manual_seed(1))
    layers = {n: m for n, m in sparse_model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
    masks = {n: m.topology.mask() for n, m in layers.items()}
    kw = dict(total_steps=40, update_every=4, drop_fraction=0.3, stop_at=0.75, seed=5)
    opt_s = torch.optim.SGD(sparse_model.parameters(), lr=0.05, momentum=0.9)
    opt_r = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    engine = (sk.dst.SET if method == "set" else sk.dst.RigL)(sparse_model, opt_s, **kw)
    ref = MaskedDenseDST(ref_model, opt_r, masks, method=method, **kw)
    g = torch.Generator().manual_seed(2)
    updates = 0
    for _ in range(40):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (shape[0],), generator=g)
        for model, opt in ((sparse_model, opt_s), (ref_model, opt_r)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        up_s, up_r = engine.step(), ref.step()
        assert up_s == up_r
        if up_s:
            updates += 1
            for n, m in layers.items():
                assert torch.equal(m.topology.mask(), ref.masks[n]), f"{n}: topologies differ at update {updates}"
    assert updates >= 5
    assert any(not torch.equal(m.topology.mask(), masks[n]) for n, m in layers.items())   # it did rewire
    mods = dict(ref_model.named_modules())
    for n, m in layers.items():
        torch.testing.assert_close(m.weight.to_dense(), mods[n].weight.detach().reshape(m.weight.shape))


@pytest.mark.parametrize("n,k", [(100, 7), (300_000, 1000), (300_000, 50_000), (200_000, 0)])
def test_top_k_stable_equals_a_full_stable_sort(n, k):
    from sparsekern.dst.engine import top_k_stable
    g = torch.Generator().manual_seed(n + k)
    scores = torch.randint(0, 50, (n,), generator=g).float()        # many exact ties
    scores[torch.randperm(n, generator=g)[: n // 3]] = -float("inf")
    want = torch.sort(scores, descending=True, stable=True).indices[:k]
    assert torch.equal(top_k_stable(scores, k), torch.sort(want).values)


def test_sample_free_draws_distinct_free_positions_reproducibly():
    from sparsekern.dst.selection import sample_free
    free = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) < 0.7
    kept = torch.nonzero(~free).flatten()
    a = sample_free(10_000, kept, 3000, torch.Generator().manual_seed(4))
    b = sample_free(10_000, kept, 3000, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.numel() == 3000 == torch.unique(a).numel()
    assert bool(free[a].all())
    with pytest.raises(ValueError, match="free positions"):
        sample_free(10_000, kept, int(free.sum()) + 1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", [sk.dst.RigL, sk.dst.SET])
def test_engine_on_bsr_linear_and_conv_layers(method):
    torch.manual_seed(0)
    model = nn.Sequential(SparseConv2d(8, 16, 3, padding=1, density=0.4, layout="bsr", block_size=8),
                          nn.ReLU(), nn.Flatten(), SparseLinear(16 * 6 * 6, 16, density=0.3, layout="bsr",
                                                                block_size=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine = method(model, opt, total_steps=40, update_every=3, drop_fraction=0.4, stop_at=1.0)
    nnz = [m.nnz for _, m in engine.layers]
    g = torch.Generator().manual_seed(1)
    before = [m.topology.mask().clone() for _, m in engine.layers]
    for _ in range(12):
        x = torch.randn(4, 8, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 16, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        engine.step()
    assert len(engine.history) == 4
    for (_, m), n0, m0 in zip(engine.layers, nnz, before):
        m.topology.validate()
        assert m.nnz == n0 and m.topology.values.shape[1:] == (m.topology.block_size,) * 2
        state = opt.state[m.topology.values]
        assert state["exp_avg"].shape == m.topology.values.shape
    assert any(not torch.equal(m.topology.mask(), m0) for (_, m), m0 in zip(engine.layers, before))
