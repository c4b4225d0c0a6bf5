"""The GPU router (sparsekern/gpu/route.py): which kernels run, and the host-side glue of
the CUDA C++ path (transposes, t_perm, row order, 16-bit column indices).

The C++ kernels themselves run only on a GPU. Here the router drives a stand-in with
the exact semantics of the ``sparsekern_cuda`` ops (csrc/cuda/sparse_cuda.cpp), so
everything around the kernels is checked against the float64 reference on CPU.
"""
import pytest
import torch

from sparsekern.formats import CSRTopology, row_ids
from sparsekern.gpu import INTERPRET, route
from sparsekern.ops import reference as ref
from sparsekern.ops.backends import select
from tests.conftest import make_topology

interp_only = pytest.mark.skipif(not INTERPRET, reason="drives CPU tensors through the GPU glue (interpreter mode)")
pytestmark = pytest.mark.usefixtures("on_gpu_path")       # CPU tensors count as CUDA ones here
cpp_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and route.cpp_ops() is not None),
                             reason="needs a CUDA GPU and the built CUDA C++ kernels")


class StandInCpp:
    """torch versions of csr_spmm_t / csr_sddmm_t, as documented in csrc/cuda/sparse_cuda.cpp."""
    calls: list = []

    @staticmethod
    def _cols(indices):
        return indices.long() & 0xFFFF if indices.dtype == torch.int16 else indices.long()

    @classmethod
    def csr_spmm_t(cls, b_t, values, offsets, indices, perm, order, bias, relu, tensor_cores):
        cls.calls.append(("spmm", indices.dtype, perm is not None, tensor_cores))
        assert b_t.is_contiguous() and order.dtype == torch.int32 and order.numel() == offsets.numel() - 1
        lens = (offsets[1:] - offsets[:-1])[order.long()]
        assert bool((lens[1:] <= lens[:-1]).all()), "rows must come longest first"
        cols = cls._cols(indices)
        v = values[perm.long()] if perm is not None else values
        R = offsets.numel() - 1
        out = torch.zeros(R, b_t.shape[1], dtype=torch.float64).index_add_(
            0, row_ids(offsets, cols.numel()), b_t[cols].double() * v.double()[:, None])
        if bias is not None:
            out += bias.double()[:, None]
        return (out.clamp_min(0) if relu else out).to(b_t.dtype)

    @classmethod
    def csr_sddmm_t(cls, a_t, b_t, rows, cols):
        cls.calls.append(("sddmm", cols.dtype))
        return (a_t[rows.long()].double() * b_t[cls._cols(cols)].double()).sum(1).to(a_t.dtype)


@pytest.fixture
def cpp_built(monkeypatch):
    """The stand-in as if the C++ kernels were built and ran on these (CPU) tensors; what they
    declare (CSR only, f16/bf16/f32) still applies."""
    StandInCpp.calls = []
    monkeypatch.setattr(route, "cpp_ops", lambda: StandInCpp)
    monkeypatch.setattr(route, "cpp_runtime_reasons", lambda device: [])
    return StandInCpp


@pytest.fixture
def cpp(cpp_built, monkeypatch):
    """... and opted in to (SPARSEKERN_GPU_BACKEND=cuda), as they are not verified on a GPU yet."""
    monkeypatch.setenv(route.ENV, "cuda")
    return cpp_built


