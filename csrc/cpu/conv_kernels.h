// CPU micro-kernels for direct sparse 2-D convolution (NCHW planes).
//
// No im2col. A weight entry w(r, c) with c = (ci, kh, kw) becomes one
// broadcast-FMA of w over a *shifted window* of an input plane: for stride 1,
// out[r][oh][ow] += w * in[ci][oh + kh*dil][ow + kw*dil]. The launcher copies
// the input once into a zero-padded, stride-phase-split buffer (so every
// window is in bounds and contiguous along ow, for any stride, padding and
// dilation) and turns each entry into one precomputed offset into it.
//
// A "band" is RB output rows x NSEG vectors of one output plane. Its
// accumulators live in registers while every entry of the plane's weight row
// streams past: one memory-operand FMA per vector, no packing, no transposes.
// Measured on Zen 4 at 3x3 256->256, 14x14, batch 32 (fp32, 2 threads): the
// im2col + sparse GEMM route spends 25 ms in F.unfold alone against 35 ms for
// the whole dense conv, so im2col could not beat dense at any density.
//
// Kernels only do math and trust their inputs: sparse_conv_cpu.cpp validates
// every index and builds every offset so that all reads and writes stay
// inside the buffers (see the buffer sizes there).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sparsekern {
namespace cpu {

template <typename scalar_t>
struct ConvVec {
  static constexpr int kBytes = 64;  // one zmm (two ymm without AVX-512)
  static constexpr int W = kBytes / static_cast<int>(sizeof(scalar_t));
  typedef scalar_t V __attribute__((vector_size(kBytes)));
  // Unaligned, may-alias view for loads and stores at arbitrary offsets.
  typedef scalar_t VU
      __attribute__((vector_size(kBytes), aligned(sizeof(scalar_t)), __may_alias__));
  static_assert(sizeof(scalar_t) == 4 || sizeof(scalar_t) == 8,
                "ConvVec: only float32 and float64 are supported");
};

// Largest band (rows) for a given number of vectors per row: the RB x NSEG
// accumulators (or dy registers) must leave room for the broadcast and, in
// the dW kernel, four dot-product chains.
constexpr int kMaxSeg = 4;
constexpr int max_band_rows(int nseg) { return nseg == 1 ? 16 : nseg == 2 ? 12 : nseg == 3 ? 8 : 6; }

template <typename scalar_t>
inline typename ConvVec<scalar_t>::V load_v(const scalar_t* p) {
  return *reinterpret_cast<const typename ConvVec<scalar_t>::VU*>(p);
}

template <typename scalar_t>
inline void store_v(scalar_t* p, typename ConvVec<scalar_t>::V v) {
  *reinterpret_cast<typename ConvVec<scalar_t>::VU*>(p) = v;
}

// Store lanes [0, n) of v, n <= W; lanes >= n are not touched.
template <typename scalar_t>
inline void store_first(scalar_t* p, typename ConvVec<scalar_t>::V v, int n) {
  constexpr int W = ConvVec<scalar_t>::W;
  if (n >= W) {
    store_v(p, v);
    return;
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
    return;
  } else {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
    return;
  }
#endif
  for (int i = 0; i < n; ++i) p[i] = v[i];
}

// Lanes [lo, hi) of p (clamped to [0, W)), zeros elsewhere; reads only those lanes.
template <typename scalar_t>
inline typename ConvVec<scalar_t>::V load_lanes(const scalar_t* p, int lo, int hi) {
  using V = typename ConvVec<scalar_t>::V;
  constexpr int W = ConvVec<scalar_t>::W;
  lo = lo < 0 ? 0 : lo;
  hi = hi > W ? W : hi;
  if (lo == 0 && hi == W) return load_v(p);
  if (hi <= lo) return V{};
#if defined(__AVX512F__)
  const unsigned m = ((1u << hi) - 1) & ~((1u << lo) - 1);
  if constexpr (std::is_same<scalar_t, float>::value) {
    return (V)_mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p);
  } else {
    return (V)_mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p);
  }
#endif
  V v = {};
  for (int i = lo; i < hi; ++i) v[i] = p[i];
  return v;
}

