"""The CUDA sources (csrc/cuda) compile on any machine with a CUDA toolkit.

Two halves, as setup.py builds them:

* the kernels (``*.cu`` with the ``*.cuh`` they include): device code and CUDA's own
  headers only, no torch header. CI compiles every template instance to SASS for sm_90
  with the device optimisers off (``-Xcicc -O0 -Xptxas -O0``: front end, code generation
  and ptxas, ~10 s); optimised, cicc alone takes ~3 min on 2 cores, so that build runs with
  ``SPARSEKERN_CUDA_TEST_OPTIMIZED=1`` (and in every real build: setup.py, scripts/gpu_check.sh).
  ``SPARSEKERN_CUDA_TEST_ARCHS="80 90"`` compiles every arch setup.py's default
  TORCH_CUDA_ARCH_LIST builds;
* the launcher (``sparse_cuda.cpp``, ``module.cpp``): host C++ on ATen and c10/cuda,
  checked here by ``g++ -fsyntax-only`` against the installed torch's headers and the
  toolkit's (tests/test_newest_torch_headers.py does the same against the newest torch).
  The CPU wheel ships the c10/cuda headers except one CMake-generated file, which the
  test writes into a scratch include directory.

No GPU and no CUDA build of torch are needed. This is the CI step that keeps a syntax
or template error in csrc/cuda from landing unnoticed (setup.py builds these files only
where a CUDA torch and nvcc both exist).
"""
import os
import subprocess

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from cuda_toolkit import HOME, KERNELS, LAUNCHERS, NVCC, ROOT, launcher_flags


needs_toolkit = pytest.mark.skipif(HOME is None or NVCC is None, reason="no CUDA toolkit (nvcc + headers) here")


def test_there_are_cuda_sources():
    assert KERNELS and LAUNCHERS, "csrc/cuda has no .cu or .cpp files"
    assert (ROOT / "csrc" / "cuda" / "config.cuh").is_file()


def test_the_kernels_include_no_torch_header():
    """nvcc must never parse ATen: that is what keeps the kernel build fast and torch-version free."""
    for src in KERNELS + sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + [ROOT / "csrc" / "cuda" / "launch.h"]:
        for line in src.read_text().splitlines():
            if line.startswith("#include"):
                assert not any(t in line for t in ("ATen", "c10/", "torch/")), f"{src.name}: {line}"


@needs_toolkit
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_cuda_kernels_compile(source, tmp_path):
    archs = os.environ.get("SPARSEKERN_CUDA_TEST_ARCHS", "90").split()
    optimized = os.environ.get("SPARSEKERN_CUDA_TEST_OPTIMIZED") == "1"
    cmd = [NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), "-O3", "--threads", "2",
           "-Xcompiler", "-fPIC", *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs),
           *([] if optimized else ["-Xcicc", "-O0", "-Xptxas", "-O0"])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-6000:]
    assert not [line for line in out.stderr.splitlines() if "warning" in line.lower()], out.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


@needs_toolkit
@pytest.mark.parametrize("source", LAUNCHERS, ids=lambda p: p.name)
def test_cuda_launchers_compile_against_the_installed_torch(source, tmp_path):
    std = "c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13) else "c++17"
    cmd = launcher_flags(include_paths(), tmp_path, std) + [str(source)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
    ours = [line for line in out.stderr.splitlines() if "csrc/cuda" in line and "warning" in line.lower()]
    assert not ours, "\n".join(ours)
