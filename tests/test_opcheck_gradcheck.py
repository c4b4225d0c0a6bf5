"""torch.library.opcheck for every op, and float64 gradcheck through the kernels."""
import pytest
import torch
from torch.autograd import gradcheck

from sparsekern.ops import library as L

from conftest import make_topology

LAYOUTS = [("csr", 1), ("bsr", 4), ("bsr", 8)]


def op_args(layout, b, M=6, out_f=16, in_f=12, density=0.4, requires_grad=True):
    topo = make_topology(out_f, in_f, density, layout, b, torch.float64, empty_rows=(1,))
    v = topo.values.detach().clone().requires_grad_(requires_grad)
    t = topo.topology()
    x = torch.randn(M, in_f, dtype=torch.float64, requires_grad=requires_grad)
    dy = torch.randn(M, out_f, dtype=torch.float64, requires_grad=requires_grad)
    bias = torch.randn(out_f, dtype=torch.float64, requires_grad=requires_grad)
    return x, dy, v, t, bias


@pytest.mark.parametrize("layout,b", LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_spmm(layout, b, with_bias, ext_required):
    x, dy, v, t, bias = op_args(layout, b, in_f=16)
    torch.library.opcheck(L.spmm, (x, v, *t, bias if with_bias else None))


@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_opcheck_spmm_t(layout, b, ext_required):
    x, dy, v, t, bias = op_args(layout, b, in_f=16)
    torch.library.opcheck(L.spmm_t, (dy, v, *t))


@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_opcheck_sddmm(layout, b, ext_required):
    x, dy, v, t, bias = op_args(layout, b, in_f=16)
    torch.library.opcheck(L.sddmm, (dy, x, *t, b))


@pytest.mark.parametrize("layout,b", LAYOUTS)
@pytest.mark.parametrize("M", [1, 5, 40])
def test_gradcheck_all_ops(layout, b, M, ext_required):
    x, dy, v, t, bias = op_args(layout, b, M=M, in_f=16)
    assert gradcheck(lambda x, v, bias: L.spmm(x, v, *t, bias), (x, v, bias))
    assert gradcheck(lambda dy, v: L.spmm_t(dy, v, *t), (dy, v))
    assert gradcheck(lambda dy, x: L.sddmm(dy, x, *t, b), (dy, x))


def test_gradgradcheck_spmm(ext_required):
    x, dy, v, t, bias = op_args("csr", 1, in_f=16)
    assert torch.autograd.gradgradcheck(lambda x, v: L.spmm(x, v, *t, None), (x, v))


@pytest.mark.parametrize("layout,b", LAYOUTS)
def test_opcheck_with_leading_dims(layout, b, ext_required):
    x, dy, v, t, bias = op_args(layout, b, M=6, in_f=16)
    x3, dy3 = x.detach().reshape(2, 3, -1).requires_grad_(), dy.detach().reshape(2, 3, -1).requires_grad_()
    torch.library.opcheck(L.spmm, (x3, v, *t, bias))
    torch.library.opcheck(L.spmm_t, (dy3, v, *t))
    torch.library.opcheck(L.sddmm, (dy3, x3, *t, b))