// v moved up by k lanes (k in [0, W]): lane i takes lane i - k, zeros below k.
template <typename scalar_t>
inline typename ConvVec<scalar_t>::V lanes_up(typename ConvVec<scalar_t>::V v, int k) {
  using V = typename ConvVec<scalar_t>::V;
  constexpr int W = ConvVec<scalar_t>::W;
  if (k <= 0) return v;
  if (k >= W) return V{};
#if defined(__AVX512F__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    const __m512i idx = _mm512_sub_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(k));
    return (V)_mm512_maskz_permutexvar_ps(static_cast<__mmask16>(~((1u << k) - 1)), idx, (__m512)v);
  } else {
    const __m512i idx = _mm512_sub_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(k));
    return (V)_mm512_maskz_permutexvar_pd(static_cast<__mmask8>(~((1u << k) - 1)), idx, (__m512d)v);
  }
#endif
  V r = {};
  for (int i = k; i < W; ++i) r[i] = v[i - k];
  return r;
}

template <typename scalar_t>
inline scalar_t hsum_v(typename ConvVec<scalar_t>::V v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<scalar_t, float>::value) return _mm512_reduce_add_ps((__m512)v);
  else return _mm512_reduce_add_pd((__m512d)v);
#endif
  scalar_t s = v[0];
  for (int i = 1; i < ConvVec<scalar_t>::W; ++i) s += v[i];
  return s;
}

// out[i] += sum of the lanes of a_i, i < 4: the four reductions share their
// shuffles (12 instructions for four 16-lane sums instead of ~32).
template <typename scalar_t>
inline void hsum4_add(typename ConvVec<scalar_t>::V a0, typename ConvVec<scalar_t>::V a1,
                      typename ConvVec<scalar_t>::V a2, typename ConvVec<scalar_t>::V a3,
                      scalar_t* o0, scalar_t* o1, scalar_t* o2, scalar_t* o3) {
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    const __m512 x0 = (__m512)a0, x1 = (__m512)a1, x2 = (__m512)a2, x3 = (__m512)a3;
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(x2, x3), _mm512_unpackhi_ps(x2, x3));
    // per 128-bit lane: [a0, a1, a2, a3] partial sums
    const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(t0, t1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    alignas(16) float r[4];
    _mm_store_ps(r, q);
    *o0 += r[0], *o1 += r[1], *o2 += r[2], *o3 += r[3];
    return;
  }
#endif
  *o0 += hsum_v<scalar_t>(a0), *o1 += hsum_v<scalar_t>(a1);
  *o2 += hsum_v<scalar_t>(a2), *o3 += hsum_v<scalar_t>(a3);
}

// What one band call sees. `src`/`dst` already point at the band's first row
// and column inside one image (or plane); the entry offsets are added to it.
template <typename scalar_t>
struct Band {
  const int32_t* eoff;     // [j1] offset of each entry's window into the buffer
  const int32_t* vidx;     // [j1] index of each entry's value (or gradient slot)
  int64_t j0, j1;          // entries of this output row
  const scalar_t* w;       // gather: [j1] the entries' values, in entry order
  const scalar_t* vals;    // scatter: values, read through vidx
  const scalar_t* buf;     // gather/dW: input buffer + band origin
  scalar_t* sbuf;          // scatter: gradient buffer + band origin
  int64_t ws;              // row stride of buf/sbuf
  scalar_t* out;           // gather: output plane + band origin; dW: gradient of values
  const scalar_t* dy;      // dW/scatter: dy plane + band origin
  int64_t ld;              // row stride of out (gather) or dy (dW, scatter)
  scalar_t init;           // gather: accumulator start (bias)
  int row_skip;            // dW/scatter: rows < row_skip were done by an earlier band
  int col_lo, col_hi;      // valid columns of the band: [col_lo, col_hi) (<= NSEG * W)
};

// out[r][c] = init + sum_j w[j] * buf[eoff[j] + r * ws + c]
// for r < RB, c in [col_lo, col_hi) (stores only those columns).
// WS > 0: the row stride is that compile-time constant (b.ws == WS), so the
// row loads take immediate offsets instead of a chain of adds.
template <typename scalar_t, int NSEG, int RB, int WS = 0>
void gather_band(const Band<scalar_t>& b) {
  using V = typename ConvVec<scalar_t>::V;
  constexpr int W = ConvVec<scalar_t>::W;
  const int64_t ws = WS > 0 ? WS : b.ws;
  V acc[RB][NSEG];
  for (int r = 0; r < RB; ++r)
    for (int s = 0; s < NSEG; ++s) acc[r][s] = V{} + b.init;
  for (int64_t j = b.j0; j < b.j1; ++j) {
    const scalar_t w = b.w[j];
    const scalar_t* p = b.buf + b.eoff[j];
    for (int r = 0; r < RB; ++r)
      for (int s = 0; s < NSEG; ++s) acc[r][s] += w * load_v(p + r * ws + s * W);
  }
  for (int r = 0; r < RB; ++r) {
    scalar_t* o = b.out + r * b.ld;
    for (int s = 0; s < NSEG; ++s) {
      const int lo = s * W, hi = lo + W < b.col_hi ? lo + W : b.col_hi;
      if (hi <= b.col_lo) continue;
      if (lo >= b.col_lo) {
        store_first<scalar_t>(o + lo, acc[r][s], hi - lo);
      } else {
        for (int c = b.col_lo; c < hi; ++c) o[c] = acc[r][s][c - lo];
      }
    }
  }
}

