"""The transformer in the training command: the stdlib text corpus, the GPT model (causal,
sparsified projections), --model gpt --dataset text with each supported method, the
default topology-update interval, and step-time spread in the results."""
import json
from pathlib import Path

import pytest
import torch

import sparsekern as sk
from sparsekern import data, train
from sparsekern.models import GPT, ModelInputError, make_model
from sparsekern.train.methods import resolve_update_every

# 40,000 bytes (argparse.py's start) in 32-byte sequences: 1,124 train sequences, 71 steps an
# epoch at batch 16 (at batch 64, 18 steps, whether the toy model beat uniform bytes depended
# on the seed's topology: perplexity 89 to 340 over seeds 0-2)
TEXT = ["--model", "gpt", "--dataset", "text", "--width", "32", "--layers", "1", "--heads", "2", "--context", "32",
        "--text-bytes", "40000", "--batch-size", "16", "--optimizer", "adamw", "--lr", "3e-3", "--update-every", "5",
        "--quiet", "--no-plots"]


def test_text_corpus_is_fixed_split_and_recorded():
    a, b = data.load_text(context=32, max_bytes=40_000), data.load_text(context=32, max_bytes=40_000)
    assert torch.equal(a.x_train, b.x_train) and a.info == b.info and a.task == "language-model"
    assert a.x_train.dtype == torch.int64 and a.x_train.shape == (1124, 32) and a.num_classes == 256
    assert torch.equal(a.y_train[:, :-1], a.x_train[:, 1:])               # y is x shifted by one byte
    assert torch.equal(a.y_train[:-1, -1], a.x_train[1:, 0])
    info = a.info
    assert info["bytes"] == 40_000 and info["train_bytes"] == 36_000 and info["valid_bytes"] == 4_000
    assert info["files"] == [["argparse.py", 40_000]] and info["missing"] == []
    raw = (Path(info["root"]) / "argparse.py").read_bytes()
    assert bytes(a.x_test[0].tolist()) == raw[36_000:36_032]              # validation: the corpus's end
    full = data.load_text()
    assert full.info["bytes"] == data.TEXT_BYTES and [f for f, _ in full.info["files"]] == \
        sorted(f for f, _ in full.info["files"])


def test_text_corpus_reports_missing_files(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x = 1\n" * 200)
    (tmp_path / "c.py").write_bytes(b"y = 2\n" * 200)
    split = data.load_text(context=8, root=tmp_path, files=("a.py", "b.py", "c.py"))
    assert split.info["missing"] == ["b.py"] and [f for f, _ in split.info["files"]] == ["a.py", "c.py"]
    with pytest.raises(data.DatasetError, match="too little for sequences of 8 bytes"):
        data.load_text(context=8, root=tmp_path, files=("b.py",))


def test_gpt_is_causal_and_sparsify_converts_every_projection():
    model = GPT(vocab=256, context=16, width=32, layers=2, heads=4)
    rep = sk.sparsify(model, 0.2, "erk", init="fanin", generator=torch.Generator().manual_seed(0))
    sparse = [n for n, m in model.named_modules() if isinstance(m, sk.SparseLinear)]
    assert len(sparse) == 2 * 6 + 1 and "blocks.0.attn.q" in sparse and "head" in sparse
    assert isinstance(model.tok, torch.nn.Embedding) and isinstance(model.pos, torch.nn.Embedding)
    assert rep.to_dict() is not None
    x = torch.randint(0, 256, (3, 16))
    y = model(x)
    assert y.shape == (3, 16, 256)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256                                   # change only the future
    torch.testing.assert_close(model(x2)[:, :10], y[:, :10])
    y.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name,kwargs,fragment", [
    ("gpt", dict(input_shape=(64,), num_classes=10, tokens=False), "needs token sequences"),
    ("mlp", dict(input_shape=(32,), num_classes=256, tokens=True), "classifies float inputs"),
    ("mlp", dict(input_shape=(64,), num_classes=10, layers=3), "takes no layers option"),
    ("gpt", dict(input_shape=(16,), num_classes=256, tokens=True, width=30, heads=4), "multiple of --heads"),
])
def test_model_registry_names_what_does_not_fit(name, kwargs, fragment):
    with pytest.raises(ModelInputError, match=fragment):
        make_model(name, **kwargs)


