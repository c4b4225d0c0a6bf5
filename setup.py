"""Build sparsekern's compiled extension ``sparsekern._C`` (metadata: pyproject.toml).

One extension holds every kernel in ``csrc/``: the C++/OpenMP CPU kernels
always, the CUDA kernels (``csrc/cuda/*.cu``) only when this torch is a CUDA
build *and* a valid CUDA toolkit is found (``nvcc``, ``include/``,
``lib64/libcudart*``); otherwise the build says why it skipped them
(tests/test_cuda_compile.py still compiles them with nvcc alone). The CUDA
archs come from ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"). The C++ standard
is the one torch's BuildExtension picks for this torch (C++20 from torch 2.13 on,
which the torch 2.14 headers require). Build with the installed torch, never a
fresh one:

    pip install --no-build-isolation -e .

Environment:
    CUDA_HOME            the CUDA toolkit to build with (checked; torch's own guess
                         from the nvcc on PATH may be a wrapper's directory).
    SPARSEKERN_CPU_ARCH  -march value for the CPU kernels (default "native";
                         e.g. "x86-64-v3" to build a portable AVX2 binary).
    SPARSEKERN_SANITIZE  e.g. "address,undefined": build the CPU kernels with
                         those sanitizers (-O1 -g, no recovery); see scripts/asan.sh.
"""
import glob
import os
import shutil

from setuptools import setup

ISOLATED_BUILD_HELP = (
    "sparsekern is a torch extension and compiles against the torch you have installed, "
    "so it must be built without build isolation:\n"
    "    pip install --no-build-isolation .        (or -e . for a checkout; or bash scripts/setup.sh)\n"
    "with torch installed first (CPU machines: pip install torch==2.13.0). "
    "torch could not be imported in this build environment: {exc}"
)

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message
    raise SystemExit(ISOLATED_BUILD_HELP.format(exc=exc)) from None

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cuda_toolkit_problem(home):
    """Why ``home`` is not a usable CUDA toolkit (None when it is)."""
    if not home:
        return "not set"
    missing = [what for what, ok in (
        ("bin/nvcc", os.path.isfile(os.path.join(home, "bin", "nvcc"))),
        ("include/cuda_runtime.h", os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))),
        ("lib64/libcudart*", bool(glob.glob(os.path.join(home, "lib64", "libcudart*"))
                                  or glob.glob(os.path.join(home, "lib", "libcudart*")))),
    ) if not ok]
    return f"{home} lacks {', '.join(missing)}" if missing else None


def find_cuda_home():
    """(toolkit, None) or (None, reason): CUDA_HOME if set (it must be valid), else the
    first valid one of torch's guess, /usr/local/cuda and the nvcc on PATH's parent."""
    user = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if user:
        problem = cuda_toolkit_problem(user)
        return (user, None) if problem is None else (None, f"CUDA_HOME={problem}")
    nvcc = shutil.which("nvcc")
    candidates = [cpp_extension.CUDA_HOME, "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    tried = []
    for home in dict.fromkeys(c for c in candidates if c):
        problem = cuda_toolkit_problem(home)
        if problem is None:
            return home, None
        tried.append(problem)
    return None, "no valid CUDA toolkit found (set CUDA_HOME): " + ("; ".join(tried) or "no nvcc")


def cuda_skip_reason():
    """Why the CUDA kernels are not built (None when they are); points torch at the toolkit."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return "csrc/cuda has no .cu sources"
    home, why = find_cuda_home()
    if home is None:
        return why
    # torch's BuildExtension and CUDAExtension read this module global.
    cpp_extension.CUDA_HOME = home
    os.environ["CUDA_HOME"] = home
    return None


def extensions():
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    arch = os.environ.get("SPARSEKERN_CPU_ARCH", "native")
    # No -std: BuildExtension adds the standard this torch's headers need.
    cxx = ["-O3", "-fopenmp", f"-march={arch}", "-ffp-contract=fast", "-fno-math-errno"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("SPARSEKERN_SANITIZE")
    if sanitize:
        flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g"] + flags
        link += flags
        print(f"sparsekern: sanitizer build ({sanitize})")
    skip = cuda_skip_reason()
    if skip is None:
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"sparsekern: building CUDA kernels with {cpp_extension.CUDA_HOME} "
              f"for TORCH_CUDA_ARCH_LIST={archs}")
        return [CUDAExtension("sparsekern._C", sources,
                              extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                              extra_link_args=link,
                              define_macros=[("SPARSEKERN_WITH_CUDA", "1")])]
    print(f"sparsekern: skipping CUDA kernels: {skip}")
    return [CppExtension("sparsekern._C", sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=link)]


if __name__ == "__main__":  # (setuptools' build backends run this file as __main__)
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
