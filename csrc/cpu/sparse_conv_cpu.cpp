// CPU launchers for sparsekern::conv2d, conv2d_dx and conv2d_dw (direct sparse
// convolution, CSR and BSR weights, fp32/fp64; kernels in conv_kernels.h).
//
// The weight W is a topology over [Cout, Cin/groups * KH * KW] whose column
// c = (ci * KH + kh) * KW + kw, as in nn.Conv2d's weight.view(Cout, -1).
//
// Buffers (all on the CPU, dtype of values), see ShiftSpec:
//   phase buffer  [N][sh*sw][Cin][Hs][Ws] + slack, Hs = OH + (KH-1)*dh/sh,
//                 Ws >= OW + (KW-1)*dw/sw: the input, zero padded and split by
//                 stride phase, so that entry (ci, kh, kw) reads the contiguous
//                 window at ((phase*Cin + ci)*Hs + kh*dh/sh)*Ws + kw*dw/sw.
//   dy buffer     [N][Cout][H + (KH-1)*dh][>= W + (KW-1)*dw] + slack, for the
//                 stride-1 dX gather (a "full" correlation with the flipped kernel).
// Lanes past a row's valid columns read (or, scattering, add zero to) the next
// row; the slack of one band width after the last image keeps them in bounds.
// The launchers check every index they turn into an offset.
//
// Work split (run_bands): with at least two images per thread, threads split
// the images; each pads its image into a private buffer that stays in its L2
// while every output plane runs over it, and dW sums per-thread partials in
// thread order. With fewer images, threads split the output planes (rows of W,
// or of W^T for dX) with about equal nonzeros over one shared padded copy, and
// each dW slot is written by one thread. Both are deterministic for a given
// thread count. dX for stride > 1 scatters, split by image.
#include <omp.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "../checks.h"
#include "conv_kernels.h"

