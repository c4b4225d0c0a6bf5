"""Train a genuinely sparse network end to end and compare it with dense.

    python -m sparsekern.train --method rigl --density 0.1 --epochs 10
    python -m sparsekern.train --model gpt --dataset text --optimizer adamw --lr 3e-3 --epochs 2
    python -m sparsekern.train --config run.toml --epochs 20      # flags override the file
    python -m sparsekern.train --resume runs/latest/checkpoint_rigl.pt
    torchrun --nproc_per_node 2 -m sparsekern.train ...            # one DDP job over 2 ranks

Trains the chosen method and, unless ``--no-baseline``, the same model dense on the
same data, then prints a side-by-side table (accuracy, NLL, ECE, or for text validation
loss, perplexity and bits per byte; nonzero parameters and bytes, FLOPs from the real
nonzeros, time per step as median and interquartile range), writes ``results.json`` and
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

Under torchrun the ranks split each global batch (``--batch-size``), only rank 0 prints,
writes and checkpoints, and ranks that disagree on their options or their model (seeded
differently) are refused (:mod:`sparsekern.train.distributed`).

The package: ``cli`` (options, config files, resume rules), ``loop`` (the ``Trainer`` and
the signals), ``methods`` (one hook object per method), ``tasks`` (loss and evaluation),
``checkpoint`` (the one list of checkpoint keys), ``results`` (tables and plots),
``distributed`` (torchrun), ``command`` (``main``). Models: :mod:`sparsekern.models`.
"""
import torch.nn.functional as F  # noqa: F401  (tests patch F.cross_entropy through here)

from sparsekern import data as datasets  # noqa: F401
from sparsekern.train.command import main

__all__ = ["main"]