def run_of(out, i=0):
    return json.loads((out / "results.json").read_text())["runs"][i]


@pytest.mark.parametrize("method", ["rigl", "set", "static", "suptickets"])
def test_gpt_on_text_trains_with_each_method(method, tmp_path, capsys):
    extra = (["--cycle-fraction", "0.5", "--cycle-drop", "0.1", "--lr-low", "3e-4", "--lr-high", "3e-3"]
             if method == "suptickets" else [])                   # one cycle: epoch 2
    assert train.main(TEXT + ["--method", method, "--epochs", "2", "--no-baseline", *extra,
                              "--out", str(tmp_path)]) == 0
    run = run_of(tmp_path)
    first, last = run["history"][0], run["history"][-1]
    assert run["task"] == "language-model" and last["train_loss"] < first["train_loss"]
    f = run["final"]
    assert f["perplexity"] == pytest.approx(torch.tensor(f["loss"]).exp().item(), rel=1e-6)
    assert f["bits_per_byte"] == pytest.approx(f["loss"] / 0.6931471805599453)
    # better than uniform bytes (sup-tickets' superposed toy model need not be: its trained one is)
    assert (run["current_model"] if method == "suptickets" else f)["perplexity"] < 256
    assert run["sparsity_report"]["free_nnz"] == run["sparsity_report"]["budget"]
    if method != "static":
        assert len([e for e in run["itop_log"] if "itop_rate" in e]) >= 3
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["dataset"]["files"] == [["argparse.py", 40_000]] and len(res["dataset"]["sha256"]) == 64
    out = capsys.readouterr().out
    assert "perplexity" in out and "bits per byte" in out and "text: 40,000 bytes of 1 Python" in out


def test_gpt_sparse_and_dense_side_by_side_and_resume(tmp_path, capsys):
    args = TEXT + ["--method", "rigl", "--epochs", "2", "--lr-schedule", "constant"]
    assert train.main(args + ["--out", str(tmp_path / "ref")]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("sparse / dense")][0]
    assert "perplexity x" in line and "training FLOPs" in line and "quartiles allow" in line
    assert train.main(args + ["--no-baseline", "--stop-after", "25", "--out", str(tmp_path / "cut")]) == 130
    assert train.main(["--resume", str(tmp_path / "cut" / "checkpoint_rigl.pt"), "--quiet", "--no-plots"]) == 0
    ref, cut = run_of(tmp_path / "ref"), run_of(tmp_path / "cut")
    assert cut["history"] == ref["history"] and cut["state_digest"] == ref["state_digest"]


@pytest.mark.parametrize("args,fragment", [
    (["--model", "gpt"], "model 'gpt' needs token sequences (--dataset text)"),
    (["--dataset", "text"], "model 'mlp' classifies float inputs"),
    (["--model", "gpt", "--dataset", "text", "--method", "edst"], "--method edst does not apply to language-model"),
    (["--model", "gpt", "--dataset", "text", "--context", "0"], "--context must be >= 1"),
])
def test_text_mistakes_are_one_line(args, fragment, tmp_path, capsys):
    assert train.main(args + ["--text-bytes", "40000", "--quiet", "--no-plots", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_default_update_interval_rewires_several_times(tmp_path):
    assert resolve_update_every(None, 220) == 16           # the main job: 10 epochs of 22 steps
    assert resolve_update_every(None, 10 * 782) == 100      # long runs keep RigL's 100
    assert resolve_update_every(7, 220) == 7
    assert train.main(["--epochs", "3", "--width", "64", "--no-baseline", "--quiet", "--no-plots",
                       "--out", str(tmp_path)]) == 0
    run = run_of(tmp_path)
    assert run["update_every"] == 4 and len(run["itop_log"]) == 12                   # steps 4, 8, ..., 48
    assert run["itop_log"][-1]["itop_rate"] > run["itop_log"][0]["itop_rate"]
    q1, q3 = run["ms_per_step_iqr"]
    assert q1 <= run["ms_per_step_median"] <= q3
