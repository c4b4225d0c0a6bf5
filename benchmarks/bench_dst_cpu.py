"""How fast is a RigL training step with sparsekern against dense and masked-dense RigL?

Trains the same MLP 784->4096->4096->10 (batch 256, float32, SGD with momentum)
four ways in one process with the same threads, and reports the time per
training step *with the topology updates included*:

* dense: plain ``nn.Linear`` training;
* masked-dense RigL: dense weights multiplied by masks (rigl-torch style,
  :mod:`sparsekern.dst.reference`);
* rigl-torch RigL: rigl-torch's own ``RigLScheduler`` on the dense model (masked dense), on
  the same masks (see ``_rigl_torch_peer.py``; "not installed" without the package);
* sparsekern RigL: genuinely sparse layers at 90% sparsity (ERK layer densities, RigL's
  default, or ``--distribution uniform``), rewired in place.

It also times one topology update per layer against one forward SpMM of that
layer (amortised over ``update_every``) and counts parameter-related memory
(values, indices, transpose, gradient, momentum; dense: weight, gradient,
momentum, plus the masks for masked-dense). Writes
``benchmarks/results/<cpu>/dst_cpu.{json,md}``.

    python benchmarks/bench_dst_cpu.py            # ~4 min on 2 cores
    python benchmarks/bench_dst_cpu.py --quick    # 40 steps, an update every 10
"""
from __future__ import annotations

import copy
import json
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import sparsekern as sk
from sparsekern.dst.reference import MaskedDenseDST
from sparsekern.flops import count_flops
from sparsekern.models import mlp

import _rigl_torch_peer as rigl_torch_peer
from _bench_common import base_parser, fmt_gflops, gflops, machine_meta, pct, peak_line, ratio

SIZES = (784, 4096, 4096, 10)
RIGL_TORCH = "rigl-torch RigL"


def batches(n, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (batch,), generator=g))
            for _ in range(n)]


