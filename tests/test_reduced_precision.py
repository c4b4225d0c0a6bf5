"""bfloat16 / float16 on the CPU kernels, and torch.autocast.

Every result (forward, dX, dW) is compared with a float64 masked-dense reference
on the same float64 inputs, and its error must stay within 2x the error of
PyTorch's own dense op at that precision (``F.linear``/``F.conv2d`` on the rounded
operands, or ``nn.Linear``/``nn.Conv2d`` under the same autocast), at 1 and 2 threads.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsekern as sk
from sparsekern.testing import make_conv, make_linear, make_topology

from conftest import num_threads

REDUCED = [torch.bfloat16, torch.float16]
CASES = {
    "linear-csr": lambda: (make_linear(67, 45, "csr", density=0.3, seed=11, dtype=torch.float64), (33, 67)),
    "linear-bsr8": lambda: (make_linear(64, 48, "bsr", 8, density=0.4, seed=12, dtype=torch.float64), (5, 64)),
    "linear-batch1": lambda: (make_linear(40, 24, "csr", density=0.5, seed=13, dtype=torch.float64), (1, 40)),
    "conv-csr": lambda: (make_conv(6, 10, 3, "csr", density=0.4, padding=1, seed=14, dtype=torch.float64),
                         (2, 6, 9, 8)),
    "conv-bsr4-stride2": lambda: (make_conv(8, 8, 1, "bsr", 4, density=0.5, stride=2, seed=15,
                                            dtype=torch.float64), (3, 8, 7, 7)),
}


def dense_weight(layer):
    w = layer.topology.to_dense()
    return w if isinstance(layer, sk.SparseLinear) else w.reshape(layer.weight_shape)


def dense_op(layer, x, w, b):
    if isinstance(layer, sk.SparseLinear):
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def results(fn, x, w, b, dy):
    """y, dX, dW (dense) of fn on leaf copies of x, w, b."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, b)
    gx, gw = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    return y.double(), gx.double(), gw.double()


def errors(got, ref, mask):
    return [(g - r).abs().max().item() if i < 2 else ((g - r) * mask).abs().max().item()
            for i, (g, r) in enumerate(zip(got, ref))]


def sparse_results(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy.to(y.dtype))
    gw = layer.topology.to_dense(values=layer.topology.values.grad.to(layer.topology.values.dtype))
    gw = gw if isinstance(layer, sk.SparseLinear) else gw.reshape(layer.weight_shape)
    return y, x.grad, gw


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_reduced_precision_error_within_twice_torchs(case, dtype, threads):
    check_error_within_twice_torchs(case, dtype, threads)


@pytest.mark.parametrize("route", ["direct", "im2col"])
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("conv")])
def test_reduced_precision_conv_on_both_routes(case, dtype, route, threads, monkeypatch):
    """The im2col route runs bf16/fp16 through the native linear tiles, the direct route
    through fp32 copies: both within the bound, every op forced onto each route."""
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ROUTE", route)
    check_error_within_twice_torchs(case, dtype, threads)


