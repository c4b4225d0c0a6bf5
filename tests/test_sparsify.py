"""sparsify/densify and the uniform/ER/ERK budgets (exact counts), and the fan-in init."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparsekern as sk
from sparsekern import SparseConv2d, SparseLinear
from sparsekern.budget import LayerShape, allocate
from sparsekern.models import mlp, resnet18_cifar


def free_layers(report):
    return [r for r in report.layers if r.status in ("sparse", "dense (saturated)")]


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
@pytest.mark.parametrize("density", [0.2, 0.1, 0.05, 0.02])
def test_budget_is_exact_on_resnet18_and_mlp(distribution, density):
    for model, dense in ((resnet18_cifar(), ["conv1"]), (mlp((64, 300, 300, 10)), [])):
        report = sk.sparsify(model, density, distribution, dense_layers=dense,
                             generator=torch.Generator().manual_seed(0))
        numel = sum(r.numel for r in free_layers(report))
        assert report.budget == round(density * numel)
        assert sum(r.nnz for r in free_layers(report)) == report.budget     # exact for CSR
        # The model really holds those nonzeros.
        held = sum(m.nnz for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d)))
        held += sum(r.numel for r in report.layers if r.status == "dense (saturated)")
        assert held == report.budget
        assert all(r.nnz <= r.numel for r in report.layers)


def test_erk_densities_follow_the_raw_scores_and_saturate():
    model = resnet18_cifar()
    report = sk.sparsify(model, 0.1, "erk", dense_layers=["conv1"])
    sparse = [r for r in report.layers if r.status == "sparse"]
    ratios = []
    for r in sparse:
        out, inp, kh, kw = (*r.shape, 1, 1)[:4]
        raw = (out + inp + kh + kw) / (out * inp * kh * kw)
        ratios.append(r.density / raw)
    # eps is common to every unsaturated layer (up to rounding to whole nonzeros).
    assert max(ratios) / min(ratios) < 1.01
    sat = [r for r in report.layers if r.status == "dense (saturated)"]
    assert sat and all(r.density == 1.0 for r in sat)
    # Saturated layers stay nn.Conv2d/nn.Linear; the kept stem too.
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert isinstance(model.layers[7].conv2, SparseConv2d)


def test_bsr_budget_within_one_block_and_fallback_to_csr():
    model = resnet18_cifar()
    report = sk.sparsify(model, 0.1, "erk", layout="bsr", block_size=16)
    got = sum(r.nnz for r in free_layers(report))
    assert 0 <= report.budget - got < 16 * 16
    stem = next(r for r in report.layers if r.name == "conv1")
    assert stem.layout in ("csr", "dense")           # 3*3*3 = 27 columns do not tile into 16x16 blocks
    assert isinstance(model.layers[0].conv1, SparseConv2d) and model.layers[0].conv1.topology.layout == "bsr"


def test_pinned_and_dense_layers_and_bad_names():
    model = mlp((32, 64, 64, 8))
    report = sk.sparsify(model, 0.1, "erk", densities={"2": 0.5}, dense_layers=["4"])
    by = {r.name: r for r in report.layers}
    assert by["2"].nnz == round(0.5 * 64 * 64) and by["2"].status.startswith("pinned")
    assert by["4"].status == "dense (kept)" and type(model[4]) is nn.Linear
    assert by["0"].nnz == report.budget == round(0.1 * 32 * 64)
    with pytest.raises(ValueError, match="matches no"):
        sk.sparsify(mlp(), 0.1, dense_layers=["nope"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        sk.sparsify(mlp(), 0.1, densities={"nope": 0.5})
    with pytest.raises(ValueError, match="distribution"):
        sk.sparsify(mlp(), 0.1, "erdos")
    with pytest.raises(ValueError, match="density"):
        sk.sparsify(mlp(), 1.5)
    with pytest.raises(ValueError, match="init"):
        sk.sparsify(mlp(), 0.1, init="kaiming")
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1))
    report = sk.sparsify(conv, 0.5)          # reported and left dense, not refused
    assert "padding_mode='reflect'" in report.layers[0].status and type(conv[0]) is nn.Conv2d
    assert isinstance(conv[1], SparseConv2d)


def test_sparsify_densify_round_trip():
    torch.manual_seed(0)
    model = resnet18_cifar(width=16).eval()
    x = torch.randn(2, 3, 16, 16)
    dense_before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                    if type(m) in (nn.Conv2d, nn.Linear)}
    report = sk.sparsify(model, 0.2, "erk", init="dense")
    y_sparse = model(x)
    masks = {n: m.mask() for n, m in model.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))}
    assert sk.densify(model) == len(masks) > 0
    assert not any(isinstance(m, (SparseConv2d, SparseLinear)) for m in model.modules())
    torch.testing.assert_close(model(x), y_sparse)
    for n, m in model.named_modules():
        if n in masks:   # "dense" init keeps the dense weights on the kept positions
            torch.testing.assert_close(m.weight, dense_before[n] * masks[n])
    assert "budget" in str(report) and report.to_dict()["total_nnz"] == report.total_nnz


def test_shared_module_is_replaced_everywhere():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    sk.sparsify(model, 0.25, "uniform")
    assert isinstance(model[0], SparseLinear) and model[0] is model[2]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3])),
                min_size=1, max_size=6),
       st.floats(0.0, 1.0), st.sampled_from(["uniform", "er", "erk"]), st.sampled_from([1, 4]))
def test_allocate_is_exact_for_any_layers(layers, density, distribution, b):
    shapes = {f"l{i}": LayerShape(o * b, i_ * b, k, k) for i, (o, i_, k) in enumerate(layers)}
    units = {n: b * b for n in shapes}
    counts = allocate(shapes, density, distribution, units=units)
    budget = round(density * sum(s.numel for s in shapes.values()))
    total = sum(counts.values())
    assert all(0 <= counts[n] <= s.numel and counts[n] % (b * b) == 0 for n, s in shapes.items())
    assert 0 <= budget - total < b * b, (budget, total)


# ------------------------------------------------------------------ init
def preact_variance(layer, x):
    """Per-output-neuron variance (over the batch) of layer(x) without its bias."""
    with torch.no_grad():
        y = layer(x)
        if layer.bias is not None:
            y = y - (layer.bias.view(1, -1, 1, 1) if y.dim() == 4 else layer.bias)
    if y.dim() == 4:
        y = y.transpose(0, 1).reshape(y.shape[1], -1)
    else:
        y = y.T
    return y.var(1)


@pytest.mark.parametrize("density", [0.5, 0.02])
def test_fanin_init_keeps_unit_preactivation_variance(density):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 1000, generator=g)
    net = nn.Sequential(nn.Linear(1000, 256))
    masked = nn.Sequential(nn.Linear(1000, 256))
    sk.sparsify(net, density, "uniform", init="fanin", init_scale=1.0, generator=g)
    sk.sparsify(masked, density, "uniform", init="dense", generator=g)
    v = preact_variance(net[0], x)
    assert abs(v.mean().item() - 1.0) < 0.1, v.mean()
    assert abs(v.median().item() - 1.0) < 0.15
    v_masked = preact_variance(masked[0], x)
    # nn.Linear's init gives 1/3 at density 1; masking scales it by the density.
    assert v_masked.mean().item() < 0.5 * density + 0.05
    assert v_masked.mean().item() == pytest.approx(density / 3, rel=0.25)
    # A standard deviation, not a variance: scale 2 doubles the variance.
    net2 = nn.Sequential(nn.Linear(1000, 256))
    sk.sparsify(net2, density, "uniform", init="fanin", init_scale=2.0, generator=g)
    assert abs(preact_variance(net2[0], x).mean().item() - 2.0) < 0.2


@pytest.mark.parametrize("density", [0.5, 0.02])
def test_fanin_init_conv(density):
    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    sk.sparsify(net, density, "uniform", init="fanin", init_scale=1.0, generator=g)
    x = torch.randn(64, 64, 8, 8, generator=g)
    v = preact_variance(net[0], x)
    # Border pixels see fewer inputs; measure the interior only via a big batch mean.
    inner = net[0](x)[:, :, 1:-1, 1:-1]
    inner = inner - net[0].bias.view(1, -1, 1, 1)
    vi = inner.detach().transpose(0, 1).reshape(64, -1).var(1)
    assert abs(vi.mean().item() - 1.0) < 0.12, vi.mean()
    assert v.mean().item() < vi.mean().item()
    assert math.isfinite(v.mean().item())


# ------------------------------------------------------- what transformers use, and the report
class MyLinear(nn.Linear):
    pass


class Tied(nn.Module):
    """An embedding tied to the output head (as GPT-2's wte and lm_head), two tied Linears, a
    subclass of nn.Linear, attention, norms, an unsupported Conv1d and raw parameters."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.fc = MyLinear(16, 32)
        self.out = nn.modules.linear.NonDynamicallyQuantizableLinear(32, 16)
        self.conv = nn.Conv1d(16, 16, 3)
        self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.b.weight = self.a.weight
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
        self.proj_weight = nn.Parameter(torch.randn(16, 16))      # raw 2-D "weight": a matmul weight
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight


def test_isinstance_ties_and_a_report_that_lists_every_weight_bearing_module():
    model = Tied()
    report = sk.sparsify(model, 0.3, "erk", generator=torch.Generator().manual_seed(0))
    by = {r.name: r for r in report.layers}
    assert isinstance(model.fc, SparseLinear) and isinstance(model.out, SparseLinear)      # subclasses too
    assert isinstance(model.attn, sk.SparseMultiheadAttention)
    assert [by[f"attn.{p}"].status for p in ("q_proj", "k_proj", "v_proj", "out_proj")] == ["sparse"] * 4
    # ties stay ties: both ends dense, the head's matmul weight counted once
    assert model.head.weight is model.emb.weight and model.a.weight is model.b.weight
    assert by["head"].status == "dense (tied to emb.weight)" and by["head"].matmul
    assert by["a"].status == "dense (tied to b.weight)" and by["b"].status == "dense (tied to a.weight)"
    assert by["a"].matmul != by["b"].matmul
    assert by["emb"].status == "dense (embedding)" and not by["emb"].matmul
    assert by["norm"].status == "dense (norm)" and not by["norm"].matmul
    assert by["conv"].status == "dense (unsupported type Conv1d)" and by["conv"].matmul
    assert by[""].status == "dense (unsupported type Tied)" and by[""].numel == 16 * 16   # proj_weight only
    # every module holding parameters is in the report (attention by its four projections)
    holders = {n for n, m in Tied().named_modules() if any(True for _ in m.parameters(recurse=False))}
    parts = {f"attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert holders - {"attn", "attn.out_proj"} == set(by) - parts
    matmul = 3 * 16 * 16 + 16 * 16 + 32 * 16 * 2 + 16 * 16 * 3 + 16 * 16 + 16 * 16 + 20 * 16
    assert report.total_numel == matmul and f"all layers: {report.total_nnz}/{matmul}" in str(report)
    free = [r for r in report.layers if r.in_budget]
    assert {r.name for r in free} == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "fc", "out"}
    assert report.free_nnz == report.budget == round(0.3 * sum(r.numel for r in free))   # ERK exact
    y = model.attn(torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16))[0]
    assert y.shape == (2, 5, 16)


def test_attention_can_be_kept_or_pinned_by_name():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    report = sk.sparsify(model, 0.2, dense_layers=["0"])
    assert type(model[0]) is nn.MultiheadAttention and isinstance(model[1], SparseLinear)
    assert [r.status for r in report.layers[:4]] == ["dense (kept)"] * 4
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    report = sk.sparsify(model, 0.2, densities={"0.v_proj": 0.5}, dense_layers=["0.out_proj"])
    by = {r.name: r for r in report.layers}
    assert by["0.v_proj"].nnz == 128 and by["0.out_proj"].status == "dense (kept)"
    assert isinstance(model[0].v_proj, SparseLinear) and type(model[0].out_proj) is not SparseLinear
