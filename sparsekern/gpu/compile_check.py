"""Compile every Triton kernel variant the launchers can emit, for real GPU targets, without a GPU.

    python -m sparsekern.gpu.compile_check                  # sm_80 and sm_90, all variants
    python -m sparsekern.gpu.compile_check --arch 90 --quick

Triton lowers a kernel to PTX and assembles a cubin with the ``ptxas`` it ships,
so this needs no GPU: CI runs it to catch what the interpreter cannot see
(a construct the compiler rejects, a shape ``tl.dot`` refuses, a bad constexpr
combination). Each variant is one set of constexprs that
:mod:`sparsekern.gpu.launch` passes, crossed with the launch configs of
:data:`sparsekern.gpu.tuning.TABLE`. Must run without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

DTYPES = {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}
# Opt-in shared memory per block (bytes): A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}


def variants(quick: bool = False):
    """(name, kernel, signature, constexprs, options) for every launch the launchers can make."""
    from sparsekern.gpu import tuning
    from sparsekern.gpu.triton_bsr import bsr_sddmm_kernel, bsr_spmm_kernel
    from sparsekern.gpu.triton_csr import csr_sddmm_kernel, csr_spmm_kernel

    def cfgs(op, b, dt):
        found = {c for (o, bb, _, d), c in tuning.TABLE.items() if o == op and bb == b and d == dt}
        found.add(tuning.lookup(op, b, 0.1, _torch_dtype(dt)))
        return sorted(found, key=repr)[:1] if quick else sorted(found, key=repr)

    for dt, tt in DTYPES.items():
        p = f"*{tt}"
        for b in (16, 32, 64):
            if quick and b == 32:
                continue
            for cfg in cfgs("spmm", b, dt):
                for trans, perm, bias in ((True, False, True), (True, False, False), (False, True, False)):
                    sig = {"x_ptr": p, "v_ptr": p, "offsets_ptr": "*i32", "cols_ptr": "*i32", "perm_ptr": "*i32",
                           "order_ptr": "*i32", "bias_ptr": p, "y_ptr": p, "M": "i32", "R": "i32",
                           "stride_xm": "i32", "stride_ym": "i32"}
                    const = {"B": b, "BLOCK_M": cfg.block_m, "TRANS_W": trans, "HAS_PERM": perm, "HAS_BIAS": bias,
                             "UPCAST": False, "IS_FP32": dt == "f32", "PRECISION": "tf32" if dt == "f32" else "ieee"}
                    yield (f"bsr_spmm {dt} b{b} {'fwd' if trans else 'dx'}{' bias' if bias else ''} {cfg}",
                           bsr_spmm_kernel, sig, const, cfg)
            for cfg in cfgs("sddmm", b, dt):
                for atomic in (False, True):
                    out = "*fp32" if atomic else p
                    sig = {"dy_ptr": p, "x_ptr": p, "rows_ptr": "*i32", "cols_ptr": "*i32", "out_ptr": out,
                           "M": "i32", "m_per_split": "i32", "stride_dym": "i32", "stride_xm": "i32"}
                    const = {"B": b, "BLOCK_M": cfg.block_m, "ATOMIC": atomic, "UPCAST": False,
                             "IS_FP32": dt == "f32", "PRECISION": "tf32" if dt == "f32" else "ieee"}
                    yield f"bsr_sddmm {dt} b{b} atomic={atomic} {cfg}", bsr_sddmm_kernel, sig, const, cfg
        for cfg in cfgs("spmm", 1, dt):
            for perm, atomic in itertools.product((False, True), (False, True)):
                sig = {"x_ptr": p, "v_ptr": p, "cols_ptr": "*i32", "perm_ptr": "*i32", "seg_row_ptr": "*i32",
                       "seg_start_ptr": "*i32", "seg_len_ptr": "*i32", "bias_ptr": p,
                       "y_ptr": "*fp32" if atomic else p, "M": "i32", "n_groups": "i32", "stride_xm": "i32",
                       "stride_xk": "i32", "stride_ym": "i32"}
                const = {"BLOCK_M": cfg.block_m, "BLOCK_R": cfg.block_r, "HAS_PERM": perm, "HAS_BIAS": not perm,
                         "ATOMIC": atomic}
                yield f"csr_spmm {dt} perm={perm} atomic={atomic} {cfg}", csr_spmm_kernel, sig, const, cfg
        for cfg in cfgs("sddmm", 1, dt):
            for atomic in (False, True):
                sig = {"dy_ptr": p, "x_ptr": p, "rows_ptr": "*i32", "cols_ptr": "*i32",
                       "out_ptr": "*fp32" if atomic else p, "nnz": "i32", "M": "i32", "m_per_split": "i32",
                       "stride_dym": "i32", "stride_dyr": "i32", "stride_xm": "i32", "stride_xk": "i32"}
                const = {"BLOCK_NZ": cfg.block_nz, "BLOCK_M": cfg.block_m, "ATOMIC": atomic}
                yield f"csr_sddmm {dt} atomic={atomic} {cfg}", csr_sddmm_kernel, sig, const, cfg


def _torch_dtype(dt):
    import torch
    return {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[dt]


def compile_all(archs=(80, 90), quick: bool = False, verbose: bool = False) -> list[str]:
    """Compile every variant for every arch; returns the failures (empty when all compile)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels must be JIT functions)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    failures = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for name, kernel, sig, const, cfg in variants(quick):
            t0 = time.perf_counter()
            try:
                k = triton.compile(ASTSource(fn=kernel, signature={**sig, **{c: "constexpr" for c in const}},
                                             constexprs=const),
                                   target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                assert "cubin" in k.asm
                limit = SMEM_LIMIT.get(arch)
                if limit is not None and k.metadata.shared > limit:
                    raise RuntimeError(f"needs {k.metadata.shared} B of shared memory, sm_{arch} has {limit}")
                if verbose:
                    print(f"ok   sm_{arch} {name} ({time.perf_counter() - t0:.1f}s, smem {k.metadata.shared})")
            except Exception as exc:  # report every failing variant, not just the first
                failures.append(f"sm_{arch} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
                if verbose:
                    print("FAIL", failures[-1])
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--quick", action="store_true", help="one config per kernel family")
    a = p.parse_args(argv)
    failures = compile_all(tuple(a.arch), a.quick, verbose=True)
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
