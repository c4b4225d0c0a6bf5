// Conv geometry for the CPU launchers: the op's `geometry` list, the input,
// weight and output shapes, and the checks that every size a launcher derives
// from them fits (int64 products never wrap; int32 kernel indices fit).
//
// The weight W is a topology over [Cout, Cin/groups * KH * KW] whose column
// c = (ci * KH + kh) * KW + kw, as in nn.Conv2d's weight.view(Cout, -1).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "../checks.h"

namespace sparsekern {
namespace cpu {

struct Geom {
  int64_t kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups;
};

inline Geom parse_geom(c10::IntArrayRef g) {
  TORCH_CHECK_VALUE(g.size() == 11,
                    "geometry must be [kh, kw, stride_h, stride_w, pad_top, pad_left, "
                    "pad_bottom, pad_right, dilation_h, dilation_w, groups], got ",
                    g.size(), " entries");
  Geom r{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10]};
  TORCH_CHECK_VALUE(r.kh >= 1 && r.kw >= 1, "kernel size must be >= 1, got ", r.kh, "x", r.kw);
  TORCH_CHECK_VALUE(r.sh >= 1 && r.sw >= 1, "stride must be >= 1, got ", r.sh, "x", r.sw);
  TORCH_CHECK_VALUE(r.dh >= 1 && r.dw >= 1, "dilation must be >= 1, got ", r.dh, "x", r.dw);
  TORCH_CHECK_VALUE(r.pt >= 0 && r.pl >= 0 && r.pb >= 0 && r.pr >= 0,
                    "padding must be >= 0, got (top, left, bottom, right) = (", r.pt, ", ", r.pl,
                    ", ", r.pb, ", ", r.pr, ")");
  TORCH_CHECK_VALUE(r.groups >= 1, "groups must be >= 1, got ", r.groups);
  return r;
}

// Everything a launch needs to know about the shapes, checked once.
struct ConvShape {
  Geom g;
  TopologyView tv;
  int64_t N, Cin, H, W, Cout, OH, OW, cin_g, cout_g, khkw;
  int64_t ext_h, ext_w;  // dilated kernel extent: (kh - 1) * dh, (kw - 1) * dw
};

// Checks the geometry against the topology and the input size [N, Cin, H, W].
// Every product that a launcher later forms from these sizes (buffer sizes,
// window offsets, value indices) is checked here or where the buffer is sized
// (conv_buffers.h), so no size wraps and no int32 index overflows.
inline ConvShape check_conv(const at::Tensor& values, const at::Tensor& row_offsets,
                            const at::Tensor& col_indices, const at::Tensor& t_offsets,
                            const at::Tensor& t_indices, const at::Tensor& t_perm,
                            c10::IntArrayRef geometry, int64_t N, int64_t Cin, int64_t H,
                            int64_t W) {
  ConvShape s;
  s.g = parse_geom(geometry);
  s.tv = check_topology(values, row_offsets, col_indices, t_offsets, t_indices, t_perm);
  TORCH_CHECK_VALUE(values.device().is_cpu(), "values must be a CPU tensor for the CPU kernel, got ",
                    values.device());
  const Geom& g = s.g;
  TORCH_CHECK_VALUE(N >= 0 && Cin >= 0 && H >= 0 && W >= 0,
                    "input size [N, C, H, W] must be non-negative, got [", N, ", ", Cin, ", ", H,
                    ", ", W, "]");
  s.N = N, s.Cin = Cin, s.H = H, s.W = W;
  s.Cout = checked_mul(s.tv.rows, s.tv.bs, "out_channels (rows * block size)");
  s.khkw = checked_mul(g.kh, g.kw, "kernel_h * kernel_w");
  TORCH_CHECK_VALUE(Cin % g.groups == 0, "input has ", Cin, " channels, not divisible by groups=",
                    g.groups);
  TORCH_CHECK_VALUE(s.Cout % g.groups == 0, "the weight has ", s.Cout,
                    " output channels, not divisible by groups=", g.groups);
  s.cin_g = Cin / g.groups, s.cout_g = s.Cout / g.groups;
  const int64_t wcols = checked_mul(s.tv.cols, s.tv.bs, "weight columns (cols * block size)");
  TORCH_CHECK_VALUE(wcols == checked_mul(s.cin_g, s.khkw, "in_channels/groups * kh * kw"),
                    "input has ", Cin, " channels but the weight has ", wcols,
                    " columns; expected in_channels/groups*kh*kw = ", s.cin_g, "*", g.kh, "*", g.kw,
                    " = ", s.cin_g * s.khkw);
  check_int32_size(values.numel(), "values");
  s.ext_h = checked_mul(g.kh - 1, g.dh, "dilation_h * (kernel_h - 1)");
  s.ext_w = checked_mul(g.kw - 1, g.dw, "dilation_w * (kernel_w - 1)");
  const int64_t ph = checked_add(checked_add(H, g.pt, "padded height"), g.pb, "padded height");
  const int64_t pw = checked_add(checked_add(W, g.pl, "padded width"), g.pr, "padded width");
  TORCH_CHECK_VALUE(ph >= s.ext_h + 1 && pw >= s.ext_w + 1, "padded input (", ph, "x", pw,
                    ") is smaller than the dilated kernel (", s.ext_h + 1, "x", s.ext_w + 1, ")");
  s.OH = (ph - s.ext_h - 1) / g.sh + 1;
  s.OW = (pw - s.ext_w - 1) / g.sw + 1;
  // The output and input tensors' element counts.
  checked_mul(checked_mul(checked_mul(N, s.Cout, "output size"), s.OH, "output size"), s.OW,
              "output size");
  checked_mul(checked_mul(checked_mul(N, Cin, "input size"), H, "input size"), W, "input size");
  return s;
}

inline void check_act(const at::Tensor& t, const at::Tensor& values, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but values have dtype ", values.scalar_type());
  TORCH_CHECK_VALUE(t.device() == values.device(), name, " is on ", t.device(),
                    " but values are on ", values.device());
}

inline void check_dy(const at::Tensor& dy, const at::Tensor& values, const ConvShape& s) {
  check_act(dy, values, "dy");
  TORCH_CHECK_VALUE(dy.size(0) == s.N && dy.size(1) == s.Cout && dy.size(2) == s.OH &&
                        dy.size(3) == s.OW,
                    "dy has shape ", dy.sizes(), ", expected the conv output shape [", s.N, ", ",
                    s.Cout, ", ", s.OH, ", ", s.OW, "]");
}

inline int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

}  // namespace cpu
}  // namespace sparsekern
