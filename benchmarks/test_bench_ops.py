"""pytest-benchmark module for the core ops (not part of the CI test run).

    python -m pytest benchmarks/test_bench_ops.py --benchmark-columns=median,iqr

Each benchmark also checks its result against dense math, so a fast wrong
kernel fails. Shape: 1024 -> 1024, batch 256, density 0.1, float32.
"""
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.ops import library as L

IN, OUT, BATCH, DENSITY = 1024, 1024, 256, 0.1


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    lin = sk.SparseLinear(IN, OUT, density=DENSITY)
    x, dy = torch.randn(BATCH, IN), torch.randn(BATCH, OUT)
    return lin, x, dy, lin.topology.to_dense()


def test_spmm(benchmark, case):
    lin, x, dy, W = case
    v, t = lin.topology.values.detach(), lin.topology.topology()
    y = benchmark(L.spmm, x, v, *t, None)
    torch.testing.assert_close(y, x @ W.T, rtol=1e-4, atol=1e-4)


def test_spmm_t(benchmark, case):
    lin, x, dy, W = case
    v, t = lin.topology.values.detach(), lin.topology.topology()
    dx = benchmark(L.spmm_t, dy, v, *t)
    torch.testing.assert_close(dx, dy @ W, rtol=1e-4, atol=1e-4)


def test_sddmm(benchmark, case):
    lin, x, dy, W = case
    v, t = lin.topology.values.detach(), lin.topology.topology()
    dw = benchmark(L.sddmm, dy, x, *t, 1)
    ref = (dy.T @ x)[lin.mask()]
    torch.testing.assert_close(dw, ref, rtol=1e-3, atol=1e-3)


def test_dense_linear_baseline(benchmark, case):
    lin, x, dy, W = case
    y = benchmark(F.linear, x, W)
    torch.testing.assert_close(y, x @ W.T)
