"""The CPU kernels under AddressSanitizer + UBSan (scripts/asan.sh --quick).

Builds a sanitized copy of the extension and runs the kernel-safety and
bad-input tests against it: any out-of-bounds access, use after free or
undefined behaviour in a kernel or launcher aborts that run. It takes a few
minutes, so it runs in CI (CI=true) or when SPARSEKERN_ASAN=1; the full matrix
is ``bash scripts/asan.sh``.
"""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WANTED = os.environ.get("CI") == "true" or os.environ.get("SPARSEKERN_ASAN") == "1"


@pytest.mark.skipif(not WANTED, reason="sanitizer subset runs in CI or with SPARSEKERN_ASAN=1")
def test_kernel_tests_pass_under_address_and_undefined_sanitizers():
    r = subprocess.run(["bash", "scripts/asan.sh", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200)
    out = r.stdout[-6000:] + r.stderr[-6000:]
    assert r.returncode == 0, out
    assert "asan: no sanitizer report" in r.stdout, out
