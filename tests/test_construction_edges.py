"""Construction edge cases: zero-sized layers behave as nn.Linear/nn.Conv2d, bad sizes name their field."""
import pytest
import torch
from torch import nn

from sparsekern import SparseConv2d, SparseLinear


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")   # nn.Linear's own init
@pytest.mark.parametrize("in_f,out_f", [(0, 4), (4, 0), (0, 0)])
@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_zero_sized_linear_matches_nn_linear(in_f, out_f, layout, b, bias):
    torch.manual_seed(0)
    s = SparseLinear(in_f, out_f, bias=bias, layout=layout, block_size=b)
    d = nn.Linear(in_f, out_f, bias=bias)
    assert s.nnz == 0 and s.topology.values.shape[0] == 0
    if bias:
        with torch.no_grad():
            d.bias.copy_(s.bias)                    # nn.Linear's bias is 0 at fan-in 0; ours U(-1, 1)
    torch.testing.assert_close(s.to_dense().weight, d.weight.detach() * 0)
    g = torch.Generator().manual_seed(1)
    for lead in [(3,), (2, 5), ()]:
        x = torch.randn(*lead, in_f, generator=g, requires_grad=True)
        xd = x.detach().clone().requires_grad_()
        y, yd = s(x), d(xd)
        assert y.shape == yd.shape == (*lead, out_f)
        torch.testing.assert_close(y, yd)
        dy = torch.randn(y.shape, generator=g)
        y.backward(dy)
        yd.backward(dy)
        torch.testing.assert_close(x.grad, xd.grad)
        assert s.topology.values.grad.shape == s.topology.values.shape
        if bias:
            torch.testing.assert_close(s.bias.grad, d.bias.grad)
        s.zero_grad()
        d.zero_grad()


@pytest.mark.parametrize("cin,cout", [(0, 4), (4, 0)])
@pytest.mark.parametrize("layout,b", [("csr", None), ("bsr", 4)])
def test_zero_channel_conv_forward_and_backward(cin, cout, layout, b):
    s = SparseConv2d(cin, cout, 3, padding=1, layout=layout, block_size=b)
    x = torch.randn(2, cin, 5, 5, requires_grad=True)
    y = s(x)
    assert y.shape == (2, cout, 5, 5)
    torch.testing.assert_close(y, s.bias.view(1, -1, 1, 1).expand_as(y).detach())   # no weights: the bias
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape and bool((x.grad == 0).all())
    torch.testing.assert_close(s.bias.grad, torch.full((cout,), 50.0))


@pytest.mark.parametrize("args,field", [
    ((-1, 8), "in_features"),
    ((8, -1), "out_features"),
    ((-5, -1), "in_features"),
])
def test_negative_linear_sizes_name_the_field(args, field):
    with pytest.raises(ValueError, match=f"^{field} must be >= 0, got -"):
        SparseLinear(*args)


def test_non_integer_linear_sizes_name_the_field():
    with pytest.raises(TypeError, match="^in_features must be an int"):
        SparseLinear(8.5, 4)
    with pytest.raises(TypeError, match="^out_features must be an int"):
        SparseLinear(8, "4")


@pytest.mark.parametrize("kwargs,field", [
    (dict(in_channels=-1), "in_channels"),
    (dict(out_channels=-8), "out_channels"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3, -1)), "kernel_size"),
    (dict(stride=0), "stride"),
    (dict(stride=(1, -2)), "stride"),
    (dict(padding=-1), "padding"),
    (dict(padding=(0, -1)), "padding"),
    (dict(dilation=0), "dilation"),
    (dict(groups=0), "groups"),
    (dict(groups=-2), "groups"),
])
def test_invalid_conv_geometry_names_the_field(kwargs, field):
    args = dict(in_channels=4, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{field} must be >= "):
        SparseConv2d(**args)
