"""Subprocess worker for the DST resume and DDP tests (run as a script, not collected).

    python tests/dst_worker.py resume --start S --end E [--load F] [--save F] --dump F
    python tests/dst_worker.py ddp --rank R --world W --port P --dump F [--ddp-scores gather|reduce]
        [--growth-memory BYTES]

The ddp mode records the largest tensor the engine passes to all_reduce / all_gather
(``_max_all_reduce`` / ``_max_all_gather``, in elements) next to the model's state.
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


def build(method="rigl", **engine_kw):
    torch.manual_seed(0)
    model = mlp((12, 48, 48, 5))
    sk.sparsify(model, 0.25, "erk", init="fanin", generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cls = sk.dst.RigL if method == "rigl" else sk.dst.SET
    engine = cls(model, opt, total_steps=TOTAL, update_every=EVERY, drop_fraction=0.3, seed=11, **engine_kw)
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


def dump(model, engine, path, **extra):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({k: torch.tensor(v) for k, v in extra.items()})
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
    kw = {} if a.method != "rigl" else {"ddp_scores": a.ddp_scores, "growth_memory": a.growth_memory}
    model, opt, engine = build(a.method, **kw)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    seen = {"all_reduce": 0, "all_gather": 0}

    def recording(name):
        real = getattr(dist, name)

        def call(out, *args, **kwargs):
            tensors = out if isinstance(out, list) else [out]
            seen[name] = max(seen[name], max(t.numel() for t in tensors))
            return real(out, *args, **kwargs)
        return call
    for name in seen:                    # only Python-level calls: DDP's own bucket reduction is C++
        setattr(dist, name, recording(name))
    train(model, opt, engine, 0, TOTAL, rank=a.rank, forward=wrapped)
    dump(model, engine, a.dump, _max_all_reduce=seen["all_reduce"], _max_all_gather=seen["all_gather"])
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
    p.add_argument("--ddp-scores", default="auto")
    p.add_argument("--growth-memory", type=int)
    a = p.parse_args()
    resume(a) if a.mode == "resume" else ddp(a)
