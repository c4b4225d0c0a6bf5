"""Sparse training beyond dense memory: construction, RigL updates and the ITOP tracker in O(nnz)
memory (a subprocess's peak RSS against a layer whose dense gradient is 2.25 GiB), and layers too large
for int32 indices refused with the numbers."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern import SparseLinear
from sparsekern.formats import row_ids
from sparsekern.models import mlp
from sparsekern.sampling import random_structure

ROOT = Path(__file__).resolve().parents[1]

BOUNDED = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from torch import nn
    import sparsekern as sk
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # construction: a 65536 x 65536 layer (a dense bool mask alone would be 4 GiB)
    big = sk.SparseLinear(65536, 65536, density=1e-4, bias=False, generator=torch.Generator().manual_seed(1))
    del big
    # one RigL update of a 24576 x 24576 layer: its dense gradient would be 2.25 GiB (fp32)
    model = nn.Sequential(sk.SparseLinear(24576, 24576, density=2e-4, bias=False,
                                          generator=torch.Generator().manual_seed(2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = sk.dst.RigL(model, opt, total_steps=4, update_every=1, drop_fraction=0.3, schedule="constant",
                         stop_at=1.0)
    model(torch.randn(8, 24576)).square().mean().backward()
    opt.step()
    t = time.perf_counter()
    assert engine.step()
    rec = engine.history[-1]["layers"]["0"]
    print(json.dumps({"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "grown": rec["grown"], "regrown": rec["regrown"], "update_s": time.perf_counter() - t,
                      "start_s": t - t0,
                      "itop_entries": engine.ever_active["0"].numel(), "nnz": model[0].nnz}))
""")


def test_peak_memory_stays_far_below_one_dense_gradient():
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", BOUNDED], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    res = json.loads(out.stdout.strip().splitlines()[-1])
    dense_gradient = 24576 * 24576 * 4
    assert res["grown"] == round(0.3 * res["nnz"]) > 0
    assert res["itop_entries"] == res["nnz"] + res["grown"] - res["regrown"]     # a sorted set, not a bitmap
    # torch itself takes ~0.3-0.4 GiB; the layer, its optimizer state, one update: under 1 GiB
    assert res["peak_bytes"] < 2**30 < dense_gradient / 2, res


def test_a_layer_too_large_for_int32_indices_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"131072 x 131072 positions with 3435973837 stored entries is too large "
                                         r"for int32 indices \(at most 2147483647"):
        SparseLinear(2**17, 2**17, density=0.2)
    with pytest.raises(ValueError, match="int32"):
        SparseLinear(2**31, 1, density=0.0, bias=False)              # columns past int32
    with pytest.raises(ValueError, match="density must be in"):
        SparseLinear(8, 8, density=1.5)


def test_the_itop_tracker_is_the_sorted_set_of_ever_active_positions():
    torch.manual_seed(0)
    model = mlp((20, 48, 5))
    sk.sparsify(model, 0.2, "uniform", generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = sk.dst.RigL(model, opt, total_steps=40, update_every=2, drop_fraction=0.4, stop_at=1.0)
    layers = dict(engine.layers)
    seen = {n: m.topology.mask().flatten().clone() for n, m in layers.items()}   # a dense oracle, here only
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 20, generator=g)), torch.randint(0, 5, (8,), generator=g)).backward()
        opt.step()
        engine.step()
        for n, m in layers.items():
            seen[n] |= m.topology.mask().flatten()
    for n, v in engine.ever_active.items():
        assert v.dtype == torch.int64 and torch.equal(v, torch.nonzero(seen[n]).flatten())
    assert engine.itop_rate() == sum(int(s.sum()) for s in seen.values()) / sum(s.numel() for s in seen.values())
    # a state saved with the former bool-per-position tracker still loads
    state = engine.state_dict()
    legacy = {**state, "ever_active": {n: seen[n].clone() for n in seen}}
    other = sk.dst.RigL(model, opt, total_steps=40, update_every=2, drop_fraction=0.4, stop_at=1.0)
    other.load_state_dict(legacy)
    assert all(torch.equal(other.ever_active[n], engine.ever_active[n]) for n in seen)
    bad = {**state, "ever_active": {**state["ever_active"], "0": state["ever_active"]["0"].flip(0)}}
    with pytest.raises(ValueError, match=r"ever_active\['0'\].*ascending unique int64 positions in \[0, 960\)"):
        other.load_state_dict(bad)


def test_random_topologies_are_uniform_exact_and_seeded():
    a = SparseLinear(300, 200, density=0.05, generator=torch.Generator().manual_seed(4)).topology
    b = SparseLinear(300, 200, density=0.05, generator=torch.Generator().manual_seed(4)).topology
    c = SparseLinear(300, 200, density=0.05, generator=torch.Generator().manual_seed(5)).topology
    assert torch.equal(a.col_indices, b.col_indices) and not torch.equal(a.col_indices, c.col_indices)
    assert a.values.numel() == round(0.05 * 300 * 200)
    a.validate()
    dense = SparseLinear(40, 30, density=0.9, generator=torch.Generator().manual_seed(0)).topology  # complement draw
    dense.validate()
    assert dense.nnz == round(0.9 * 1200)
    # uniform: every position is kept about equally often over many draws
    hits = torch.zeros(20 * 10)
    for s in range(400):
        offsets, cols = random_structure(10, 20, 50, torch.Generator().manual_seed(s))
        hits[row_ids(offsets, 50) * 20 + cols] += 1
    assert hits.sum() == 400 * 50 and hits.min() > 60 and hits.max() < 140        # mean 100
