"""Train a genuinely sparse network end to end and compare it with dense.

    python -m sparsekern.train --method rigl --density 0.1 --epochs 10
    python -m sparsekern.train --config run.toml --epochs 20      # flags override the file
    python -m sparsekern.train --resume runs/latest/checkpoint.pt

Trains the chosen method and, unless ``--no-baseline``, the same model dense on the
same data, then prints a side-by-side table (accuracy, NLL, ECE, nonzero parameters
and bytes, FLOPs from the real nonzeros, time per step), writes ``results.json`` and
PNG plots in ``--out``, and a checkpoint (model, optimizer, LR schedule, DST engine,
RNG) every ``--checkpoint-every`` epochs, at the end, and on Ctrl-C or SIGTERM (at the
next step boundary; a second one stops at once, without saving). Checkpoints are
written atomically and read without running code (:mod:`sparsekern.checkpoint_io`).

``--resume`` continues a run exactly where its checkpoint stopped, with the run's own
options. On the command line it takes --quiet, --no-plots, --stop-after and these, which
it reports: --out (write elsewhere), --checkpoint-every, and --epochs to extend a run
whose schedules go on past their planned end (LR schedule constant or step, not
suptickets/edst; the schedules keep their original length, a DST topology stays frozen
after its planned stop). Any other option that differs from the checkpoint's is refused.
Datasets are local (see :mod:`sparsekern.data`).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import signal
import sys
import threading
import time
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparsekern as sk
from sparsekern._optional import MissingDependency, require
from sparsekern import checkpoint_io
from sparsekern import data as datasets
from sparsekern.flops import count_flops
from sparsekern.methods import freetickets, suptickets, threshold as thr
from sparsekern.metrics import evaluate
from sparsekern.models import LeNet5, mlp, resnet20, vgg

METHODS = ("dense", "static", "set", "rigl", "suptickets", "edst", "ensemble", "threshold")
DST_METHODS = ("static", "set", "rigl", "suptickets", "edst")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsekern-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", help=f"one of {MODELS}")
    p.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    p.add_argument("--dataset", default="digits", help=f"one of {datasets.DATASETS}")
    p.add_argument("--data-dir", help="directory of the CIFAR python pickles")
    p.add_argument("--method", default="rigl", help=(
        "dense: plain nn.Linear/nn.Conv2d; static: a fixed random sparse topology; "
        "set: drop smallest, regrow at random (--update-every, --drop-fraction); "
        "rigl: drop smallest, regrow by largest dense gradient (same options); "
        "suptickets: RigL/SET with a cyclic final phase whose tickets are superposed (--cycle-*, --superpose); "
        "edst: one run, exploration then --tickets refinement phases, ensembled (--exploration-fraction, "
        "--refine-drop); ensemble: --tickets independent RigL/SET runs, ensembled; "
        "threshold: trainable per-neuron thresholds, dense-to-sparse (--alpha)"))
    p.add_argument("--density", type=float, default=0.1, help="fraction of weights kept, in (0, 1]")
    p.add_argument("--distribution", default="erk", choices=("uniform", "er", "erk"))
    p.add_argument("--init", default="fanin", choices=("dense", "fanin"))
    p.add_argument("--layout", default="csr", choices=("csr", "bsr"))
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--update-every", type=int, default=100, help="steps between topology updates")
    p.add_argument("--drop-fraction", type=float, default=0.3)
    p.add_argument("--grow", default="rigl", choices=("rigl", "set"),
                   help="grow rule of suptickets/edst/ensemble runs")
    p.add_argument("--cycle-fraction", type=float, default=0.1, help="suptickets: share of training in cycles")
    p.add_argument("--cycle-length", type=int, default=1, help="suptickets: epochs per cycle")
    p.add_argument("--cycle-drop", type=float, default=0.5, help="suptickets: drop-and-regrow at each cycle start")
    p.add_argument("--lr-low", type=float, default=None, help="suptickets: cycle LR floor (default lr/100)")
    p.add_argument("--lr-high", type=float, default=None, help="suptickets: cycle LR peak (default lr/20)")
    p.add_argument("--superpose", default="caa", choices=("caa", "cima"), help="suptickets: averaging rule")
    p.add_argument("--tickets", type=int, default=3, help="edst/ensemble: number of tickets M")
    p.add_argument("--exploration-fraction", type=float, default=0.5, help="edst: share of training exploring")
    p.add_argument("--refine-drop", type=float, default=0.8, help="edst: drop-and-regrow at each phase start")
    p.add_argument("--alpha", type=float, default=5e-4, help="threshold: regulariser weight alpha")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="SGD is Nesterov, momentum 0.9")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant", "step"),
                   help="step: x0.1 at 50%% and 75%% of training")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available (sparse layers then run the Triton kernels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--baseline", default="run", choices=("run", "cache", "skip"),
                   help="the dense baseline: train it, reuse a cached earlier run with the same options, or skip")
    p.add_argument("--no-baseline", action="store_true", help="same as --baseline skip")
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="results directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--config", type=Path, help="TOML or YAML file of options (flag names); flags override it")
    p.add_argument("--checkpoint-every", type=int, default=0, help="epochs between checkpoints (0: end only)")
    p.add_argument("--resume", type=Path, help="checkpoint to continue from (the run's options come with it)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many steps of the method's run, with a checkpoint (0: never)")
    return p


def load_config(path: Path) -> dict:
    """Options from a TOML/YAML file, keys as flag names (dashes or underscores)."""
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    yaml = require("yaml", "a YAML config file", "train") if path.suffix in (".yaml", ".yml") else None
    try:
        if path.suffix == ".toml":
            cfg = tomllib.loads(path.read_text())
        elif yaml is not None:
            cfg = yaml.safe_load(path.read_text()) or {}
        else:
            raise UsageError(f"config file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise UsageError(f"config file {path} is not valid: {exc}") from None
    except Exception as exc:  # yaml.YAMLError
        raise UsageError(f"config file {path} is not valid: {exc}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"config file {path} must hold a table of options")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def parse_args(argv=None):
    """Flags over config file over defaults."""
    return _parse(argv)[0]


@functools.cache
def options() -> dict[str, argparse.Action]:
    """The command's options by destination name (``--no-baseline`` -> ``no_baseline``)."""
    return {act.dest: act for act in build_parser()._actions if act.dest != "help"}


