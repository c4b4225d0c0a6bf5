"""Sparse kernels under contention: how much a busy neighbour slows sparse against dense.

A user's training step rarely has the cores to itself: DataLoader workers, a second job,
a browser. Each case (fwd+bwd of one layer, dense and sparsekern side by side) is timed
in alternating rounds, quiet and with ``--competitors`` busy processes (started and stopped
by this script) sharing the cores. Two kinds of neighbour (``--neighbours``): ``spin``, a
pure-Python spin loop (one busy thread), and ``gemm``, a torch process multiplying
1024 x 1024 matrices on as many OpenMP threads as there are cores (another training job:
its threads spin at barriers too, the harsher case for fine-grained parallel regions). Reported per
case: each side's slowdown (loaded time / quiet time, medians) and their ratio,
``sparse slowdown / dense slowdown``; the goal is <= 1.3 (a sparse op may suffer at most
30% more than dense from the same neighbour).

    python3 benchmarks/bench_contention_cpu.py            # full (a few minutes)
    python3 benchmarks/bench_contention_cpu.py --quick    # one case, few rounds

Results go to benchmarks/results/<cpu>/contention_cpu.{json,md,png}. Which threads and
which OpenMP wait policy ran are recorded (OMP_WAIT_POLICY and GOMP_SPINCOUNT as set in
the environment; this script sets neither).
"""
from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import base_parser, machine_meta, median_ms, write_results  # noqa: E402

import sparsekern as sk  # noqa: E402
from sparsekern.nn import SparseConv2d, SparseLinear  # noqa: E402

GOAL = 1.3
SPIN = "import time\nwhile True:\n    pass\n"
GEMM = ("import os, torch\ntorch.set_num_threads(os.cpu_count())\na = torch.randn(1024, 1024)\n"
        "while True:\n    a @ a\n")
NEIGHBOURS = {"spin": SPIN, "gemm": GEMM}


def cases(quick: bool):
    """name -> (dense module, sparse module, input shape)."""
    torch.manual_seed(0)
    out = {}
    lin = nn.Linear(4096, 4096)
    out["linear 4096 csr 90%, batch 256"] = (lin, SparseLinear.from_dense(lin, density=0.1), (256, 4096))
    if quick:
        return out
    out["linear 4096 bsr16 90%, batch 256"] = (lin, SparseLinear.from_dense(lin, density=0.1, layout="bsr",
                                                                          block_size=16), (256, 4096))
    mlp = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    sparse_mlp = copy.deepcopy(mlp)
    sk.sparsify(sparse_mlp, density=0.1)                     # ERK, in place
    out["MLP 64-1024-1024-10 (main job) 90%, batch 64"] = (mlp, sparse_mlp, (64, 64))
    conv = nn.Conv2d(256, 256, 3, padding=1)
    out["conv 3x3 256 14x14 csr 90%, batch 8"] = (conv, SparseConv2d.from_dense(conv, density=0.1),
                                                  (8, 256, 14, 14))
    return out


def step_fn(module, shape):
    x = torch.randn(*shape, requires_grad=True)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
    return step


class Competitors:
    """``n`` busy processes of kind ``neighbour`` (see ``NEIGHBOURS``) for the duration of a ``with`` block."""

    def __init__(self, n: int, neighbour: str = "spin"):
        if neighbour not in NEIGHBOURS:
            raise ValueError(f"neighbour must be one of {sorted(NEIGHBOURS)}, got {neighbour!r}")
        self.n, self.neighbour, self.procs = n, neighbour, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", NEIGHBOURS[self.neighbour]]) for _ in range(self.n)]
        time.sleep(0.3 if self.neighbour == "spin" else 1.5)     # let them reach their loop (torch imports)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def measure(dense_fn, sparse_fn, rounds: int, reps: int, competitors: int, neighbour: str = "spin") -> dict:
    """Median ms of dense and sparse, quiet and loaded, rounds alternating."""
    t = {(side, load): [] for side in ("dense", "sparse") for load in ("quiet", "loaded")}
    for fn in (dense_fn, sparse_fn):
        fn(), fn()
    for _ in range(rounds):
        for load in ("quiet", "loaded"):
            ctx = Competitors(competitors, neighbour) if load == "loaded" else None
            if ctx:
                ctx.__enter__()
            try:
                t["dense", load].append(median_ms(dense_fn, reps, warmup=0, budget_s=None))
                t["sparse", load].append(median_ms(sparse_fn, reps, warmup=0, budget_s=None))
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
    med = {f"{side}_{load}_ms": statistics.median(v) for (side, load), v in t.items()}
    dense_slow = med["dense_loaded_ms"] / med["dense_quiet_ms"]
    sparse_slow = med["sparse_loaded_ms"] / med["sparse_quiet_ms"]
    return {**med, "dense_slowdown": dense_slow, "sparse_slowdown": sparse_slow,
            "relative_slowdown": sparse_slow / dense_slow,
            "speedup_quiet": med["dense_quiet_ms"] / med["sparse_quiet_ms"],
            "speedup_loaded": med["dense_loaded_ms"] / med["sparse_loaded_ms"]}


