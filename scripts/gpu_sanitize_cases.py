"""One small run of every GPU kernel, for compute-sanitizer (run by scripts/gpu_check.sh).

    python scripts/gpu_sanitize_cases.py --backend triton     # the Triton kernels (CSR, BSR, conv)
    python scripts/gpu_sanitize_cases.py --backend cuda       # the CUDA C++ kernels (CSR)
    python scripts/gpu_sanitize_cases.py --list               # the cases, without running them
    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/gpu_sanitize_cases.py --backend cuda

Each case launches one kernel variant once at a small, odd size through the public ops
(what a training step launches), with ``SPARSEKERN_GPU_BACKEND`` set to the backend,
synchronizes, and compares the result with the float64 reference, so a kernel that reads
garbage without faulting fails too. Variants: forward with bias, dX (through ``t_perm``),
dW unsplit and batch-split (fp32 atomics), a CSR row split into segments (atomics), the
C++ tensor-core and CUDA-core paths and their 16- and 32-bit column indices, and the conv
ops (im2col, grouped topology).

Exit status: 0 when every case that ran passed and at least one ran; 1 when one failed;
3 when none could run (e.g. ``--backend cuda`` without the built C++ kernels), so a
sanitizer step never passes on nothing. Without a GPU the script sets
``TRITON_INTERPRET=1`` and runs the Triton cases on CPU tensors at tiny sizes
(tests/test_gpu_check.py); the C++ cases are then skipped with the reason.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsekern as sk  # noqa: E402
from sparsekern.formats import CSRTopology  # noqa: E402
from sparsekern.ops import reference as ref  # noqa: E402
from sparsekern.testing import make_topology  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (out, in, rows): small and odd on a GPU; tiny under the interpreter (it pays per CSR nonzero)
CSR_SIZE = (257, 300, 33) if ON_GPU else (33, 40, 17)
BSR_SIZE = (128, 192, 33) if ON_GPU else (128, 192, 17)
WIDE_SIZE = (4, 70000, 9)                   # > 65536 columns: 32-bit column indices for the C++ kernels


def _topology(layout, b, density, shape, seed):
    """A random topology on DEV with at least one entry (the next seeds until it has one)."""
    out_f, in_f = shape
    for s in range(seed, seed + 100):
        t = make_topology(out_f, in_f, density, layout, b, dtype=torch.float64, seed=s)
        if t.nnz:
            return t.to(DEV)
    raise AssertionError(f"no {layout} topology with an entry at density {density}")


def _check(got, want, dtype, what):
    if ON_GPU:
        torch.cuda.synchronize()
    err = 0.0
    if want.numel() and got.shape == want.shape:
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not (got.shape == want.shape and got.dtype == dtype and err <= tol):
        raise AssertionError(f"{what}: {tuple(got.shape)} {got.dtype}, relative error {err:.2e} > {tol}")


def linear_cases(layout, b, dtype, density, shape=None, tag=""):
    """(name, run) for spmm (+bias), spmm_t and sddmm of one weight, each checked against float64."""
    out_f, in_f, M = shape or (CSR_SIZE if b == 1 else BSR_SIZE)
    name = f"{layout}{'' if b == 1 else b} {str(dtype)[6:]} d={density}{tag}"
    ops = torch.ops.sparsekern
    topo = _topology(layout, b, density, (out_f, in_f), seed=out_f * 7 + in_f + b)
    t, v64 = topo.topology(), topo.values.detach()
    g = torch.Generator(device=DEV).manual_seed(1)
    x = torch.randn(M, in_f, dtype=torch.float64, device=DEV, generator=g)
    dy = torch.randn(M, out_f, dtype=torch.float64, device=DEV, generator=g)
    bias = torch.randn(out_f, dtype=torch.float64, device=DEV, generator=g)
    lp = lambda z: z.to(dtype)  # noqa: E731
    return [
        (f"spmm {name} +bias", lambda: _check(ops.spmm(lp(x), lp(v64), *t, lp(bias)),
                                              ref.spmm(x, v64, *t, bias), dtype, "spmm")),
        (f"spmm_t {name}", lambda: _check(ops.spmm_t(lp(dy), lp(v64), *t), ref.spmm_t(dy, v64, *t), dtype, "spmm_t")),
        (f"sddmm {name}", lambda: _check(ops.sddmm(lp(dy), lp(x), *t, b), ref.sddmm(dy, x, *t, b), dtype, "sddmm")),
    ]


def triton_only_cases(dtype):
    """Variants the ops pick only at other sizes, launched directly: batch-split SDDMM (atomics)
    and a CSR row cut into segments (atomics)."""
    from sparsekern.gpu import launch
    from sparsekern.gpu.tuning import LaunchConfig
    out = []
    for layout, b in (("csr", 1), ("bsr", 16)):
        out_f, in_f, M = CSR_SIZE if b == 1 else BSR_SIZE
        topo = _topology(layout, b, 0.3, (out_f, in_f), seed=11 + b)
        t = topo.topology()
        x = torch.randn(M, in_f, dtype=torch.float64, device=DEV)
        dy = torch.randn(M, out_f, dtype=torch.float64, device=DEV)
        cfg = LaunchConfig(block_m=16, block_nz=32)
        out.append((f"sddmm {layout}{'' if b == 1 else b} {str(dtype)[6:]} split=2 (atomics)",
                    lambda t=t, x=x, dy=dy, b=b: _check(launch.sddmm(dy.to(dtype), x.to(dtype), *t, b, config=cfg,
                                                                     split=2), ref.sddmm(dy, x, *t, b), dtype,
                                                        "sddmm split")))
    out_f, in_f, M = CSR_SIZE
    mask = torch.rand(out_f, in_f, generator=torch.Generator().manual_seed(5)) < 0.1
    mask[3] = True                                           # one full row: many segments
    topo = CSRTopology.from_mask(mask, torch.randn(out_f, in_f, dtype=torch.float64)).to(DEV)
    t, v = topo.topology(), topo.values.detach()
    x = torch.randn(M, in_f, dtype=torch.float64, device=DEV)
    cfg = LaunchConfig(block_m=16, block_r=8, seg_mult=1.0)
    out.append((f"spmm csr {str(dtype)[6:]} long row (segments, atomics)",
                lambda: _check(launch.spmm(x.to(dtype), v.to(dtype), *t, config=cfg), ref.spmm(x, v, *t), dtype,
                               "spmm segments")))
    return out


def conv_cases(dtype):
    """conv2d, conv2d_dx and conv2d_dw through the ops (im2col + the linear kernels), CSR with
    groups=2 (the grouped topology) and BSR16."""
    ops = torch.ops.sparsekern
    out = []
    for layout, b, cin, cout, groups in (("csr", 1, 4, 6, 2), ("bsr", 16, 16, 16, 1)):
        geom = sk.conv_geometry(3, 1, 1, 1, groups)
        topo = _topology(layout, b, 0.4, (cout, cin // groups * 9), seed=21 + b)
        t, v64 = topo.topology(), topo.values.detach()
        x = torch.randn(2, cin, 5, 6, dtype=torch.float64, device=DEV)
        dy = torch.randn(2, cout, 5, 6, dtype=torch.float64, device=DEV)
        lp = lambda z: z.to(dtype)  # noqa: E731
        name = f"{layout}{'' if b == 1 else b} g{groups} {str(dtype)[6:]}"
        out += [
            (f"conv2d {name}", lambda x=x, v64=v64, t=t, geom=geom: _check(
                ops.conv2d(lp(x), lp(v64), *t, None, geom), ref.conv2d(x, v64, *t, None, geom), dtype, "conv2d")),
            (f"conv2d_dx {name}", lambda dy=dy, x=x, v64=v64, t=t, geom=geom: _check(
                ops.conv2d_dx(lp(dy), lp(v64), *t, geom, list(x.shape)), ref.conv2d_dx(dy, v64, *t, geom, list(x.shape)),
                dtype, "conv2d_dx")),
            (f"conv2d_dw {name}", lambda dy=dy, x=x, t=t, geom=geom, b=b: _check(
                ops.conv2d_dw(lp(dy), lp(x), *t, geom, b), ref.conv2d_dw(dy, x, *t, geom, b), dtype, "conv2d_dw")),
        ]
    return out


def cases(backend, dtype_names):
    """Every (name, run) of ``backend`` for these dtypes (lazily built: a refusal is per case)."""
    out = []
    for dn in dtype_names:
        dt = DTYPES[dn]
        if backend == "triton":
            for layout, b in (("csr", 1), ("bsr", 16), ("bsr", 32), ("bsr", 64)):
                out.append((f"{layout}{'' if b == 1 else b} {dn}", lambda layout=layout, b=b, dt=dt:
                            linear_cases(layout, b, dt, 0.3)))
            out.append((f"triton-only variants {dn}", lambda dt=dt: triton_only_cases(dt)))
            out.append((f"conv {dn}", lambda dt=dt: conv_cases(dt)))
        else:
            # CUDA-core path (fp32, or density < TENSOR_CORE_MIN_DENSITY) and tensor-core path (half, denser)
            for density in (0.05, 0.3):
                out.append((f"csr {dn} d={density}", lambda dt=dt, density=density: linear_cases("csr", 1, dt, density)))
            out.append((f"csr {dn} wide (32-bit column indices)", lambda dt=dt: linear_cases(
                "csr", 1, dt, 2e-4, WIDE_SIZE, " wide")))
    return out


def cpp_skip_reason(backend) -> str | None:
    """Why the cases of ``backend`` cannot run here (None when they can)."""
    from sparsekern.gpu import route
    if backend == "cuda":
        if route.cpp_ops() is None:
            return "the CUDA C++ kernels are not built (sparsekern_cuda ops not registered)"
        if not ON_GPU:
            return "the CUDA C++ kernels need a CUDA GPU"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("triton", "cuda"), default="triton")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--list", action="store_true", help="print the case groups and exit")
    a = p.parse_args(argv)
    from sparsekern.gpu import route
    from sparsekern.gpu.interpret import gpu_path
    os.environ[route.ENV] = a.backend
    groups = cases(a.backend, a.dtypes)
    if a.list:
        for name, _ in groups:
            print(name)
        return 0
    skip = cpp_skip_reason(a.backend)
    if skip:
        print(f"skip all {a.backend} cases: {skip}")
        return 3
    ran, failed = 0, []
    with gpu_path(DEV):
        for group, build in groups:
            try:
                built = build()
            except Exception as exc:  # noqa: BLE001 - a case that cannot even be set up is a failure
                failed.append(group)
                print(f"FAIL {group} (setup): {type(exc).__name__}: {exc}")
                continue
            for name, run in built:
                try:
                    run()
                    ran += 1
                    print(f"ok   {name}", flush=True)
                except Exception as exc:  # noqa: BLE001 - report every case, then fail
                    failed.append(name)
                    print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                    traceback.print_exc(limit=3)
    print(f"{ran} passed, {len(failed)} failed ({a.backend}, {'GPU' if ON_GPU else 'interpreter on CPU'})")
    if failed:
        return 1
    return 0 if ran else 3


if __name__ == "__main__":
    sys.exit(main())
