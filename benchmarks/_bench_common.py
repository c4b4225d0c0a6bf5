"""Helpers shared by the CPU benchmark scripts: machine description, timing, FLOP rates and
the results directory."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import sparsekern as sk
from sparsekern.flops import count_flops

import _fma_peak

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
# How many times one forward's FLOPs each kind of timed op performs (fwd+bwd = fwd, dX and dW).
KIND_OPS = {"fwd": 1, "dx": 1, "dw": 1, "fwd+bwd": 3}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, reps: int, warmup: int = 2, budget_s: float | None = 6.0) -> float:
    """Median (ms) of timed runs of ``fn``.

    With ``budget_s`` (the default): ``max(1, warmup)`` untimed runs, the first of which sizes
    the count: ``reps`` timed runs, fewer when one run is slow (torch.sparse's CSR backward
    takes seconds at high density) so they fit in ``budget_s``, but at least 3.
    With ``budget_s=None``: exactly ``warmup`` untimed runs (0 allowed), then exactly ``reps``
    timed ones."""
    if not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int, got {reps!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if budget_s is not None:
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0 or None, got {budget_s!r}")
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        warmup -= 1
        reps = max(3, min(reps, int(budget_s / max(first, 1e-9))))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def median_ms_each(fns: dict, reps: int) -> dict:
    """``median_ms`` of each contender; one that raises (RuntimeError, NotImplementedError) is
    recorded as None with ``<kind>_error``, never hidden."""
    out = {}
    for k, f in fns.items():
        try:
            out[k] = median_ms(f, reps)
        except (RuntimeError, NotImplementedError) as exc:
            out[k] = None
            out[k + "_error"] = str(exc).splitlines()[0][:120]
    return out


def cpu_detail() -> dict:
    """Vendor, family/model and the vector ISA: "AMD EPYC" alone does not tell Zen 3
    (AVX2) from Zen 4 (AVX-512), and the kernels' speed depends on it."""
    from sparsekern import _cpu_isa
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model") and key not in info:
                info[key] = val.strip()
            if len(info) == 3:
                break
    except OSError:
        pass
    flags = _cpu_isa.cpu_flags() or set()
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    if "amx_tile" in flags:
        isa += "+amx"
    return {"vendor": info.get("vendor_id", platform.machine()),
            "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}", "isa": isa}


def cpu_slug() -> str:
    """A directory name per kind of CPU, e.g. 'amd-epyc-25-1-avx2'."""
    d = cpu_detail()
    name = "".join(c if c.isalnum() else "-" for c in cpu_model().lower()).strip("-")
    while "--" in name:
        name = name.replace("--", "-")
    return f"{name}-{d['family_model'].replace('/', '-')}-{d['isa'].replace('+', '-')}"


def results_dir() -> Path:
    """The default ``--out`` of every CPU benchmark: ``benchmarks/results/<cpu_slug()>/``."""
    return RESULTS_ROOT / cpu_slug()


def machine_meta(threads: int, reps: int) -> dict:
    """Machine, versions and settings a result file records, with the register-only FMA peak
    on ``threads`` threads (``fma_peak``; its ``gflops`` is None, with ``error``, without gcc)."""
    return {"cpu": cpu_model(), **{f"cpu_{k}": v for k, v in cpu_detail().items()},
            "threads": threads, "torch": torch.__version__, "kernels": sk.cpu_kernel_variant(),
            "sparsekern": sk.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "reps": reps, "dtype": "float32", "cores": os.cpu_count(), "fma_peak": _fma_peak.measure(threads)}


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(r):
    return "n/a" if r is None else f"{r:.2f}x"


def pct(f):
    return "n/a" if f is None else f"{f * 100:.1f}%"


def fmt_gflops(g):
    return "n/a" if g is None else f"{g:.1f}"


def gflops(flops, ms):
    """GFLOP/s of ``flops`` floating-point operations done in ``ms`` milliseconds (None if ms is None)."""
    if ms is None:
        return None
    if flops < 0 or ms <= 0:
        raise ValueError(f"need flops >= 0 and ms > 0, got flops={flops!r}, ms={ms!r}")
    return flops / (ms * 1e6)


def op_flops(layer, x) -> dict:
    """FLOPs of one op (a forward, a dX or a dW) of a sparsekern layer on the batch ``x``, from
    :func:`sparsekern.flops.count_flops`: ``useful = 2 * batch * positions * nnz`` (positions:
    1 for a linear, OH*OW for a conv, whose weight is Cout x Cin*kh*kw) and ``dense`` the same
    with the full weight."""
    layers = count_flops(layer, x[:1]).layers
    if len(layers) != 1:
        raise ValueError(f"op_flops takes one weighted layer, got {len(layers)}")
    lf = layers[0]
    per = 2 * x.shape[0] * lf.positions
    return {"useful": per * lf.nnz, "dense": per * lf.numel}