// Load the band of dy (rows >= row_skip, columns [col_lo, col_hi)), zeros elsewhere.
template <typename scalar_t, int NSEG, int RB>
inline void load_dy_band(const Band<scalar_t>& b, typename ConvVec<scalar_t>::V (&d)[RB][NSEG]) {
  using V = typename ConvVec<scalar_t>::V;
  constexpr int W = ConvVec<scalar_t>::W;
  for (int r = 0; r < RB; ++r)
    for (int s = 0; s < NSEG; ++s)
      d[r][s] = r < b.row_skip ? V{}
                               : load_lanes<scalar_t>(b.dy + r * b.ld + s * W, b.col_lo - s * W,
                                                      b.col_hi - s * W);
}

// One window vector of the dW kernel: row r, segment s. MASKED (for a buffer
// holding a non-finite element) loads only the band's valid rows and columns,
// since the zero dy lanes elsewhere times Inf would give NaN.
template <typename scalar_t, bool MASKED>
inline typename ConvVec<scalar_t>::V load_window(const Band<scalar_t>& b, const scalar_t* p, int r,
                                                 int s) {
  constexpr int W = ConvVec<scalar_t>::W;
  if constexpr (MASKED) {
    if (r < b.row_skip) return typename ConvVec<scalar_t>::V{};
    return load_lanes<scalar_t>(p, b.col_lo - s * W, b.col_hi - s * W);
  } else {
    return load_v(p);
  }
}

// out[vidx[j]] += sum_{r, c} dy[r][c] * buf[eoff[j] + r * ws + c] over the
// band's valid rows and columns. Four entries at a time keep four independent
// FMA chains in flight (one chain is latency-bound at a quarter of the rate).
template <typename scalar_t, int NSEG, int RB, int WS = 0, bool MASKED = false>
void dw_band(const Band<scalar_t>& b) {
  using V = typename ConvVec<scalar_t>::V;
  constexpr int W = ConvVec<scalar_t>::W;
  const int64_t ws = WS > 0 ? WS : b.ws;
  V d[RB][NSEG];
  load_dy_band<scalar_t, NSEG, RB>(b, d);
  int64_t j = b.j0;
  for (; j + 4 <= b.j1; j += 4) {
    const scalar_t* p0 = b.buf + b.eoff[j];
    const scalar_t* p1 = b.buf + b.eoff[j + 1];
    const scalar_t* p2 = b.buf + b.eoff[j + 2];
    const scalar_t* p3 = b.buf + b.eoff[j + 3];
    // Two chains per entry (even and odd rows): eight FMA chains in flight.
    V a0 = {}, a1 = {}, a2 = {}, a3 = {}, c0 = {}, c1 = {}, c2 = {}, c3 = {};
    for (int r = 0; r < RB; ++r)
      for (int s = 0; s < NSEG; ++s) {
        const int64_t o = r * ws + s * W;
        if ((r * NSEG + s) % 2 == 0) {
          a0 += d[r][s] * load_window<scalar_t, MASKED>(b, p0 + o, r, s);
          a1 += d[r][s] * load_window<scalar_t, MASKED>(b, p1 + o, r, s);
          a2 += d[r][s] * load_window<scalar_t, MASKED>(b, p2 + o, r, s);
          a3 += d[r][s] * load_window<scalar_t, MASKED>(b, p3 + o, r, s);
        } else {
          c0 += d[r][s] * load_window<scalar_t, MASKED>(b, p0 + o, r, s);
          c1 += d[r][s] * load_window<scalar_t, MASKED>(b, p1 + o, r, s);
          c2 += d[r][s] * load_window<scalar_t, MASKED>(b, p2 + o, r, s);
          c3 += d[r][s] * load_window<scalar_t, MASKED>(b, p3 + o, r, s);
        }
      }
    hsum4_add<scalar_t>(a0 + c0, a1 + c1, a2 + c2, a3 + c3, b.out + b.vidx[j], b.out + b.vidx[j + 1],
                        b.out + b.vidx[j + 2], b.out + b.vidx[j + 3]);
  }
  for (; j < b.j1; ++j) {
    const scalar_t* p = b.buf + b.eoff[j];
    V a = {};
    for (int r = 0; r < RB; ++r)
      for (int s = 0; s < NSEG; ++s) a += d[r][s] * load_window<scalar_t, MASKED>(b, p + r * ws + s * W, r, s);
    b.out[b.vidx[j]] += hsum_v<scalar_t>(a);
  }
}

