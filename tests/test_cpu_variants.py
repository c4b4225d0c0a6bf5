"""Run-time choice of the CPU kernel build (sparsekern/_cpu_isa.py, setup.py).

The choice itself is tested on synthetic flag sets (any CPU can check what an
AVX-512 or a pre-AVX2 machine would load); every variant built here that this
CPU runs is then forced through SPARSEKERN_CPU_ISA in a subprocess and checked
against the float64 masked-dense reference at 1 and 2 threads.
scripts/check_cpu_variants.sh builds all variants and runs the kernel test files
under each one this CPU runs.
"""
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sparsekern as sk
from sparsekern import _cpu_isa as isa

ROOT = Path(__file__).resolve().parents[1]
AVX512 = set(isa.VARIANTS["avx512"][1])
AVX2 = set(isa.VARIANTS["avx2"][1])
SSE4 = set(isa.VARIANTS["base"][1])
ALL = list(isa.VARIANTS)


@pytest.mark.parametrize("flags, want", [(AVX512, "avx512"), (AVX512 - {"avx512bw"}, "avx2"),
                                         (AVX2, "avx2"), (AVX2 - {"fma"}, "base"), (SSE4, "base")])
def test_the_best_variant_the_cpu_runs_is_chosen(flags, want):
    assert isa.choose(ALL, flags) == (want, [])


def test_a_variant_that_is_not_built_is_not_chosen():
    assert isa.choose(["avx2", "base"], AVX512) == ("avx2", [])
    assert isa.choose(["avx512"], AVX2)[0] is False      # nothing here runs on an AVX2 CPU
    assert "no built CPU kernel variant runs" in isa.choose(["avx512"], AVX2)[1][0]


def test_a_requested_variant_is_honoured_or_refused_with_the_reason():
    assert isa.choose(ALL, AVX512, "base") == ("base", [])
    got, notes = isa.choose(ALL, AVX2, "avx512")
    assert got == "avx2" and "this CPU lacks avx512f, avx512bw" in notes[0]
    got, notes = isa.choose(["avx2", "base"], AVX512, "avx512")
    assert got == "avx2" and "not built" in notes[0]
    got, notes = isa.choose(ALL, AVX2, "sse")
    assert got == "avx2" and "SPARSEKERN_CPU_ISA=sse is not a variant" in notes[0]


def test_a_single_arch_build_is_used_as_is():
    assert isa.choose([None], SSE4) == (None, [])
    got, notes = isa.choose([None], AVX2, "base")
    assert got is None and "single" in notes[0]


def test_the_loaded_module_is_the_choice_for_this_cpu():
    if os.environ.get(isa.REQUEST_ENV):
        pytest.skip(f"{isa.REQUEST_ENV} is set")
    desc = sk.cpu_kernel_variant()
    built = [v for v in (None, *isa.VARIANTS) if sk._ext._built(isa.module_name(v))]
    want, _ = isa.choose(built, isa.cpu_flags() or isa._torch_flags())
    assert desc == isa.describe(want)


def _runnable_built():
    flags = isa.cpu_flags() or isa._torch_flags()
    return [v for v in isa.VARIANTS
            if sk._ext._built(isa.module_name(v)) and not isa.missing_flags(v, flags)]


CHECK = textwrap.dedent("""
    import sys, warnings, torch
    warnings.simplefilter("error")          # a refused request would warn: fail instead
    import sparsekern as sk
    from sparsekern.testing import make_conv, make_linear
    want = sys.argv[1]
    assert sk.cpu_kernel_variant().startswith(want + " "), sk.cpu_kernel_variant()
    gen = torch.Generator().manual_seed(7)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for layer, shape in ((make_linear(37, 29, "csr", density=0.3, seed=1), (5, 37)),
                             (make_linear(32, 48, "bsr", 8, density=0.4, seed=2), (3, 32)),
                             (make_conv(6, 10, 3, "csr", density=0.4, stride=2, padding=1, seed=3),
                              (2, 6, 9, 7))):
            layer = layer.double()
            x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
            w = layer.topology.to_dense().clone().requires_grad_(True)
            y = layer(x)
            dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
            y.backward(dy)
            if x.dim() == 2:
                ref = torch.nn.functional.linear(x, w, layer.bias)
            else:
                ref = torch.nn.functional.conv2d(x, w.reshape(layer.weight_shape), layer.bias,
                                                 stride=2, padding=1)
            gx, gw = torch.autograd.grad(ref, (x, w), dy)
            mask = layer.topology.mask()
            assert torch.allclose(y, ref, atol=1e-10), (want, threads, type(layer).__name__)
            assert torch.allclose(x.grad, gx, atol=1e-10)
            got_w = layer.topology.to_dense(values=layer.topology.values.grad)
            assert torch.allclose(got_w, gw * mask, atol=1e-10)
    print("variant ok", want)
""")


@pytest.mark.parametrize("variant", _runnable_built() or ["none built"])
def test_every_built_variant_this_cpu_runs_matches_the_reference(variant):
    if variant == "none built":
        pytest.skip("a single SPARSEKERN_CPU_ARCH build: no variants to force")
    env = {**os.environ, isa.REQUEST_ENV: variant}
    r = subprocess.run([sys.executable, "-c", CHECK, variant], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"variant ok {variant}" in r.stdout


def test_a_request_this_machine_cannot_honour_warns_and_runs_the_best():
    flags = isa.cpu_flags() or isa._torch_flags()
    if not _runnable_built():
        pytest.skip("a single SPARSEKERN_CPU_ARCH build")
    # avx512 where this CPU lacks it, else a variant name that does not exist
    ask = "avx512" if isa.missing_flags("avx512", flags) else "sse2"
    code = ("import warnings\nwarnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import sparsekern as sk\n"
            "print(sk.cpu_kernel_variant()); print([str(x.message) for x in w])")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, isa.REQUEST_ENV: ask},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(_runnable_built()[0] + " ")
    assert f"{isa.REQUEST_ENV}={ask}" in r.stdout


def test_setup_builds_the_variants_asked_for(monkeypatch):
    ns = runpy.run_path(str(ROOT / "setup.py"), run_name="not_main")   # defines, builds nothing
    for var in ("SPARSEKERN_CPU_ARCH", "SPARSEKERN_SANITIZE", "SPARSEKERN_CPU_VARIANTS"):
        monkeypatch.delenv(var, raising=False)
    if ns["platform"].machine().lower() not in ("x86_64", "amd64"):
        assert ns["cpu_builds"]() == [("sparsekern._C", None)]
        return
    assert ns["cpu_builds"]() == [("sparsekern._C_avx512", "x86-64-v4"), ("sparsekern._C_avx2", "x86-64-v3"),
                                  ("sparsekern._C_base", "x86-64-v2")]
    monkeypatch.setenv("SPARSEKERN_CPU_VARIANTS", "host")
    assert ns["cpu_builds"]() == [(isa.module_name(isa.best_here()), isa.VARIANTS[isa.best_here()][0])]
    monkeypatch.setenv("SPARSEKERN_CPU_VARIANTS", "avx2,avx9")
    with pytest.raises(SystemExit, match="SPARSEKERN_CPU_VARIANTS='avx2,avx9'.*avx9"):
        ns["cpu_builds"]()
    monkeypatch.setenv("SPARSEKERN_CPU_ARCH", "native")
    assert ns["cpu_builds"]() == [("sparsekern._C", "native")]
