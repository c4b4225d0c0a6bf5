"""Build sparsekern's compiled extension ``sparsekern._C`` (metadata: pyproject.toml).

The CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``) are built, by default on
x86-64, once per instruction-set variant, each a complete extension:
``sparsekern._C_avx512`` (-march=x86-64-v4), ``sparsekern._C_avx2``
(x86-64-v3) and ``sparsekern._C_base`` (x86-64-v2). Importing sparsekern loads
exactly one, the best this CPU runs (``sparsekern/_cpu_isa.py``), so a wheel is
portable and the choice costs nothing per call. ``SPARSEKERN_CPU_ARCH`` builds
one extension ``sparsekern._C`` for that -march instead (``native`` for a local
build tuned to this machine). The CUDA kernels (``csrc/cuda/*.cu``) are a
separate extension, ``sparsekern._C_cuda``, built only when this torch is a CUDA
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
    SPARSEKERN_CPU_VARIANTS  which x86-64 variants to build: "all" (default: a
                         portable build), "host" (the best this machine runs; what
                         scripts/setup.sh builds: one compile), or a list "avx2,base".
    SPARSEKERN_CPU_ARCH  build one CPU extension sparsekern._C with this -march
                         (e.g. "native" for a build tuned to this machine, or
                         "x86-64-v3") instead of the variants.
    SPARSEKERN_SANITIZE  e.g. "address,undefined": build the CPU kernels with
                         those sanitizers (-O1 -g, no recovery); see scripts/asan.sh.
"""
import glob
import importlib.util
import os
import platform
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


def load_cpu_isa():
    """sparsekern/_cpu_isa.py (the variants and the CPU flags each needs), loaded as a
    file: the package itself is not importable before it is built."""
    spec = importlib.util.spec_from_file_location("_sparsekern_cpu_isa",
                                                  os.path.join(ROOT, "sparsekern", "_cpu_isa.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_builds():
    """[(module name, -march or None)] of the CPU extensions to build."""
    isa = load_cpu_isa()
    arch = os.environ.get("SPARSEKERN_CPU_ARCH")
    if arch:
        return [("sparsekern._C", arch)]
    if os.environ.get("SPARSEKERN_SANITIZE"):  # one instrumented build, for this machine
        return [("sparsekern._C", "native")]
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return [("sparsekern._C", None)]  # the compiler's default target: portable
    wanted = os.environ.get("SPARSEKERN_CPU_VARIANTS", "all").strip()
    if wanted == "all":
        names = list(isa.VARIANTS)
    elif wanted == "host":
        names = [isa.best_here()]
    else:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        bad = [n for n in names if n not in isa.VARIANTS]
        if bad or not names:
            raise SystemExit(f"SPARSEKERN_CPU_VARIANTS={wanted!r}: {bad or 'empty'} not in "
                             f"{tuple(isa.VARIANTS)} (or 'all', 'host')")
    return [(isa.module_name(n), isa.VARIANTS[n][0]) for n in names]


def module_macro(name):
    """The PyInit suffix csrc/ops.cpp and csrc/cuda/module.cpp define for ``name``."""
    return [("SPARSEKERN_MODULE", name.rsplit(".", 1)[1])]


def extensions():
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # No -std: BuildExtension adds the standard this torch's headers need.
    base = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    link = ["-fopenmp"]
    sanitize = os.environ.get("SPARSEKERN_SANITIZE")
    if sanitize:
        flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        base = [f for f in base if f != "-O3"] + ["-O1", "-g"] + flags
        link += flags
        print(f"sparsekern: sanitizer build ({sanitize})")
    exts = []
    for name, march in cpu_builds():
        cxx = base + ([f"-march={march}"] if march else [])
        print(f"sparsekern: building {name} (-march={march or 'compiler default'})")
        exts.append(CppExtension(name, sources, extra_compile_args={"cxx": cxx}, extra_link_args=link,
                                 define_macros=module_macro(name)))
    skip = cuda_skip_reason()
    if skip is None:
        cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        cuda_sources += rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        print(f"sparsekern: building sparsekern._C_cuda with {cpp_extension.CUDA_HOME} "
              f"for TORCH_CUDA_ARCH_LIST={archs}")
        exts.append(CUDAExtension("sparsekern._C_cuda", cuda_sources,
                                  extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
                                  define_macros=module_macro("sparsekern._C_cuda")))
    else:
        print(f"sparsekern: skipping CUDA kernels: {skip}")
    return exts


class Build(BuildExtension):
    """torch's BuildExtension (ninja), which also removes, from an in-place or editable
    build's package directory, compiled modules this build no longer makes (an
    earlier ``SPARSEKERN_CPU_ARCH`` build's ``_C``, say), so a stale kernel is never loaded."""

    def run(self):
        super().run()
        if not (self.inplace or getattr(self, "editable_mode", False)):
            return
        keep = {name.rsplit(".", 1)[1] for name in (e.name for e in self.extensions)}
        for path in glob.glob(os.path.join(ROOT, "sparsekern", "_C*.so")):
            if os.path.basename(path).split(".", 1)[0] not in keep:
                print(f"sparsekern: removing stale {os.path.relpath(path, ROOT)}")
                os.remove(path)


if __name__ == "__main__":  # (setuptools' build backends run this file as __main__)
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": Build.with_options(use_ninja=True)},
        zip_safe=False,
    )
