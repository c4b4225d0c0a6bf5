// bfloat16 tile kernels on AVX512-BF16 (vdpbf16ps): Zen 4, Cooper Lake, Sapphire Rapids
// and later. The generic kernels (tile_kernels.h) widen bf16 to fp32 and use fp32 FMAs;
// vdpbf16ps multiplies 32 bf16 pairs and adds each pair's two products into one of 16 fp32
// lanes, so one instruction does the work of two FMAs on widened lanes and the widening
// goes away. The products are exact in fp32 and every addition rounds to nearest even, as
// the fp32 kernels' FMAs do; bf16 subnormals are read as zero (the instruction's DAZ) and
// fp32 subnormal sums flushed to zero.
//
//   csr_spmm_tile_dot    forward (and dX through t_perm): two nonzeros of a row per
//                        vdpbf16ps: their x rows interleaved (vpunpck{l,h}wd), their values
//                        as one 32-bit broadcast pair;
//   csr_sddmm_tile_dot   dW: each nonzero's dot product over the tile's 32 batch rows is one
//                        vdpbf16ps of the dy row and the x row (pairs of batch rows).
//
// Only the T = 32 tiles (NV = 4) of the avx512 build have these kernels. The launchers call
// them when bf16_dot_enabled(): the CPU reports avx512_bf16 and SPARSEKERN_CPU_BF16_DOT is
// not 0. Same inputs as the generic kernels, same
// checks before them (the launchers'), so they too trust their inputs.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tile_kernels.h"

#if defined(__AVX512F__) && defined(__GNUC__) && (defined(__clang__) ? __clang_major__ >= 11 : __GNUC__ >= 10)
#define SPARSEKERN_BF16_DOT 1
#include <immintrin.h>
#else
#define SPARSEKERN_BF16_DOT 0
#endif

namespace sparsekern {
namespace cpu {

// Whether this build has the kernels below and the CPU runs them.
inline bool bf16_dot_supported() {
#if SPARSEKERN_BF16_DOT
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return supported;
#else
  return false;
#endif
}

// Whether a bf16 launcher takes the kernels below: supported, and SPARSEKERN_CPU_BF16_DOT
// is not "0" (read per call, once per op: tests and benchmarks compare both paths).
inline bool bf16_dot_enabled() {
  if (!bf16_dot_supported()) return false;
  const char* e = std::getenv("SPARSEKERN_CPU_BF16_DOT");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

#if SPARSEKERN_BF16_DOT
#define SPARSEKERN_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

namespace bf16dot {

// The bits of two bf16 values as one 32-bit lane: a in the low half (the first of a pair).
inline uint32_t pair_bits(c10::BFloat16 a, c10::BFloat16 b) {
  return static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(b.x) << 16);
}

// Accumulators of one output row in the order of vpunpck{l,h}wd over a 64-byte row:
// lo holds batch rows 0-3, 8-11, 16-19, 24-27, hi holds 4-7, 12-15, 20-23, 28-31.
// Back to natural order: [0, 16) and [16, 32).
SPARSEKERN_BF16_TARGET inline void natural_order(__m512 lo, __m512 hi, __m512& n0, __m512& n1) {
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i i1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  n0 = _mm512_permutex2var_ps(lo, i0, hi);
  n1 = _mm512_permutex2var_ps(lo, i1, hi);
}

SPARSEKERN_BF16_TARGET inline __m512i row(const c10::BFloat16* p) {
  return _mm512_load_si512(reinterpret_cast<const void*>(p));
}

SPARSEKERN_BF16_TARGET inline __m512 dot(__m512 acc, __m512i pairs, uint32_t w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)pairs, (__m512bh)_mm512_set1_epi32(static_cast<int>(w)));
}

}  // namespace bf16dot

