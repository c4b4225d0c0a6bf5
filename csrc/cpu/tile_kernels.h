// CPU micro-kernels for sparse x dense products in the transposed-activation
// layout (SparseProp): a batch tile of the dense operand is packed as
// Xt[C][T] (feature-major, T consecutive batch rows per feature), so every
// nonzero w(r, c) becomes one broadcast-FMA over a contiguous T-vector
// Xt[c][:]. The packed tile (C * T * sizeof(scalar) bytes, 512 KiB for
// C = 4096, fp32) stays in the core's L2 while every row of W streams past it.
//
// Element types (tile_lanes.h): a tile holds the operands' dtype S (float,
// double, bfloat16, float16) and computes in Acc<S> (fp32 for the 16-bit types):
// 16-bit tiles are widened in registers, so they move half the bytes, and every
// output is rounded once when stored. Accumulators that outlive one kernel
// call (the dX scatter tile, dW across batch tiles) are Acc<S>.
//
// These kernels only do math and trust their inputs: the launchers
// (sparse_matmul_cpu.cpp, checks.h) validate shapes, dtypes, offsets and every
// index they read before any kernel runs (one vectorised pass per call).
//
// Speed: the CSR loops are bound by L2->L1 bandwidth (each nonzero needs its own
// T-element x row, ~1 32-byte FMA/cycle on Zen 4, ~45% of MKL's dense rate). fp32 on
// AVX-512 builds computes in 64-byte vectors (csr_row_fma, SddmmDyRows, BlockLanes):
// the same lanes, half the instructions; 1.1-1.6x on a Xeon's two 512-bit FMA
// ports, where 32-byte loops left half of each FMA idle. Measured
// and not kept: prefetching x rows (no change), tiles of 16 or 64 rows (no
// better), several batch tiles per forward pass (slower below density 0.5).
// L1 column panels with per-row cursors (csr_spmm_tile_panels) pay only for
// dense rows (>= 64 nonzeros per 256-column panel: 1.1-1.45x at density 0.5;
// 2x slower at 0.1). BSR kernels reuse each x vector from registers (see
// bsr_spmm_tile, bsr_sddmm_outer).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tile_lanes.h"

