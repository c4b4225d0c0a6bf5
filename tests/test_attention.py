"""SparseMultiheadAttention keeps nn.MultiheadAttention's forward contract (every mask rule, weights,
layouts), and torch's transformer layers run with it in train and eval mode (fast path bypassed)."""
import copy

import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern import SparseLinear, SparseMultiheadAttention

E, H, L, S, N = 8, 2, 5, 6, 3
TOL = dict(rtol=1e-10, atol=1e-10)


def pair(**mha_kwargs):
    """(sparse, reference): a sparsified float64 MHA and nn.MultiheadAttention holding its masked weights."""
    g = torch.Generator().manual_seed(0)
    mha = nn.MultiheadAttention(E, H, dtype=torch.float64, **mha_kwargs)
    for p in mha.parameters():
        nn.init.normal_(p, 0, 0.5, generator=g)
    model = nn.Sequential(mha)
    report = sk.sparsify(model, 0.5, "uniform", generator=g)
    assert [r.status for r in report.layers if r.kind == "MHA" and "bias" not in r.name] == ["sparse"] * 4
    sparse = model[0]
    assert isinstance(sparse, SparseMultiheadAttention)
    ref = copy.deepcopy(model)
    assert sk.densify(ref) == 1 and type(ref[0]) is nn.MultiheadAttention
    return sparse, ref[0]


def masks(kind, batch_first):
    bool_mask = torch.rand(L, S) < 0.3
    bool_mask[:, 0] = False                              # every query sees a key (no all -inf rows)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[0, -2:] = True
    return {"none": {}, "bool2d": {"attn_mask": bool_mask},
            "float3d": {"attn_mask": torch.randn(N * H, L, S, dtype=torch.float64)},
            "padding": {"key_padding_mask": kpm},
            "both": {"attn_mask": bool_mask, "key_padding_mask": kpm}}[kind]


@pytest.mark.parametrize("batch_first", [False, True])
def test_matches_torch_mha(batch_first):
    sparse, ref = pair(batch_first=batch_first)
    shape = (lambda n: (N, n, E)) if batch_first else (lambda n: (n, N, E))
    q, k, v = (torch.randn(*shape(n), dtype=torch.float64) for n in (L, S, S))
    for kind in ("none", "bool2d", "float3d", "padding", "both"):
        for need_weights, average in ((False, True), (True, True), (True, False)):
            kw = dict(masks(kind, batch_first), need_weights=need_weights, average_attn_weights=average)
            for train in (True, False) if kind == "both" else (True,):   # dropout 0: one function
                sparse.train(train), ref.train(train)
                out, w = sparse(q, k, v, **kw)
                out_ref, w_ref = ref(q, k, v, **kw)
                torch.testing.assert_close(out, out_ref, **TOL)
                assert (w is None) == (w_ref is None) == (not need_weights)
                if need_weights:
                    torch.testing.assert_close(w, w_ref, **TOL)


@pytest.mark.parametrize("case", ["bias_kv_zero_attn", "kdim_vdim", "unbatched", "causal"])
def test_more_of_the_contract_and_gradients(case):
    kw = {"bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
          "kdim_vdim": dict(kdim=5, vdim=7)}.get(case, {})
    sparse, ref = pair(**kw)
    kd, vd = kw.get("kdim", E), kw.get("vdim", E)
    q = torch.randn(L, N, E, dtype=torch.float64)
    k, v = torch.randn(S, N, kd, dtype=torch.float64), torch.randn(S, N, vd, dtype=torch.float64)
    call = dict(need_weights=False)
    if case == "unbatched":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    if case == "causal":
        k = v = q
        call = dict(attn_mask=nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64),
                    is_causal=True, need_weights=False)
    out, _ = sparse(q, k, v, **call)
    out_ref, _ = ref(q, k, v, **call)
    torch.testing.assert_close(out, out_ref, **TOL)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    grads = torch.cat([getattr(sparse, p).topology.to_dense(values=getattr(sparse, p).topology.values.grad)
                       for p in ("q_proj", "k_proj", "v_proj")]) if case != "kdim_vdim" else None
    if grads is not None:
        masks_ = torch.cat([getattr(sparse, p).mask() for p in ("q_proj", "k_proj", "v_proj")])
        torch.testing.assert_close(grads, ref.in_proj_weight.grad * masks_, **TOL)
    if case == "causal":
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            sparse(q, q, q, is_causal=True)


def encoder(dense_layers=()):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, dtype=torch.float64)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    model = nn.Sequential(enc)
    sk.sparsify(model, 0.4, "erk", dense_layers=dense_layers, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    sk.densify(ref)
    return model, ref


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("dense_layers", [(), ("*.out_proj", "*.linear1", "*.linear2")],
                         ids=["all-sparse", "only-qkv-sparse"])
def test_transformer_encoder_train_and_eval_fast_path(dense_layers):
    model, ref = encoder(dense_layers)
    enc, ref = model[0], ref[0]
    assert all(isinstance(lay.self_attn, SparseMultiheadAttention) for lay in enc.layers)
    assert not enc.use_nested_tensor
    ref.use_nested_tensor = True                                    # the dense twin may take it
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    y = enc(x, src_key_padding_mask=kpm)                               # train mode
    torch.testing.assert_close(y, ref(x, src_key_padding_mask=kpm), **TOL)
    y.sum().backward()
    assert all(m.topology.values.grad is not None for m in enc.modules() if isinstance(m, SparseLinear))
    enc.eval(), ref.eval()
    with torch.no_grad():                                              # torch's fast path (nested) for ref
        ye, ye_ref = enc(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm)
        keep = ~kpm[..., None]                                        # the nested path zeroes padded rows
        assert not ye_ref[1, 5:].any() and ye[1, 5:].abs().sum() > 0  # ref took torch's fast path, we did not
        torch.testing.assert_close(ye * keep, ye_ref * keep, **TOL)
        torch.testing.assert_close(enc(x), ref(x), **TOL)
    with pytest.raises(ValueError, match="nested"):
        enc.layers[0].self_attn(*(torch.nested.nested_tensor([torch.randn(2, 16, dtype=torch.float64)]),) * 3)


def test_transformer_decoder_cross_attention():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, dtype=torch.float64)
    model = nn.Sequential(dec)
    sk.sparsify(model, 0.5, "uniform")
    ref = copy.deepcopy(model)
    sk.densify(ref)
    tgt, mem = torch.randn(4, 2, 16, dtype=torch.float64), torch.randn(6, 2, 16, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    torch.testing.assert_close(model[0](tgt, mem, tgt_mask=mask, tgt_is_causal=True),
                               ref[0](tgt, mem, tgt_mask=mask, tgt_is_causal=True), **TOL)