// csr_spmm_tile for bf16, T = 32 (see tile_kernels.h): y[n0 + t][r] = bias[r] + sum_k
// vals[p(k)] * xt[idx[k]][t] over rows [r0, r1). Four nonzeros per step in two independent
// pairs of accumulators (vdpbf16ps has a latency of several cycles).
template <bool kPerm>
SPARSEKERN_BF16_TARGET void csr_spmm_tile_dot(const int32_t* offs, const int32_t* idx,
                                              const int32_t* perm, const c10::BFloat16* vals,
                                              const c10::BFloat16* xt, int64_t r0, int64_t r1,
                                              c10::BFloat16* y, int64_t ldy, int64_t n0,
                                              int64_t nvalid, const float* bias) {
  constexpr int T = 32;
  constexpr int RG = TileConfig<c10::BFloat16, 4>::kRowGroup;
  alignas(64) float buf[RG * T];
  const __m512i zero = _mm512_setzero_si512();
  auto val = [&](int64_t k) { return vals[kPerm ? static_cast<uint32_t>(perm[k]) : k]; };
  for (int64_t rg = r0; rg < r1; rg += RG) {
    const int64_t re = std::min<int64_t>(rg + RG, r1);
    for (int64_t r = rg; r < re; ++r) {
      __m512 lo0 = _mm512_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
      int64_t k = offs[r];
      const int64_t kend = offs[r + 1];
      for (; k + 3 < kend; k += 4) {
        const __m512i x0 = bf16dot::row(xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k])) * T);
        const __m512i x1 = bf16dot::row(xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k + 1])) * T);
        const __m512i x2 = bf16dot::row(xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k + 2])) * T);
        const __m512i x3 = bf16dot::row(xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k + 3])) * T);
        const uint32_t w01 = bf16dot::pair_bits(val(k), val(k + 1));
        const uint32_t w23 = bf16dot::pair_bits(val(k + 2), val(k + 3));
        lo0 = bf16dot::dot(lo0, _mm512_unpacklo_epi16(x0, x1), w01);
        hi0 = bf16dot::dot(hi0, _mm512_unpackhi_epi16(x0, x1), w01);
        lo1 = bf16dot::dot(lo1, _mm512_unpacklo_epi16(x2, x3), w23);
        hi1 = bf16dot::dot(hi1, _mm512_unpackhi_epi16(x2, x3), w23);
      }
      for (; k < kend; k += 2) {  // a last pair, or a single nonzero paired with zeros
        const bool two = k + 1 < kend;
        const __m512i x0 = bf16dot::row(xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k])) * T);
        const __m512i x1 =
            two ? bf16dot::row(xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k + 1])) * T) : zero;
        const uint32_t w = bf16dot::pair_bits(val(k), two ? val(k + 1) : c10::BFloat16(0.0f));
        lo0 = bf16dot::dot(lo0, _mm512_unpacklo_epi16(x0, x1), w);
        hi0 = bf16dot::dot(hi0, _mm512_unpackhi_epi16(x0, x1), w);
      }
      const __m512 b = _mm512_set1_ps(bias ? bias[r] : 0.0f);
      __m512 o0, o1;
      bf16dot::natural_order(_mm512_add_ps(lo0, lo1), _mm512_add_ps(hi0, hi1), o0, o1);
      _mm512_store_ps(buf + (r - rg) * T, _mm512_add_ps(o0, b));
      _mm512_store_ps(buf + (r - rg) * T + 16, _mm512_add_ps(o1, b));
    }
    store_transposed<c10::BFloat16, T>(buf, re - rg, y, ldy, n0, nvalid, rg);
  }
}

// csr_sddmm_tile for bf16, T = 32: out[k] (+)= <dyt[r][:], xt[idx[k]][:]> over rows [r0, r1).
// Eight nonzeros' 16-lane partial sums are folded to 8 lanes and reduced together.
template <bool ADD>
SPARSEKERN_BF16_TARGET void csr_sddmm_tile_dot(const int32_t* offs, const int32_t* idx,
                                               const c10::BFloat16* dyt, const c10::BFloat16* xt,
                                               int64_t r0, int64_t r1, float* out) {
  constexpr int T = 32;
  using Vec = Vec32<float>;
  Vec pbuf[8];
  for (int64_t r = r0; r < r1; ++r) {
    const __m512bh d = (__m512bh)bf16dot::row(dyt + r * T);
    int np = 0;
    const int64_t kend = offs[r + 1];
    for (int64_t k = offs[r]; k < kend; ++k) {
      const __m512i xv = bf16dot::row(xt + static_cast<uint64_t>(static_cast<uint32_t>(idx[k])) * T);
      const __m512 p = _mm512_dpbf16_ps(_mm512_setzero_ps(), d, (__m512bh)xv);
      pbuf[np++] = (Vec)_mm256_add_ps(_mm512_castps512_ps256(p), _mm512_extractf32x8_ps(p, 1));
      if (np == 8) {
        hsum_many<float, Vec, 8, ADD>(pbuf, 8, out + k - 7);
        np = 0;
      }
    }
    hsum_many<float, Vec, 8, ADD>(pbuf, np, out + kend - np);
  }
}

#undef SPARSEKERN_BF16_TARGET
#endif  // SPARSEKERN_BF16_DOT

}  // namespace cpu
}  // namespace sparsekern
