"""The machine's register-only FMA peak (GFLOP/s), the ceiling a benchmark's rates are read against.

A tiny C kernel keeps ``ACC`` independent vector accumulators in registers and runs
``acc = acc * m + c`` on each, over and over, on ``threads`` OpenMP threads for a fixed
time: no loads or stores in the loop, so it is bound by the FMA units alone (with 2 FMA
pipes of latency 4, 8 independent chains fill them; 12 leave room). The vectors are the
widest the compiler targets with ``-march=native``: AVX-512 (16 floats, 16 accumulators of
the 32 zmm registers) when ``__AVX512F__`` is defined, else AVX/AVX2 (8 floats, 12 of the 16
ymm registers), else SSE/NEON-sized 4-float vectors; an FMA counts ``2 * lanes`` flops.

The source is compiled with gcc at first use (``-O2 -march=native -fopenmp -shared``) into a
cache directory, keyed by the source hash and the ``-march`` gcc resolves ``native`` to, and
called through ctypes. Without gcc, or if the build or the call fails, the peak is ``None``
with the reason: a benchmark never fails for it. ``objdump -d`` of the cached library shows
the hot loop (``fma_peak_kernel``) as vfmadd on registers only; tests/test_bench_common.py
checks that.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec;
#define LANES 16
#define ACC 16
#define FMA(a, m, c) _mm512_fmadd_ps(a, m, c)
#define SET1(x) _mm512_set1_ps(x)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define ISA "avx512"
#elif defined(__AVX__)
#include <immintrin.h>
typedef __m256 vec;
#define LANES 8
#define ACC 12
#if defined(__FMA__)
#define FMA(a, m, c) _mm256_fmadd_ps(a, m, c)
#define ISA "avx2-fma"
#else
#define FMA(a, m, c) _mm256_add_ps(_mm256_mul_ps(a, m), c)
#define ISA "avx-mul+add"
#endif
#define SET1(x) _mm256_set1_ps(x)
static float HSUM(vec v) { float t[8]; _mm256_storeu_ps(t, v); float s = 0; for (int i = 0; i < 8; i++) s += t[i]; return s; }
#else
typedef float vec __attribute__((vector_size(16)));
#define LANES 4
#define ACC 12
#define FMA(a, m, c) ((a) * (m) + (c))
#define SET1(x) ((vec){x, x, x, x})
static float HSUM(vec v) { return v[0] + v[1] + v[2] + v[3]; }
#define ISA "generic-4"
#endif

const char *fma_peak_isa(void) { return ISA; }
int fma_peak_lanes(void) { return LANES; }
int fma_peak_accumulators(void) { return ACC; }

/* iters rounds of ACC independent FMAs, all in registers; returns a sum so nothing is dead. */
__attribute__((noinline)) float fma_peak_kernel(long iters, float seed) {
    vec m = SET1(0.999999f), c = SET1(1e-6f);
    vec a[ACC];
    for (int j = 0; j < ACC; j++) a[j] = SET1(seed + 0.001f * j);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 16
        for (int j = 0; j < ACC; j++) a[j] = FMA(a[j], m, c);
    }
    float s = 0;
    for (int j = 0; j < ACC; j++) s += HSUM(a[j]);
    return s;
}

/* GFLOP/s of `threads` threads each running fma_peak_kernel for about `seconds`. */
double fma_peak_gflops(int threads, double seconds) {
    const long chunk = 1L << 16;
    double flops = 0, wall = 0;
    volatile float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+:flops) reduction(max:wall)
    {
        float s = 0;
        long done = 0;
#pragma omp barrier
        double t0 = omp_get_wtime(), t = t0;
        while (t - t0 < seconds) {
            s += fma_peak_kernel(chunk, 1.0f + 0.01f * omp_get_thread_num());
            done += chunk;
            t = omp_get_wtime();
        }
        flops = (double)done * ACC * LANES * 2.0;
        wall = t - t0;
        sink += s;
    }
    (void)sink;
    return wall > 0 ? flops / wall * 1e-9 : 0.0;
}
"""
FLAGS = ("-O2", "-march=native", "-fopenmp", "-shared", "-fPIC")


def cache_dir() -> Path:
    """``$SPARSEKERN_BENCH_CACHE``, else ``~/.cache/sparsekern-bench``, else the temp directory."""
    for d in (os.environ.get("SPARSEKERN_BENCH_CACHE"), Path.home() / ".cache" / "sparsekern-bench",
              Path(tempfile.gettempdir()) / "sparsekern-bench"):
        if d is None:
            continue
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return Path(d)
        except OSError:
            continue
    raise OSError("no writable cache directory for the FMA peak kernel")


def native_march(cc: str) -> str:
    """What ``-march=native`` means to this gcc on this CPU (e.g. 'znver3'), for the cache key."""
    out = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True, text=True,
                         timeout=30).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "-march=":
            return parts[1]
    return "native-unresolved"


def build(cc: str | None = None) -> Path:
    """Compile the kernel (once per source, flags and -march) and return the library's path.

    Raises FileNotFoundError without gcc, RuntimeError when the build fails."""
    cc = cc or shutil.which("gcc")
    if not cc:
        raise FileNotFoundError("gcc not found on PATH")
    key = hashlib.sha256("\0".join((SOURCE, *FLAGS, native_march(cc))).encode()).hexdigest()[:16]
    lib = cache_dir() / f"fma_peak-{key}.so"
    if lib.exists():
        return lib
    src = lib.with_suffix(".c")
    src.write_text(SOURCE)
    tmp = lib.with_name(f"{lib.stem}.{os.getpid()}.tmp.so")      # atomic against a parallel build
    r = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"gcc failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:200]}")
    os.replace(tmp, lib)
    return lib


def load(lib: Path) -> ctypes.CDLL:
    so = ctypes.CDLL(str(lib))
    so.fma_peak_gflops.argtypes, so.fma_peak_gflops.restype = [ctypes.c_int, ctypes.c_double], ctypes.c_double
    so.fma_peak_isa.restype = ctypes.c_char_p
    so.fma_peak_lanes.restype = so.fma_peak_accumulators.restype = ctypes.c_int
    return so


@functools.lru_cache(maxsize=None)
def measure(threads: int, seconds: float = 0.3) -> dict:
    """The peak on ``threads`` threads, measured once per process and setting.

    Returns ``{"gflops", "threads", "seconds", "isa", "lanes", "accumulators", "library"}``;
    ``gflops`` is None (with ``"error"``) when it could not be measured."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    if not 0 < seconds <= 10:
        raise ValueError(f"seconds must be in (0, 10], got {seconds!r}")
    out = {"gflops": None, "threads": threads, "seconds": seconds}
    try:
        lib = build()
        so = load(lib)
        so.fma_peak_gflops(threads, min(0.05, seconds))               # clocks up, threads spawned
        g = so.fma_peak_gflops(threads, seconds)
        out.update(gflops=g if g > 0 else None, isa=so.fma_peak_isa().decode(), lanes=so.fma_peak_lanes(),
                   accumulators=so.fma_peak_accumulators(), library=str(lib))
        if g <= 0:
            out["error"] = "the kernel reported no time elapsed"
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:240]
    return out


def peak_gflops(threads: int, seconds: float = 0.3) -> float | None:
    """Register-only FMA GFLOP/s on ``threads`` threads, or None when it cannot be measured."""
    return measure(threads, seconds)["gflops"]
