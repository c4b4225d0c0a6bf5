// The im2col route of the CPU conv ops: small output planes run through the
// linear kernels (linear_ops.h) instead of the direct band kernels.
//
// The direct kernels vectorise along an output row and cut each plane into
// register bands; a plane of a few pixels (the 2x2 to 8x8 stages of VGG and of
// CIFAR ResNets) leaves most vector lanes idle and pays the band set-up per
// nonzero. Unfolding the image into rows [N*OH*OW, Cin*kh*kw] (one copy, the
// columns in the topology's (ci, i, j) order) turns each op into the batched
// linear kernel, vectorised over N*OH*OW:
//   forward  y  = rows . W^T (spmm), back to NCHW;
//   dX       dx = col2im(dy_rows . W) (spmm_t), cropped to the input;
//   dW       the SDDMM of dy_rows and rows.
// Only the image is unfolded (kh*kw times the input, activation-sized); the
// weight stays sparse. Measured on AMD EPYC (Zen 3, AVX2), 2 threads, 3x3
// convs, direct time / im2col time (DEVELOPERS.md, "Small planes"):
//   forward: 2x2 8.3x, 4x4 2.2x, 7x7 1.6x; 8x8 at density*Cout = 13: 0.8x,
//            at 51-256: 3-8x; 14x14 at 26: 1.1x, at 128: 3.6x; 16x16 at 32: 1.2x;
//            32x32 at 6: 0.4x;
//   dX:      up to 8x8: 1.6-12x; 14x14 at 26: 1.3-1.4x; 16x16 at 6: 0.4x, at 32: 1.7x;
//   dW:      2x2 1.7x, 4x4 0.8x, 8x8 0.6-1.2x, 14x14 0.2-0.5x.
// The thresholds below follow; a larger plane at a low density*Cout stays direct.
//
// Non-finite values: the unfolded rows hold the padding as zeros, so a
// non-finite weight would meet a padding zero in the forward and make a NaN
// that nn.Conv2d (which skips padding) and the direct path never form: the
// forward takes this route only when every value is finite. dX multiplies no
// padding (its rows are real outputs; col2im drops what lands on the padding),
// and dW multiplies x's padding only by dy, as the direct kernels and
// F.conv2d's own dW do (a non-finite dy gives the same NaNs on both routes; an
// Inf in x meets only real dy terms): both are exact as they are.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "conv_geometry.h"
#include "linear_ops.h"

