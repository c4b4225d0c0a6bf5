"""RigL's growth gradient under real training loops (sparsekern/dst/capture.py): gradient accumulation
uses the whole step's gradient, an extra forward before dst.step() changes nothing, and the capture
works on a torch.compile'd model."""
import copy
import pickle

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import SparseLinear
from sparsekern.dst.rebuild import active_positions


def integer_model(seed=0):
    """Integer weights, inputs and output weights: every gradient is an exact integer, so any
    summation order (micro-batches, tiles) gives the same scores."""
    torch.manual_seed(seed)
    model = nn.Sequential(SparseLinear(40, 24, bias=False, density=0.3, dtype=torch.float64))
    with torch.no_grad():
        model[0].topology.values.copy_(torch.randint(-3, 4, model[0].topology.values.shape).double())
    return model


def engine_for(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return sk.dst.RigL(model, opt, total_steps=4, update_every=1, drop_fraction=0.5, schedule="constant",
                       stop_at=1.0)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(-2, 3, (4, 40), generator=g).double(), torch.randint(-2, 3, (4, 24), generator=g).double())
            for _ in range(n)]


def step(model, engine, micro):
    for x, w in micro:
        (model(x) * w).sum().backward()
    assert engine.step()
    return active_positions(model[0].topology)


def test_gradient_accumulation_grows_by_the_whole_steps_gradient():
    base = integer_model()
    micro = batches(3)
    accumulated = copy.deepcopy(base)
    got = step(accumulated, engine_for(accumulated), micro)
    whole = copy.deepcopy(base)                       # one batch holding all three micro-batches
    x, w = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])
    want = step(whole, engine_for(whole), [(x, w)])
    assert torch.equal(got, want)
    last = copy.deepcopy(base)                        # what pairing with the last micro-batch only grows
    assert not torch.equal(step(last, engine_for(last), micro[-1:]), want)


@pytest.mark.parametrize("extra", ["no_grad", "grad_without_backward", "eval_mode"])
def test_an_extra_forward_before_dst_step_does_not_change_the_topology(extra):
    base = integer_model()
    (x, w), (x_eval, _) = batches(2)
    plain = copy.deepcopy(base)
    want = step(plain, engine_for(plain), [(x, w)])
    model = copy.deepcopy(base)
    engine = engine_for(model)
    (model(x) * w).sum().backward()
    if extra == "no_grad":
        with torch.no_grad():
            model(x_eval)
    elif extra == "grad_without_backward":
        logged = model(x_eval).square().mean()        # a logged loss, never backpropagated
        assert logged.requires_grad
    else:
        model.eval()
        with torch.inference_mode():
            model(x_eval)
        model.train()
    assert engine.step()
    assert torch.equal(active_positions(model[0].topology), want)


# Dynamo's guards; AOT's traced backward; inductor (torch.compile's default: generated C++ around
# the sparse ops, which stay opaque custom ops), once, as the C++ builds take a while
@pytest.mark.parametrize("backend,compile_first", [("eager", False), ("eager", True), ("aot_eager", False),
                                                   ("aot_eager", True), ("inductor", True)])
def test_rigl_on_a_compiled_model_grows_as_in_eager_mode(backend, compile_first):
    torch._dynamo.reset()
    base = integer_model()
    micro = batches(3)
    eager = copy.deepcopy(base)
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend=backend)
    if compile_first:
        compiled(micro[0][0]).sum().backward()       # compiled before the engine (and its taps) exist
        eager(micro[0][0]).sum().backward()
        for m in (model, eager):
            m[0].topology.values.grad = None
    eager_engine, engine = engine_for(eager), engine_for(model)
    for x, w in micro:                                # every step updates (update_every=1)
        for m, e in ((eager, eager_engine), (compiled, engine)):
            (m(x) * w).sum().backward()
            assert e.step()
        assert torch.equal(active_positions(model[0].topology), active_positions(eager[0].topology))
    assert len(engine.history) == 3


def test_a_copy_of_the_model_does_not_carry_the_engines_tap():
    model = integer_model()
    engine = engine_for(model)
    assert model[0]._dst_tap is engine._taps["0"] and model[0]._dst_tap.armed
    assert copy.deepcopy(model)[0]._dst_tap is None
    assert pickle.loads(pickle.dumps(model))[0]._dst_tap is None


def test_no_capture_between_updates():
    model = integer_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = sk.dst.RigL(model, opt, total_steps=20, update_every=5, stop_at=1.0)
    (x, w), = batches(1)
    for i in range(1, 6):
        (model(x) * w).sum().backward()
        assert len(engine._taps["0"].pairs) == (1 if i == 5 else 0)  # armed for step 5 only
        engine.step()