def throughput(dense_ms: dict, sparse_ms: dict, flops: dict, density: float, peak) -> dict:
    """Per timed kind: the dense baseline's achieved GFLOP/s, the sparse kernel's effective GFLOP/s
    (useful FLOPs only, from ``op_flops``), the latter as a fraction of the dense rate and of the FMA
    ``peak`` (GFLOP/s or None), the dense rate's fraction of the peak, and the fraction of the ideal
    (speedup / (1 / density), ``density`` the nominal one). Kinds missing from either side are None."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    out = {}
    for kind, n in KIND_OPS.items():
        d_ms, s_ms = dense_ms.get(kind), sparse_ms.get(kind)
        dg, sg = gflops(n * flops["dense"], d_ms), gflops(n * flops["useful"], s_ms)
        speedup = ratio(d_ms, s_ms)
        out[kind] = {"dense_gflops": dg, "sparse_eff_gflops": sg, "frac_of_dense_rate": ratio(sg, dg),
                     "frac_of_fma_peak": ratio(sg, peak), "dense_frac_of_fma_peak": ratio(dg, peak),
                     "frac_of_ideal": None if speedup is None else speedup * density}
    return out


def peak_line(meta) -> str:
    """The FMA peak sentence of a results header."""
    p = meta.get("fma_peak") or {}
    if p.get("gflops") is None:
        return f"FMA peak: not measured ({p.get('error', 'unknown')})."
    return (f"FMA peak (register-only {p['isa']}, {p['accumulators']} accumulators, {p['threads']} threads): "
            f"{p['gflops']:.1f} GFLOP/s.")


def throughput_table(rows, head: list[str], cells) -> list[str]:
    """Markdown lines: per row, the case's ``cells(row)`` under ``head``, then for fwd and fwd+bwd
    the dense GFLOP/s, sparsekern's effective GFLOP/s, % of the dense rate and % of the FMA peak,
    and fwd+bwd's fraction of the ideal."""
    cols = [f"{k} {c}" for k in ("fwd", "fwd+bwd")
            for c in ("dense GFLOP/s", "sparse eff. GFLOP/s", "% of dense rate", "% of FMA peak")]
    cols.append("fwd+bwd fraction of ideal")
    out = ["| " + " | ".join(head + cols) + " |", "|" + "---|" * (len(head) + len(cols))]
    for r in rows:
        t = r["throughput"]
        vals = []
        for k in ("fwd", "fwd+bwd"):
            vals += [fmt_gflops(t[k]["dense_gflops"]), fmt_gflops(t[k]["sparse_eff_gflops"]),
                     pct(t[k]["frac_of_dense_rate"]), pct(t[k]["frac_of_fma_peak"])]
        vals.append(pct(t["fwd+bwd"]["frac_of_ideal"]))
        out.append("| " + " | ".join(list(cells(r)) + vals) + " |")
    return out


def peer_cell(peer: dict, ours_ms: dict, kind: str) -> str:
    """A peer's speedup cell (peer time / sparsekern time), else its status ("not installed", ...)."""
    ms = (peer.get("ms") or {}).get(kind)
    if ms is not None:
        return fmt(ratio(ms, ours_ms[kind]))
    return "n/a" if peer["status"] == "ok" else peer["status"]


def peer_notes(rows, key: str, name: str, label) -> list[str]:
    """One line per distinct reason a peer (``row[key]``) has no numbers, naming the cases (``label(row)``)."""
    why: dict[str, list[str]] = {}
    for r in rows:
        p = r[key]
        if p["status"] != "ok":
            why.setdefault(f"{p['status']}: {p.get('reason') or ''}".rstrip(": "), []).append(label(r))
    return [f"{name} {reason} ({', '.join(dict.fromkeys(cases))})." for reason, cases in why.items()]


def base_parser(doc: str, quick_help: str, densities, out: Path | None = None):
    """The options every benchmark takes: --quick, --reps, --threads, --densities, --out
    (default: ``out`` or this CPU's ``results_dir()``)."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--reps", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads for every contender (default: torch's)")
    p.add_argument("--densities", type=float, nargs="+", default=list(densities))
    p.add_argument("--out", type=Path, default=out or results_dir(),
                   help="results directory (default: benchmarks/results/<cpu>/)")
    return p


def plot_speedups(rows, path, key, label, title):
    """Speedup over dense against sparsity, fwd and fwd+bwd panels, one line per key(row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, kind in zip(axes, ("fwd", "fwd+bwd")):
        for k in sorted({key(r) for r in rows}):
            rs = sorted((r for r in rows if key(r) == k), key=lambda r: r["density"])
            csr = rs[0]["layout"] == "csr"
            ax.plot([1 - r["density"] for r in rs], [r["dense_ms"][kind] / r["sparsekern_ms"][kind] for r in rs],
                    marker="o" if csr else "s", ls="-" if csr else ":", label=label(rs[0]))
        ideal = sorted({1 - r["density"] for r in rows})
        ax.plot(ideal, [1 / (1 - s) for s in ideal], "k--", label="ideal 1/density")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_title(title.format(kind=kind))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup (x)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(out, stem, meta, rows, md, plot):
    """<out>/<stem>.json, .md and .png (plot(path) draws the figure)."""
    import json
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / f"{stem}.md").write_text(md)
    plot(out / f"{stem}.png")
    print(md)
    print(f"wrote {out / stem}.json, .md and .png")


def paired_ms(fns_a: dict, fns_b: dict, reps: int, warmup: int = 1) -> tuple[dict, dict]:
    """Medians (ms) of two sets of contenders timed in alternation, kind by kind
    (a, b, a, b, ...), so a drift of the shared machine hits both sides alike."""
    out_a, out_b = {}, {}
    for k in fns_a:
        fa, fb = fns_a[k], fns_b[k]
        for _ in range(warmup):
            fa(), fb()
        ta, tb = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            fa()
            t1 = time.perf_counter()
            fb()
            t2 = time.perf_counter()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        out_a[k], out_b[k] = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
    return out_a, out_b
