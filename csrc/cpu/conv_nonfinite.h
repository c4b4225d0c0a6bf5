// Non-finite weight values (Inf, NaN) in the direct sparse conv.
//
// The band kernels multiply every value with whole windows of a zero-padded
// buffer, padding included; nn.Conv2d's kernels skip padding. An Inf value
// times a padding zero would be NaN where F.conv2d is finite, so the forward
// and dX launchers run the kernels with such values zeroed and then add each
// one's exact contribution over the in-bounds positions only (a scalar loop
// over the few non-finite values; finite weights never take this path). dW
// checks its result instead (sparse_conv_cpu.cpp): only a non-finite result
// can hold a spurious NaN, and then it is recomputed with masked loads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "conv_geometry.h"

namespace sparsekern {
namespace cpu {

// One weight element: output channel, input channel (of the whole input) and kernel tap.
struct WeightElem {
  int64_t co, ci, kh, kw;
};

// The flat indices of the non-finite elements of t (contiguous), empty after
// one vectorised pass when all are finite.
template <typename scalar_t>
std::vector<int64_t> nonfinite_values(const at::Tensor& t) {
  const scalar_t* v = t.data_ptr<scalar_t>();
  const int64_t n = t.numel();
  scalar_t test = 0;
#pragma omp simd reduction(+ : test)
  for (int64_t i = 0; i < n; ++i) test += v[i] * scalar_t(0);
  std::vector<int64_t> out;
  if (test == scalar_t(0)) return out;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(v[i])) out.push_back(i);
  return out;
}

// The element of flat value index v (row_offsets and col_indices validated).
inline WeightElem weight_elem(const ConvShape& s, const at::Tensor& row_offsets,
                              const at::Tensor& col_indices, int64_t v) {
  const int32_t* ro = row_offsets.data_ptr<int32_t>();
  const int32_t* ci = col_indices.data_ptr<int32_t>();
  const int64_t bs = s.tv.bs, blk = v / (bs * bs), rem = v % (bs * bs);
  const int64_t R = std::upper_bound(ro, ro + s.tv.rows + 1, static_cast<int32_t>(blk)) - ro - 1;
  const int64_t co = R * bs + rem / bs, col = static_cast<int64_t>(ci[blk]) * bs + rem % bs;
  const int64_t k = col % s.khkw;
  return {co, (co / s.cout_g) * s.cin_g + col / s.khkw, k / s.g.kw, k % s.g.kw};
}

// values with the listed entries set to zero (a copy; values itself is kept).
inline at::Tensor zero_entries(const at::Tensor& values, const std::vector<int64_t>& idx) {
  at::Tensor v = values.clone();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "sparsekern_zero_entries", [&] {
    scalar_t* p = v.data_ptr<scalar_t>();
    for (int64_t i : idx) p[i] = scalar_t(0);
  });
  return v;
}

// Calls f(n, oh, ow, ih, iw) for every output position whose tap (kh, kw)
// reads an in-bounds input position (ih, iw), image by image in parallel.
template <typename F>
void for_valid_taps(const ConvShape& s, const WeightElem& el, F&& f) {
  const Geom& g = s.g;
  at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        const int64_t ih = oh * g.sh - g.pt + el.kh * g.dh;
        if (ih < 0 || ih >= s.H) continue;
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          const int64_t iw = ow * g.sw - g.pl + el.kw * g.dw;
          if (iw >= 0 && iw < s.W) f(n, oh, ow, ih, iw);
        }
      }
  });
}

// y [N, Cout, OH, OW] += the listed values' terms, in-bounds taps only.
template <typename scalar_t>
void add_forward_terms(const ConvShape& s, const at::Tensor& values, const at::Tensor& row_offsets,
                       const at::Tensor& col_indices, const std::vector<int64_t>& idx,
                       const at::Tensor& x, at::Tensor& y) {
  const scalar_t* v = values.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* yp = y.data_ptr<scalar_t>();
  const auto xs = x.strides();
  for (int64_t i : idx) {
    const WeightElem el = weight_elem(s, row_offsets, col_indices, i);
    const scalar_t w = v[i];
    for_valid_taps(s, el, [&](int64_t n, int64_t oh, int64_t ow, int64_t ih, int64_t iw) {
      yp[((n * s.Cout + el.co) * s.OH + oh) * s.OW + ow] +=
          w * xp[n * xs[0] + el.ci * xs[1] + ih * xs[2] + iw * xs[3]];
    });
  }
}

// dx [N, Cin, H, W] += the listed values' terms, in-bounds taps only (dy contiguous).
template <typename scalar_t>
void add_dx_terms(const ConvShape& s, const at::Tensor& values, const at::Tensor& row_offsets,
                  const at::Tensor& col_indices, const std::vector<int64_t>& idx,
                  const at::Tensor& dy, at::Tensor& dx) {
  const scalar_t* v = values.data_ptr<scalar_t>();
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  for (int64_t i : idx) {
    const WeightElem el = weight_elem(s, row_offsets, col_indices, i);
    const scalar_t w = v[i];
    for_valid_taps(s, el, [&](int64_t n, int64_t oh, int64_t ow, int64_t ih, int64_t iw) {
      dxp[((n * s.Cin + el.ci) * s.H + ih) * s.W + iw] +=
          w * dyp[((n * s.Cout + el.co) * s.OH + oh) * s.OW + ow];
    });
  }
}

}  // namespace cpu
}  // namespace sparsekern
