"""How fast are sparsekern's GPU kernels against cuBLAS and torch.sparse? One command, the whole suite.

    python benchmarks/bench_gpu.py                 # the suite, bf16 (needs a CUDA GPU)
    python benchmarks/bench_gpu.py --dtypes bf16 fp16 fp32
    python benchmarks/bench_gpu.py --quick         # 4096x4096 at M=8192 only
    python benchmarks/bench_gpu.py --tune          # sweep tuning.CANDIDATES on the target shape
    python benchmarks/bench_gpu.py --dry-run       # print the plan; runs anywhere

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

Writes ``benchmarks/results/gpu_<gpu>.json`` and ``.md`` with GPU name, driver,
torch, triton and date, and a table of the issues' targets (Triton and CUDA C++), met or not.
``--dtypes bf16 fp32`` adds the fp32 rows (TF32 off on both sides) that the fp32 target needs.
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
import warnings
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


def plan(args):
    shapes = SHAPES[:1] if args.quick else SHAPES
    for dname in args.dtypes:
        for (sname, out_f, in_f, M), (layout, b), d in itertools.product(shapes, LAYOUTS, args.densities):
            yield dname, sname, out_f, in_f, M, layout, b, d


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
def bench(fn_of_input, inputs):
    """do_bench median (ms) of fn over inputs rotated round-robin (beyond L2)."""
    import triton
    it = itertools.cycle(inputs)
    return triton.testing.do_bench(lambda: fn_of_input(next(it)), warmup=25, rep=100, return_mode="median")


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


def measure_case(out_f, in_f, M, layout, b, density, dtype, l2):
    import sparsekern as sk
    dev = "cuda"
    ops = torch.ops.sparsekern
    lin = sk.SparseLinear(in_f, out_f, bias=False, density=density, layout=layout,
                          block_size=b if b > 1 else 16).to(dev, dtype)
    w = lin.weight
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
        from sparsekern.gpu import route
        for name in ("triton", "cuda"):
            if name == "cuda" and route.cuda_cpp_reasons(v, v.device):
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
        # PyTorch's own Triton BSR kernels
        if b > 1:
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


def measure_conv(dtype):
    """SparseConv2d 3x3 256->256 on 14x14, batch 64, 90% sparsity, forward+backward, against
    cuDNN's F.conv2d on the same (dense) weight, channels-first."""
    import sparsekern as sk
    dense = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).to("cuda", dtype)
    sc = sk.SparseConv2d.from_dense(dense, density=0.1).to("cuda", dtype)
    xs = [torch.randn(64, 256, 14, 14, device="cuda", dtype=dtype) for _ in range(3)]
    dy = torch.randn(64, 256, 14, 14, device="cuda", dtype=dtype)

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
    return {"dense_ms": d_ms, "sparsekern_ms": s_ms, "speedup_fwd": d_ms["fwd"] / s_ms["fwd"],
            "speedup_fwd_bwd": d_ms["fwd+bwd"] / s_ms["fwd+bwd"]}


def measure_rebuild(dtype):
    """A RigL-style update of the 4096x4096 weight (30% of nnz dropped and regrown, in
    place) plus the next forward's schedule rebuild, against one forward SpMM."""
    import sparsekern as sk
    from sparsekern.dst.rebuild import active_positions, update_topology
    out = []
    for layout, b, d in (("csr", 1, 0.02), ("csr", 1, 0.05), ("bsr", 64, 0.1)):
        lin = sk.SparseLinear(4096, 4096, bias=False, density=d, layout=layout, block_size=max(b, 16))
        lin = lin.to("cuda", dtype)
        w = lin.weight
        x = torch.randn(8192, 4096, device="cuda", dtype=dtype)
        fwd = bench(lambda x_: torch.ops.sparsekern.spmm(x_, w.values.detach(), *w.topology(), None), [x])
        R, C = 4096 // b, 4096 // b
        gen = torch.Generator(device="cuda").manual_seed(0)

        def update(_):
            pos = active_positions(w)
            k = int(0.3 * pos.numel())
            drop = torch.zeros(pos.numel(), dtype=torch.bool, device="cuda")
            drop[torch.randperm(pos.numel(), device="cuda", generator=gen)[:k]] = True
            free = torch.ones(R * C, dtype=torch.bool, device="cuda")
            free[pos[~drop]] = False
            cand = torch.nonzero(free).flatten()
            grow = cand[torch.randperm(cand.numel(), device="cuda", generator=gen)[:k]]
            update_topology(w, drop, grow, positions=pos)   # bumps versions: schedules rebuild
            torch.ops.sparsekern.spmm(x[:1], w.values.detach(), *w.topology(), None)  # re-schedules
        rebuild = bench(update, [None])
        out.append({"layout": layout, "block": b, "density": d, "forward_ms": fwd, "update_ms": rebuild,
                    "ratio_to_forward": rebuild / fwd})
    return out


