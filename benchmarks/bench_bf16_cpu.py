"""How fast is SparseLinear in bfloat16 on CPU, against dense bf16 on the same machine?

Per case (in->out, batch, layout, density), in one process with the same threads, each
sparse contender timed in alternation with its dense baseline (``paired_ms``):

- raw ops in bf16: forward, dX and dW of sparsekern's bf16 kernels against dense bf16
  ``F.linear`` / ``dy @ w`` / ``dy.t() @ x`` (oneDNN; on CPUs with AVX512-BF16 or AMX
  dense bf16 runs natively, elsewhere it can be far slower than fp32);
- fwd+bwd as training runs it: fp32 master weights under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``, ``SparseLinear`` against ``nn.Linear``;
- the fp32 pair (sparse fp32 kernels against dense fp32) for reference, and, where the CPU
  has AVX512-BF16, sparsekern's widening bf16 path (``SPARSEKERN_CPU_BF16_DOT=0``) against
  its ``vdpbf16ps`` path;
- the forward's error against a float64 reference (max |error| / max |y|), dense bf16 and
  sparse bf16 side by side.

A dense bf16 call slower than ``--slow-s`` seconds is timed once ("1 run" in the table):
without native bf16 (seen on Zen 3: dense bf16 dX took 33 s at 4096^2, batch 256) the
full medians would take hours. Writes ``benchmarks/results/<cpu>/bf16_cpu.{json,md,png}``.

    python benchmarks/bench_bf16_cpu.py            # 4096->4096 b256 and 768->3072 b2048 (~10 min)
    python benchmarks/bench_bf16_cpu.py --quick    # 4096->4096 at batch 256, 3 densities
"""
from __future__ import annotations

import contextlib
import copy
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import sparsekern as sk
from sparsekern.ops import library as L

from _bench_common import base_parser, fmt, machine_meta, median_ms, paired_ms, peak_line, ratio, write_results

OPS = ("fwd", "dx", "dw")
LAYOUTS = (("csr", None), ("bsr", 16))
DOT_ENV = "SPARSEKERN_CPU_BF16_DOT"


@contextlib.contextmanager
def bf16_dot(setting: str):
    """SPARSEKERN_CPU_BF16_DOT set to ``setting`` inside the block, restored after."""
    old = os.environ.get(DOT_ENV)
    os.environ[DOT_ENV] = setting
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DOT_ENV, None)
        else:
            os.environ[DOT_ENV] = old


def with_dot(fn, setting: str):
    def call():
        with bf16_dot(setting):
            return fn()
    return call