def check_error_within_twice_torchs(case, dtype, threads):
    layer, shape = CASES[case]()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    w, b = dense_weight(layer), layer.bias.detach()
    mask = (w != 0).double()
    dy = torch.randn(dense_op(layer, x, w, b).shape, dtype=torch.float64, generator=gen)
    ref = results(lambda x, w, b: dense_op(layer, x, w * mask, b), x, w, b, dy)
    torch_err = errors(results(lambda x, w, b: dense_op(layer, x, w, b), x.to(dtype), w.to(dtype),
                               b.to(dtype), dy), ref, mask)

    low = layer.to(dtype)
    y, gx, gw = sparse_results(low, x.to(dtype), dy)
    assert y.dtype == gx.dtype == low.topology.values.grad.dtype == dtype
    ours = errors((y.double(), gx.double(), gw.double()), ref, mask)
    for what, e, t in zip(("y", "dX", "dW"), ours, torch_err):
        assert e <= 2 * t + 1e-6, f"{what}: error {e:.3g} vs torch's {t:.3g} ({dtype}, {threads} threads)"


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("case", ["linear-csr", "conv-csr", "conv-bsr4-stride2"])
def test_autocast_runs_the_sparse_kernels_in_the_autocast_dtype(case, dtype, threads):
    layer, shape = CASES[case]()
    layer = layer.float()
    dense = (torch.nn.Linear(layer.in_features, layer.out_features) if isinstance(layer, sk.SparseLinear)
             else torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, layer.dilation, layer.groups))
    with torch.no_grad():
        dense.weight.copy_(dense_weight(layer))
        dense.bias.copy_(layer.bias)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        y_dense = dense(x)
        y = layer(x)
    assert y.dtype == y_dense.dtype == dtype                 # autocast's rule for linear and conv
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy.to(dtype))
    y_dense.backward(dy.to(dtype))
    v = layer.topology.values
    assert v.dtype == v.grad.dtype == torch.float32          # the master values stay fp32
    mask = (dense_weight(layer) != 0).double()
    wr = (dense.weight.detach().double() * mask).requires_grad_(True)
    ref = dense_op(layer, x.double(), wr, layer.bias.detach().double())
    ref.backward(dy.double())
    err, err_torch = (y.double() - ref).abs().max(), (y_dense.double() - ref).abs().max()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    gw = layer.topology.to_dense(values=v.grad)
    gw = gw if isinstance(layer, sk.SparseLinear) else gw.reshape(layer.weight_shape)
    gw_err = ((gw.double() - wr.grad) * mask).abs().max()
    gw_err_torch = ((dense.weight.grad.double() - wr.grad) * mask).abs().max()
    assert gw_err <= 2 * gw_err_torch + 1e-6, (gw_err, gw_err_torch)


def test_half_and_bfloat16_modules_and_the_errors_that_name_the_dtype():
    layer = make_linear(16, 8, "csr", density=0.5, seed=5)
    x = torch.randn(3, 16)
    assert layer.half()(x.half()).dtype == torch.float16
    assert layer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the weight's values are torch.bfloat16"):
        layer(x)
    v = layer.topology.values
    with pytest.raises(TypeError, match="x has dtype Float but values have dtype BFloat16"):
        torch.ops.sparsekern.spmm(x, v, *layer.topology.topology(), None)
    with pytest.raises(TypeError, match="dy has dtype Half but x have dtype BFloat16"):
        torch.ops.sparsekern.sddmm(torch.randn(3, 8).half(), x.bfloat16(), *layer.topology.topology(), 1)
    with pytest.raises(NotImplementedError, match="dtype torch.int32 not in"):
        sk.select_backend(x.int(), v.int())


# ------------------------------------------------------- native 16-bit tiles, every path
# The linear kernels keep bf16/fp16 tiles and widen them in registers (csrc/cpu/tile_lanes.h),
# or, for bf16 on CPUs with AVX512-BF16, multiply them pairwise with vdpbf16ps
# (tile_kernels_bf16dot.h). Against the fp32 kernels on the same (16-bit) inputs:
# - every path: within one step of the dtype of the fp32 result, plus an fp32-reordering
#   term of 2^-16 of the sum of |terms| (the sums may run in another order; a missing,
#   doubled or misplaced term is far outside this);
# - the widening path's y sums in the fp32 kernels' order: equal, rounded once. (dX does
#   not: at two tiles per thread fp32 takes the scatter form, 16-bit the gather form.)
# The fp32 kernels are checked against float64 in test_ops.py, the error bound against
# torch above.

DOT_SETTINGS = ["0", "1"] if sk.cpu_bf16_dot_supported() else ["0"]


