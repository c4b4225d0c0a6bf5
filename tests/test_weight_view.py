"""``layer.weight`` reads as the dense weight (sparsekern.nn.weight.SparseWeight): metadata, products
on the sparse kernels, nn.init on the stored values, clear errors, and last version's state_dict keys."""
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern as sk
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.nn.weight import SparseWeight, SparseWeightError

CASES = [("csr", None), ("bsr", 4)]


class Ops(TorchDispatchMode):
    """Records every op and the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.names, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.names.append(str(func.overloadpacket))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not isinstance(t, SparseWeight):
                self.largest = max(self.largest, t.numel())
        return out


def linear(layout, b, out_f=24, in_f=40, density=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return SparseLinear(in_f, out_f, density=density, layout=layout, block_size=b, generator=g, dtype=dtype)


@pytest.mark.parametrize("layout,b", CASES)
def test_metadata_reads_as_the_dense_weight(layout, b):
    lin = linear(layout, b)
    w = lin.weight
    assert isinstance(w, torch.Tensor) and w.shape == (24, 40) and w.size(1) == 40 and w.ndim == w.dim() == 2
    assert w.dtype == torch.float64 and w.device == lin.topology.values.device and w.numel() == 24 * 40
    assert w.requires_grad and not w.is_cuda and w.T.shape == w.t().shape == w.mT.shape == (40, 24)
    assert w.T.T.shape == (24, 40) and w.transpose(0, 1).shape == (40, 24)
    assert w.topology is lin.topology and w.nnz == lin.nnz and w.sparse_layout == layout
    assert torch.overrides.has_torch_function((w,))            # why torch's fused fast paths step aside
    assert "SparseWeight(shape=[24, 40]" in repr(w)
    w.requires_grad = False
    assert not lin.topology.values.requires_grad and not lin.weight.requires_grad
    lin.weight.requires_grad_(True)
    assert lin.topology.values.requires_grad
    conv = SparseConv2d(8, 8, 3, groups=2, density=0.4, layout=layout, block_size=b)
    assert conv.weight.shape == (8, 4, 3, 3) == nn.Conv2d(8, 8, 3, groups=2).weight.shape
    assert conv.topology.shape == (8, 36)


@pytest.mark.parametrize("layout,b", CASES)
def test_products_run_the_sparse_kernels_with_gradients(layout, b):
    lin = linear(layout, b)
    W = lin.topology.to_dense()                                   # float64 masked-dense reference
    x = torch.randn(5, 40, dtype=torch.float64)
    with Ops() as ops:
        ys = [F.linear(x, lin.weight, lin.bias), x @ lin.weight.T + lin.bias,
              torch.matmul(x, lin.weight.T) + lin.bias, torch.addmm(lin.bias, x, lin.weight.T),
              (lin.weight @ x.T).T + lin.bias, sk.sparse_linear(x, lin.weight, lin.bias)]
    assert "aten.mm" not in ops.names and "aten.addmm" not in ops.names and "sparsekern.spmm" in ops.names
    assert ops.largest < 24 * 40                                  # nothing weight-sized was formed
    for y in ys:
        torch.testing.assert_close(y, x @ W.T + lin.bias, rtol=1e-12, atol=1e-12)
    ys[0].square().sum().backward()
    g = lin.topology.values.grad
    mask = lin.topology.mask()
    Wd = W.clone().requires_grad_()
    F.linear(x, Wd, lin.bias.detach()).square().sum().backward()
    torch.testing.assert_close(lin.topology.to_dense(values=g), Wd.grad * mask, rtol=1e-12, atol=1e-12)
    assert lin.weight.grad.shape == (24, 40)
    torch.testing.assert_close(lin.weight.grad.to_dense(), Wd.grad * mask, rtol=1e-12, atol=1e-12)


def test_conv2d_functional_runs_the_sparse_kernel():
    conv = SparseConv2d(4, 6, 3, stride=2, padding=1, density=0.5, dtype=torch.float64)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    dense = conv.weight.to_dense()
    assert dense.shape == (6, 4, 3, 3)
    y = F.conv2d(x, conv.weight, conv.bias, 2, 1)
    torch.testing.assert_close(y, F.conv2d(x, dense, conv.bias, 2, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)
    with pytest.raises(SparseWeightError, match="2-D weight"):
        F.linear(torch.randn(2, 36), conv.weight)


@pytest.mark.parametrize("layout,b", CASES)
def test_nn_init_draws_the_stored_values_with_the_dense_fans(layout, b):
    lin = linear(layout, b, out_f=128, in_f=256, density=0.5)
    v = lin.topology.values
    fan_in, fan_out = 256, 128
    cases = [
        (lambda w: nn.init.xavier_uniform_(w), math.sqrt(6 / (fan_in + fan_out)), "uniform"),
        (lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)), math.sqrt(6 / ((1 + 5) * fan_in)), "uniform"),
        (lambda w: nn.init.uniform_(w, -0.3, 0.3), 0.3, "uniform"),
        (lambda w: nn.init.xavier_normal_(w), math.sqrt(2 / (fan_in + fan_out)), "normal"),
        (lambda w: nn.init.kaiming_normal_(w), math.sqrt(2 / fan_in), "normal"),
        (lambda w: nn.init.normal_(w, 0.0, 0.02), 0.02, "normal"),
        (lambda w: nn.init.trunc_normal_(w, std=0.02), 0.02, "normal"),
    ]
    for init, scale, kind in cases:
        version = v._version
        out = init(lin.weight)
        assert isinstance(out, SparseWeight) and v._version > version        # in place, counted
        if kind == "uniform":
            assert v.abs().max() <= scale and v.abs().max() > 0.95 * scale
        else:
            assert abs(v.std().item() / scale - 1) < 0.05
        assert torch.equal(lin.mask(), lin.topology.to_dense() != 0)          # the zeros stay zeros
    nn.init.trunc_normal_(lin.weight, std=1.0, a=-2.0, b=2.0)
    assert v.abs().max() <= 2.0
    nn.init.constant_(lin.weight, 0.25)
    assert bool((v == 0.25).all())
    nn.init.zeros_(lin.weight)
    assert not v.any()
    nn.init.ones_(lin.weight)
    assert bool((v == 1).all())
    with torch.no_grad():
        lin.weight.data.normal_(0, 0.1)
        lin.weight.mul_(2)
        assert v.std() > 0.15
    conv = SparseConv2d(16, 32, 3, density=0.5, dtype=torch.float64)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    assert abs(conv.topology.values.std().item() / math.sqrt(2 / (32 * 9)) - 1) < 0.05


def test_operations_that_need_every_position_raise_clearly():
    lin = linear("csr", None)
    x = torch.randn(3, 40, dtype=torch.float64)
    before = lin.topology.values.detach().clone()
    bad = [lambda w: nn.init.eye_(w), lambda w: nn.init.orthogonal_(w), lambda w: w + 1, lambda w: torch.exp(w),
           lambda w: w[0], lambda w: w.copy_(torch.zeros(24, 40)),
           lambda w: x @ w.T.T, lambda w: w.T @ x.T, lambda w: w.to(torch.float32), lambda w: w * w.T]
    for op in bad:
        with torch.no_grad(), pytest.raises(SparseWeightError, match="dense|kernel|move or cast"):
            op(lin.weight)
    assert torch.equal(lin.topology.values, before)
    with pytest.raises(SparseWeightError, match="not differentiable"):
        lin.weight.pow(2).sum()                     # would lose the gradient silently otherwise
    with torch.no_grad():                           # inspection works, exactly over the stored values
        assert lin.weight.abs().sum() == before.abs().sum() and not lin.weight.all()
        assert torch.equal((lin.weight * 2).to_dense(), 2 * lin.topology.to_dense())
    with pytest.raises(AttributeError, match="view of the layer's sparse topology"):
        lin.weight = nn.Parameter(torch.zeros(24, 40))
    with pytest.raises(SparseWeightError, match="dense"):      # after drawing (the documented limit)
        nn.init.dirac_(SparseConv2d(4, 4, 3, density=0.5).weight)
    with pytest.raises(SparseWeightError, match="dense"):
        nn.init.sparse_(lin.weight, 0.5)


@pytest.mark.parametrize("layout,b", CASES)
def test_a_training_step_forms_no_dense_weight(layout, b):
    lin = linear(layout, b, out_f=64, in_f=128, dtype=torch.float32)
    opt = torch.optim.Adam(lin.parameters())
    x = torch.randn(4, 128)
    with Ops() as ops:
        assert lin.weight.dtype == torch.float32 and lin.weight.shape == (64, 128)   # as HF code reads it
        F.linear(x, lin.weight, lin.bias).square().mean().backward()
        opt.step()
    assert ops.largest < 64 * 128


def _legacy(sd):
    """A state_dict as the last version wrote it (the topology was the module ``weight``)."""
    return {k.replace("topology.", "weight."): v for k, v in sd.items()}


@pytest.mark.parametrize("layout,b", CASES)
def test_last_versions_keys_load_atomically(layout, b):
    a, c = linear(layout, b), linear(layout, b, density=0.6)
    c.load_state_dict(_legacy(a.state_dict()))
    assert torch.equal(c.topology.to_dense(), a.topology.to_dense()) and c.nnz == a.nnz
    model = nn.Sequential(linear(layout, b), nn.ReLU(), SparseConv2d(2, 4, 3, density=0.5))
    other = nn.Sequential(linear(layout, b, density=0.7), nn.ReLU(), SparseConv2d(2, 4, 3, density=0.2))
    other.load_state_dict(_legacy(model.state_dict()))
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), other.state_dict().values()))
    bad = _legacy(a.state_dict())
    bad["weight.col_indices"] = bad["weight.col_indices"].clone()
    bad["weight.col_indices"][0] = 10_000
    before = {k: v.clone() for k, v in c.state_dict().items()}
    with pytest.raises(ValueError, match="col_indices"):
        c.load_state_dict(bad)
    assert all(torch.equal(before[k], v) for k, v in c.state_dict().items())     # nothing written
    both = {**a.state_dict(), "weight.values": a.topology.values.detach()}
    with pytest.raises(ValueError, match="both"):
        c.load_state_dict(both)
    old = SparseLinear.__new__(SparseLinear)                      # a pickle of the last version
    state = dict(a.__dict__, _modules={"weight": a.topology})
    old.__setstate__(state)
    assert old.topology is a.topology and torch.equal(pickle.loads(pickle.dumps(a)).weight.to_dense(),
                                                      a.weight.to_dense())
