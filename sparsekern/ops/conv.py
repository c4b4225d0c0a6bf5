"""Functional ``sparse_conv2d``: a 2-D convolution whose weight is a CSR/BSR topology.

The weight W is stored as a topology of shape ``[Cout, Cin/groups * kh * kw]``
whose column ``(ci * kh + i) * kw + j`` is ``nn.Conv2d``'s ``weight[:, ci, i, j]``,
so ``W.to_dense().view(Cout, Cin // groups, kh, kw)`` is the dense conv weight.

Which path runs where (see :mod:`sparsekern.ops.backends` for the backends):

=============  ========  =============================================================
backend        device    implementation
=============  ========  =============================================================
``cpu``        CPU       C++/OpenMP, two routes chosen per op (csrc/cpu/conv_im2col.h):
                         direct sparse convolution (each nonzero one broadcast-FMA
                         over a shifted window of the zero-padded input; dX reads
                         W^T's metadata, dW is per-nonzero) for large planes, and
                         for small planes (up to 8x8, or 16x16 at high density*Cout)
                         the image unfolded by strided views and the linear kernels
                         (``SPARSEKERN_CPU_CONV_ROUTE=direct|im2col`` forces one)
``cuda_cpp``   CUDA      im2col (``F.unfold``) + the linear ops (:mod:`sparsekern.gpu.conv`),
``triton``     CUDA      on whichever GPU kernels run the linear ops
``reference``  any       ``F.unfold`` + gather/index_add of the nonzeros (tests)
=============  ========  =============================================================
"""
from __future__ import annotations

import torch

from sparsekern._checks import check_int, check_pair as _pair
from sparsekern.ops.autocast import autocast_dtype, run_dtype
from sparsekern.ops.backends import select_backend
from sparsekern.ops.dispatch import as_operand


def conv_geometry(kernel_size, stride=1, padding=0, dilation=1, groups=1) -> list[int]:
    """The ops' geometry list ``[kh, kw, sh, sw, pad_top, pad_left, pad_bottom, pad_right, dh, dw, groups]``.

    ``padding`` is an int, a pair, ``"valid"`` or ``"same"`` (stride 1 only;
    an even total pad puts the extra row/column at the bottom/right, as
    ``nn.Conv2d`` does). ``kernel_size``, ``stride`` and ``dilation`` (ints or
    pairs) must be >= 1, ``padding`` >= 0 and ``groups`` >= 1; a ``ValueError``
    names the first that is not.
    """
    kh, kw = _pair(kernel_size, "kernel_size", minimum=1)
    sh, sw = _pair(stride, "stride", minimum=1)
    dh, dw = _pair(dilation, "dilation", minimum=1)
    groups = check_int(groups, "groups", minimum=1)
    if isinstance(padding, str):
        if padding == "valid":
            pt = pl = pb = pr = 0
        elif padding == "same":
            if (sh, sw) != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pt, pl = th // 2, tw // 2
            pb, pr = th - pt, tw - pl
        else:
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair, got {padding!r}")
    else:
        ph, pw = _pair(padding, "padding", minimum=0)
        pt, pl, pb, pr = ph, pw, ph, pw
    return [kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups]


def sparse_conv2d(x: torch.Tensor, weight, geometry: list[int], bias: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Cross-correlation of x with a sparse weight, computed on the nonzeros only.

    Args:
        x: float [N, Cin, H, W] (or unbatched [Cin, H, W]), NCHW or channels-last,
            same dtype and device as ``weight.values`` (under ``torch.autocast`` any
            floating dtype: the op runs in autocast's dtype).
        weight: a ``CSRTopology``/``BSRTopology`` of shape [Cout, Cin/groups * kh * kw] (or a
            ``SparseConv2d``'s ``weight`` view).
        geometry: from :func:`conv_geometry` (kernel, stride, padding, dilation, groups).
        bias: optional float [Cout].
        backend: "auto", "cpu", "cuda" or "reference".

    Returns:
        float [N, Cout, OH, OW] (unbatched in, unbatched out), in x's memory
        format (channels-last in, channels-last out).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    weight = as_operand(weight)
    values = weight.values
    cout, k_cols = weight.shape
    if len(geometry) != 11:
        raise ValueError(f"geometry must come from conv_geometry (11 ints), got {geometry!r}")
    kh, kw, groups = geometry[0], geometry[1], geometry[10]
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    cin = x.shape[1]
    if cin % groups or cin // groups * kh * kw != k_cols:
        raise ValueError(f"x has {cin} channels; this conv expects in_channels = "
                         f"{k_cols // (kh * kw) * groups} (groups={groups}, kernel {kh}x{kw})")
    dtype = run_dtype(x, values)
    if x.device != values.device:
        raise ValueError(f"x is on {x.device} but the weight is on {values.device}")
    from sparsekern.ops.library import conv_output_hw
    oh, ow = conv_output_hw(x.shape[2], x.shape[3], geometry)
    if oh < 1 or ow < 1:
        raise ValueError(f"input {tuple(x.shape[2:])} is smaller than the (dilated, padded) kernel: "
                         f"output would be {oh}x{ow}")
    if bias is not None and (bias.shape != (cout,) or (bias.dtype != values.dtype
                                                      and autocast_dtype(x.device) is None)):
        raise ValueError(f"bias must be [{cout}] of dtype {values.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous()
    be = select_backend(x, values, backend, kind="conv", dtype=dtype)
    y = be.ops.conv2d(x, values, *weight.topology(), bias, list(geometry))
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.squeeze(0) if unbatched else y
