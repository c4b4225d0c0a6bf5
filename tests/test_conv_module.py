"""SparseConv2d: the nn.Conv2d contract, state_dict, bad input, compile, opcheck, gradcheck."""
import io

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.autograd import gradcheck

from sparsekern import SparseConv2d
from sparsekern.ops import library as L

from conftest import make_topology


def test_init_geometry_density_and_repr():
    g = torch.Generator().manual_seed(0)
    c = SparseConv2d(16, 32, 3, stride=2, padding=1, density=0.25, generator=g)
    assert c.topology.shape == (32, 16 * 9) and c.weight.shape == (32, 16, 3, 3) and c.nnz == round(0.25 * 32 * 144)
    assert c.mask().shape == (32, 16, 3, 3) and c.mask().sum().item() == c.nnz
    fan_in = c.fan_in()
    bound = 1 / fan_in.clamp(min=1).double().sqrt()
    W = c.topology.to_dense().double()
    assert bool((W.abs() <= bound[:, None] + 1e-7).all())
    assert "density=0.2500" in repr(c) and "stride=(2, 2)" in repr(c)
    cb = SparseConv2d(16, 32, 3, density=0.5, layout="bsr", block_size=16)
    assert cb.nnz == round(0.5 * 2 * 9) * 256
    with pytest.raises(ValueError, match="multiples of block_size"):
        SparseConv2d(3, 32, 3, layout="bsr", block_size=16)
    with pytest.raises(ValueError, match="divisible by groups"):
        SparseConv2d(6, 8, 3, groups=4)
    with pytest.raises(ValueError, match="padding_mode"):
        SparseConv2d(6, 8, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="strided"):
        SparseConv2d(6, 8, 3, stride=2, padding="same")


