// Padded source buffers of the direct sparse conv (all on the CPU, dtype of
// the values), and the copies into and out of them.
//
//   phase buffer  [N][sh*sw][Cin][Hs][Ws] + slack, Hs = OH + (KH-1)*dh/sh,
//                 Ws >= OW + (KW-1)*dw/sw: the input, zero padded and split by
//                 stride phase, so that entry (ci, kh, kw) reads the contiguous
//                 window at ((phase*Cin + ci)*Hs + kh*dh/sh)*Ws + kw*dw/sw.
//                 The forward and dW read it; the stride > 1 dX scatters into
//                 one image of it and un-splits that (uncopy_image).
//   dy buffer     [N][Cout][H + (KH-1)*dh][>= W + (KW-1)*dw] + slack, for the
//                 stride-1 dX gather (a "full" correlation with the flipped kernel).
// Lanes past a row's valid columns read (or, scattering, add zero to) the next
// row; the slack of one band width after an image keeps them in bounds. A
// buffer that threads share is read only; every buffer written by a kernel
// (the scatter's) is one thread's own image with its own slack.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_geometry.h"
#include "conv_kernels.h"

namespace sparsekern {
namespace cpu {

// How one image of a source buffer is built from a 4-D tensor (any strides,
// NCHW or channels-last): dst[a*sw + b][c][i][j] = src[n][c][i*sh + a - off_t][j*sw + b - off_l],
// zero outside src. Hs x Ws planes, P = sh*sw phases of C channels. Build it
// with make_spec, which checks that one image fits int32 offsets.
struct ShiftSpec {
  at::Tensor src;
  int64_t sh, sw, off_t, off_l, Hs, Ws;
  int64_t img_elems;
  int64_t planes() const { return sh * sw * src.size(1); }
  int64_t img() const { return img_elems; }
};

inline ShiftSpec make_spec(const at::Tensor& src, int64_t sh, int64_t sw, int64_t off_t,
                           int64_t off_l, int64_t Hs, int64_t Ws) {
  const int64_t phases = checked_mul(sh, sw, "stride_h * stride_w");
  const int64_t planes = checked_mul(phases, src.size(1), "stride phases * channels");
  const int64_t img = checked_mul(checked_mul(planes, Hs, "padded image size"), Ws, "padded image size");
  check_int32_size(img, "one image of the conv's padded buffer");
  return ShiftSpec{src, sh, sw, off_t, off_l, Hs, Ws, img};
}

// Row width: at least `need`; rounded up to whole 64-byte lines (aligned rows)
// when that costs at most a quarter more memory.
inline int64_t row_width(int64_t need, int64_t vw) {
  const int64_t up = (need + vw - 1) / vw * vw;
  return up * 4 <= need * 5 ? up : need;
}

// The zero-padded, phase-split input the forward and dW kernels read (and
// the layout the stride > 1 dX scatters into, with src = dx).
inline ShiftSpec phase_spec(const ConvShape& s, const at::Tensor& x, int64_t vw) {
  const Geom& g = s.g;
  return make_spec(x, g.sh, g.sw, g.pt, g.pl, checked_add(s.OH, s.ext_h / g.sh, "padded height"),
                   row_width(checked_add(s.OW, s.ext_w / g.sw, "padded width"), vw));
}

// The zero-padded dy the stride-1 dX gather reads.
inline ShiftSpec dy_spec(const ConvShape& s, const at::Tensor& dy, int64_t vw) {
  const Geom& g = s.g;
  return make_spec(dy, 1, 1, s.ext_h - g.pt, s.ext_w - g.pl, checked_add(s.H, s.ext_h, "padded height"),
                   row_width(checked_add(s.W, s.ext_w, "padded width"), vw));
}

// Elements after the last image that stray lanes of a band may touch.
inline int64_t buffer_slack(int64_t tile_w, const ShiftSpec& sp) { return tile_w + sp.Ws; }

// Copies plane q of image n.
template <typename scalar_t>
void copy_plane(const ShiftSpec& sp, int64_t n, int64_t q, scalar_t* d) {
  using V = typename ConvVec<scalar_t>::V;
  const at::Tensor& src = sp.src;
  const int64_t C = src.size(1), H = src.size(2), W = src.size(3);
  const int64_t s2 = src.stride(2), s3 = src.stride(3);
  const int64_t ph = q / C, c = q % C, a = ph / sp.sw, b = ph % sp.sw;
  const int64_t sw = sp.sw, Ws = sp.Ws;
  const scalar_t* plane = src.data_ptr<scalar_t>() + n * src.stride(0) + c * src.stride(1);
  // columns j with 0 <= j*sw + b - off_l < W
  const int64_t jlo = std::min(Ws, std::max<int64_t>(0, -floordiv(b - sp.off_l, sw)));
  const int64_t jhi = std::max(jlo, std::min(Ws, floordiv(W - 1 - b + sp.off_l, sw) + 1));
  constexpr int VW = ConvVec<scalar_t>::W;
  for (int64_t i = 0; i < sp.Hs; ++i) {
    scalar_t* drow = d + i * Ws;
    const int64_t ih = i * sp.sh + a - sp.off_t;
    if (ih < 0 || ih >= H || jhi <= jlo) {
      std::fill(drow, drow + Ws, scalar_t(0));
      continue;
    }
    if (sw == 1 && s3 == 1) {
      // Whole vectors: masked loads read only columns [jlo, jhi) of the source
      // row (column j of drow is source column j - off_l), zeros elsewhere.
      const scalar_t* srow0 = plane + ih * s2;
      for (int64_t j0 = 0; j0 < Ws; j0 += VW) {
        const int lo = static_cast<int>(std::max<int64_t>(jlo - j0, 0));
        const int hi = static_cast<int>(std::min<int64_t>(jhi - j0, VW));
        V v = {};
        if (hi > lo) {
          // lanes [lo, hi) of the vector at source column j0 - off_l; point at
          // lane lo so that no address outside the row is formed.
          const scalar_t* q = srow0 + (j0 + lo - sp.off_l);
          v = lanes_up<scalar_t>(load_lanes<scalar_t>(q, 0, hi - lo), lo);
        }
        store_first<scalar_t>(drow + j0, v, static_cast<int>(std::min<int64_t>(VW, Ws - j0)));
      }
      continue;
    }
    std::fill(drow, drow + jlo, scalar_t(0));
    const scalar_t* srow = plane + ih * s2 + (jlo * sw + b - sp.off_l) * s3;
    for (int64_t j = jlo; j < jhi; ++j) drow[j] = srow[(j - jlo) * sw * s3];
    std::fill(drow + jhi, drow + Ws, scalar_t(0));
  }
}

// All images into dst [N][planes][Hs][Ws], split over threads by plane.
template <typename scalar_t>
void copy_all(const ShiftSpec& sp, scalar_t* dst) {
  const int64_t P = sp.planes(), plane = sp.Hs * sp.Ws;
  at::parallel_for(0, sp.src.size(0) * P, 4, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) copy_plane<scalar_t>(sp, q / P, q % P, dst + q * plane);
  });
}

