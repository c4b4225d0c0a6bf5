"""Sparse convolution on the GPU path (im2col + the Triton kernels) against the float64 reference.

Without a GPU it runs the same code under TRITON_INTERPRET=1 on CPU tensors inside
:func:`sparsekern.gpu.interpret.cuda_path_on_cpu` (the ``on_gpu_path`` fixture): the conv
functions with the Triton launchers directly, and the module through the ops (autograd
included); with a GPU both go through the ops at larger sizes.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.gpu import INTERPRET, conv as gconv, launch
from sparsekern.ops import reference as ref
from sparsekern.testing import layer_kwargs
from tests.conftest import assert_gpu_path

pytestmark = pytest.mark.usefixtures("on_gpu_path")       # CPU tensors count as CUDA ones here

ON_GPU = torch.cuda.is_available() and not INTERPRET
DEV = "cuda" if ON_GPU else "cpu"

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, layout, block)
CASES = [
    (2, 3, 5, 5, 7, 3, 1, 1, 1, 1, "csr", 1),
    (1, 4, 6, 6, 6, 3, 2, 1, 1, 1, "csr", 1),              # stride 2, batch 1
    (2, 4, 4, 7, 6, 3, 1, 2, 2, 1, "csr", 1),              # dilation 2
    (2, 4, 6, 6, 5, 3, 1, 1, 1, 2, "csr", 1),              # groups
    (2, 4, 4, 6, 6, 3, 1, 1, 1, 4, "csr", 1),              # depthwise
    (1, 5, 7, 6, 5, 2, 1, "same", 1, 1, "csr", 1),         # even kernel 'same' (asymmetric pad)
    (2, 16, 32, 5, 4, 3, 1, 1, 1, 1, "bsr", 16),           # BSR 16 over Cin*9 = 144 columns
    (2, 32, 32, 4, 4, 1, 1, 0, 1, 2, "bsr", 16),           # BSR with groups (K = 16 per group)
]


def build(case):
    N, cin, cout, H, W, k, s, p, d, g, layout, b = case
    dense = nn.Conv2d(cin, cout, k, s, p, d, g, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.normal_()
        dense.bias.normal_()
    sc = sk.SparseConv2d.from_dense(dense, density=0.4, **layer_kwargs(layout, b)).to(DEV)
    x = torch.randn(N, cin, H, W, dtype=torch.float64, device=DEV)
    return sc, x


@pytest.mark.parametrize("case", CASES, ids=[f"{c[10]}{c[11]}-k{c[5]}s{c[6]}p{c[7]}d{c[8]}g{c[9]}" for c in CASES])
def test_gpu_conv_matches_reference(case):
    sc, x = build(case)
    w = sc.topology
    geom = list(sc.geometry)
    v64, t = w.values.detach(), w.topology()
    b = w.block_size
    y_ref = ref.conv2d(x, v64, *t, sc.bias.detach(), geom)
    dy = torch.randn_like(y_ref)
    dx_ref = ref.conv2d_dx(dy, v64, *t, geom, list(x.shape))
    dw_ref = ref.conv2d_dw(dy, x, *t, geom, b)
    f = torch.float32
    ops = launch if not ON_GPU else torch.ops.sparsekern
    y = gconv.conv2d(x.to(f), v64.to(f), *t, sc.bias.detach().to(f), geom, ops=ops)
    dx = gconv.conv2d_dx(dy.to(f), v64.to(f), *t, geom, list(x.shape), ops=ops)
    dw = gconv.conv2d_dw(dy.to(f), x.to(f), *t, geom, b, ops=ops)
    for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert got.shape == want.shape and got.is_contiguous()
        scale = want.abs().max().clamp_min(1e-30)
        assert ((got.double() - want).abs().max() / scale).item() < 2e-5


def test_bsr_groups_that_do_not_tile_are_refused():
    case = (1, 6, 32, 4, 4, 3, 1, 1, 1, 2, "csr", 1)
    sc, x = build(case)
    v = torch.zeros(1, 16, 16, device=DEV)
    with pytest.raises(NotImplementedError, match="multiple of 16"):
        gconv.grouped_topology(v, *sc.topology.topology(), 2, 6, 3, 3)


# (N, Cin, Cout, H, W): a real layer on a GPU, a tiny one under the interpreter
MODULE_CASE = (4, 32, 64, 14, 14) if ON_GPU else (2, 4, 6, 5, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 16)])
def test_sparse_conv_module_forward_backward(layout, b, dtype):
    """SparseConv2d -> sparse_conv2d -> the conv ops with autograd -> gpu.conv (im2col) -> the linear
    ops -> launchers, against F.conv2d with the masked dense weight (x, weight and bias gradients)."""
    N, cin, cout, H, W = MODULE_CASE
    if b > 1:
        cin, cout = 16, 16                                   # Cin*9 and Cout multiples of 16
    sc, x = build((N, cin, cout, H, W, 3, 1, 1, 1, 1, layout, b))
    assert sc.nnz > 0
    dense = sc.to_dense()
    sc, dense = sc.to(dtype), dense.to(DEV, dtype)
    x = x.to(dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    mask = sc.mask().to(DEV)
    w2 = dense.weight.detach().clone().requires_grad_()
    assert_gpu_path(sk.select_backend(x, sc.topology.values, kind="conv").name)
    y = sc(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    dense.bias.requires_grad_()
    y_d = F.conv2d(x2, w2 * mask.to(dtype), dense.bias, 1, 1)
    y_d.backward(dy)
    tol = 1e-4 if dtype == torch.float32 else 3e-2

    def close(got, want):
        assert got.dtype == dtype and got.shape == want.shape
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < tol

    close(y, y_d)
    close(x.grad, x2.grad)
    close(_dense_grad(sc), w2.grad * mask.to(dtype))
    close(sc.bias.grad, dense.bias.grad)


def _dense_grad(sc):
    """The values' gradient scattered into the dense [Cout, Cin/g, kh, kw] weight shape."""
    w = sc.topology
    return w.to_dense(dtype=w.values.dtype, values=w.values.grad).view(sc.out_channels, -1, *sc.kernel_size)
