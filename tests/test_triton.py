"""Triton kernels (sparsekern.gpu) against the float64 masked-dense reference.

Without a GPU (CI): every test runs inside :func:`sparsekern.gpu.interpret.cuda_path_on_cpu`
(the ``on_gpu_path`` fixture): CPU tensors count as CUDA ones and every kernel runs under
TRITON_INTERPRET=1 (tests/conftest.py sets it) at small sizes, and the module tests run
the whole GPU path (module -> backend selection -> ops with autograd -> CUDA impls ->
launchers). With a GPU: the same tests at real sizes on CUDA, plus the GPU-only tests at
the bottom (opcheck, torch.compile, a sync-free rebuild).
fp16/bf16 errors are bounded by twice PyTorch's own error at that precision.
"""
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.dst.rebuild import active_positions, update_topology
from sparsekern.formats import CSRTopology
from sparsekern.gpu import INTERPRET, launch, schedule, tuning
from sparsekern.gpu.tuning import LaunchConfig
from tests.conftest import assert_gpu_path, make_linear, make_topology, stable_seed

pytestmark = pytest.mark.usefixtures("on_gpu_path")

ON_GPU = torch.cuda.is_available() and not INTERPRET
DEV = "cuda" if ON_GPU else "cpu"
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the lent GPU)")

