"""Every op and gradient against a float64 masked-dense reference, CSR and BSR."""
import pytest
import torch

import sparsekern as sk
from sparsekern.ops import library as L
from sparsekern.ops import reference as ref

from conftest import TOL, make_topology, num_threads

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


def assert_linear_matches_dense(M, topo):
    """sparse_linear's y and every gradient (x, values, bias) on a fresh batch of M rows,
    against the float64 masked-dense reference at the topology's dtype tolerance."""
    dtype = topo.values.dtype
    bias = torch.randn(topo.shape[0], dtype=dtype, requires_grad=True)
    x = torch.randn(M, topo.shape[1], dtype=dtype, requires_grad=True)
    y = sk.sparse_linear(x, topo, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_r, dx_r, dW_r, db_r = dense_reference(x, topo, bias, dy)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_r, **tol)
    torch.testing.assert_close(x.grad.double(), dx_r, **tol)
    torch.testing.assert_close(topo.to_dense(values=topo.values.grad).double(), dW_r, **tol)
    torch.testing.assert_close(bias.grad.double(), db_r, **tol)


def fit(shape, b):
    M, o, i = shape
    return M, max(b, o // b * b), max(b, i // b * b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout,b", LAYOUTS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_linear_matches_masked_dense(shape, density, layout, b, dtype, threads, ext_required):
    M, out_f, in_f = fit(shape, b)
    assert_linear_matches_dense(M, make_topology(out_f, in_f, density, layout, b, dtype, empty_rows=(0,)))


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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M,in_f", [
    (101, 2560), (160, 2560),  # fp32 x tiles of 320 KiB: 2 tiles per pass (4 tiles; 5 = 2 + 2 + 1)
    (190, 96), (224, 96),      # small tiles: passes of 4 (+ 2, + 3 = 2 + 1 in fp32; more in fp64)
])
def test_csr_dw_over_multi_tile_passes(M, in_f, dtype, threads, ext_required):
    """The CSR SDDMM takes up to 4 batch tiles per pass (as many as fit the x-tile
    budget); every split of the batch into passes, partial last tile included, sums to
    the float64 masked-dense dW."""
    topo = make_topology(40, in_f, 0.05, "csr", 1, dtype, empty_rows=(0, 7))
    x = torch.randn(M, in_f, dtype=dtype)
    dy = torch.randn(M, 40, dtype=dtype)
    dw = topo.to_dense(values=L.sddmm(dy, x, *topo.topology(), 1)).double()
    want = (dy.double().T @ x.double()) * topo.mask()
    torch.testing.assert_close(dw, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b", [8, 16, 32, 64])
def test_bsr_dw_outer_register_blocks(b, dtype, threads, ext_required):
    """BSR dW in outer-product form picks its register block by block size and lanes
    (fp32 on AVX-512: one 16-lane vector x 16 rows for b = 16, two x eight for 32 and 64;
    32-byte lanes for b = 8 and fp64): each, over two 256-row batch chunks (the second
    adds), matches the float64 masked-dense dW."""
    topo = make_topology(2 * b, 3 * b, 0.5, "bsr", b, dtype, empty_rows=(0,))
    x = torch.randn(300, 3 * b, dtype=dtype)
    dy = torch.randn(300, 2 * b, dtype=dtype)
    dw = topo.to_dense(values=L.sddmm(dy, x, *topo.topology(), b)).double()
    torch.testing.assert_close(dw, (dy.double().T @ x.double()) * topo.mask(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M,out_f,in_f,density", [
    (70, 600, 520, 0.3),    # fwd panels 256+256+8, dX (gather, W^T rows of 600) 256+256+88
    (5, 37, 1100, 0.5),     # batch below one tile (the narrow tile width), 5 panels, tail 76
    (300, 520, 513, 1.0),   # full rows, a 1-column last panel; dX gather at 2+ tiles/thread
    (40, 512, 512, 0.26),   # just over the rule's 1/4 density, exactly 2 panels
])
def test_csr_column_panels_match_masked_dense(M, out_f, in_f, density, dtype, threads, ext_required):
    """Dense CSR rows (>= 1/4 density, >= 2 panels of 256 features) run the forward and
    gather-form dX in L1 column panels with per-row cursors; every panel boundary, empty
    rows and the bias (added on the last panel) match the float64 masked-dense result."""
    assert_linear_matches_dense(M, make_topology(out_f, in_f, density, "csr", 1, dtype,
                                                 empty_rows=(0, 3, out_f - 1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_column_panels_sum_in_the_fp32_order(dtype, monkeypatch):
    """The widening 16-bit forward takes the same panels as fp32 (the rule reads only the
    structure), so on the same 16-bit inputs its y is the fp32 kernels' y rounded once."""
    monkeypatch.setenv("SPARSEKERN_CPU_BF16_DOT", "0")
    topo = make_topology(300, 700, 0.4, "csr", 1, dtype, empty_rows=(1,))
    meta, v = topo.topology(), topo.values.detach()
    x, bias = torch.randn(77, 700).to(dtype), torch.randn(300).to(dtype)
    ops = torch.ops.sparsekern
    for n in (1, 2):
        with num_threads(n):
            got = ops.spmm(x, v, *meta, bias)
            want = ops.spmm(x.float(), v.float(), *meta, bias.float())
        assert got.dtype == dtype
        assert torch.equal(got, want.to(dtype)), f"{n} threads"
        torch.testing.assert_close(want.double(), x.double() @ topo.to_dense().double().T + bias.double(),
                                   rtol=1e-4, atol=1e-4)


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
