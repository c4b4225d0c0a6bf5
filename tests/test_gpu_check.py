"""scripts/gpu_check.sh (the one command a lent GPU runs) and its sanitizer driver, checked on CPU:
the script parses, its dry run lists every step with commands that name existing files, its
runner goes on past failures, skips what the budget cannot fit and exits non-zero, and the
driver runs every Triton case under the interpreter."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekern.gpu import INTERPRET, route

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["env", "build", "tests-gpu", "tests-cpp", "memcheck-triton", "memcheck-cuda", "racecheck-triton",
         "racecheck-cuda", "bench", "compile"]


def run_check(*args, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_script_parses():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_dry_run_lists_every_step_and_writes_nothing(tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = sorted(results.rglob("*"))
    out = run_check("--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"{len(STEPS)} steps: {' '.join(STEPS)}"
    for s in STEPS:
        assert re.search(rf"^\[{re.escape(s)}\] timeout \d+s$", out.stdout, re.M), s
    assert sorted(results.rglob("*")) == before
    # every file a step runs exists (a renamed test file must not turn a step into a no-op)
    named = set(re.findall(r"\b((?:tests|scripts|benchmarks)/[\w/]+\.(?:py|sh))", out.stdout))
    assert {"tests/test_triton.py", "tests/test_triton_dst.py", "tests/test_cuda_route.py",
            "tests/test_cuda_compile.py", "scripts/gpu_sanitize_cases.py", "benchmarks/bench_gpu.py"} <= named
    assert [p for p in named if not (ROOT / p).is_file()] == []
    assert "--tool memcheck" in out.stdout and "--tool racecheck" in out.stdout
    assert "pip install --no-build-isolation" in out.stdout


def test_runner_goes_on_past_failures_and_exits_nonzero(tmp_path):
    out = run_check("--only", "env,tests-gpu", "--out", str(tmp_path), PYTHON="false")   # every step fails
    assert out.returncode == 1
    table = out.stdout.strip().splitlines()[-3:]                 # the summary table comes last
    assert table[0].split() == ["step", "status", "seconds"]
    assert [line.split()[:2] for line in table[1:]] == [["env", "FAIL(1)"], ["tests-gpu", "FAIL(1)"]]
    assert (tmp_path / "env.log").is_file() and (tmp_path / "tests-gpu.log").is_file()
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests-gpu | FAIL(1) |" in summary and "NOT verified" in summary


def test_budget_spent_skips_and_fails(tmp_path):
    out = run_check("--budget", "0", "--only", "bench", "--out", str(tmp_path))
    assert out.returncode == 1 and out.stdout.strip().splitlines()[-1].split()[:2] == ["bench", "SKIPPED"]
    assert run_check("--only", "nope").returncode == 2


# --------------------------------------------------------------- sanitizer driver
_spec = importlib.util.spec_from_file_location("gpu_sanitize_cases", ROOT / "scripts" / "gpu_sanitize_cases.py")
cases = importlib.util.module_from_spec(_spec)
sys.modules["gpu_sanitize_cases"] = cases
_spec.loader.exec_module(cases)


def test_driver_lists_both_backends(capsys, monkeypatch):
    monkeypatch.setenv(route.ENV, "auto")                        # main sets it for its backend
    assert cases.main(["--list", "--backend", "triton"]) == 0
    groups = capsys.readouterr().out.split("\n")
    assert {"csr bf16", "bsr64 fp32", "triton-only variants fp32", "conv bf16"} <= set(groups)
    assert cases.main(["--list", "--backend", "cuda", "--dtypes", "fp16"]) == 0
    assert "csr fp16 wide (32-bit column indices)" in capsys.readouterr().out


@pytest.mark.skipif(not INTERPRET, reason="on a GPU, gpu_check.sh runs the driver under compute-sanitizer")
def test_driver_runs_every_triton_case_under_the_interpreter(capsys, monkeypatch):
    monkeypatch.setenv(route.ENV, "auto")
    assert cases.main(["--backend", "triton", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and re.search(r"^(\d+) passed, 0 failed \(triton", out, re.M)
    ran = int(re.search(r"^(\d+) passed", out, re.M).group(1))
    assert ran == 4 * 3 + 3 + 6                                  # 4 layouts x 3 ops, 3 atomics variants, 6 conv


@pytest.mark.skipif(route.cpp_ops() is not None, reason="the C++ kernels are built here")
def test_driver_refuses_to_pass_on_nothing(capsys, monkeypatch):
    monkeypatch.setenv(route.ENV, "auto")
    assert cases.main(["--backend", "cuda"]) == 3
    assert "not built" in capsys.readouterr().out


def test_the_verification_line_it_prints_names_the_route_constant(tmp_path):
    """The summary tells the next session what to set: the name must be route's record."""
    assert "CUDA_CPP_VERIFIED_BY = " in SCRIPT.read_text() and route.CUDA_CPP_VERIFIED_BY is None
    summary = run_check("--only", "env", "--out", str(tmp_path), PYTHON="false").stdout
    assert "NOT verified" in summary                     # the C++ steps did not run: nothing to record