def _with_paths(values: dict) -> dict:
    """``values`` with the options the parser types as paths made ``Path`` (from strings)."""
    return {k: Path(v) if v is not None and k in options() and options()[k].type is Path else v
            for k, v in values.items()}


def _parse(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The options (flags over config file over defaults) and the names of those the user gave,
    on the command line or in the config file."""
    parser = build_parser()
    a = parser.parse_args(argv)
    explicit = build_parser()
    for act in explicit._actions:
        act.default = argparse.SUPPRESS          # parse only what is on the command line
    given = set(vars(explicit.parse_args(argv)))
    if a.config is not None:
        cfg = load_config(a.config)
        unknown = sorted(set(cfg) - set(options()))
        if unknown:
            raise UsageError(f"config file {a.config} has unknown options {unknown}")
        parser.set_defaults(**_with_paths(cfg))
        a = parser.parse_args(argv)
        given |= set(cfg)
    a.plan_epochs = a.epochs      # the length the schedules are planned for (a resume may run longer)
    return a, given


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
    for name in ("epochs", "batch_size", "update_every", "cycle_length", "tickets"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")


def _image_only(name):
    def check(input_shape):
        if len(input_shape) != 3:
            raise UsageError(f"model {name!r} needs image inputs; the dataset gives shape {tuple(input_shape)}")
    return check


def _mlp(input_shape, classes, width):
    n_in = int(torch.tensor(input_shape).prod())
    return torch.nn.Sequential(torch.nn.Flatten(), *mlp((n_in, width, width, classes)))


def _lenet5(input_shape, classes, width):
    _image_only("lenet5")(input_shape)
    return LeNet5(classes, input_shape[0], input_shape[1])


def _resnet20(input_shape, classes, width):
    _image_only("resnet20")(input_shape)
    return resnet20(classes, in_channels=input_shape[0])


def _vgg(input_shape, classes, width):
    _image_only("vgg")(input_shape)
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]
    pools = max(0, int(math.log2(min(input_shape[1:]))) - 1)    # keep >= 2x2 before the head
    while cfg.count("M") > pools:
        cfg.pop(len(cfg) - 1 - cfg[::-1].index("M"))
    return vgg(classes, cfg=tuple(cfg), in_channels=input_shape[0])


# name -> builder(input_shape, num_classes, width) -> dense nn.Module. Add a model here.
MODEL_BUILDERS = {"mlp": _mlp, "lenet5": _lenet5, "resnet20": _resnet20, "vgg": _vgg}
MODELS = tuple(MODEL_BUILDERS)


def make_model(name: str, input_shape, classes: int, width: int):
    return MODEL_BUILDERS[name](input_shape, classes, width)


def param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def training_state_bytes(model, opt) -> int:
    """Parameters, buffers (sparse indices), gradients and optimizer state: what training keeps per weight."""
    total = param_bytes(model)
    total += sum(p.numel() * p.element_size() for p in model.parameters())           # gradients
    for st in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def rss_mb() -> float:
    """Current resident memory of the process in MB (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Interrupted(Exception):
    """Training stopped early (Ctrl-C, SIGTERM or --stop-after) after saving a checkpoint."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{why}: checkpoint saved to {path}; continue with --resume {path}")
        self.path = path


class Aborted(BaseException):
    """A second Ctrl-C/SIGTERM: stop at once, without saving (a write in progress is abandoned
    whole, so the checkpoint on disk stays the previous one). Not an ``Exception``: nothing
    on the way out may swallow it."""


class StopRequest:
    """While active (``with StopRequest() as stop:``, main thread only), SIGINT and SIGTERM
    ask for a stop: ``stop.requested`` becomes true and the training loop saves a checkpoint
    at the next step boundary. A second signal raises :class:`Aborted` wherever the program
    is. ``saved`` is the last checkpoint written under it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: str | None = None
        self.saved: Path | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (a first signal arrived)."""
        return self.signal is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is not None:
            raise Aborted(name)
        self.signal = name
        try:      # os.write, not print: a handler may run while the main thread is inside a print
            os.write(2, f"sparsekern-train: {name}: stopping at the next step boundary with a checkpoint "
                        f"(send it again to stop at once, without saving)\n".encode())
        except OSError:
            pass

    def aborted_message(self, exc: BaseException) -> str:
        """The one line reporting a stop by a second signal (or a KeyboardInterrupt raised past the loop)."""
        why = f"{exc.args[0]} again" if isinstance(exc, Aborted) and exc.args else "interrupted"
        if self.saved is not None:
            return f"{why}: stopped at once; the last checkpoint is {self.saved}; continue with --resume {self.saved}"
        return f"{why}: stopped at once; no checkpoint was written"

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False


def train_one(a, split, method: str, resume: dict | None = None, stop: StopRequest | None = None) -> dict:
    """Train ``method`` on ``split`` (continuing ``resume``, a checked checkpoint, if given); returns
    metrics, FLOPs, timings. ``stop``: the caller's :class:`StopRequest` (else one for this run)."""
    if stop is None:
        with StopRequest() as stop:
            return train_one(a, split, method, resume, stop)
    torch.manual_seed(a.seed)
    model = make_model(a.model, split.input_shape, split.num_classes, a.width).to(a.device)
    engine = None
    report = None
    if method == "threshold":
        thr.thresholdify(model)
    elif method != "dense":
        report = sk.sparsify(model, a.density, a.distribution, init=a.init, layout=a.layout,
                             block_size=a.block_size, generator=torch.Generator().manual_seed(a.seed))
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=a.lr, momentum=0.9, nesterov=True) if a.optimizer == "sgd"
           else torch.optim.AdamW(params, lr=a.lr))
    steps_per_epoch = math.ceil(len(split.x_train) / a.batch_size)
    total = steps_per_epoch * a.plan_epochs       # what the LR, DST and method schedules span
    if method in DST_METHODS:
        kind = a.grow if method in ("suptickets", "edst") else method
        cls = {"static": sk.dst.Static, "set": sk.dst.SET, "rigl": sk.dst.RigL}[kind]
        engine = cls(model, opt, total_steps=total, update_every=a.update_every,
                     drop_fraction=a.drop_fraction, seed=a.seed)
    try:
        controller = make_controller(a, split, method, model, engine, total, steps_per_epoch)
    except ValueError as exc:
        raise UsageError(f"--method {method}: {exc}") from None
    if controller is not None:       # the method owns the LR (set before every step)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    elif a.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    elif a.lr_schedule == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [total // 2, 3 * total // 4], 0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    g = torch.Generator().manual_seed(a.seed)
    history, step_times, density_log = [], [], []
    start_epoch, start_step, order = 0, 0, None
    partial = (0.0, 0)        # (loss sum, steps) of an epoch cut by a checkpoint
    if resume is not None:
        try:
            _check_position(resume, a, len(split.x_train), steps_per_epoch)
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            if engine is not None:
                engine.load_state_dict(resume["dst"])
            if controller is not None:
                controller.load_state_dict(resume["method_state"])
            g.set_state(resume["data_rng"])
            torch.set_rng_state(resume["torch_rng"])
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"checkpoint does not fit this run ({method}): {exc}") from None
        history, step_times = list(resume["history"]), list(resume["step_times"])
        density_log = list(resume["density_log"])
        start_epoch, start_step, order = resume["epoch"], resume["step"], resume["order"]
        partial = tuple(resume["epoch_loss"])
    ckpt = a.out / f"checkpoint_{method}.pt"

    def save(epoch, step, order, epoch_loss=(0.0, 0)):
        checkpoint_io.save({"version": 1, "args": checkpoint_args(a), "plan_epochs": a.plan_epochs,
                            "method": method, "epoch": epoch, "step": step, "order": order,
                            "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "dst": engine.state_dict() if engine else None,
                            "method_state": controller.state_dict() if controller else None,
                            "data_rng": g.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                            "step_times": step_times, "density_log": density_log,
                            "epoch_loss": tuple(epoch_loss)}, ckpt)
        stop.saved = ckpt

    # Ctrl-C/SIGTERM (``stop``) ask for a stop at the next step boundary, so the checkpoint is exact.
    return _train_epochs(a, split, method, model, opt, sched, engine, g, history, step_times, density_log,
                         start_epoch, start_step, order, partial, steps_per_epoch, save, stop, report, ckpt,
                         controller)


