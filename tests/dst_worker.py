"""Subprocess worker for the DST resume and DDP tests (run as a script, not collected).

    python tests/dst_worker.py resume --start S --end E [--load F] [--save F] --dump F
    python tests/dst_worker.py ddp --rank R --world W --port P --dump F
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparsekern as sk  # noqa: E402
from sparsekern.models import mlp  # noqa: E402

TOTAL, EVERY = 40, 4


def build(method="rigl"):
    torch.manual_seed(0)
    model = mlp((12, 48, 48, 5))
    sk.sparsify(model, 0.25, "erk", init="fanin", generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cls = sk.dst.RigL if method == "rigl" else sk.dst.SET
    engine = cls(model, opt, total_steps=TOTAL, update_every=EVERY, drop_fraction=0.3, seed=11)
    return model, opt, engine


def batch(step, rank=0):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def train(model, opt, engine, start, end, rank=0, forward=None):
    for step in range(start, end):
        x, y = batch(step, rank)
        opt.zero_grad()
        F.cross_entropy((forward or model)(x), y).backward()
        opt.step()
        engine.step()


def dump(model, engine, path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["_itop"] = torch.tensor(engine.itop_rate())
    state["_updates"] = torch.tensor(len(engine.history))
    torch.save(state, path)


def resume(a):
    model, opt, engine = build()
    if a.load:
        ck = torch.load(a.load, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        engine.load_state_dict(ck["dst"])
    train(model, opt, engine, a.start, a.end)
    if a.save:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dst": engine.state_dict()}, a.save)
    dump(model, engine, a.dump)


def ddp(a):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    dist.init_process_group("gloo", rank=a.rank, world_size=a.world)
    torch.set_num_threads(1)
    model, opt, engine = build(a.method)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    train(model, opt, engine, 0, TOTAL, rank=a.rank, forward=wrapped)
    dump(model, engine, a.dump)
    dist.barrier()                  # both ranks are done before either tears gloo down
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: gloo's threads racing it made a rare worker abort with
    # "terminate called without an active exception" after all the work was done.
    os._exit(0)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["resume", "ddp"])
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--end", type=int, default=TOTAL)
    p.add_argument("--load")
    p.add_argument("--save")
    p.add_argument("--dump", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--port", type=int, default=29512)
    p.add_argument("--method", default="rigl")
    a = p.parse_args()
    resume(a) if a.mode == "resume" else ddp(a)
