"""Which kernels run an op: the backends, what each declares, and the one selection function.

Each backend declares the devices, dtypes, layouts, BSR block sizes and op families
("linear": ``spmm``/``spmm_t``/``sddmm``; "conv": ``conv2d`` and its gradients) it
runs, and what only run time can tell (an extension not built, triton missing, a GPU
too old). ``not_supported_reasons`` explains every refusal; :func:`select` walks the
list and either returns the first backend that accepts or raises listing every
backend with its reasons. Nothing falls back silently.

==========  ======  ===================  ====================  ==========================================
backend     device  dtypes               layouts               implementation
==========  ======  ===================  ====================  ==========================================
cpu         CPU     float32, float64,    CSR, BSR 4..64        C++/OpenMP kernels (``torch.ops.sparsekern``);
                    bfloat16, float16                          bf16/fp16 accumulate in fp32
cuda_cpp    CUDA    float16, bfloat16,   CSR                   csrc/cuda: Sputnik-style SpMM, warp-reduced
                    float32                                    SDDMM, tensor-core SpMM at 70-90% sparsity
triton      CUDA    float16, bfloat16,   CSR, BSR 16/32/64     :mod:`sparsekern.gpu` (``tl.dot`` for BSR)
                    float32
reference   any     any floating         CSR, BSR any          pure torch gather/scatter (tests, debugging)
==========  ======  ===================  ====================  ==========================================

On CUDA the ops' implementation (:mod:`sparsekern.gpu.route`) chooses between
``cuda_cpp`` and ``triton`` per call with :func:`select`: ``SPARSEKERN_GPU_BACKEND``
(``triton`` or ``cuda``) names one, which must then accept; ``auto`` (the default)
takes the first that accepts, and ``cuda_cpp`` is automatic only once it has
passed its suite on a real GPU (:data:`sparsekern.gpu.route.CUDA_CPP_VERIFIED_BY`;
until then ``SPARSEKERN_GPU_BACKEND=cuda`` opts in). Conv on CUDA is im2col + the
linear ops, so it follows the same choice. ``reference`` runs only when named.

Devices are the *dispatch* device: inside
:func:`sparsekern.gpu.interpret.cuda_path_on_cpu` CPU tensors count as CUDA ones
(the GPU path under the Triton interpreter), so the GPU backends accept them there
and only there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from sparsekern import _ext, gpu
from sparsekern.formats import BSR_BLOCK_SIZES

ENV = "SPARSEKERN_GPU_BACKEND"
GPU_BACKENDS = ("cuda_cpp", "triton")              # in the order ``auto`` tries them
KINDS = ("linear", "conv")

# Non-empty inside sparsekern.gpu.interpret.cuda_path_on_cpu: CPU tensors are dispatched
# as CUDA ones.
CPU_AS_CUDA: list = []


def dispatch_device_type(device: torch.device) -> str:
    """The device type backends are selected for: ``device.type``, except "cuda" for CPU
    tensors inside :func:`sparsekern.gpu.interpret.cuda_path_on_cpu`."""
    return "cuda" if CPU_AS_CUDA and device.type == "cpu" else device.type


def block_size_of(values: torch.Tensor) -> int:
    """1 for CSR values [nnz], b for BSR values [nnz, b, b]."""
    return values.shape[-1] if values.dim() == 3 else 1


@dataclass(frozen=True)
class Backend:
    """A kernel family and what it declares it can run.

    devices/dtypes: None means any (any floating dtype); layouts: of "csr", "bsr";
    block_sizes: the BSR block sizes (None: any); kinds: op families with a kernel.
    ``runtime(device)`` lists what only run time can tell (empty when it can run);
    ``auto_refusal()`` says why ``auto`` must not pick it (None when it may).
    ``ops`` is the module of op entry points (``spmm``, ``spmm_t``, ``sddmm``, ``conv2d``...),
    imported on first use (``load_ops``).
    """

    name: str
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None
    layouts: tuple[str, ...]
    block_sizes: tuple[int, ...] | None
    kinds: tuple[str, ...]
    load_ops: Callable[[], object]
    runtime: Callable[[torch.device], list[str]] = field(default=lambda device: [])
    auto_refusal: Callable[[], str | None] = field(default=lambda: None)
    note: str = ""

    @property
    def ops(self):
        return self.load_ops()

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, block_size: int,
                              kind: str = "linear") -> list[str]:
        """Why this backend cannot run ``kind`` ops on ``dtype`` values of ``block_size`` (1: CSR)
        on ``device`` (empty when it can)."""
        dev = dispatch_device_type(device)
        if self.devices is not None and dev not in self.devices:
            seen = dev if dev == device.type else f"{device.type} (dispatched as {dev} inside cuda_path_on_cpu)"
            return [f"device {seen} not in {list(self.devices)}"]
        reasons = []
        if kind not in self.kinds:
            reasons.append(f"no {kind} kernel (this backend has {'/'.join(self.kinds)} only)")
        if self.dtypes is None:
            if not dtype.is_floating_point:
                reasons.append(f"dtype {dtype} is not floating point")
        elif dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} not in {[str(d) for d in self.dtypes]}")
        layout = "csr" if block_size == 1 else "bsr"
        if layout not in self.layouts:
            reasons.append(f"layout {layout} (block_size {block_size}) not supported{self.note}")
        elif layout == "bsr" and self.block_sizes is not None and block_size not in self.block_sizes:
            reasons.append(f"BSR block_size {block_size} not in {list(self.block_sizes)}{self.note}")
        return reasons + self.runtime(device)


# ------------------------------------------------------------ run-time facts
def _cpu_runtime(device):
    return [] if _ext.available() else [_ext.missing_reason()]


def _triton_runtime(device):
    reasons = []
    missing = gpu.triton_missing_reason()
    if missing:
        reasons.append(missing)
    if device.type == "cuda":
        if gpu.INTERPRET:
            reasons.append("TRITON_INTERPRET=1 is set: the Triton kernels run on CPU tensors only")
        else:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                reasons.append(f"compute capability {major}.{minor} < 8.0 (bf16 tl.dot needs Ampere or newer)")
    elif not gpu.INTERPRET:
        reasons.append(f"device {device.type}: the Triton kernels need a CUDA GPU "
                       f"(or CPU tensors under TRITON_INTERPRET=1)")
    return reasons


def _cuda_cpp_runtime(device):
    from sparsekern.gpu import route
    return route.cpp_runtime_reasons(device)


def _cuda_cpp_auto_refusal():
    from sparsekern.gpu import route
    if route.CUDA_CPP_VERIFIED_BY or os.environ.get(ENV) == "cuda":
        return None
    return ("not verified on a GPU yet (sparsekern.gpu.route.CUDA_CPP_VERIFIED_BY is unset until "
            "scripts/gpu_check.sh passes); SPARSEKERN_GPU_BACKEND=cuda opts in")


def _library():
    from sparsekern.ops import library
    return library


def _reference():
    from sparsekern.ops import reference
    return reference


BACKENDS: dict[str, Backend] = {
    "cpu": Backend("cpu", ("cpu",), (torch.float32, torch.float64, torch.bfloat16, torch.float16), ("csr", "bsr"), BSR_BLOCK_SIZES, KINDS,
                   _library, runtime=_cpu_runtime),
    "cuda_cpp": Backend("cuda_cpp", ("cuda",), gpu.DTYPES, ("csr",), (), ("linear", "conv"), _library,
                        runtime=_cuda_cpp_runtime, auto_refusal=_cuda_cpp_auto_refusal,
                        note=" (the CUDA C++ kernels are CSR only; BSR runs on Triton)"),
    "triton": Backend("triton", ("cuda",), gpu.DTYPES, ("csr", "bsr"), gpu.BSR_BLOCK_SIZES, KINDS, _library,
                      runtime=_triton_runtime, note=" (tl.dot needs tiles >= 16)"),
    "reference": Backend("reference", None, None, ("csr", "bsr"), None, KINDS, _reference,
                         auto_refusal=lambda: "only used when asked for by name"),
}


# ----------------------------------------------------------------- selection
def gpu_request() -> str:
    """What SPARSEKERN_GPU_BACKEND asks of the GPU ops: "auto", "triton" or "cuda_cpp"."""
    want = os.environ.get(ENV, "auto")
    names = {"auto": "auto", "triton": "triton", "cuda": "cuda_cpp"}
    if want not in names:
        raise ValueError(f"{ENV}={want!r}; expected auto, triton or cuda")
    return names[want]


def select(device: torch.device, dtype: torch.dtype, block_size: int, kind: str = "linear",
           backend: str = "auto", among: tuple[str, ...] | None = None, requested_by: str | None = None) -> Backend:
    """The backend that runs ``kind`` ops for these inputs.

    ``backend`` names one (it must accept, else ``NotImplementedError`` with its reasons),
    or is "auto": the first of ``among`` (default: every backend, in table order) that
    accepts and may be picked automatically; when none does, ``NotImplementedError``
    lists every candidate with its reasons. ``requested_by`` names where a named
    backend came from (for the message).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown op family {kind!r}; expected one of {KINDS}")
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}")
        reasons = BACKENDS[backend].not_supported_reasons(device, dtype, block_size, kind)
        if reasons:
            who = f"{requested_by} names backend" if requested_by else "backend"
            raise NotImplementedError(f"{who} {backend!r}, which cannot run these inputs: {'; '.join(reasons)}")
        return BACKENDS[backend]
    refusals = []
    for name in among or tuple(BACKENDS):
        be = BACKENDS[name]
        reasons = be.not_supported_reasons(device, dtype, block_size, kind)
        if not reasons and be.auto_refusal() is not None:
            reasons = [be.auto_refusal()]
        if not reasons:
            return be
        refusals.append(f"  {name}: {'; '.join(reasons)}")
    raise NotImplementedError("no sparsekern backend supports these inputs:\n" + "\n".join(refusals))


