"""SparseProp (``pip install --no-build-isolation sparseprop==0.1.14``) as a peer in the CPU
linear and conv benchmarks, on the very weights sparsekern runs.

Its API: ``sparseprop.modules.SparseLinear(dense_weight, bias=None)`` and
``sparseprop.modules.SparseConv2d(dense_weight, bias=None, padding=0, stride=1,
vectorizing_over_on=False)`` build a CSR-like store (values ``W_val``, an ``nn.Parameter``, and
index tensors ``W_idx``) from the nonzeros of a dense weight; ``bias`` must be an
``nn.Parameter`` or None. Forward and backward are one autograd function each, backed by
OpenMP C++ kernels; the backward computes dX and dW in one fused kernel, so only fwd and
fwd+bwd are timed. Its thread setting, ``sparseprop.set_num_threads``, only writes
``OMP_NUM_THREADS`` (read once, when an OpenMP runtime starts); its backend links
``libgomp.so.1``, which resolves to torch's already-loaded copy, so ``torch.set_num_threads``
sets its team too. :func:`match_threads` makes sure of that for any other OpenMP runtime loaded.

Each peer layer is built from ``topology.to_dense()`` of the sparsekern layer, so the nonzero
positions are the same (checked: same count and same pattern), and its forward, dX and dW are
checked against the dense reference with the same weight (allclose) before anything is timed;
a layer that fails is recorded as ``mismatch``, never timed. Where SparseProp does not apply
(BSR layout, a conv geometry it lacks) the entry is ``not applicable`` with the reason; without
the package, ``not installed``.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from _bench_common import median_ms_each

RTOL = 1e-4          # float32 sums of up to a few thousand terms, against the dense reference


class NotApplicable(Exception):
    """SparseProp has no kernel for this layer."""


class Mismatch(Exception):
    """SparseProp's result differs from the dense reference."""


def load():
    """``(sparseprop.modules, None)``, or ``(None, reason)`` when it cannot be imported."""
    try:
        import sparseprop  # noqa: F401  (imports its compiled backend)
        from sparseprop import modules
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("sparseprop", "backend"):
            return None, "not installed"
        return None, f"import failed: {exc}"
    except (ImportError, OSError) as exc:          # e.g. a backend built against another torch
        return None, f"import failed: {str(exc).splitlines()[0][:160]}"
    return modules, None


def openmp_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes (libgomp, libiomp, libomp) mapped into this process."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def match_threads(threads: int) -> list[str]:
    """Set ``threads`` on torch and on every OpenMP runtime loaded (omp_set_num_threads applies to
    the calling thread, the one that launches the kernels); returns the runtimes."""
    torch.set_num_threads(threads)
    runtimes = openmp_runtimes()
    for path in runtimes:
        try:
            ctypes.CDLL(path).omp_set_num_threads(threads)
        except (OSError, AttributeError):
            pass
    return runtimes


