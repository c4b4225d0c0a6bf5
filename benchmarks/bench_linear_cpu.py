"""How fast is SparseLinear on CPU against dense F.linear and torch.sparse, across densities?

Times forward, dX, dW and forward+backward of a sparse 4096->4096, 768->3072
and 1024->1024 layer at batch 256 and 2048, float32, densities 0.5 .. 0.02,
for the CSR layout and for BSR with 16x16 blocks, against dense ``F.linear``
(MKL/oneDNN) and ``torch.sparse`` on a CSR weight with the same nonzeros
(``torch.sparse.mm`` for forward and dX, ``torch.sparse.sampled_addmm`` for
dW), all in one process with the same thread count. Reports medians and
ratios, the training-step parameter memory, and writes
``benchmarks/results/linear_cpu.{json,md,png}``.

    python benchmarks/bench_linear_cpu.py            # full suite (~15-20 min on 2 cores)
    python benchmarks/bench_linear_cpu.py --quick    # 4096->4096 only, batch 256
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparsekern as sk
from sparsekern.ops import library as L

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("fwd", "dx", "dw", "fwd+bwd")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, reps: int, warmup: int = 2, budget_s: float = 6.0) -> float:
    """Median of ``reps`` timed runs; at least 3 but fewer than ``reps`` when one
    run is slow (torch.sparse's CSR backward takes seconds at high density)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    reps = max(3, min(reps, int(budget_s / max(first, 1e-9))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def dense_fns(x, dy, in_f, out_f):
    w = torch.randn(out_f, in_f) / in_f ** 0.5
    b = torch.zeros(out_f)
    wr, br, xr = w.clone().requires_grad_(), b.clone().requires_grad_(), x.clone().requires_grad_()

    def fwd_bwd():
        F.linear(xr, wr, br).backward(dy)
        xr.grad = wr.grad = br.grad = None

    return {"fwd": lambda: F.linear(x, w, b), "dx": lambda: dy @ w, "dw": lambda: dy.t() @ x,
            "fwd+bwd": fwd_bwd}


def torch_sparse_fns(lin, x, dy):
    w_csr = lin.weight.to_dense().to_sparse_csr()    # same nonzeros, CSR for either layout
    w_t = w_csr.t().to_sparse_csr()          # torch.sparse has no gather-permutation transpose
    pattern = w_csr.detach().clone()
    vals = w_csr.values().clone().requires_grad_()
    xr = x.clone().requires_grad_()

    def fwd_bwd():
        w = torch.sparse_csr_tensor(w_csr.crow_indices(), w_csr.col_indices(), vals, w_csr.shape)
        torch.sparse.mm(w, xr.t()).t().backward(dy)
        xr.grad = vals.grad = None

    return {"fwd": lambda: torch.sparse.mm(w_csr, x.t()).t(),
            "dx": lambda: torch.sparse.mm(w_t, dy.t()).t(),
            "dw": lambda: torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0),
            "fwd+bwd": fwd_bwd}


def sparsekern_fns(lin, x, dy):
    w = lin.weight
    v, topo = w.values.detach(), w.topology()
    xr = x.clone().requires_grad_()

    def fwd_bwd():
        lin(xr).backward(dy)
        xr.grad = w.values.grad = lin.bias.grad = None

    def fwd():
        with torch.no_grad():
            return lin(x)

    b = w.block_size
    return {"fwd": fwd, "dx": lambda: L.spmm_t(dy, v, *topo), "dw": lambda: L.sddmm(dy, x, *topo, b),
            "fwd+bwd": fwd_bwd}


def param_bytes(lin: sk.SparseLinear, dense_numel: int) -> dict:
    """Bytes a training step keeps per weight (SGD+momentum): values, indices, transpose,
    gradient and momentum for sparse; weight, gradient and momentum for dense."""
    w = lin.weight
    sparse = sum(t.numel() * t.element_size() for t in (w.values, *w.topology()))
    sparse += 2 * w.values.numel() * w.values.element_size()        # grad + momentum
    dense = 3 * dense_numel * 4
    return {"sparse_bytes": sparse, "dense_bytes": dense, "ratio": sparse / dense}


LAYOUTS = (("csr", None), ("bsr", 16))


