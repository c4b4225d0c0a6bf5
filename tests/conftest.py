import contextlib
import os
import zlib

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors under Triton's interpreter
# (tests/test_triton.py). It must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparsekern as sk
# Test layers and topologies come from one builder, shared with the GPU tests and benchmark.
from sparsekern.ops.backends import ENV, GPU_BACKENDS
from sparsekern.testing import make_conv, make_linear, make_topology  # noqa: F401

# Tolerances against a float64 masked-dense reference, one row per dtype.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.fixture(autouse=True)
def _deterministic_seed(request):
    """Every test starts from its own fixed seed: a CRC of its node id (stable across
    processes, unlike hash() of a string), so inputs are fresh per case yet reproducible."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def stable_seed(*parts) -> int:
    """A seed from any printable parts, the same in every process."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


@contextlib.contextmanager
def num_threads(n: int):
    """Run the block with ``n`` intra-op threads (the kernels' OpenMP team), then restore."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(prev)


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads{n}")
def threads(request):
    """Thread matrix: the test body runs at 1 and at 2 threads (races show only at >= 2)."""
    with num_threads(request.param):
        yield request.param


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads3(request):
    """1, 2 and 3 threads: where the work split by images or planes differs at 3."""
    with num_threads(request.param):
        yield request.param


def assert_gpu_path(backend: str) -> None:
    """The GPU kernels run: Triton, or the C++ kernels in gpu_check.sh's SPARSEKERN_GPU_BACKEND=cuda pass."""
    assert backend in GPU_BACKENDS, backend
    if os.environ.get(ENV) == "cuda":
        assert backend == "cuda_cpp", backend


@pytest.fixture
def on_gpu_path():
    """The test body runs on the GPU path: on a GPU as it is; without one inside
    ``cuda_path_on_cpu``, where CPU tensors count as CUDA ones and the ops run their CUDA
    implementations (router, Triton launchers, GPU conv) under the Triton interpreter."""
    from sparsekern.gpu import INTERPRET
    from sparsekern.gpu.interpret import gpu_path
    with gpu_path("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"):
        yield


@pytest.fixture
def ext_required():
    assert sk.extension_available(), "the compiled extension must be built for the test suite"


def heavy_check_wanted(flag: str) -> bool:
    """Whether a minutes-long script check runs: in CI (``CI=true``) or with ``flag=1``."""
    return os.environ.get("CI") == "true" or os.environ.get(flag) in ("1", "all")


def run_repo_script(*args: str, timeout: int, must_print=()) -> str:
    """Run ``bash <args>`` from the repository root; it must exit 0 and print each line of
    ``must_print``. Returns its output, whose tail is the assertion message otherwise."""
    import subprocess
    from pathlib import Path
    r = subprocess.run(["bash", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=timeout)
    out = r.stdout[-8000:] + r.stderr[-4000:]
    assert r.returncode == 0, out
    for line in must_print:
        assert line in r.stdout, f"{line!r} not printed:\n{out}"
    return r.stdout