def check(name: str, got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error of ``got`` against ``ref`` relative to ref's largest magnitude; raises Mismatch
    beyond RTOL."""
    if got.shape != ref.shape:
        raise Mismatch(f"{name}: shape {tuple(got.shape)}, dense reference {tuple(ref.shape)}")
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    if not err <= RTOL * scale:             # NaN fails too
        raise Mismatch(f"{name}: max abs error {err:.3g} vs dense reference (scale {scale:.3g})")
    return err / scale


class Variant:
    """One SparseProp layer built for a sparsekern layer, with what checks it: the dense weight,
    sparsekern's structural mask (the weight's shape), the dense reference ``ref_fn(x, w)`` and
    ``to_dense(values)`` (SparseProp's store to dense)."""

    def __init__(self, layer, weight, mask, ref_fn, to_dense):
        self.layer, self.weight, self.mask, self.ref_fn, self.to_dense = layer, weight, mask, ref_fn, to_dense

    def check(self, x, dy) -> dict:
        """The same positions as sparsekern stores (SparseProp drops exact zeros: a zero value
        would lose its position), then y, dX and dW against the dense reference (allclose);
        raises Mismatch. Returns the relative errors."""
        if not torch.equal(self.to_dense(self.layer.W_val.detach()) != 0, self.mask):
            raise Mismatch("SparseProp stores other nonzero positions than sparsekern's weight")
        xr, wr = x.clone().requires_grad_(), self.weight.clone().requires_grad_()
        ref_y = self.ref_fn(xr, wr)
        ref_y.backward(dy)
        xp = x.clone().requires_grad_()
        y = self.layer(xp)
        y.backward(dy)
        errs = {"y": check("forward", y.detach(), ref_y.detach()),
                "dx": check("dX", xp.grad, xr.grad),
                "dw": check("dW", self.to_dense(self.layer.W_val.grad), wr.grad * self.mask)}
        self.layer.zero_grad(set_to_none=True)
        return {"max_rel_err": errs, "allclose_rtol": RTOL}


def timing_fns(peer, x, dy) -> dict:
    xr = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return peer(x)

    def fwd_bwd():
        peer(xr).backward(dy)
        xr.grad = None
        peer.zero_grad(set_to_none=True)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def bias_param(layer):
    b = getattr(layer, "bias", None)
    return None if b is None else torch.nn.Parameter(b.detach().clone())


def linear_variants(mods, lin) -> dict:
    """{variant: Variant} for a sparsekern SparseLinear."""
    from sparseprop.modules.utils import from_csr_2d
    if lin.topology.block_size != 1:
        raise NotApplicable(f"BSR layout (block {lin.topology.block_size}): SparseProp stores unstructured "
                            "CSR only")
    w = lin.topology.to_dense().detach()
    bias = bias_param(lin)
    peer = mods.SparseLinear(dense_weight=w, bias=bias)
    b0 = None if bias is None else bias.detach()
    return {"csr": Variant(peer, w, lin.topology.mask(), lambda xi, wi: F.linear(xi, wi, b0),
                           lambda v: from_csr_2d(v, peer.W_idx, (peer.N, peer.M)))}


def conv_gaps(conv) -> list[str]:
    """What SparseProp's SparseConv2d lacks for ``conv`` (an ``nn.Conv2d`` or a sparsekern
    ``SparseConv2d``): [] when it applies (square kernel <= 255, stride 1 or 2 on both axes, one
    integer padding, no dilation or groups, Cin <= 32767, zero padding mode)."""
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    if isinstance(conv.padding, str):
        return [f"padding={conv.padding!r}"]
    (ph, pw), (dh, dw) = conv.padding, conv.dilation
    return [txt for bad, txt in ((kh != kw, f"non-square kernel {kh}x{kw}"), (sh != sw or sh not in (1, 2),
                                 f"stride {sh}x{sw} (it has 1 and 2)"), (ph != pw, f"padding {ph}x{pw}"),
                                 ((dh, dw) != (1, 1), f"dilation {dh}x{dw}"), (conv.groups != 1,
                                 f"groups={conv.groups}"), (conv.in_channels > 32767, "Cin > 32767"),
                                 (kh > 255, "kernel > 255"),
                                 (getattr(conv, "padding_mode", "zeros") != "zeros",
                                  f"padding_mode={getattr(conv, 'padding_mode', None)!r}")) if bad]


def conv_variants(mods, conv) -> dict:
    """{variant: Variant} for a sparsekern SparseConv2d: SparseProp's two vectorisations, over the
    batch (``vectorizing_over_on=False``) and over output columns (True)."""
    from sparseprop.modules.utils import from_sparse_format_conv2d
    if conv.topology.block_size != 1:
        raise NotApplicable(f"BSR layout (block {conv.topology.block_size}): SparseProp stores unstructured "
                            "CSR only")
    (kh, kw), sh = conv.kernel_size, conv.stride[0]
    ph = conv.padding[0]
    why = conv_gaps(conv)
    if why:
        raise NotApplicable("SparseProp's conv has no " + ", ".join(why))
    w = conv.topology.to_dense().detach().reshape(conv.out_channels, conv.in_channels, kh, kw)
    mask = conv.topology.mask().reshape(w.shape)
    out = {}
    for name, over_on in (("over_batch", False), ("over_on", True)):
        bias = bias_param(conv)
        peer = mods.SparseConv2d(w, bias=bias, padding=ph, stride=sh, vectorizing_over_on=over_on)
        b0 = None if bias is None else bias.detach()
        out[name] = Variant(peer, w, mask, lambda xi, wi, b0=b0: F.conv2d(xi, wi, b0, stride=sh, padding=ph),
                            lambda v, peer=peer: from_sparse_format_conv2d(v, peer.W_idx, tuple(w.shape)))
    return out


def measure(variants_fn, layer, x, dy, reps: int) -> dict:
    """The result row's ``sparseprop`` entry: ``{"status", "reason", "ms", ...}``.

    Each variant is checked against dense first; one that fails is recorded in ``check`` and never
    timed. ``status``: "ok" (``ms`` per kind from the fastest checked variant, named in
    ``variant``), "not installed", "not applicable", "mismatch" (every variant failed) or
    "error" (it refused the shape); ``ms`` is None but for "ok"."""
    mods, reason = load()
    if mods is None:
        return {"status": "not installed" if reason == "not installed" else "error", "reason": reason,
                "ms": None}
    runtimes = match_threads(torch.get_num_threads())
    checks, good = {}, {}
    try:
        for name, v in variants_fn(mods, layer).items():
            try:
                checks[name] = v.check(x, dy)
                good[name] = v.layer
            except Mismatch as exc:
                checks[name] = {"mismatch": str(exc)}
    except NotApplicable as exc:
        return {"status": "not applicable", "reason": str(exc), "ms": None}
    except (RuntimeError, AssertionError, ValueError) as exc:        # a shape it refuses
        return {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                "ms": None, "check": checks}
    if not good:
        return {"status": "mismatch", "reason": "; ".join(f"{n}: {c['mismatch']}" for n, c in checks.items()),
                "ms": None, "check": checks}
    timed = {name: median_ms_each(timing_fns(peer, x, dy), reps) for name, peer in good.items()}
    ms, chosen = {}, {}
    for kind in ("fwd", "fwd+bwd"):
        ok = {n: t[kind] for n, t in timed.items() if t.get(kind) is not None}
        chosen[kind] = min(ok, key=ok.get) if ok else None
        ms[kind] = ok[chosen[kind]] if ok else None
    return {"status": "ok", "reason": None, "ms": ms, "variant": chosen, "variants_ms": timed, "check": checks,
            "threads": torch.get_num_threads(), "openmp_runtimes": runtimes}


def linear(lin, x, dy, reps: int) -> dict:
    """SparseProp's entry for a sparsekern SparseLinear on x [batch, in], dy [batch, out]."""
    return measure(linear_variants, lin, x, dy, reps)


def conv(layer, x, dy, reps: int) -> dict:
    """SparseProp's entry for a sparsekern SparseConv2d on x [N, Cin, H, W], dy [N, Cout, OH, OW]."""
    return measure(conv_variants, layer, x, dy, reps)
