"""How fast is SparseConv2d on CPU against dense F.conv2d (oneDNN), torch.sparse and SparseProp?

Times forward, dX, dW and forward+backward of three ResNet convolutions at
batch 32, float32, densities 0.2, 0.1, 0.05 and 0.02, for CSR and for BSR
with 16x16 blocks:

* 3x3 64->64 at 56x56,
* 3x3 256->256 at 14x14,
* 1x1 1024->256 at 14x14,

against dense ``F.conv2d`` (and its ``torch.nn.grad`` input/weight gradients;
timed in alternation with sparsekern, run by run) and against ``torch.sparse`` on the same nonzeros (``F.unfold`` then
``torch.sparse.mm`` with a CSR weight, the only sparse conv torch offers) and
against SparseProp's ``SparseConv2d`` on the same nonzeros (forward and
forward+backward, CSR only, the faster of its two vectorisations that passed the
check against dense; ``_sparseprop_peer.py``), all in one process with the same
thread count. Reports the dense baseline's GFLOP/s and sparsekern's effective
GFLOP/s (useful FLOPs ``2 * batch * OH*OW * nnz`` of the Cout x Cin*kh*kw weight per
op) against the dense rate and the register-only FMA peak. Writes
``benchmarks/results/<cpu>/conv_cpu.{json,md,png}`` and checks the issue's targets
(3x3 256->256: fwd+bwd >= 3x dense at 90% sparsity, >= 6x at 95%).

    python benchmarks/bench_conv_cpu.py            # full suite (~5 min on 2 cores)
    python benchmarks/bench_conv_cpu.py --quick    # 3x3 256->256 only, CSR
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
# (name, Cin, Cout, kernel, H=W, batch)
SHAPES = [("3x3 64->64 56x56", 64, 64, 3, 56, 32), ("3x3 256->256 14x14", 256, 256, 3, 14, 32),
          ("1x1 1024->256 14x14", 1024, 256, 1, 14, 32)]
LAYOUTS = (("csr", None), ("bsr", 16))
TARGETS = {("3x3 256->256 14x14", "csr", 0.1): 3.0, ("3x3 256->256 14x14", "csr", 0.05): 6.0}


def dense_fns(x, dy, cin, cout, k):
    w = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
    pad = k // 2
    wr, xr = w.clone().requires_grad_(), x.clone().requires_grad_()

    def fwd_bwd():
        F.conv2d(xr, wr, padding=pad).backward(dy)
        xr.grad = wr.grad = None

    return {"fwd": lambda: F.conv2d(x, w, padding=pad),
            "dx": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=pad),
            "dw": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=pad),
            "fwd+bwd": fwd_bwd}


def torch_sparse_fns(conv, x, dy):
    """im2col + torch.sparse CSR matmul: y[n] = W_csr @ unfold(x)[n]."""
    k, pad = conv.kernel_size[0], conv.padding[0]
    n, cout = x.shape[0], conv.out_channels
    w_csr = conv.topology.to_dense().to_sparse_csr()
    vals = w_csr.values().clone().requires_grad_()
    xr = x.clone().requires_grad_()

    def conv_ts(xin, w):
        cols = F.unfold(xin, k, padding=pad)                             # [N, K, L]
        y = torch.sparse.mm(w, cols.transpose(0, 1).reshape(cols.shape[1], -1))
        return y.reshape(cout, n, -1).transpose(0, 1).reshape(n, cout, *x.shape[2:])

    def fwd_bwd():
        w = torch.sparse_csr_tensor(w_csr.crow_indices(), w_csr.col_indices(), vals, w_csr.shape)
        conv_ts(xr, w).backward(dy)
        xr.grad = vals.grad = None

    return {"fwd": lambda: conv_ts(x, w_csr), "fwd+bwd": fwd_bwd}


def sparsekern_fns(conv, x, dy):
    w = conv.topology
    v, topo, geo = w.values.detach(), w.topology(), conv.geometry
    xr = x.clone().requires_grad_()

    def fwd_bwd():
        conv(xr).backward(dy)
        xr.grad = w.values.grad = None

    def fwd():
        with torch.no_grad():
            return conv(x)

    return {"fwd": fwd, "dx": lambda: L.conv2d_dx(dy, v, *topo, geo, list(x.shape)),
            "dw": lambda: L.conv2d_dw(dy, x, *topo, geo, w.block_size), "fwd+bwd": fwd_bwd}


def param_bytes(conv, dense_numel: int) -> dict:
    """Training-step bytes per weight (SGD+momentum): sparse values, indices, transpose,
    gradient and momentum; dense weight, gradient and momentum."""
    w = conv.topology
    sparse = sum(t.numel() * t.element_size() for t in (w.values, *w.topology()))
    sparse += 2 * w.values.numel() * w.values.element_size()
    dense = 3 * dense_numel * 4
    return {"sparse_bytes": sparse, "dense_bytes": dense, "ratio": sparse / dense}


def run(shapes, layouts, densities, reps, threads, peak=None):
    """One row per (shape, layout, density); ``peak``: the FMA peak GFLOP/s (or None)."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
    rows = []
    for name, cin, cout, k, hw, batch in tqdm(shapes, desc="shapes", unit="shape"):
        torch.manual_seed(0)
        x, dy = torch.randn(batch, cin, hw, hw), torch.randn(batch, cout, hw, hw)
        dense_f = dense_fns(x, dy, cin, cout, k)
        cases = [(lay, bs, d) for lay, bs in layouts for d in densities]
        for layout, bs, d in tqdm(cases, desc=name, leave=False):
            conv = sk.SparseConv2d(cin, cout, k, padding=k // 2, bias=False, density=d, layout=layout,
                                   block_size=bs)
            # dense and sparsekern alternate run by run, so machine drift hits both
            dense, ours = paired_ms(dense_f, sparsekern_fns(conv, x, dy), reps)
            flops = op_flops(conv, x)
            rows.append({"shape": name, "batch": batch, "density": d,
                         "layout": layout if bs is None else f"{layout}{bs}",
                         "dense_ms": dense, "sparsekern_ms": ours,
                         "torch_sparse_ms": median_ms_each(torch_sparse_fns(conv, x, dy), reps),
                         "sparseprop": sparseprop_peer.conv(conv, x, dy, reps),
                         "flops": flops, "throughput": throughput(dense, ours, flops, d, peak),
                         "memory": param_bytes(conv, cout * cin * k * k)})
    return rows


