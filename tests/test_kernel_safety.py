"""Kernel defects as classes: races at >= 2 threads, block sizes, overflowing
geometry, non-finite values, and a differential fuzz of every CPU op at 1 and
2 threads against a float64 masked-dense reference."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d
from sparsekern.formats import transpose_metadata

from conftest import TOL, num_threads
from test_conv import make_conv, reference

OPS = torch.ops.sparsekern


def raw_bsr(out_f, in_f, b, density, dtype, seed):
    """A BSR structure of any block size (the ops accept multiples of 4 up to 64;
    the Python formats only 4, 8, 16, 32, 64): values, topology tensors, mask."""
    g = torch.Generator().manual_seed(seed)
    R, C = out_f // b, in_f // b
    keep = torch.rand(R, C, generator=g) < density
    keep[0] = False  # an empty block row
    ro = torch.zeros(R + 1, dtype=torch.int32)
    ro[1:] = keep.sum(1).cumsum(0).to(torch.int32)
    ci = keep.nonzero()[:, 1].to(torch.int32)
    vals = torch.randn(len(ci), b, b, generator=g, dtype=torch.float64).to(dtype)
    topo = (ro, ci, *transpose_metadata(ro, ci, C))
    dense = torch.zeros(out_f, in_f, dtype=torch.float64)
    for k, (r, c) in enumerate(keep.nonzero().tolist()):
        dense[r * b:(r + 1) * b, c * b:(c + 1) * b] = vals[k].double()
    return vals, topo, dense


# ---------------------------------------------------------------- races

RACE_CONFIGS = [  # (Cin, Cout, kernel, stride, padding, N, H, W): from the issue, and the wider one
    (3, 5, (2, 1), (2, 1), (1, 1), 4, 2, 3),
    (64, 64, 3, 2, 1, 2, 4, 4),
    (64, 64, 3, 2, 1, 4, 4, 4),
    (16, 16, 3, 2, 1, 2, 3, 3),
]


@pytest.mark.parametrize("nthreads", [2, 3])
@pytest.mark.parametrize("cfg", RACE_CONFIGS, ids=str)
def test_strided_conv_dx_has_no_race(cfg, nthreads, ext_required):
    """The stride > 1 dX scatters; with 2+ threads its stray lanes once reached into
    the next image, which another thread was updating (~1-40% of calls wrong).
    Every repetition must now equal the float64 reference."""
    cin, cout, k, s, p, N, H, W = cfg
    g = torch.Generator().manual_seed(cin * 1000 + N)
    dense = nn.Conv2d(cin, cout, k, s, p, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.normal_(generator=g)
    mask = torch.rand(dense.weight.shape, generator=g) < 0.5
    sc = SparseConv2d.from_dense(dense, mask=mask.reshape(cout, -1)).float()
    x = torch.randn(N, cin, H, W, generator=g)
    dy = torch.randn(sc(x).shape, generator=g)
    xr = x.double().requires_grad_()
    F.conv2d(xr, dense.weight.detach() * mask, None, s, p).backward(dy.double())
    with num_threads(nthreads):
        for _ in range(100):
            xx = x.clone().requires_grad_()
            sc(xx).backward(dy)
            torch.testing.assert_close(xx.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- block sizes

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [12, 20, 24, 40, 56])
def test_bsr_ops_at_block_sizes_not_multiple_of_16(b, dtype, threads, ext_required):
    """sddmm's outer-product kernel stepped 16 columns at a time: blocks of 24, 40
    or 56 wrote past their block (heap overflow). Every multiple of 4 the launcher
    accepts must be exact in spmm, spmm_t and sddmm."""
    out_f, in_f, M = 3 * b, 4 * b, 37
    vals, topo, W = raw_bsr(out_f, in_f, b, 0.6, dtype, seed=b)
    x = torch.randn(M, in_f, dtype=dtype)
    dy = torch.randn(M, out_f, dtype=dtype)
    tol = TOL[dtype]
    torch.testing.assert_close(OPS.spmm(x, vals, *topo, None).double(), x.double() @ W.T, **tol)
    torch.testing.assert_close(OPS.spmm_t(dy, vals, *topo).double(), dy.double() @ W, **tol)
    dW = OPS.sddmm(dy, x, *topo, b)
    full = dy.double().T @ x.double()
    ro, ci = topo[0], topo[1]
    rows = torch.repeat_interleave(torch.arange(len(ro) - 1), (ro[1:] - ro[:-1]).long())
    for k in range(len(ci)):
        r, c = int(rows[k]), int(ci[k])
        torch.testing.assert_close(dW[k].double(), full[r * b:(r + 1) * b, c * b:(c + 1) * b], **tol)


def test_launchers_refuse_block_sizes_they_do_not_implement(ext_required):
    vals, topo, _ = raw_bsr(16, 16, 4, 0.5, torch.float32, seed=0)
    x, dy = torch.randn(3, 16), torch.randn(3, 16)
    for bad in (2, 6, 66, 128, 0, -4):
        with pytest.raises(ValueError, match="block_size"):
            OPS.sddmm(dy, x, *topo, bad)
        with pytest.raises(ValueError, match="block_size"):
            OPS.conv2d_dw(torch.randn(1, 16, 2, 2), torch.randn(1, 4, 2, 2), *topo,
                          [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1], bad)
    with pytest.raises(TypeError, match="dtype"):
        OPS.spmm(x.to(torch.int64), vals, *topo, None)


# ---------------------------------------------------------------- geometry overflow

@pytest.mark.parametrize("stride,match", [((2**62, 2), "stride"), ((3, 2**62), "stride"),
                                           ((2**40, 2**40), "stride"), ((2**20, 2**20), "padded buffer")])
def test_extreme_conv_stride_is_refused(stride, match, ext_required):
    """stride_h*stride_w*Cin wrapped in int64, so the size check passed on a tiny
    buffer and the kernel read out of bounds. Every product is checked now."""
    sc = SparseConv2d(3, 4, 3, stride=stride, padding=1, density=0.5)
    with pytest.raises(ValueError, match=match):
        sc(torch.randn(2, 3, 8, 8))


def test_overflowing_geometry_through_the_ops_is_refused(ext_required):
    sc = SparseConv2d(3, 4, 3, padding=1, density=0.5)
    v, t = sc.topology.values.detach(), sc.topology.topology()
    x = torch.randn(2, 3, 8, 8)
    geom = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    for i, val, match in [(4, 2**62, "output size overflows"), (5, 2**63 - 1, "padded width overflows"),
                          (8, 2**62, "dilation"), (0, 2**62, "kernel"), (2, -1, "stride")]:
        g = list(geom)
        g[i] = val
        with pytest.raises(ValueError, match=match):
            OPS.conv2d(x, v, *t, None, g)
    with pytest.raises(ValueError, match="input size"):
        OPS.conv2d_dx(torch.randn(2, 4, 8, 8), v, *t, geom, [2, -3, 8, 8])
    with pytest.raises(ValueError, match="overflows|int32"):
        OPS.conv2d_dx(torch.randn(2, 4, 8, 8), v, *t, geom, [2**40, 3, 2**20, 8])


# ---------------------------------------------------------------- non-finite values

def _unfold_reference(w_masked, x, dy, stride, padding):
    """y, dx, dW of the conv summed over the weight's nonzeros and the in-bounds
    positions only (padding zeros enter as products with finite dy / x terms
    never with a weight): the semantics of nn.Conv2d's fp32 kernels."""
    cout = w_masked.shape[0]
    wf = w_masked.reshape(cout, -1)
    nz = wf != 0
    cols = F.unfold(x, w_masked.shape[2:], padding=padding, stride=stride)  # [N, K, P]
    # y[n, o, p] = sum over nonzero k of w[o, k] * cols[n, k, p]: no 0 * Inf from zero weights
    y = torch.stack([(wf[o, nz[o]][None, :, None] * cols[:, nz[o]]).sum(1) for o in range(cout)], 1)
    dyf = dy.reshape(dy.shape[0], cout, -1)
    dw = torch.where(nz, torch.einsum("nop,nkp->ok", dyf, cols), 0.0)
    return y, dw.reshape(w_masked.shape)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inf_weight_gives_no_nan_where_dense_is_finite(stride, dtype, threads, ext_required):
    """An Inf weight times a padding zero is NaN; nn.Conv2d skips padding. The sparse
    forward and dX must be finite wherever F.conv2d (fp32, padding skipped) is."""
    torch.manual_seed(stride)
    conv = nn.Conv2d(4, 6, 3, stride, 1)
    mask = torch.rand(6, 36) < 0.6
    mask[1, 2 * 9] = True
    with torch.no_grad():
        conv.weight.mul_(mask.view_as(conv.weight))
        conv.weight[1, 2, 0, 0] = float("inf")
        conv.weight[4, 0, 2, 2] = float("-inf") if mask[4, 8] else conv.weight[4, 0, 2, 2]
    sc = SparseConv2d.from_dense(conv, mask=mask).to(dtype)
    x = torch.randn(3, 4, 7, 7)
    xs = x.to(dtype).clone().requires_grad_()
    y = sc(xs)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd = x.clone().requires_grad_()  # fp32 oneDNN: skips padding
    yd = conv(xd)
    yd.backward(dy.float())
    assert torch.isfinite(yd).sum() > 0
    fin = torch.isfinite(yd)
    assert torch.isfinite(y[fin]).all(), "NaN/Inf where dense conv is finite"
    torch.testing.assert_close(y.float()[fin], yd[fin], rtol=1e-4, atol=1e-4)
    assert (torch.isnan(y) <= torch.isnan(yd)).all()
    fin = torch.isfinite(xd.grad)
    assert torch.isfinite(xs.grad[fin]).all()
    torch.testing.assert_close(xs.grad.float()[fin], xd.grad[fin], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N", [1, 6])  # shared padded copy, and images split over threads
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inf_input_gives_exact_dw(N, stride, dtype, threads, ext_required):
    """An Inf input once made the whole dW NaN: the kernel's invalid lanes (zero dy)
    read it. dW must equal the sum over in-bounds positions only."""
    torch.manual_seed(N + stride)
    conv = nn.Conv2d(4, 6, 3, stride, 1, bias=False, dtype=torch.float64)
    mask = torch.rand(6, 36) < 0.6
    with torch.no_grad():
        conv.weight.mul_(mask.view_as(conv.weight))
    sc = SparseConv2d.from_dense(conv, mask=mask).to(dtype)
    x = torch.randn(N, 4, 9, 7, dtype=torch.float64)
    x[0, 1, 0, 0] = float("inf")
    x[-1, 3, 4, 6] = float("-inf")
    xs = x.to(dtype).clone().requires_grad_()
    y = sc(xs)
    dy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(dy.to(dtype))
    y_r, dw_r = _unfold_reference(conv.weight.detach(), x, dy, stride, 1)
    torch.testing.assert_close(y.double().flatten(2), y_r, equal_nan=True, **TOL[dtype])
    dw = sc.topology.to_dense(values=sc.topology.values.grad).double().reshape(sc.weight_shape)
    torch.testing.assert_close(dw, dw_r, equal_nan=True, **TOL[dtype])
    assert torch.isfinite(dw).sum() > dw.numel() // 2


# ---------------------------------------------------------------- differential fuzz

@st.composite
def linear_cases(draw):
    layout, b = draw(st.sampled_from([("csr", 1), ("bsr", 4), ("bsr", 8), ("bsr", 16)]))
    out_b, in_b = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    M = draw(st.sampled_from([1, 2, 7, 8, 9, 31, 33, 64, 65, 130]))
    density = draw(st.sampled_from([0.0, 0.02, 0.2, 0.5, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return layout, b, M, out_b * b * (1 if b > 1 else draw(st.integers(1, 8))), in_b * b * (
        1 if b > 1 else draw(st.integers(1, 8))), density, dtype, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(linear_cases())
def test_fuzz_linear_ops_at_1_and_2_threads(case):
    from conftest import make_topology
    from test_ops import dense_reference
    layout, b, M, out_f, in_f, density, dtype, seed = case
    topo = make_topology(out_f, in_f, density, layout, b, dtype, empty_rows=(0,), seed=seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(M, in_f, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(out_f, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(M, out_f, generator=g, dtype=torch.float64).to(dtype)
    y_r, dx_r, dW_r, _ = dense_reference(x0, topo, bias, dy)
    for n in (1, 2):
        with num_threads(n):
            topo.values.grad = None
            x = x0.clone().requires_grad_()
            y = sk.sparse_linear(x, topo, bias)
            y.backward(dy)
            tol = TOL[dtype]
            torch.testing.assert_close(y.double(), y_r, **tol)
            torch.testing.assert_close(x.grad.double(), dx_r, **tol)
            torch.testing.assert_close(topo.to_dense(values=topo.values.grad).double(), dW_r, **tol)


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    H = draw(st.integers(max(1, (kh - 1) * dh + 1 - 2 * ph), 20))
    W = draw(st.integers(max(1, (kw - 1) * dw + 1 - 2 * pw), 40))
    N = draw(st.sampled_from([1, 2, 3, 5]))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return ((N, cin, cout, H, W, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups), density, dtype,
            draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(conv_cases())
def test_fuzz_conv_ops_at_1_and_2_threads(case):
    cfg, density, dtype, seed = case
    sc, x0 = make_conv(cfg, density, dtype=dtype, seed=seed, empty_row=seed % 2 == 0)
    dy = torch.randn(sc(x0.to(dtype)).shape, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(seed))
    y_r, dx_r, dw_r, _ = reference(sc, x0, dy)
    for n in (1, 2):
        with num_threads(n):
            sc.zero_grad()
            x = x0.to(dtype).clone().requires_grad_()
            y = sc(x)
            y.backward(dy.to(dtype))
            tol = TOL[dtype]
            torch.testing.assert_close(y.double(), y_r, **tol)
            torch.testing.assert_close(x.grad.double(), dx_r, **tol)
            dw = sc.topology.to_dense(values=sc.topology.values.grad).double().reshape(sc.weight_shape)
            torch.testing.assert_close(dw, dw_r, **tol)