namespace sparsekern {
namespace cpu {

// Tile geometry for elements S: NV vectors of 32 bytes of compute lanes per batch tile.
template <typename S, int NV>
struct TileConfig {
  using A = Acc<S>;
  using Vec = Vec32<A>;
  static constexpr int kVecWidth = kLanes<A>;
  static constexpr int kNV = NV;
  static constexpr int kTile = NV * kVecWidth;  // batch rows per tile
  static constexpr int kRowGroup = 16;          // output rows transposed per store
  static_assert(NV >= 1 && NV <= 8, "TileConfig: NV (vectors per tile) must be in [1, 8]");
  static_assert(sizeof(A) == 4 || sizeof(A) == 8, "TileConfig: compute lanes are float32 or float64");
};

// 8x8 fp32 transpose: dst[j * ldd + i] = src[i * lds + j] for i, j < 8.
// Packing and the transposed stores are fixed per-call costs that matter at
// high sparsity; this is ~4x faster than the scalar copy.
template <typename scalar_t>
inline bool transpose8x8(const scalar_t* src, int64_t lds, scalar_t* dst, int64_t ldd) {
#if defined(__AVX__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      u[i + 0] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
      _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
    return true;
  }
#endif
  if constexpr (sizeof(scalar_t) == 2) return transpose8x8_16(src, lds, dst, ldd);
  (void)src, (void)lds, (void)dst, (void)ldd;
  return false;
}

// Pack rows [n0, n0 + nvalid) of a strided [M, C] matrix into xt[c][T] for
// c in [c_begin, c_end); batch slots t >= nvalid are zero so the kernels can
// always run full tiles. Columns go in blocks of 64 so the destination lines
// (64 * T * sizeof) stay in L1 while the source rows stream.
template <typename scalar_t, int T>
inline void pack_tile(const scalar_t* x, int64_t s0, int64_t s1, int64_t n0,
                      int64_t nvalid, int64_t c_begin, int64_t c_end, scalar_t* xt) {
  constexpr int64_t kCB = 64;
  for (int64_t cb = c_begin; cb < c_end; cb += kCB) {
    const int64_t ce = std::min(cb + kCB, c_end);
    int64_t t = 0;
    if (s1 == 1) {  // 8x8 blocks where rows and columns allow
      for (; t + 8 <= nvalid; t += 8) {
        const scalar_t* row = x + (n0 + t) * s0;
        int64_t c = cb;
        for (; c + 8 <= ce && transpose8x8(row + c, s0, xt + c * T + t, T); c += 8) {
        }
        for (int64_t tt = t; tt < t + 8; ++tt)
          for (int64_t cc = c; cc < ce; ++cc) xt[cc * T + tt] = x[(n0 + tt) * s0 + cc];
      }
    }
    for (; t < nvalid; ++t) {
      const scalar_t* row = x + (n0 + t) * s0;
      for (int64_t c = cb; c < ce; ++c) xt[c * T + t] = row[c * s1];
    }
    for (int64_t t = nvalid; t < T; ++t)
      for (int64_t c = cb; c < ce; ++c) xt[c * T + t] = scalar_t(0);
  }
}

// 8x8 block of a compute-lane buffer, transposed and rounded to S:
// dst[j * ldd + i] = S(src[i * lds + j]).
template <typename S>
inline bool transpose8x8_round(const Acc<S>* src, int64_t lds, S* dst, int64_t ldd) {
  if constexpr (std::is_same<S, Acc<S>>::value) {
    return transpose8x8(src, lds, dst, ldd);
  } else {
    alignas(32) float tmp[8 * 8];
    if (!transpose8x8(src, lds, tmp, 8)) return false;
    for (int j = 0; j < 8; ++j) round_store<S, false>(dst + j * ldd, widen_load<float>(tmp + 8 * j));
    return true;
  }
}

// Write a [rows][T] compute-lane buffer transposed into y[n0 + t][r0 + r], t < nvalid,
// rounded to y's element type.
template <typename S, int T>
inline void store_transposed(const Acc<S>* buf, int64_t rows, S* y,
                             int64_t ldy, int64_t n0, int64_t nvalid, int64_t r0) {
  int64_t t = 0;
  for (; t + 8 <= nvalid; t += 8) {
    S* yb = y + (n0 + t) * ldy + r0;
    int64_t r = 0;
    for (; r + 8 <= rows && transpose8x8_round<S>(buf + r * T + t, T, yb + r, ldy); r += 8) {
    }
    for (int64_t tt = t; tt < t + 8; ++tt)
      for (int64_t rr = r; rr < rows; ++rr) y[(n0 + tt) * ldy + r0 + rr] = S(buf[rr * T + tt]);
  }
  for (; t < nvalid; ++t) {
    S* yrow = y + (n0 + t) * ldy + r0;
    for (int64_t r = 0; r < rows; ++r) yrow[r] = S(buf[r * T + t]);
  }
}

// Entries [k, kend) of one CSR row times the packed tile, summed into a0 and a1: two
// accumulator sets hide the 4-cycle FMA latency (2 x NV independent chains). kBounded
// stops at the first pair whose column reaches pend (a column panel's end); returns
// the first entry not taken.
template <typename S, int NV, bool kBounded>
inline int64_t csr_row_fma(const int32_t* idx, const S* vals, const S* xt, int64_t k, int64_t kend,
                           uint32_t pend, Vec32<Acc<S>> (&a0)[NV], Vec32<Acc<S>> (&a1)[NV]) {
  using A = Acc<S>;
  using Vec = Vec32<A>;
  constexpr int T = TileConfig<S, NV>::kTile;
  auto in_panel = [&](int64_t j) { return !kBounded || static_cast<uint32_t>(idx[j]) < pend; };
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  if constexpr (std::is_same<S, float>::value && NV % 2 == 0) {
    // fp32 on AVX-512: the same lanes, two ymm accumulators joined per zmm, so each
    // nonzero costs NV / 2 loads and FMAs (1.12-1.2x on a Xeon's two 512-bit FMA ports,
    // DEVELOPERS.md). Every lane sums the same terms in the same order as the ymm loop:
    // results are equal bit for bit.
    constexpr int NZ = NV / 2;
    __m512 z0[NZ], z1[NZ];
    for (int v = 0; v < NZ; ++v) {
      z0[v] = _mm512_insertf32x8(_mm512_castps256_ps512((__m256)a0[2 * v]), (__m256)a0[2 * v + 1], 1);
      z1[v] = _mm512_insertf32x8(_mm512_castps256_ps512((__m256)a1[2 * v]), (__m256)a1[2 * v + 1], 1);
    }
    for (; k + 1 < kend && in_panel(k + 1); k += 2) {
      const float* p0 = xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k])) * T;
      const float* p1 = xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k + 1])) * T;
      const __m512 w0 = _mm512_set1_ps(vals[k]), w1 = _mm512_set1_ps(vals[k + 1]);
      for (int v = 0; v < NZ; ++v) {
        z0[v] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p0 + 16 * v), z0[v]);
        z1[v] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p1 + 16 * v), z1[v]);
      }
    }
    if (k < kend && in_panel(k)) {
      const float* p0 = xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k])) * T;
      const __m512 w0 = _mm512_set1_ps(vals[k]);
      for (int v = 0; v < NZ; ++v) z0[v] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p0 + 16 * v), z0[v]);
      ++k;
    }
    for (int v = 0; v < NZ; ++v) {
      a0[2 * v] = (Vec)_mm512_castps512_ps256(z0[v]);
      a0[2 * v + 1] = (Vec)_mm512_extractf32x8_ps(z0[v], 1);
      a1[2 * v] = (Vec)_mm512_castps512_ps256(z1[v]);
      a1[2 * v + 1] = (Vec)_mm512_extractf32x8_ps(z1[v], 1);
    }
    return k;
  }
