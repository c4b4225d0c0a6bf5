"""Train a genuinely sparse network end to end and compare it with dense (work in progress).

    python -m sparsekern.train --method rigl --density 0.1 --epochs 10

Trains the chosen method and, unless ``--no-baseline``, the same model dense on the
same data, then prints a side-by-side table (accuracy, NLL, ECE, nonzero parameters
and bytes, FLOPs from the real nonzeros, time per step) and writes ``results.json``
in ``--out``. Datasets are local (see :mod:`sparsekern.data`). Not yet here (issue 5):
config files, plots, checkpoints/resume, the tickets methods.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparsekern as sk
from sparsekern import data as datasets
from sparsekern.flops import count_flops
from sparsekern.models import LeNet5, mlp, resnet20, vgg

MODELS = ("mlp", "lenet5", "resnet20", "vgg")
METHODS = ("dense", "static", "set", "rigl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekern-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", help=f"one of {MODELS}")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    p.add_argument("--dataset", default="digits", help=f"one of {datasets.DATASETS}")
    p.add_argument("--data-dir", help="directory of the CIFAR python pickles")
    p.add_argument("--method", default="rigl", help=f"one of {METHODS}")
    p.add_argument("--density", type=float, default=0.1, help="fraction of weights kept, in (0, 1]")
    p.add_argument("--distribution", default="erk", choices=("uniform", "er", "erk"))
    p.add_argument("--init", default="fanin", choices=("dense", "fanin"))
    p.add_argument("--layout", default="csr", choices=("csr", "bsr"))
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--update-every", type=int, default=100, help="steps between topology updates")
    p.add_argument("--drop-fraction", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the dense baseline run")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="results directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class UsageError(ValueError):
    """A user mistake: printed as one line, exit status 2."""


def check_args(a) -> None:
    if a.model not in MODELS:
        raise UsageError(f"unknown model {a.model!r}; choose one of {MODELS}")
    if a.method not in METHODS:
        raise UsageError(f"unknown method {a.method!r}; choose one of {METHODS}")
    if a.dataset not in datasets.DATASETS:
        raise UsageError(f"unknown dataset {a.dataset!r}; choose one of {datasets.DATASETS}")
    if not (0.0 < a.density <= 1.0) or math.isnan(a.density):
        raise UsageError(f"--density must be in (0, 1], got {a.density}")
    for name in ("epochs", "batch_size", "update_every"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")


def make_model(name: str, input_shape, classes: int, width: int):
    if name == "mlp":
        n_in = int(torch.tensor(input_shape).prod())
        return torch.nn.Sequential(torch.nn.Flatten(), *mlp((n_in, width, width, classes)))
    if name == "lenet5":
        c, h = (input_shape[0], input_shape[1]) if len(input_shape) == 3 else (1, 8)
        return LeNet5(classes, c, h)
    if len(input_shape) != 3:
        raise UsageError(f"model {name!r} needs image inputs; dataset gives shape {tuple(input_shape)}")
    return resnet20(classes) if name == "resnet20" else vgg(classes, in_channels=input_shape[0])


@torch.no_grad()
def evaluate(model, x, y, batch=512, bins=15) -> dict:
    """Accuracy, mean NLL and expected calibration error (``bins`` equal-width bins)."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train()
    prob = logits.softmax(1)
    conf, pred = prob.max(1)
    correct = (pred == y).float()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean().item() * abs(conf[m].mean().item() - correct[m].mean().item())
    return {"accuracy": correct.mean().item(), "nll": F.cross_entropy(logits, y).item(), "ece": ece}