@interp_only
@pytest.mark.parametrize("shape", [(6, 40000), (3, 70000), (37, 53)], ids=["idx16-high-cols", "idx32", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_path_glue_matches_reference(cpp, shape, dtype):
    out_f, in_f = shape
    mask = torch.rand(out_f, in_f) < min(1.0, 40 / in_f)
    mask[0, -3:] = True                                   # columns >= 32768 when in_f = 40000
    mask[1] = False                                       # an empty row
    topo = CSRTopology.from_mask(mask, torch.randn(out_f, in_f, dtype=torch.float64))
    t, v = topo.topology(), topo.values.detach()
    x = torch.randn(2, 5, in_f, dtype=torch.float64)
    dy = torch.randn(2, 5, out_f, dtype=torch.float64)
    bias = torch.randn(out_f, dtype=torch.float64)
    y = route.spmm(x.to(dtype), v.to(dtype), *t, bias.to(dtype))
    dx = route.spmm_t(dy.to(dtype), v.to(dtype), *t)
    dw = route.sddmm(dy.to(dtype), x.to(dtype), *t, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((y, ref.spmm(x, v, *t, bias)), (dx, ref.spmm_t(dy, v, *t)), (dw, ref.sddmm(dy, x, *t, 1))):
        assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
        assert ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item() < tol
    narrow = torch.int16 if in_f <= 65536 else torch.int32
    assert cpp.calls[0][:3] == ("spmm", narrow, False) and cpp.calls[1][2] is True      # dX reads via t_perm
    assert cpp.calls[0][3] == (dtype != torch.float32 and topo.density >= route.TENSOR_CORE_MIN_DENSITY)
    assert cpp.calls[2] == ("sddmm", narrow)


@interp_only
def test_auto_keeps_csr_on_triton_until_the_cpp_kernels_are_verified(cpp_built, monkeypatch):
    """The verified path by default: built C++ kernels run only when opted in to, or once
    route.CUDA_CPP_VERIFIED_BY records a passing scripts/gpu_check.sh run."""
    monkeypatch.delenv(route.ENV, raising=False)
    bsr = make_topology(32, 32, 0.5, "bsr", 16, dtype=torch.float32)
    csr = make_topology(8, 8, 0.5, "csr", dtype=torch.float32)
    cpu = torch.device("cpu")
    assert route.CUDA_CPP_VERIFIED_BY is None, "set only by a passing GPU check (and committed with its results)"
    assert route.choose(csr.values, cpu) == "triton" and route.choose(bsr.values, cpu) == "triton"
    x = torch.randn(3, 8)
    route.spmm(x, csr.values.detach(), *csr.topology())
    assert cpp_built.calls == []                                   # auto ran Triton, not the C++ kernels
    with pytest.raises(NotImplementedError, match="cuda_cpp: not verified on a GPU yet"):
        select(cpu, torch.float32, 1, among=("cuda_cpp",))         # the refusal says why
    monkeypatch.setenv(route.ENV, "cuda")                          # the opt-in
    assert route.choose(csr.values, cpu) == "cuda_cpp"
    monkeypatch.setenv(route.ENV, "auto")
    monkeypatch.setattr(route, "CUDA_CPP_VERIFIED_BY", "benchmarks/results/gpu_check/2026-12-01_h200")
    assert route.choose(csr.values, cpu) == "cuda_cpp" and route.choose(bsr.values, cpu) == "triton"


@interp_only
def test_bsr_goes_to_triton_and_env_forcing(cpp, monkeypatch):
    bsr = make_topology(32, 32, 0.5, "bsr", 16, dtype=torch.float32)
    csr = make_topology(8, 8, 0.5, "csr", dtype=torch.float32)
    assert route.choose(csr.values, torch.device("cpu")) == "cuda_cpp"
    monkeypatch.setenv(route.ENV, "triton")
    assert route.choose(csr.values, torch.device("cpu")) == "triton"
    assert route.choose(bsr.values, torch.device("cpu")) == "triton"
    monkeypatch.setenv(route.ENV, "cuda")
    with pytest.raises(NotImplementedError, match=r"SPARSEKERN_GPU_BACKEND=cuda names backend 'cuda_cpp', which "
                                                  r"cannot run these inputs: layout bsr .*CSR only; BSR runs on Triton"):
        route.choose(bsr.values, torch.device("cpu"))
    monkeypatch.setenv(route.ENV, "fastest")
    with pytest.raises(ValueError, match="expected auto, triton or cuda"):
        route.choose(csr.values, torch.device("cpu"))


@interp_only
def test_without_the_cpp_kernels_everything_is_triton(monkeypatch):
    csr = make_topology(8, 8, 0.5, "csr", dtype=torch.float32)
    monkeypatch.setattr(route, "CUDA_CPP_VERIFIED_BY", "as if verified")
    if route.cpp_ops() is None:
        assert "not built" in route.cpp_runtime_reasons(torch.device("cuda"))[0]
        assert route.choose(csr.values, torch.device("cpu")) == "triton"
    x = torch.randn(3, 8)
    y = route.spmm(x, csr.values.detach(), *csr.topology())          # Triton under the interpreter here
    assert torch.allclose(y, ref.spmm(x.double(), csr.values.detach(), *csr.topology()).float(), atol=1e-5)


@interp_only
def test_cpp_path_refuses_malformed_topology(cpp):
    csr = make_topology(8, 8, 0.5, "csr", dtype=torch.float32)
    ro, ci, to, ti, tp = (t.clone() for t in csr.topology())
    ci[0] = 50
    with pytest.raises(ValueError, match="col_indices"):
        route.spmm(torch.randn(2, 8), csr.values.detach(), ro, ci, to, ti, tp)
    assert cpp.calls == []                                          # nothing reached the kernels


@cpp_gpu
@pytest.mark.parametrize("density", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_cpp_kernels_match_reference(dtype, density, monkeypatch):
    """On a GPU: the CUDA C++ kernels against float64, odd sizes, empty rows, long and short rows mixed.
    fp16/bf16 errors are bounded by twice PyTorch's own error at that precision."""
    monkeypatch.setenv(route.ENV, "cuda")
    out_f, in_f, M = 1001, 1537, 333
    mask = torch.rand(out_f, in_f) < density
    mask[:7] = torch.rand(7, in_f) < 0.9                     # a few long rows
    mask[7:11] = False                                       # empty rows
    topo = CSRTopology.from_mask(mask, torch.randn(out_f, in_f, dtype=torch.float64)).to("cuda")
    t, v = topo.topology(), topo.values.detach()
    x = torch.randn(M, in_f, dtype=torch.float64, device="cuda")
    dy = torch.randn(M, out_f, dtype=torch.float64, device="cuda")
    bias = torch.randn(out_f, dtype=torch.float64, device="cuda")
    W = topo.to_dense()
    got = (route.spmm(x.to(dtype), v.to(dtype), *t, bias.to(dtype)), route.spmm_t(dy.to(dtype), v.to(dtype), *t),
           route.sddmm(dy.to(dtype), x.to(dtype), *t, 1))
    want = (ref.spmm(x, v, *t, bias), ref.spmm_t(dy, v, *t), ref.sddmm(dy, x, *t, 1))
    lp = lambda z: z.to(dtype)  # noqa: E731
    torch_lp = (torch.nn.functional.linear(lp(x), lp(W), lp(bias)), lp(dy) @ lp(W),
                (lp(dy).t() @ lp(x))[mask.cuda()])
    for g, w, tl in zip(got, want, torch_lp):
        err = ((g.double() - w).abs().max() / w.abs().max()).item()
        bound = 2e-5 if dtype == torch.float32 else 2 * ((tl.double() - w).abs().max() / w.abs().max()).item()
        assert err <= bound + 1e-7, (err, bound)
