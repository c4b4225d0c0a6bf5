"""Helpers shared by the CPU benchmark scripts: machine description and timing."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

import torch

import sparsekern as sk


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


def machine_meta(threads: int, reps: int) -> dict:
    """Machine, versions and settings a result file records."""
    return {"cpu": cpu_model(), **{f"cpu_{k}": v for k, v in cpu_detail().items()},
            "threads": threads, "torch": torch.__version__, "kernels": sk.cpu_kernel_variant(),
            "sparsekern": sk.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "reps": reps, "dtype": "float32", "cores": os.cpu_count()}


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(r):
    return "n/a" if r is None else f"{r:.2f}x"


def base_parser(doc: str, quick_help: str, densities, results_dir):
    """The options every benchmark takes: --quick, --reps, --threads, --densities, --out."""
    import argparse
    from pathlib import Path
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--reps", type=int, default=7, help="timed runs per measurement (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads for every contender (default: torch's)")
    p.add_argument("--densities", type=float, nargs="+", default=list(densities))
    p.add_argument("--out", type=Path, default=results_dir, help="results directory")
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
