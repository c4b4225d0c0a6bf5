"""Hugging Face transformers (tiny models from configs, nothing downloads): BERT, GPT-2 and ViT sparsify
and train, GPT-2's Conv1D and tie, sparsekern.from_pretrained round trips bit for bit, bad
directories name the file and the layer, HF Trainer with RigL through a callback."""
import copy
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern import SparseConv1D, SparseConv2d, SparseLinear  # noqa: E402

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]


def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(cfg), {"input_ids": torch.randint(0, 64, (2, 7))}


def gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": torch.randint(0, 64, (2, 7))}


def vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}


MODELS = {"bert": bert, "gpt2": gpt2, "vit": vit}


def sparse_model(name, density=0.3):
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    report = sk.sparsify(model, density, "erk", generator=torch.Generator().manual_seed(0))
    return model.eval(), batch, report


@pytest.mark.parametrize("name", list(MODELS))
def test_sparsify_covers_the_model_and_it_trains(name):
    model, batch, report = sparse_model(name)
    by = {r.name: r for r in report.layers}
    kinds = {"bert": SparseLinear, "gpt2": SparseConv1D, "vit": SparseLinear}[name]
    assert sum(isinstance(m, kinds) for m in model.modules()) >= 8
    assert report.free_nnz == report.budget                              # ERK exact over the sparse layers
    assert all(r.status != "sparse" or r.in_budget for r in report.layers)
    if name == "gpt2":                                                   # the tie is kept and said
        assert model.lm_head.weight is model.transformer.wte.weight and type(model.lm_head) is torch.nn.Linear
        assert by["lm_head"].status == "dense (tied to transformer.wte.weight)" and by["lm_head"].matmul
        assert by["transformer.wte"].status == "dense (embedding)"
        assert {r.kind for r in report.layers if r.status == "sparse"} == {"Conv1D"}
        model.tie_weights()                                              # still works on the sparse model
    if name == "vit":                                                    # ViT reads projection.weight.dtype
        proj = model.vit.embeddings.patch_embeddings.projection
        assert isinstance(proj, SparseConv2d) and proj.weight.dtype == torch.float32
        assert "dense (unsupported type ViTEmbeddings)" == by["vit.embeddings"].status
    matmul = sum(m.weight.numel() for m in MODELS[name]()[0].modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, Conv1D)))
    assert report.total_numel == matmul                                  # every matmul weight counted once
    model.train()
    out = model(**batch, labels=batch["input_ids"] if name == "gpt2" else torch.tensor([0, 1]))
    out.loss.backward()
    assert all(m.topology.values.grad is not None for m in model.modules() if isinstance(m, SparseLinear))


def test_conv1d_twin_computes_the_same_function():
    torch.manual_seed(0)
    conv = Conv1D(12, 20).double()                                       # nf=12, nx=20: weight [20, 12]
    torch.nn.init.normal_(conv.bias)
    mask = torch.rand(20, 12) < 0.4
    sc = SparseConv1D.from_dense(conv, mask=mask)
    masked = copy.deepcopy(conv)
    with torch.no_grad():
        masked.weight.mul_(mask)
    x = torch.randn(3, 5, 20, dtype=torch.float64)
    assert sc.weight.shape == conv.weight.shape == (20, 12) and torch.equal(sc.mask(), mask)
    for y in (sc(x), x @ sc.weight + sc.bias, torch.addmm(sc.bias, x.view(-1, 20), sc.weight).view(3, 5, 12)):
        torch.testing.assert_close(y, masked(x), rtol=1e-12, atol=1e-12)
    back = sc.to_dense()
    assert type(back) is Conv1D and torch.equal(back.weight, masked.weight)
    with pytest.raises(ValueError, match=r"\(20, 12\)"):
        SparseConv1D.from_dense(conv, mask=mask.t())


def save(model, directory, **kw):
    model.save_pretrained(directory, **kw)
    return directory


@pytest.mark.parametrize("name", list(MODELS))
def test_from_pretrained_is_bitwise(name, tmp_path):
    model, batch, _ = sparse_model(name)
    with torch.no_grad():
        want = model(**batch).logits
    kw = {"max_shard_size": "40KB"} if name == "bert" else {}            # sharded, with an index
    back = sk.from_pretrained(type(model), save(model, tmp_path, **kw))
    assert not back.training
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, want)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    if name == "gpt2":
        assert back.lm_head.weight is back.transformer.wte.weight
    if name == "bert":                                                   # a plain safetensors file too
        d = tmp_path / "plain"
        d.mkdir()
        model.config.save_pretrained(d)
        save_file(model.state_dict(), str(d / "weights.safetensors"))
        with torch.no_grad():
            assert torch.equal(sk.from_pretrained(type(model), d)(**batch).logits, want)
        (d / "weights.safetensors").unlink()
        torch.save(model.state_dict(), d / "pytorch_model.bin")          # read with weights_only=True
        with torch.no_grad():
            assert torch.equal(sk.from_pretrained(type(model), d)(**batch).logits, want)
        plain = type(model).from_pretrained(tmp_path)                    # cannot know the topology
        with torch.no_grad():
            assert not torch.allclose(plain(**batch).logits, want)


