"""Backend selection by declared capability (sparsekern/ops/backends.py): every refusal says why,
one selection function serves the functional API and the GPU router, and inside
``cuda_path_on_cpu`` CPU tensors take the GPU path (and only there)."""
import pytest
import torch

import sparsekern as sk
from sparsekern import formats
from sparsekern.gpu import INTERPRET, launch, route, schedule
from sparsekern.gpu.interpret import cuda_path_on_cpu
from sparsekern.ops.backends import BACKENDS, Backend, select, select_backend, select_gpu
from tests.conftest import make_linear, make_topology

CPU = torch.device("cpu")
META = torch.device("meta")
# cuda_path_on_cpu needs the Triton interpreter (set by tests/conftest.py when no GPU is visible)
interpreter = pytest.mark.skipif(not INTERPRET, reason="cuda_path_on_cpu runs under TRITON_INTERPRET=1 only")


def reasons(name, dtype=torch.float32, block=1, kind="linear", device=CPU):
    return BACKENDS[name].not_supported_reasons(device, dtype, block, kind)


@interpreter
def test_every_backend_declares_and_explains():
    assert list(BACKENDS) == ["cpu", "cuda_cpp", "triton", "reference"]
    assert reasons("cpu", torch.float8_e4m3fn) == [
        "dtype torch.float8_e4m3fn not in ['torch.float32', 'torch.float64', 'torch.bfloat16', 'torch.float16']"]
    assert reasons("cpu", torch.bfloat16) == reasons("cpu", torch.float16) == []
    assert reasons("cpu", block=2) == ["BSR block_size 2 not in [4, 8, 16, 32, 64]"]
    assert reasons("cpu", block=64) == [] and reasons("reference", torch.bfloat16, 8, device=META) == []
    assert reasons("reference", torch.int32) == ["dtype torch.int32 is not floating point"]
    for gpu_name in ("cuda_cpp", "triton"):                # outside cuda_path_on_cpu: CPU is CPU
        assert reasons(gpu_name) == ["device cpu not in ['cuda']"]
        assert reasons(gpu_name, device=META) == ["device meta not in ['cuda']"]
    with cuda_path_on_cpu():
        assert reasons("cpu") == ["device cpu (dispatched as cuda inside cuda_path_on_cpu) not in ['cpu']"]
        assert reasons("triton", block=4) == ["BSR block_size 4 not in [16, 32, 64] (tl.dot needs tiles >= 16)"]
        assert reasons("triton", torch.float64, 16) == [
            "dtype torch.float64 not in ['torch.float16', 'torch.bfloat16', 'torch.float32']"]
        cpp = reasons("cuda_cpp", torch.float16, 16)
        assert cpp[0] == ("layout bsr (block_size 16) not supported (the CUDA C++ kernels are CSR only; "
                          "BSR runs on Triton)")
        assert "CUDA tensors" in cpp[-1]                   # CPU tensors never reach the C++ kernels
    linear_only = Backend("x", None, None, ("csr",), None, ("linear",), lambda: None)
    assert linear_only.not_supported_reasons(CPU, torch.float32, 1, "conv") == [
        "no conv kernel (this backend has linear only)"]
    for op in ("spmm", "spmm_t", "sddmm", "conv2d", "conv2d_dx", "conv2d_dw"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CUDA")


def test_select_names_or_walks_the_list():
    assert select(CPU, torch.float64, 8).name == "cpu"
    assert select(CPU, torch.float64, 8, backend="reference").name == "reference"
    with pytest.raises(NotImplementedError, match=r"backend 'triton', which cannot run these inputs: device cpu"):
        select(CPU, torch.float32, 1, backend="triton")
    with pytest.raises(NotImplementedError) as exc:
        select(CPU, torch.float8_e4m3fn, 1)
    lines = str(exc.value).splitlines()
    assert lines[0] == "no sparsekern backend supports these inputs:"
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == list(BACKENDS)
    assert lines[-1] == "  reference: only used when asked for by name"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        select(CPU, torch.float32, 1, backend="gpu")
    with pytest.raises(ValueError, match="unknown op family 'pool'"):
        select(CPU, torch.float32, 1, "pool")


@interpreter
def test_functional_names_and_the_gpu_request(monkeypatch):
    x, v = torch.randn(2, 8), torch.randn(3)
    assert select_backend(x, v).name == "cpu"
    with pytest.raises(NotImplementedError, match=r"(?s)cpu: dtype torch.float8_e4m3fn.*triton: device cpu.*reference"):
        select_backend(x.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="pass backend='cuda'"):
        select_backend(x, v, "triton")
    with cuda_path_on_cpu():
        assert select_backend(x, v).name == "triton" and select_backend(x, v, "cuda").name == "triton"
        assert select_gpu(CPU, torch.bfloat16, 32, "conv").name == "triton"
        monkeypatch.setenv(route.ENV, "cuda")
        with pytest.raises(NotImplementedError, match="SPARSEKERN_GPU_BACKEND=cuda names backend 'cuda_cpp'"):
            select_gpu(CPU, torch.float32, 1)
        monkeypatch.setenv(route.ENV, "fastest")
        with pytest.raises(ValueError, match="expected auto, triton or cuda"):
            select_backend(x, v)


@interpreter
def test_cuda_path_on_cpu_runs_the_cuda_impls_and_restores_the_cpu_kernels(monkeypatch):
    calls = []
    for name in ("spmm", "spmm_t", "sddmm"):
        real = getattr(launch, name)
        monkeypatch.setattr(launch, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    layer = make_linear(16, 8, density=0.5, seed=1)
    x = torch.randn(3, 16, requires_grad=True)
    with cuda_path_on_cpu():
        with cuda_path_on_cpu():                               # contexts nest
            assert select_backend(x, layer.topology.values).name == "triton"
        layer(x).sum().backward()
    assert calls == ["spmm", "spmm_t", "sddmm"]                # forward, then dX and dW through the router
    y_cpu = layer(x)                                           # the C++ CPU kernels again
    assert calls == ["spmm", "spmm_t", "sddmm"] and select_backend(x, layer.topology.values).name == "cpu"
    torch.testing.assert_close(y_cpu, sk.ops.reference.spmm(x, layer.topology.values, *layer.topology.topology(),
                                                            layer.bias))
    with pytest.raises(NotImplementedError, match=r"sparsekern::spmm \(triton\): device cpu not in \['cuda'\]"):
        launch.spmm(x.detach(), layer.topology.values.detach(), *layer.topology.topology())


def test_the_schedule_row_ids_are_the_formats_ones_cached():
    topo = make_topology(9, 7, 0.4, "csr", empty_rows=(0, 4), seed=3)
    got = schedule.row_ids(topo.row_offsets, topo.col_indices)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), formats.row_ids(topo.row_offsets, topo.nnz))
    assert schedule.row_ids(topo.row_offsets, topo.col_indices) is got
    assert schedule.block_density(topo.values, 9, 7) == topo.nnz / 63 and schedule.block_density(topo.values, 0, 7) == 0