// sbuf[eoff[j] + r * ws + c] += vals[vidx[j]] * dy[r][c]: the adjoint of
// gather_band, for dX when the stride is > 1. Invalid lanes add zero (the
// values are finite: the launcher takes non-finite ones out), so sbuf must be
// the calling thread's own: those lanes rewrite the next row, and past the
// image's last row its slack.
template <typename scalar_t, int NSEG, int RB>
void scatter_band(const Band<scalar_t>& b) {
  using V = typename ConvVec<scalar_t>::V;
  constexpr int W = ConvVec<scalar_t>::W;
  V d[RB][NSEG];
  load_dy_band<scalar_t, NSEG, RB>(b, d);
  for (int64_t j = b.j0; j < b.j1; ++j) {
    const scalar_t w = b.vals[b.vidx[j]];
    scalar_t* p = b.sbuf + b.eoff[j];
    for (int r = 0; r < RB; ++r)
      for (int s = 0; s < NSEG; ++s) {
        scalar_t* q = p + r * b.ws + s * W;
        store_v(q, load_v(q) + w * d[r][s]);
      }
  }
}

// Band kernels by (NSEG, RB), chosen once per launch.
template <typename scalar_t>
using BandFn = void (*)(const Band<scalar_t>&);

// kDWMasked: dW over a buffer with a non-finite element (see load_window).
enum class BandKind { kGather, kDW, kDWMasked, kScatter };

template <typename scalar_t, BandKind K, int NSEG, int RB>
constexpr BandFn<scalar_t> band_fn() {
  if constexpr (K == BandKind::kGather) return &gather_band<scalar_t, NSEG, RB>;
  else if constexpr (K == BandKind::kDW) return &dw_band<scalar_t, NSEG, RB>;
  else if constexpr (K == BandKind::kDWMasked) return &dw_band<scalar_t, NSEG, RB, 0, true>;
  else return &scatter_band<scalar_t, NSEG, RB>;
}

template <typename scalar_t, BandKind K, int NSEG, int... I>
constexpr std::array<BandFn<scalar_t>, sizeof...(I)> band_row(std::integer_sequence<int, I...>) {
  return {band_fn<scalar_t, K, NSEG, I + 1>()...};
}

// The kernel for nseg in [1, kMaxSeg] and rb in [1, max_band_rows(nseg)].
template <typename scalar_t, BandKind K>
BandFn<scalar_t> select_band(int nseg, int rb) {
  static const auto t1 = band_row<scalar_t, K, 1>(std::make_integer_sequence<int, max_band_rows(1)>{});
  static const auto t2 = band_row<scalar_t, K, 2>(std::make_integer_sequence<int, max_band_rows(2)>{});
  static const auto t3 = band_row<scalar_t, K, 3>(std::make_integer_sequence<int, max_band_rows(3)>{});
  static const auto t4 = band_row<scalar_t, K, 4>(std::make_integer_sequence<int, max_band_rows(4)>{});
  switch (nseg) {
    case 1: return t1[rb - 1];
    case 2: return t2[rb - 1];
    case 3: return t3[rb - 1];
    default: return t4[rb - 1];
  }
}

template <typename scalar_t, BandKind K>
BandFn<scalar_t> select_band(int nseg, int rb, int64_t ws) {
  // One vector per row of a 16-wide padded buffer (14x14 planes, fp32): a fixed stride.
  if constexpr (K == BandKind::kGather) {
    if (nseg == 1 && ws == 16 && rb == 14) return &gather_band<scalar_t, 1, 14, 16>;
  } else if constexpr (K == BandKind::kDW) {
    if (nseg == 1 && ws == 16 && rb == 14) return &dw_band<scalar_t, 1, 14, 16>;
  }
  return select_band<scalar_t, K>(nseg, rb);
}

}  // namespace cpu
}  // namespace sparsekern
