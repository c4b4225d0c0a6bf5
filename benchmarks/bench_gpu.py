"""How fast are sparsekern's GPU kernels against cuBLAS and torch.sparse? One command, the whole suite.

    python benchmarks/bench_gpu.py                 # the suite, bf16 (needs a CUDA GPU)
    python benchmarks/bench_gpu.py --dtypes bf16 fp16 fp32
    python benchmarks/bench_gpu.py --quick         # 4096x4096 at M=8192 only
    python benchmarks/bench_gpu.py --tune          # sweep tuning.CANDIDATES on the target shape
    python benchmarks/bench_gpu.py --dry-run       # print the plan; runs anywhere
    python benchmarks/bench_gpu.py --interpret --quick   # the same code on CPU tensors (no GPU)

``--interpret`` runs every function of a GPU run (cases, conv, rebuild, ``--tune``)
at tiny sizes on CPU tensors through the same ops, under the Triton interpreter
(it sets ``TRITON_INTERPRET=1``), one call per measurement: it proves the
benchmark's own code and measures nothing. It writes files only when ``--out``
is given.

For every shape x layout x density it times, with ``triton.testing.do_bench``
medians and the dense input rotated over enough copies to exceed the L2 cache:

* kernels: forward (Y = X W^T), dX, dW and forward+backward (autograd);
* sparsekern as dispatched, and for CSR each GPU backend on its own (Triton, and
  the CUDA C++ kernels of csrc/cuda when built),
  dense ``F.linear`` (cuBLAS), ``torch.sparse`` CSR (cuSPARSE) and PyTorch's
  own Triton BSR kernels (``torch.sparse._triton_ops``), all in this one run.
  For the torch.sparse contenders forward+backward is the sum of their
  forward, dX and dW (they have no fused autograd path);
* roofline: ``speedup x density``, the achieved fraction of the 1/density ideal.

Shapes: 4096x4096, the BERT/ViT FFN (768<->3072, 1024<->4096) at 8192 rows, and a
skinny 16-row batch on 4096x4096. Densities 0.5, 0.2, 0.1, 0.05, 0.02. It also
times a RigL-style topology rebuild (drop and regrow 30% of the nonzeros at a
fixed budget, in place, then re-derive the kernel schedule) against one forward.

Writes ``benchmarks/results/gpu_<gpu>.json`` (or into ``--out``) and ``.md`` with GPU name, driver,
torch, triton and date, and a table of the issues' targets (Triton and CUDA C++), met or not.
``--dtypes bf16 fp32`` adds the fp32 rows (TF32 off on both sides) that the fp32 target needs.
A case, the rebuild or the conv that crashes is recorded (``errors`` in the JSON, with
its traceback) and the run goes on; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02)
LAYOUTS = (("csr", 1), ("bsr", 16), ("bsr", 32), ("bsr", 64))
KINDS = ("fwd", "dx", "dw", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (name, out_features, in_features, rows of input)
SHAPES = (("4096x4096", 4096, 4096, 8192), ("ffn-up 768->3072", 3072, 768, 8192),
          ("ffn-down 3072->768", 768, 3072, 8192), ("ffn-up 1024->4096", 4096, 1024, 8192),
          ("ffn-down 4096->1024", 1024, 4096, 8192), ("skinny N=16", 4096, 4096, 16))
# The issues' targets on 4096x4096 at 8192 rows, speedup over cuBLAS:
# (dtype, layout, block, density, kernel, wanted, sparsekern column)
TARGETS = (("bf16", "bsr", 64, 0.1, "fwd", 7.0, "sparsekern"), ("bf16", "bsr", 64, 0.1, "dx", 5.0, "sparsekern"),
           ("bf16", "bsr", 64, 0.1, "dw", 5.0, "sparsekern"), ("bf16", "bsr", 32, 0.1, "fwd", 5.0, "sparsekern"),
           ("bf16", "bsr", 16, 0.05, "fwd", 5.0, "sparsekern"), ("bf16", "csr", 1, 0.02, "fwd", 4.0, "sparsekern-triton"),
           ("bf16", "csr", 1, 0.05, "fwd", 1.5, "sparsekern-triton"),
           ("bf16", "csr", 1, 0.1, "fwd", 2.0, "sparsekern-cuda"), ("bf16", "csr", 1, 0.02, "fwd", 5.0, "sparsekern-cuda"),
           ("fp32", "csr", 1, 0.1, "fwd", 3.0, "sparsekern-cuda"))
CONV_TARGET = 2.0   # 3x3 256->256, 14x14, batch 64, 90% sparsity, fwd+bwd vs cuDNN
# The RigL-style rebuild and the tuning sweep: (layout, block, density) on the rebuild/tune shape.
REBUILD_CASES = (("csr", 1, 0.02), ("csr", 1, 0.05), ("bsr", 64, 0.1))
TUNE_CASES = (("bsr", 64, 0.1), ("bsr", 32, 0.1), ("bsr", 16, 0.05), ("csr", 1, 0.02), ("csr", 1, 0.05))


@dataclass(frozen=True)
class Sizes:
    """Every size a run uses. shapes: (name, out, in, rows); conv: (batch, channels, H = W);
    rebuild, tune: (out, in, rows); candidates: tuning candidates per family (None: all);
    csr_shape: (out, in) for every CSR weight of the run instead (None: the same as BSR)."""

    shapes: tuple
    densities: tuple
    conv: tuple
    rebuild: tuple
    tune: tuple
    candidates: int | None
    csr_shape: tuple | None = None

    def weight_shape(self, layout, out_f, in_f):
        """(out, in) of a weight of ``layout`` in a case sized (out_f, in_f)."""
        return self.csr_shape if layout == "csr" and self.csr_shape else (out_f, in_f)


GPU_SIZES = Sizes(SHAPES, DENSITIES, (64, 256, 14), (4096, 4096, 8192), (4096, 4096, 8192), None)
# Tiny, but every BSR layout holds at least one block (BSR64: 2 x 4 blocks). The interpreter
# pays per CSR nonzero (~2 ms per 16-segment step) and per BSR block, so CSR weights are smaller.
INTERPRET_SIZES = Sizes((("tiny", 128, 256, 16),), (0.1,), (1, 8, 5), (128, 256, 16), (128, 256, 16), 2,
                        csr_shape=(32, 64))


@dataclass(frozen=True)
class Mode:
    """Where a run happens: a CUDA GPU (``do_bench`` medians), or CPU tensors under the
    Triton interpreter (one call per measurement: exercises the code, measures nothing)."""

    device: str
    interpret: bool
    sizes: Sizes

    def bench(self, fn_of_input, inputs) -> float:
        """Time (ms) of fn over ``inputs``: do_bench median, inputs rotated round-robin (beyond L2)."""
        if self.interpret:
            t0 = time.perf_counter()
            fn_of_input(inputs[0])
            return (time.perf_counter() - t0) * 1e3
        import triton
        it = itertools.cycle(inputs)
        return triton.testing.do_bench(lambda: fn_of_input(next(it)), warmup=25, rep=100, return_mode="median")


GPU = Mode("cuda", False, GPU_SIZES)
INTERPRETER = Mode("cpu", True, INTERPRET_SIZES)


def plan(args, sizes=GPU_SIZES):
    shapes = sizes.shapes[:1] if args.quick else sizes.shapes
    densities = args.densities or sizes.densities
    for dname in args.dtypes:
        for (sname, out_f, in_f, M), (layout, b), d in itertools.product(shapes, LAYOUTS, densities):
            yield (dname, sname, *sizes.weight_shape(layout, out_f, in_f), M, layout, b, d)


def evaluate_targets(rows, conv=None):
    """[(description, target, measured or None, met)] from result rows (and the conv result)."""
    out = []
    for dtype, layout, b, d, kind, target, column in TARGETS:
        hit = [r for r in rows if r["dtype"] == dtype and r["shape"] == "4096x4096" and r["layout"] == layout
               and r["block"] == b and abs(r["density"] - d) < 1e-9]
        measured = hit[0]["speedup"].get(column, {}).get(kind) if hit else None
        backend = {"sparsekern": "", "sparsekern-triton": " (Triton)", "sparsekern-cuda": " (CUDA C++)"}[column]
        name = f"{dtype} {layout.upper()}{'' if b == 1 else b}{backend} at {1 - d:.0%} sparsity, {kind}"
        out.append((name, target, measured, measured is not None and measured >= target))
    got = conv["speedup_fwd_bwd"] if conv else None
    out.append(("bf16 conv 3x3 256->256 14x14 b64 at 90%, fwd+bwd vs cuDNN", CONV_TARGET, got,
                got is not None and got >= CONV_TARGET))
    return out


# ------------------------------------------------------------------ timing
def rotated(make, bytes_each, l2_bytes):
    n = max(2, math.ceil(2 * l2_bytes / max(bytes_each, 1)) + 1)
    return [make() for _ in range(n)]


def safe(fn):
    """Time fn(); None (and a one-line note) when the contender cannot run these inputs."""
    try:
        return fn()
    except Exception as exc:  # an unsupported dtype/layout in torch.sparse is a result, not a crash
        msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        safe.notes.add(msg)
        return None


safe.notes = set()


def attempt(errors, what, fn):
    """fn(), or None after recording its exception in ``errors`` (a crash of ours is a bug:
    reported, and the exit status says so, but the other measurements still get written)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        errors.append({"what": what, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        print(f"bench_gpu: {what} failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return None


class backend_forced:
    """Run with SPARSEKERN_GPU_BACKEND set (the CSR kernels: "triton" or "cuda")."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        from sparsekern.gpu import route
        self.key, self.old = route.ENV, os.environ.get(route.ENV)
        os.environ[self.key] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.key, None)
        else:
            os.environ[self.key] = self.old


def measure_case(mode, out_f, in_f, M, layout, b, density, dtype, l2):
    from sparsekern.testing import make_linear
    dev, bench = mode.device, mode.bench
    ops = torch.ops.sparsekern
    w = make_linear(in_f, out_f, layout, b, density=density, bias=False, device=dev, dtype=dtype).topology
    v, t = w.values.detach(), w.topology()
    W = w.to_dense()
    xs = rotated(lambda: torch.randn(M, in_f, device=dev, dtype=dtype), M * in_f * dtype.itemsize, l2)
    dys = rotated(lambda: torch.randn(M, out_f, device=dev, dtype=dtype), M * out_f * dtype.itemsize, l2)
    pairs = list(zip(xs, dys))
    ms = {}
    # dense cuBLAS
    Wr = W.clone().requires_grad_()

    def dense_fb(p):
        x, dy = p
        xr = x.requires_grad_()
        F.linear(xr, Wr).backward(dy)
        xr.grad = Wr.grad = None
        x.requires_grad_(False)

    ms["dense"] = {"fwd": bench(lambda x: F.linear(x, W), xs), "dx": bench(lambda dy: dy @ W, dys),
                   "dw": bench(lambda p: p[1].t() @ p[0], pairs), "fwd+bwd": bench(dense_fb, pairs)}
    # sparsekern
    vr = v.clone().requires_grad_()

    def sk_fb(p):
        x, dy = p
        xr = x.requires_grad_()
        ops.spmm(xr, vr, *t, None).backward(dy)
        xr.grad = vr.grad = None
        x.requires_grad_(False)

    def sk_kernels():
        return {"fwd": bench(lambda x: ops.spmm(x, v, *t, None), xs),
                "dx": bench(lambda dy: ops.spmm_t(dy, v, *t), dys),
                "dw": bench(lambda p: ops.sddmm(p[1], p[0], *t, b), pairs),
                "fwd+bwd": bench(sk_fb, pairs)}

    ms["sparsekern"] = sk_kernels()                     # what "auto" dispatch picks
    if b == 1:                                          # CSR: each GPU backend as its own column
        from sparsekern.ops.backends import BACKENDS
        for name in ("triton", "cuda"):
            if name == "cuda" and BACKENDS["cuda_cpp"].not_supported_reasons(v.device, v.dtype, 1):
                continue
            with backend_forced(name):
                ms[f"sparsekern-{name}"] = sk_kernels()
    # torch.sparse CSR (cuSPARSE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_csr = W.to_sparse_csr()
        w_t = W.t().contiguous().to_sparse_csr()
        ms["cusparse"] = {
            "fwd": safe(lambda: bench(lambda x: torch.sparse.mm(w_csr, x.t()).t(), xs)),
            "dx": safe(lambda: bench(lambda dy: torch.sparse.mm(w_t, dy.t()).t(), dys)),
            "dw": safe(lambda: bench(lambda p: torch.sparse.sampled_addmm(w_csr, p[1].t(), p[0], beta=0.0),
                                     pairs)),
        }
        # PyTorch's own Triton BSR kernels (CUDA tensors only: not under --interpret, where
        # importing them would cost seconds of torch._dynamo for a refusal)
        if b > 1 and mode.interpret:
            safe.notes.add("torch Triton BSR: CUDA only (skipped under --interpret)")
        elif b > 1:
            from torch.sparse import _triton_ops as tto
            w_bsr = W.to_sparse_bsr((b, b))
            w_bsr_t = W.t().contiguous().to_sparse_bsr((b, b))
            ms["torch-triton-bsr"] = {
                "fwd": safe(lambda: bench(lambda x: tto.bsr_dense_mm(w_bsr, x.t()).t(), xs)),
                "dx": safe(lambda: bench(lambda dy: tto.bsr_dense_mm(w_bsr_t, dy.t()).t(), dys)),
                "dw": safe(lambda: bench(lambda p: tto.sampled_addmm(w_bsr, p[1].t(), p[0], beta=0.0), pairs)),
            }
    for name in ("cusparse", "torch-triton-bsr"):
        if name in ms:
            parts = [ms[name][k] for k in ("fwd", "dx", "dw")]
            ms[name]["fwd+bwd"] = None if None in parts else sum(parts)
    speedup = {name: {k: (ms["dense"][k] / m[k] if m.get(k) else None) for k in KINDS}
               for name, m in ms.items() if name != "dense"}
    roofline = {k: (s * density if s else None) for k, s in speedup["sparsekern"].items()}
    return ms, speedup, roofline


def measure_conv(mode, dtype):
    """SparseConv2d 3x3 256->256 on 14x14, batch 64, 90% sparsity, forward+backward, against
    cuDNN's F.conv2d on the same (dense) weight, channels-first (tiny under the interpreter)."""
    import sparsekern as sk
    dev, bench = mode.device, mode.bench
    n, ch, hw = mode.sizes.conv
    dense = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False).to(dev, dtype)
    sc = sk.SparseConv2d.from_dense(dense, density=0.1).to(dev, dtype)
    xs = [torch.randn(n, ch, hw, hw, device=dev, dtype=dtype) for _ in range(3)]
    dy = torch.randn(n, ch, hw, hw, device=dev, dtype=dtype)

    def fb(module):
        def run(x):
            xr = x.requires_grad_()
            module(xr).backward(dy)
            xr.grad = None
            x.requires_grad_(False)
            for p in module.parameters():
                p.grad = None
        return run

    d_ms = {"fwd": bench(lambda x: dense(x), xs), "fwd+bwd": bench(fb(dense), xs)}
    s_ms = {"fwd": bench(lambda x: sc(x), xs), "fwd+bwd": bench(fb(sc), xs)}
    return {"shape": [n, ch, hw, hw], "dense_ms": d_ms, "sparsekern_ms": s_ms,
            "speedup_fwd": d_ms["fwd"] / s_ms["fwd"], "speedup_fwd_bwd": d_ms["fwd+bwd"] / s_ms["fwd+bwd"]}


def measure_rebuild(mode, dtype):
    """A RigL-style update of the 4096x4096 weight (30% of nnz dropped and regrown, in
    place) plus the next forward's schedule rebuild, against one forward SpMM."""
    from sparsekern.dst.rebuild import active_positions, update_topology
    from sparsekern.testing import make_linear
    dev, bench = mode.device, mode.bench
    out = []
    for layout, b, d in REBUILD_CASES:
        out_f, in_f = mode.sizes.weight_shape(layout, *mode.sizes.rebuild[:2])
        M = mode.sizes.rebuild[2]
        w = make_linear(in_f, out_f, layout, b, density=d, bias=False, device=dev, dtype=dtype).topology
        x = torch.randn(M, in_f, device=dev, dtype=dtype)
        fwd = bench(lambda x_: torch.ops.sparsekern.spmm(x_, w.values.detach(), *w.topology(), None), [x])
        R, C = out_f // b, in_f // b
        gen = torch.Generator(device=dev).manual_seed(0)

        def update(_):
            pos = active_positions(w)
            k = max(1, int(0.3 * pos.numel()))
            drop = torch.zeros(pos.numel(), dtype=torch.bool, device=dev)
            drop[torch.randperm(pos.numel(), device=dev, generator=gen)[:k]] = True
            free = torch.ones(R * C, dtype=torch.bool, device=dev)
            free[pos[~drop]] = False
            cand = torch.nonzero(free).flatten()
            grow = cand[torch.randperm(cand.numel(), device=dev, generator=gen)[:k]]
            update_topology(w, drop, grow, positions=pos)   # bumps versions: schedules rebuild
            torch.ops.sparsekern.spmm(x[:1], w.values.detach(), *w.topology(), None)  # re-schedules
        rebuild = bench(update, [None])
        out.append({"layout": layout, "block": b, "density": d, "forward_ms": fwd, "update_ms": rebuild,
                    "ratio_to_forward": rebuild / fwd})
    return out


def tune(mode, dtype, l2):
    """Sweep the tuning candidates on 4096x4096 at 8192 rows; print (and return) the best rows
    for tuning.TABLE."""
    from sparsekern.gpu import launch, tuning
    from sparsekern.testing import make_linear
    dev, bench = mode.device, mode.bench
    lines = []
    for layout, b, d in TUNE_CASES:
        out_f, in_f = mode.sizes.weight_shape(layout, *mode.sizes.tune[:2])
        M = mode.sizes.tune[2]
        w = make_linear(in_f, out_f, layout, b, density=d, bias=False, device=dev, dtype=dtype).topology
        v, t = w.values.detach(), w.topology()
        xs = rotated(lambda: torch.randn(M, in_f, device=dev, dtype=dtype), M * in_f * dtype.itemsize, l2)
        dys = rotated(lambda: torch.randn(M, out_f, device=dev, dtype=dtype), M * out_f * dtype.itemsize, l2)
        pairs = list(zip(xs, dys))
        configs = tuning.candidates(b)[:mode.sizes.candidates]
        timers = {"spmm": lambda c: bench(lambda x: launch.spmm(x, v, *t, config=c), xs),
                  "sddmm": lambda c: bench(lambda p: launch.sddmm(p[1], p[0], *t, b, config=c), pairs)}
        for op, time_ms in timers.items():
            best, skipped = tuning.sweep(time_ms, configs)
            line = tuning.table_row(op, b, d, dtype, best)
            if skipped:
                line += f"  ({len(skipped)} of {len(configs)} skipped, e.g. {skipped[0][1]})"
            print(line)
            lines.append(line)
    return lines


# ----------------------------------------------------------------- output
def machine_meta(mode, dtype_names):
    import triton
    common = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "dtypes": dtype_names, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if mode.interpret:
        return {"gpu": "interpret", "sm": "none", "sms": 0, "l2_bytes": 0, "driver": "none", "cuda": None,
                "tf32_matmul": False, **common,
                "timer": "one call per measurement on CPU tensors under TRITON_INTERPRET=1 (not a measurement)"}
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"gpu": props.name, "sm": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", 50 << 20), "driver": driver, "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, **common,
            "timer": "triton.testing.do_bench median, inputs rotated beyond L2"}


def fmt(v, unit="x"):
    return "n/a" if v is None else f"{v:.2f}{unit}"


def markdown(meta, rows, rebuild, targets, conv=None, errors=()):
    lines = [f"# GPU benchmark: {meta['gpu']} (sm {meta['sm']}), driver {meta['driver']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, {meta['date']}", "",
             "Speedup over dense cuBLAS `F.linear` in the same run (higher is better); roofline = "
             "speedup x density (1.0 = the 1/density ideal). n/a: the contender refused these inputs.", "",
             "CSR rows also time each GPU backend of sparsekern on its own (Triton; CUDA C++ when built).", "",
             "| dtype | shape | layout | density | kernel | dense ms | sparsekern | roofline | sk Triton | sk CUDA C++ "
             "| cuSPARSE CSR | torch Triton BSR |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if meta["gpu"] == "interpret":
        lines[1:1] = ["", "**Triton interpreter on CPU tensors: this run checks the benchmark's code; "
                          "its times measure nothing.**"]
    for r in rows:
        for k in KINDS:
            sp = r["speedup"]
            col = {n: sp.get(n, {}).get(k) for n in ("torch-triton-bsr", "sparsekern-triton", "sparsekern-cuda")}
            lines.append(f"| {r['dtype']} | {r['shape']} | {r['layout']}{'' if r['block'] == 1 else r['block']} "
                         f"| {r['density']} | {k} | {r['ms']['dense'][k]:.3f} | {fmt(sp['sparsekern'][k])} "
                         f"| {fmt(r['roofline'][k], '')} | {fmt(col['sparsekern-triton'])} "
                         f"| {fmt(col['sparsekern-cuda'])} | {fmt(sp['cusparse'][k])} | {fmt(col['torch-triton-bsr'])} |")
    if rebuild:
        lines += ["", "## Topology rebuild (RigL update of 30% of nnz + schedule) vs one forward SpMM", "",
                  "| layout | density | update ms | forward ms | ratio (target <= 1) |", "|---|---|---|---|---|"]
        for r in rebuild:
            lines.append(f"| {r['layout']}{'' if r['block'] == 1 else r['block']} | {r['density']} | "
                         f"{r['update_ms']:.3f} | {r['forward_ms']:.3f} | {r['ratio_to_forward']:.2f} |")
    if conv:
        n, ch, hw, _ = conv["shape"]
        lines += ["", f"## SparseConv2d 3x3 {ch}->{ch}, {hw}x{hw}, batch {n}, 90% sparsity (bf16) vs cuDNN", "",
                  f"forward {conv['speedup_fwd']:.2f}x, forward+backward {conv['speedup_fwd_bwd']:.2f}x "
                  f"(dense {conv['dense_ms']['fwd+bwd']:.3f} ms, sparse {conv['sparsekern_ms']['fwd+bwd']:.3f} ms)"]
    lines += ["", "## Targets (4096x4096, 8192 rows, vs cuBLAS; conv vs cuDNN)", "", "| target | wanted | measured | met |",
              "|---|---|---|---|"]
    for name, want, got, met in targets:
        lines.append(f"| {name} | {want:.1f}x | {fmt(got)} | {'yes' if met else 'no'} |")
    if safe.notes:
        lines += ["", "Refusals seen: " + "; ".join(sorted(safe.notes))]
    if errors:
        lines += ["", "## Errors (bugs: see `errors` in the JSON for tracebacks)", ""]
        lines += [f"- {e['what']}: {e['error'][:300]}" for e in errors]
    return "\n".join(lines) + "\n"


def enter_interpreter() -> str | None:
    """Set TRITON_INTERPRET=1 for this process; why not possible (None when done)."""
    gpu = sys.modules.get("sparsekern.gpu")
    if gpu is not None and not gpu.INTERPRET:
        return ("bench_gpu --interpret: sparsekern.gpu was imported in this process without "
                "TRITON_INTERPRET=1 (triton reads it once); run the benchmark as its own process")
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def run(args, mode, cases) -> int:
    """Measure ``cases`` (or sweep the tuning candidates with --tune); 1 when anything crashed."""
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 is compared with TF32 off on both sides
    meta = machine_meta(mode, args.dtypes)
    l2 = meta["l2_bytes"]
    if args.tune:
        for dn in args.dtypes:
            tune(mode, DTYPES[dn], l2)
        return 0
    from tqdm import tqdm
    rows, errors = [], []
    for dname, sname, out_f, in_f, M, layout, b, d in tqdm(cases, desc="gpu bench"):
        got = attempt(errors, f"{dname} {sname} {layout}{'' if b == 1 else b} density={d}",
                      lambda: measure_case(mode, out_f, in_f, M, layout, b, d, DTYPES[dname], l2))
        if got is not None:
            ms, speedup, roofline = got
            rows.append({"dtype": dname, "shape": sname, "out": out_f, "in": in_f, "M": M, "layout": layout,
                         "block": b, "density": d, "ms": ms, "speedup": speedup, "roofline": roofline})
        if mode.device == "cuda":
            torch.cuda.empty_cache()
    rebuild = conv = None
    if "bf16" in args.dtypes:
        rebuild = attempt(errors, "topology rebuild", lambda: measure_rebuild(mode, DTYPES["bf16"]))
        conv = attempt(errors, "sparse conv", lambda: measure_conv(mode, DTYPES["bf16"]))
    targets = evaluate_targets(rows, conv)
    md = markdown(meta, rows, rebuild or [], targets, conv, errors)
    print(md)
    out = args.out if args.out is not None or mode.interpret else RESULTS
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", meta["gpu"]).strip("_").lower()
        (out / f"{stem}.json").write_text(json.dumps(
            {"meta": meta, "results": rows, "rebuild": rebuild or [], "conv": conv, "targets": targets,
             "refusals": sorted(safe.notes), "errors": errors}, indent=1))
        (out / f"{stem}.md").write_text(md)
        print(f"wrote {out / stem}.json and .md")
    return 1 if errors else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    p.add_argument("--densities", type=float, nargs="+", default=None,
                   help=f"default {list(DENSITIES)} ({list(INTERPRET_SIZES.densities)} with --interpret)")
    p.add_argument("--quick", action="store_true", help="the first shape only (4096x4096 at 8192 rows)")
    p.add_argument("--tune", action="store_true", help="sweep tuning candidates and print TABLE rows")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    p.add_argument("--interpret", action="store_true",
                   help="no GPU: the same code on CPU tensors at tiny sizes under the Triton interpreter")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results directory (default {RESULTS}; with --interpret nothing is written unless given)")
    args = p.parse_args(argv)
    safe.notes = set()
    mode = INTERPRETER if args.interpret else GPU
    cases = list(plan(args, mode.sizes))
    if args.dry_run:
        for c in cases:
            print("{} {} out={} in={} M={} {}{} density={}".format(*c[:6], "" if c[6] == 1 else c[6], c[7]))
        print(f"{len(cases)} cases x {len(KINDS)} kernels, plus a sparse conv and a topology rebuild; targets: "
              + "; ".join(f"{n} >= {w}x" for n, w, _, _ in evaluate_targets([])))
        return 0
    if args.interpret:
        problem = enter_interpreter()
        if problem:
            print(problem, file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine, --interpret to run its code on CPU, or --dry-run to see the plan.",
              file=sys.stderr)
        return 2
    from sparsekern.gpu.interpret import gpu_path
    with gpu_path(mode.device):
        return run(args, mode, cases)


if __name__ == "__main__":
    sys.exit(main())
