"""The founding papers' methods: Sup-tickets, FreeTickets, trainable thresholds, gradient flow.

Every sparse-level result is checked against a dense float64 reference built
from scratch in the test.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import (EDST, SupTickets, TicketEnsemble, diversity, ensemble_report, export_sparse,
                                merge_topologies, reset_collapsed, superpose, threshold_regularizer,
                                thresholdify)
from sparsekern.methods.superpose import sparse_layers
from sparsekern.models import mlp
from sparsekern.methods.threshold import LongTailedStep, ThresholdConv2d, ThresholdLinear, estimator
from tests.conftest import make_topology


def dense_merge_reference(topos, weights, nnz_blocks):
    """Average the dense tickets, then keep the top-k positions by magnitude (block L2 norm),
    ties to the lower position, union members before outsiders."""
    b = topos[0].block_size
    out_f, in_f = topos[0].shape
    R, C = out_f // b, in_f // b
    avg = sum(w * t.to_dense(dtype=torch.float64) for t, w in zip(topos, weights))
    union = torch.zeros(R * C, dtype=torch.bool)
    for t in topos:
        union |= t.mask()[::b, ::b].flatten()
    mag = avg.reshape(R, b, C, b).pow(2).sum((1, 3)).sqrt().flatten()
    # order: union first, then magnitude descending, then position ascending
    key = sorted(range(R * C), key=lambda p: (not bool(union[p]), -float(mag[p]), p))
    keep = torch.zeros(R * C, dtype=torch.bool)
    keep[key[:nnz_blocks]] = True
    mask = keep.reshape(R, C).repeat_interleave(b, 0).repeat_interleave(b, 1)
    return mask, avg * mask


@pytest.mark.parametrize("layout,b", [("csr", 1), ("bsr", 4)])
def test_sparse_merge_equals_dense_reference(layout, b):
    topos = [make_topology(24, 36, 0.3, layout, b) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    nnz = topos[0].values.shape[0]
    C = 36 // b
    ro, ci, v = merge_topologies([(t.row_offsets, t.col_indices, t.values) for t in topos], weights, nnz, C)
    merged = (sk.CSRTopology((24, 36), ro, ci, v) if b == 1 else sk.BSRTopology((24, 36), ro, ci, v, b))
    mask, dense = dense_merge_reference(topos, weights, nnz)
    assert merged.values.shape[0] == nnz                          # the exact budget
    assert torch.equal(merged.mask(), mask)
    torch.testing.assert_close(merged.to_dense(), dense, rtol=1e-12, atol=1e-12)


def test_merge_tie_rule_lower_position_and_union_first():
    mask_a = torch.zeros(2, 4, dtype=torch.bool)
    mask_a[0, 3] = mask_a[1, 0] = mask_a[1, 2] = True
    mask_b = torch.zeros(2, 4, dtype=torch.bool)
    mask_b[0, 1] = True
    ones = torch.ones(2, 4, dtype=torch.float64)
    a = sk.CSRTopology.from_mask(mask_a, ones)
    bt = sk.CSRTopology.from_mask(mask_b, 3 * ones)
    # merged magnitudes: (0,1)=1.5 (0,3)=0.5 (1,0)=0.5 (1,2)=0.5; keep 3 -> (0,1) then the two lowest ties
    ro, ci, v = merge_topologies([(a.row_offsets, a.col_indices, a.values), (bt.row_offsets, bt.col_indices,
                                                                               bt.values)], [0.5, 0.5], 3, 4)
    assert ro.tolist() == [0, 2, 3] and ci.tolist() == [1, 3, 0]
    assert v.tolist() == [1.5, 0.5, 0.5]
    # a union member whose merged value is exactly 0 still beats a position outside the union
    ro, ci, v = merge_topologies([(a.row_offsets, a.col_indices, a.values), (a.row_offsets, a.col_indices,
                                                                               a.values)], [1.0, -1.0], 3, 4)
    assert ci.tolist() == [3, 0, 2] and v.abs().sum() == 0


def small_model(bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(20, 32)] + ([nn.BatchNorm1d(32)] if bn else []) + [nn.ReLU(), nn.Linear(32, 5)]
    model = nn.Sequential(*layers).double()
    sk.sparsify(model, 0.3, "uniform", generator=torch.Generator().manual_seed(seed))
    return model


def test_superpose_caa_and_cima_weights_and_budget():
    a, b = small_model(seed=1), small_model(seed=2)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_()
    for w_run, w_new in ((2 / 3, 1 / 3), (0.5, 0.5)):
        run = copy.deepcopy(a)
        before = {n: m.topology.nnz for n, m in sparse_layers(run).items()}
        superpose(run, b, w_run, w_new)
        for name, m in sparse_layers(run).items():
            assert m.topology.nnz == before[name]
            m.topology.validate()
            ref_mask, ref = dense_merge_reference([sparse_layers(a)[name].topology, sparse_layers(b)[name].topology],
                                                  [w_run, w_new], before[name])
            torch.testing.assert_close(m.topology.to_dense(), ref, rtol=1e-12, atol=1e-12)
            bias = sparse_layers(a)[name].bias * w_run + sparse_layers(b)[name].bias * w_new
            torch.testing.assert_close(m.bias, bias, rtol=1e-12, atol=1e-12)


def synthetic(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g, dtype=torch.float64)
    y = (x[:, :5].argmax(1))
    return x, y


def run_training(model, engine, controller, x, y, steps_per_epoch, epochs, bs=32, opt=None):
    for step in range(steps_per_epoch * epochs):
        for grp in opt.param_groups:
            grp["lr"] = controller.lr(step)
        i = (step % steps_per_epoch) * bs
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + bs]), y[i:i + bs]).backward()
        opt.step()
        engine.step()
        controller.after_step()


@pytest.mark.parametrize("mode", ["caa", "cima"])
def test_suptickets_cycles_tickets_and_budget(mode):
    x, y = synthetic()
    model = small_model(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    spe, epochs = 8, 10
    engine = sk.dst.RigL(model, opt, total_steps=spe * epochs, update_every=4)
    bn_calls = []

    def batches():
        bn_calls.append(1)
        return (x[i:i + 32] for i in range(0, 256, 32))

    sup = SupTickets(model, engine, spe * epochs, spe, lr=0.1, cycle_fraction=0.3, cycle_length=1,
                     mode=mode, bn_batches=batches)
    assert sup.n_cycles == 3 and sup.cyclic_start == 56
    # LR: cosine from lr_high to lr_low in each cycle; ordinary updates off, forced rewires at cycle starts
    assert sup.lr(56) == pytest.approx(0.005) and sup.lr(63) < sup.lr(57) and sup.lr(64) == pytest.approx(0.005)
    assert not engine.is_update_step(60) and engine.is_update_step(57) and engine.fraction_at(65) == 0.5
    nnz = {n: m.topology.nnz for n, m in sparse_layers(model).items()}
    run_training(model, engine, sup, x, y, spe, epochs, opt=opt)
    assert sup.tickets == 4                                           # ticket 0 + 3 cycles
    weights = [e["weights"] for e in sup.log if "weights" in e]
    expect = [[1 / 2, 1 / 2], [2 / 3, 1 / 3], [3 / 4, 1 / 4]] if mode == "caa" else [[0.5, 0.5]] * 3
    assert [w for pair in weights for w in pair] == pytest.approx([w for pair in expect for w in pair])
    assert len(bn_calls) == 3
    final = sup.result()
    assert final is not model                                         # training went on un-averaged
    for n, m in sparse_layers(final).items():
        assert m.topology.nnz == nnz[n]
        m.topology.validate()
    # the BN statistics are the recomputed ones (update_bn), not an average
    check = copy.deepcopy(final)
    torch.optim.swa_utils.update_bn((x[i:i + 32] for i in range(0, 256, 32)), check)
    torch.testing.assert_close(final[1].running_mean, check[1].running_mean)
    # scheduled updates every 4 steps up to the cyclic phase, then only the three cycle starts
    assert [r["step"] for r in engine.history] == list(range(4, 57, 4)) + [57, 65, 73]


def test_suptickets_refuses_a_cycle_that_does_not_fit():
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = sk.dst.SET(model, opt, total_steps=10)
    with pytest.raises(ValueError, match="do not fit"):
        SupTickets(model, engine, 10, 10, lr=0.1, cycle_fraction=0.5, cycle_length=1)
    with pytest.raises(ValueError, match="mode"):
        SupTickets(model, engine, 10, 2, lr=0.1, mode="swa")


def test_edst_yields_distinct_tickets_of_the_right_density():
    x, y = synthetic()
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    total = 8 * 8
    engine = sk.dst.RigL(model, opt, total_steps=total, update_every=4)
    edst = EDST(model, engine, total, lr=0.1, n_tickets=3, exploration_fraction=0.25, refine_drop=0.8)
    assert edst.starts == [16, 32, 48] and edst.ends == [32, 48, 64]
    assert edst.lr(10) == 0.1 and edst.lr(32) == pytest.approx(0.1) and edst.lr(47) < 0.01
    assert engine.fraction_at(17) == 0.8
    nnz = {n: m.topology.nnz for n, m in sparse_layers(model).items()}
    run_training(model, engine, edst, x, y, 8, 8, opt=opt)
    assert len(edst.tickets) == 3
    masks = []
    for t in edst.tickets:
        layers = sparse_layers(t)
        assert {n: m.topology.nnz for n, m in layers.items()} == nnz
        masks.append(torch.cat([m.topology.mask().flatten() for m in layers.values()]))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(masks[i], masks[j])
    ens = edst.result()
    assert isinstance(ens, TicketEnsemble) and len(ens.members) == 3


def test_ensemble_output_is_the_mean_of_member_softmax():
    members = [small_model(seed=s).eval() for s in range(3)]
    ens = TicketEnsemble(members)
    x = torch.randn(9, 20, dtype=torch.float64)
    mean = sum(m(x).softmax(-1) for m in members) / 3
    torch.testing.assert_close(ens.predict_proba(x), mean)
    torch.testing.assert_close(ens(x).exp(), mean)
    y = torch.randint(0, 5, (9,))
    rep = ensemble_report(ens, x, y)
    assert rep["ensemble"]["nll"] == pytest.approx(F.nll_loss(mean.log(), y).item())
    assert len(rep["members"]) == 3 and rep["disagreement"] >= 0 and rep["kl"] > 0
    with pytest.raises(ValueError):
        TicketEnsemble([])


def test_diversity_formulas():
    p = torch.tensor([[[0.7, 0.3], [0.2, 0.8]], [[0.4, 0.6], [0.1, 0.9]]], dtype=torch.float64)
    d = diversity(p)
    assert d["disagreement"] == pytest.approx(0.5)                    # first example differs
    kl01 = ((p[0] * (p[0] / p[1]).log()).sum(-1)).mean()
    kl10 = ((p[1] * (p[1] / p[0]).log()).sum(-1)).mean()
    assert d["kl"] == pytest.approx(((kl01 + kl10) / 2).item())
    assert diversity(torch.stack([p[0], p[0]])) == {"disagreement": 0.0, "kl": 0.0}


def test_long_tailed_estimator_values_and_gradient():
    xs = torch.tensor([-1.5, -1.0, -0.7, -0.4, -0.1, 0.0, 0.2, 0.4, 0.41, 0.99, 1.0, 1.01, 3.0],
                      dtype=torch.float64)
    expect = [0.0, 0.4, 0.4, 2 - 1.6, 2 - 0.4, 2.0, 2 - 0.8, 2 - 1.6, 0.4, 0.4, 0.4, 0.0, 0.0]
    torch.testing.assert_close(estimator(xs), torch.tensor(expect, dtype=torch.float64))
    x = xs.clone().requires_grad_()
    y = LongTailedStep.apply(x)
    assert y.tolist() == [float(v > 0) for v in xs.tolist()]
    g = torch.randn_like(xs)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * torch.tensor(expect, dtype=torch.float64))


def test_threshold_layers_gradients_regulariser_and_reset():
    torch.manual_seed(0)
    lin = ThresholdLinear(12, 6).double()
    with torch.no_grad():
        lin.threshold.fill_(0.1)
    x = torch.randn(4, 12, dtype=torch.float64)
    y = lin(x)
    y.sum().backward()
    W, t = lin.weight.detach(), lin.threshold.detach()
    d = W.abs() - t[:, None]
    mask = (d > 0).double()
    torch.testing.assert_close(y, F.linear(x, W * mask, lin.bias.detach()))
    gy = torch.ones(4, 6, dtype=torch.float64)
    g_masked = gy.t() @ x                                             # dL/d(W*mask)
    torch.testing.assert_close(lin.threshold.grad, -(g_masked * W * estimator(d)).sum(1))
    torch.testing.assert_close(lin.weight.grad, g_masked * mask + g_masked * W * estimator(d) * W.sign())
    model = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    assert thresholdify(model) == ["0", "2"]
    reg = threshold_regularizer(model, 1e-3)
    assert reg.item() == pytest.approx(1e-3 * (6 + 3))
    with torch.no_grad():
        model[0].threshold.fill_(10.0)                                # prunes every weight of layer 0
        model[2].threshold.fill_(0.01)
    assert reset_collapsed(model) == ["0"]
    assert model[0].threshold.abs().sum() == 0 and model[2].threshold[0] == 0.01


def test_exported_model_equals_the_masked_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).double()
    thresholdify(model)
    with torch.no_grad():
        model[0].threshold.uniform_(0.05, 0.2)
        model[3].threshold.uniform_(0.01, 0.03)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    masked = model(x)                                                 # training path: dense masked
    model.eval()
    with torch.no_grad():
        sparse_eval = model(x)                                        # eval: the sparse kernels
    assert isinstance(model[0], ThresholdConv2d)
    exported = copy.deepcopy(model)
    assert export_sparse(exported) == ["0", "3"]
    assert isinstance(exported[0], sk.SparseConv2d) and isinstance(exported[3], sk.SparseLinear)
    assert exported[0].nnz == int(model[0].hard_mask().sum()) < model[0].weight.numel()
    torch.testing.assert_close(exported(x), masked.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sparse_eval, masked.detach(), rtol=1e-10, atol=1e-10)


def test_gradient_flow_fanin_beats_masked_dense_init_at_initialisation():
    from sparsekern.methods.gradflow import compare_inits, layer_gradient_norms
    x, y = synthetic(512)
    x = x.float()

    def deep_mlp():
        return nn.Sequential(*mlp((20, 256, 256, 256, 256, 256, 256, 5)))

    logs = compare_inits(deep_mlp, x, y, density=0.05, distribution="uniform", epochs=1, ticket_epochs=1,
                         batch_size=128, seed=int(torch.randint(1 << 20, ())))
    assert set(logs) == {"dense-masked", "fanin", "lottery-rewind"}
    assert logs["fanin"][0]["total"] > 3 * logs["dense-masked"][0]["total"]
    for log in logs.values():
        assert len(log) == 4 and all(r["total"] > 0 for r in log)
    m = deep_mlp()
    F.cross_entropy(m(x[:8]), y[:8]).backward()
    norms = layer_gradient_norms(m)
    assert norms["total"] == pytest.approx(sum(v ** 2 for k, v in norms.items() if k != "total") ** 0.5)