#endif
  for (; k + 1 < kend && in_panel(k + 1); k += 2) {
    const uint64_t c0 = static_cast<uint32_t>(idx[k]);
    const uint64_t c1 = static_cast<uint32_t>(idx[k + 1]);
    const A w0 = to_acc(vals[k]), w1 = to_acc(vals[k + 1]);
    Vec x0[NV], x1[NV];
    widen_row<S, NV>(xt + c0 * T, x0);
    widen_row<S, NV>(xt + c1 * T, x1);
    for (int v = 0; v < NV; ++v) {
      a0[v] += w0 * x0[v];
      a1[v] += w1 * x1[v];
    }
  }
  if (k < kend && in_panel(k)) {
    const uint64_t c0 = static_cast<uint32_t>(idx[k]);
    const A w0 = to_acc(vals[k]);
    Vec x0[NV];
    widen_row<S, NV>(xt + c0 * T, x0);
    for (int v = 0; v < NV; ++v) a0[v] += w0 * x0[v];
    ++k;
  }
  return k;
}

// CSR rows [r0, r1) of A times the packed tile:
// y[n0 + t][r] = bias[r] + sum_k vals[k] * xt[idx[k]][t]. Forward uses A = W; dX uses
// A = W^T with W's values gathered into W^T's order once per call (the launcher).
template <typename S, int NV>
void csr_spmm_tile(const int32_t* offs, const int32_t* idx, const S* vals, const S* xt,
                   int64_t r0, int64_t r1, S* y, int64_t ldy, int64_t n0, int64_t nvalid,
                   const Acc<S>* bias) {
  using Cfg = TileConfig<S, NV>;
  using A = typename Cfg::A;
  using Vec = typename Cfg::Vec;
  constexpr int T = Cfg::kTile;
  constexpr int RG = Cfg::kRowGroup;
  alignas(64) A buf[RG * T];
  for (int64_t rg = r0; rg < r1; rg += RG) {
    const int64_t re = std::min<int64_t>(rg + RG, r1);
    for (int64_t r = rg; r < re; ++r) {
      Vec a0[NV], a1[NV];
      for (int v = 0; v < NV; ++v) { a0[v] = Vec{} ; a1[v] = Vec{}; }
      csr_row_fma<S, NV, false>(idx, vals, xt, offs[r], offs[r + 1], 0, a0, a1);
      const A b = bias ? bias[r] : A(0);
      for (int v = 0; v < NV; ++v) a0[v] += a1[v] + b;
      natural_row<S, NV>(a0);
      Vec* out = reinterpret_cast<Vec*>(buf + (r - rg) * T);
      for (int v = 0; v < NV; ++v) out[v] = a0[v];
    }
    store_transposed<S, T>(buf, re - rg, y, ldy, n0, nvalid, rg);
  }
}

