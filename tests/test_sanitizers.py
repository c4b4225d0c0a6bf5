"""The CPU kernels under AddressSanitizer + UBSan (scripts/asan.sh --quick).

Builds a sanitized copy of the extension and runs the kernel-safety and
bad-input tests against it: any out-of-bounds access, use after free or
undefined behaviour in a kernel or launcher aborts that run. It takes a few
minutes, so it runs in CI (CI=true) or when SPARSEKERN_ASAN=1; the full matrix
is ``bash scripts/asan.sh``.
"""
import pytest

from conftest import heavy_check_wanted, run_repo_script


@pytest.mark.skipif(not heavy_check_wanted("SPARSEKERN_ASAN"),
                    reason="sanitizer subset runs in CI or with SPARSEKERN_ASAN=1")
def test_kernel_tests_pass_under_address_and_undefined_sanitizers():
    run_repo_script("scripts/asan.sh", "--quick", timeout=1200, must_print=["asan: no sanitizer report"])
