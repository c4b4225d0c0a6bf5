"""Every install path (scripts/check_installs.sh --quick) in fresh virtual environments:
editable with pip 23.2 + wheel and with the newest pip, an isolated build that must
refuse with its message, non-editable with the console script run from elsewhere, and
sdist + wheel into a fresh environment. Several minutes, so it runs in CI (CI=true) or
with SPARSEKERN_INSTALL_CHECKS=1; the full version builds the wheel from the unpacked
sdist: ``bash scripts/check_installs.sh``."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WANTED = os.environ.get("CI") == "true" or os.environ.get("SPARSEKERN_INSTALL_CHECKS") == "1"


@pytest.mark.skipif(not WANTED, reason="install paths run in CI or with SPARSEKERN_INSTALL_CHECKS=1")
def test_every_install_path():
    r = subprocess.run(["bash", "scripts/check_installs.sh", "--quick"], cwd=ROOT, capture_output=True,
                       text=True, timeout=1500)
    out = r.stdout[-8000:] + r.stderr[-4000:]
    assert r.returncode == 0, out
    for path in ("editable-old-pip", "editable-new-pip", "isolated", "non-editable", "wheel+sdist"):
        assert f"PASS {path}" in r.stdout, out