def tune(dtype, l2):
    """Sweep the tuning candidates on 4096x4096 at 8192 rows; print the best rows for tuning.TABLE."""
    import sparsekern as sk
    from sparsekern.gpu import launch, tuning
    for layout, b, d in (("bsr", 64, 0.1), ("bsr", 32, 0.1), ("bsr", 16, 0.05), ("csr", 1, 0.02),
                         ("csr", 1, 0.05)):
        lin = sk.SparseLinear(4096, 4096, bias=False, density=d, layout=layout, block_size=max(b, 16))
        w = lin.to("cuda", dtype).weight
        v, t = w.values.detach(), w.topology()
        xs = rotated(lambda: torch.randn(8192, 4096, device="cuda", dtype=dtype), 8192 * 4096 * 2, l2)
        for op in ("spmm", "sddmm"):
            best = None
            for cfg in tuning.CANDIDATES["csr" if b == 1 else "bsr"]:
                if op == "spmm":
                    f = lambda x, c=cfg: launch.spmm(x, v, *t, config=c)  # noqa: E731
                else:
                    f = lambda x, c=cfg: launch.sddmm(x, x, *t, b, config=c)  # noqa: E731
                ms_ = safe(lambda: bench(f, xs))
                if ms_ is not None and (best is None or ms_ < best[0]):
                    best = (ms_, cfg)
            print(f"TABLE[({op!r}, {b}, {tuning.density_bucket(d)}, {str(dtype)[6:]!r})] = {best[1]}"
                  f"  # {best[0]:.3f} ms")


# ----------------------------------------------------------------- output
def gpu_meta(dtype_names):
    import triton
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return {"gpu": props.name, "sm": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", 50 << 20), "driver": driver,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "dtypes": dtype_names,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "timer": "triton.testing.do_bench median, inputs rotated beyond L2"}


def fmt(v, unit="x"):
    return "n/a" if v is None else f"{v:.2f}{unit}"


def markdown(meta, rows, rebuild, targets, conv=None):
    lines = [f"# GPU benchmark: {meta['gpu']} (sm {meta['sm']}), driver {meta['driver']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, {meta['date']}", "",
             "Speedup over dense cuBLAS `F.linear` in the same run (higher is better); roofline = "
             "speedup x density (1.0 = the 1/density ideal). n/a: the contender refused these inputs.", "",
             "CSR rows also time each GPU backend of sparsekern on its own (Triton; CUDA C++ when built).", "",
             "| dtype | shape | layout | density | kernel | dense ms | sparsekern | roofline | sk Triton | sk CUDA C++ "
             "| cuSPARSE CSR | torch Triton BSR |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
        lines += ["", "## SparseConv2d 3x3 256->256, 14x14, batch 64, 90% sparsity (bf16) vs cuDNN", "",
                  f"forward {conv['speedup_fwd']:.2f}x, forward+backward {conv['speedup_fwd_bwd']:.2f}x "
                  f"(dense {conv['dense_ms']['fwd+bwd']:.3f} ms, sparse {conv['sparsekern_ms']['fwd+bwd']:.3f} ms)"]
    lines += ["", "## Targets (4096x4096, 8192 rows, vs cuBLAS; conv vs cuDNN)", "", "| target | wanted | measured | met |",
              "|---|---|---|---|"]
    for name, want, got, met in targets:
        lines.append(f"| {name} | {want:.1f}x | {fmt(got)} | {'yes' if met else 'no'} |")
    if safe.notes:
        lines += ["", "Refusals seen: " + "; ".join(sorted(safe.notes))]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    p.add_argument("--quick", action="store_true", help="4096x4096 at 8192 rows only")
    p.add_argument("--tune", action="store_true", help="sweep tuning candidates and print TABLE rows")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cases = list(plan(args))
    if args.dry_run:
        for c in cases:
            print("{} {} out={} in={} M={} {}{} density={}".format(*c[:6], "" if c[6] == 1 else c[6], c[7]))
        print(f"{len(cases)} cases x {len(KINDS)} kernels, plus a sparse conv and a topology rebuild; targets: "
              + "; ".join(f"{n} >= {w}x" for n, w, _, _ in evaluate_targets([])))
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a GPU machine, or --dry-run to see the plan.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False   # fp32 is compared with TF32 off on both sides
    meta = gpu_meta(args.dtypes)
    l2 = meta["l2_bytes"]
    if args.tune:
        for dn in args.dtypes:
            tune(DTYPES[dn], l2)
        return 0
    from tqdm import tqdm
    rows = []
    for dname, sname, out_f, in_f, M, layout, b, d in tqdm(cases, desc="gpu bench"):
        ms, speedup, roofline = measure_case(out_f, in_f, M, layout, b, d, DTYPES[dname], l2)
        rows.append({"dtype": dname, "shape": sname, "out": out_f, "in": in_f, "M": M, "layout": layout,
                     "block": b, "density": d, "ms": ms, "speedup": speedup, "roofline": roofline})
        torch.cuda.empty_cache()
    rebuild = measure_rebuild(DTYPES["bf16"]) if "bf16" in args.dtypes else []
    conv = safe(lambda: measure_conv(DTYPES["bf16"])) if "bf16" in args.dtypes else None
    targets = evaluate_targets(rows, conv)
    md = markdown(meta, rows, rebuild, targets, conv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", meta["gpu"]).strip("_").lower()
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows, "rebuild": rebuild, "conv": conv,
                                                       "targets": targets, "refusals": sorted(safe.notes)},
                                                      indent=1))
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
