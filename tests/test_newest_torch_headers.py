"""Every C++ and CUDA source compiles against the newest torch headers on this machine.

A GPU user installs today's torch (2.14.1, a CUDA build, whose headers require
C++20), not the torch 2.13 CPU wheel the suite runs with. That wheel lies in the
machine's local package index; only its ``torch/include`` tree (~40 MB) is
extracted (cached under build/), nothing is installed. The C++ sources get a
syntax-and-semantics pass (g++ -fsyntax-only), and so does the CUDA launcher
(csrc/cuda/*.cpp, with the toolkit's headers); the CUDA kernels include no torch header.
"""
import configparser
import glob
import os
import re
import shutil
import subprocess
import sysconfig
import zipfile
from pathlib import Path

import pytest

import cuda_toolkit as cuda_compile

ROOT = Path(__file__).resolve().parents[1]
VERSION = "2.14.1"
CACHE = ROOT / "build" / f"torch-{VERSION}-include"


def local_wheel():
    """The torch VERSION wheel in one of pip's local (file://) indexes, or None."""
    dirs = ["/opt/pypi-more/files", "/opt/pypi/files", "/opt/wheels"]
    cfg = configparser.ConfigParser()
    cfg.read(["/etc/pip.conf", os.path.expanduser("~/.config/pip/pip.conf")])
    for section in cfg.sections():
        for key in ("extra-index-url", "find-links"):
            for url in cfg.get(section, key, fallback="").split():
                path = url.removeprefix("file://")
                if os.path.isdir(path):
                    dirs += [path, os.path.join(os.path.dirname(path), "files")]
    for d in dict.fromkeys(dirs):
        hits = glob.glob(os.path.join(d, f"torch-{VERSION}-*.whl"))
        if hits:
            return hits[0]
    return None


WHEEL = local_wheel()
needs_wheel = pytest.mark.skipif(WHEEL is None, reason=f"no torch {VERSION} wheel in a local index here")


@pytest.fixture(scope="module")
def headers():
    marker = CACHE / ".complete"
    if not marker.exists():
        shutil.rmtree(CACHE, ignore_errors=True)
        with zipfile.ZipFile(WHEEL) as z:
            for info in z.infolist():
                if info.filename.startswith("torch/include/"):
                    z.extract(info, CACHE)
        marker.write_text(WHEEL)
    inc = CACHE / "torch" / "include"
    text = (inc / "c10" / "macros" / "Macros.h").read_text() + (inc / "ATen" / "ATen.h").read_text()
    assert "C++20" in text or "201703L" in text or "202002L" in text, "unexpected header tree"
    return inc


def include_flags(inc):
    return [f"-I{inc}", f"-I{inc / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]


CPP = sorted(ROOT.glob("csrc/*.cpp")) + sorted(ROOT.glob("csrc/cpu/*.cpp"))


@needs_wheel
@pytest.mark.parametrize("source", CPP, ids=lambda p: p.name)
def test_cpp_sources_compile_against_torch_2_14_headers(source, headers):
    # -std=c++20 is what torch's BuildExtension adds for this torch (setup.py adds none).
    cmd = ["g++", "-fsyntax-only", "-std=c++20", "-fopenmp", "-march=x86-64-v3", "-O1",
           str(source)] + include_flags(headers)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]


def test_the_headers_really_require_cpp20_so_the_check_can_fail(tmp_path):
    """Guard: compiled as C++17, the 2.14 headers must fail (the bug this file prevents)."""
    if WHEEL is None:
        pytest.skip(f"no torch {VERSION} wheel here")
    inc = CACHE / "torch" / "include"
    if not (CACHE / ".complete").exists():
        pytest.skip("headers not extracted yet (run the whole file)")
    src = tmp_path / "t.cpp"
    src.write_text("#include <ATen/ATen.h>\nint main() { return 0; }\n")
    out = subprocess.run(["g++", "-fsyntax-only", "-std=c++17", str(src)] + include_flags(inc),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and re.search(r"C\+\+20|c\+\+20|requires", out.stderr), out.stderr[-2000:]


@needs_wheel
@pytest.mark.skipif(cuda_compile.HOME is None, reason="no CUDA toolkit headers here")
@pytest.mark.parametrize("source", cuda_compile.LAUNCHERS, ids=lambda p: p.name)
def test_cuda_launchers_compile_against_torch_2_14_headers(source, headers, tmp_path):
    # The launcher is the only CUDA-side file that includes torch (the kernels include CUDA's
    # headers alone: tests/test_cuda_compile.py), so this is the whole 2.14 check of csrc/cuda.
    dirs = [headers, headers / "torch" / "csrc" / "api" / "include"]
    cmd = cuda_compile.launcher_flags(dirs, tmp_path, "c++20") + [str(source)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-6000:]
