"""A refused load changes nothing; an accepted load leaves a usable layer (layers and the DST engine)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.models import mlp

LAYOUTS = [("csr", None), ("bsr", 4)]


def make(kind, layout, b, density, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        return SparseLinear(16, 8, density=density, layout=layout, block_size=b, generator=g)
    return SparseConv2d(4, 8, 3, padding=1, density=density, layout=layout, block_size=b, generator=g)


def example_input(kind):
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 16, generator=g) if kind == "linear" else torch.randn(2, 4, 5, 5, generator=g)


def snapshot(module):
    """Every parameter and buffer (the topology's included): a clone and its storage address."""
    return {n: (t.detach().clone(), t.data_ptr())
            for n, t in [*module.named_parameters(), *module.named_buffers()]}


def assert_unchanged(module, snap):
    now = dict([*module.named_parameters(), *module.named_buffers()])
    assert set(now) == set(snap)
    for n, (t, ptr) in snap.items():
        assert now[n].data_ptr() == ptr, f"{n} was replaced"
        assert now[n].dtype == t.dtype and torch.equal(now[n].detach(), t), f"{n} changed"


def _set(t, i, v):
    t = t.clone()
    t.view(-1)[i] = v
    return t


def corruptions(kind):
    """(name, state_dict -> corrupted copy, exception type, message fragment naming the field)."""
    cols = 16 if kind == "linear" else 36
    return [
        ("bad offsets", lambda sd: {**sd, "topology.row_offsets": _set(sd["topology.row_offsets"], 1, 10_000)},
         ValueError, "row_offsets"),
        ("short offsets", lambda sd: {**sd, "topology.row_offsets": sd["topology.row_offsets"][:-1]},
         ValueError, "row_offsets"),
        ("column out of range", lambda sd: {**sd, "topology.col_indices": _set(sd["topology.col_indices"], 0, cols)},
         ValueError, "col_indices"),
        ("values shape", lambda sd: {**sd, "topology.values": sd["topology.values"][:-1]}, ValueError, "values"),
        ("index dtype", lambda sd: {**sd, "topology.col_indices": sd["topology.col_indices"].long()},
         ValueError, "col_indices.*int32"),
        ("values dtype", lambda sd: {**sd, "topology.values": sd["topology.values"].to(torch.int32)},
         ValueError, "values.*floating"),
        ("transpose", lambda sd: {**sd, "topology.t_perm": sd["topology.t_perm"].flip(0)}, ValueError, "t_perm"),
        ("meta", lambda sd: {**sd, "topology.meta": torch.tensor([8, 8, 1])}, ValueError, "meta"),
        ("missing index", lambda sd: {k: v for k, v in sd.items() if k != "topology.col_indices"},
         RuntimeError, "Missing key.*topology.col_indices"),
        ("missing bias", lambda sd: {k: v for k, v in sd.items() if k != "bias"}, RuntimeError, "Missing key.*bias"),
        ("unexpected key", lambda sd: {**sd, "extra": torch.zeros(1)}, RuntimeError, "Unexpected key.*extra"),
        ("bias shape", lambda sd: {**sd, "bias": sd["bias"][:-1]}, ValueError, "bias.*shape"),
        ("bias dtype", lambda sd: {**sd, "bias": sd["bias"].to(torch.int64)}, ValueError, "bias.*floating"),
    ]


CASES = [(kind, name, mutate, exc, frag) for kind in ("linear", "conv")
         for name, mutate, exc, frag in corruptions(kind)]


@pytest.mark.parametrize("layout,b", LAYOUTS)
@pytest.mark.parametrize("kind,name,mutate,exc,frag", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_refused_load_changes_nothing(kind, name, mutate, exc, frag, layout, b):
    source = make(kind, layout, b, 0.6, seed=1)            # other nnz, other values, other bias
    target = make(kind, layout, b, 0.3, seed=2)
    snap = snapshot(target)
    with pytest.raises(exc, match=frag):
        target.load_state_dict(mutate(source.state_dict()))
    assert_unchanged(target, snap)
    x = example_input(kind)
    target(x)                                               # and it still works
    target.load_state_dict(source.state_dict())             # a good load still goes through
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_a_refused_safetensors_load_changes_nothing(kind, layout, b, tmp_path):
    source, target = make(kind, layout, b, 0.6, seed=1), make(kind, layout, b, 0.3, seed=2)
    for i, (name, mutate, exc, frag) in enumerate(corruptions(kind)):
        path = tmp_path / f"bad{i}.safetensors"
        save_file({k: v.contiguous() for k, v in mutate(source.state_dict()).items()}, path)
        snap = snapshot(target)
        with pytest.raises(exc, match=frag):
            target.load_state_dict(load_file(path))
        assert_unchanged(target, snap)


def test_a_refused_load_inside_a_model_changes_nothing_in_that_layer():
    source = nn.Sequential(SparseLinear(16, 8, density=0.6), nn.ReLU(), SparseLinear(8, 4, density=0.6))
    target = nn.Sequential(SparseLinear(16, 8, density=0.3), nn.ReLU(), SparseLinear(8, 4, density=0.3))
    sd = source.state_dict()
    bad = {**sd, "0.topology.col_indices": _set(sd["0.topology.col_indices"], 0, 99)}
    snap = snapshot(target[0])
    with pytest.raises(ValueError, match="0.topology.*col_indices"):
        target.load_state_dict(bad)
    assert_unchanged(target[0], snap)                       # the bias is not loaded before the check


def non_contiguous(t):
    """The same values through a non-contiguous view."""
    if t.dim() == 3:
        v = t.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        v = torch.stack([t, t], 1)[:, 0]
    assert torch.equal(v, t) and not v.is_contiguous()
    return v


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_non_contiguous_checkpoint_tensors_load_into_a_working_layer(kind, layout, b):
    source, target = make(kind, layout, b, 0.6, seed=1), make(kind, layout, b, 0.3, seed=2)
    sd = source.state_dict()
    sd = {k: non_contiguous(v) if k in ("topology.values", "topology.col_indices", "bias") else v
          for k, v in sd.items()}
    target.load_state_dict(sd)
    assert all(t.is_contiguous() for t in (target.topology.values, *target.topology.topology()))
    results = []
    for m in (source, target):
        x = example_input(kind).requires_grad_()
        y = m(x)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad, m.topology.values.grad, m.bias.grad))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ DST engine
