"""A run's results (:func:`summarise`), the side-by-side table (:func:`table`) and the
plots (:func:`plot`) of the training command.

Step times are reported as the median and interquartile range of every step of the run;
the sparse/dense line gives the ratio of the medians and the range the quartiles allow
(dense's 25th percentile over sparse's 75th, to dense's 75th over sparse's 25th), so one
noisy stretch of the shared machine shows as a wide range, not as the answer.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import sparsekern as sk
from sparsekern.flops import count_flops

SPARSE_TYPES = (sk.SparseLinear, sk.SparseConv2d)


def _numel(m: nn.Module) -> int:
    """Positions of a sparse layer's weight (its dense size), from its public shape."""
    return math.prod(m.weight.shape)


def model_density(model: nn.Module) -> float:
    """Nonzeros over positions of every sparse layer of ``model`` (1.0 without one)."""
    layers = [m for m in model.modules() if isinstance(m, SPARSE_TYPES)]
    total = sum(_numel(m) for m in layers)
    return sum(m.nnz for m in layers) / total if total else 1.0


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (the sparse indices are buffers)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def training_state_bytes(model: nn.Module, opt) -> int:
    """Parameters, buffers (sparse indices), gradients and optimizer state: what training keeps per weight."""
    total = param_bytes(model)
    total += sum(p.numel() * p.element_size() for p in model.parameters())           # gradients
    for st in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of ``values`` (linear interpolation)."""
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def summarise(trainer, final, peak_rss_mb: float) -> dict:
    """The results of a finished :class:`~sparsekern.train.loop.Trainer` whose method reported
    ``final`` (:class:`~sparsekern.train.methods.Final`); includes "model" (not serialisable:
    the caller drops it before writing)."""
    a, split, method = trainer.a, trainer.split, trainer.method
    metrics = final.metrics if final.metrics is not None else trainer.task.evaluate(final.model, split.x_test,
                                                                                     split.y_test)
    members = final.members
    flops = count_flops(members[0], split.x_test[:1])
    nnz = len(members) * sum(m.nnz if isinstance(m, SPARSE_TYPES) else m.weight.numel()
                             for m in members[0].modules()
                             if isinstance(m, SPARSE_TYPES + (nn.Linear, nn.Conv2d)))
    n_train = len(split.x_train)
    per_example = method.train_flops_per_example(trainer, flops)
    train_total = per_example * n_train * a.epochs + method.extra_train_flops(trainer, flops)
    times_ms = [1e3 * t for t in trainer.step_times]
    q1, median, q3 = quartiles(times_ms)
    run = {"method": method.name, "task": trainer.task.name, "final": {"epoch": a.epochs, **metrics},
           "history": trainer.history, "weights_nnz": nnz,
           "param_bytes": sum(param_bytes(m) for m in members),
           "training_state_bytes": training_state_bytes(trainer.model, trainer.opt),
           "peak_rss_mb": peak_rss_mb, "inference_flops": len(members) * flops.inference(),
           "train_flops_per_example": per_example, "train_flops_total": train_total,
           "ms_per_step": sum(times_ms) / len(times_ms), "ms_per_step_median": median,
           "ms_per_step_iqr": [q1, q3], "step_times_ms": times_ms, "total_s": sum(trainer.step_times),
           "update_every": trainer.plan.update_every,
           "itop_rate": method.engine.itop_rate() if method.engine else None, "itop_log": trainer.log,
           "layer_density": {n: m.density for n, m in members[0].named_modules() if isinstance(m, SPARSE_TYPES)},
           "sparsity_report": trainer.report.to_dict() if trainer.report else None,
           "state_digest": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
           **final.extra, "model": final.model}
    if trainer.ranks.distributed:
        run["distributed"] = {"world_size": trainer.ranks.world, "backend": trainer.ranks.backend,
                              "rank_digests": trainer.digests}
    return run


def _rows(task: str):
    if task == "language-model":
        return [("validation loss (nats/byte)", lambda r: f"{r['final']['loss']:.3f}"),
                ("perplexity", lambda r: f"{r['final']['perplexity']:.3f}"),
                ("bits per byte", lambda r: f"{r['final']['bits_per_byte']:.3f}"),
                ("next-byte accuracy", lambda r: f"{r['final']['accuracy'] * 100:.2f}%")]
    return [("accuracy", lambda r: f"{r['final']['accuracy'] * 100:.2f}%"),
            ("NLL", lambda r: f"{r['final']['nll']:.3f}"), ("ECE", lambda r: f"{r['final']['ece']:.3f}")]


def _iqr(r) -> str:
    lo, hi = r.get("ms_per_step_iqr", (r["ms_per_step_median"],) * 2)
    return f"{lo:.2f}-{hi:.2f}"


def table(runs: list[dict]) -> str:
    """The runs side by side; with two (the method and its dense baseline) a sparse/dense line."""
    task = runs[0].get("task", "classification")
    rows = _rows(task) + [
        ("weights (nnz)", lambda r: f"{r['weights_nnz']:,}"),
        ("parameter bytes", lambda r: f"{r['param_bytes']:,}"),
        ("training state bytes", lambda r: f"{r['training_state_bytes']:,}"),
        ("peak RSS MB (this run)", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ("inference FLOPs/example", lambda r: f"{r['inference_flops']:,.0f}"),
        ("training FLOPs/example", lambda r: f"{r['train_flops_per_example']:,.0f}"),
        ("training FLOPs (total)", lambda r: f"{r.get('train_flops_total', 0):.3g}"),
        ("ms/step (median)", lambda r: f"{r['ms_per_step_median']:.2f}"),
        ("ms/step (IQR)", _iqr),
        ("total train s", lambda r: f"{r['total_s']:.1f}")]
    head = f"{'':28}" + "".join(f"{r['method']:>16}" for r in runs)
    lines = [head, "-" * len(head)]
    for name, f in rows:
        lines.append(f"{name:28}" + "".join(f"{f(r):>16}" for r in runs))
    if len(runs) == 2:
        s, d = runs
        if task == "language-model":
            quality = f"perplexity x{s['final']['perplexity'] / d['final']['perplexity']:.3f}"
        else:
            quality = f"accuracy {100 * (s['final']['accuracy'] - d['final']['accuracy']):+.2f} pts"
        (s_lo, s_hi), (d_lo, d_hi) = (r.get("ms_per_step_iqr", (r["ms_per_step_median"],) * 2) for r in (s, d))
        lines.append(f"{'sparse / dense':28}{quality}, weights {s['weights_nnz'] / d['weights_nnz']:.3f}, "
                     f"training state {s['training_state_bytes'] / d['training_state_bytes']:.3f}, training "
                     f"FLOPs {s['train_flops_per_example'] / d['train_flops_per_example']:.3f}; step time: sparse "
                     f"is {d['ms_per_step_median'] / s['ms_per_step_median']:.2f}x as fast as dense (medians; "
                     f"quartiles allow {d_lo / s_hi:.2f}-{d_hi / s_lo:.2f}x)")
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> list[Path]:
    """Loss and quality curves, per-layer density, ITOP rate and step times, as PNGs in ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lm = runs[0].get("task") == "language-model"
    metric, label = ("perplexity", "validation perplexity") if lm else ("accuracy", "test accuracy (%)")
    scale = 1 if lm else 100
    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        ep = [h["epoch"] for h in r["history"]]
        ax[0].plot(ep, [h["train_loss"] for h in r["history"]], marker="o", label=r["method"])
        ax[1].plot(ep, [h[metric] * scale for h in r["history"]], marker="o", label=r["method"])
    ax[0].set(xlabel="epoch", ylabel="train loss", yscale="log")
    ax[1].set(xlabel="epoch", ylabel=label)
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=100)
    sparse = next((r for r in runs if r["layer_density"]), None)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    if sparse:
        names = list(sparse["layer_density"])
        ax[0].bar(range(len(names)), [sparse["layer_density"][n] for n in names])
        ax[0].set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax[0].set(ylabel="density", title=f"per-layer density ({sparse['method']})")
        log = [e for e in sparse["itop_log"] if "itop_rate" in e]
        ax[1].plot([e["step"] for e in log], [e["itop_rate"] for e in log], marker="o")
        ax[1].set(xlabel="step", ylabel="fraction of positions ever active",
                  title=f"in-time over-parameterisation ({len(log)} updates)")
    for r in runs:
        ax[2].plot(r["step_times_ms"], lw=0.6, label=r["method"])
    ax[2].set(xlabel="step", ylabel="ms", yscale="log", title="step time")
    ax[2].legend()
    fig.tight_layout()
    paths.append(out / "sparsity.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close("all")
    return paths
