"""Sparse training beyond dense memory: RigL on MLPs whose dense training state does not fit in RAM.

Two parts, every measurement in its own subprocess (so ``ru_maxrss`` is that run's peak):

* ``train``: an MLP ``d_in -> W -> W ... -> classes`` of genuinely sparse layers (built directly
  as ``SparseLinear``: no dense model ever exists), trained with RigL (SGD + momentum) on the
  synthetic wide task (``sparsekern.data.make_synthetic``). Reports peak RSS against the dense
  training state (weights + gradients + momentum, fp32), the median step time, the mean
  topology-update time, the in-time over-parameterisation rate, and loss/accuracy. With
  ``--compare-dense`` (where a dense gradient fits) it also times, in the same process and
  alternating, one layer's growth the tiled way against the dense path (whole dY^T X, then the
  same selection), and checks they pick the same positions.
* ``sweep``: peak memory against layer width at a fixed nnz per layer, for sparsekern RigL and
  masked-dense RigL (``sparsekern.dst.reference``), the latter measured while its estimated
  state fits ``--dense-limit-gib`` and extrapolated beyond (a + b W^2 fit; sparsekern: a + c W).

Small configuration (a few minutes on 2 cores)::

    python benchmarks/bench_scale_cpu.py --widths 16384 32768 --sweep-widths 2048 4096 8192 16384 32768

The full demonstration (65536 x 65536 hidden layers at 0.5% density: the dense state would be
about 51 GB per layer; long: every RigL update forms dY^T X tile by tile, ~0.5 TFLOP a layer)::

    python benchmarks/bench_scale_cpu.py --widths 65536 --density 0.005 --hidden-layers 2 \\
        --steps 300 --update-every 100 --batch 64 --lr 0.1 --sweep-widths 4096 8192 16384 32768 65536 \\
        --out benchmarks/results/amd-epyc-25-1-avx2/scale

Results go to ``benchmarks/results/<cpu>/scale_cpu.{json,md,png}`` with ``--out`` (printed always).
Timings are only comparable within one run; the machines are shared.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


# ------------------------------------------------------------------ one run (subprocess)
def build(cfg):
    import torch
    from torch import nn

    import sparsekern as sk
    W, L, d = cfg["width"], cfg["hidden_layers"], cfg["density"]
    g = torch.Generator().manual_seed(cfg["seed"])
    sizes = [cfg["d_in"]] + [W] * (L + 1) + [cfg["classes"]]
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden = 0 < i < len(sizes) - 2                    # the W x W layers take the density; the
        dens = d if hidden else min(1.0, cfg["edge_density"])   # thin input/output layers their own
        if cfg["impl"] == "sparsekern":
            layer = sk.SparseLinear(a, b, density=dens, generator=g)
            layer.init_fanin_normal(1.0 if i == len(sizes) - 2 else 2.0, g)   # He; unit variance logits
        else:
            layer = nn.Linear(a, b)
        mods.append(layer)
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods), sizes


def dense_state_bytes(sizes) -> int:
    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return 3 * 4 * params                                 # weights + gradients + momentum, fp32


def run_one(cfg) -> dict:
    import torch
    import torch.nn.functional as F

    import sparsekern as sk
    from sparsekern.data import make_synthetic
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(cfg["threads"])
    t_build = time.perf_counter()
    model, sizes = build(cfg)
    build_s = time.perf_counter() - t_build
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    kw = dict(total_steps=cfg["steps"], update_every=cfg["update_every"], drop_fraction=0.3, stop_at=0.75)
    if cfg["impl"] == "sparsekern":
        engine = sk.dst.RigL(model, opt, **kw)
    else:
        from sparsekern.dst.reference import MaskedDenseDST
        from sparsekern.nn._common import random_mask
        g = torch.Generator().manual_seed(cfg["seed"])
        masks = {}
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                hidden = m.in_features == cfg["width"] and m.out_features == cfg["width"]
                masks[n] = random_mask(m.out_features, m.in_features,
                                       density=cfg["density"] if hidden else min(1.0, cfg["edge_density"]),
                                       generator=g)
        engine = MaskedDenseDST(model, opt, masks, method="rigl", **kw)
    data = make_synthetic(n_train=cfg["batch"] * cfg["steps"], n_test=1024, dim=cfg["d_in"],
                          num_classes=cfg["classes"], seed=cfg["seed"])
    step_s, update_s, losses = [], [], []
    for s in range(cfg["steps"]):
        x = data.x_train[s * cfg["batch"]:(s + 1) * cfg["batch"]]
        y = data.y_train[s * cfg["batch"]:(s + 1) * cfg["batch"]]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        t1 = time.perf_counter()
        updated = engine.step()
        t2 = time.perf_counter()
        (update_s if updated else step_s).append((t2 - t0) if not updated else (t2 - t1))
        losses.append(float(loss.detach()))
    with torch.no_grad():
        acc = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
        xb = data.x_train[:cfg["batch"]]
        fwd = []
        for _ in range(7):                     # the update-cost goal's unit: one forward of the model
            t0 = time.perf_counter()
            model(xb)
            fwd.append(time.perf_counter() - t0)
        fwd_s = sorted(fwd)[len(fwd) // 2]
    res = {**cfg, "sizes": sizes, "dense_state_bytes": dense_state_bytes(sizes), "build_s": build_s,
           "step_ms_median": 1e3 * sorted(step_s)[len(step_s) // 2] if step_s else None,
           "update_s_mean": sum(update_s) / len(update_s) if update_s else None, "updates": len(update_s),
           "fwd_ms_median": 1e3 * fwd_s,
           # the goal: an update amortised over RigL's 100 steps costs at most one forward
           "update_at_100_over_fwd": (sum(update_s) / len(update_s)) / 100 / fwd_s if update_s else None,
           "loss_first": sum(losses[:5]) / len(losses[:5]), "loss_last": sum(losses[-5:]) / len(losses[-5:]),
           "test_acc": acc}
    if cfg["impl"] == "sparsekern":
        res["itop_rate"] = engine.itop_rate()
        res["itop_set_bytes"] = sum(v.numel() * 8 for v in engine.ever_active.values())
        res["itop_bitmap_bytes"] = sum(engine._positions(m) // 8 for _, m in engine.layers)
        res["nnz_total"] = sum(m.nnz for _, m in engine.layers)
        timed = [h for h in engine.history if any("ms" in v for v in h["layers"].values())]
        res["last_update_ms"] = {n: v.get("ms") for n, v in timed[-1]["layers"].items()} if timed else None
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cfg.get("compare_dense") and cfg["impl"] == "sparsekern":
        res["growth_vs_dense"] = compare_growth(model, engine, data, cfg)
    return res


def compare_growth(model, engine, data, cfg) -> dict:
    """Time one W x W layer's growth tile by tile against the dense path, alternating, same process."""
    import torch
    import torch.nn.functional as F

    from sparsekern.dst import growth
    from sparsekern.dst.rebuild import active_positions
    from sparsekern.dst.selection import rigl_grow
    name, layer = next((n, m) for n, m in engine.layers if tuple(m.topology.shape) == (cfg["width"],) * 2)
    tap = engine._taps[name]
    tap.reset(armed=True)
    x, y = data.x_train[:cfg["batch"]], data.y_train[:cfg["batch"]]
    F.cross_entropy(model(x), y).backward()
    pairs = tap.pairs
    tap.reset(armed=False)
    kept = active_positions(layer.topology)
    k = int(0.3 * kept.numel())
    kept = kept[k:]                                       # any kept set: the same for both paths
    R = layer.topology.shape[0]
    times = {"tiled": [], "dense": []}
    picks = {}
    for _ in range(3):
        t = time.perf_counter()
        picks["tiled"] = growth.grow_top_k(layer, pairs, kept, k, engine.tile_rows[name])
        times["tiled"].append(time.perf_counter() - t)
        t = time.perf_counter()
        g = growth.gradient_rows(layer, growth.prepared_pairs(layer, pairs), 0, R)   # the whole dense gradient
        picks["dense"] = rigl_grow(growth.block_scores(g, 1), kept, k)
        del g
        times["dense"].append(time.perf_counter() - t)
    return {"tiled_s": min(times["tiled"]), "dense_s": min(times["dense"]),
            "ratio_tiled_over_dense": min(times["tiled"]) / min(times["dense"]),
            "same_positions": bool(torch.equal(picks["tiled"], picks["dense"])),
            "tile_rows": engine.tile_rows[name], "rows": R}


