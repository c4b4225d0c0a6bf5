// Element types of the CPU linear kernels' packed tiles, and their compute lanes.
//
// A tile stores its elements as the operands' dtype `S` (float, double,
// c10::BFloat16, c10::Half) and the kernels compute in `Acc<S>` (fp32 for the
// 16-bit types, else S itself): every load widens a vector of S into compute
// lanes in registers, and every result is rounded once, when it is stored.
// So a bf16/fp16 tile moves half the bytes of an fp32 one through the caches
// (the CSR kernels are bound by that traffic: tile_kernels.h), while the sums
// are fp32, as torch's own CPU bf16/fp16 matmul accumulates.
//
//   widen_load<S>(p)      32 bytes of compute lanes (8 fp32 or 4 fp64) from S's at p
//   widen_row<S, NV>(p)   NV such vectors of one tile row, in pair order (below)
//   natural_row<S, NV>    puts a row's vectors from pair order into natural order
//   round_store<S>(p)     lanes rounded to S (round to nearest even, as torch's casts)
//   to_acc(s)             one S as a compute scalar
//   transpose8x8_16       packing and transposed stores of 16-bit elements (SSE2)
//
// Pair order: a bf16 row is widened 16 elements at a time by interleaving a
// 32-byte load with zeros (vpunpck{l,h}wd: one shuffle per 8 lanes, against a
// zero-extension and a shift for widen_load; measured on Zen 4 with a CSR tile
// loop, 1.0-1.4 ns per nonzero against 1.6-2.0). The lanes then come in the
// order of those shuffles: the first vector holds elements 0-3 and 8-11, the
// second 4-7 and 12-15. A kernel that only sums over lanes (the SDDMM's dot
// products) widens both operands alike and never reorders; a kernel that keeps
// lanes apart (SpMM accumulators, the dX scatter's dy rows) calls natural_row
// once per output row or per dy row, not per nonzero. For every other type
// pair order is the natural order.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace sparsekern {
namespace cpu {

template <typename S>
constexpr bool is_16bit_v = std::is_same<S, c10::BFloat16>::value || std::is_same<S, c10::Half>::value;

template <typename S>
using Acc = typename std::conditional<is_16bit_v<S>, float, S>::type;

// 32 bytes of compute lanes: the one vector type of the tile kernels (`type`), and
// the same at any alignment (`unaligned`, for row-major operands). GCC drops
// vector attributes on a dependent alias, hence one specialisation per type.
template <typename A>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32), aligned(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32), aligned(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8)));
};
template <typename A>
using Vec32 = typename VecOf<A>::type;
template <typename A>
using Vec32U = typename VecOf<A>::unaligned;

template <typename A>
constexpr int kLanes = 32 / static_cast<int>(sizeof(A));

inline float to_acc(c10::BFloat16 s) { return static_cast<float>(s); }
inline float to_acc(c10::Half s) { return static_cast<float>(s); }
inline float to_acc(float s) { return s; }
inline double to_acc(double s) { return s; }

namespace lanes_detail {
typedef uint16_t U16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t U32x8 __attribute__((vector_size(32), aligned(32)));
typedef float F32x8 __attribute__((vector_size(32), aligned(32)));

inline F32x8 bf16_to_f32(U16x8 h) {
  const U32x8 w = __builtin_convertvector(h, U32x8) << 16;
  F32x8 f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// c10::BFloat16's rounding (round_to_nearest_even), eight lanes at once: NaN -> 0x7fc0.
inline U16x8 f32_to_bf16(F32x8 f) {
  U32x8 u;
  std::memcpy(&u, &f, sizeof(u));
  const U32x8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U32x8 nan = (U32x8)((u & 0x7fffffffu) > 0x7f800000u);  // all ones where NaN
  const U32x8 r = (rounded & ~nan) | (nan & 0x7fc0u);
  return __builtin_convertvector(r, U16x8);
}
}  // namespace lanes_detail

// Compute lanes from 32 / sizeof(Acc) elements of S at p (any alignment for
// 16-bit S; 32-byte aligned for float/double, as the packed tiles are).
template <typename S, bool kAligned = true>
inline Vec32<Acc<S>> widen_load(const S* p) {
  using A = Acc<S>;
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
#if defined(__AVX2__)
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (Vec32<float>)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
    lanes_detail::U16x8 h;
    std::memcpy(&h, p, sizeof(h));
    return lanes_detail::bf16_to_f32(h);
#endif
  } else if constexpr (std::is_same<S, c10::Half>::value) {
#if defined(__F16C__)
    return (Vec32<float>)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    Vec32<float> f;
    for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
    return f;
#endif
  } else if constexpr (kAligned) {
    return *reinterpret_cast<const Vec32<A>*>(p);
  } else {
    return *reinterpret_cast<const Vec32U<A>*>(p);
  }
}