def time_training(contenders: dict, data, block: int, warmup=3) -> dict:
    """Seconds per step of each contender (model, optimizer, engine or None), updates included.

    The contenders take turns in blocks of ``block`` consecutive steps, so that a drift of
    the shared machine hits all of them alike. ``block=1`` is a strict round robin: every
    step then starts with the caches full of the other contenders' weights (~270 MB for
    dense and masked-dense), which real training never sees; larger blocks measure each
    contender in its steady state. Both are reported."""
    def one(model, opt, engine, x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if engine is not None:
            engine.step()
    total = {name: 0.0 for name in contenders}
    with tqdm(total=len(data) * len(contenders), desc=f"steps (blocks of {block})") as bar:
        for start in range(0, len(data), block):
            for name, (model, opt, engine) in contenders.items():
                for i in range(start, min(start + block, len(data))):
                    x, y = data[i]
                    t0 = time.perf_counter()
                    one(model, opt, engine, x, y)
                    if i >= warmup:
                        total[name] += time.perf_counter() - t0
                    bar.update()
    return {name: t / (len(data) - warmup) for name, t in total.items()}


def param_bytes(model, opt, masks=None):
    total = 0
    for p in model.parameters():
        total += 2 * p.numel() * p.element_size()                         # value + grad
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    for b in model.buffers():                                           # sparse indices/transpose
        total += b.numel() * b.element_size()
    for m in (masks or {}).values():
        total += m.numel() * m.element_size()
    return total


def update_cost(engine, model, x, reps=3):
    """Per sparse layer: ms of one topology update and of one forward SpMM."""
    out = {}
    h = x
    for name, m in engine.layers:
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(reps):
                m(h)
            spmm = (time.perf_counter() - t0) / reps
        out[name] = {"forward_spmm_ms": spmm * 1e3}
        h = torch.relu(m(h)).detach()
    return out


def add_rates(results, step_flops: dict, peak) -> None:
    """Each run contender's GFLOP/s (dense: ``step_flops["dense"]``, the sparse ones the useful
    ``step_flops["useful"]``) and its fraction of dense's rate and of the FMA ``peak``."""
    for name, r in results.items():
        if r["status"] == "ok":
            r["step_flops"] = step_flops["dense" if name == "dense" else "useful"]
            r["gflops"] = gflops(r["step_flops"], r["step_s"] * 1e3)
    for r in results.values():
        if r["status"] == "ok":
            r["frac_of_dense_rate"] = ratio(r["gflops"], results["dense"]["gflops"])
            r["frac_of_fma_peak"] = ratio(r["gflops"], peak)


def step_table(meta, results) -> list[str]:
    """The step-time table (after ``add_rates``); a contender that did not run (rigl-torch not
    installed) says why."""
    d = results["dense"]
    rows = [f"GFLOP/s: training FLOPs per second (sparsekern.flops: fwd, dX and dW, the first layer without "
            f"dX; dense counts the full weights, the others the nonzeros only, topology updates left out). "
            f"{peak_line(meta)}", "",
            "| training | ms/step | dense / this | ms/step, round robin | dense / this, round robin "
            "| parameter memory vs dense | GFLOP/s | % of dense rate | % of FMA peak |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r["status"] != "ok":
            rows.append(f"| {name} | {r['status']} | | | | | | | |")
            continue
        rows.append(f"| {name} | {r['step_s'] * 1e3:.1f} | {d['step_s'] / r['step_s']:.2f}x | "
                    f"{r['round_robin_step_s'] * 1e3:.1f} | "
                    f"{d['round_robin_step_s'] / r['round_robin_step_s']:.2f}x | "
                    f"{r['param_bytes'] / d['param_bytes'] * 100:.0f}% | {fmt_gflops(r['gflops'])} | "
                    f"{pct(r['frac_of_dense_rate'])} | {pct(r['frac_of_fma_peak'])} |")
    return rows


def peer_line(results) -> str:
    """rigl-torch's RigLScheduler against sparsekern's RigL: step time ratio and memory."""
    rt, s = results[RIGL_TORCH], results["sparsekern RigL"]
    if rt["status"] != "ok":
        return f"rigl-torch: {rt['status']}."
    return (f"rigl-torch RigLScheduler (masked dense, the same masks, {rt['updates']} updates) vs sparsekern "
            f"RigL: step time {rt['step_s'] / s['step_s']:.2f}x sparsekern's (round robin "
            f"{rt['round_robin_step_s'] / s['round_robin_step_s']:.2f}x); parameter memory "
            f"{rt['param_bytes'] / 2**20:.0f} MiB vs {s['param_bytes'] / 2**20:.0f} MiB "
            f"({rt['param_bytes'] / s['param_bytes']:.1f}x).")


def main():
    p = base_parser(__doc__, "fewer steps (smoke run)", [0.1])
    p.add_argument("--steps", type=int, default=300, help="timed steps per contender (blocks)")
    p.add_argument("--block", type=int, default=25, help="consecutive steps per contender's turn")
    p.add_argument("--rr-steps", type=int, default=100,
                   help="timed steps per contender in the strict round robin (cold caches)")
    p.add_argument("--update-every", type=int, default=100, help="RigL's default delta-T")
    p.add_argument("--distribution", default="erk", choices=["erk", "uniform"],
                   help="layer densities (RigL's default is ERK)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    steps = 40 if a.quick else a.steps
    rr_steps = 20 if a.quick else a.rr_steps
    if a.quick:
        a.update_every, a.block = 10, 5
    density = a.densities[0]
    meta = machine_meta(a.threads, steps)
    print(f"machine: {meta['cpu']} ({meta['cores']} cores), threads={a.threads}, torch {meta['torch']}")
    data = batches(steps + 3, 256)
    total = 10 * (steps + rr_steps + 3)   # schedule long enough that every update in the run rewires
    torch.manual_seed(0)
    base = mlp(SIZES)

    dense = copy.deepcopy(base)
    opt = torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9)

    sparse = copy.deepcopy(base)
    report = sk.sparsify(sparse, density, a.distribution, init="dense", generator=torch.Generator().manual_seed(1))
    print(report)
    sparse_layers = list(report.layers)
    masks = {n: m.topology.mask() for n, m in sparse.named_modules() if isinstance(m, sk.SparseLinear)}
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9)
    engine = sk.dst.RigL(sparse, opt_s, total_steps=total, update_every=a.update_every, drop_fraction=0.3,
                         stop_at=1.0)

    masked = copy.deepcopy(base)
    opt_m = torch.optim.SGD(masked.parameters(), lr=0.01, momentum=0.9)
    ref = MaskedDenseDST(masked, opt_m, masks, total_steps=total, update_every=a.update_every,
                         drop_fraction=0.3, stop_at=1.0, method="rigl")
    contenders = {"dense": (dense, opt, None), "masked-dense RigL": (masked, opt_m, ref)}
    rt_cls, rt_missing = rigl_torch_peer.load()
    if rt_cls is not None:
        rt_model = copy.deepcopy(base)
        rt_opt = torch.optim.SGD(rt_model.parameters(), lr=0.01, momentum=0.9)
        rt_sched = rigl_torch_peer.scheduler(rt_cls, rt_model, rt_opt, masks, total, a.update_every, 0.3)
        contenders[RIGL_TORCH] = (rt_model, rigl_torch_peer.SchedulerStep(rt_opt, rt_sched), None)
    contenders["sparsekern RigL"] = (sparse, opt_s, engine)
    step_s = time_training(contenders, data, a.block)
    rr_s = time_training(contenders, batches(rr_steps, 256, seed=1), 1, warmup=0)
    results = {}
    for name, (model, o, eng) in contenders.items():
        peer = isinstance(o, rigl_torch_peer.SchedulerStep)
        results[name] = {"status": "ok", "step_s": step_s[name], "round_robin_step_s": rr_s[name],
                         "param_bytes": param_bytes(model, o, ref.masks if eng is ref else o.masks() if peer else None),
                         "updates": o.scheduler.rigl_steps if peer else 0 if eng is None
                         else eng.step_count // a.update_every}
    if rt_cls is None:
        results[RIGL_TORCH] = {"status": rt_missing}
    step_flops = {k: count_flops(m, data[0][0][:1]).training_step() * data[0][0].shape[0]
                  for k, m in (("dense", dense), ("useful", sparse))}
    add_rates(results, step_flops, meta["fma_peak"]["gflops"])

    # topology update cost per layer against one forward SpMM, amortised per step
    x = data[0][0]
    costs = update_cost(engine, sparse, x)
    x_, y_ = data[1]
    engine.step_count = a.update_every - 1
    engine._arm_if_next_updates()
    opt_s.zero_grad()
    F.cross_entropy(sparse(x_), y_).backward()
    opt_s.step()
    t0 = time.perf_counter()
    engine.step()
    update_ms = (time.perf_counter() - t0) * 1e3
    for name, m in engine.layers:
        ms = engine.history[-1]["layers"][name].get("ms", 0.0)
        costs[name]["update_ms"] = ms
        costs[name]["amortised_update_per_step_vs_forward_spmm"] = ms / a.update_every / costs[name]["forward_spmm_ms"]

    d = results["dense"]
    lines = [f"CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, float32, MLP "
             f"{'-'.join(map(str, SIZES))}, batch 256, SGD momentum, density {density} ({a.distribution}: "
             f"{', '.join(f'{r.name}={r.density:.3f}' for r in sparse_layers)}), RigL "
             f"update_every={a.update_every}, updates included, {meta['date']}. Steady state: {steps} timed "
             f"steps each, the contenders taking turns in blocks of {a.block} consecutive steps. Round "
             f"robin: {rr_steps} more steps each, one step per turn, so every step starts with caches "
             f"full of the other contenders' weights.", "",
             *step_table(meta, results)]
    s, m = results["sparsekern RigL"], results["masked-dense RigL"]
    lines += ["", f"sparsekern RigL vs dense: {d['step_s'] / s['step_s']:.2f}x (target >= 4x; round robin "
                  f"{d['round_robin_step_s'] / s['round_robin_step_s']:.2f}x), "
                  f"vs masked-dense RigL: {m['step_s'] / s['step_s']:.2f}x (target >= 4x; round robin "
                  f"{m['round_robin_step_s'] / s['round_robin_step_s']:.2f}x); "
                  f"memory {s['param_bytes'] / d['param_bytes'] * 100:.0f}% of dense (target <= 30%).",
              "", peer_line(results), "",
              f"One topology update (all layers, captured batch): {update_ms:.1f} ms; amortised per step "
              f"over update_every={a.update_every}, against one forward SpMM of each layer:", "",
              "| layer | forward SpMM ms | update ms | amortised update / forward SpMM |",
              "|---|---|---|---|"]
    for name, c in costs.items():
        lines.append(f"| {name} | {c['forward_spmm_ms']:.2f} | {c['update_ms']:.1f} | "
                     f"{c['amortised_update_per_step_vs_forward_spmm']:.2f} |")
    md = "\n".join(lines) + "\n"
    a.out.mkdir(parents=True, exist_ok=True)
    stem = ("dst_cpu_quick" if a.quick else "dst_cpu") + ("" if a.distribution == "erk" else f"_{a.distribution}")
    (a.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results, "update_cost": costs,
                                                    "update_ms": update_ms}, indent=1))
    (a.out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