// csr_spmm_tile in column panels of pw features: within each group of RG rows,
// panels outer and rows inner, so one x panel (pw * T elements, 32 KiB for pw = 256
// in fp32) stays in L1 while the RG rows read their next segment from per-row
// cursors (no second copy of the structure); partial sums wait in buf between
// panels. Pays when rows are dense (the launcher's rule). Each row's remaining
// entries all go to its last panel (pend = K), so every entry is summed exactly
// once whatever the order of a row's columns.
template <typename S, int NV>
void csr_spmm_tile_panels(const int32_t* offs, const int32_t* idx, const S* vals, const S* xt,
                          int64_t r0, int64_t r1, S* y, int64_t ldy, int64_t n0, int64_t nvalid,
                          const Acc<S>* bias, int64_t K, int64_t pw) {
  using Cfg = TileConfig<S, NV>;
  using A = typename Cfg::A;
  using Vec = typename Cfg::Vec;
  constexpr int T = Cfg::kTile;
  constexpr int RG = Cfg::kRowGroup;
  alignas(64) A buf[RG * T];
  int64_t cur[RG];
  for (int64_t rg = r0; rg < r1; rg += RG) {
    const int64_t re = std::min<int64_t>(rg + RG, r1);
    for (int64_t r = rg; r < re; ++r) cur[r - rg] = offs[r];
    for (int64_t p0 = 0; p0 < K; p0 += pw) {
      const uint32_t pend = static_cast<uint32_t>(std::min<int64_t>(p0 + pw, K));
      const bool last = p0 + pw >= K;
      for (int64_t r = rg; r < re; ++r) {
        Vec* out = reinterpret_cast<Vec*>(buf + (r - rg) * T);
        Vec a0[NV], a1[NV];
        for (int v = 0; v < NV; ++v) { a0[v] = p0 == 0 ? Vec{} : out[v]; a1[v] = Vec{}; }
        cur[r - rg] = csr_row_fma<S, NV, true>(idx, vals, xt, cur[r - rg], offs[r + 1], pend, a0, a1);
        const A b = last && bias ? bias[r] : A(0);
        for (int v = 0; v < NV; ++v) a0[v] += a1[v] + b;
        if (last) natural_row<S, NV>(a0);
        for (int v = 0; v < NV; ++v) out[v] = a0[v];
      }
    }
    store_transposed<S, T>(buf, re - rg, y, ldy, n0, nvalid, rg);
  }
}

// The lanes BSR kernels compute in: one 32-byte vector per 8 fp32 (NV per tile row), or,
// for fp32 on AVX-512 with an even NV, one 64-byte vector per 16 (NV / 2): half the loads
// and FMAs, the same lanes summed in the same order (bit for bit the same results).
template <typename S, int NV, typename = void>
struct BlockLanes {
  using Vec = Vec32<Acc<S>>;
  using VecU = Vec32U<Acc<S>>;
  static constexpr int kN = NV;
  static constexpr int kW = kLanes<Acc<S>>;
  static Vec load(const S* p) { return widen_load(p); }
  static VecU loadu(const S* p) { return widen_loadu(p); }
};
#if defined(__AVX512F__)
template <int NV>
struct BlockLanes<float, NV, std::enable_if_t<NV % 2 == 0>> {
  typedef float Vec __attribute__((vector_size(64), aligned(64)));
  typedef float VecU __attribute__((vector_size(64), aligned(4)));
  static constexpr int kN = NV / 2;
  static constexpr int kW = 16;
  static Vec load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
  static VecU loadu(const float* p) { return *reinterpret_cast<const VecU*>(p); }
};
#endif

