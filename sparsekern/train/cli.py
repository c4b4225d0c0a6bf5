"""The training command's options: the parser, ``--config`` files, validation, and the
rules for the options of a resumed run.

Precedence: command-line flags over the ``--config`` file (TOML or YAML, keys as flag
names) over the defaults. A user mistake raises :class:`UsageError`, which the command
prints as one line with exit status 2.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib
from pathlib import Path

import torch

from sparsekern import checkpoint_io
from sparsekern import data as datasets
from sparsekern._optional import require
from sparsekern.models import MODELS
from sparsekern.train.methods import METHODS


class UsageError(ValueError):
    """A user mistake: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """The command's parser (``prog`` sparsekern-train; the package docstring is its description)."""
    from sparsekern import train
    p = argparse.ArgumentParser(prog="sparsekern-train", description=train.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", help=f"one of {MODELS}")
    p.add_argument("--width", type=int, default=None,
                   help="mlp: hidden width (default 1024); gpt: model width d (default 128); "
                        "vgg: channels of the first stage (default 64, doubling per stage)")
    p.add_argument("--layers", type=int, default=None, help="gpt: transformer blocks (default 2)")
    p.add_argument("--heads", type=int, default=None, help="gpt: attention heads (default 4)")
    p.add_argument("--dataset", default="digits", help=f"one of {datasets.DATASETS}")
    p.add_argument("--data-dir", help="directory of the CIFAR python pickles")
    p.add_argument("--context", type=int, default=64, help="text: bytes per training sequence")
    p.add_argument("--text-bytes", type=int, default=datasets.TEXT_BYTES,
                   help="text: size cap of the corpus (the first bytes of sparsekern.data.TEXT_FILES)")
    p.add_argument("--method", default="rigl", help=" ".join(f"{name}: {m.summary};" for name, m in METHODS.items()))
    p.add_argument("--density", type=float, default=0.1, help="fraction of weights kept, in (0, 1]")
    p.add_argument("--distribution", default="erk", choices=("uniform", "er", "erk"))
    p.add_argument("--init", default="fanin", choices=("dense", "fanin"))
    p.add_argument("--layout", default="csr", choices=("csr", "bsr"))
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--update-every", type=int, default=None,
                   help="steps between topology updates (default: min(100, a tenth of the updating "
                        "phase, the first 75%% of training), so a short run still rewires ~10 times)")
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
    p.add_argument("--batch-size", type=int, default=64,
                   help="examples per step (under torchrun: the global batch, split across the ranks)")
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


@functools.cache
def options() -> dict[str, argparse.Action]:
    """The command's options by destination name (``--no-baseline`` -> ``no_baseline``)."""
    return {act.dest: act for act in build_parser()._actions if act.dest != "help"}


def flag(dest: str) -> str:
    """The flag of option ``dest`` (``no_baseline`` -> ``--no-baseline``)."""
    return "--" + dest.replace("_", "-")


def _with_paths(values: dict) -> dict:
    """``values`` with the options the parser types as paths made ``Path`` (from strings)."""
    return {k: Path(v) if v is not None and k in options() and options()[k].type is Path else v
            for k, v in values.items()}


def parse(argv=None) -> tuple[argparse.Namespace, set[str]]:
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


def parse_args(argv=None) -> argparse.Namespace:
    """Flags over config file over defaults."""
    return parse(argv)[0]


def check_args(a) -> None:
    """Refuse (:class:`UsageError`) options that name nothing or are out of range."""
    if a.model not in MODELS:
        raise UsageError(f"unknown model {a.model!r}; choose one of {MODELS}")
    if a.method not in METHODS:
        raise UsageError(f"unknown method {a.method!r}; choose one of {tuple(METHODS)}")
    if a.dataset not in datasets.DATASETS:
        raise UsageError(f"unknown dataset {a.dataset!r}; choose one of {datasets.DATASETS}")
    if not (0.0 < a.density <= 1.0) or math.isnan(a.density):
        raise UsageError(f"--density must be in (0, 1], got {a.density}")
    for name in ("epochs", "batch_size", "cycle_length", "tickets", "context", "text_bytes"):
        if getattr(a, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(a, name)}")
    for name in ("update_every", "width", "layers", "heads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise UsageError(f"{flag(name)} must be >= 1, got {getattr(a, name)}")


def resolve_device(a) -> str:
    """``--device`` as the device to use ("auto": cuda when available); UsageError for cuda without one."""
    if a.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (this torch: "
                         f"{torch.__version__}); use --device cpu")
    return a.device


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
    return None if ok else f"{flag(dest)} is {value!r}, expected {expected}"


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
    if a.method in METHODS and METHODS[a.method].composite:
        raise UsageError(f"--resume of an {a.method}: resume its member runs (member_<i>/) one by one")
    if ck["method"] not in (a.method, "dense"):
        raise checkpoint_io.CheckpointError(f"checkpoint {cli.resume} is of a {ck['method']!r} run, but its "
                                            f"options say --method {a.method}")
    for key in SESSION_OPTIONS:
        setattr(a, key, getattr(cli, key))
    changed = [k for k in options() if k in given and k not in SESSION_OPTIONS
               and _comparable(k, getattr(cli, k)) != _comparable(k, getattr(a, k))]
    refused = [k for k in changed if k not in RESUME_CHANGEABLE]
    if refused:
        flags = ", ".join(f"{flag(k)} {getattr(cli, k)} (checkpoint: {getattr(a, k)})" for k in refused)
        allowed = ", ".join(flag(k) for k in RESUME_CHANGEABLE)
        raise UsageError(f"--resume {cli.resume}: {flags} cannot change in a resumed run (it keeps its model, "
                         f"data, optimizer and schedules; only {allowed} can)")
    if "epochs" in changed:
        _check_extension(a, cli.epochs)
    if changed:
        note = ", ".join(f"{flag(k)} {getattr(cli, k)} (was {getattr(a, k)})" for k in changed)
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
    if not METHODS[a.method].extendable:
        raise UsageError(f"{where}: a {a.method} run's cycles/phases are planned over its {a.plan_epochs} "
                         f"epochs and cannot be extended")
    if a.lr_schedule == "cosine":
        raise UsageError(f"{where}: the cosine LR schedule reaches 0 at the run's planned end (epoch "
                         f"{a.plan_epochs}); only runs with --lr-schedule constant or step can be extended")
