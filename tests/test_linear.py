"""SparseLinear: the nn.Linear contract, state_dict, optimizers, Sequential, compile."""
import io

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparsekern as sk
from sparsekern import SparseLinear


@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 8)])
def test_init_density_and_fan_in_scaling(layout, b):
    g = torch.Generator().manual_seed(0)
    lin = SparseLinear(256, 128, density=0.2, layout=layout, block_size=b, generator=g)
    blocks = (256 // (b or 1)) * (128 // (b or 1))
    assert lin.nnz == round(0.2 * blocks) * (b or 1) ** 2
    assert abs(lin.density - 0.2) < 1e-2
    fan_in = lin.fan_in()
    W = lin.weight.to_dense()
    bound = 1 / fan_in.clamp(min=1).double().sqrt()
    assert bool((W.abs().double() <= bound[:, None] + 1e-7).all())
    # Variance over a row's nonzeros matches U(-bound, bound): bound^2 / 3.
    var = (W.double() ** 2).sum(1) / fan_in.clamp(min=1)
    ratio = (var / (bound ** 2 / 3))[fan_in > 0]
    assert 0.8 < ratio.mean().item() < 1.2
    assert f"density={lin.density:.4f}" in repr(lin) and f"layout={layout}" in repr(lin)


def test_from_dense_mask_and_density_and_to_dense():
    dense = nn.Linear(40, 24)
    mask = torch.rand(24, 40) < 0.3
    s = SparseLinear.from_dense(dense, mask=mask)
    assert torch.equal(s.mask(), mask)
    assert torch.equal(s.weight.to_dense(), dense.weight.detach() * mask)
    t = SparseLinear.from_dense(dense, density=0.25)
    k = round(0.25 * 24 * 40)
    assert t.nnz == k
    thresh = dense.weight.detach().abs().flatten().topk(k).values.min()
    assert bool((dense.weight.detach().abs()[t.mask()] >= thresh).all())
    back = t.to_dense()
    assert isinstance(back, nn.Linear)
    x = torch.randn(3, 40)
    torch.testing.assert_close(back(x), t(x))
    torch.testing.assert_close(back.bias, dense.bias)
    tb = SparseLinear.from_dense(dense, density=0.5, layout="bsr", block_size=4)
    assert tb.nnz == round(0.5 * 60) * 16
    with pytest.raises(ValueError, match="exactly one"):
        SparseLinear.from_dense(dense)


@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
def test_state_dict_round_trip_with_topology(layout, b, tmp_path):
    a = SparseLinear(32, 16, density=0.3, layout=layout, block_size=b)
    c = SparseLinear(32, 16, density=0.6, layout=layout, block_size=b)   # different nnz
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.weight.to_dense(), a.weight.to_dense()) and c.nnz == a.nnz
    x = torch.randn(5, 32)
    torch.testing.assert_close(c(x), a(x))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c.load_state_dict(torch.load(buf))
    save_file(a.state_dict(), tmp_path / "w.safetensors")
    d = SparseLinear(32, 16, density=0.1, layout=layout, block_size=b)
    d.load_state_dict(load_file(tmp_path / "w.safetensors"))
    torch.testing.assert_close(d(x), a(x))


def test_corrupted_checkpoint_raises_and_leaves_layer_intact():
    a = SparseLinear(32, 16, density=0.3)
    b = SparseLinear(32, 16, density=0.3)
    before = b.weight.to_dense().clone()
    sd = a.state_dict()
    bad = dict(sd)
    bad["topology.col_indices"] = sd["topology.col_indices"].clone()
    bad["topology.col_indices"][0] = 99
    with pytest.raises(ValueError, match="malformed topology.*col_indices"):
        b.load_state_dict(bad)
    bad = dict(sd, **{"topology.row_offsets": sd["topology.row_offsets"][:-1]})
    with pytest.raises(ValueError, match="row_offsets"):
        b.load_state_dict(bad)
    bad = dict(sd, **{"topology.meta": torch.tensor([16, 64, 1])})
    with pytest.raises(ValueError, match="meta"):
        b.load_state_dict(bad)
    bad = dict(sd, **{"topology.t_perm": sd["topology.t_perm"].flip(0)})
    with pytest.raises(ValueError, match="t_perm"):
        b.load_state_dict(bad)
    assert torch.equal(b.weight.to_dense(), before)
    missing = {k: v for k, v in sd.items() if k != "topology.col_indices"}
    with pytest.raises(RuntimeError, match="topology.col_indices"):
        b.load_state_dict(missing)


@pytest.mark.parametrize("opt", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_trains_in_sequential_with_optimizers(opt):
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(20, 64, density=0.5), nn.ReLU(), SparseLinear(64, 3, density=0.5))
    params = list(model.parameters())
    assert all(p.dim() in (1,) for p in params)        # values [nnz] and biases only
    o = opt(params, lr=0.5 if opt is torch.optim.SGD else 0.02)
    x = torch.randn(64, 20)
    yt = x[:, :3].argmax(1)
    losses = []
    for _ in range(100):
        o.zero_grad()
        loss = nn.functional.cross_entropy(model(x), yt)
        loss.backward()
        o.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_leading_dims_and_bad_inputs():
    lin = SparseLinear(12, 6, density=0.5)
    assert lin(torch.randn(2, 3, 4, 12)).shape == (2, 3, 4, 6)
    assert lin(torch.randn(12)).shape == (6,)
    with pytest.raises(ValueError, match="in_features=12"):
        lin(torch.randn(3, 11))
    with pytest.raises(TypeError, match="dtype"):
        lin(torch.randn(3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="layout"):
        SparseLinear(8, 8, layout="coo")
    with pytest.raises(ValueError, match="block_size"):
        SparseLinear(8, 8, layout="bsr", block_size=3)
    with pytest.raises(ValueError, match="multiples"):
        SparseLinear(10, 8, layout="bsr", block_size=4)
    with pytest.raises(ValueError, match="density"):
        SparseLinear(8, 8, density=1.5)


def test_unsupported_device_or_dtype_explains_every_backend():
    lin = SparseLinear(8, 8, density=0.5, dtype=torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match=r"(?s)cpu: dtype torch.float8_e4m3fn.*reference: only"):
        sk.select_backend(x.to(torch.float8_e4m3fn), lin.topology.values.detach().to(torch.float8_e4m3fn))
    assert lin(x).dtype == torch.bfloat16                          # the CPU kernels
    lin.backend = "reference"
    assert lin(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown backend"):
        sk.select_backend(torch.randn(2), torch.randn(2), "gpu")


def test_density_zero_and_one():
    x = torch.randn(4, 16, requires_grad=True)
    z = SparseLinear(16, 8, density=0.0)
    assert z.nnz == 0
    torch.testing.assert_close(z(x), z.bias.expand(4, 8))
    full = SparseLinear(16, 8, density=1.0)
    torch.testing.assert_close(full(x), full.to_dense()(x))


def test_torch_compile_runs_and_matches():
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(16, 32, density=0.3), nn.ReLU(), SparseLinear(32, 4, density=0.3))
    x = torch.randn(8, 16, requires_grad=True)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)   # no graph breaks
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model[0].topology.values.grad is not None and x.grad is not None