namespace sparsekern {
namespace cpu {
namespace {

struct Geom {
  int64_t kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, groups;
};

Geom parse_geom(c10::IntArrayRef g) {
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
};

ConvShape check_conv(const at::Tensor& values, const at::Tensor& row_offsets,
                     const at::Tensor& col_indices, const at::Tensor& t_offsets,
                     const at::Tensor& t_indices, const at::Tensor& t_perm,
                     c10::IntArrayRef geometry, int64_t N, int64_t Cin, int64_t H, int64_t W) {
  ConvShape s;
  s.g = parse_geom(geometry);
  s.tv = check_topology(values, row_offsets, col_indices, t_offsets, t_indices, t_perm);
  TORCH_CHECK_VALUE(values.device().is_cpu(), "values must be a CPU tensor for the CPU kernel, got ",
                    values.device());
  const Geom& g = s.g;
  s.N = N, s.Cin = Cin, s.H = H, s.W = W;
  s.Cout = s.tv.rows * s.tv.bs;
  s.khkw = g.kh * g.kw;
  TORCH_CHECK_VALUE(Cin % g.groups == 0, "input has ", Cin, " channels, not divisible by groups=",
                    g.groups);
  TORCH_CHECK_VALUE(s.Cout % g.groups == 0, "the weight has ", s.Cout,
                    " output channels, not divisible by groups=", g.groups);
  s.cin_g = Cin / g.groups, s.cout_g = s.Cout / g.groups;
  TORCH_CHECK_VALUE(s.tv.cols * s.tv.bs == s.cin_g * s.khkw, "input has ", Cin,
                    " channels but the weight has ", s.tv.cols * s.tv.bs,
                    " columns; expected in_channels/groups*kh*kw = ", s.cin_g, "*", g.kh, "*",
                    g.kw, " = ", s.cin_g * s.khkw);
  const int64_t eh = g.dh * (g.kh - 1) + 1, ew = g.dw * (g.kw - 1) + 1;
  TORCH_CHECK_VALUE(H + g.pt + g.pb >= eh && W + g.pl + g.pr >= ew, "padded input (",
                    H + g.pt + g.pb, "x", W + g.pl + g.pr,
                    ") is smaller than the dilated kernel (", eh, "x", ew, ")");
  s.OH = (H + g.pt + g.pb - eh) / g.sh + 1;
  s.OW = (W + g.pl + g.pr - ew) / g.sw + 1;
  return s;
}

void check_act(const at::Tensor& t, const at::Tensor& values, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be 4-D [N, C, H, W], got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but values have dtype ", values.scalar_type());
  TORCH_CHECK_VALUE(t.device() == values.device(), name, " is on ", t.device(),
                    " but values are on ", values.device());
}

// How an OH x OW output plane is cut into bands of RB rows x NSEG vectors.
// The last band (and column tile) is shifted back to end at the plane's edge
// and overlaps the previous one: the gather kernel rewrites equal values there,
// and dW/scatter skip the rows/columns already done.
struct Plan {
  int nseg, rb, vw;
  int64_t nbands, ntiles, tile_w;
  int64_t oh0(int64_t i, int64_t OH) const { return std::min(i * rb, OH - rb); }
  int row_skip(int64_t i, int64_t OH) const { return static_cast<int>(i * rb - oh0(i, OH)); }
  int64_t ow0(int64_t t, int64_t OW) const { return ntiles == 1 ? 0 : std::min(t * tile_w, OW - tile_w); }
};

template <typename scalar_t>
Plan make_plan(int64_t OH, int64_t OW) {
  constexpr int W = ConvVec<scalar_t>::W;
  Plan p;
  p.vw = W;
  p.nseg = static_cast<int>(std::min<int64_t>((OW + W - 1) / W, kMaxSeg));
  p.tile_w = static_cast<int64_t>(p.nseg) * W;
  p.ntiles = OW <= p.tile_w ? 1 : (OW + p.tile_w - 1) / p.tile_w;
  const int64_t rmax = max_band_rows(p.nseg);
  p.nbands = (OH + rmax - 1) / rmax;
  p.rb = static_cast<int>((OH + p.nbands - 1) / p.nbands);
  return p;
}

// Per-thread ranges of planes [0, P) with about equal entries (plus a per-plane cost).
std::vector<int64_t> balance(const std::vector<int64_t>& rowptr, int nchunks) {
  const int64_t P = static_cast<int64_t>(rowptr.size()) - 1;
  std::vector<int64_t> b(nchunks + 1, P);
  b[0] = 0;
  const int64_t kPlaneCost = 8;
  const int64_t total = rowptr[P] + P * kPlaneCost;
  int64_t r = 0;
  for (int ch = 1; ch < nchunks; ++ch) {
    const int64_t target = total * ch / nchunks;
    while (r < P && rowptr[r] + r * kPlaneCost < target) ++r;
    b[ch] = std::max(b[ch - 1], r);
  }
  return b;
}

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
Entries build_entries(int64_t planes, Enumerate&& enumerate, Finish&& finish) {
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
Entries forward_entries(const ConvShape& s, const at::Tensor& row_offsets,
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
Entries transpose_entries(const ConvShape& s, const at::Tensor& t_offsets,
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

int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// How one image of a source buffer is built from a 4-D tensor (any strides,
// NCHW or channels-last): dst[a*sw + b][c][i][j] = src[n][c][i*sh + a - off_t][j*sw + b - off_l],
// zero outside src. Hs x Ws planes, P = sh*sw phases of C channels.
struct ShiftSpec {
  at::Tensor src;
  int64_t sh, sw, off_t, off_l, Hs, Ws;
  int64_t planes() const { return sh * sw * src.size(1); }
  int64_t img() const { return planes() * Hs * Ws; }
};

template <typename scalar_t>
void copy_plane(const ShiftSpec& sp, int64_t n, int64_t q, scalar_t* d) {
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
        typename ConvVec<scalar_t>::V v = {};
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
    if (sw == 1 && s3 == 1) {
      std::memcpy(drow + jlo, srow, (jhi - jlo) * sizeof(scalar_t));
    } else {
      for (int64_t j = jlo; j < jhi; ++j) drow[j] = srow[(j - jlo) * sw * s3];
    }
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

// Image n into dst [planes][Hs][Ws]. A contiguous (NCHW) source is prefetched
// some channels ahead of the copy, which otherwise stalls on its loads from
// memory (40% of its perf samples on the masked load): ~1-2% off forward and
// dX at 3x3 256ch 14x14 95%, alternated call by call.
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

// Row width: at least `need`; rounded up to whole 64-byte lines (aligned rows)
// when that costs at most a quarter more memory.
int64_t row_width(int64_t need, int64_t vw) {
  const int64_t up = (need + vw - 1) / vw * vw;
  return up * 4 <= need * 5 ? up : need;
}

// Run `kind` (gather or dW) over every (image, output plane, column tile,
// band). Output plane p of image n is out + (n * planes + p) * OH * OW; the
// kernels read source image n as built by `sp`. The gather kernels read the
// values pre-gathered in entry order.
//
// With at least two images per thread, threads split the images: each copies
// its image into a private buffer that stays in its L2 while every weight row
// streams past (dW then sums per-thread partials in thread order). Otherwise
// threads split the output planes over one shared copy of all images.
// (3x3 256->256 14x14 batch 32, 95% sparse, 2 threads: forward 6.2 -> 4.9 ms.)
template <typename scalar_t>
void run_bands(BandKind kind, const Plan& pl, Entries e, int64_t N, int64_t OH, int64_t OW,
               const scalar_t* vals, const ShiftSpec& sp, const scalar_t* bias, scalar_t* out,
               const scalar_t* dy, int64_t nout) {
  const int64_t planes = e.planes(), Ws = sp.Ws, img = sp.img(), slack = pl.tile_w + Ws;
  const BandFn<scalar_t> fn = kind == BandKind::kGather
                                  ? select_band<scalar_t, BandKind::kGather>(pl.nseg, pl.rb, Ws)
                                  : select_band<scalar_t, BandKind::kDW>(pl.nseg, pl.rb, Ws);
  TORCH_CHECK_VALUE(img < (int64_t(1) << 31), "one image of the conv's padded buffer has ", img,
                    " elements; the CPU kernel indexes it with int32 (< 2^31)");
  std::vector<scalar_t> w;
  if (kind == BandKind::kGather) {
    w.resize(e.vidx.size());
    at::parallel_for(0, static_cast<int64_t>(w.size()), 4096, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) w[j] = vals[e.vidx[j]];
    });
  }
  const int nth_all = at::get_num_threads();
  const bool by_image = nth_all > 1 && N >= 2 * nth_all;
  const int nth = by_image ? nth_all
                           : static_cast<int>(std::min<int64_t>(nth_all, std::max<int64_t>(planes, 1)));
  at::Tensor shared;
  if (!by_image) {
    shared = at::empty({N * img + slack}, sp.src.options());
    shared.narrow(0, N * img, slack).zero_();
    copy_all<scalar_t>(sp, shared.data_ptr<scalar_t>());
  }
  const std::vector<int64_t> bounds = balance(e.rowptr, nth);
  std::vector<at::Tensor> partial(nth);
  const bool dynamic = by_image && kind == BandKind::kGather;
  std::atomic<int64_t> next_image{0};
#pragma omp parallel num_threads(nth)
  {
    const int t = omp_get_thread_num();
    Band<scalar_t> b{};
    b.eoff = e.eoff.data();
    b.vidx = e.vidx.data();
    b.w = w.data();
    b.ws = Ws;
    b.ld = OW;
    scalar_t* dw_out = out;
    at::Tensor own;
    if (by_image) {
      own = at::empty({img + slack}, sp.src.options());
      own.narrow(0, img, slack).zero_();
      if (kind == BandKind::kDW) {
        partial[t] = at::zeros({nout}, sp.src.options());
        dw_out = partial[t].data_ptr<scalar_t>();
      }
    }
    // Gather: images are handed out one at a time, so a thread that the OS
    // slows down takes fewer (each image's output is computed the same way
    // whichever thread takes it). dW keeps a fixed split: its per-thread
    // partial sums must not depend on timing.
    const int64_t n0 = by_image ? N * t / nth : 0, n1 = by_image ? N * (t + 1) / nth : N;
    const int64_t p0 = by_image ? 0 : bounds[t], p1 = by_image ? planes : bounds[t + 1];
    const auto first = [&]() { return dynamic ? next_image.fetch_add(1) : n0; };
    const auto after = [&](int64_t n) { return dynamic ? next_image.fetch_add(1) : n + 1; };
    for (int64_t n = first(); n < (dynamic ? N : n1); n = after(n)) {
      const scalar_t* src;
      if (by_image) {
        scalar_t* o = own.data_ptr<scalar_t>();
        copy_image<scalar_t>(sp, n, o);
        src = o;
      } else {
        src = shared.data_ptr<scalar_t>() + n * img;
      }
      for (int64_t p = p0; p < p1; ++p) {
        b.j0 = e.rowptr[p];
        b.j1 = e.rowptr[p + 1];
        b.init = bias ? bias[p] : scalar_t(0);
        const int64_t plane = (n * planes + p) * OH * OW;
        for (int64_t ct = 0; ct < pl.ntiles; ++ct) {
          const int64_t ow0 = pl.ow0(ct, OW);
          b.col_lo = static_cast<int>(ct * pl.tile_w - ow0);
          b.col_hi = static_cast<int>(std::min(pl.tile_w, OW - ow0));
          for (int64_t bi = 0; bi < pl.nbands; ++bi) {
            const int64_t oh0 = pl.oh0(bi, OH);
            b.row_skip = pl.row_skip(bi, OH);
            b.buf = src + oh0 * Ws + ow0;
            if (kind == BandKind::kGather) {
              b.out = out + plane + oh0 * OW + ow0;
            } else {
              b.out = dw_out;
              b.dy = dy + plane + oh0 * OW + ow0;
            }
            fn(b);
          }
        }
      }
    }
  }
  if (by_image && kind == BandKind::kDW) {
    at::parallel_for(0, nout, 4096, [&](int64_t i0, int64_t i1) {
      for (int t = 0; t < nth; ++t) {
        const scalar_t* pt = partial[t].data_ptr<scalar_t>();
        for (int64_t i = i0; i < i1; ++i) out[i] += pt[i];
      }
    });
  }
}

// The zero-padded, phase-split input the forward and dW kernels read.
ShiftSpec phase_spec(const ConvShape& s, const at::Tensor& x, int64_t vw) {
  const Geom& g = s.g;
  return ShiftSpec{x, g.sh, g.sw, g.pt, g.pl, s.OH + ((g.kh - 1) * g.dh) / g.sh,
                   row_width(s.OW + ((g.kw - 1) * g.dw) / g.sw, vw)};
}

void check_forward_indices(const ConvShape& s, const at::Tensor& row_offsets,
                           const at::Tensor& col_indices) {
  check_offsets_host(row_offsets, s.tv.nnz, "row_offsets");
  check_indices_below(col_indices, s.tv.cols, "col_indices");
}

at::Tensor conv2d_cpu(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& row_offsets,
                      const at::Tensor& col_indices, const at::Tensor& t_offsets,
                      const at::Tensor& t_indices, const at::Tensor& t_perm,
                      const c10::optional<at::Tensor>& bias, c10::IntArrayRef geometry) {
  check_act(x_in, values, "x");
  const auto s = check_conv(values, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry,
                            x_in.size(0), x_in.size(1), x_in.size(2), x_in.size(3));
  check_forward_indices(s, row_offsets, col_indices);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.Cout, "bias must be [", s.Cout,
                      "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "bias has dtype ",
                     bias->scalar_type(), " but values have dtype ", values.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == values.device(), "bias is on ", bias->device(),
                      " but values are on ", values.device());
  }
  at::Tensor y = at::empty({s.N, s.Cout, s.OH, s.OW}, x_in.options());
  if (y.numel() == 0) return y;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparsekern_conv2d_cpu", [&] {
    const Plan pl = make_plan<scalar_t>(s.OH, s.OW);
    const ShiftSpec sp = phase_spec(s, x_in, ConvVec<scalar_t>::W);
    Entries e = forward_entries(s, row_offsets, col_indices, sp.Hs, sp.Ws);
    run_bands<scalar_t>(BandKind::kGather, pl, std::move(e), s.N, s.OH, s.OW, values.data_ptr<scalar_t>(), sp,
                        b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                        nullptr, 0);
  });
  return y;
}

void check_dy(const at::Tensor& dy, const at::Tensor& values, const ConvShape& s) {
  check_act(dy, values, "dy");
  TORCH_CHECK_VALUE(dy.size(0) == s.N && dy.size(1) == s.Cout && dy.size(2) == s.OH &&
                        dy.size(3) == s.OW,
                    "dy has shape ", dy.sizes(), ", expected the conv output shape [", s.N, ", ",
                    s.Cout, ", ", s.OH, ", ", s.OW, "]");
}

at::Tensor conv2d_dx_cpu(const at::Tensor& dy_in, const at::Tensor& values,
                         const at::Tensor& row_offsets, const at::Tensor& col_indices,
                         const at::Tensor& t_offsets, const at::Tensor& t_indices,
                         const at::Tensor& t_perm, c10::IntArrayRef geometry,
                         c10::IntArrayRef input_size) {
  TORCH_CHECK_VALUE(input_size.size() == 4, "input_size must be [N, C, H, W], got ", input_size);
  const auto s = check_conv(values, row_offsets, col_indices, t_offsets, t_indices, t_perm, geometry,
                            input_size[0], input_size[1], input_size[2], input_size[3]);
  check_dy(dy_in, values, s);
  const Geom& g = s.g;
  // The stride-1 gather writes every element of dx; the scatter path needs zeros.
  const bool gather = g.sh == 1 && g.sw == 1;
  at::Tensor dx = gather && s.tv.nnz > 0 ? at::empty({s.N, s.Cin, s.H, s.W}, dy_in.options())
                                         : at::zeros({s.N, s.Cin, s.H, s.W}, dy_in.options());
  if (dx.numel() == 0 || s.tv.nnz == 0) return dx;
  const at::Tensor dy = dy_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparsekern_conv2d_dx_cpu", [&] {
    const scalar_t* vals = values.data_ptr<scalar_t>();
    if (gather) {
      // Gather: dX = full correlation of dy with the flipped kernel, over W^T.
      check_offsets_host(t_offsets, s.tv.nnz, "t_offsets");
      check_indices_below(t_indices, s.tv.rows, "t_indices");
      check_indices_below(t_perm, s.tv.nnz, "t_perm");
      const Plan pl = make_plan<scalar_t>(s.H, s.W);
      const ShiftSpec sp{dy, 1, 1, (g.kh - 1) * g.dh - g.pt, (g.kw - 1) * g.dw - g.pl,
                         s.H + (g.kh - 1) * g.dh,
                         row_width(s.W + (g.kw - 1) * g.dw, ConvVec<scalar_t>::W)};
      Entries e = transpose_entries(s, t_offsets, t_indices, t_perm, sp.Hs, sp.Ws);
      run_bands<scalar_t>(BandKind::kGather, pl, std::move(e), s.N, s.H, s.W, vals, sp, nullptr,
                          dx.data_ptr<scalar_t>(), nullptr, 0);
      return;
    }
    // Scatter (stride > 1): the adjoint of the forward gather into a phase
    // buffer, then un-split. Split by image, so no two threads share a slot.
    check_forward_indices(s, row_offsets, col_indices);
    const Plan pl = make_plan<scalar_t>(s.OH, s.OW);
    struct {
      int64_t Hs, Ws, img;
    } pb;
    {
      const ShiftSpec sp = phase_spec(s, dx, ConvVec<scalar_t>::W);  // dx: only its shape is used
      pb = {sp.Hs, sp.Ws, sp.img()};
    }
    TORCH_CHECK_VALUE(pb.img < (int64_t(1) << 31), "one image of the conv's padded buffer has ", pb.img,
                      " elements; the CPU kernel indexes it with int32 (< 2^31)");
    at::Tensor sbuf = at::zeros({s.N * pb.img + pl.tile_w + pb.Ws}, dy.options());
    const Entries e = forward_entries(s, row_offsets, col_indices, pb.Hs, pb.Ws);
    const BandFn<scalar_t> fn = select_band<scalar_t, BandKind::kScatter>(pl.nseg, pl.rb);
    scalar_t* sb = sbuf.data_ptr<scalar_t>();
    const scalar_t* dyp = dy.data_ptr<scalar_t>();
    at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
      Band<scalar_t> b{};
      b.eoff = e.eoff.data();
      b.vidx = e.vidx.data();
      b.vals = vals;
      b.ws = pb.Ws;
      b.ld = s.OW;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t co = 0; co < s.Cout; ++co) {
          b.j0 = e.rowptr[co], b.j1 = e.rowptr[co + 1];
          const int64_t plane = (n * s.Cout + co) * s.OH * s.OW;
          for (int64_t ct = 0; ct < pl.ntiles; ++ct) {
            const int64_t ow0 = pl.ow0(ct, s.OW);
            b.col_lo = static_cast<int>(ct * pl.tile_w - ow0);
            b.col_hi = static_cast<int>(std::min(pl.tile_w, s.OW - ow0));
            for (int64_t bi = 0; bi < pl.nbands; ++bi) {
              const int64_t oh0 = pl.oh0(bi, s.OH);
              b.row_skip = pl.row_skip(bi, s.OH);
              b.sbuf = sb + n * pb.img + oh0 * pb.Ws + ow0;
              b.dy = dyp + plane + oh0 * s.OW + ow0;
              fn(b);
            }
          }
        }
    });
    // dx[n][c][ih][iw] = buf[n][phase][c][i][j] with ih = i*sh + a - pt.
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, s.N * s.Cin, 4, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t n = q / s.Cin, c = q % s.Cin;
        for (int64_t ih = 0; ih < s.H; ++ih) {
          const int64_t i = (ih + g.pt) / g.sh, a = (ih + g.pt) % g.sh;
          if (i >= pb.Hs) continue;
          for (int64_t iw = 0; iw < s.W; ++iw) {
            const int64_t j = (iw + g.pl) / g.sw, bb = (iw + g.pl) % g.sw;
            if (j >= pb.Ws) continue;
            dxp[(q * s.H + ih) * s.W + iw] =
                sb[n * pb.img + (((a * g.sw + bb) * s.Cin + c) * pb.Hs + i) * pb.Ws + j];
          }
        }
      }
    });
  });
  return dx;
}

at::Tensor conv2d_dw_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                         const at::Tensor& row_offsets, const at::Tensor& col_indices,
                         const at::Tensor& t_offsets, const at::Tensor& t_indices,
                         const at::Tensor& t_perm, c10::IntArrayRef geometry, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size == 1 || (block_size >= 4 && block_size <= 64 && block_size % 4 == 0),
                    "block_size must be 1 (CSR) or a multiple of 4 in [4, 64] (BSR), got ", block_size);
  TORCH_CHECK_VALUE(x_in.dim() == 4, "x must be 4-D [N, C, H, W], got shape ", x_in.sizes());
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
  const at::Tensor dy = dy_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sparsekern_conv2d_dw_cpu", [&] {
    const Plan pl = make_plan<scalar_t>(s.OH, s.OW);
    const ShiftSpec sp = phase_spec(s, x_in, ConvVec<scalar_t>::W);
    Entries e = forward_entries(s, row_offsets, col_indices, sp.Hs, sp.Ws);
    run_bands<scalar_t>(BandKind::kDW, pl, std::move(e), s.N, s.OH, s.OW, nullptr, sp, nullptr,
                        out.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), out.numel());
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