// BSR block rows [r0, r1) (block size bs, a multiple of 4) times the packed
// tile. kTransBlock reads each block transposed (for dX through W^T's perm).
// Four block rows share each loaded x vector: 0.5 loads per FMA instead of 1.
template <typename S, int NV, bool kPerm, bool kTransBlock>
void bsr_spmm_tile(const int32_t* offs, const int32_t* idx, const int32_t* perm,
                   const S* vals, int64_t bs, const S* xt, int64_t r0,
                   int64_t r1, S* y, int64_t ldy, int64_t n0, int64_t nvalid,
                   const Acc<S>* bias) {
  using Cfg = TileConfig<S, NV>;
  using A = typename Cfg::A;
  constexpr int T = Cfg::kTile;
  constexpr int RS = 4;  // block rows per register group
  // 16-bit lanes are widened once per x vector and kept in registers when
  // there are enough (AVX-512: 32); otherwise the FMAs read x from memory.
#if defined(__AVX512F__)
  constexpr bool kHoist = is_16bit_v<S>;
#else
  constexpr bool kHoist = false;
#endif
  using L = BlockLanes<S, NV>;
  using Vec = typename L::Vec;
  alignas(64) A buf[64 * T];  // one block row of output, bs <= 64
  const int64_t bb = bs * bs;
  for (int64_t br = r0; br < r1; ++br) {
    for (int64_t i0 = 0; i0 < bs; i0 += RS) {
      Vec acc[RS][L::kN];
      for (int i = 0; i < RS; ++i)
        for (int v = 0; v < L::kN; ++v) acc[i][v] = Vec{};
      for (int64_t k = offs[br]; k < offs[br + 1]; ++k) {
        const uint64_t bc = static_cast<uint32_t>(idx[k]);
        const uint64_t p = kPerm ? static_cast<uint32_t>(perm[k]) : k;
        const S* blk = vals + p * bb;
        const S* xb = xt + bc * bs * T;
        for (int64_t c = 0; c < bs; ++c) {
          const S* xc = xb + c * T;
          Vec xv[L::kN];
          if constexpr (kHoist) widen_row<S, NV>(xc, xv);
          for (int i = 0; i < RS; ++i) {
            const A w = to_acc(kTransBlock ? blk[c * bs + i0 + i] : blk[(i0 + i) * bs + c]);
            for (int v = 0; v < L::kN; ++v) acc[i][v] += w * (kHoist ? xv[v] : L::load(xc + v * L::kW));
          }
        }
      }
      for (int i = 0; i < RS; ++i) {
        const A b = bias ? bias[br * bs + i0 + i] : A(0);
        if constexpr (kHoist) natural_row<S, NV>(acc[i]);
        Vec* out = reinterpret_cast<Vec*>(buf + (i0 + i) * T);
        for (int v = 0; v < L::kN; ++v) out[v] = acc[i][v] + b;
      }
    }
    store_transposed<S, T>(buf, bs, y, ldy, n0, nvalid, br * bs);
  }
}

template <typename scalar_t, typename Vec, int W>
inline scalar_t hsum(Vec v) {
  scalar_t s = v[0];
  for (int i = 1; i < W; ++i) s += v[i];
  return s;
}