def _check_position(resume: dict, a, n_train: int, steps_per_epoch: int) -> None:
    """Refuse (ValueError) a checkpoint whose position does not lie inside this run."""
    epoch, step, order = resume["epoch"], resume["step"], resume["order"]
    if epoch > a.epochs or step >= steps_per_epoch or (epoch == a.epochs and step):
        raise ValueError(f"it stopped at epoch {epoch} step {step}; this run has {a.epochs} epochs of "
                         f"{steps_per_epoch} steps")
    if len(resume["history"]) != epoch or len(resume["step_times"]) != epoch * steps_per_epoch + step:
        raise ValueError(f"its history ({len(resume['history'])} epochs, {len(resume['step_times'])} steps) "
                         f"does not match its position (epoch {epoch} step {step})")
    if order is not None and (len(order) != n_train or not torch.equal(order.sort().values, torch.arange(n_train))):
        raise ValueError(f"its data order is not a permutation of the {n_train} training examples")


def make_controller(a, split, method, model, engine, total, steps_per_epoch):
    """The Sup-tickets / EDST controller of ``method`` (None for the others)."""
    if method == "suptickets":
        bs = a.batch_size
        return suptickets.SupTickets(
            model, engine, total, steps_per_epoch, a.lr, a.cycle_fraction, a.cycle_length, a.lr_low, a.lr_high,
            a.cycle_drop, a.superpose,
            bn_batches=lambda: (split.x_train[i:i + bs] for i in range(0, len(split.x_train), bs)))
    if method == "edst":
        return freetickets.EDST(model, engine, total, a.lr, a.tickets, a.exploration_fraction, a.refine_drop)
    return None


