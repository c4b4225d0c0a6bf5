"""The command itself: parse, load the data, train the method and its dense baseline, write
the results; user mistakes become one line on stderr and exit status 2."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from sparsekern import checkpoint_io
from sparsekern import data as datasets
from sparsekern._optional import MissingDependency, require
from sparsekern.train import checkpoint, cli, distributed, results
from sparsekern.train.cli import UsageError
from sparsekern.train.loop import Aborted, Interrupted, StopRequest, Trainer
from sparsekern.train.methods import METHODS

ERRORS = (UsageError, datasets.DatasetError, checkpoint_io.CheckpointError, MissingDependency,
          distributed.RankMismatch)


def main(argv=None) -> int:
    """The command: returns 0, 2 after a user mistake (one line on stderr), 130 when stopped early."""
    ranks = distributed.Ranks(rank=distributed.launched_rank())   # joined once the options are known
    with StopRequest() as stop:          # for the whole command: a signal never meets Python's default
        try:
            rc = _run(argv, stop, ranks)
            distributed.leave(ranks)
            return rc
        except ERRORS as exc:            # no teardown: the other ranks may be inside a collective
            _say(ranks, f"error: {exc}")
            return 2
        except Interrupted as exc:       # every rank stopped at the same step, after rank 0 saved
            _say(ranks, str(exc), main_only=True)
            distributed.leave(ranks)
            return 130
        except (Aborted, KeyboardInterrupt) as exc:
            _say(ranks, stop.aborted_message(exc))
            return 130


def _say(ranks: distributed.Ranks, text: str, main_only: bool = False) -> None:
    """One line on stderr: from rank 0 as it is, from another rank (unless ``main_only``) naming it."""
    if ranks.main:
        print(f"sparsekern-train: {text}", file=sys.stderr)
    elif not main_only:
        print(f"sparsekern-train: rank {ranks.rank}: {text}", file=sys.stderr)


def _run(argv, stop: StopRequest, ranks: distributed.Ranks) -> int:
    a, given = cli.parse(argv)
    resume = None
    if a.resume is not None:
        resume = checkpoint.load(a.resume)
        a = cli.resumed_options(a, given, resume)
    cli.check_args(a)
    a.device = cli.resolve_device(a)
    ranks.join(a.device)
    ranks.agree_options(cli.checkpoint_args(a))
    if not a.no_plots and ranks.main:  # before training, not after it
        require("matplotlib", "the training command's plots", "train", "pass --no-plots")
    if a.threads:
        torch.set_num_threads(a.threads)
    split = to_device(load_data(a), a.device)
    first = resume["method"] if resume else a.method
    method = METHODS[a.method](a)
    if split.task not in method.tasks:
        usable = [n for n, m in METHODS.items() if split.task in m.tasks]
        raise UsageError(f"--method {a.method} does not apply to {split.task} data (--dataset {a.dataset}); "
                         f"use one of {usable}")
    if method.composite:
        runs = [method.run(split, lambda ai, name: train_one(ai, split, name, stop=stop, ranks=ranks))]
    else:
        runs = [train_one(a, split, a.method, resume if first == a.method else None, stop, ranks)]
    mode = "skip" if a.no_baseline else a.baseline
    if mode != "skip" and a.method != "dense":
        runs.append(dense_baseline(a, split, mode, resume if first == "dense" else None, stop, ranks))
    for r in runs:
        r.pop("model", None)
    if not ranks.main:
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs}
    if split.info:
        record["dataset"] = split.info
    (a.out / "results.json").write_text(json.dumps(record, indent=1))
    if split.info:
        print(describe_data(split.info))
    print(results.table(runs))
    written = [a.out / "results.json"] + ([] if a.no_plots else results.plot(runs, a.out))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def load_data(a) -> datasets.Split:
    """The ``--dataset`` split for model ``--model`` (digits as images for the CNNs)."""
    kwargs = {}
    if a.dataset == "digits":
        kwargs = {"image": a.model not in ("mlp", "gpt")}
    elif a.dataset == "text":
        kwargs = {"context": a.context, "max_bytes": a.text_bytes}
    return datasets.load(a.dataset, root=a.data_dir, **kwargs)


def describe_data(info: dict) -> str:
    """One line on where the data came from (the text corpus: files, bytes, checksum)."""
    return (f"{info['name']}: {info['bytes']:,} bytes of {len(info['files'])} Python {info['python']} stdlib "
            f"files ({info['files'][0][0]} .. {info['files'][-1][0]}; {info['train_bytes']:,} train, "
            f"{info['valid_bytes']:,} validation; sha256 {info['sha256'][:12]})"
            + (f"; missing here: {', '.join(info['missing'])}" if info["missing"] else ""))


def train_one(a, split, method: str, resume: dict | None = None, stop: StopRequest | None = None,
              ranks: distributed.Ranks | None = None) -> dict:
    """Train ``method`` on ``split`` (continuing ``resume``, a checked checkpoint, if given); returns
    metrics, FLOPs, timings and the "model". ``stop``: the caller's :class:`StopRequest` (else one
    for this run); ``ranks``: the job's ranks (else a single process)."""
    if stop is None:
        with StopRequest() as stop:
            return train_one(a, split, method, resume, stop, ranks)
    trainer = Trainer(a, split, method, stop, ranks)
    if resume is not None:
        trainer.resume(resume)
    return trainer.run()


def to_device(split, device):
    """``split`` with its tensors on ``device``."""
    if device == "cpu":
        return split
    return datasets.Split(split.x_train.to(device), split.y_train.to(device), split.x_test.to(device),
                          split.y_test.to(device), split.num_classes, split.task, split.info)


BASELINE_KEYS = ("model", "width", "layers", "heads", "dataset", "data_dir", "context", "text_bytes", "epochs",
                 "plan_epochs",
                 "batch_size", "optimizer", "lr", "lr_schedule", "seed", "threads", "device")


def dense_baseline(a, split, mode: str, resume=None, stop: StopRequest | None = None,
                   ranks: distributed.Ranks | None = None) -> dict:
    """Train the dense baseline, or with mode "cache" reuse an earlier run with the same options."""
    ranks = ranks or distributed.Ranks()
    key = json.dumps({k: str(getattr(a, k)) for k in BASELINE_KEYS} | {"world": ranks.world}, sort_keys=True)
    cache = Path(a.out).parent / ".baseline_cache" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if mode == "cache" and ranks.gather(cache.is_file())[0]:
        run = json.loads(cache.read_text())
        run["cached_from"] = str(cache)
        return run
    run = train_one(a, split, "dense", resume, stop, ranks)
    if mode == "cache" and ranks.main:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({k: v for k, v in run.items() if k != "model"}))
    return run