template <typename S>
inline Vec32<Acc<S>> widen_loadu(const S* p) {
  return widen_load<S, false>(p);
}

#if defined(__AVX2__)
template <typename S>
constexpr bool kPairPermuted = std::is_same<S, c10::BFloat16>::value;
#else
template <typename S>
constexpr bool kPairPermuted = false;
#endif

// Two vectors of compute lanes from 2 * kLanes elements at p, in pair order.
template <typename S>
inline void widen_load2(const S* p, Vec32<Acc<S>>& a, Vec32<Acc<S>>& b) {
  if constexpr (kPairPermuted<S>) {
#if defined(__AVX2__)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    a = (Vec32<float>)_mm256_unpacklo_epi16(z, v);
    b = (Vec32<float>)_mm256_unpackhi_epi16(z, v);
#endif
  } else {
    a = widen_load(p);
    b = widen_load(p + kLanes<Acc<S>>);
  }
}

// (a, b) from pair order to natural order (a = elements 0-7, b = 8-15).
template <typename S>
inline void natural_order2(Vec32<Acc<S>>& a, Vec32<Acc<S>>& b) {
  if constexpr (kPairPermuted<S>) {
#if defined(__AVX2__)
    const __m256 lo = (__m256)a, hi = (__m256)b;
    a = (Vec32<float>)_mm256_permute2f128_ps(lo, hi, 0x20);
    b = (Vec32<float>)_mm256_permute2f128_ps(lo, hi, 0x31);
#endif
  }
}

// The NV vectors of one tile row at p, in pair order (natural order when NV is odd).
template <typename S, int NV>
inline void widen_row(const S* p, Vec32<Acc<S>> (&x)[NV]) {
  constexpr int W = kLanes<Acc<S>>;
  if constexpr (NV % 2 == 0) {
    for (int v = 0; v < NV; v += 2) widen_load2(p + v * W, x[v], x[v + 1]);
  } else {
    for (int v = 0; v < NV; ++v) x[v] = widen_load(p + v * W);
  }
}

template <typename S, int NV>
inline void natural_row(Vec32<Acc<S>> (&x)[NV]) {
  if constexpr (NV % 2 == 0)
    for (int v = 0; v < NV; v += 2) natural_order2<S>(x[v], x[v + 1]);
}

// Round compute lanes to S and store them at p (any alignment for 16-bit S).
template <typename S, bool kAligned = true>
inline void round_store(S* p, Vec32<Acc<S>> v) {
  if constexpr (std::is_same<S, c10::BFloat16>::value) {
    const lanes_detail::U16x8 h = lanes_detail::f32_to_bf16(v);
    std::memcpy(p, &h, sizeof(h));
  } else if constexpr (std::is_same<S, c10::Half>::value) {
#if defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int i = 0; i < 8; ++i) p[i] = c10::Half(v[i]);
#endif
  } else if constexpr (kAligned) {
    *reinterpret_cast<Vec32<S>*>(p) = v;
  } else {
    *reinterpret_cast<Vec32U<S>*>(p) = v;
  }
}

// 8x8 transpose of 16-bit elements: dst[j * ldd + i] = src[i * lds + j].
template <typename S>
inline bool transpose8x8_16(const S* src, int64_t lds, S* dst, int64_t ldd) {
  static_assert(sizeof(S) == 2, "transpose8x8_16: 16-bit elements only");
#if defined(__SSE2__)
  __m128i a[8], b[8], c[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * lds));
  for (int i = 0; i < 8; i += 2) {
    b[i] = _mm_unpacklo_epi16(a[i], a[i + 1]);
    b[i + 1] = _mm_unpackhi_epi16(a[i], a[i + 1]);
  }
  // c[0..3]: rows 0-3, columns (0,1) (2,3) (4,5) (6,7); c[4..7]: rows 4-7.
  for (int h = 0; h < 2; ++h) {
    c[4 * h + 0] = _mm_unpacklo_epi32(b[4 * h + 0], b[4 * h + 2]);
    c[4 * h + 1] = _mm_unpackhi_epi32(b[4 * h + 0], b[4 * h + 2]);
    c[4 * h + 2] = _mm_unpacklo_epi32(b[4 * h + 1], b[4 * h + 3]);
    c[4 * h + 3] = _mm_unpackhi_epi32(b[4 * h + 1], b[4 * h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j) * ldd), _mm_unpacklo_epi64(c[j], c[j + 4]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * j + 1) * ldd), _mm_unpackhi_epi64(c[j], c[j + 4]));
  }
  return true;
#else
  (void)src, (void)lds, (void)dst, (void)ldd;
  return false;
#endif
}

}  // namespace cpu
}  // namespace sparsekern
