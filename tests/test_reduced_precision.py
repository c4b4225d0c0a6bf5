"""bfloat16 / float16 on the CPU kernels, and torch.autocast.

Every result (forward, dX, dW) is compared with a float64 masked-dense reference
on the same float64 inputs, and its error must stay within 2x the error of
PyTorch's own dense op at that precision (``F.linear``/``F.conv2d`` on the rounded
operands, or ``nn.Linear``/``nn.Conv2d`` under the same autocast), at 1 and 2 threads.
"""
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.testing import make_conv, make_linear

REDUCED = [torch.bfloat16, torch.float16]
CASES = {
    "linear-csr": lambda: (make_linear(67, 45, "csr", density=0.3, seed=11, dtype=torch.float64), (33, 67)),
    "linear-bsr8": lambda: (make_linear(64, 48, "bsr", 8, density=0.4, seed=12, dtype=torch.float64), (5, 64)),
    "linear-batch1": lambda: (make_linear(40, 24, "csr", density=0.5, seed=13, dtype=torch.float64), (1, 40)),
    "conv-csr": lambda: (make_conv(6, 10, 3, "csr", density=0.4, padding=1, seed=14, dtype=torch.float64),
                         (2, 6, 9, 8)),
    "conv-bsr4-stride2": lambda: (make_conv(8, 8, 1, "bsr", 4, density=0.5, stride=2, seed=15,
                                            dtype=torch.float64), (3, 8, 7, 7)),
}


def dense_weight(layer):
    w = layer.topology.to_dense()
    return w if isinstance(layer, sk.SparseLinear) else w.reshape(layer.weight_shape)


def dense_op(layer, x, w, b):
    if isinstance(layer, sk.SparseLinear):
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


def results(fn, x, w, b, dy):
    """y, dX, dW (dense) of fn on leaf copies of x, w, b."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, b)
    gx, gw = torch.autograd.grad(y, (x, w), dy.to(y.dtype))
    return y.double(), gx.double(), gw.double()


def errors(got, ref, mask):
    return [(g - r).abs().max().item() if i < 2 else ((g - r) * mask).abs().max().item()
            for i, (g, r) in enumerate(zip(got, ref))]


def sparse_results(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy.to(y.dtype))
    gw = layer.topology.to_dense(values=layer.topology.values.grad.to(layer.topology.values.dtype))
    gw = gw if isinstance(layer, sk.SparseLinear) else gw.reshape(layer.weight_shape)
    return y, x.grad, gw


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_reduced_precision_error_within_twice_torchs(case, dtype, threads):
    layer, shape = CASES[case]()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen)
    w, b = dense_weight(layer), layer.bias.detach()
    mask = (w != 0).double()
    dy = torch.randn(dense_op(layer, x, w, b).shape, dtype=torch.float64, generator=gen)
    ref = results(lambda x, w, b: dense_op(layer, x, w * mask, b), x, w, b, dy)
    torch_err = errors(results(lambda x, w, b: dense_op(layer, x, w, b), x.to(dtype), w.to(dtype),
                               b.to(dtype), dy), ref, mask)

    low = layer.to(dtype)
    y, gx, gw = sparse_results(low, x.to(dtype), dy)
    assert y.dtype == gx.dtype == low.topology.values.grad.dtype == dtype
    ours = errors((y.double(), gx.double(), gw.double()), ref, mask)
    for what, e, t in zip(("y", "dX", "dW"), ours, torch_err):
        assert e <= 2 * t + 1e-6, f"{what}: error {e:.3g} vs torch's {t:.3g} ({dtype}, {threads} threads)"


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
@pytest.mark.parametrize("case", ["linear-csr", "conv-csr", "conv-bsr4-stride2"])
def test_autocast_runs_the_sparse_kernels_in_the_autocast_dtype(case, dtype, threads):
    layer, shape = CASES[case]()
    layer = layer.float()
    dense = (torch.nn.Linear(layer.in_features, layer.out_features) if isinstance(layer, sk.SparseLinear)
             else torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                  layer.padding, layer.dilation, layer.groups))
    with torch.no_grad():
        dense.weight.copy_(dense_weight(layer))
        dense.bias.copy_(layer.bias)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen)
    with torch.autocast("cpu", dtype=dtype):
        y_dense = dense(x)
        y = layer(x)
    assert y.dtype == y_dense.dtype == dtype                 # autocast's rule for linear and conv
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy.to(dtype))
    y_dense.backward(dy.to(dtype))
    v = layer.topology.values
    assert v.dtype == v.grad.dtype == torch.float32          # the master values stay fp32
    mask = (dense_weight(layer) != 0).double()
    wr = (dense.weight.detach().double() * mask).requires_grad_(True)
    ref = dense_op(layer, x.double(), wr, layer.bias.detach().double())
    ref.backward(dy.double())
    err, err_torch = (y.double() - ref).abs().max(), (y_dense.double() - ref).abs().max()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    gw = layer.topology.to_dense(values=v.grad)
    gw = gw if isinstance(layer, sk.SparseLinear) else gw.reshape(layer.weight_shape)
    gw_err = ((gw.double() - wr.grad) * mask).abs().max()
    gw_err_torch = ((dense.weight.grad.double() - wr.grad) * mask).abs().max()
    assert gw_err <= 2 * gw_err_torch + 1e-6, (gw_err, gw_err_torch)


def test_half_and_bfloat16_modules_and_the_errors_that_name_the_dtype():
    layer = make_linear(16, 8, "csr", density=0.5, seed=5)
    x = torch.randn(3, 16)
    assert layer.half()(x.half()).dtype == torch.float16
    assert layer.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="x has dtype torch.float32 but the weight's values are torch.bfloat16"):
        layer(x)
    v = layer.topology.values
    with pytest.raises(TypeError, match="x has dtype Float but values have dtype BFloat16"):
        torch.ops.sparsekern.spmm(x, v, *layer.topology.topology(), None)
    with pytest.raises(TypeError, match="dy has dtype Half but x have dtype BFloat16"):
        torch.ops.sparsekern.sddmm(torch.randn(3, 8).half(), x.bfloat16(), *layer.topology.topology(), 1)
    with pytest.raises(NotImplementedError, match="dtype torch.int32 not in"):
        sk.select_backend(x.int(), v.int())
