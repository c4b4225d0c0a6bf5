// CPU launchers for sparsekern::conv2d, conv2d_dx and conv2d_dw (direct sparse
// convolution, CSR and BSR weights, fp32/fp64; bf16/fp16 natively on the im2col route,
// through fp32 copies on the direct kernels: reduced_precision.h). Each checks its inputs, builds
// the entry tables and padded buffers, and hands them to run_bands:
//   conv_geometry.h   the geometry and every size derived from it (checked)
//   conv_entries.h    per-plane entry tables (window offset, value index)
//   conv_buffers.h    the zero-padded, stride-phase-split buffers and copies
//   conv_schedule.h   the work split (run_bands) for every op
//   conv_nonfinite.h  exact terms for non-finite values (padding skipped)
//   conv_kernels.h    the band micro-kernels
// Small output planes take the im2col route instead (conv_im2col.h: the linear
// kernels over the unfolded image).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "../checks.h"
#include "conv_buffers.h"
#include "conv_entries.h"
#include "conv_geometry.h"
#include "conv_im2col.h"
#include "conv_nonfinite.h"
#include "conv_schedule.h"
#include "reduced_precision.h"

namespace sparsekern {
namespace cpu {
namespace {

void check_forward_indices(const ConvShape& s, const at::Tensor& row_offsets,
                           const at::Tensor& col_indices) {
  check_offsets_host(row_offsets, s.tv.nnz, "row_offsets");
  check_indices_below(col_indices, s.tv.cols, "col_indices");
}

at::Tensor conv2d_cpu(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& row_offsets,
                      const at::Tensor& col_indices, const at::Tensor& t_offsets,
                      const at::Tensor& t_indices, const at::Tensor& t_perm,
                      const c10::optional<at::Tensor>& bias, c10::IntArrayRef geometry) {
  const bool reduced = is_reduced(values) || is_reduced(x_in);
  if (reduced) {
    check_same_dtype(x_in, values, "x", "values");
    check_same_dtype(bias, values, "bias", "values");
  }
  check_act(x_in, values, "x");
  const auto s = check_conv(values, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry,
                            x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3));
  check_forward_indices(s, row_offsets, col_indices);
  check_bias(bias, values, s.Cout);
  if (s.N * s.Cout * s.OH * s.OW > 0 && use_im2col(ConvOp::kForward, s, values.numel()) &&
      at::isfinite(values).all().item<bool>())
    return conv2d_im2col(x_in, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, bias, s);
  if (reduced)  // the direct kernels compute in fp32
    return conv2d_cpu(to_fp32(x_in), to_fp32(values), row_offsets, col_indices, t_offsets, t_indices,
                      t_perm, to_fp32(bias), geometry)
        .to(values.scalar_type());
  at::Tensor y = at::empty({s.N, s.Cout, s.OH, s.OW}, x_in.options());
  if (y.numel() == 0) return y;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparsekern_conv2d_cpu", [&] {
    const Plan pl = make_plan<scalar_t>(s.OH, s.OW);
    const ShiftSpec sp = phase_spec(s, x_in, ConvVec<scalar_t>::W);
    const Entries e = forward_entries(s, row_offsets, col_indices, sp.Hs, sp.Ws);
    const std::vector<int64_t> bad = nonfinite_values<scalar_t>(values);
    const at::Tensor vals = bad.empty() ? values : zero_entries(values, bad);
    run_bands<scalar_t>(BandKind::kGather, pl, e, s.N, s.OH, s.OW, vals.data_ptr<scalar_t>(), sp,
                        b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                        nullptr, 0);
    if (!bad.empty()) add_forward_terms<scalar_t>(s, values, row_offsets, col_indices, bad, x_in, y);
  });
  return y;
}