def engine_snapshot(engine):
    return {
        "step": engine.step_count,
        "rng": engine.generator.get_state().clone(),
        "ever_active": {n: v.clone() for n, v in engine.ever_active.items()},
        "history": copy.deepcopy(engine.history),
        "extra_updates": dict(engine.extra_updates),
        "freeze_from": engine.freeze_from,
        "hooks": {n: t.armed for n, t in engine._taps.items()},
        "captured": {n: len(t.pairs) for n, t in engine._taps.items()},
    }


def assert_engine_unchanged(engine, snap):
    now = engine_snapshot(engine)
    assert now["step"] == snap["step"] and torch.equal(now["rng"], snap["rng"])
    assert now["ever_active"].keys() == snap["ever_active"].keys()
    assert all(torch.equal(now["ever_active"][n], v) for n, v in snap["ever_active"].items())
    assert now["history"] == snap["history"]
    assert (now["extra_updates"], now["freeze_from"], now["hooks"], now["captured"]) == \
        (snap["extra_updates"], snap["freeze_from"], snap["hooks"], snap["captured"])


def engine_corruptions():
    def layers(st):
        return {**st["layers"], "0": {**st["layers"]["0"], "nnz": 1}}
    return [
        ("missing rng", lambda st: {k: v for k, v in st.items() if k != "rng"}, "rng"),
        ("step not an int", lambda st: {**st, "step": "twelve"}, "step"),
        ("negative step", lambda st: {**st, "step": -3}, "step"),
        ("rng size", lambda st: {**st, "rng": torch.zeros(3, dtype=torch.uint8)}, "rng"),
        ("rng type", lambda st: {**st, "rng": "seed"}, "rng"),
        ("history type", lambda st: {**st, "history": 5}, "history"),
        ("history entry", lambda st: {**st, "history": [*st["history"], {"step": 3}]}, "history"),
        ("extra_updates key", lambda st: {**st, "extra_updates": {"soon": 0.5}}, "extra_updates"),
        ("extra_updates fraction", lambda st: {**st, "extra_updates": {40: 1.5}}, "extra_updates"),
        ("freeze_from", lambda st: {**st, "freeze_from": "later"}, "freeze_from"),
        ("config type", lambda st: {**st, "config": None}, "config"),
        ("ever_active dtype", lambda st: {**st, "ever_active": {n: v.int() for n, v in st["ever_active"].items()}},
         "ever_active"),
        ("layers", lambda st: {**st, "layers": layers(st)}, "layers"),
    ]


@pytest.mark.parametrize("name,mutate,frag", engine_corruptions(), ids=[c[0] for c in engine_corruptions()])
def test_a_refused_engine_state_changes_nothing(name, mutate, frag):
    torch.manual_seed(0)
    model = mlp((20, 32, 5))
    sk.sparsify(model, 0.3, "uniform", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    source = sk.dst.RigL(model, opt, total_steps=50, update_every=5, seed=1)
    g = torch.Generator().manual_seed(3)
    for _ in range(7):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 20, generator=g)), torch.randint(0, 5, (8,), generator=g)).backward()
        opt.step()
        source.step()
    state = source.state_dict()
    target = sk.dst.RigL(model, opt, total_steps=50, update_every=1, seed=9)   # armed: next step rewires
    assert all(t.armed for t in target._taps.values())
    snap, tensors = engine_snapshot(target), snapshot(model)
    with pytest.raises(ValueError, match=frag):
        target.load_state_dict(mutate(state))
    assert_engine_unchanged(target, snap)
    assert_unchanged(model, tensors)
    target.load_state_dict(state)                           # the good state still loads
    assert target.step_count == 7 and torch.equal(target.generator.get_state(), source.generator.get_state())