def _train_epochs(a, split, method, model, opt, sched, engine, g, history, step_times, density_log,
                  start_epoch, start_step, order, partial, steps_per_epoch, save, stop, report, ckpt,
                  controller=None):
    peak = {"rss": rss_mb()}          # resident memory sampled every step of this run
    bar = tqdm(range(start_epoch, a.epochs), desc=f"{method}", disable=a.quiet, unit="epoch",
               initial=start_epoch, total=a.epochs)
    for epoch in bar:
        if order is None:
            order = torch.randperm(len(split.x_train), generator=g)
        loss_sum, done = partial
        partial = (0.0, 0)
        i = start_step
        steps = tqdm(range(start_step, steps_per_epoch), desc=f"epoch {epoch + 1}", disable=a.quiet,
                     leave=False, unit="step")
        try:
            for i in steps:
                if a.stop_after and len(step_times) >= a.stop_after:
                    save(epoch, i, order, (loss_sum, done))
                    raise Interrupted(ckpt, f"stopped after {a.stop_after} steps")
                if stop.requested:
                    save(epoch, i, order, (loss_sum, done))
                    raise Interrupted(ckpt, "interrupted")
                idx = order[i * a.batch_size:(i + 1) * a.batch_size]
                t0 = time.perf_counter()
                if controller is not None:
                    for group in opt.param_groups:
                        group["lr"] = controller.lr(epoch * steps_per_epoch + i)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
                if method == "threshold":
                    loss = loss + thr.threshold_regularizer(model, a.alpha)
                loss.backward()
                opt.step()
                if method == "threshold":
                    for name in thr.reset_collapsed(model):
                        density_log.append({"step": len(step_times) + 1, "reset": name})
                if engine is not None and engine.step():
                    density_log.append({"step": engine.step_count, "itop_rate": engine.itop_rate()})
                if controller is not None:
                    controller.after_step()
                sched.step()
                step_times.append(time.perf_counter() - t0)
                loss_sum += loss.item()
                done += 1
                peak["rss"] = max(peak["rss"], rss_mb())
                if done % 10 == 0:
                    steps.set_postfix(loss=f"{loss_sum / done:.3f}", ms=f"{1e3 * step_times[-1]:.1f}")
        except KeyboardInterrupt:
            save(epoch, i, order, (loss_sum, done))
            raise Interrupted(ckpt, "interrupted") from None
        start_step, order = 0, None
        metrics = evaluate(model, split.x_test, split.y_test)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(done, 1), **metrics})
        layers = [m for m in model.modules() if isinstance(m, (sk.SparseLinear, sk.SparseConv2d))]
        density = sum(m.nnz for m in layers) / max(sum(m.weight.shape[0] * m.weight.shape[1] for m in layers), 1)
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                        density=f"{density:.3f}" if layers else "1",
                        ms_step=f"{1e3 * sum(step_times[-steps_per_epoch:]) / steps_per_epoch:.1f}")
        if a.checkpoint_every and (epoch + 1) % a.checkpoint_every == 0:
            save(epoch + 1, 0, None)
    save(a.epochs, 0, None)
    final_model, extra = model, {}
    n_train = len(split.x_train)
    if method == "suptickets":
        final_model = controller.result()
        extra = {"tickets": controller.tickets, "superpose_log": controller.log,
                 "current_model": history[-1]}
    elif method == "threshold":
        final_model = copy.deepcopy(model)
        thr.export_sparse(final_model)
        extra = {"threshold_density": thr.model_density(model)}
    if method == "edst":
        ens = controller.result()
        rep = freetickets.ensemble_report(ens, split.x_test, split.y_test)
        final = {"epoch": a.epochs, **rep["ensemble"]}
        extra = {"members": rep["members"], "disagreement": rep["disagreement"], "kl": rep["kl"],
                 "tickets": len(controller.tickets)}
        members = controller.tickets
    else:
        final = {"epoch": a.epochs, **evaluate(final_model, split.x_test, split.y_test)}
        members = [final_model]
    flops = count_flops(members[0], split.x_test[:1])
    sparse_types = (sk.SparseLinear, sk.SparseConv2d)
    nnz = len(members) * sum(m.nnz if isinstance(m, sparse_types) else m.weight.numel()
                             for m in members[0].modules()
                             if isinstance(m, sparse_types + (torch.nn.Linear, torch.nn.Conv2d)))
    rigl_grow = method == "rigl" or (method in ("suptickets", "edst") and a.grow == "rigl")
    per_example = (count_flops(model, split.x_test[:1]).training_step() if method == "threshold"
                   else flops.training_step(a.update_every if rigl_grow else None))
    train_total = per_example * n_train * a.epochs        # every epoch sees the whole training set
    if method == "suptickets" and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        train_total += (controller.tickets - 1) * n_train * flops.inference()    # BN recomputation passes
    layers = {n: m.density for n, m in members[0].named_modules() if isinstance(m, sparse_types)}
    return {"method": method, "final": final, "history": history, "weights_nnz": nnz,
            "param_bytes": sum(param_bytes(m) for m in members),
            "training_state_bytes": training_state_bytes(model, opt),
            "peak_rss_mb": peak["rss"], "inference_flops": len(members) * flops.inference(),
            "train_flops_per_example": per_example, "train_flops_total": train_total,
            "ms_per_step": 1e3 * sum(step_times) / len(step_times),
            "ms_per_step_median": 1e3 * sorted(step_times)[len(step_times) // 2],
            "step_times_ms": [1e3 * t for t in step_times],
            "total_s": sum(step_times), "itop_rate": engine.itop_rate() if engine else None,
            "itop_log": density_log, "layer_density": layers,
            "sparsity_report": report.to_dict() if report else None,
            "state_digest": float(sum(p.detach().double().sum() for p in model.parameters())),
            **extra, "model": final_model if method != "edst" else ens}


def plot(runs: list[dict], out: Path) -> list[Path]:
    """Loss/accuracy curves, per-layer density, ITOP rate and step times, as PNGs in ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        ep = [h["epoch"] for h in r["history"]]
        ax[0].plot(ep, [h["train_loss"] for h in r["history"]], marker="o", label=r["method"])
        ax[1].plot(ep, [h["accuracy"] * 100 for h in r["history"]], marker="o", label=r["method"])
    ax[0].set(xlabel="epoch", ylabel="train loss", yscale="log")
    ax[1].set(xlabel="epoch", ylabel="test accuracy (%)")
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
        log = sparse["itop_log"]
        ax[1].plot([e["step"] for e in log], [e["itop_rate"] for e in log], marker="o")
        ax[1].set(xlabel="step", ylabel="fraction of positions ever active", title="in-time over-parameterisation")
    for r in runs:
        ax[2].plot(r["step_times_ms"], lw=0.6, label=r["method"])
    ax[2].set(xlabel="step", ylabel="ms", yscale="log", title="step time")
    ax[2].legend()
    fig.tight_layout()
    paths.append(out / "sparsity.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close("all")
    return paths


def table(runs: list[dict]) -> str:
    rows = [("accuracy", lambda r: f"{r['final']['accuracy'] * 100:.2f}%"),
            ("NLL", lambda r: f"{r['final']['nll']:.3f}"), ("ECE", lambda r: f"{r['final']['ece']:.3f}"),
            ("weights (nnz)", lambda r: f"{r['weights_nnz']:,}"),
            ("parameter bytes", lambda r: f"{r['param_bytes']:,}"),
            ("training state bytes", lambda r: f"{r['training_state_bytes']:,}"),
            ("peak RSS MB (this run)", lambda r: f"{r['peak_rss_mb']:.0f}"),
            ("inference FLOPs/example", lambda r: f"{r['inference_flops']:,.0f}"),
            ("training FLOPs/example", lambda r: f"{r['train_flops_per_example']:,.0f}"),
            ("training FLOPs (total)", lambda r: f"{r.get('train_flops_total', 0):.3g}"),
            ("ms/step (median)", lambda r: f"{r['ms_per_step_median']:.2f}"),
            ("total train s", lambda r: f"{r['total_s']:.1f}")]
    head = f"{'':26}" + "".join(f"{r['method']:>16}" for r in runs)
    lines = [head, "-" * len(head)]
    for name, f in rows:
        lines.append(f"{name:26}" + "".join(f"{f(r):>16}" for r in runs))
    if len(runs) == 2:
        s, d = runs
        lines.append(f"{'sparse / dense':26}accuracy {100 * (s['final']['accuracy'] - d['final']['accuracy']):+.2f} pts, "
                     f"weights {s['weights_nnz'] / d['weights_nnz']:.3f}, training state "
                     f"{s['training_state_bytes'] / d['training_state_bytes']:.3f}, training FLOPs "
                     f"{s['train_flops_per_example'] / d['train_flops_per_example']:.3f}; step time: sparse is "
                     f"{d['ms_per_step_median'] / s['ms_per_step_median']:.2f}x as fast as dense")
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command: returns 0, 2 after a user mistake (one line on stderr), 130 when stopped early."""
    with StopRequest() as stop:          # for the whole command: a signal never meets Python's default
        try:
            return _run(argv, stop)
        except (UsageError, datasets.DatasetError, checkpoint_io.CheckpointError, MissingDependency) as exc:
            print(f"sparsekern-train: error: {exc}", file=sys.stderr)
            return 2
        except Interrupted as exc:
            print(f"sparsekern-train: {exc}", file=sys.stderr)
            return 130
        except (Aborted, KeyboardInterrupt) as exc:
            print(f"sparsekern-train: {stop.aborted_message(exc)}", file=sys.stderr)
            return 130


def _run(argv, stop: StopRequest) -> int:
    a, given = _parse(argv)
    resume = None
    if a.resume is not None:
        resume = checkpoint_io.load(a.resume)
        a = resumed_options(a, given, resume)
    check_args(a)
    if not a.no_plots:  # before training, not after it
        require("matplotlib", "the training command's plots", "train", "pass --no-plots")
    a.device = resolve_device(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    kwargs = {"image": a.model != "mlp"} if a.dataset == "digits" else {}
    split = to_device(datasets.load(a.dataset, root=a.data_dir, **kwargs), a.device)
    first = resume["method"] if resume else a.method
    if a.method == "ensemble":
        runs = [train_ensemble(a, split, stop)]
    else:
        runs = [train_one(a, split, a.method, resume if first == a.method else None, stop)]
    mode = "skip" if a.no_baseline else a.baseline
    if mode != "skip" and a.method != "dense":
        runs.append(dense_baseline(a, split, mode, resume if first == "dense" else None, stop))
    for r in runs:
        r.pop("model", None)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                    "runs": runs}, indent=1))
    print(table(runs))
    written = [a.out / "results.json"] + ([] if a.no_plots else plot(runs, a.out))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def train_ensemble(a, split, stop: StopRequest | None = None) -> dict:
    """DST Ensemble: ``--tickets`` independent ``--grow`` runs (seeds seed, seed+1, ...), ensembled."""
    members = []
    for i in range(a.tickets):
        ai = argparse.Namespace(**{**vars(a), "seed": a.seed + i, "out": a.out / f"member_{i}"})
        members.append(train_one(ai, split, a.grow, stop=stop))
    ens = freetickets.TicketEnsemble([r["model"] for r in members])
    rep = freetickets.ensemble_report(ens, split.x_test, split.y_test)
    first = members[0]
    return {**{k: first[k] for k in ("history", "layer_density", "sparsity_report", "peak_rss_mb",
                                     "train_flops_per_example", "training_state_bytes")},
            "method": "ensemble", "final": {"epoch": a.epochs, **rep["ensemble"]}, "members": rep["members"],
            "disagreement": rep["disagreement"], "kl": rep["kl"], "tickets": a.tickets,
            "weights_nnz": sum(r["weights_nnz"] for r in members),
            "param_bytes": sum(r["param_bytes"] for r in members),
            "inference_flops": sum(r["inference_flops"] for r in members),
            "train_flops_total": sum(r["train_flops_total"] for r in members),
            "step_times_ms": [t for r in members for t in r["step_times_ms"]],
            "ms_per_step": sum(r["ms_per_step"] for r in members) / len(members),
            "ms_per_step_median": sorted(r["ms_per_step_median"] for r in members)[len(members) // 2],
            "total_s": sum(r["total_s"] for r in members), "itop_rate": None,
            "itop_log": first["itop_log"], "state_digest": sum(r["state_digest"] for r in members),
            "model": ens}


def resolve_device(a) -> str:
    if a.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (this torch: "
                         f"{torch.__version__}); use --device cpu")
    return a.device


def to_device(split, device):
    if device == "cpu":
        return split
    return datasets.Split(split.x_train.to(device), split.y_train.to(device), split.x_test.to(device),
                          split.y_test.to(device), split.num_classes)


BASELINE_KEYS = ("model", "width", "dataset", "data_dir", "epochs", "plan_epochs", "batch_size", "optimizer",
                 "lr", "lr_schedule", "seed", "threads", "device")


def dense_baseline(a, split, mode: str, resume=None, stop: StopRequest | None = None) -> dict:
    """Train the dense baseline, or with mode "cache" reuse an earlier run with the same options."""
    import hashlib
    key = json.dumps({k: str(getattr(a, k)) for k in BASELINE_KEYS}, sort_keys=True)
    cache = Path(a.out).parent / ".baseline_cache" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if mode == "cache" and cache.is_file():
        run = json.loads(cache.read_text())
        run["cached_from"] = str(cache)
        return run
    run = train_one(a, split, "dense", resume, stop)
    if mode == "cache":
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({k: v for k, v in run.items() if k != "model"}))
    return run