def slow_or_median(fn, reps: int, slow_s: float) -> tuple[float, int]:
    """(ms, runs): one call when it takes longer than ``slow_s``, else ``median_ms``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > slow_s:
        return first * 1e3, 1
    return median_ms(fn, reps, warmup=1), reps


def dense_ops(x, dy, w):
    return {"fwd": lambda: F.linear(x, w), "dx": lambda: dy @ w, "dw": lambda: dy.t() @ x}


def sparse_ops(topo, x, dy):
    v, meta = topo.values.detach(), topo.topology()
    return {"fwd": lambda: L.spmm(x, v, *meta, None), "dx": lambda: L.spmm_t(dy, v, *meta),
            "dw": lambda: L.sddmm(dy, x, *meta, topo.block_size)}


def autocast_step(layer, x, dy):
    """fwd+bwd of an fp32 layer under bf16 autocast (the training case)."""
    xr = x.clone().requires_grad_()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xr)
        y.backward(dy)
        xr.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def forward_error(y, ref) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def run_case(in_f, out_f, batch, layout, bs, density, reps, slow_s, dense_cache):
    torch.manual_seed(0)
    lin = sk.SparseLinear(in_f, out_f, density=density, layout=layout, block_size=bs)
    x32, dy32 = torch.randn(batch, in_f), torch.randn(batch, out_f)
    x, dy = x32.bfloat16(), dy32.bfloat16()
    topo16 = copy.deepcopy(lin.topology).to(torch.bfloat16)  # Module.to works in place
    w16 = topo16.to_dense()  # dense bf16 baseline with the same (rounded) weights
    key = (in_f, out_f, batch)
    if key not in dense_cache:  # dense bf16 alone, once per shape: it may be very slow
        dense_cache[key] = {k: slow_or_median(f, reps, slow_s) for k, f in dense_ops(x, dy, w16).items()}
    dense16 = {k: v[0] for k, v in dense_cache[key].items()}
    dense_runs = {k: v[1] for k, v in dense_cache[key].items()}
    sparse16 = {k: median_ms(f, reps, warmup=1) for k, f in sparse_ops(topo16, x, dy).items()}
    widening = dot = None
    if sk.cpu_bf16_dot_supported():  # the two bf16 paths alternated call by call (read per call)
        widening, dot = paired_ms({k: with_dot(f, "0") for k, f in sparse_ops(topo16, x, dy).items()},
                                  {k: with_dot(f, "1") for k, f in sparse_ops(topo16, x, dy).items()}, reps)
    # fp32 reference pair, alternated
    w32 = lin.topology.to_dense()
    d32, s32 = paired_ms(dense_ops(x32, dy32, w32), sparse_ops(lin.topology, x32, dy32), reps)
    # training step under autocast, fp32 master weights, alternated with nn.Linear
    dense_layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        dense_layer.weight.copy_(w32)
        dense_layer.bias.copy_(lin.bias)
    step_d, step_s = paired_ms({"fwd+bwd": autocast_step(dense_layer, x32, dy32)},
                               {"fwd+bwd": autocast_step(lin, x32, dy32)}, reps)
    # accuracy of the forward against float64 (same rounded bf16 operands)
    ref = x.double() @ w16.double().t()
    err = {"dense_bf16": forward_error(F.linear(x, w16), ref),
           "sparse_bf16": forward_error(sparse_ops(topo16, x, dy)["fwd"](), ref)}
    return {"in": in_f, "out": out_f, "batch": batch, "density": density,
            "layout": layout if bs is None else f"{layout}{bs}",
            "dense_bf16_ms": dense16, "dense_bf16_runs": dense_runs, "sparse_bf16_ms": sparse16,
            "dense_fp32_ms": d32, "sparse_fp32_ms": s32,
            "bf16_widening_ms": widening, "bf16_dot_ms": dot,
            "autocast_dense_ms": step_d["fwd+bwd"], "autocast_sparse_ms": step_s["fwd+bwd"],
            "forward_error": err}


def run(shapes, densities, reps, threads, slow_s):
    torch.set_num_threads(threads)
    rows, dense_cache = [], {}
    cases = [(s, lay, d) for s in shapes for lay in LAYOUTS for d in densities]
    for (in_f, out_f, batch), (layout, bs), d in tqdm(cases, desc="bf16 cases", unit="case"):
        rows.append(run_case(in_f, out_f, batch, layout, bs, d, reps, slow_s, dense_cache))
    return rows


def markdown(rows, meta) -> str:
    dot = meta["bf16_dot"]
    out = [f"CPU: {meta['cpu']} ({meta['cpu_vendor']} family/model {meta['cpu_family_model']}, "
           f"{meta['cpu_isa']}), {meta['threads']} threads, torch {meta['torch']}, bfloat16, {meta['date']}. "
           f"sparsekern bf16 kernels: {'AVX512-BF16 (vdpbf16ps)' if dot else 'widening to fp32 lanes'}. "
           f"Speedup = baseline time / sparsekern time (higher is better); medians of {meta['reps']} runs, "
           f"each sparse contender alternated with its baseline except the raw bf16 ops (dense bf16 "
           f"timed once per shape). {peak_line(meta)}", "",
           "| in->out | batch | layout | density | dense bf16 vs dense fp32 (fwd) | fwd vs dense bf16 "
           "| dX vs dense bf16 | dW vs dense bf16 | autocast fwd+bwd vs nn.Linear | ideal "
           "| sparse bf16 vs sparse fp32 (fwd) | fp32: fwd+bwd vs dense fp32 "
           "| vdpbf16ps vs widening (fwd / dW) | fwd error: dense bf16 / sparse bf16 |",
           "|" + "---|" * 14]
    for r in rows:
        d16, s16, d32, s32 = r["dense_bf16_ms"], r["sparse_bf16_ms"], r["dense_fp32_ms"], r["sparse_fp32_ms"]
        once = " (1 run)" if any(n == 1 for n in r["dense_bf16_runs"].values()) else ""
        dotcell = ("n/a" if r["bf16_dot_ms"] is None else
                   f"{fmt(ratio(r['bf16_widening_ms']['fwd'], r['bf16_dot_ms']['fwd']))} / "
                   f"{fmt(ratio(r['bf16_widening_ms']['dw'], r['bf16_dot_ms']['dw']))}")
        e = r["forward_error"]
        out.append(
            f"| {r['in']}->{r['out']} | {r['batch']} | {r['layout']} | {r['density']} | "
            f"{fmt(ratio(d32['fwd'], d16['fwd']))}{once} | "
            + " | ".join(fmt(ratio(d16[k], s16[k])) for k in OPS)
            + f" | {fmt(ratio(r['autocast_dense_ms'], r['autocast_sparse_ms']))} | {1 / r['density']:.0f}x | "
              f"{fmt(ratio(s32['fwd'], s16['fwd']))} | "
              f"{fmt(ratio(sum(d32.values()), sum(s32.values())))} | {dotcell} | "
              f"{e['dense_bf16']:.1e} / {e['sparse_bf16']:.1e} |")
    out += ["", "dense bf16 vs dense fp32 > 1 means this CPU runs dense bf16 natively (AVX512-BF16 or AMX): "
            "the baseline sparse bf16 has to beat is then that much faster than the fp32 one. The autocast column "
            "is a training step with fp32 master weights (the sparse values are cast to bf16 each call, O(nnz)). "
            "fp32 column: the sum of fwd, dX and dW of the raw ops."]
    return "\n".join(out) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    keys = sorted({(r["in"], r["out"], r["batch"], r["layout"]) for r in rows})
    for ax, (title, num, den) in zip(axes, (
            ("bf16 forward: sparse vs dense bf16", lambda r: r["dense_bf16_ms"]["fwd"], lambda r: r["sparse_bf16_ms"]["fwd"]),
            ("training step under bf16 autocast", lambda r: r["autocast_dense_ms"], lambda r: r["autocast_sparse_ms"]))):
        for k in keys:
            rs = sorted((r for r in rows if (r["in"], r["out"], r["batch"], r["layout"]) == k),
                        key=lambda r: r["density"])
            ax.plot([1 - r["density"] for r in rs], [num(r) / den(r) for r in rs], marker="o",
                    ls="-" if k[3] == "csr" else ":", label=f"{k[3]} {k[0]}->{k[1]}, batch {k[2]}")
        ideal = sorted({1 - r["density"] for r in rows})
        ax.plot(ideal, [1 / (1 - s) for s in ideal], "k--", label="ideal 1/density")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup over dense (x)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = base_parser(__doc__, "4096->4096 at batch 256, densities 0.5 0.1 0.02", [0.5, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--slow-s", type=float, default=5.0,
                   help="a dense bf16 call slower than this is timed once (default 5 s)")
    a = p.parse_args()
    if not sk.extension_available():
        raise SystemExit("the compiled extension is not built; run `bash scripts/setup.sh` first")
    shapes = [(4096, 4096, 256)] if a.quick else [(4096, 4096, 256), (768, 3072, 2048)]
    densities = [0.5, 0.1, 0.02] if a.quick and a.densities == p.get_default("densities") else a.densities
    meta = machine_meta(a.threads, a.reps)
    meta.update(dtype="bfloat16", bf16_dot=sk.cpu_bf16_dot_supported())
    print(f"machine: {meta['cpu']} ({meta['cores']} cores), threads={a.threads}, torch {meta['torch']}, "
          f"bf16 dot products: {meta['bf16_dot']}")
    rows = run(shapes, densities, a.reps, a.threads, a.slow_s)
    write_results(a.out, "bf16_cpu_quick" if a.quick else "bf16_cpu", meta, rows, markdown(rows, meta),
                  lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
