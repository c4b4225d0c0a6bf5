"""Collect training-command results into one markdown table.

    python -m sparsekern.report runs/methods/rigl runs/methods/suptickets runs/methods/edst

Each argument is a ``--out`` directory (or its ``results.json``) of
``python -m sparsekern.train``. Runs of one method that differ only by seed
make one row (mean ± sample std), the dense baselines found in them another; columns: test accuracy, NLL, ECE, nonzero weights,
inference FLOPs per example and total training FLOPs (from the real nonzeros).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_runs(paths) -> list[dict]:
    runs, dense = [], []
    for p in paths:
        p = Path(p)
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise SystemExit(f"sparsekern.report: {f} does not exist (run the training command first)")
        res = json.loads(f.read_text())
        for r in res["runs"]:
            r["_args"] = res.get("args", {})
            (dense if r["method"] == "dense" else runs).append(r)
    seen, unique_dense = set(), []
    for r in dense:                      # a cached baseline appears in several files: count it once
        key = json.dumps(r["final"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique_dense.append(r)
    return unique_dense + runs


GROW = {"rigl": "RigL", "set": "SET"}


def label(r) -> str:
    a = r["_args"]
    m = r["method"]
    if m == "suptickets":
        return f"{GROW[a.get('grow', 'rigl')]} + Sup-tickets ({a.get('superpose', 'caa').upper()}, {r.get('tickets', '?')} tickets)"
    if m == "edst":
        return f"EDST ensemble (M={r.get('tickets')})"
    if m == "ensemble":
        return f"DST ensemble (M={r.get('tickets')} runs of {GROW[a.get('grow', 'rigl')]})"
    return {"rigl": "RigL", "set": "SET", "static": "static sparse", "dense": "dense",
            "threshold": "trainable thresholds"}.get(m, m)


def _mean_std(xs):
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def _fmt(xs, scale=1.0, digits=3, unit=""):
    m, sd = _mean_std([x * scale for x in xs])
    return f"{m:.{digits}f}{unit}" + (f" ± {sd:.{digits}f}" if len(xs) > 1 else "")


def markdown(runs) -> str:
    """Runs of the same method and options (seeds apart) are one row: mean ± sample std."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(label(r), []).append(r)
    lines = ["| method | runs (seeds) | accuracy (%) | NLL | ECE | weights (nnz) | inference FLOPs | "
             "training FLOPs |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        f = [r["final"] for r in rs]
        lines.append(f"| {name} | {len(rs)} | {_fmt([x['accuracy'] for x in f], 100, 2)} | "
                     f"{_fmt([x['nll'] for x in f])} | {_fmt([x['ece'] for x in f])} | {rs[0]['weights_nnz']:,} | "
                     f"{rs[0]['inference_flops']:.3g} | {rs[0].get('train_flops_total', 0):.3g} |")
    diverse = {n: rs for n, rs in groups.items() if "disagreement" in rs[0]}
    if diverse:
        lines += ["", "| ensemble | mean member accuracy (%) | disagreement | KL |", "|---|---|---|---|"]
        for name, rs in diverse.items():
            member = [sum(m["accuracy"] for m in r["members"]) / len(r["members"]) for r in rs]
            lines.append(f"| {name} | {_fmt(member, 100, 2)} | {_fmt([r['disagreement'] for r in rs], 1, 4)} | "
                         f"{_fmt([r['kl'] for r in rs], 1, 4)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="--out directories (or results.json files) of training runs")
    a = p.parse_args(argv)
    print(markdown(load_runs(a.runs)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
