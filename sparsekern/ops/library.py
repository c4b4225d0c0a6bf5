"""``torch.library`` registration of the sparsekern ops.

Layer order (bottom up): kernel (csrc/) -> launcher (csrc/, checks inputs) ->
op (this file: schema, fake implementation, autograd) -> functional
(:mod:`sparsekern.ops.dispatch`) -> module (:mod:`sparsekern.nn`).

Ops (namespace ``sparsekern``), for a sparse weight W of shape [R*b, C*b]
(b = 1 for CSR), see :mod:`sparsekern.formats` for the topology tensors:

* ``spmm(x, values, <topology>, bias)``  -> y  [..., R*b] = x [..., C*b] . W^T + bias
* ``spmm_t(dy, values, <topology>)``     -> dx [..., C*b] = dy [..., R*b] . W
* ``sddmm(dy, x, <topology>, block_size)`` -> dW values-shaped: (dy^T x) at W's nonzeros,
  summed over all leading dims of dy [..., R*b] and x [..., C*b]
* ``conv2d(x, values, <topology>, bias, geometry)`` -> y [N, Cout, OH, OW], the
  cross-correlation of x [N, Cin, H, W] with W [Cout, Cin/groups*kh*kw] (+ bias)
* ``conv2d_dx(dy, values, <topology>, geometry, input_size)`` -> dx [N, Cin, H, W]
* ``conv2d_dw(dy, x, <topology>, geometry, block_size)`` -> dW values-shaped

``geometry`` is ``[kh, kw, stride_h, stride_w, pad_top, pad_left, pad_bottom,
pad_right, dilation_h, dilation_w, groups]`` (see :mod:`sparsekern.ops.conv`).

``<topology>`` is ``row_offsets, col_indices, t_offsets, t_indices, t_perm``.
Each op's backward uses only these three ops, so no dense weight-sized tensor
is ever created. Kernels: CPU (C++/OpenMP, float32/float64); CUDA (Triton,
float16/bfloat16/float32: the router :mod:`sparsekern.gpu.route`, which runs the
CUDA C++ or the Triton kernels) for spmm, spmm_t and sddmm, and the conv ops on CUDA
as im2col + those (:mod:`sparsekern.gpu.conv`).
"""
from __future__ import annotations

import torch

from sparsekern import _ext
from sparsekern.ops import autocast
from sparsekern.ops.backends import block_size_of  # noqa: F401  (also public here)

_TOPO = "Tensor row_offsets, Tensor col_indices, Tensor t_offsets, Tensor t_indices, Tensor t_perm"
SCHEMAS = {
    "spmm": f"spmm(Tensor x, Tensor values, {_TOPO}, Tensor? bias) -> Tensor",
    "spmm_t": f"spmm_t(Tensor dy, Tensor values, {_TOPO}) -> Tensor",
    "sddmm": f"sddmm(Tensor dy, Tensor x, {_TOPO}, int block_size) -> Tensor",
    "conv2d": f"conv2d(Tensor x, Tensor values, {_TOPO}, Tensor? bias, int[] geometry) -> Tensor",
    "conv2d_dx": f"conv2d_dx(Tensor dy, Tensor values, {_TOPO}, int[] geometry, int[] input_size) -> Tensor",
    "conv2d_dw": f"conv2d_dw(Tensor dy, Tensor x, {_TOPO}, int[] geometry, int block_size) -> Tensor",
}

