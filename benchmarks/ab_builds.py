"""A/B of two builds of sparsekern (e.g. the portable avx2 variant against -march=native).

Times the headline cases' fwd+bwd with whichever sparsekern is first on PYTHONPATH and
prints one JSON line; alternate processes of the two builds and compare medians:

    for i in 1 2 3 4 5; do
      PYTHONPATH=/path/to/build_a python3 benchmarks/ab_builds.py >> ab.jsonl
      PYTHONPATH=/path/to/build_b python3 benchmarks/ab_builds.py >> ab.jsonl
    done
    python3 benchmarks/ab_builds.py --summary ab.jsonl

``small`` runs tiny cases once (for valgrind --tool=callgrind; AB_THREADS=1).
"""
import json
import os
import statistics
import sys
import time

import torch

import sparsekern as sk
from sparsekern.testing import make_conv, make_linear


def cases(small: bool):
    if small:
        return {"lin_csr90": (make_linear(512, 512, "csr", density=0.1, seed=1), (64, 512)),
                "conv_csr90": (make_conv(64, 64, 3, "csr", density=0.1, padding=1, seed=2), (2, 64, 14, 14))}
    return {"lin_csr90": (make_linear(4096, 4096, "csr", density=0.1, seed=1), (256, 4096)),
            "lin_csr98": (make_linear(4096, 4096, "csr", density=0.02, seed=1), (256, 4096)),
            "lin_bsr16_90": (make_linear(4096, 4096, "bsr", 16, density=0.1, seed=1), (256, 4096)),
            "conv_csr90": (make_conv(256, 256, 3, "csr", density=0.1, padding=1, seed=2), (8, 256, 14, 14))}


def run(small: bool):
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
    out = {}
    for name, (layer, shape) in cases(small).items():
        x = torch.randn(*shape, requires_grad=True)

        def step():
            y = layer(x)
            y.backward(torch.ones_like(y))
        for _ in range(2):
            step()
        ts = []
        for _ in range(1 if small else 15):
            t0 = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t0)
        out[name] = statistics.median(ts) * 1e3
    print(json.dumps({"build": sk.cpu_kernel_variant(), "threads": torch.get_num_threads(), "ms": out}))


def summary(path):
    by = {}
    for line in open(path):
        r = json.loads(line)
        for case, ms in r["ms"].items():
            by.setdefault(case, {}).setdefault(r["build"], []).append(ms)
    for case, builds in by.items():
        (a, ta), (b, tb) = list(builds.items())[:2]
        print(f"{case:14s} {statistics.median(ta):8.2f} ms  vs {statistics.median(tb):8.2f} ms  "
              f"ratio {statistics.median(tb) / statistics.median(ta):.3f} ({len(ta)}/{len(tb)} runs)\n"
              f"{'':14s} A = {a}\n{'':14s} B = {b}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        summary(sys.argv[2])
    else:
        run(sys.argv[1:2] == ["small"])
