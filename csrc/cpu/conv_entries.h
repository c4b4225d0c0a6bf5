// Entry tables of the direct sparse conv: for every output plane, the weight
// elements that feed it, each as the int32 offset of its window in a padded
// source buffer (conv_buffers.h) and the int32 index of its value. Offsets stay
// below one padded image (< 2^31, checked where the buffer is sized) and value
// indices below values.numel() (< 2^31, checked by check_conv).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_geometry.h"

namespace sparsekern {
namespace cpu {

// The weight elements feeding each output plane p: [rowptr[p], rowptr[p+1]),
// each with the int32 offset of its window in the source image buffer and the
// index of its value. 8 bytes per element: the table streams past every image,
// and with int64 fields it took as much of the L2 as the image itself.
struct Entries {
  std::vector<int64_t> rowptr;
  std::vector<int32_t> eoff, vidx;
  int64_t planes() const { return static_cast<int64_t>(rowptr.size()) - 1; }
};


// enumerate(p, f) calls f(offset, value index) once per weight element of
// plane p, the same elements in the same order on every call. It runs twice
// per plane, in parallel over planes: to count, then to fill; finish(j0, j1)
// may then reorder a plane's entries.
template <typename Enumerate, typename Finish>
inline Entries build_entries(int64_t planes, Enumerate&& enumerate, Finish&& finish) {
  Entries e;
  e.rowptr.assign(planes + 1, 0);
  at::parallel_for(0, planes, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t n = 0;
      enumerate(p, [&](int64_t, int64_t) { ++n; });
      e.rowptr[p + 1] = n;
    }
  });
  for (int64_t p = 0; p < planes; ++p) e.rowptr[p + 1] += e.rowptr[p];
  e.eoff.resize(e.rowptr.back());
  e.vidx.resize(e.rowptr.back());
  at::parallel_for(0, planes, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t j = e.rowptr[p];
      const int64_t end = e.rowptr[p + 1];
      enumerate(p, [&](int64_t off, int64_t v) {
        if (j < end) e.eoff[j] = static_cast<int32_t>(off), e.vidx[j] = static_cast<int32_t>(v);
        ++j;
      });
      TORCH_INTERNAL_ASSERT(j == end, "conv entries: plane ", p, " enumerated ", j - e.rowptr[p],
                            " elements, counted ", end - e.rowptr[p]);
      finish(e, e.rowptr[p], end);
    }
  });
  return e;
}

// Entries of W's element rows (Cout planes): the window of element
// (co, ci, kh, kw) in the phase buffer, and its index into the flat values.
inline Entries forward_entries(const ConvShape& s, const at::Tensor& row_offsets,
                        const at::Tensor& col_indices, int64_t Hs, int64_t Ws) {
  const Geom& g = s.g;
  const int64_t bs = s.tv.bs;
  const int32_t* ro = row_offsets.data_ptr<int32_t>();
  const int32_t* ci = col_indices.data_ptr<int32_t>();
  // Window offset of each weight column (ci, kh, kw) for group 0; group grp
  // reads the planes grp * cin_g further on.
  std::vector<int64_t> col_off(s.cin_g * s.khkw);
  for (int64_t col = 0; col < s.cin_g * s.khkw; ++col) {
    const int64_t cin = col / s.khkw, k = col % s.khkw;
    const int64_t ah = (k / g.kw) * g.dh, aw = (k % g.kw) * g.dw;
    const int64_t phase = (ah % g.sh) * g.sw + aw % g.sw;
    col_off[col] = ((phase * s.Cin + cin) * Hs + ah / g.sh) * Ws + aw / g.sw;
  }
  const int64_t grp_off = s.cin_g * Hs * Ws;
  return build_entries(
      s.Cout,
      [&](int64_t co, auto&& f) {
        const int64_t R = co / bs, r = co % bs, base = (co / s.cout_g) * grp_off;
        for (int64_t blk = ro[R]; blk < ro[R + 1]; ++blk) {
          const int64_t* cols = col_off.data() + static_cast<int64_t>(ci[blk]) * bs;
          for (int64_t c = 0; c < bs; ++c) f(cols[c] + base, (blk * bs + r) * bs + c);
        }
      },
      [](Entries&, int64_t, int64_t) {});
}

// Entries of dX's planes (Cin of them) read from W^T's metadata (t_offsets,
// t_indices, t_perm into the same values); the offsets point into the padded
// dy buffer [N][Cout][Hs][Ws]. Each plane's entries are sorted by offset, so
// the kernel visits each dy plane once with all its shifts in a row, as the
// forward does with x (dX at 80% sparsity, 3x3 256ch 14x14, batch 32, 2 threads:
// 20.2 -> 17.6 ms).
inline Entries transpose_entries(const ConvShape& s, const at::Tensor& t_offsets,
                          const at::Tensor& t_indices, const at::Tensor& t_perm, int64_t Hs,
                          int64_t Ws) {
  const Geom& g = s.g;
  const int64_t bs = s.tv.bs;
  const int32_t* to = t_offsets.data_ptr<int32_t>();
  const int32_t* ti = t_indices.data_ptr<int32_t>();
  const int32_t* tp = t_perm.data_ptr<int32_t>();
  // Only when a block row holds channels of two groups does the search range
  // need a per-channel check.
  const bool straddle = s.cout_g % bs != 0;
  return build_entries(
      s.Cin,
      [&](int64_t plane, auto&& f) {
        // plane = group * cin_g + ci; its columns are ci * khkw + kk of every
        // group, and only rows (co) of its own group feed it.
        const int64_t grp = plane / s.cin_g, cil = plane % s.cin_g;
        for (int64_t kk = 0; kk < s.khkw; ++kk) {
          const int64_t k = cil * s.khkw + kk, cb = k / bs, i = k % bs;
          const int64_t shift = (g.kh - 1 - kk / g.kw) * g.dh * Ws + (g.kw - 1 - kk % g.kw) * g.dw;
          // W^T's column cb lists its rows in order: only the block rows that
          // hold this group's output channels are visited.
          const int32_t* j0 = std::lower_bound(ti + to[cb], ti + to[cb + 1],
                                               static_cast<int32_t>(grp * s.cout_g / bs));
          const int32_t* j1 = std::lower_bound(
              j0, ti + to[cb + 1], static_cast<int32_t>(((grp + 1) * s.cout_g + bs - 1) / bs));
          for (int64_t jj = j0 - ti; jj < j1 - ti; ++jj)
            for (int64_t r = 0; r < bs; ++r) {
              const int64_t co = static_cast<int64_t>(ti[jj]) * bs + r;
              if (straddle && co / s.cout_g != grp) continue;
              f(co * Hs * Ws + shift, (static_cast<int64_t>(tp[jj]) * bs + r) * bs + i);
            }
        }
      },
      [](Entries& e, int64_t j0, int64_t j1) {
        // Both fields are non-negative int32: one 64-bit key sorts the pairs.
        std::vector<uint64_t> key(j1 - j0);
        for (int64_t j = j0; j < j1; ++j)
          key[j - j0] = (static_cast<uint64_t>(e.eoff[j]) << 32) | static_cast<uint32_t>(e.vidx[j]);
        std::sort(key.begin(), key.end());
        for (int64_t j = j0; j < j1; ++j) {
          e.eoff[j] = static_cast<int32_t>(key[j - j0] >> 32);
          e.vidx[j] = static_cast<int32_t>(key[j - j0] & 0xffffffffu);
        }
      });
}

}  // namespace cpu
}  // namespace sparsekern
