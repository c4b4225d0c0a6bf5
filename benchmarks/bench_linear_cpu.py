"""How fast is SparseLinear on CPU against dense F.linear, torch.sparse and SparseProp, across densities?

Times forward, dX, dW and forward+backward of a sparse 4096->4096, 768->3072
and 1024->1024 layer at batch 256 and 2048, float32, densities 0.5 .. 0.02,
for the CSR layout and for BSR with 16x16 blocks, against dense ``F.linear``
(MKL/oneDNN), ``torch.sparse`` on a CSR weight with the same nonzeros
(``torch.sparse.mm`` for forward and dX, ``torch.sparse.sampled_addmm`` for
dW) and SparseProp's ``SparseLinear`` on the same nonzeros (forward and
forward+backward, CSR only, checked against dense first; ``_sparseprop_peer.py``),
all in one process with the same thread count. Reports medians and ratios, the
dense baseline's GFLOP/s and sparsekern's effective GFLOP/s (useful FLOPs
``2 * batch * nnz`` per op) against the dense rate and the register-only FMA peak,
the training-step parameter memory, and writes
``benchmarks/results/<cpu>/linear_cpu.{json,md,png}``.

    python benchmarks/bench_linear_cpu.py            # full suite (~15-20 min on 2 cores)
    python benchmarks/bench_linear_cpu.py --quick    # 4096->4096 only, batch 256
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparsekern as sk
from sparsekern.ops import library as L

import _sparseprop_peer as sparseprop_peer
from _bench_common import (base_parser, fmt, machine_meta, median_ms_each, op_flops, paired_ms, peak_line, peer_cell,
                           peer_notes, plot_speedups, ratio, throughput, throughput_table, write_results)

KINDS = ("fwd", "dx", "dw", "fwd+bwd")


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
    w_csr = lin.topology.to_dense().to_sparse_csr()    # same nonzeros, CSR for either layout
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
    w = lin.topology
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
    w = lin.topology
    sparse = sum(t.numel() * t.element_size() for t in (w.values, *w.topology()))
    sparse += 2 * w.values.numel() * w.values.element_size()        # grad + momentum
    dense = 3 * dense_numel * 4
    return {"sparse_bytes": sparse, "dense_bytes": dense, "ratio": sparse / dense}


LAYOUTS = (("csr", None), ("bsr", 16))


def run(shapes, batches, densities, reps, threads, peak=None):
    """One row per (shape, batch, layout, density); ``peak``: the FMA peak GFLOP/s (or None)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    rows = []
    jobs = [(s, b) for s in shapes for b in batches]
    for (in_f, out_f), batch in tqdm(jobs, desc="shapes", unit="shape"):
        torch.manual_seed(0)
        x, dy = torch.randn(batch, in_f), torch.randn(batch, out_f)
        dense_f = dense_fns(x, dy, in_f, out_f)
        cases = [(lay, bs, d) for lay, bs in LAYOUTS for d in densities]
        for layout, bs, d in tqdm(cases, desc=f"{in_f}->{out_f} B={batch}", leave=False):
            lin = sk.SparseLinear(in_f, out_f, density=d, layout=layout, block_size=bs)
            # dense and sparsekern alternate call by call: the shared host's speed moves
            # by 2x within minutes, and a ratio of two separate medians inherits that
            dense, ours = paired_ms(dense_f, sparsekern_fns(lin, x, dy), reps)
            flops = op_flops(lin, x)
            rows.append({"in": in_f, "out": out_f, "batch": batch, "density": d,
                         "layout": layout if bs is None else f"{layout}{bs}",
                         "dense_ms": dense, "sparsekern_ms": ours,
                         "torch_sparse_ms": median_ms_each(torch_sparse_fns(lin, x, dy), reps),
                         "sparseprop": sparseprop_peer.linear(lin, x, dy, reps),
                         "flops": flops, "throughput": throughput(dense, ours, flops, d, peak),
                         "memory": param_bytes(lin, in_f * out_f)})
    return rows


def markdown(rows, meta) -> str:
    out = [f"CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
           f"float32, {meta['date']}. Speedup = baseline time / sparsekern time (higher is better); "
           f"medians of {meta['reps']} runs, dense and sparsekern alternating call by call (torch.sparse and "
           f"SparseProp: 3 to {meta['reps']} runs). {peak_line(meta)}", "",
           "| in->out | batch | layout | density | fwd vs dense | dX vs dense | dW vs dense | fwd+bwd vs dense "
           "| ideal | fwd vs torch.sparse | fwd+bwd vs torch.sparse | fwd vs SparseProp | fwd+bwd vs SparseProp "
           "| param memory vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, o, t = r["dense_ms"], r["sparsekern_ms"], r["torch_sparse_ms"]
        out.append(f"| {case(r)} | "
                   + " | ".join(fmt(ratio(d[k], o[k])) for k in KINDS)
                   + f" | {1 / r['density']:.0f}x | {fmt(ratio(t['fwd'], o['fwd']))} | "
                     f"{fmt(ratio(t['fwd+bwd'], o['fwd+bwd']))} | {peer_cell(r['sparseprop'], o, 'fwd')} | "
                     f"{peer_cell(r['sparseprop'], o, 'fwd+bwd')} | {r['memory']['ratio'] * 100:.0f}% |")
    out += ["", *peer_notes(rows, "sparseprop", "SparseProp", lambda r: f"{r['layout']} {r['in']}->{r['out']}"), "",
            "Throughput: useful FLOPs 2 * batch * nnz per op (fwd, dX, dW; fwd+bwd = 3 ops), dense 2 * batch * in "
            "* out; % of dense rate = sparsekern's effective GFLOP/s / dense's achieved GFLOP/s; fraction of ideal "
            "= speedup / (1 / density).", "",
            *throughput_table(rows, ["in->out", "batch", "layout", "density"], case_cells)]
    return "\n".join(out) + "\n"


def case_cells(r) -> list[str]:
    return [f"{r['in']}->{r['out']}", str(r["batch"]), r["layout"], str(r["density"])]


def case(r) -> str:
    return " | ".join(case_cells(r))


def main():
    p = base_parser(__doc__, "4096->4096 at batch 256 only", [0.5, 0.2, 0.1, 0.05, 0.02])
    a = p.parse_args()
    if not sk.extension_available():
        raise SystemExit("the compiled extension is not built; run `bash scripts/setup.sh` first")
    shapes = [(4096, 4096)] if a.quick else [(4096, 4096), (768, 3072), (1024, 1024)]
    batches = [256] if a.quick else [256, 2048]
    meta = machine_meta(a.threads, a.reps)
    print(f"machine: {meta['cpu']} ({meta['cores']} cores), threads={a.threads}, torch {meta['torch']}")
    rows = run(shapes, batches, a.densities, a.reps, a.threads, meta["fma_peak"]["gflops"])
    md = markdown(rows, meta)
    write_results(a.out, "linear_cpu_quick" if a.quick else "linear_cpu", meta, rows, md,
                  lambda path: plot_speedups(rows, path, lambda r: (r["in"], r["out"], r["batch"], r["layout"]),
                                             lambda r: f"{r['layout']} {r['in']}->{r['out']}, batch {r['batch']}",
                                             "SparseLinear {kind} speedup over dense F.linear"))


if __name__ == "__main__":
    main()
