"""The CPU conv ops' two routes against a float64 masked F.conv2d.

Small output planes take the im2col route (csrc/cpu/conv_im2col.h: the image unfolded,
then the linear kernels), larger ones the direct band kernels.
SPARSEKERN_CPU_CONV_ROUTE=direct|im2col forces one, so each route is checked on
every geometry here, including the ones the automatic choice never gives it.
"""
import pytest
import torch
from torch import nn

from sparsekern import SparseConv2d

from conftest import stable_seed
from test_conv import check, make_conv

ROUTES = ["direct", "im2col", "auto"]
# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, groups)
SMALL = [
    (4, 16, 24, 2, 2, 3, 1, 1, 1, 1),          # VGG's last stage on 8x8 digits
    (3, 8, 8, 4, 4, 3, 1, 1, 1, 1),            # ResNet-18 CIFAR layer4
    (2, 8, 8, 7, 7, 3, 2, 1, 1, 1),            # stride 2 onto 4x4
    (2, 6, 5, 5, 6, 3, 1, 2, 2, 1),            # dilation 2
    (1, 5, 7, 6, 5, 2, 1, "same", 1, 1),       # asymmetric 'same' padding
    (2, 6, 4, 7, 9, (3, 1), (2, 1), (1, 0), 1, 1),  # rectangular kernel and stride
    (1, 3, 4, 1, 1, 1, 1, 0, 1, 1),            # 1x1 image, batch 1
    (2, 8, 6, 4, 4, 3, 1, 1, 1, 2),            # groups: the direct path always
    (2, 4, 6, 12, 12, 3, 1, 1, 1, 1),          # a plane the auto choice runs direct
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: "x".join(map(str, c)))
def test_each_route_matches_masked_dense(cfg, density, route, threads, monkeypatch, ext_required):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ROUTE", route)
    for dtype in (torch.float64, torch.float32):
        sc, x = make_conv(cfg, density, dtype=dtype, seed=stable_seed(cfg, density))
        check(sc, x, dtype)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("cfg,b", [((2, 16, 16, 4, 4, 3, 1, 1, 1, 1), 4), ((3, 16, 32, 2, 3, 1, 1, 0, 1, 1), 16)])
def test_each_route_bsr(cfg, b, route, threads, monkeypatch, ext_required):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ROUTE", route)
    sc, x = make_conv(cfg, 0.5, "bsr", b, seed=b)
    check(sc, x, torch.float64)


def test_routes_agree_in_reduced_precision(monkeypatch, ext_required):
    """bf16 goes through the fp32 kernels on either route: same rounding, close results."""
    sc, x = make_conv((4, 16, 16, 4, 4, 3, 1, 1, 1, 1), 0.3, dtype=torch.float32, seed=3)
    sc, x = sc.to(torch.bfloat16), x.to(torch.bfloat16)
    out = {}
    for route in ("direct", "im2col"):
        monkeypatch.setenv("SPARSEKERN_CPU_CONV_ROUTE", route)
        out[route] = sc(x).float()
    torch.testing.assert_close(out["direct"], out["im2col"], rtol=2e-2, atol=2e-2)


def test_nonfinite_inputs_give_the_same_result_on_both_routes(threads, monkeypatch, ext_required):
    """Inf in x (forward, dW) and in dy (dX, dW), an Inf weight (the forward then runs
    direct; dX takes either route): both routes give the same values and the same
    NaN/Inf positions."""
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, 1, 1, bias=False, dtype=torch.float64)
    mask = torch.rand(6, 36) < 0.6
    mask[2, 5] = True
    sc = SparseConv2d.from_dense(conv, mask=mask)
    with torch.no_grad():
        sc.topology.values[7] = float("inf")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    dy = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    x[1, 2, 1, 0], dy[0, 1, 0, 0] = float("inf"), float("-inf")
    v, t = sc.topology.values.detach(), sc.topology.topology()
    geo = [3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    out = {}
    for route in ("direct", "im2col"):
        monkeypatch.setenv("SPARSEKERN_CPU_CONV_ROUTE", route)
        out[route] = (torch.ops.sparsekern.conv2d(x, v, *t, None, geo),
                      torch.ops.sparsekern.conv2d_dx(dy, v, *t, geo, list(x.shape)),
                      torch.ops.sparsekern.conv2d_dw(dy, x, *t, geo, 1))
    for a, b in zip(out["direct"], out["im2col"]):
        assert torch.isinf(a).any()
        torch.testing.assert_close(a, b, equal_nan=True)


def test_bad_route_is_named(monkeypatch, ext_required):
    monkeypatch.setenv("SPARSEKERN_CPU_CONV_ROUTE", "fast")
    sc = SparseConv2d(3, 4, 3, padding=1, density=0.5)
    with pytest.raises(ValueError, match="SPARSEKERN_CPU_CONV_ROUTE must be auto, direct or im2col"):
        sc(torch.randn(1, 3, 4, 4))

