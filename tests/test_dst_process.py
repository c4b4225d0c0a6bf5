"""DST across processes: bitwise resume from a checkpoint, and identical decisions under DDP."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).with_name("dst_worker.py"))


def run(*args, env=None):
    out = subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]


def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path):
    run("resume", "--start", 0, "--end", 40, "--dump", tmp_path / "straight.pt")
    run("resume", "--start", 0, "--end", 18, "--save", tmp_path / "ck.pt", "--dump", tmp_path / "half.pt")
    run("resume", "--start", 18, "--end", 40, "--load", tmp_path / "ck.pt", "--dump", tmp_path / "resumed.pt")
    a, b = torch.load(tmp_path / "straight.pt"), torch.load(tmp_path / "resumed.pt")
    assert a["_updates"] >= 5 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    half = torch.load(tmp_path / "half.pt")
    assert any(not torch.equal(a[k], half[k]) for k in a if k.endswith("col_indices"))  # it kept rewiring


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(tmp_path, method, extra=()):
    """Start rank 0 and 1 with gloo on a free port; returns the ranks' stderr if either failed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "ddp", "--rank", str(r), "--world", "2", "--port",
                               str(port), "--method", method, "--dump", str(tmp_path / f"r{r}.pt"), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    return None if all(p.returncode == 0 for p in procs) else "\n".join(e[-2000:] for e in errs)


@pytest.mark.parametrize("method,scores", [("rigl", "gather"), ("rigl", "reduce"), ("set", None)])
def test_ddp_two_ranks_take_identical_decisions(tmp_path, method, scores):
    """Bit-identical topologies and values on both ranks, and no dense [out, in] tensor reduced:
    "gather" all-gathers only batch-sized activations, "reduce" all-reduces tiles within
    growth_memory=2000 bytes (11 bytes per fp32 CSR position: at most 181 positions, every layer of
    the worker's mlp((12, 48, 48, 5)) has 240 or more)."""
    extra = () if scores is None else ("--ddp-scores", scores, "--growth-memory", "2000")
    # the free port can be taken between probing and binding: try a fresh one, up to 3 times
    for _ in range(3):
        err = launch_two_ranks(tmp_path, method, extra)
        if err is None or "address already in use" not in err.lower():
            break
    assert err is None, err
    r0, r1 = torch.load(tmp_path / "r0.pt"), torch.load(tmp_path / "r1.pt")
    assert r0["_updates"] >= 5
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    smallest_layer = 48 * 5
    if scores == "gather":                                # x, dy of 16 samples; no all_reduce at all
        assert int(r0["_max_all_reduce"]) == 0 and 0 < int(r0["_max_all_gather"]) <= 16 * 48
    elif scores == "reduce":                              # tiles only, never a whole layer
        assert 0 < int(r0["_max_all_reduce"]) <= 2000 // 11 < smallest_layer
