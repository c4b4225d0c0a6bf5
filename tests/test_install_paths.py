"""Install paths (scripts/check_installs.sh --quick) in fresh virtual environments.

CI (CI=true, or SPARSEKERN_INSTALL_CHECKS=1) runs the bounded subset: editable with the
newest pip, an isolated build that must refuse with its message, and sdist + wheel into a
fresh environment (the wheel holds the kernel modules setup.py builds). Editable with
pip 23.2 + wheel and the non-editable install with the console script run from another
directory each recompile everything (~5 min apiece on 2 cores), so they run with
SPARSEKERN_INSTALL_CHECKS=all here, and in the full script,
``bash scripts/check_installs.sh``, which also builds the wheel from the unpacked sdist
with every CPU kernel variant."""
import os

import pytest

from conftest import heavy_check_wanted, run_repo_script


@pytest.mark.skipif(not heavy_check_wanted("SPARSEKERN_INSTALL_CHECKS"),
                    reason="install paths run in CI or with SPARSEKERN_INSTALL_CHECKS=1 (=all: every path)")
def test_install_paths(monkeypatch):
    every = os.environ.get("SPARSEKERN_INSTALL_CHECKS") == "all"
    paths = ("editable-old-pip", "editable-new-pip", "isolated", "non-editable", "wheel+sdist") if every \
        else ("editable-new-pip", "isolated", "wheel+sdist")
    monkeypatch.setenv("SPARSEKERN_INSTALL_PATHS", " ".join(paths))
    run_repo_script("scripts/check_installs.sh", "--quick", timeout=1500,
                    must_print=[f"PASS {p}" for p in paths])
