"""The CUDA toolkit and csrc/cuda's two halves, for the compile tests (tests/test_cuda_compile.py,
tests/test_newest_torch_headers.py): kernels (``*.cu``, CUDA headers only) and launchers
(``*.cpp``, host C++ on torch)."""
import os
import shutil
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
LAUNCHERS = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))


def cuda_home():
    """The toolkit: CUDA_HOME, else the directory above a real nvcc, else /usr/local/cuda."""
    for d in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if d and (Path(d) / "include" / "cuda_runtime_api.h").is_file():
            return Path(d)
    nvcc = shutil.which("nvcc")
    if nvcc:
        d = Path(os.path.realpath(nvcc)).parents[1]
        if (d / "include" / "cuda_runtime_api.h").is_file():
            return d
    return None


HOME = cuda_home()
NVCC = str(HOME / "bin" / "nvcc") if HOME and (HOME / "bin" / "nvcc").is_file() else shutil.which("nvcc")


def launcher_flags(torch_include_dirs, scratch: Path, cxx_std: str):
    """g++ flags for the launcher: torch's and the toolkit's headers, plus the CMake-generated
    c10/cuda macros header when the torch headers lack it (a CPU wheel)."""
    stub = scratch / "include" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return (["g++", "-fsyntax-only", f"-std={cxx_std}", "-Wall", "-Werror=return-type",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
             "-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-I{sysconfig.get_paths()['include']}"]
            + [f"-I{p}" for p in torch_include_dirs]
            + [f"-I{HOME / 'include'}", f"-idirafter{scratch / 'include'}"])

