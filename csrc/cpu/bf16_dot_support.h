// Whether the bf16 CPU linear kernels can take the AVX512-BF16 path (tile_kernels_bf16dot.h):
// SPARSEKERN_BF16_DOT says whether this build compiles those kernels (the avx512 variant, a
// compiler that knows the instructions), bf16_dot_supported() whether this CPU runs them,
// bf16_dot_enabled() whether a launcher takes them now.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__AVX512F__) && defined(__GNUC__) && (defined(__clang__) ? __clang_major__ >= 11 : __GNUC__ >= 10)
#define SPARSEKERN_BF16_DOT 1
#else
#define SPARSEKERN_BF16_DOT 0
#endif

namespace sparsekern {
namespace cpu {

// Whether this build has the AVX512-BF16 kernels and the CPU runs them.
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

// Whether a bf16 launcher takes them: supported, and SPARSEKERN_CPU_BF16_DOT
// is not "0" (read per call, once per op: tests and benchmarks compare both paths).
inline bool bf16_dot_enabled() {
  if (!bf16_dot_supported()) return false;
  const char* e = std::getenv("SPARSEKERN_CPU_BF16_DOT");
  return e == nullptr || std::strcmp(e, "0") != 0;
}

}  // namespace cpu
}  // namespace sparsekern
