"""Sparse convolution on the GPU path (im2col + the Triton kernels) against the float64 reference.

Without a GPU it runs the same code under TRITON_INTERPRET=1 on CPU tensors, calling
the Triton launchers directly; with a GPU it goes through the ops (autograd included).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.gpu import INTERPRET, conv as gconv, launch
from sparsekern.ops import reference as ref

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
    kw = {} if layout == "csr" else {"layout": "bsr", "block_size": b}
    sc = sk.SparseConv2d.from_dense(dense, density=0.4, **kw).to(DEV)
    x = torch.randn(N, cin, H, W, dtype=torch.float64, device=DEV)
    return sc, x


@pytest.mark.parametrize("case", CASES, ids=[f"{c[10]}{c[11]}-k{c[5]}s{c[6]}p{c[7]}d{c[8]}g{c[9]}" for c in CASES])
def test_gpu_conv_matches_reference(case):
    sc, x = build(case)
    w = sc.weight
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
        gconv.grouped_topology(v, *sc.weight.topology(), 2, 6, 3, 3)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (runs on the lent GPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_sparse_conv_module_forward_backward(dtype):
    sc, x = build((4, 32, 64, 14, 14, 3, 1, 1, 1, 1, "csr", 1))
    dense = sc.to_dense()
    sc, dense = sc.to(dtype), dense.to(DEV, dtype)
    x = x.to(dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = sc(x)
    y_d = F.conv2d(x2, dense.weight * sc.mask().to(dtype), dense.bias, 1, 1)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_d.backward(dy)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert ((y - y_d).abs().max() / y_d.abs().max()).item() < tol
    assert ((x.grad - x2.grad).abs().max() / x2.grad.abs().max()).item() < tol