@st.composite
def native_cases(draw):
    layout, b = draw(st.sampled_from([("csr", 1), ("bsr", 4), ("bsr", 8), ("bsr", 16), ("bsr", 32)]))
    mult = 1 if b > 1 else draw(st.integers(1, 9))
    out_f = draw(st.integers(1, 6)) * b * mult
    in_f = draw(st.integers(1, 6)) * b * (1 if b > 1 else draw(st.integers(1, 9)))
    M = draw(st.sampled_from([1, 3, 8, 9, 31, 33, 64, 130, 257]))
    return (layout, b, M, out_f, in_f, draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
            draw(st.sampled_from(REDUCED)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


def within_reordering(got, want32, abs_sum, dtype):
    fi = torch.finfo(dtype)
    w = want32.to(dtype).double()
    bound = w.abs() * fi.eps + fi.tiny * fi.eps + abs_sum * 2.0**-16
    return bool(((got.double() - w).abs() <= bound).all())


@pytest.mark.parametrize("dot", DOT_SETTINGS, ids=lambda d: f"bf16dot{d}")
def test_native_16bit_kernels_match_the_fp32_kernels(dot, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CPU_BF16_DOT", dot)

    @settings(max_examples=80, deadline=None, derandomize=True)
    @given(native_cases())
    def check(case):
        layout, b, M, out_f, in_f, density, dtype, x_transposed, seed = case
        topo = make_topology(out_f, in_f, density, layout, b, dtype, empty_rows=(0,), seed=seed)
        meta = topo.topology()
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(M, in_f, generator=g).to(dtype)
        if x_transposed:  # a [in, M] buffer read through its transpose: the packing's copy path
            x = x.t().contiguous().t()
        dy = torch.randn(M, out_f, generator=g).to(dtype)
        bias = torch.randn(out_f, generator=g).to(dtype)
        v = topo.values.detach()
        W = topo.to_dense().double().abs()
        abs_sums = (x.double().abs() @ W.t() + bias.double().abs(), dy.double().abs() @ W,
                    topo.to_dense(values=torch.ones_like(v)).double().ne(0)
                    * (dy.double().abs().t() @ x.double().abs()))
        ops = torch.ops.sparsekern
        v32 = v.float()
        for n in (1, 2):
            with num_threads(n):
                got = (ops.spmm(x, v, *meta, bias), ops.spmm_t(dy, v, *meta), ops.sddmm(dy, x, *meta, b))
                want = (ops.spmm(x.float(), v32, *meta, bias.float()), ops.spmm_t(dy.float(), v32, *meta),
                        ops.sddmm(dy.float(), x.float(), *meta, b))
            got_dw = topo.to_dense(values=got[2]).double()
            want_dw = topo.to_dense(values=want[2])
            for what, g_, w, a in zip(("y", "dX", "dW"), (got[0], got[1], got_dw), (want[0], want[1], want_dw),
                                      abs_sums):
                assert got[("y", "dX", "dW").index(what)].dtype == dtype, what
                assert within_reordering(g_, w, a, dtype), f"{what}: {case}, {n} threads"
            if dot == "0" or dtype == torch.float16:
                assert torch.equal(got[0], want[0].to(dtype)), f"y: {case}, {n} threads"

    check()


@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 16)])
def test_each_bf16_op_takes_the_path_the_switch_names(layout, b, monkeypatch):
    """On a CPU with AVX512-BF16 both bf16 paths of every op must run (a switch that does
    nothing would make the test above compare one path with itself): vdpbf16ps reads bf16
    subnormals as zero and the widening path does not, so subnormal activations times huge
    values give exact zeros on one path and nonzeros on the other. Forward, dX through W^T
    (the gather form: 2 threads over 3 tiles) and dW; on normal data the paths agree closely."""
    if not sk.cpu_bf16_dot_supported():
        pytest.skip("this CPU (or build) has no AVX512-BF16 kernels")
    topo = make_topology(512, 768, 0.3, layout, b, torch.bfloat16, seed=7)
    meta = topo.topology()
    ops = torch.ops.sparsekern

    def run(v, x, dy):
        with num_threads(2):
            return ops.spmm(x, v, *meta, None), ops.spmm_t(dy, v, *meta), ops.sddmm(dy, x, *meta, b)

    tiny = torch.full((96, 768), 1e-39).bfloat16()  # subnormal in bf16
    assert 0 < tiny[0, 0].float().abs() < torch.finfo(torch.bfloat16).tiny
    huge_v = torch.full_like(topo.values.detach(), 2.0**100)
    huge_x = torch.full((96, 768), 2.0**100).bfloat16()
    x, dy = torch.randn(96, 768).bfloat16(), torch.randn(96, 512).bfloat16()
    outs = {}
    for dot in ("0", "1"):
        monkeypatch.setenv("SPARSEKERN_CPU_BF16_DOT", dot)
        y, _, _ = run(huge_v, tiny, tiny[:, :512])
        _, dx, _ = run(huge_v, tiny, tiny[:, :512])
        _, _, dw = run(huge_v, huge_x, tiny[:, :512])
        for what, t in (("y", y), ("dX", dx), ("dW", dw)):
            nonzero = bool(t.ne(0).any())
            assert nonzero == (dot == "0"), f"{what}: SPARSEKERN_CPU_BF16_DOT={dot} took the other path"
        outs[dot] = run(topo.values.detach(), x, dy)
    for what, a, c in zip(("y", "dX", "dW"), outs["0"], outs["1"]):
        torch.testing.assert_close(a, c, rtol=2**-7, atol=2e-2, msg=what)


