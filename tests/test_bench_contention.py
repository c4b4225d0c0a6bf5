"""The contention benchmark's machinery: competitors start and stop, rounds alternate quiet
and loaded, and the table reports each side's slowdown and their ratio."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_contention_cpu as bc  # noqa: E402


@pytest.mark.parametrize("neighbour", ["spin", "gemm"])
def test_competitors_run_inside_the_block_only(neighbour):
    with bc.Competitors(2, neighbour) as c:
        assert len(c.procs) == 2 and all(p.poll() is None for p in c.procs)
    assert all(p.poll() is not None for p in c.procs)


def test_an_unknown_neighbour_is_named():
    with pytest.raises(ValueError, match="neighbour must be one of"):
        bc.Competitors(1, "browser")


def test_measure_alternates_and_reports_both_slowdowns():
    calls = []
    r = bc.measure(lambda: calls.append("d"), lambda: calls.append("s"), rounds=2, reps=3, competitors=1)
    # 2 warm-up calls each, then per round and load: 3 dense then 3 sparse
    assert calls == ["d", "d", "s", "s"] + (["d"] * 3 + ["s"] * 3) * 4
    for k in ("dense_quiet_ms", "dense_loaded_ms", "sparse_quiet_ms", "sparse_loaded_ms"):
        assert r[k] >= 0
    assert r["relative_slowdown"] == r["sparse_slowdown"] / r["dense_slowdown"]
    meta = {"cpu": "x", "cpu_vendor": "v", "cpu_family_model": "1/2", "kernels": "k", "threads": 2, "cores": 2,
            "torch": "t", "competitors": 1, "omp_wait_policy": "(unset)", "date": "d", "rounds": 2, "reps": 3}
    md = bc.table(meta, [{"case": "c", "neighbour": "gemm", **r}])
    assert "| c | gemm |" in md and ("met" in md or "MISSED" in md)
