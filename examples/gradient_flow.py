"""The gradient-flow study (Evci et al. 2020) on the bundled digits data.

    python examples/gradient_flow.py                      # writes examples/results/gradient_flow.{png,md}
    python examples/gradient_flow.py --density 0.1 --depth 4 --epochs 3

Records the per-layer gradient norm over the first epochs of a deep sparse MLP
for three initialisations of the same budget: the dense init masked, the
sparse-aware fan-in init, and a lottery ticket rewound to its initial values
(:mod:`sparsekern.methods.gradflow`), then plots them and prints the norms at
initialisation.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sparsekern import data
from sparsekern.methods.gradflow import compare_inits, plot_gradient_flow
from sparsekern.models import mlp

OUT = Path(__file__).resolve().parent / "results"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--distribution", default="erk", choices=("uniform", "er", "erk"))
    p.add_argument("--depth", type=int, default=6, help="hidden layers of the MLP")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--ticket-epochs", type=int, default=10, help="dense training before the lottery mask")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    split = data.load("digits")
    x, y = split.x_train, split.y_train

    def make():
        return nn.Sequential(nn.Flatten(), *mlp((x[0].numel(),) + (a.width,) * a.depth + (split.num_classes,)))

    logs = compare_inits(make, x, y, a.density, a.distribution, a.epochs, a.ticket_epochs, seed=a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    title = f"digits, MLP {a.depth}x{a.width}, density {a.density} ({a.distribution})"
    plot_gradient_flow(logs, a.out / "gradient_flow.png", title)
    lines = [f"# Gradient flow: {title}, seed {a.seed}", "",
             "`python examples/gradient_flow.py` (torch " + torch.__version__ + ")", "",
             "| init | grad norm at init | mean over first epoch | loss after first epoch |", "|---|---|---|---|"]
    steps = len(logs["fanin"]) // a.epochs
    for init, log in logs.items():
        first = log[:steps]
        lines.append(f"| {init} | {log[0]['total']:.4g} | {sum(r['total'] for r in first) / len(first):.4g} | "
                     f"{first[-1]['loss']:.3f} |")
    md = "\n".join(lines) + "\n"
    (a.out / "gradient_flow.md").write_text(md)
    print(md)
    print(f"wrote {a.out / 'gradient_flow.png'} and .md")


if __name__ == "__main__":
    main()
