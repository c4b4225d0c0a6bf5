"""Build sparsekern's compiled extension ``sparsekern._C``.

One extension holds every kernel in ``csrc/``: the C++/OpenMP CPU kernels
always, the CUDA kernels (``csrc/cuda/*.cu``) only when this torch is a CUDA
build *and* a CUDA toolkit (nvcc) is found; otherwise the build says why it
skipped them (tests/test_cuda_compile.py still compiles them with nvcc alone).
The CUDA archs come from ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"). Build with the installed torch, never a fresh one:

    pip install --no-build-isolation -e .

Environment:
    SPARSEKERN_CPU_ARCH  -march value for the CPU kernels (default "native";
                         e.g. "x86-64-v3" to build a portable AVX2 binary).
"""
import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message
    raise SystemExit(
        "sparsekern builds against an installed torch. Install torch first "
        "(CPU machines: `pip install torch==2.13.0`), then "
        "`pip install --no-build-isolation -e .` (or run scripts/setup.sh)."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cuda_skip_reason():
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return "csrc/cuda has no .cu sources yet"
    return None


def extensions():
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    arch = os.environ.get("SPARSEKERN_CPU_ARCH", "native")
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-march={arch}", "-ffp-contract=fast",
           "-fno-math-errno"]
    skip = cuda_skip_reason()
    if skip is None:
        sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"sparsekern: building CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
        return [CUDAExtension("sparsekern._C", sources,
                              extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
                              extra_link_args=["-fopenmp"],
                              define_macros=[("SPARSEKERN_WITH_CUDA", "1")])]
    print(f"sparsekern: skipping CUDA kernels: {skip}")
    return [CppExtension("sparsekern._C", sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"])]


setup(
    name="sparsekern",
    version="0.1.0",
    description="Genuinely sparse (CSR/BSR) training kernels and layers for PyTorch",
    packages=find_packages(include=["sparsekern", "sparsekern.*"]),
    python_requires=">=3.10",
    # torch is deliberately not pinned here: setup uses the torch already
    # installed (scripts/setup.sh installs the CPU wheel only when none is).
    install_requires=["numpy", "safetensors", "tqdm"],
    extras_require={
        "test": ["pytest", "hypothesis", "pytest-benchmark", "expecttest"],
        "bench": ["matplotlib", "pytest-benchmark"],
        "train": ["scikit-learn", "matplotlib", "pyyaml"],
    },
    entry_points={"console_scripts": ["sparsekern-train = sparsekern.train:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