// out[j] += hsum(p[j]) for j < n. Eight fp32 dot products are reduced
// together by an hadd tree (7 shuffling adds for 8 sums instead of ~5 each).
template <typename scalar_t, typename Vec, int W, bool ADD = true>
inline void hsum_many(const Vec* p, int n, scalar_t* out) {
#if defined(__AVX__)
  if constexpr (std::is_same<scalar_t, float>::value && W == 8) {
    if (n == 8) {
      const __m256 s01 = _mm256_hadd_ps((__m256)p[0], (__m256)p[1]);
      const __m256 s23 = _mm256_hadd_ps((__m256)p[2], (__m256)p[3]);
      const __m256 s45 = _mm256_hadd_ps((__m256)p[4], (__m256)p[5]);
      const __m256 s67 = _mm256_hadd_ps((__m256)p[6], (__m256)p[7]);
      const __m256 s03 = _mm256_hadd_ps(s01, s23);
      const __m256 s47 = _mm256_hadd_ps(s45, s67);
      const __m256 lo = _mm256_permute2f128_ps(s03, s47, 0x20);
      const __m256 hi = _mm256_permute2f128_ps(s03, s47, 0x31);
      const __m256 sum = _mm256_add_ps(lo, hi);
      _mm256_storeu_ps(out, ADD ? _mm256_add_ps(_mm256_loadu_ps(out), sum) : sum);
      return;
    }
  }
#endif
  for (int j = 0; j < n; ++j) out[j] = (ADD ? out[j] : scalar_t(0)) + hsum<scalar_t, Vec, W>(p[j]);
}

// One output row's dy rows from NB batch tiles, held in registers by csr_sddmm_tile;
// dot(xt, c) is the lane-wise sum over the NB tiles of dy[b][r][:] * xt[b][c][:], one
// vector whose lanes csr_sddmm_tile then reduces. The dy rows are widened into pair order,
// as the x rows are: only sums over lanes follow.
template <typename S, int NV, int NB, typename = void>
struct SddmmDyRows {
  using Vec = Vec32<Acc<S>>;
  static constexpr int T = TileConfig<S, NV>::kTile;
  Vec d[NB][NV];
  void load(const S* const (&dyt)[NB], int64_t r) {
    for (int b = 0; b < NB; ++b) widen_row<S, NV>(dyt[b] + r * T, d[b]);
  }
  Vec dot(const S* const (&xt)[NB], uint64_t c) const {
    Vec p[NB];
    for (int b = 0; b < NB; ++b) {
      Vec xv[NV];
      widen_row<S, NV>(xt[b] + c * T, xv);
      p[b] = d[b][0] * xv[0];
      for (int v = 1; v < NV; ++v) p[b] += d[b][v] * xv[v];
    }
    for (int b = 1; b < NB; ++b) p[0] += p[b];
    return p[0];
  }
};

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// fp32 on AVX-512: zmm loads and FMAs, NV / 2 per tile and nonzero (see csr_row_fma); the
// two halves are added before csr_sddmm_tile's lane reduction (another fixed order).
template <int NV, int NB>
struct SddmmDyRows<float, NV, NB, std::enable_if_t<NV % 2 == 0>> {
  static constexpr int T = TileConfig<float, NV>::kTile;
  static constexpr int NZ = NV / 2;
  __m512 d[NB][NZ];
  void load(const float* const (&dyt)[NB], int64_t r) {
    for (int b = 0; b < NB; ++b)
      for (int v = 0; v < NZ; ++v) d[b][v] = _mm512_loadu_ps(dyt[b] + r * T + 16 * v);
  }
  Vec32<float> dot(const float* const (&xt)[NB], uint64_t c) const {
    __m512 p = _mm512_mul_ps(d[0][0], _mm512_loadu_ps(xt[0] + c * T));
    for (int v = 1; v < NZ; ++v) p = _mm512_fmadd_ps(d[0][v], _mm512_loadu_ps(xt[0] + c * T + 16 * v), p);
    for (int b = 1; b < NB; ++b)
      for (int v = 0; v < NZ; ++v) p = _mm512_fmadd_ps(d[b][v], _mm512_loadu_ps(xt[b] + c * T + 16 * v), p);
    return (Vec32<float>)_mm256_add_ps(_mm512_castps512_ps256(p), _mm512_extractf32x8_ps(p, 1));
  }
};
#endif