TIES = {  # pairs (a, b), rounded to the dtype as inputs, whose fp32 sums need rounding
    torch.bfloat16: [(1.0, 2**-8), (1.0078125, 2**-8), (-1.0, -2**-8), (3.0, 2**-7), (256.0, 1.0),
                     (3.3895e38, 3.3895e38)],
    torch.float16: [(1.0, 2**-11), (1.0009765625, 2**-11), (-1.0, -2**-11), (2048.0, 1.0),
                    (65504.0, 16.0), (65504.0, 8.0), (2**-14, 2**-25), (2**-24, 2**-25)],
}
SUBNORMAL_BF16 = [(1e-38, 1e-40), (2**-126, 2**-134)]  # bf16 subnormal inputs or sums
SPECIAL = [(float("inf"), 1.0), (-float("inf"), 1.0), (float("inf"), -float("inf")),
           (float("nan"), 1.0), (0.0, -0.0), (7.0, 0.5), (-1.5, 0.25)]


@pytest.mark.parametrize("dot", DOT_SETTINGS, ids=lambda d: f"bf16dot{d}")
@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_rounding_of_the_native_stores_is_torchs(dtype, dot, monkeypatch):
    """Sums at rounding ties, at overflow, subnormal and non-finite, rounded by the kernels'
    vector stores (the 8x8 transposed blocks and the ragged edge) agree with torch's cast of
    the same fp32 sums bit for bit, NaN as NaN. The AVX512-BF16 path reads bf16 subnormals as
    zero and flushes subnormal sums (vdpbf16ps's DAZ/FTZ, as oneDNN's bf16 matmul on the same
    CPUs): subnormal cases are checked on the widening path only."""
    monkeypatch.setenv("SPARSEKERN_CPU_BF16_DOT", dot)
    pairs = TIES[dtype] + SPECIAL + (SUBNORMAL_BF16 if dtype == torch.bfloat16 and dot == "0" else [])
    a = torch.tensor([p[0] for p in pairs]).to(dtype)
    b = torch.tensor([p[1] for p in pairs]).to(dtype)
    k = len(pairs)
    x = torch.cat([a, b]).repeat(19, 1)  # 19 rows: two 8x8 blocks and a ragged edge
    w = torch.cat([torch.eye(k), torch.eye(k)], 1)  # y[:, j] = x[:, j] + x[:, k + j]
    topo = sk.CSRTopology.from_dense(w)
    y = torch.ops.sparsekern.spmm(x, topo.values.detach().to(dtype), *topo.topology(), None)
    want = (a.float() + b.float()).to(dtype).repeat(19, 1)
    assert not torch.equal(want.float(), (a.float() + b.float()).repeat(19, 1))  # rounding happened
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])