def table(meta, rows) -> str:
    lines = [f"CPU: {meta['cpu']} ({meta['cpu_vendor']} {meta['cpu_family_model']}, kernels "
             f"{meta['kernels']}), {meta['threads']} threads on {meta['cores']} cores, torch {meta['torch']}, "
             f"{meta['competitors']} busy competitor process(es) per loaded round, OMP_WAIT_POLICY={meta['omp_wait_policy']}, "
             f"{meta['date']}. fwd+bwd medians, {meta['rounds']} alternating quiet/loaded rounds of "
             f"{meta['reps']} steps each side.", "",
             "| case | neighbour | dense quiet ms | dense loaded ms | sparse quiet ms | sparse loaded ms | dense slowdown "
             "| sparse slowdown | sparse/dense slowdown (goal <= 1.3) | speedup quiet | speedup loaded |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "met" if r["relative_slowdown"] <= GOAL else "MISSED"
        lines.append(f"| {r['case']} | {r.get('neighbour', 'spin')} | {r['dense_quiet_ms']:.1f} | {r['dense_loaded_ms']:.1f} | "
                     f"{r['sparse_quiet_ms']:.1f} | {r['sparse_loaded_ms']:.1f} | {r['dense_slowdown']:.2f}x | "
                     f"{r['sparse_slowdown']:.2f}x | {r['relative_slowdown']:.2f} ({ok}) | "
                     f"{r['speedup_quiet']:.2f}x | {r['speedup_loaded']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows):
    def draw(path):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(9, 4))
        names = [f"{r['case']} ({r.get('neighbour', 'spin')})" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["dense_slowdown"] for r in rows], 0.4, label="dense slowdown")
        ax.bar([x + 0.2 for x in xs], [r["sparse_slowdown"] for r in rows], 0.4, label="sparsekern slowdown")
        ax.set_xticks(list(xs), names, rotation=15, ha="right", fontsize=7)
        ax.set_ylabel("loaded / quiet time")
        ax.axhline(1, color="gray", lw=0.8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    return draw


def main(argv=None):
    p = base_parser(__doc__, "one case, 3 rounds", ())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--competitors", type=int, default=1, help="busy processes in the loaded rounds")
    p.add_argument("--neighbours", nargs="+", choices=sorted(NEIGHBOURS), default=["spin", "gemm"],
                   help="kinds of busy process, each measured in its own rounds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    reps = min(args.reps, 5)
    meta = {**machine_meta(args.threads, reps), "rounds": rounds, "competitors": args.competitors,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "(unset)")}
    rows = []
    for name, (dense, sparse, shape) in cases(args.quick).items():
        for kind in args.neighbours:
            r = measure(step_fn(dense, shape), step_fn(sparse, shape), rounds, reps, args.competitors, kind)
            rows.append({"case": name, "neighbour": kind, **r})
            print(f"{name} ({kind}): dense x{r['dense_slowdown']:.2f}, sparse x{r['sparse_slowdown']:.2f}, "
                  f"relative {r['relative_slowdown']:.2f}", flush=True)
    write_results(args.out, "contention_cpu" + ("_quick" if args.quick else ""), meta, rows, table(meta, rows),
                  plot(rows))


if __name__ == "__main__":
    main()