def in_subprocess(cfg) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        return {**cfg, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report
def gib(b):
    return None if b is None else b / 2**30


def fit(points, power):
    """Least squares a + b * W**power over (W, bytes) points."""
    n = len(points)
    xs = [w ** power for w, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return lambda w: (my - b * mx) + b * w ** power


def markdown(meta, train, sweep) -> str:
    lines = [f"# Sparse training beyond dense memory ({meta['cpu']}, {meta['threads']} threads, "
             f"{meta['date']}, RAM {meta['ram_gib']:.1f} GiB)", "",
             "## RigL training", "",
             "| width | hidden layers | density | nnz | dense state GiB | peak RSS GiB | peak / dense | "
             "build s | step ms | update s | fwd ms | update / 100 / fwd | ITOP | ITOP set / bitmap MiB | "
             "loss first -> last | test acc | tiled / dense growth time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        if "error" in r:
            lines.append(f"| {r['width']} | {r['hidden_layers']} | {r['density']} | error: {r['error']} |")
            continue
        cmp = r.get("growth_vs_dense")
        cmp_s = "n/a" if not cmp else (f"{cmp['ratio_tiled_over_dense']:.2f}x ({cmp['tiled_s']:.2f} vs "
                                       f"{cmp['dense_s']:.2f} s, same: {cmp['same_positions']})")
        lines.append(
            f"| {r['width']} | {r['hidden_layers']} | {r['density']} | {r['nnz_total']} | "
            f"{gib(r['dense_state_bytes']):.2f} | {gib(r['peak_rss_bytes']):.2f} | "
            f"{r['peak_rss_bytes'] / r['dense_state_bytes']:.3f} | {r['build_s']:.1f} | {r['step_ms_median']:.0f} | "
            f"{r['update_s_mean']:.2f} | {fmt_opt(r.get('fwd_ms_median'), '.0f')} | "
            f"{fmt_opt(r.get('update_at_100_over_fwd'), '.2f')} | {r['itop_rate']:.4f} | {r['itop_set_bytes'] / 2**20:.1f} / "
            f"{r['itop_bitmap_bytes'] / 2**20:.1f} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
            f"{r['test_acc']:.3f} | {cmp_s} |")
    if sweep:
        lines += ["", f"## Peak memory against width, nnz per W x W layer fixed at {meta['sweep_nnz']}", "",
                  "| width | sparsekern peak GiB | masked-dense peak GiB | masked-dense |", "|---|---|---|---|"]
        for w, s, m, how in sweep_table(sweep):
            lines.append(f"| {w} | {s:.2f} | {m:.2f} | {how} |")
    return "\n".join(lines) + "\n"


def fmt_opt(v, spec):
    return "n/a" if v is None else format(v, spec)


def sweep_table(sweep):
    sk_pts = {r["width"]: r["peak_rss_bytes"] for r in sweep if r["impl"] == "sparsekern" and "error" not in r}
    md_pts = {r["width"]: r["peak_rss_bytes"] for r in sweep if r["impl"] == "masked" and "error" not in r}
    widths = sorted({r["width"] for r in sweep})
    md_fit = fit(sorted(md_pts.items()), 2) if len(md_pts) >= 2 else None
    rows = []
    for w in widths:
        m = md_pts.get(w)
        how = "measured" if m is not None else "extrapolated a + b W^2"
        if m is None:
            m = md_fit(w) if md_fit else float("nan")
        rows.append((w, gib(sk_pts.get(w, float("nan"))), gib(m), how))
    return rows


def plot(sweep, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sweep_table(sweep)
    fig, ax = plt.subplots(figsize=(7, 5))
    ws = [r[0] for r in rows]
    ax.plot(ws, [r[1] for r in rows], "o-", label="sparsekern RigL (measured)")
    meas = [(r[0], r[2]) for r in rows if r[3] == "measured"]
    extra = [(r[0], r[2]) for r in rows if r[3] != "measured"]
    ax.plot(*zip(*meas), "s-", label="masked-dense RigL (measured)")
    if extra:
        ax.plot(*zip(*([meas[-1]] + extra)), "s--", color=ax.lines[-1].get_color(),
                label="masked-dense RigL (extrapolated)")
    ax.axhline(meta["ram_gib"], color="k", lw=0.8, ls=":", label=f"this machine's RAM ({meta['ram_gib']:.0f} GiB)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("layer width W (W x W hidden layer)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_title(f"Peak memory at {meta['sweep_nnz']} nonzeros per W x W layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ram_gib() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--widths", type=int, nargs="*", default=[16384, 32768], help="training runs' hidden widths")
    p.add_argument("--density", type=float, default=0.005, help="density of the W x W layers")
    p.add_argument("--edge-density", type=float, default=0.05, help="density of the input and output layers")
    p.add_argument("--hidden-layers", type=int, default=1, help="W x W layers")
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.001,
                   help="SGD learning rate (momentum 0.9); 0.01 and above diverge at widths >= 16384")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sweep-widths", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--sweep-nnz", type=int, default=1 << 21, help="nnz per W x W layer in the sweep")
    p.add_argument("--dense-limit-gib", type=float, default=4.0,
                   help="measure masked-dense only while its estimated state is below this")
    p.add_argument("--compare-limit-gib", type=float, default=3.0,
                   help="time the dense growth path only while one dense gradient is below this")
    p.add_argument("--out", type=Path, help="write scale_cpu.{json,md,png} into this directory")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(json.loads(a.one))))
        return
    from _bench_common import machine_meta
    meta = {**machine_meta(a.threads, 1), "ram_gib": ram_gib(), "sweep_nnz": a.sweep_nnz}
    base = dict(d_in=a.d_in, classes=a.classes, batch=a.batch, lr=a.lr, threads=a.threads, seed=0,
                edge_density=a.edge_density)
    train = []
    for w in a.widths:
        cfg = dict(base, impl="sparsekern", width=w, hidden_layers=a.hidden_layers, density=a.density,
                   steps=a.steps, update_every=a.update_every,
                   compare_dense=w * w * 4 < a.compare_limit_gib * 2**30)
        r = in_subprocess(cfg)
        print(json.dumps(r), flush=True)
        train.append(r)
    sweep = []
    for w in a.sweep_widths:
        d = min(1.0, a.sweep_nnz / (w * w))
        for impl in ("sparsekern", "masked"):
            cfg = dict(base, impl=impl, width=w, hidden_layers=1, density=d, steps=4, update_every=2)
            if impl == "masked" and dense_state_bytes(build_sizes(cfg)) * 1.7 > a.dense_limit_gib * 2**30:
                continue
            r = in_subprocess(cfg)
            print(json.dumps({k: r.get(k) for k in ("impl", "width", "density", "peak_rss_bytes", "error")}),
                  flush=True)
            sweep.append(r)
    md = markdown(meta, train, sweep)
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "scale_cpu.json").write_text(json.dumps({"meta": meta, "train": train, "sweep": sweep}, indent=1))
        (a.out / "scale_cpu.md").write_text(md)
        if sweep:
            plot(sweep, meta, a.out / "scale_cpu.png")
        print(f"wrote {a.out}/scale_cpu.json, .md and .png")


def build_sizes(cfg):
    return [cfg["d_in"]] + [cfg["width"]] * (cfg["hidden_layers"] + 1) + [cfg["classes"]]


if __name__ == "__main__":
    main()