at::Tensor conv2d_dx_cpu(const at::Tensor& dy_in, const at::Tensor& values,
                         const at::Tensor& row_offsets, const at::Tensor& col_indices,
                         const at::Tensor& t_offsets, const at::Tensor& t_indices,
                         const at::Tensor& t_perm, c10::IntArrayRef geometry,
                         c10::IntArrayRef input_size) {
  const bool reduced = is_reduced(values) || is_reduced(dy_in);
  if (reduced) check_same_dtype(dy_in, values, "dy", "values");
  TORCH_CHECK_VALUE(input_size.size() == 4, "input_size must be [N, C, H, W], got ", input_size);
  const auto s = check_conv(values, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry,
                            input_size[0], input_size[1], input_size[2], input_size[3]);
  check_dy(dy_in, values, s);
  const Geom& g = s.g;
  // Both paths write every element of dx.
  at::Tensor dx = s.tv.nnz > 0 ? at::empty({s.N, s.Cin, s.H, s.W}, dy_in.options())
                               : at::zeros({s.N, s.Cin, s.H, s.W}, dy_in.options());
  if (dx.numel() == 0 || s.tv.nnz == 0) return dx;
  if (use_im2col(ConvOp::kDX, s, values.numel())) {
    // spmm_t reads W's structure or W^T's, by batch: both are checked, so a bad
    // field is named whichever runs.
    check_forward_indices(s, row_offsets, col_indices);
    check_offsets_host(t_offsets, s.tv.nnz, "t_offsets");
    check_indices_below(t_indices, s.tv.rows, "t_indices");
    check_indices_below(t_perm, s.tv.nnz, "t_perm");
    return conv2d_dx_im2col(dy_in, values, row_offsets, col_indices, t_offsets, t_indices, t_perm, s);
  }
  if (reduced)  // the direct kernels compute in fp32
    return conv2d_dx_cpu(to_fp32(dy_in), to_fp32(values), row_offsets, col_indices, t_offsets,
                         t_indices, t_perm, geometry, input_size)
        .to(values.scalar_type());
  const at::Tensor dy = dy_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparsekern_conv2d_dx_cpu", [&] {
    const std::vector<int64_t> bad = nonfinite_values<scalar_t>(values);
    const at::Tensor vals = bad.empty() ? values : zero_entries(values, bad);
    if (g.sh == 1 && g.sw == 1) {
      // Gather: dX = full correlation of dy with the flipped kernel, over W^T.
      check_offsets_host(t_offsets, s.tv.nnz, "t_offsets");
      check_indices_below(t_indices, s.tv.rows, "t_indices");
      check_indices_below(t_perm, s.tv.nnz, "t_perm");
      const Plan pl = make_plan<scalar_t>(s.H, s.W);
      const ShiftSpec sp = dy_spec(s, dy, ConvVec<scalar_t>::W);
      const Entries e = transpose_entries(s, t_offsets, t_indices, t_perm, sp.Hs, sp.Ws);
      run_bands<scalar_t>(BandKind::kGather, pl, e, s.N, s.H, s.W, vals.data_ptr<scalar_t>(), sp,
                          nullptr, dx.data_ptr<scalar_t>(), nullptr, 0);
    } else {
      // Scatter (stride > 1): the adjoint of the forward gather into a phase
      // buffer of each image, then un-split into dx.
      check_forward_indices(s, row_offsets, col_indices);
      const Plan pl = make_plan<scalar_t>(s.OH, s.OW);
      const ShiftSpec sp = phase_spec(s, dx, ConvVec<scalar_t>::W);
      const Entries e = forward_entries(s, row_offsets, col_indices, sp.Hs, sp.Ws);
      run_bands<scalar_t>(BandKind::kScatter, pl, e, s.N, s.OH, s.OW, vals.data_ptr<scalar_t>(), sp,
                          nullptr, nullptr, dy.data_ptr<scalar_t>(), 0);
    }
    if (!bad.empty()) {
      check_forward_indices(s, row_offsets, col_indices);
      add_dx_terms<scalar_t>(s, values, row_offsets, col_indices, bad, dy, dx);
    }
  });
  return dx;
}

at::Tensor conv2d_dw_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                         const at::Tensor& row_offsets, const at::Tensor& col_indices,
                         const at::Tensor& t_offsets, const at::Tensor& t_indices,
                         const at::Tensor& t_perm, c10::IntArrayRef geometry, int64_t block_size) {
  const bool reduced = is_reduced(x_in) || is_reduced(dy_in);
  if (reduced) check_same_dtype(dy_in, x_in, "dy", "x");
  check_block_size(block_size, "block_size");
  TORCH_CHECK_VALUE(x_in.dim() == 4, "x must be 4-D [N, C, H, W], got shape ", x_in.sizes());
  check_int32_size(checked_mul(checked_mul(col_indices.numel(), block_size, "values size"),
                               block_size, "values size"),
                   "values");
  // A values-shaped placeholder lets check_topology see the layout.
  at::Tensor out = block_size == 1
                       ? at::zeros({col_indices.numel()}, x_in.options())
                       : at::zeros({col_indices.numel(), block_size, block_size}, x_in.options());
  check_act(x_in, out, "x");
  const auto s = check_conv(out, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry,
                            x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3));
  check_dy(dy_in, out, s);
  check_forward_indices(s, row_offsets, col_indices);
  if (out.numel() == 0 || s.N == 0) return out;
  if (use_im2col(ConvOp::kDW, s, out.numel()))
    return conv2d_dw_im2col(dy_in, x_in, row_offsets, col_indices, t_offsets, t_indices, t_perm,
                            block_size, s);
  if (reduced)  // the direct kernels compute in fp32
    return conv2d_dw_cpu(to_fp32(dy_in), to_fp32(x_in), row_offsets, col_indices, t_offsets,
                         t_indices, t_perm, geometry, block_size)
        .to(x_in.scalar_type());
  const at::Tensor dy = dy_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sparsekern_conv2d_dw_cpu", [&] {
    const Plan pl = make_plan<scalar_t>(s.OH, s.OW);
    const ShiftSpec sp = phase_spec(s, x_in, ConvVec<scalar_t>::W);
    const Entries e = forward_entries(s, row_offsets, col_indices, sp.Hs, sp.Ws);
    run_bands<scalar_t>(BandKind::kDW, pl, e, s.N, s.OH, s.OW, nullptr, sp, nullptr,
                        out.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), out.numel());
    // The kernel's window loads run past the valid rows and columns, where dy is
    // zero: a non-finite x element there makes a spurious NaN. A result with no
    // non-finite value had none (O(nnz) check); otherwise recompute with masked
    // loads, which read only the valid positions.
    if (!nonfinite_values<scalar_t>(out).empty()) {
      out.zero_();
      run_bands<scalar_t>(BandKind::kDWMasked, pl, e, s.N, s.OH, s.OW, nullptr, sp, nullptr,
                          out.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), out.numel());
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("conv2d", &sparsekern::cpu::conv2d_cpu);
  m.impl("conv2d_dx", &sparsekern::cpu::conv2d_dx_cpu);
  m.impl("conv2d_dw", &sparsekern::cpu::conv2d_dw_cpu);
}
