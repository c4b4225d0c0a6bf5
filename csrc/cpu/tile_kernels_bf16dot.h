// bfloat16 tile kernels on AVX512-BF16 (vdpbf16ps): Zen 4, Cooper Lake, Sapphire Rapids
// and later. The generic kernels (tile_kernels.h) widen bf16 to fp32 and use fp32 FMAs;
// vdpbf16ps multiplies 32 bf16 pairs and adds each pair's two products into one of 16 fp32
// lanes, so one instruction does the work of two FMAs on widened lanes and the widening
// goes away. The products are exact in fp32 and every addition rounds to nearest even, as
// the fp32 kernels' FMAs do; bf16 subnormals are read as zero (the instruction's DAZ) and
// fp32 subnormal sums flushed to zero.
//
//   csr_spmm_tile_dot    forward (and dX over W^T): two nonzeros of a row per
//                        vdpbf16ps: their x rows interleaved (vpunpck{l,h}wd), their values
//                        as one 32-bit broadcast pair;
//   csr_sddmm_tile_dot   dW: each nonzero's dot product over the tile's 32 batch rows is one
//                        vdpbf16ps of the dy row and the x row (pairs of batch rows);
//   bsr_spmm_tile_dot    BSR forward and dX: two block columns per vdpbf16ps, each unpacked
//                        pair of x rows feeding RS block rows;
//   bsr_sddmm_outer_dot  BSR dW as outer products over pairs of batch rows, 16 block columns
//                        a step (ymm), for blocks a multiple of 16 wide.
//
// Only the T = 32 tiles (NV = 4) of the avx512 build have these kernels. The launchers call
// them when bf16_dot_enabled(): the CPU reports avx512_bf16 and SPARSEKERN_CPU_BF16_DOT is
// not 0 (bf16_dot_support.h). Same inputs as the generic kernels, same checks before them
// (the launchers'), so they too trust their inputs.
#pragma once

#include <cstdint>
#include <cstring>

#include "bf16_dot_support.h"
#if SPARSEKERN_BF16_DOT
#include <immintrin.h>
#endif
#include "tile_kernels.h"