// Image n into dst [planes][Hs][Ws]. A contiguous (NCHW) source is prefetched some channels ahead of the
// copy, which otherwise stalls on its loads from memory (40% of its perf
// samples on the masked load): ~1-2% off forward and dX at 3x3 256ch 14x14
// 95%, alternated call by call.
template <typename scalar_t>
void copy_image(const ShiftSpec& sp, int64_t n, scalar_t* dst) {
  constexpr int64_t kAhead = 16;
  const int64_t P = sp.planes(), C = sp.src.size(1);
  const bool prefetch = sp.src.is_contiguous();
  const int64_t chan_bytes = sp.src.stride(1) * static_cast<int64_t>(sizeof(scalar_t));
  const char* image = reinterpret_cast<const char*>(sp.src.data_ptr<scalar_t>() + n * sp.src.stride(0));
  for (int64_t q = 0; q < P; ++q) {
    if (prefetch && q + kAhead < P) {
      const char* a = image + ((q + kAhead) % C) * chan_bytes;
      for (int64_t l = 0; l < chan_bytes; l += 64) __builtin_prefetch(a + l, 0, 3);
    }
    copy_plane<scalar_t>(sp, n, q, dst + q * sp.Hs * sp.Ws);
  }
}

// The adjoint of copy_image for a contiguous src: src[n][c][ih][iw] =
// buf[phase][c][i][j] with ih = i*sh + a - off_t, iw = j*sw + b - off_l
// (every element of src[n] is written; positions outside the buffer get 0).
template <typename scalar_t>
void uncopy_image(const ShiftSpec& sp, int64_t n, const scalar_t* buf) {
  const int64_t C = sp.src.size(1), H = sp.src.size(2), W = sp.src.size(3);
  scalar_t* dst = sp.src.data_ptr<scalar_t>() + n * C * H * W;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t ih = 0; ih < H; ++ih) {
      const int64_t i = (ih + sp.off_t) / sp.sh, a = (ih + sp.off_t) % sp.sh;
      scalar_t* drow = dst + (c * H + ih) * W;
      if (i >= sp.Hs) {
        std::fill(drow, drow + W, scalar_t(0));
        continue;
      }
      for (int64_t iw = 0; iw < W; ++iw) {
        const int64_t j = (iw + sp.off_l) / sp.sw, b = (iw + sp.off_l) % sp.sw;
        drow[iw] = j >= sp.Ws ? scalar_t(0) : buf[(((a * sp.sw + b) * C + c) * sp.Hs + i) * sp.Ws + j];
      }
    }
}

}  // namespace cpu
}  // namespace sparsekern
