"""SparseConv2d forward, dX, dW and dbias against a float64 masked F.conv2d."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d

from conftest import TOL, stable_seed

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, groups)
CONFIGS = [
    (2, 3, 5, 5, 7, 3, 1, 1, 1, 1),          # odd image, 3 channels
    (1, 4, 6, 14, 14, 3, 1, 1, 1, 1),        # batch 1
    (5, 4, 6, 14, 14, 3, 1, 1, 1, 1),        # 14x14 (fixed-stride fp32 kernel), images split over threads
    (3, 8, 8, 9, 11, 3, 2, 1, 1, 1),         # stride 2
    (2, 8, 8, 9, 11, 3, 1, 2, 2, 1),         # dilation 2
    (2, 8, 6, 9, 11, 3, 2, 2, 2, 2),         # stride + dilation + groups
    (2, 8, 8, 9, 11, 3, 1, 1, 1, 8),         # depthwise
    (2, 6, 4, 20, 70, 1, 1, 0, 1, 1),        # 1x1, a row wider than 4 vectors
    (2, 6, 4, 40, 33, 3, 1, 1, 1, 1),        # more rows than one band
    (2, 6, 4, 13, 17, (5, 3), (3, 2), (4, 0), 1, 1),  # rectangular kernel/stride, big padding
    (1, 5, 7, 6, 5, 2, 1, "same", 1, 1),     # even kernel 'same' (asymmetric pad)
    (2, 4, 4, 8, 8, 3, 1, "valid", 3, 2),    # 'valid' with dilation 3
    (2, 3, 4, 1, 1, 1, 1, 0, 1, 1),          # 1x1 image
]
DENSITIES = [0.0, 0.3, 1.0]


def make_conv(cfg, density, layout="csr", b=None, dtype=torch.float64, bias=True, empty_row=True, seed=0):
    N, cin, cout, H, W, k, s, p, d, g = cfg
    g_ = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.normal_(generator=g_)
        if bias:
            dense.bias.normal_(generator=g_)
    rows, cols = dense.weight.shape[0], dense.weight[0].numel()
    bb = b or 1
    keep = torch.rand(rows // bb, cols // bb, generator=g_) < density
    if density >= 1:
        keep[:] = True
    if empty_row and keep.shape[0] > 1:
        keep[0] = False
    mask = keep.repeat_interleave(bb, 0).repeat_interleave(bb, 1)
    sc = SparseConv2d.from_dense(dense, mask=mask, layout=layout, block_size=b)
    return sc.to(dtype), torch.randn(N, cin, H, W, generator=g_, dtype=torch.float64)


def reference(sc, x, dy):
    """float64 y, dx, dW (masked, [out, in/g, kh, kw]) and dbias from the dense conv."""
    conv = sc.to_dense().double()
    xr = x.detach().double().requires_grad_()
    y = conv(xr)
    y.backward(dy.double())
    return y.detach(), xr.grad, conv.weight.grad * sc.mask(), None if conv.bias is None else conv.bias.grad


def check(sc, x, dtype, backend="auto"):
    sc.backend = backend
    x = x.to(dtype).requires_grad_()
    y = sc(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_r, dx_r, dw_r, db_r = reference(sc, x, dy)
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y_r, **tol)
    torch.testing.assert_close(x.grad.double(), dx_r, **tol)
    dw = sc.topology.to_dense(values=sc.topology.values.grad).double().reshape(sc.weight_shape)
    torch.testing.assert_close(dw, dw_r, **tol)
    if db_r is not None:
        torch.testing.assert_close(sc.bias.grad.double(), db_r, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_csr_conv_matches_masked_dense(cfg, density, dtype, threads3, ext_required):
    sc, x = make_conv(cfg, density, dtype=dtype, seed=stable_seed(cfg, density))
    check(sc, x, dtype)


BSR_CONFIGS = [  # Cout and Cin/groups*kh*kw multiples of the block
    ((2, 16, 16, 6, 5, 1, 1, 0, 1, 1), 4),
    ((2, 16, 8, 6, 5, 3, 1, 1, 1, 2), 4),
    ((2, 16, 16, 7, 9, 3, 2, 1, 1, 1), 8),
    ((1, 32, 16, 5, 5, 3, 1, 1, 1, 1), 16),
    ((2, 32, 16, 5, 6, 1, 1, 0, 1, 8), 4),   # a block row spans two groups (2 channels each)
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("cfg,b", BSR_CONFIGS)
def test_bsr_conv_matches_masked_dense(cfg, b, density, dtype, threads, ext_required):
    sc, x = make_conv(cfg, density, "bsr", b, dtype=dtype, seed=b)
    check(sc, x, dtype)


@pytest.mark.parametrize("cfg", CONFIGS[:6], ids=lambda c: "x".join(map(str, c)))
def test_reference_backend_matches_masked_dense(cfg):
    sc, x = make_conv(cfg, 0.4, seed=3)
    check(sc, x, torch.float64, backend="reference")


def test_no_bias_and_fresh_inputs(threads, ext_required):
    for seed in range(3):
        sc, x = make_conv(CONFIGS[2], 0.2, bias=False, dtype=torch.float32, seed=100 + seed)
        check(sc, x, torch.float32)


def test_channels_last_and_unbatched_inputs(ext_required):
    sc, x = make_conv((5, 8, 12, 9, 10, 3, 1, 1, 1, 1), 0.3, dtype=torch.float32)
    x = x.float()
    y = sc(x)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    yl = sc(xl)
    assert yl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yl, y)
    yl.sum().backward()
    xr = x.clone().requires_grad_()
    sc(xr).sum().backward()
    torch.testing.assert_close(xl.grad, xr.grad)
    torch.testing.assert_close(sc(x[0]), y[0])


def test_bf16_reference_error_bounded_by_torch_own_error():
    """Low precision only runs on the reference backend; its error stays within
    a small multiple of PyTorch's own bf16 conv error against float64."""
    cfg = (2, 16, 16, 10, 10, 3, 1, 1, 1, 1)
    sc64, x = make_conv(cfg, 0.5, seed=7)
    y64 = sc64.to_dense()(x)
    conv_bf = sc64.to_dense().to(torch.bfloat16)
    torch_err = (conv_bf(x.bfloat16()).double() - y64).abs().max()
    sc = sc64.to(torch.bfloat16)
    sc.backend = "reference"
    ours = (sc(x.bfloat16()).double() - y64).abs().max()
    assert ours <= 2 * torch_err + 1e-2, (ours, torch_err)
    sc.backend = "auto"                        # the CPU kernels (fp32 accumulation)
    assert sk.select_backend(x.bfloat16(), sc.topology.values, kind="conv").name == "cpu"
    ours = (sc(x.bfloat16()).double() - y64).abs().max()
    assert ours <= 2 * torch_err + 1e-2, (ours, torch_err)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N", [1, 4, 7])
@pytest.mark.parametrize("layout,b,stride", [("csr", None, 1), ("csr", None, 2), ("bsr", 4, 1)])
def test_image_split_and_plane_split_paths(N, threads, layout, b, stride, ext_required):
    """With >= 2 images per thread the CPU kernels split images (private buffers,
    per-thread dW partials); with fewer they split output planes. Both are exact."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = (N, 8, 12, 9, 13, 3, stride, 1, 1, 1)
        for dtype in (torch.float64, torch.float32):
            sc, x = make_conv(cfg, 0.3, layout, b, dtype=dtype, seed=N * 10 + threads)
            check(sc, x, dtype)
    finally:
        torch.set_num_threads(prev)