namespace sparsekern {
namespace cpu {

enum class ConvOp { kForward, kDX, kDW };

// SPARSEKERN_CPU_CONV_ROUTE=direct|im2col forces a route (tests run both on
// every shape); unset or "auto" chooses by the plane size.
inline int forced_conv_route() {
  const char* e = std::getenv("SPARSEKERN_CPU_CONV_ROUTE");
  if (e == nullptr || *e == 0 || std::strcmp(e, "auto") == 0) return 0;
  if (std::strcmp(e, "direct") == 0) return 1;
  if (std::strcmp(e, "im2col") == 0) return 2;
  TORCH_CHECK_VALUE(false, "SPARSEKERN_CPU_CONV_ROUTE must be auto, direct or im2col, got '", e, "'");
  return 0;
}

// Whether `op` on this geometry takes the im2col route: groups 1 only (the
// linear kernels see one block of columns), and a stride within the padded
// input (a larger one is degenerate, and the direct path's size checks refuse
// the extreme ones with the same message whatever the plane). `nnz` counts
// weight elements; nnz / (Cin*kh*kw) = density * Cout is how many FMAs each
// unfolded element feeds, which is what pays for the unfold copy.
inline bool use_im2col(ConvOp op, const ConvShape& s, int64_t nnz) {
  if (s.g.groups != 1 || s.g.sh > s.H + s.g.pt + s.g.pb || s.g.sw > s.W + s.g.pl + s.g.pr) return false;
  const int forced = forced_conv_route();
  if (forced != 0) return forced == 2;
  const int64_t plane = s.OH * s.OW;
  const double per_col = static_cast<double>(nnz) / static_cast<double>(std::max<int64_t>(1, s.Cin * s.khkw));
  switch (op) {
    // measured on AVX2 (DEVELOPERS.md, "Small planes"): the unfold pays for itself below
    // an 8x8 plane always, at 8x8 from r = 16 (forward) / 12 (dX), up to 16x16 from r = 32 / 40
    case ConvOp::kForward: return plane < 64 || (plane <= 64 && per_col >= 16) || (plane <= 256 && per_col >= 32);
    case ConvOp::kDX: return plane < 64 || (plane <= 64 && per_col >= 12) || (plane <= 256 && per_col >= 40);
    case ConvOp::kDW: return plane < 16;
  }
  return false;
}

// x [N, Cin, H, W] -> rows [N*OH*OW, Cin*kh*kw], contiguous.
inline at::Tensor im2col_rows(const at::Tensor& x, const ConvShape& s) {
  const Geom& g = s.g;
  const at::Tensor xp = at::constant_pad_nd(x, {g.pl, g.pr, g.pt, g.pb}, 0);
  at::Tensor v = xp.unfold(2, s.ext_h + 1, g.sh).unfold(3, s.ext_w + 1, g.sw);  // [N, C, OH, OW, eh, ew]
  v = v.slice(4, 0, s.ext_h + 1, g.dh).slice(5, 0, s.ext_w + 1, g.dw);         // [N, C, OH, OW, kh, kw]
  return v.permute({0, 2, 3, 1, 4, 5}).reshape({s.N * s.OH * s.OW, s.Cin * g.kh * g.kw});
}

// dy [N, Cout, OH, OW] -> rows [N*OH*OW, Cout], contiguous.
inline at::Tensor dy_rows(const at::Tensor& dy, const ConvShape& s) {
  return dy.permute({0, 2, 3, 1}).reshape({s.N * s.OH * s.OW, s.Cout}).contiguous();
}

inline at::Tensor conv2d_im2col(const at::Tensor& x, const at::Tensor& values, const at::Tensor& ro,
                                const at::Tensor& ci, const at::Tensor& to, const at::Tensor& ti,
                                const at::Tensor& tp, const c10::optional<at::Tensor>& bias,
                                const ConvShape& s) {
  const at::Tensor y = spmm_cpu(im2col_rows(x, s), values, ro, ci, to, ti, tp, bias);  // [N*L, Cout]
  return y.view({s.N, s.OH, s.OW, s.Cout}).permute({0, 3, 1, 2}).contiguous();
}

inline at::Tensor conv2d_dx_im2col(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& ro,
                                   const at::Tensor& ci, const at::Tensor& to, const at::Tensor& ti,
                                   const at::Tensor& tp, const ConvShape& s) {
  const Geom& g = s.g;
  const at::Tensor dcols = spmm_t_cpu(dy_rows(dy, s), values, ro, ci, to, ti, tp);  // [N*L, K]
  const at::Tensor dxp =
      at::col2im(dcols.view({s.N, s.OH * s.OW, dcols.size(1)}).transpose(1, 2),
                 {s.H + g.pt + g.pb, s.W + g.pl + g.pr}, {g.kh, g.kw}, {g.dh, g.dw}, {0, 0}, {g.sh, g.sw});
  return dxp.slice(2, g.pt, g.pt + s.H).slice(3, g.pl, g.pl + s.W).contiguous();
}

inline at::Tensor conv2d_dw_im2col(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& ro,
                                   const at::Tensor& ci, const at::Tensor& to, const at::Tensor& ti,
                                   const at::Tensor& tp, int64_t block_size, const ConvShape& s) {
  return sddmm_cpu(dy_rows(dy, s), im2col_rows(x, s), ro, ci, to, ti, tp, block_size);
}

}  // namespace cpu
}  // namespace sparsekern