namespace sparsekern {
namespace cpu {

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
// vals[k] * xt[idx[k]][t] over rows [r0, r1). Four nonzeros per step in two independent
// pairs of accumulators (vdpbf16ps has a latency of several cycles); a pair's two values
// are adjacent in vals, so they are one 32-bit broadcast.
SPARSEKERN_BF16_TARGET inline void csr_spmm_tile_dot(const int32_t* offs, const int32_t* idx,
                                                     const c10::BFloat16* vals, const c10::BFloat16* xt,
                                                     int64_t r0, int64_t r1, c10::BFloat16* y,
                                                     int64_t ldy, int64_t n0, int64_t nvalid,
                                                     const float* bias) {
  constexpr int T = 32;
  constexpr int RG = TileConfig<c10::BFloat16, 4>::kRowGroup;
  alignas(64) float buf[RG * T];
  const __m512i zero = _mm512_setzero_si512();
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
        uint32_t w01, w23;
        std::memcpy(&w01, vals + k, sizeof(w01));
        std::memcpy(&w23, vals + k + 2, sizeof(w23));
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
        const uint32_t w = bf16dot::pair_bits(vals[k], two ? vals[k + 1] : c10::BFloat16(0.0f));
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
SPARSEKERN_BF16_TARGET inline void csr_sddmm_tile_dot(const int32_t* offs, const int32_t* idx,
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

namespace bf16dot {
// RS block rows i0 .. i0 + RS - 1 of block row br (see bsr_spmm_tile_dot), into buf.
template <int RS, bool kPerm, bool kTransBlock>
SPARSEKERN_BF16_TARGET inline void bsr_rows(const int32_t* offs, const int32_t* idx, const int32_t* perm,
                                            const c10::BFloat16* vals, int64_t bs, const c10::BFloat16* xt,
                                            int64_t br, int64_t i0, const float* bias, float* buf) {
  constexpr int T = 32;
  const int64_t bb = bs * bs;
  __m512 lo[RS], hi[RS];
  for (int i = 0; i < RS; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  for (int64_t k = offs[br]; k < offs[br + 1]; ++k) {
    const uint64_t bc = static_cast<uint32_t>(idx[k]);
    const uint64_t p = kPerm ? static_cast<uint32_t>(perm[k]) : k;
    const c10::BFloat16* blk = vals + p * bb;
    const c10::BFloat16* xb = xt + bc * bs * T;
    for (int64_t c = 0; c < bs; c += 2) {  // bs is even
      const __m512i x0 = row(xb + c * T), x1 = row(xb + (c + 1) * T);
      const __m512i plo = _mm512_unpacklo_epi16(x0, x1), phi = _mm512_unpackhi_epi16(x0, x1);
      for (int i = 0; i < RS; ++i) {
        const int64_t r = i0 + i;
        uint32_t w;
        if constexpr (kTransBlock)
          w = pair_bits(blk[c * bs + r], blk[(c + 1) * bs + r]);
        else
          std::memcpy(&w, blk + r * bs + c, sizeof(w));  // (c, c + 1) adjacent in the block row
        lo[i] = dot(lo[i], plo, w);
        hi[i] = dot(hi[i], phi, w);
      }
    }
  }
  for (int i = 0; i < RS; ++i) {
    const __m512 b = _mm512_set1_ps(bias ? bias[br * bs + i0 + i] : 0.0f);
    __m512 o0, o1;
    natural_order(lo[i], hi[i], o0, o1);
    _mm512_store_ps(buf + (i0 + i) * T, _mm512_add_ps(o0, b));
    _mm512_store_ps(buf + (i0 + i) * T + 16, _mm512_add_ps(o1, b));
  }
}
}  // namespace bf16dot

// bsr_spmm_tile for bf16, T = 32 (see tile_kernels.h): block rows [r0, r1) of A (W, or W^T
// read through perm with each block transposed) times the packed tile. Each pair of block
// columns (c, c + 1) is one unpacked pair of x rows, used by 8 block rows at once (16 zmm
// accumulators of the 32 registers; 4 at the tail of a block whose size is 4 mod 8).
template <bool kPerm, bool kTransBlock>
SPARSEKERN_BF16_TARGET inline void bsr_spmm_tile_dot(const int32_t* offs, const int32_t* idx,
                                                     const int32_t* perm, const c10::BFloat16* vals,
                                                     int64_t bs, const c10::BFloat16* xt, int64_t r0,
                                                     int64_t r1, c10::BFloat16* y, int64_t ldy,
                                                     int64_t n0, int64_t nvalid, const float* bias) {
  constexpr int T = 32;
  alignas(64) float buf[64 * T];  // one block row of output, bs <= 64
  for (int64_t br = r0; br < r1; ++br) {
    int64_t i0 = 0;
    for (; i0 + 8 <= bs; i0 += 8)
      bf16dot::bsr_rows<8, kPerm, kTransBlock>(offs, idx, perm, vals, bs, xt, br, i0, bias, buf);
    if (i0 < bs)  // bs is a multiple of 4
      bf16dot::bsr_rows<4, kPerm, kTransBlock>(offs, idx, perm, vals, bs, xt, br, i0, bias, buf);
    store_transposed<c10::BFloat16, T>(buf, bs, y, ldy, n0, nvalid, br * bs);
  }
}

// bsr_sddmm_outer for bf16 (see tile_kernels.h), blocks a multiple of 16 wide: block k at
// (br, bc) gets out[k][i][j] (+)= sum_n dy[n][br*bs + i] * x[n][bc*bs + j] over batch rows
// [n0, n1), two batch rows per vdpbf16ps: x rows n and n + 1 unpacked into pairs (16 block
// columns a step, pair order: lanes 0-3 and 8-11 in one register, 4-7 and 12-15 in the
// other), the two dy values one broadcast pair; 8 block rows x 2 ymm accumulators.
SPARSEKERN_BF16_TARGET inline void bsr_sddmm_outer_dot(const int32_t* offs, const int32_t* idx, int64_t bs,
                                                const c10::BFloat16* dy, int64_t ldy,
                                                const c10::BFloat16* x, int64_t ldx, int64_t n0,
                                                int64_t n1, bool accumulate, int64_t r0, int64_t r1,
                                                float* out) {
  constexpr int IR = 8;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t br = r0; br < r1; ++br) {
    for (int64_t k = offs[br]; k < offs[br + 1]; ++k) {
      const int64_t bc = static_cast<uint32_t>(idx[k]);
      float* o = out + k * bs * bs;
      for (int64_t j0 = 0; j0 < bs; j0 += 16) {
        for (int64_t i0 = 0; i0 < bs; i0 += IR) {
          __m256 lo[IR], hi[IR];
          for (int i = 0; i < IR; ++i) {
            if (accumulate) {  // natural order -> pair order (the same two lane swaps)
              const __m256 a = _mm256_loadu_ps(o + (i0 + i) * bs + j0);
              const __m256 b = _mm256_loadu_ps(o + (i0 + i) * bs + j0 + 8);
              lo[i] = _mm256_permute2f128_ps(a, b, 0x20);
              hi[i] = _mm256_permute2f128_ps(a, b, 0x31);
            } else {
              lo[i] = hi[i] = _mm256_setzero_ps();
            }
          }
          const c10::BFloat16* xp = x + bc * bs + j0;
          const c10::BFloat16* dp = dy + br * bs + i0;
          for (int64_t n = n0; n < n1; n += 2) {
            const bool two = n + 1 < n1;
            const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + n * ldx));
            const __m256i xb =
                two ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + (n + 1) * ldx)) : zero;
            const __m256bh plo = (__m256bh)_mm256_unpacklo_epi16(xa, xb);
            const __m256bh phi = (__m256bh)_mm256_unpackhi_epi16(xa, xb);
            for (int i = 0; i < IR; ++i) {
              const uint32_t w = bf16dot::pair_bits(dp[n * ldy + i],
                                                    two ? dp[(n + 1) * ldy + i] : c10::BFloat16(0.0f));
              const __m256bh wb = (__m256bh)_mm256_set1_epi32(static_cast<int>(w));
              lo[i] = _mm256_dpbf16_ps(lo[i], plo, wb);
              hi[i] = _mm256_dpbf16_ps(hi[i], phi, wb);
            }
          }
          for (int i = 0; i < IR; ++i) {
            _mm256_storeu_ps(o + (i0 + i) * bs + j0, _mm256_permute2f128_ps(lo[i], hi[i], 0x20));
            _mm256_storeu_ps(o + (i0 + i) * bs + j0 + 8, _mm256_permute2f128_ps(lo[i], hi[i], 0x31));
          }
        }
      }
    }
  }
}

#undef SPARSEKERN_BF16_TARGET
#endif  // SPARSEKERN_BF16_DOT

}  // namespace cpu
}  // namespace sparsekern