def test_from_dense_mask_density_and_to_dense():
    dense = nn.Conv2d(6, 10, 3, padding=1, groups=2)
    mask = torch.rand(10, 3, 3, 3) < 0.4
    s = SparseConv2d.from_dense(dense, mask=mask)
    assert torch.equal(s.mask(), mask)
    x = torch.randn(2, 6, 7, 5)
    masked = nn.Conv2d(6, 10, 3, padding=1, groups=2)
    with torch.no_grad():
        masked.weight.copy_(dense.weight * mask)
        masked.bias.copy_(dense.bias)
    torch.testing.assert_close(s(x), masked(x))
    t = SparseConv2d.from_dense(dense, density=0.3)
    k = round(0.3 * dense.weight.numel())
    assert t.nnz == k
    thresh = dense.weight.detach().abs().flatten().topk(k).values.min()
    assert bool((dense.weight.detach().abs()[t.mask()] >= thresh).all())
    back = t.to_dense()
    assert isinstance(back, nn.Conv2d) and back.groups == 2 and back.padding == (1, 1)
    torch.testing.assert_close(back(x), t(x))
    with pytest.raises(ValueError, match="exactly one"):
        SparseConv2d.from_dense(dense)
    with pytest.raises(ValueError, match="mask has shape"):
        SparseConv2d.from_dense(dense, mask=torch.ones(10, 6, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
def test_state_dict_round_trip(layout, b, tmp_path):
    a = SparseConv2d(8, 16, 3, padding=1, density=0.3, layout=layout, block_size=b)
    c = SparseConv2d(8, 16, 3, padding=1, density=0.7, layout=layout, block_size=b)   # different nnz
    c.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 6, 6)
    assert c.nnz == a.nnz
    torch.testing.assert_close(c(x), a(x))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c.load_state_dict(torch.load(buf))
    save_file(a.state_dict(), tmp_path / "c.safetensors")
    d = SparseConv2d(8, 16, 3, padding=1, density=0.1, layout=layout, block_size=b)
    d.load_state_dict(load_file(tmp_path / "c.safetensors"))
    torch.testing.assert_close(d(x), a(x))


def test_corrupted_checkpoint_raises_and_leaves_layer_intact():
    a, b = SparseConv2d(4, 8, 3, density=0.3), SparseConv2d(4, 8, 3, density=0.3)
    before = b.weight.to_dense().clone()
    sd = a.state_dict()
    bad = dict(sd, **{"topology.col_indices": sd["topology.col_indices"].clone()})
    bad["topology.col_indices"][0] = 36
    with pytest.raises(ValueError, match="col_indices"):
        b.load_state_dict(bad)
    with pytest.raises(ValueError, match="meta"):
        b.load_state_dict(dict(sd, **{"topology.meta": torch.tensor([8, 40, 1])}))
    assert torch.equal(b.weight.to_dense(), before)


def test_bad_inputs_name_the_problem():
    c = SparseConv2d(4, 8, 3, padding=1, density=0.5)
    with pytest.raises(ValueError, match="x has 5 channels; this conv expects in_channels = 4"):
        c(torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\] or \[C, H, W\]"):
        c(torch.randn(2, 4, 6, 6, 1))
    with pytest.raises(TypeError, match="dtype"):
        c(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than"):
        SparseConv2d(4, 8, 5, density=0.5)(torch.randn(1, 4, 3, 3))
    with pytest.raises(TypeError, match="must be a tensor"):
        c([1, 2, 3])


def geo(k=3, s=1, p=1, d=1, g=1):
    return [k, k, s, s, p, p, p, p, d, d, g]


def conv_args(layout="csr", b=1, N=2, cin=4, cout=8, H=5, W=6, k=3, density=0.4, rg=True):
    topo = make_topology(cout, cin * k * k, density, layout, b, torch.float64, empty_rows=(1,), seed=5)
    v = topo.values.detach().clone().requires_grad_(rg)
    x = torch.randn(N, cin, H, W, dtype=torch.float64, requires_grad=rg)
    return v, topo.topology(), x


def test_malformed_topology_into_the_op_raises(ext_required):
    v, t, x = conv_args()
    ro, ci, to, ti, tp = [a.clone() for a in t]
    dy = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    bad_ci = ci.clone()
    bad_ci[0] = 1000
    with pytest.raises(ValueError, match="col_indices"):
        L.conv2d(x, v, ro, bad_ci, to, ti, tp, None, geo())
    with pytest.raises(ValueError, match="col_indices"):
        L.conv2d_dw(dy, x, ro, bad_ci, to, ti, tp, geo(), 1)
    bad_tp = tp.clone()
    bad_tp[0] = -1
    with pytest.raises(ValueError, match="t_perm"):
        L.conv2d_dx(dy, v, ro, ci, to, ti, bad_tp, geo(), list(x.shape))
    bad_ro = ro.clone()
    bad_ro[2] = 10_000
    with pytest.raises(ValueError, match="row_offsets"):
        L.conv2d(x, v, bad_ro, ci, to, ti, tp, None, geo())
    with pytest.raises(ValueError, match="columns"):
        L.conv2d(x[:, :3], v, *t, None, geo())
    with pytest.raises(ValueError, match="dy has shape"):
        L.conv2d_dx(dy[:, :4], v, *t, geo(), list(x.shape))
    with pytest.raises(ValueError, match="geometry"):
        L.conv2d(x, v, *t, None, geo()[:5])
    with pytest.raises(ValueError, match="stride"):
        L.conv2d(x, v, *t, None, geo(s=0))
    with pytest.raises(TypeError, match="int32"):
        L.conv2d(x, v, ro, ci.long(), to, ti, tp, None, geo())


@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 4)])
@pytest.mark.parametrize("s", [1, 2])
def test_opcheck_conv_ops(layout, b, s, ext_required):
    v, t, x = conv_args(layout, b, cin=4, cout=8)
    g = geo(s=s)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    y = L.conv2d(x, v, *t, bias, g)
    dy = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(L.conv2d, (x, v, *t, bias, g))
    torch.library.opcheck(L.conv2d, (x, v, *t, None, g))
    torch.library.opcheck(L.conv2d_dx, (dy, v, *t, g, list(x.shape)))
    torch.library.opcheck(L.conv2d_dw, (dy, x, *t, g, b))


@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 4)])
@pytest.mark.parametrize("g", [geo(), geo(s=2, p=2, d=2), geo(k=1, p=0)], ids=["3x3", "s2d2", "1x1"])
def test_gradcheck_conv_ops(layout, b, g, ext_required):
    k = g[0]
    v, t, x = conv_args(layout, b, N=1, k=k)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, v, bias: L.conv2d(x, v, *t, bias, g), (x, v, bias))
    dy = torch.randn_like(L.conv2d(x, v, *t, None, g)).requires_grad_()
    assert gradcheck(lambda dy, v: L.conv2d_dx(dy, v, *t, g, list(x.shape)), (dy, v))
    assert gradcheck(lambda dy, x: L.conv2d_dw(dy, x, *t, g, b), (dy, x))


def test_gradgradcheck_conv(ext_required):
    v, t, x = conv_args(N=1)
    assert torch.autograd.gradgradcheck(lambda x, v: L.conv2d(x, v, *t, None, geo()), (x, v))


def test_torch_compile_fullgraph_matches():
    torch.manual_seed(0)
    model = nn.Sequential(SparseConv2d(3, 8, 3, padding=1, density=0.4), nn.ReLU(),
                          SparseConv2d(8, 8, 3, stride=2, padding=1, density=0.4), nn.Flatten(),
                          nn.LazyLinear(4))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model[0].topology.values.grad is not None and x.grad is not None