def test_bad_directories_name_the_file_and_the_layer(tmp_path):
    model, batch, _ = sparse_model("bert")
    d = save(model, tmp_path / "ok")
    f = d / "model.safetensors"
    sd = load_file(str(f))
    layer = "bert.encoder.layer.0.intermediate.dense"

    def variant(name, state=None, raw=None):
        v = tmp_path / name
        v.mkdir()
        (v / "config.json").write_text((d / "config.json").read_text())
        if raw is not None:
            (v / "model.safetensors").write_bytes(raw)
        else:
            save_file(state, str(v / "model.safetensors"))
        return v

    cls = type(model)
    with pytest.raises(ValueError, match="model.safetensors.*not a readable"):
        sk.from_pretrained(cls, variant("truncated", raw=f.read_bytes()[:1000]))
    with pytest.raises(ValueError, match=f"model.safetensors.*{re.escape(layer)}.*config"):
        sk.from_pretrained(cls, d, intermediate_size=48)                  # another config
    bad = dict(sd)
    bad[f"{layer}.topology.col_indices"] = bad[f"{layer}.topology.col_indices"].clone()
    bad[f"{layer}.topology.col_indices"][0] = 1000
    with pytest.raises(ValueError, match=f"model.safetensors.*{re.escape(layer)}.*col_indices"):
        sk.from_pretrained(cls, variant("malformed", bad))
    missing = {k: v for k, v in sd.items() if k != f"{layer}.topology.t_perm"}
    with pytest.raises(ValueError, match=f"model.safetensors.*{re.escape(layer)}.*t_perm"):
        sk.from_pretrained(cls, variant("missing", missing))
    extra = {**sd, **{k.replace(layer, "bert.encoder.layer.0.nothing"): v.clone() for k, v in sd.items() if layer in k}}
    with pytest.raises(ValueError, match="model.safetensors.*bert.encoder.layer.0.nothing"):
        sk.from_pretrained(cls, variant("unknown", extra))
    no_bias = {k: v for k, v in sd.items() if k != "classifier.bias"}
    with pytest.raises(ValueError, match="model.safetensors.*classifier"):
        sk.from_pretrained(cls, variant("dense-missing", no_bias))
    with pytest.raises(ValueError, match="config.json"):
        sk.from_pretrained(cls, variant("no-config", sd).joinpath("config.json").unlink() or tmp_path / "no-config")
    legacy = {k.replace(".topology.", ".weight."): v for k, v in sd.items()}    # last version's keys
    with torch.no_grad():
        assert torch.equal(sk.from_pretrained(cls, variant("legacy", legacy))(**batch).logits,
                           model(**batch).logits)


def test_hf_trainer_with_rigl_through_a_callback(tmp_path):
    pytest.importorskip("accelerate")                                    # HF's Trainer needs it
    model, _, _ = sparse_model("bert")

    class RigLCallback(transformers.TrainerCallback):
        engine, updates = None, 0

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.engine = sk.dst.RigL(model, optimizer, total_steps=state.max_steps, update_every=2)

        def on_step_end(self, args, state, control, **kwargs):
            self.updates += self.engine.step()

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": i % 2} for i in range(24)]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    before = {n: (m.mask(), m.nnz) for n, m in layers.items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True)
    cb = RigLCallback()
    result = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and cb.updates == 1      # step 2 (stop_at 0.75)
    assert any(not torch.equal(m.mask(), before[n][0]) for n, m in layers.items())    # it rewired
    for n, m in layers.items():
        m.topology.validate()
        assert m.nnz == before[n][1]


def test_without_transformers_from_pretrained_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(sk._optional.MissingDependency, match=r"sparsekern\[hf\]"):
        sk.from_pretrained(object, tmp_path)


def test_readme_example_runs():
    """The README's HF block (a ```py fence: tests/test_readme.py runs only ```python, which must not
    need transformers) runs as written."""
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```py\n(.*?)```", text, re.S) if "from_pretrained" in b]
    assert blocks, "README has no Hugging Face example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
