"""The GPU benchmark is one command: its plan and target table run anywhere; without a GPU it
measures nothing and says so (exit 2), and ``--interpret`` runs all of its code on CPU tensors."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern.gpu import INTERPRET, tuning

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
_spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
bench_gpu = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = bench_gpu          # its dataclasses look their module up
_spec.loader.exec_module(bench_gpu)


def test_dry_run_lists_every_case_and_the_targets(capsys):
    assert bench_gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    n = len(bench_gpu.SHAPES) * len(bench_gpu.LAYOUTS) * len(bench_gpu.DENSITIES)
    assert f"{n} cases x 4 kernels" in out
    assert "bf16 BSR64 at 90% sparsity, fwd >= 7.0x" in out and "bf16 CSR (Triton) at 98% sparsity, fwd >= 4.0x" in out
    assert "fp32 CSR (CUDA C++) at 90% sparsity, fwd >= 3.0x" in out and "conv 3x3 256->256" in out
    assert "skinny N=16 out=4096 in=4096 M=16 bsr64 density=0.02" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark measures instead")
def test_without_a_gpu_it_refuses_to_report(capsys):
    assert bench_gpu.main(["--quick"]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_targets_are_read_from_the_matching_rows():
    row = {"dtype": "bf16", "shape": "4096x4096", "layout": "bsr", "block": 64, "density": 0.1,
           "speedup": {"sparsekern": {"fwd": 7.5, "dx": 4.0, "dw": 6.0, "fwd+bwd": 5.0}}}
    other = dict(row, dtype="fp16", speedup={"sparsekern": {"fwd": 99.0, "dx": 99.0, "dw": 99.0}})
    got = {name: (measured, met) for name, _, measured, met in bench_gpu.evaluate_targets([other, row])}
    assert got["bf16 BSR64 at 90% sparsity, fwd"] == (7.5, True)
    assert got["bf16 BSR64 at 90% sparsity, dx"] == (4.0, False)
    assert got["bf16 CSR (Triton) at 98% sparsity, fwd"] == (None, False)
    conv = bench_gpu.evaluate_targets([], {"speedup_fwd_bwd": 2.5})[-1]
    assert conv[2:] == (2.5, True)


# ------------------------------------------------ the GPU code on CPU tensors (interpreter)
def test_interpret_quick_runs_every_gpu_function(tmp_path):
    """`bench_gpu.py --interpret --quick` as a command (it sets TRITON_INTERPRET itself): every case,
    the rebuild and the conv run through the GPU code paths and land in the results, with no error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCH), "--interpret", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_interpret.json").read_text())
    assert res["errors"] == [] and res["meta"]["gpu"] == "interpret"
    layouts = [(r["layout"], r["block"]) for r in res["results"]]
    assert layouts == list(bench_gpu.LAYOUTS)
    for r in res["results"]:
        assert all(r["ms"]["sparsekern"][k] > 0 for k in bench_gpu.KINDS)
        assert ("sparsekern-triton" in r["ms"]) == (r["layout"] == "csr")      # the forced-backend column
        assert set(r["ms"]) >= {"dense", "cusparse"}
    assert [(r["layout"], r["block"]) for r in res["rebuild"]] == [(c[0], c[1]) for c in bench_gpu.REBUILD_CASES]
    assert res["conv"]["sparsekern_ms"]["fwd+bwd"] > 0
    assert "its times measure nothing" in (tmp_path / "gpu_interpret.md").read_text()


def test_interpret_writes_nothing_unless_asked(monkeypatch, tmp_path):
    written = []
    monkeypatch.setattr(bench_gpu, "measure_case", lambda *a: ({}, {}, {}))
    monkeypatch.setattr(bench_gpu, "evaluate_targets", lambda rows, conv=None: [])
    monkeypatch.setattr(bench_gpu, "markdown", lambda *a: "md\n")
    monkeypatch.setattr(Path, "write_text", lambda self, text: written.append(self))
    args = type("A", (), {"tune": False, "dtypes": ["fp32"], "out": None})()
    cases = list(bench_gpu.plan(type("P", (), {"quick": True, "densities": None, "dtypes": ["fp32"]})(),
                                bench_gpu.INTERPRET_SIZES))
    assert bench_gpu.run(args, bench_gpu.INTERPRETER, cases) == 0 and written == []
    args.out = tmp_path
    assert bench_gpu.run(args, bench_gpu.INTERPRETER, cases) == 0
    assert sorted(p.name for p in written) == ["gpu_interpret.json", "gpu_interpret.md"]


def test_a_crashing_case_is_recorded_and_fails_the_run(monkeypatch, tmp_path):
    def boom(mode, out_f, *rest):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench_gpu, "measure_case", boom)
    args = type("A", (), {"tune": False, "dtypes": ["fp32"], "out": tmp_path})()
    cases = [("fp32", "tiny", 128, 256, 16, "bsr", 16, 0.1)]
    assert bench_gpu.run(args, bench_gpu.INTERPRETER, cases) == 1
    res = json.loads((tmp_path / "gpu_interpret.json").read_text())
    assert res["errors"][0]["what"] == "fp32 tiny bsr16 density=0.1"
    assert "kernel exploded" in res["errors"][0]["traceback"]


@pytest.mark.skipif(not INTERPRET, reason="runs the sweep on CPU tensors (interpreter)")
def test_tune_sweeps_and_prints_rows_that_lookup_reads(monkeypatch, capsys, on_gpu_path):
    lines = bench_gpu.tune(bench_gpu.INTERPRETER, torch.bfloat16, 0)
    assert len(lines) == 2 * len(bench_gpu.TUNE_CASES) and capsys.readouterr().out.splitlines() == lines
    table = {}
    for line in lines:
        exec(line, {"TABLE": table, "LaunchConfig": tuning.LaunchConfig})     # pasted into tuning.py
    monkeypatch.setattr(tuning, "TABLE", table)
    for layout, b, d in bench_gpu.TUNE_CASES:
        for op in ("spmm", "sddmm"):
            key = (op, b, tuning.density_bucket(d), "bf16")
            assert key in table and tuning.lookup(op, b, d, torch.bfloat16) == table[key]
            assert table[key] in tuning.candidates(b)[:bench_gpu.INTERPRET_SIZES.candidates]


def test_sweep_skips_what_cannot_run_and_keeps_the_fastest():
    a, b, c = (tuning.LaunchConfig(block_m=m) for m in (16, 32, 64))
    times = {a: 3.0, c: 1.0}

    def time_ms(cfg):
        if cfg not in times:
            raise RuntimeError("out of shared memory")
        return times[cfg]

    best, skipped = tuning.sweep(time_ms, [a, b, c])
    assert best == (c, 1.0) and skipped == [(b, "RuntimeError: out of shared memory")]
    none, skipped = tuning.sweep(time_ms, [b])
    assert none is None and tuning.table_row("spmm", 1, 0.02, torch.float16, none).startswith("# TABLE[")
    assert tuning.table_row("spmm", 1, 0.02, torch.float16, best) == \
        f"TABLE[('spmm', 1, 0.02, 'f16')] = {c!r}  # 1.000 ms"