_lib = torch.library.Library("sparsekern", "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

from sparsekern.ops import candidates, transpose  # noqa: E402,F401  (their schemas too, before the kernels register)

if not _ext.load():
    # Keep the ops callable for tracing; running them on CPU says how to build.
    def _not_built(name):
        def kernel(*args, **kwargs):
            _ext.raise_not_built(name)

        return kernel

    for _name in SCHEMAS:
        _lib.impl(_name, _not_built(_name), "CPU")


def _cuda_kernel(name):
    """CUDA implementation of op ``name``: the router (CUDA C++ or Triton), imported on first use."""
    def kernel(*args):
        from sparsekern.gpu import route
        return getattr(route, name)(*args)

    return kernel


def _cuda_conv(name):
    """CUDA implementation of conv op ``name``: im2col + the linear ops (sparsekern.gpu.conv)."""
    def kernel(*args):
        from sparsekern.gpu import conv
        return getattr(conv, name)(*args)

    return kernel


# Every op's CUDA implementation, also what sparsekern.gpu.interpret.cuda_path_on_cpu
# registers for CPU tensors (the GPU path under the Triton interpreter).
CUDA_IMPLS = {**{n: _cuda_kernel(n) for n in ("spmm", "spmm_t", "sddmm")},
              **{n: _cuda_conv(n) for n in ("conv2d", "conv2d_dx", "conv2d_dw")}}
for _name, _impl in CUDA_IMPLS.items():
    _lib.impl(_name, _impl, "CUDA")

autocast.register(_lib, SCHEMAS)

spmm = torch.ops.sparsekern.spmm.default
spmm_t = torch.ops.sparsekern.spmm_t.default
sddmm = torch.ops.sparsekern.sddmm.default
conv2d = torch.ops.sparsekern.conv2d.default
conv2d_dx = torch.ops.sparsekern.conv2d_dx.default
conv2d_dw = torch.ops.sparsekern.conv2d_dw.default


# ---------------------------------------------------------------- fake impls
@torch.library.register_fake("sparsekern::spmm")
def _spmm_fake(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias):
    return x.new_empty(*x.shape[:-1], (row_offsets.shape[0] - 1) * block_size_of(values))


@torch.library.register_fake("sparsekern::spmm_t")
def _spmm_t_fake(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm):
    return dy.new_empty(*dy.shape[:-1], (t_offsets.shape[0] - 1) * block_size_of(values))


@torch.library.register_fake("sparsekern::sddmm")
def _sddmm_fake(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, block_size):
    if block_size == 1:
        return x.new_empty(col_indices.shape[0])
    return x.new_empty(col_indices.shape[0], block_size, block_size)


def conv_output_hw(h, w, geometry):
    """(OH, OW) of a conv over an h x w input with the op's ``geometry`` list."""
    kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, _ = geometry
    return (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1


@torch.library.register_fake("sparsekern::conv2d")
def _conv2d_fake(x, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias, geometry):
    oh, ow = conv_output_hw(x.shape[2], x.shape[3], geometry)
    return x.new_empty(x.shape[0], (row_offsets.shape[0] - 1) * block_size_of(values), oh, ow)


@torch.library.register_fake("sparsekern::conv2d_dx")
def _conv2d_dx_fake(dy, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry,
                    input_size):
    return dy.new_empty(*input_size)


@torch.library.register_fake("sparsekern::conv2d_dw")
def _conv2d_dw_fake(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry, block_size):
    return _sddmm_fake(dy, x, row_offsets, col_indices, t_offsets, t_indices, t_perm, block_size)


# ------------------------------------------------------------------ autograd
def _save_all(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    # Only spmm has a trailing Tensor? bias; sddmm's 8th input is an int.
    ctx.has_bias = len(inputs) == 8 and isinstance(inputs[-1], torch.Tensor)


def _spmm_backward(ctx, dy):
    if ctx.has_bias:
        x, values, *topo, _bias = ctx.saved_tensors
    else:
        x, values, *topo = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx = spmm_t(dy, values, *topo) if need[0] else None
    dv = sddmm(dy, x, *topo, block_size_of(values)) if need[1] else None
    db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and need[7] else None
    return (dx, dv, None, None, None, None, None, db)


def _spmm_t_backward(ctx, g):
    dy, values, *topo = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_dy = spmm(g, values, *topo, None) if need[0] else None
    dv = sddmm(dy, g, *topo, block_size_of(values)) if need[1] else None
    return (d_dy, dv, None, None, None, None, None)


def _sddmm_backward(ctx, g):
    dy, x, *topo = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = g.contiguous()
    d_dy = spmm(x, g, *topo, None) if need[0] else None
    dx = spmm_t(dy, g, *topo) if need[1] else None
    return (d_dy, dx, None, None, None, None, None, None)


torch.library.register_autograd("sparsekern::spmm", _spmm_backward, setup_context=_save_all)
torch.library.register_autograd("sparsekern::spmm_t", _spmm_t_backward, setup_context=_save_all)
torch.library.register_autograd("sparsekern::sddmm", _sddmm_backward, setup_context=_save_all)


# Conv: the same three-op closure. conv2d is linear in x and in values, so
# dX is conv2d_dx (W^T), dW is conv2d_dw, and their own backwards are conv2d again.
def _conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.has_bias = inputs[7] is not None
    ctx.extra = inputs[8]


def _conv2d_backward(ctx, dy):
    x, values, *topo = ctx.saved_tensors
    geometry, need = ctx.extra, ctx.needs_input_grad
    dy = dy.contiguous()
    dx = conv2d_dx(dy, values, *topo, geometry, list(x.shape)) if need[0] else None
    dv = conv2d_dw(dy, x, *topo, geometry, block_size_of(values)) if need[1] else None
    db = dy.sum((0, 2, 3)) if ctx.has_bias and need[7] else None
    return (dx, dv, None, None, None, None, None, db, None)


def _conv_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.geometry = inputs[7]


def _conv2d_dx_backward(ctx, g):
    dy, values, *topo = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = g.contiguous()
    d_dy = conv2d(g, values, *topo, None, ctx.geometry) if need[0] else None
    dv = conv2d_dw(dy, g, *topo, ctx.geometry, block_size_of(values)) if need[1] else None
    return (d_dy, dv, None, None, None, None, None, None, None)


def _conv2d_dw_backward(ctx, g):
    dy, x, *topo = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = g.contiguous()
    d_dy = conv2d(x, g, *topo, None, ctx.geometry) if need[0] else None
    dx = conv2d_dx(dy, g, *topo, ctx.geometry, list(x.shape)) if need[1] else None
    return (d_dy, dx, None, None, None, None, None, None, None)


torch.library.register_autograd("sparsekern::conv2d", _conv2d_backward, setup_context=_conv_setup)
torch.library.register_autograd("sparsekern::conv2d_dx", _conv2d_dx_backward, setup_context=_conv_grad_setup)
torch.library.register_autograd("sparsekern::conv2d_dw", _conv2d_dw_backward, setup_context=_conv_grad_setup)