// SDDMM over CSR rows [r0, r1) for NB batch tiles at once:
// out[k] += sum_b <dyt[b][r][:], xt[b][idx[k]][:]> (ADD) or out[k] = ... (the
// first tiles: the output needs no zero fill). Taking NB tiles per pass reads
// and writes out[] and reduces across lanes once per NB tiles (1.05-1.2x at
// NB = 2-4, DEVELOPERS.md); the launcher picks NB so the x tiles stay in L2.
// The caller sums the passes in order, so the result is deterministic.
template <typename S, int NV, int NB, bool ADD>
void csr_sddmm_tile(const int32_t* offs, const int32_t* idx, const S* const (&dyt)[NB],
                    const S* const (&xt)[NB], int64_t r0, int64_t r1, Acc<S>* out) {
  using Cfg = TileConfig<S, NV>;
  using A = typename Cfg::A;
  using Vec = typename Cfg::Vec;
  constexpr int W = Cfg::kVecWidth;
  static_assert(NB >= 1 && NB * NV <= 16, "csr_sddmm_tile: NB x NV dy vectors must fit in registers");
  Vec pbuf[8];
  for (int64_t r = r0; r < r1; ++r) {
    SddmmDyRows<S, NV, NB> d;
    d.load(dyt, r);
    int np = 0;
    const int64_t kend = offs[r + 1];
    for (int64_t k = offs[r]; k < kend; ++k) {
      pbuf[np++] = d.dot(xt, static_cast<uint32_t>(idx[k]));
      if (np == 8) {
        hsum_many<A, Vec, W, ADD>(pbuf, 8, out + k - 7);
        np = 0;
      }
    }
    hsum_many<A, Vec, W, ADD>(pbuf, np, out + kend - np);
  }
}

// dX for one batch tile in scatter form: dxt[c][:] += w(r, c) * dyt[r][:] over
// W's rows in storage order, so values stream sequentially. The launcher takes it
// for fp32/fp64 at two or more tiles per thread; the gather form (csr_spmm_tile on
// W^T with values gathered once per call) is faster for 16-bit tiles and small
// batches (DEVELOPERS.md). The caller gives each thread its own tile and zeroed dxt.
// dxt holds compute lanes (fp32 for 16-bit S), dyt S.
template <typename S, int NV>
void csr_spmm_t_scatter_tile(const int32_t* offs, const int32_t* idx, const S* vals,
                             int64_t R, const S* dyt, Acc<S>* dxt) {
  using Cfg = TileConfig<S, NV>;
  using A = typename Cfg::A;
  using Vec = typename Cfg::Vec;
  constexpr int T = Cfg::kTile;
  for (int64_t r = 0; r < R; ++r) {
    Vec d[NV];
    widen_row<S, NV>(dyt + r * T, d);
    natural_row<S, NV>(d);  // dxt keeps natural order
    for (int64_t k = offs[r]; k < offs[r + 1]; ++k) {
      const uint64_t c = static_cast<uint32_t>(idx[k]);
      const A w = to_acc(vals[k]);
      Vec* o = reinterpret_cast<Vec*>(dxt + c * T);
      for (int v = 0; v < NV; ++v) o[v] += w * d[v];
    }
  }
}