# (out_features, in_features, batch rows): odd sizes; real sizes on a GPU.
SHAPES = {
    "csr": (37, 53, 35) if not ON_GPU else (1000, 1536, 333),
    16: (48, 80, 21) if not ON_GPU else (1024, 768, 517),
    32: (96, 128, 19) if not ON_GPU else (1024, 768, 517),
    64: (128, 128, 17) if not ON_GPU else (1024, 1024, 517),
}
LAYOUTS = [("csr", 1), ("bsr", 16), ("bsr", 32), ("bsr", 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def topo_on(out_f, in_f, density, layout, b, empty_rows=(1,)):
    """A fresh random topology on DEV, with at least one entry when density > 0."""
    while True:
        t = make_topology(out_f, in_f, density, layout, b, empty_rows=empty_rows).to(DEV)
        if t.nnz or density == 0:
            return t


def rel_err(got, ref):
    scale = ref.abs().max().clamp_min(1e-30)
    return ((got.double() - ref).abs().max() / scale).item()


def check_close(got, ref, torch_lp, dtype):
    """fp32: a fixed bound; fp16/bf16: at most 2x PyTorch's own error (``torch_lp``)."""
    assert got.dtype == dtype and got.shape == ref.shape
    if ref.numel() == 0:
        return
    err = rel_err(got, ref)
    if dtype == torch.float32:
        assert err < 2e-5, err
    else:
        bound = 2 * rel_err(torch_lp, ref) + 1e-7
        assert err <= bound, (err, bound)


def run_all(topo, dtype, M, lead=()):
    """Forward (with bias), dX and dW of the Triton kernels and of the references."""
    b = topo.block_size
    out_f, in_f = topo.shape
    v64 = topo.values.detach().double()
    t = topo.topology()
    x = torch.randn(*lead, M, in_f, dtype=torch.float64, device=DEV)
    dy = torch.randn(*lead, M, out_f, dtype=torch.float64, device=DEV)
    bias = torch.randn(out_f, dtype=torch.float64, device=DEV)
    lp = lambda z: z.to(dtype)  # noqa: E731
    got = (launch.spmm(lp(x), lp(v64), *t, lp(bias)), launch.spmm_t(lp(dy), lp(v64), *t),
           launch.sddmm(lp(dy), lp(x), *t, b))
    ref = (sk.ops.reference.spmm(x, v64, *t, bias), sk.ops.reference.spmm_t(dy, v64, *t),
           sk.ops.reference.sddmm(dy, x, *t, b))
    # PyTorch's own computation at this precision, on the masked dense weight.
    W = topo.to_dense(dtype=torch.float64, values=v64)
    mask = topo.mask()
    dw_dense = (lp(dy).reshape(-1, out_f).t() @ lp(x).reshape(-1, in_f))
    dw_lp = CSRTopology.from_mask(mask, dw_dense.float()).values.to(dtype) if b == 1 else \
        sk.BSRTopology.from_mask(mask, b, dw_dense.float()).values.to(dtype)
    torch_lp = (F.linear(lp(x), lp(W), lp(bias)), lp(dy) @ lp(W), dw_lp)
    return got, ref, torch_lp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_kernels_match_reference(layout, b, dtype):
    out_f, in_f, M = SHAPES["csr" if b == 1 else b]
    topo = topo_on(out_f, in_f, 0.3, layout, b)
    assert topo.row_offsets[2] == topo.row_offsets[1], "row 1 must be empty"
    got, ref, torch_lp = run_all(topo, dtype, M)
    for g, r, t in zip(got, ref, torch_lp):
        check_close(g, r, t, dtype)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("layout,b", LAYOUTS[:2])
def test_density_zero_and_one(layout, b, density):
    out_f, in_f, M = SHAPES["csr" if b == 1 else b]
    topo = topo_on(out_f, in_f, density, layout, b, empty_rows=())
    assert topo.density == density
    got, ref, torch_lp = run_all(topo, torch.float32, M)
    for g, r, t in zip(got, ref, torch_lp):
        check_close(g, r, t, torch.float32)
    if density == 0:   # the forward is exactly the bias
        x = torch.randn(3, in_f, device=DEV)
        bias = torch.randn(out_f, device=DEV)
        assert torch.equal(launch.spmm(x, topo.values.detach().float(), *topo.topology(), bias),
                           bias.expand(3, -1))


@pytest.mark.parametrize("layout,b", LAYOUTS[:2])
def test_batch_one_and_leading_dims(layout, b):
    out_f, in_f, _ = SHAPES["csr" if b == 1 else b]
    topo = topo_on(out_f, in_f, 0.4, layout, b)
    for lead, M in (((), 1), ((2, 3), 5)):
        got, ref, torch_lp = run_all(topo, torch.float32, M, lead)
        assert got[0].shape == (*lead, M, out_f) and got[1].shape == (*lead, M, in_f)
        for g, r, t in zip(got, ref, torch_lp):
            check_close(g, r, t, torch.float32)


def test_csr_long_rows_are_split_and_summed_with_atomics():
    """A row far longer than the mean is cut into segments whose partial sums meet in fp32."""
    out_f, in_f, M = SHAPES["csr"]
    mask = torch.rand(out_f, in_f) < 0.1
    mask[3] = True                                     # one full row: many segments
    mask[5] = False                                    # and an empty one
    topo = CSRTopology.from_mask(mask, torch.randn(out_f, in_f, dtype=torch.float64)).to(DEV)
    cfg = LaunchConfig(block_m=16, block_r=8, seg_mult=1.0)
    sch = schedule.csr_schedule(topo.row_offsets, topo.col_indices,
                                max(16, 1 << (int(topo.nnz / out_f) - 1).bit_length()), 8)
    assert sch.split
    lens = sch.seg_len.tolist()
    assert lens == sorted(lens, reverse=True), "segments must be ordered longest first"
    x = torch.randn(M, in_f, dtype=torch.float64, device=DEV)
    bias = torch.randn(out_f, dtype=torch.float64, device=DEV)
    for dtype in (torch.float32, torch.bfloat16):
        v = topo.values.detach()
        y = launch.spmm(x.to(dtype), v.to(dtype), *topo.topology(), bias.to(dtype), config=cfg)
        ref = sk.ops.reference.spmm(x, v, *topo.topology(), bias)
        torch_lp = F.linear(x.to(dtype), topo.to_dense().to(dtype), bias.to(dtype))
        check_close(y, ref, torch_lp, dtype)


@pytest.mark.parametrize("layout,b", LAYOUTS[:3])
def test_sddmm_batch_split_matches_unsplit(layout, b):
    out_f, in_f, M = SHAPES["csr" if b == 1 else b]
    topo = topo_on(out_f, in_f, 0.3, layout, b)
    dy = torch.randn(M, out_f, device=DEV)
    x = torch.randn(M, in_f, device=DEV)
    ref = sk.ops.reference.sddmm(dy.double(), x.double(), *topo.topology(), b)
    cfg = LaunchConfig(block_m=16, block_nz=32)
    one = launch.sddmm(dy, x, *topo.topology(), b, config=cfg, split=1)
    three = launch.sddmm(dy, x, *topo.topology(), b, config=cfg, split=3)
    for got in (one, three):
        assert rel_err(got, ref) < 2e-5


def test_untuned_configs_still_run_correctly():
    """Launch parameters change speed only: odd tile choices give the same results."""
    out_f, in_f, M = SHAPES["csr"]
    topo = topo_on(out_f, in_f, 0.3, "csr", 1)
    x = torch.randn(M, in_f, device=DEV)
    ref = sk.ops.reference.spmm(x.double(), topo.values.detach().double(), *topo.topology())
    dy = torch.randn(M, out_f, device=DEV)
    dw_ref = sk.ops.reference.sddmm(dy.double(), x.double(), *topo.topology(), 1)
    dx_ref = sk.ops.reference.spmm_t(dy.double(), topo.values.detach().double(), *topo.topology())
    for cfg in (LaunchConfig(block_m=16, block_r=4), LaunchConfig(block_m=32, block_r=32, seg_mult=0.5),
                LaunchConfig(block_m=16, block_r=8, block_nz=16, transpose_dense=True)):
        y = launch.spmm(x, topo.values.detach().float(), *topo.topology(), config=cfg)
        assert rel_err(y, ref) < 2e-5
        dx = launch.spmm_t(dy, topo.values.detach().float(), *topo.topology(), config=cfg)
        assert rel_err(dx, dx_ref) < 2e-5
        for split in (1, 2):
            assert rel_err(launch.sddmm(dy, x, *topo.topology(), 1, config=cfg, split=split), dw_ref) < 2e-5


def test_cache_follows_an_in_place_topology_rebuild():
    """The DST engine rewrites the index tensors in place; schedules must follow."""
    out_f, in_f, M = SHAPES["csr"]
    for layout, b in LAYOUTS[:2]:
        topo = topo_on(out_f if b == 1 else 48, in_f if b == 1 else 80, 0.3, layout, b)
        x = torch.randn(M, topo.shape[1], device=DEV)
        launch.spmm(x, topo.values.detach().float(), *topo.topology())  # fills the cache
        pos = active_positions(topo)
        R, C = topo.shape[0] // b, topo.shape[1] // b
        free = torch.ones(R * C, dtype=torch.bool, device=DEV)
        free[pos] = False
        drop = torch.zeros(pos.numel(), dtype=torch.bool, device=DEV)
        k = max(1, pos.numel() // 2)
        drop[:k] = True                                                   # rows shift: offsets change
        grow = torch.nonzero(free).flatten()[-k:]
        update_topology(topo, drop, grow)
        with torch.no_grad():
            topo.values.normal_()
        y = launch.spmm(x, topo.values.detach().float(), *topo.topology())
        ref = sk.ops.reference.spmm(x.double(), topo.values.detach().double(), *topo.topology())
        assert rel_err(y, ref) < 2e-5


def test_refusals_name_the_reason():
    topo = make_topology(32, 32, 0.5, "bsr", 4)
    x = torch.randn(2, 32)
    with pytest.raises(NotImplementedError, match="block_size 4"):
        launch.spmm(x, topo.values.detach().float(), *topo.topology())
    csr = make_topology(8, 8, 0.5, "csr")
    with pytest.raises(NotImplementedError, match="dtype torch.float64"):
        launch.spmm(torch.randn(2, 8, dtype=torch.float64), csr.values.detach(), *csr.topology())
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 8\]"):
        launch.spmm(torch.randn(2, 9), csr.values.detach().float(), *csr.topology())
    with pytest.raises(TypeError, match="dense operand is torch.float16"):
        launch.spmm(torch.randn(2, 8, dtype=torch.float16), csr.values.detach().float(), *csr.topology())
    with pytest.raises(ValueError, match="bias"):
        launch.spmm(torch.randn(2, 8), csr.values.detach().float(), *csr.topology(), torch.randn(7))


def test_malformed_topology_is_refused_before_any_kernel():
    csr = make_topology(8, 8, 0.5, "csr")
    ro, ci, to, ti, tp = (t.clone() for t in csr.topology())
    v = csr.values.detach().float()
    bad = ci.clone()
    bad[0] = 99
    with pytest.raises(ValueError, match=r"col_indices\[0\]=99 is out of range"):
        launch.spmm(torch.randn(2, 8), v, ro, bad, to, ti, tp)
    bad_ro = ro.clone()
    bad_ro[-1] += 1
    with pytest.raises(ValueError, match="row_offsets"):
        launch.spmm_t(torch.randn(2, 8), v, bad_ro, ci, to, ti, tp)
    with pytest.raises(ValueError, match="t_perm"):
        launch.sddmm(torch.randn(2, 8), torch.randn(2, 8), ro, ci, to, ti, tp.flip(0), 1)


def test_tuning_table_lookup():
    assert tuning.density_bucket(0.09) == 0.1 and tuning.density_bucket(0.025) == 0.02
    cfg = tuning.lookup("spmm", 64, 0.1, torch.bfloat16)
    assert cfg == tuning.TABLE[("spmm", 64, None, "bf16")]
    assert tuning.lookup("spmm", 1, 0.02, torch.float16) == tuning.TABLE[("spmm", 1, 0.02, "f16")]
    assert tuning.lookup("spmm", 16, 0.1, torch.float16, interpret=True).block_m == 16
    assert tuning.sddmm_split(8192, 10, 64, 528) == 53
    assert tuning.sddmm_split(10, 1000, 64, 528) == 1


# ------------------------------------------- the whole GPU path (GPU, or interpreter)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_module_forward_backward_through_the_ops(layout, b, dtype):
    """SparseLinear -> sparse_linear -> torch.ops.sparsekern with autograd -> the CUDA impls
    -> launchers, built by the same helper as the CPU tests (sparsekern.testing)."""
    out_f, in_f, M = SHAPES["csr" if b == 1 else b]
    layer = make_linear(in_f, out_f, layout, b, density=0.1 if ON_GPU else 0.25, seed=stable_seed(layout, b),
                        device=DEV, dtype=dtype)
    assert layer.nnz > 0 and layer.topology.block_size == b
    x = torch.randn(M, in_f, device=DEV, dtype=dtype, requires_grad=True)
    assert_gpu_path(sk.select_backend(x, layer.topology.values).name)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = layer.topology
    x64 = x.detach().double().requires_grad_()
    v64 = w.values.detach().double().requires_grad_()
    b64 = layer.bias.detach().double().requires_grad_()
    y64 = sk.ops.reference.spmm(x64, v64, *w.topology(), b64)
    y64.backward(dy.double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((y, y64), (x.grad, x64.grad), (w.values.grad, v64.grad), (layer.bias.grad, b64.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < tol


# ------------------------------------------------------------------ GPU only
@gpu_only
@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 16)])
def test_gpu_opcheck_and_compile(layout, b):
    topo = topo_on(64, 96, 0.3, layout, b)
    v = topo.values.detach().float().requires_grad_()
    x = torch.randn(7, 96, device=DEV, requires_grad=True)
    dy = torch.randn(7, 64, device=DEV)
    bias = torch.randn(64, device=DEV, requires_grad=True)
    t = topo.topology()
    ops = torch.ops.sparsekern
    torch.library.opcheck(ops.spmm.default, (x, v, *t, bias))
    torch.library.opcheck(ops.spmm_t.default, (dy, v, *t))
    torch.library.opcheck(ops.sddmm.default, (dy, x.detach(), *t, b))
    f = torch.compile(lambda a: ops.spmm(a, v, *t, bias), fullgraph=True)
    assert rel_err(f(x), sk.ops.reference.spmm(x.double(), v.double(), *t, bias.double())) < 2e-5


@gpu_only
def test_gpu_rebuild_reads_nothing_back_per_nonzero():
    topo = topo_on(4096, 4096, 0.05, "csr", 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        from sparsekern.formats import transpose_metadata
        t = transpose_metadata(topo.row_offsets, topo.col_indices, 4096)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got, want in zip(t, topo.topology()[2:]):
        assert torch.equal(got, want)