def targets(rows):
    lines = []
    for (shape, layout, d), want in TARGETS.items():
        for r in rows:
            if (r["shape"], r["layout"], r["density"]) == (shape, layout, d):
                got = ratio(r["dense_ms"]["fwd+bwd"], r["sparsekern_ms"]["fwd+bwd"])
                lines.append(f"target {shape} {layout} {1 - d:.0%} sparse fwd+bwd: >= {want:g}x, "
                             f"measured {fmt(got)} -> {'MET' if got and got >= want else 'MISSED'}")
    return lines


def markdown(rows, meta) -> str:
    out = [f"CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, float32, "
           f"batch 32, NCHW, {meta['date']}. Speedup = baseline time / sparsekern time "
           f"(higher is better); medians of {meta['reps']} runs, dense and sparsekern alternating "
           f"run by run (torch.sparse and SparseProp: 3 to {meta['reps']} runs). {peak_line(meta)}", "",
           "| conv | layout | density | fwd vs dense | dX vs dense | dW vs dense | fwd+bwd vs dense "
           "| ideal | fwd vs torch.sparse | fwd+bwd vs torch.sparse | fwd vs SparseProp | fwd+bwd vs SparseProp "
           "| param memory vs dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, o, t = r["dense_ms"], r["sparsekern_ms"], r["torch_sparse_ms"]
        out.append(f"| {' | '.join(case_cells(r))} | "
                   + " | ".join(fmt(ratio(d[k], o[k])) for k in KINDS)
                   + f" | {1 / r['density']:.0f}x | {fmt(ratio(t['fwd'], o['fwd']))} | "
                     f"{fmt(ratio(t['fwd+bwd'], o['fwd+bwd']))} | {peer_cell(r['sparseprop'], o, 'fwd')} | "
                     f"{peer_cell(r['sparseprop'], o, 'fwd+bwd')} | {r['memory']['ratio'] * 100:.0f}% |")
    out += ["", *peer_notes(rows, "sparseprop", "SparseProp", lambda r: f"{r['layout']} {r['shape']}"), "",
            "Throughput: useful FLOPs 2 * batch * OH*OW * nnz per op (fwd, dX, dW; fwd+bwd = 3 ops), dense the same "
            "with the full Cout x Cin*kh*kw weight; % of dense rate = sparsekern's effective GFLOP/s / dense's "
            "achieved GFLOP/s; fraction of ideal = speedup / (1 / density).", "",
            *throughput_table(rows, ["conv", "layout", "density"], case_cells)]
    return "\n".join(out) + "\n\n" + "\n".join(targets(rows)) + "\n"


def case_cells(r) -> list[str]:
    return [r["shape"], r["layout"], str(r["density"])]


def main():
    p = base_parser(__doc__, "3x3 256->256 at 14x14, CSR only", [0.2, 0.1, 0.05, 0.02])
    a = p.parse_args()
    if not sk.extension_available():
        raise SystemExit("the compiled extension is not built; run `bash scripts/setup.sh` first")
    shapes = SHAPES[1:2] if a.quick else SHAPES
    layouts = LAYOUTS[:1] if a.quick else LAYOUTS
    meta = machine_meta(a.threads, a.reps)
    print(f"machine: {meta['cpu']} ({meta['cores']} cores), threads={a.threads}, torch {meta['torch']}")
    rows = run(shapes, layouts, a.densities, a.reps, a.threads, meta["fma_peak"]["gflops"])
    md = markdown(rows, meta)
    write_results(a.out, "conv_cpu_quick" if a.quick else "conv_cpu", meta, rows, md,
                  lambda path: plot_speedups(rows, path, lambda r: (r["shape"], r["layout"]),
                                             lambda r: f"{r['layout']} {r['shape']}",
                                             "SparseConv2d {kind} speedup over dense F.conv2d (batch 32)"))


if __name__ == "__main__":
    main()
