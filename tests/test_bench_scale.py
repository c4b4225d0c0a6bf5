"""The scale benchmark's plumbing on a tiny configuration (in process): both contenders train, the
tiled growth picks what the dense path picks, and the report and plot are written."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_scale_cpu  # noqa: E402


def test_tiny_runs_report_and_plot(tmp_path):
    torch.set_num_threads(1)
    base = dict(d_in=32, classes=4, batch=8, lr=0.05, threads=1, seed=0, edge_density=0.5, hidden_layers=1,
                steps=4, update_every=2)
    train = [bench_scale_cpu.run_one(dict(base, impl="sparsekern", width=64, density=0.1, compare_dense=True))]
    r = train[0]
    assert r["updates"] == 1 and r["growth_vs_dense"]["same_positions"]
    assert r["dense_state_bytes"] == 12 * (32 * 64 + 64 + 64 * 64 + 64 + 64 * 4 + 4)
    assert 0 < r["itop_rate"] <= 1 and r["itop_set_bytes"] >= 8 * r["nnz_total"]
    sweep = [bench_scale_cpu.run_one(dict(base, impl=impl, width=w, density=256 / (w * w)))
             for w in (32, 64) for impl in ("sparsekern", "masked")]
    sweep.append(bench_scale_cpu.run_one(dict(base, impl="sparsekern", width=128, density=256 / 128 ** 2)))
    meta = {"cpu": "test", "threads": 1, "date": "now", "ram_gib": 1.0, "sweep_nnz": 256}
    md = bench_scale_cpu.markdown(meta, train, sweep)
    assert "| 128 |" in md and "extrapolated" in md
    bench_scale_cpu.plot(sweep, meta, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
