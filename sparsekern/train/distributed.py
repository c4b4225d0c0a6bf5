"""The training command under ``torchrun``: one DDP job over the ranks.

``torchrun --nproc_per_node N -m sparsekern.train ...`` starts N processes with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :meth:`Ranks.join` then
initialises the process group (gloo on CPU, NCCL on CUDA with one device per local rank).
Every rank draws the same data order, and each step's global batch (``--batch-size``) is
split into contiguous per-rank shards; each rank's mean loss is weighted by its share, so
DDP's gradient average is the gradient of the global batch's mean loss, as in a
single-process run of the same batch (up to float rounding). Only rank 0 prints, writes
results and plots, and checkpoints; every rank resumes from the same checkpoint.

A diverging model must never pass silently: the ranks compare their options before
training (:meth:`Ranks.agree_options`) and a digest of every parameter and sparse topology
(:func:`model_digests`) after ``sparsify`` or a resume, after every topology update and at
the end (:meth:`Ranks.check_same_model`), and refuse with :class:`RankMismatch` naming what
differs. DDP does not sync buffers in the forward (``forward_sync_buffers=False``, before torch
2.13 ``broadcast_buffers=False``): the topology (index buffers) is checked, not overwritten
every step; BatchNorm running statistics are then each rank's own, and rank
0's are the ones evaluated and saved.
"""
from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class RankMismatch(ValueError):
    """The ranks of one distributed job disagree (options, model); the message says where."""


def model_digests(model: nn.Module) -> dict[str, str]:
    """A digest (BLAKE2b of the bytes, shape and dtype) of every entry of ``model``'s
    ``state_dict`` but the BatchNorm running statistics: the parameters and the sparse
    layers' topologies. name -> hex digest."""
    skip = {f"{n}.{b}" if n else b for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b, _ in m.named_buffers(recurse=False)}
    out = {}
    for name, t in model.state_dict().items():
        if name in skip or not torch.is_tensor(t):
            continue
        t = t.detach().cpu().contiguous()
        h = hashlib.blake2b(f"{tuple(t.shape)} {t.dtype}".encode(), digest_size=16)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[name] = h.hexdigest()
    return out


@dataclass
class Ranks:
    """The processes of one job: ``world`` ranks, this one ``rank`` (a single process: 1 and 0)."""
    world: int = 1
    rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """Whether there are several ranks."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this rank prints, writes results and checkpoints (rank 0)."""
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of the global batch ``idx`` (int64 [B]); ranks differ by at most one."""
        return idx.tensor_split(self.world)[self.rank] if self.distributed else idx

    def weight(self, n_local: int, n_global: int) -> float:
        """The factor on this rank's mean loss that makes DDP's average of the ranks' gradients
        the gradient of the global batch's mean loss: world * n_local / n_global (1 alone)."""
        return self.world * n_local / n_global

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (the model itself for a single process)."""
        if not self.distributed:
            return model
        ddp = nn.parallel.DistributedDataParallel
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})        # the name before torch 2.13
        return ddp(model, **no_sync)

    def reduce_step(self, loss_share: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """Sum the ranks' loss shares (each rank's mean loss * n_local / n_global: the sum is the
        global batch's mean) and whether any rank was asked to stop, in one all-reduce."""
        t = torch.stack([loss_share.detach().float().reshape(()),
                         torch.tensor(float(stop), device=loss_share.device)])
        dist.all_reduce(t)
        return float(t[0]), bool(t[1] > 0)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self._device())
        dist.all_reduce(t)
        return bool(t[0] > 0)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every rank is here (rank 0's checkpoint is written before anyone goes on)."""
        if self.distributed:
            dist.barrier()

    def agree_options(self, options: dict) -> None:
        """Refuse (:class:`RankMismatch`) unless every rank was given the same options."""
        if not self.distributed:
            return
        every = self.gather(options)
        differ = sorted(k for k in set().union(*every) if len({repr(o.get(k)) for o in every}) > 1)
        if differ:
            per_rank = "; ".join(f"--{k.replace('_', '-')}: " + ", ".join(f"rank {r} {o.get(k)!r}"
                                                                          for r, o in enumerate(every))
                                 for k in differ)
            raise RankMismatch(f"the {self.world} ranks were given different options ({per_rank}); every rank "
                               f"must run the same command (seed every rank alike)")

    def check_same_model(self, model: nn.Module, when: str) -> list[str]:
        """Refuse (:class:`RankMismatch`) unless every rank holds the same parameters and sparse
        topologies (:func:`model_digests`); returns each rank's digest of the whole model."""
        mine = model_digests(model)
        whole = hashlib.blake2b("".join(f"{k}={v};" for k, v in sorted(mine.items())).encode(),
                                digest_size=16).hexdigest()
        if not self.distributed:
            return [whole]
        every = self.gather((whole, mine))
        if len({w for w, _ in every}) > 1:
            names = sorted({k for _, d in every for k in d if len({e.get(k) for _, e in every}) > 1})
            ranks = [r for r, (w, _) in enumerate(every) if w != every[0][0]]
            shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
            raise RankMismatch(f"{when}, rank(s) {ranks} hold a different model than rank 0 ({len(names)} "
                               f"tensors differ: {shown}); the ranks were seeded differently before sparsify, "
                               f"or diverged. Every rank must build the same model (same --seed, same code)")
        return [w for w, _ in every]

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


    def join(self, device: str) -> None:
        """Join the job torchrun started (``WORLD_SIZE`` > 1), in place: init the process group
        (NCCL for ``device`` "cuda", on the local rank's GPU; else gloo). Alone: nothing."""
        if not launched():
            return
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RankMismatch(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {var} is not set; start the "
                                   f"ranks with torchrun --nproc_per_node N -m sparsekern.train ...")
        backend = "nccl" if device == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend)
        self.world, self.rank, self.backend = dist.get_world_size(), dist.get_rank(), backend


def launched() -> bool:
    """Whether this process was started by torchrun (or alike) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by it)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def leave(ranks: Ranks) -> None:
    """Tear the process group down, every rank done first (nothing for a single process)."""
    if ranks.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
