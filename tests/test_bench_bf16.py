"""benchmarks/bench_bf16_cpu.py on tiny cases: every contender runs, the table has its columns, a
slow dense bf16 call is timed once and says so, and the bf16 kernels' forward error is the dense
bf16 error's size (both against float64 on the same rounded operands)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_bf16_cpu as bench  # noqa: E402

import sparsekern as sk  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return bench.run([(64, 48, 40)], [0.25], reps=1, threads=1, slow_s=60.0)


def test_every_contender_runs_and_the_table_has_its_columns(rows, ext_required):
    assert [r["layout"] for r in rows] == ["csr", "bsr16"]
    for r in rows:
        for key in ("dense_bf16_ms", "sparse_bf16_ms", "dense_fp32_ms", "sparse_fp32_ms"):
            assert set(r[key]) == set(bench.OPS) and all(v > 0 for v in r[key].values()), key
        assert r["autocast_dense_ms"] > 0 and r["autocast_sparse_ms"] > 0
        assert (r["bf16_dot_ms"] is None) == (not sk.cpu_bf16_dot_supported())
        e = r["forward_error"]
        assert 0 < e["sparse_bf16"] < 2e-2 and e["sparse_bf16"] <= 2 * e["dense_bf16"] + 1e-3
    meta = {"cpu": "cpu", "cpu_vendor": "v", "cpu_family_model": "1/2", "cpu_isa": "avx2", "threads": 1,
            "torch": "t", "date": "d", "reps": 1, "bf16_dot": False, "fma_peak": {"gflops": None, "error": "x"}}
    md = bench.markdown(rows, meta)
    head = md.splitlines()[2]
    for col in ("fwd vs dense bf16", "autocast fwd+bwd vs nn.Linear", "vdpbf16ps vs widening",
                "fwd error: dense bf16 / sparse bf16"):
        assert col in head
    assert len(md.splitlines()[4].split("|")) == len(head.split("|"))


def test_a_slow_dense_call_is_timed_once(ext_required):
    calls = []
    ms, runs = bench.slow_or_median(lambda: calls.append(1), reps=5, slow_s=0.0)
    assert runs == 1 and len(calls) == 1 and ms >= 0
    ms, runs = bench.slow_or_median(lambda: calls.append(1), reps=5, slow_s=60.0)
    assert runs == 5 and len(calls) == 1 + 1 + 1 + 5  # first call, warm-up, 5 timed


def test_the_dot_switch_is_restored(monkeypatch):
    monkeypatch.setenv(bench.DOT_ENV, "1")
    with bench.bf16_dot("0"):
        assert bench.os.environ[bench.DOT_ENV] == "0"
    assert bench.os.environ[bench.DOT_ENV] == "1"
    monkeypatch.delenv(bench.DOT_ENV)
    with bench.bf16_dot("0"):
        pass
    assert bench.DOT_ENV not in bench.os.environ
