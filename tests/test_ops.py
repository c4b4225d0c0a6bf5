"""Every op and gradient against a float64 masked-dense reference, CSR and BSR."""
import pytest
import torch

import sparsekern as sk
from sparsekern.ops import library as L
from sparsekern.ops import reference as ref

from conftest import TOL, make_topology

SHAPES = [  # (M, out, in): odd shapes, batch 1, wide/tall, multi-tile batches
    (7, 96, 40), (1, 40, 96), (33, 24, 8), (100, 16, 64), (130, 64, 32), (37, 29, 45),
]
DENSITIES = [0.0, 0.05, 0.3, 1.0]
LAYOUTS = [("csr", 1), ("bsr", 4), ("bsr", 8), ("bsr", 16)]


def dense_reference(x, topo, bias, dy):
    """float64 y, dx, dW (masked), dbias from the dense weight."""
    W = topo.to_dense().double()
    mask = topo.mask()
    xd = x.detach().double()
    y = xd @ W.T + (bias.double() if bias is not None else 0)
    dyd = dy.double()
    return y, dyd @ W, (dyd.T @ xd) * mask, dyd.sum(0)


def fit(shape, b):
    M, o, i = shape
    return M, max(b, o // b * b), max(b, i // b * b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout,b", LAYOUTS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_linear_matches_masked_dense(shape, density, layout, b, dtype, threads, ext_required):
    M, out_f, in_f = fit(shape, b)
    topo = make_topology(out_f, in_f, density, layout, b, dtype, empty_rows=(0,))
    bias = torch.randn(out_f, dtype=dtype, requires_grad=True)
    x = torch.randn(M, in_f, dtype=dtype, requires_grad=True)
    y = sk.sparse_linear(x, topo, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_r, dx_r, dW_r, db_r = dense_reference(x, topo, bias, dy)
    dW = topo.to_dense(values=topo.values.grad).double()
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_r, **tol)
    torch.testing.assert_close(x.grad.double(), dx_r, **tol)
    torch.testing.assert_close(dW, dW_r, **tol)
    torch.testing.assert_close(bias.grad.double(), db_r, **tol)


@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_ops_match_reference_ops(layout, b, ext_required):
    topo = make_topology(64, 48, 0.25, layout, b, torch.float64)
    v, t = topo.values.detach(), topo.topology()
    x, dy = torch.randn(37, 48, dtype=torch.float64), torch.randn(37, 64, dtype=torch.float64)
    bias = torch.randn(64, dtype=torch.float64)
    torch.testing.assert_close(L.spmm(x, v, *t, bias), ref.spmm(x, v, *t, bias))
    torch.testing.assert_close(L.spmm_t(dy, v, *t), ref.spmm_t(dy, v, *t))
    torch.testing.assert_close(L.sddmm(dy, x, *t, b), ref.sddmm(dy, x, *t, b))


@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_reference_backend_matches_dense(layout, b):
    topo = make_topology(32, 48, 0.4, layout, b, torch.float64)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    y = sk.sparse_linear(x, topo, None, backend="reference")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_r, dx_r, dW_r, _ = dense_reference(x, topo, None, dy)
    torch.testing.assert_close(y, y_r)
    torch.testing.assert_close(x.grad, dx_r)
    torch.testing.assert_close(topo.to_dense(values=topo.values.grad), dW_r)


@pytest.mark.parametrize("M", [1, 8, 9, 64, 200])
def test_input_strides_and_leading_dims(M, ext_required):
    """Transposed views, expanded (stride-0) grads and [..., in] inputs all agree."""
    topo = make_topology(40, 24, 0.3, "csr", dtype=torch.float64)
    xt = torch.randn(24, M, dtype=torch.float64)
    y = sk.sparse_linear(xt.t(), topo)                     # x with stride (1, M)
    torch.testing.assert_close(y, xt.t() @ topo.to_dense().T)
    x3 = torch.randn(2, M, 24, dtype=torch.float64)
    y3 = sk.sparse_linear(x3, topo)
    assert y3.shape == (2, M, 40)
    torch.testing.assert_close(y3, x3 @ topo.to_dense().T)
    x = torch.randn(M, 24, dtype=torch.float64, requires_grad=True)
    sk.sparse_linear(x, topo).sum().backward()             # dy is an expanded ones tensor
    torch.testing.assert_close(x.grad, torch.ones(M, 40, dtype=torch.float64) @ topo.to_dense())


def test_no_dense_weight_sized_allocation(ext_required):
    """Forward + backward never allocate a tensor as large as the dense weight."""
    out_f = in_f = 512
    topo = make_topology(out_f, in_f, 0.05, "csr", dtype=torch.float32)
    x = torch.randn(16, in_f, requires_grad=True)
    sizes = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append((str(func), t.numel()))
            return out

    with Spy():
        sk.sparse_linear(x, topo).sum().backward()
    assert sizes, "the spy saw no ops"
    big = [s for s in sizes if s[1] >= out_f * in_f]
    assert not big, f"dense weight-sized tensors created: {big}"


@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 8)])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])
def test_ops_take_leading_dims(layout, b, lead, ext_required):
    """x [..., in]: every op flattens the leading dims and restores them."""
    topo = make_topology(16, 24, 0.4, layout, b, torch.float64)
    v, t = topo.values.detach(), topo.topology()
    x, dy = torch.randn(*lead, 24, dtype=torch.float64), torch.randn(*lead, 16, dtype=torch.float64)
    W = topo.to_dense()
    y = L.spmm(x, v, *t, None)
    assert y.shape == (*lead, 16)
    torch.testing.assert_close(y, x @ W.T)
    torch.testing.assert_close(L.spmm_t(dy, v, *t), dy @ W)
    dw = (dy.reshape(-1, 16).T @ x.reshape(-1, 24))
    torch.testing.assert_close(topo.to_dense(values=L.sddmm(dy, x, *t, b)), dw * topo.mask())
    torch.testing.assert_close(ref.spmm(x, v, *t, None), y)
    with pytest.raises(ValueError, match="leading dims"):
        L.sddmm(dy.reshape(-1, 16)[:1], x.reshape(-1, 24)[:2] if x.dim() > 1 else x[None].repeat(2, 1), *t, b)


@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 8)])
@pytest.mark.parametrize("batch", [1, 33, 700])          # one tile, a partial tile, several tile groups
def test_forward_and_dw_are_bitwise_the_same_at_any_thread_count(layout, b, batch, ext_required):
    """Each output row / nonzero is summed in one fixed order whichever thread runs its
    chunk (dynamic hand-out): forward and dW agree bit for bit at 1, 2 and 3 threads, and
    every op, dX included (whose gather/scatter form depends on the thread count), repeats
    bit for bit at a given count."""
    from sparsekern.testing import make_linear
    from conftest import num_threads
    layer = make_linear(96, 80, layout, b, density=0.3, seed=4)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 96, generator=g)
    dy = torch.randn(batch, 80, generator=g)

    def run():
        xr = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xr)
        y.backward(dy)
        return y.detach(), xr.grad, layer.topology.values.grad.clone()

    out = []
    for n in (1, 2, 3):
        with num_threads(n):
            out.append(run())
            again = run()
        for a, c in zip(out[-1], again):
            assert torch.equal(a, c)
    for other in out[1:]:
        assert torch.equal(out[0][0], other[0]) and torch.equal(out[0][2], other[2])
