"""Packaging: one version, the metadata a user installs by, and one-line messages
for missing optional dependencies (the install paths themselves:
scripts/check_installs.sh, run in CI by tests/test_install_paths.py)."""
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import sparsekern as sk
from sparsekern import train

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once_and_read_by_the_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "sparsekern._version.__version__"
    assert "__version__ =" not in (ROOT / "sparsekern" / "__init__.py").read_text()
    from importlib.metadata import version
    assert version("sparsekern") == sk.__version__


def test_metadata_declares_torch_extras_and_a_python_floor_the_code_meets():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = meta["dependencies"]
    assert any(d.replace(" ", "").startswith("torch>=") for d in deps)
    assert any(d.startswith("tomli") and "python_version < '3.11'" in d for d in deps)
    assert {"train", "test", "gpu"} <= set(meta["optional-dependencies"])
    assert meta["requires-python"] == ">=3.10"
    # torch is never a build requirement: an isolated build must stop, not fetch a torch
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(r.startswith("torch") for r in build)


def test_no_hard_coded_cxx_standard():
    """torch 2.14's headers need C++20; BuildExtension picks the right -std."""
    for f in [ROOT / "setup.py", ROOT / "tests" / "test_cuda_compile.py", ROOT / "tests" / "cuda_toolkit.py"]:
        assert "-std=c++17" not in f.read_text(), f


def test_isolated_build_message_says_no_build_isolation():
    code = ("import builtins, runpy, sys\n"
            "real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name == 'torch' or name.startswith('torch.'): raise ImportError('No module named torch')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "sys.argv = ['setup.py', '--version']\n"
            "runpy.run_path('setup.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "--no-build-isolation" in r.stderr and "torch" in r.stderr


def test_cuda_home_is_validated(tmp_path, monkeypatch):
    import runpy
    ns = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")  # defines, builds nothing
    problem = ns["cuda_toolkit_problem"]
    fake = tmp_path / "wrapper"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "nvcc").write_text("#!/bin/sh\n")
    assert "lib64/libcudart" in problem(str(fake)) and "include/cuda_runtime.h" in problem(str(fake))
    (fake / "include").mkdir()
    (fake / "include" / "cuda_runtime.h").write_text("")
    (fake / "lib64").mkdir()
    (fake / "lib64" / "libcudart.so").write_text("")
    assert problem(str(fake)) is None
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    home, why = ns["find_cuda_home"]()
    assert home is None and "CUDA_HOME=" in why


def _hide(monkeypatch, module):
    """Make ``import module`` fail as if it were not installed (None in sys.modules)."""
    for m in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, module, None)


def test_missing_matplotlib_is_one_line_naming_the_extra_before_training(monkeypatch, capsys, tmp_path):
    _hide(monkeypatch, "matplotlib")
    assert train.main(["--epochs", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsekern[train]" in err[0] and "--no-plots" in err[0]
    assert not (tmp_path / "results.json").exists()            # refused before training


def test_missing_scikit_learn_names_the_extra(monkeypatch, capsys, tmp_path):
    _hide(monkeypatch, "sklearn")
    assert train.main(["--epochs", "1", "--no-plots", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsekern[train]" in err[0]


def test_missing_yaml_names_the_extra(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 1\n")
    _hide(monkeypatch, "yaml")
    assert train.main(["--config", str(cfg), "--no-plots", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sparsekern[train]" in err[0]
