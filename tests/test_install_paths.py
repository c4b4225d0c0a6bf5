"""Every install path (scripts/check_installs.sh --quick) in fresh virtual environments:
editable with pip 23.2 + wheel and with the newest pip, an isolated build that must
refuse with its message, non-editable with the console script run from elsewhere, and
sdist + wheel into a fresh environment. Several minutes, so it runs in CI (CI=true) or
with SPARSEKERN_INSTALL_CHECKS=1; the full version builds the wheel from the unpacked
sdist with every CPU kernel variant: ``bash scripts/check_installs.sh``."""
import pytest

from conftest import heavy_check_wanted, run_repo_script


@pytest.mark.skipif(not heavy_check_wanted("SPARSEKERN_INSTALL_CHECKS"),
                    reason="install paths run in CI or with SPARSEKERN_INSTALL_CHECKS=1")
def test_every_install_path():
    paths = ("editable-old-pip", "editable-new-pip", "isolated", "non-editable", "wheel+sdist")
    run_repo_script("scripts/check_installs.sh", "--quick", timeout=1500,
                    must_print=[f"PASS {p}" for p in paths])