def checkpoint_args(a) -> dict:
    """The run's options as a checkpoint stores them: plain values, paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k in options()}


def _option_error(dest: str, value, action: argparse.Action) -> str | None:
    """What is wrong with ``value`` for the option ``dest`` (None if it is a value the parser could give)."""
    if value is None and action.default is None:
        return None
    if action.nargs == 0:                                       # store_true / store_false
        ok, expected = isinstance(value, bool), "true or false"
    elif action.type in (int, float):
        ok = isinstance(value, int if action.type is int else (int, float)) and not isinstance(value, bool)
        expected = "an int" if action.type is int else "a number"
    else:                                                       # strings; paths (a Path in older checkpoints)
        ok, expected = isinstance(value, (str, Path)), "a string"
    if ok and action.choices is not None and value not in action.choices:
        ok, expected = False, f"one of {tuple(action.choices)}"
    return None if ok else f"--{dest.replace('_', '-')} is {value!r}, expected {expected}"


def options_from_checkpoint(ck: dict, path) -> argparse.Namespace:
    """The run's options stored in checkpoint ``ck``, checked against the parser (names, types,
    choices), paths restored; options the checkpoint predates get their defaults."""
    saved = ck["args"]
    unknown = sorted(set(saved) - set(options()))
    if unknown:
        raise checkpoint_io.CheckpointError(f"checkpoint {path} has unknown options {unknown}")
    for dest, value in saved.items():
        problem = _option_error(dest, value, options()[dest])
        if problem:
            raise checkpoint_io.CheckpointError(f"checkpoint {path}: option {problem}")
    a = argparse.Namespace(**{**vars(build_parser().parse_args([])), **_with_paths(saved)})
    a.plan_epochs = ck["plan_epochs"] if ck["plan_epochs"] is not None else a.epochs
    if a.plan_epochs > a.epochs:
        raise checkpoint_io.CheckpointError(f"checkpoint {path}: plan_epochs {a.plan_epochs} exceeds "
                                            f"--epochs {a.epochs}")
    return a


# On --resume: options that steer this invocation, always taken from the command line ...
SESSION_OPTIONS = ("quiet", "no_plots", "stop_after", "resume", "config")
# ... and options of the run that may change (reported): nothing trained so far depends on them.
# Every other option given with --resume must equal the checkpoint's: the model, data, optimizer,
# schedules and seeds are fixed once a run has started, and a different --threads would change
# float rounding, so the continuation would no longer be exact.
RESUME_CHANGEABLE = ("epochs", "out", "checkpoint_every")


def resumed_options(cli: argparse.Namespace, given: set[str], ck: dict) -> argparse.Namespace:
    """The options of a run resumed from checkpoint ``ck``: the checkpoint's, with the session
    options of ``cli`` and those of :data:`RESUME_CHANGEABLE` the user ``given`` (each reported
    on stderr); a given option that would change anything else is a :class:`UsageError`."""
    a = options_from_checkpoint(ck, cli.resume)
    if a.method == "ensemble":
        raise UsageError("--resume of an ensemble: resume its member runs (member_<i>/) one by one")
    if ck["method"] not in (a.method, "dense"):
        raise checkpoint_io.CheckpointError(f"checkpoint {cli.resume} is of a {ck['method']!r} run, but its "
                                            f"options say --method {a.method}")
    for key in SESSION_OPTIONS:
        setattr(a, key, getattr(cli, key))
    changed = [k for k in options() if k in given and k not in SESSION_OPTIONS
               and _comparable(k, getattr(cli, k)) != _comparable(k, getattr(a, k))]
    refused = [k for k in changed if k not in RESUME_CHANGEABLE]
    if refused:
        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(cli, k)} (checkpoint: {getattr(a, k)})"
                          for k in refused)
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_CHANGEABLE)
        raise UsageError(f"--resume {cli.resume}: {flags} cannot change in a resumed run (it keeps its model, "
                         f"data, optimizer and schedules; only {allowed} can)")
    if "epochs" in changed:
        _check_extension(a, cli.epochs)
    if changed:
        note = ", ".join(f"--{k.replace('_', '-')} {getattr(cli, k)} (was {getattr(a, k)})" for k in changed)
        print(f"sparsekern-train: resuming {cli.resume} with {note}", file=sys.stderr)
    for key in changed:
        setattr(a, key, getattr(cli, key))
    return a


def _comparable(key: str, value):
    """An option's value as it acts on the run (``--device auto`` is the device it resolves to)."""
    return resolve_device(argparse.Namespace(device=value)) if key == "device" else value


def _check_extension(a, epochs: int) -> None:
    """Refuse (UsageError) ``--epochs epochs`` on resuming run ``a`` unless it only lengthens it and
    the run's schedules can go on past their planned end unchanged."""
    where = f"--epochs {epochs} with --resume"
    if epochs < a.epochs:
        raise UsageError(f"{where}: the run has {a.epochs} epochs; --epochs can only extend a run")
    if a.method in ("suptickets", "edst"):
        raise UsageError(f"{where}: a {a.method} run's cycles/phases are planned over its {a.plan_epochs} "
                         f"epochs and cannot be extended")
    if a.lr_schedule == "cosine":
        raise UsageError(f"{where}: the cosine LR schedule reaches 0 at the run's planned end (epoch "
                         f"{a.plan_epochs}); only runs with --lr-schedule constant or step can be extended")


if __name__ == "__main__":
    sys.exit(main())
