"""The GPU benchmark is one command: its plan and target table run anywhere;
without a GPU it measures nothing and says so (exit 2)."""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "bench_gpu", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py")
bench_gpu = importlib.util.module_from_spec(_spec)
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