def select_gpu(device: torch.device, dtype: torch.dtype, block_size: int, kind: str = "linear") -> Backend:
    """``cuda_cpp`` or ``triton`` for a GPU op, following SPARSEKERN_GPU_BACKEND (see module doc)."""
    want = gpu_request()
    return select(device, dtype, block_size, kind, want, GPU_BACKENDS,
                  requested_by=None if want == "auto" else f"{ENV}={os.environ[ENV]}")


def select_backend(x: torch.Tensor, values: torch.Tensor, backend: str = "auto", kind: str = "linear",
                   dtype: torch.dtype | None = None) -> Backend:
    """The backend that will run ``kind`` ("linear" or "conv") ops on ``x`` with a weight's ``values``.

    ``backend`` is what a module or functional accepts: "auto" (the CPU kernels, else the
    GPU kernels the CUDA ops will pick, see :func:`select_gpu`), "cpu", "cuda" (the GPU
    kernels, whichever SPARSEKERN_GPU_BACKEND selects) or "reference". Raises
    ``NotImplementedError`` explaining every refusal, ``ValueError`` for an unknown name.
    ``dtype`` is the dtype the op runs in when it is not values' (under autocast).
    """
    args = (x.device, dtype or values.dtype, block_size_of(values), kind)
    if backend == "cuda":
        return select_gpu(*args)
    if backend in GPU_BACKENDS:
        raise ValueError(f"backend {backend!r}: the GPU ops pick their kernels per call; pass backend='cuda' "
                         f"(or 'auto') and choose with {ENV}=triton|cuda")
    if backend != "auto":
        return select(*args, backend=backend)
    want = gpu_request()
    gpu_names = GPU_BACKENDS if want == "auto" else (want,)
    try:
        return select(*args, among=("cpu",) + gpu_names)
    except NotImplementedError as exc:
        raise NotImplementedError(f"{exc}\n  reference: {BACKENDS['reference'].auto_refusal()}") from None