def run(shapes, batches, densities, reps, threads):
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    rows = []
    jobs = [(s, b) for s in shapes for b in batches]
    for (in_f, out_f), batch in tqdm(jobs, desc="shapes", unit="shape"):
        torch.manual_seed(0)
        x, dy = torch.randn(batch, in_f), torch.randn(batch, out_f)
        dense = {k: median_ms(f, reps) for k, f in dense_fns(x, dy, in_f, out_f).items()}
        cases = [(lay, bs, d) for lay, bs in LAYOUTS for d in densities]
        for layout, bs, d in tqdm(cases, desc=f"{in_f}->{out_f} B={batch}", leave=False):
            lin = sk.SparseLinear(in_f, out_f, density=d, layout=layout, block_size=bs)
            ours = {k: median_ms(f, reps) for k, f in sparsekern_fns(lin, x, dy).items()}
            ts = {}
            for k, f in torch_sparse_fns(lin, x, dy).items():
                try:
                    ts[k] = median_ms(f, reps)
                except (RuntimeError, NotImplementedError) as exc:   # record, never hide
                    ts[k] = None
                    ts[k + "_error"] = str(exc).splitlines()[0][:120]
            rows.append({"in": in_f, "out": out_f, "batch": batch, "density": d,
                         "layout": layout if bs is None else f"{layout}{bs}",
                         "dense_ms": dense, "sparsekern_ms": ours, "torch_sparse_ms": ts,
                         "memory": param_bytes(lin, in_f * out_f)})
    return rows


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(r):
    return "n/a" if r is None else f"{r:.2f}x"


def markdown(rows, meta) -> str:
    out = [f"CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
           f"float32, {meta['date']}. Speedup = baseline time / sparsekern time (higher is better); "
           f"medians of 3 to {meta['reps']} runs.", "",
           "| in->out | batch | layout | density | fwd vs dense | dX vs dense | dW vs dense | fwd+bwd vs dense "
           "| ideal | fwd vs torch.sparse | fwd+bwd vs torch.sparse | param memory vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, o, t = r["dense_ms"], r["sparsekern_ms"], r["torch_sparse_ms"]
        out.append(f"| {r['in']}->{r['out']} | {r['batch']} | {r['layout']} | {r['density']} | "
                   + " | ".join(fmt(ratio(d[k], o[k])) for k in KINDS)
                   + f" | {1 / r['density']:.0f}x | {fmt(ratio(t['fwd'], o['fwd']))} | "
                     f"{fmt(ratio(t['fwd+bwd'], o['fwd+bwd']))} | {r['memory']['ratio'] * 100:.0f}% |")
    return "\n".join(out) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, kind in zip(axes, ("fwd", "fwd+bwd")):
        keys = sorted({(r["in"], r["out"], r["batch"], r["layout"]) for r in rows})
        for key in keys:
            rs = sorted((r for r in rows if (r["in"], r["out"], r["batch"], r["layout"]) == key),
                        key=lambda r: r["density"])
            sp = [1 - r["density"] for r in rs]
            ax.plot(sp, [r["dense_ms"][kind] / r["sparsekern_ms"][kind] for r in rs],
                    marker="o" if key[3] == "csr" else "s", ls="-" if key[3] == "csr" else ":",
                    label=f"{key[3]} {key[0]}->{key[1]}, batch {key[2]}")
        ideal = sorted({1 - r["density"] for r in rows})
        ax.plot(ideal, [1 / (1 - s) for s in ideal], "k--", label="ideal 1/density")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(f"SparseLinear {kind} speedup over dense F.linear")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup (x)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4096->4096 at batch 256 only")
    p.add_argument("--reps", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads for every contender (default: torch's)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.02])
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    a = p.parse_args()
    if not sk.extension_available():
        raise SystemExit("the compiled extension is not built; run `bash scripts/setup.sh` first")
    shapes = [(4096, 4096)] if a.quick else [(4096, 4096), (768, 3072), (1024, 1024)]
    batches = [256] if a.quick else [256, 2048]
    meta = {"cpu": cpu_model(), "threads": a.threads, "torch": torch.__version__,
            "sparsekern": sk.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "reps": a.reps, "dtype": "float32", "cores": os.cpu_count()}
    print(f"machine: {meta['cpu']} ({meta['cores']} cores), threads={a.threads}, torch {meta['torch']}")
    rows = run(shapes, batches, a.densities, a.reps, a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "linear_cpu_quick" if a.quick else "linear_cpu"
    (a.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    md = markdown(rows, meta)
    (a.out / f"{stem}.md").write_text(md)
    plot(rows, a.out / f"{stem}.png")
    print(md)
    print(f"wrote {a.out / stem}.json, .md and .png")


if __name__ == "__main__":
    main()