// SDDMM over BSR block rows [r0, r1): out[k][i][j] += <dyt[br*bs+i], xt[bc*bs+j]>.
template <typename S, int NV>
void bsr_sddmm_tile(const int32_t* offs, const int32_t* idx, int64_t bs, const S* dyt,
                    const S* xt, int64_t r0, int64_t r1, bool add, Acc<S>* out) {
  using Cfg = TileConfig<S, NV>;
  using A = typename Cfg::A;
  using Vec = typename Cfg::Vec;
  constexpr int T = Cfg::kTile;
  constexpr int W = Cfg::kVecWidth;
  for (int64_t br = r0; br < r1; ++br) {
    for (int64_t k = offs[br]; k < offs[br + 1]; ++k) {
      const uint64_t bc = static_cast<uint32_t>(idx[k]);
      A* o = out + k * bs * bs;
      for (int64_t i = 0; i < bs; ++i) {
        Vec d[NV];  // pair order, as the x rows
        widen_row<S, NV>(dyt + (br * bs + i) * T, d);
        for (int64_t j = 0; j < bs; ++j) {
          Vec xv[NV];
          widen_row<S, NV>(xt + (bc * bs + j) * T, xv);
          Vec p = d[0] * xv[0];
          for (int v = 1; v < NV; ++v) p += d[v] * xv[v];
          o[i * bs + j] = (add ? o[i * bs + j] : A(0)) + hsum<A, Vec, W>(p);
        }
      }
    }
  }
}

// BSR SDDMM as outer products over the batch, straight from the row-major
// operands (no packing): block k of W at (br, bc) gets
//   out[k][i][j] = sum_n dy[n][br*bs + i] * x[n][bc*bs + j].
// IR rows of the block and JV vectors of columns live in registers, so each
// loaded x vector feeds IR FMAs (the tile form needs a horizontal reduction
// per output entry: 2.7x vs 7.9x dense at 4096x4096, batch 256, density 0.1,
// b = 16).
// Needs bs to be a multiple of JV * kVecWidth and of IR. Covers batch rows
// [n0, n1); with `accumulate` it adds to out (the caller chunks the batch so
// the x and dy panels stay in cache: unchunked, batch 2048 read them from DRAM).
// dy and x are S (widened as loaded), out compute lanes.
// L is the lanes: BlockLanes<S, 1> (32-byte vectors) or BlockLanes<S, 2> (64-byte
// vectors for fp32 on AVX-512).
template <typename S, int JV, int IR, typename L>
void bsr_sddmm_outer(const int32_t* offs, const int32_t* idx, int64_t bs, const S* dy,
                     int64_t ldy, const S* x, int64_t ldx, int64_t n0, int64_t n1,
                     bool accumulate, int64_t r0, int64_t r1, Acc<S>* out) {
  using A = Acc<S>;
  constexpr int W = L::kW;
  using VecU = typename L::VecU;
  static_assert(JV >= 1 && JV <= 2, "bsr_sddmm_outer: JV must be 1 or 2");
  static_assert(IR * JV <= 16, "bsr_sddmm_outer: IR x JV accumulators must fit in 16 registers");
  for (int64_t br = r0; br < r1; ++br) {
    for (int64_t k = offs[br]; k < offs[br + 1]; ++k) {
      const int64_t bc = static_cast<uint32_t>(idx[k]);
      A* o = out + k * bs * bs;
      for (int64_t j0 = 0; j0 < bs; j0 += JV * W) {
        for (int64_t i0 = 0; i0 < bs; i0 += IR) {
          VecU acc[IR][JV];
          for (int i = 0; i < IR; ++i)
            for (int v = 0; v < JV; ++v)
              acc[i][v] = accumulate ? *reinterpret_cast<const VecU*>(o + (i0 + i) * bs + j0 + v * W)
                                     : VecU{};
          const S* xp = x + bc * bs + j0;
          const S* dp = dy + br * bs + i0;
          for (int64_t n = n0; n < n1; ++n) {
            VecU xv[JV];
            for (int v = 0; v < JV; ++v) xv[v] = L::loadu(xp + n * ldx + v * W);
            for (int i = 0; i < IR; ++i) {
              const A w = to_acc(dp[n * ldy + i]);
              for (int v = 0; v < JV; ++v) acc[i][v] += w * xv[v];
            }
          }
          for (int i = 0; i < IR; ++i)
            for (int v = 0; v < JV; ++v)
              *reinterpret_cast<VecU*>(o + (i0 + i) * bs + j0 + v * W) = acc[i][v];
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace sparsekern
