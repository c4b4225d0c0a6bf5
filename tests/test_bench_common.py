"""The benchmarks' shared helpers: the register-only FMA peak, the FLOP and GFLOP/s arithmetic,
median_ms's two modes and the per-CPU results directory."""
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _bench_common as bc  # noqa: E402
import _fma_peak  # noqa: E402

import sparsekern as sk  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh kernel cache, so the build path runs."""
    monkeypatch.setenv("SPARSEKERN_BENCH_CACHE", str(tmp_path))
    return tmp_path


def test_fma_peak_is_positive_or_none_with_reason(cache):
    r = _fma_peak.measure.__wrapped__(1, 0.05)
    assert r["threads"] == 1 and r["seconds"] == 0.05
    if shutil.which("gcc") is None:
        assert r["gflops"] is None and "gcc" in r["error"]
        return
    assert isinstance(r["gflops"], float) and r["gflops"] > 0, r
    assert r["lanes"] in (4, 8, 16) and 10 <= r["accumulators"] <= 16
    assert Path(r["library"]).parent == cache and Path(r["library"]).exists()


def test_fma_peak_without_gcc_is_none_not_an_error(cache, monkeypatch):
    monkeypatch.setattr(_fma_peak.shutil, "which", lambda name: None)
    r = _fma_peak.measure.__wrapped__(1, 0.05)
    assert r["gflops"] is None and "gcc not found" in r["error"]


def test_fma_peak_build_failure_is_named(cache):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` to stand in for a broken compiler")
    with pytest.raises(RuntimeError, match="gcc failed"):
        _fma_peak.build(false)


def test_fma_peak_rejects_bad_settings():
    with pytest.raises(ValueError, match="threads"):
        _fma_peak.measure(0)
    with pytest.raises(ValueError, match="seconds"):
        _fma_peak.measure(1, 0.0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("objdump")
                    or not shutil.which("gcc"), reason="needs gcc and objdump on x86-64")
def test_fma_peak_loop_is_register_only_fma(cache):
    """The hot loop of fma_peak_kernel: `accumulators` vfmadd on registers, no memory operand."""
    r = _fma_peak.measure.__wrapped__(1, 0.05)
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", r["library"]], capture_output=True,
                         text=True, check=True).stdout
    body = asm.split("<fma_peak_kernel>:", 1)[1].split("\n\n", 1)[0]
    fmas = [line for line in body.splitlines() if "vfmadd" in line and "ps" in line]
    assert len(fmas) >= r["accumulators"], body
    assert not [line for line in fmas if "(" in line], "an FMA reads memory"
    regs = {line.rsplit(",", 1)[-1].strip() for line in fmas}
    assert len(regs) >= r["accumulators"]            # independent accumulators


def test_gflops_arithmetic():
    assert bc.gflops(2e9, 1000.0) == pytest.approx(2.0)
    assert bc.gflops(3e6, 1.0) == pytest.approx(3.0)
    assert bc.gflops(1e9, None) is None
    with pytest.raises(ValueError):
        bc.gflops(1e9, 0.0)
    with pytest.raises(ValueError):
        bc.gflops(-1, 1.0)


def test_op_flops_linear_and_conv():
    lin = sk.SparseLinear(64, 32, density=0.25)
    f = bc.op_flops(lin, torch.randn(8, 64))
    assert f == {"useful": 2 * 8 * lin.nnz, "dense": 2 * 8 * 64 * 32}
    conv = sk.SparseConv2d(4, 8, 3, padding=1, bias=False, density=0.25)
    f = bc.op_flops(conv, torch.randn(2, 4, 5, 5))
    assert f == {"useful": 2 * 2 * 25 * conv.nnz, "dense": 2 * 2 * 25 * 8 * 4 * 9}
    strided = sk.SparseConv2d(4, 8, 3, stride=2, bias=False, density=0.25)      # 7x7 -> 3x3
    assert bc.op_flops(strided, torch.randn(1, 4, 7, 7))["dense"] == 2 * 9 * 8 * 4 * 9


def test_throughput_on_known_numbers():
    dense = {"fwd": 10.0, "dx": 10.0, "dw": 20.0, "fwd+bwd": 40.0}
    sparse = {"fwd": 2.0, "dx": 4.0, "dw": None, "fwd+bwd": 8.0}
    t = bc.throughput(dense, sparse, {"useful": 1e9, "dense": 1e10}, 0.1, 1000.0)
    assert t["fwd"]["dense_gflops"] == pytest.approx(1000.0)
    assert t["fwd"]["sparse_eff_gflops"] == pytest.approx(500.0)
    assert t["fwd"]["frac_of_dense_rate"] == pytest.approx(0.5)
    assert t["fwd"]["frac_of_fma_peak"] == pytest.approx(0.5)
    assert t["fwd"]["dense_frac_of_fma_peak"] == pytest.approx(1.0)
    assert t["fwd"]["frac_of_ideal"] == pytest.approx(5.0 * 0.1)
    assert t["fwd+bwd"]["dense_gflops"] == pytest.approx(3e10 / 40e6)
    assert t["fwd+bwd"]["sparse_eff_gflops"] == pytest.approx(3e9 / 8e6)
    assert t["dw"]["sparse_eff_gflops"] is None and t["dw"]["frac_of_ideal"] is None
    assert bc.throughput(dense, sparse, {"useful": 1e9, "dense": 1e10}, 0.1, None)["fwd"]["frac_of_fma_peak"] is None
    with pytest.raises(ValueError, match="density"):
        bc.throughput(dense, sparse, {"useful": 1, "dense": 1}, 0.0, None)


def test_throughput_table_columns():
    t = bc.throughput({"fwd": 10.0, "fwd+bwd": 30.0}, {"fwd": 2.0, "fwd+bwd": 6.0},
                      {"useful": 1e9, "dense": 1e10}, 0.1, 2000.0)
    lines = bc.throughput_table([{"throughput": t}], ["case"], lambda r: ["c"])
    for col in ("fwd dense GFLOP/s", "fwd sparse eff. GFLOP/s", "fwd % of dense rate", "fwd % of FMA peak",
                "fwd+bwd dense GFLOP/s", "fwd+bwd fraction of ideal"):
        assert col in lines[0]
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "| c | 1000.0 | 500.0 | 50.0% | 25.0% |" in lines[2]


def test_median_ms_exact_mode_runs_exactly_reps():
    calls = []
    assert bc.median_ms(lambda: calls.append(1), 4, warmup=0, budget_s=None) >= 0
    assert len(calls) == 4
    calls.clear()
    bc.median_ms(lambda: calls.append(1), 4, warmup=2, budget_s=None)
    assert len(calls) == 6


def test_median_ms_budget_mode_unchanged():
    calls = []
    bc.median_ms(lambda: calls.append(1), 5)                  # 2 untimed (the first sizes), 5 timed
    assert len(calls) == 7
    calls.clear()
    bc.median_ms(lambda: calls.append(1), 5, warmup=0)        # the sizing run is always there
    assert len(calls) == 6
    with pytest.raises(ValueError, match="reps"):
        bc.median_ms(lambda: None, 0)
    with pytest.raises(ValueError, match="budget_s"):
        bc.median_ms(lambda: None, 3, budget_s=0)


def test_median_ms_each_records_errors():
    def boom():
        raise RuntimeError("no kernel for this\nsecond line")
    out = bc.median_ms_each({"ok": lambda: None, "bad": boom}, 3)
    assert out["ok"] >= 0 and out["bad"] is None and out["bad_error"] == "no kernel for this"


def test_default_out_is_per_cpu():
    assert bc.results_dir() == bc.RESULTS_ROOT / bc.cpu_slug()
    assert bc.base_parser("d", "q", [0.1]).parse_args([]).out == bc.results_dir()
    assert bc.base_parser("d", "q", [0.1]).parse_args(["--out", "x"]).out == Path("x")


def test_machine_meta_records_the_peak(monkeypatch):
    monkeypatch.setattr(bc._fma_peak, "measure", lambda threads: {"gflops": 12.5, "threads": threads})
    meta = bc.machine_meta(3, 5)
    assert meta["fma_peak"] == {"gflops": 12.5, "threads": 3}
    full = {"gflops": 12.5, "threads": 3, "isa": "avx2-fma", "accumulators": 12}
    assert "12.5 GFLOP/s" in bc.peak_line({"fma_peak": full}) and "3 threads" in bc.peak_line({"fma_peak": full})
    assert "not measured (gcc not found)" in bc.peak_line({"fma_peak": {"gflops": None, "error": "gcc not found"}})