def param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def train_one(a, split, method: str) -> dict:
    """Train ``method`` on ``split``; returns metrics, FLOPs and timings."""
    torch.manual_seed(a.seed)
    model = make_model(a.model, split.input_shape, split.num_classes, a.width)
    engine = None
    report = None
    if method != "dense":
        report = sk.sparsify(model, a.density, a.distribution, init=a.init, layout=a.layout,
                             block_size=a.block_size, generator=torch.Generator().manual_seed(a.seed))
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=a.lr, momentum=0.9, nesterov=True) if a.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=a.lr))
    steps_per_epoch = math.ceil(len(split.x_train) / a.batch_size)
    total = steps_per_epoch * a.epochs
    if method in ("static", "set", "rigl"):
        cls = {"static": sk.dst.Static, "set": sk.dst.SET, "rigl": sk.dst.RigL}[method]
        engine = cls(model, opt, total_steps=total, update_every=a.update_every,
                     drop_fraction=a.drop_fraction, seed=a.seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    g = torch.Generator().manual_seed(a.seed)
    history, step_times = [], []
    bar = tqdm(range(a.epochs), desc=f"{method}", disable=a.quiet, unit="epoch")
    for epoch in bar:
        order = torch.randperm(len(split.x_train), generator=g)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * a.batch_size:(i + 1) * a.batch_size]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
            loss.backward()
            opt.step()
            if engine is not None:
                engine.step()
            sched.step()
            step_times.append(time.perf_counter() - t0)
            loss_sum += loss.item()
        metrics = evaluate(model, split.x_test, split.y_test)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / steps_per_epoch, **metrics})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                        ms_step=f"{1e3 * sum(step_times[-steps_per_epoch:]) / steps_per_epoch:.1f}")
    flops = count_flops(model, split.x_test[:1])
    nnz = sum(m.nnz if isinstance(m, (sk.SparseLinear, sk.SparseConv2d)) else m.weight.numel()
              for m in model.modules() if isinstance(m, (sk.SparseLinear, sk.SparseConv2d,
                                                         torch.nn.Linear, torch.nn.Conv2d)))
    steady = sorted(step_times)[: max(1, len(step_times) // 2)]    # lower half: steady-state steps
    return {"method": method, "final": history[-1], "history": history, "weights_nnz": nnz,
            "param_bytes": param_bytes(model), "inference_flops": flops.inference(),
            "train_flops_per_example": flops.training_step(a.update_every if method == "rigl" else None),
            "ms_per_step": 1e3 * sum(step_times) / len(step_times),
            "ms_per_step_median": 1e3 * sorted(step_times)[len(step_times) // 2],
            "ms_per_step_steady": 1e3 * sum(steady) / len(steady),
            "total_s": sum(step_times), "itop_rate": engine.itop_rate() if engine else None,
            "sparsity_report": report.to_dict() if report else None}


def table(runs: list[dict]) -> str:
    rows = [("accuracy", lambda r: f"{r['final']['accuracy'] * 100:.2f}%"),
            ("NLL", lambda r: f"{r['final']['nll']:.3f}"), ("ECE", lambda r: f"{r['final']['ece']:.3f}"),
            ("weights (nnz)", lambda r: f"{r['weights_nnz']:,}"),
            ("parameter bytes", lambda r: f"{r['param_bytes']:,}"),
            ("inference FLOPs/example", lambda r: f"{r['inference_flops']:,.0f}"),
            ("training FLOPs/example", lambda r: f"{r['train_flops_per_example']:,.0f}"),
            ("ms/step (median)", lambda r: f"{r['ms_per_step_median']:.2f}"),
            ("total train s", lambda r: f"{r['total_s']:.1f}")]
    head = f"{'':26}" + "".join(f"{r['method']:>16}" for r in runs)
    lines = [head, "-" * len(head)]
    for name, f in rows:
        lines.append(f"{name:26}" + "".join(f"{f(r):>16}" for r in runs))
    if len(runs) == 2:
        s, d = runs
        lines.append(f"{'sparse / dense':26}accuracy {100 * (s['final']['accuracy'] - d['final']['accuracy']):+.2f} pts, "
                     f"weights {s['weights_nnz'] / d['weights_nnz']:.3f}, training FLOPs "
                     f"{s['train_flops_per_example'] / d['train_flops_per_example']:.3f}, step time "
                     f"{d['ms_per_step_median'] / s['ms_per_step_median']:.2f}x faster")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        check_args(a)
        if a.threads:
            torch.set_num_threads(a.threads)
        kwargs = {"image": a.model != "mlp"} if a.dataset == "digits" else {}
        split = datasets.load(a.dataset, root=a.data_dir, **kwargs)
        runs = [train_one(a, split, a.method)]
        if not a.no_baseline and a.method != "dense":
            runs.append(train_one(a, split, "dense"))
    except (UsageError, datasets.DatasetError) as exc:
        print(f"sparsekern-train: error: {exc}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                    "runs": runs}, indent=1))
    print(table(runs))
    print(f"wrote {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
