// Tile configurations of the CUDA kernels (csrc/cuda/*.cuh), as template
// parameters checked at compile time (Sputnik's style). Device code only: no
// torch headers here, so the kernels compile with nvcc alone.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sparsekern {
namespace cuda {

// CSR SpMM on CUDA cores: C[r, n] = sum_k A[r, k] * B[k, n] (+ bias[r], ReLU).
//   kSubwarp   threads that share one sparse row (a subwarp), 1..32, power of 2
//   kRowsPerBlock  sparse rows per thread block (one subwarp each)
//   kVec       dense elements each thread loads/stores at once (16-byte vectors
//              when the operand is aligned; 1 is the scalar fallback)
//   kColsPerThread  dense columns each thread accumulates (a multiple of kVec)
template <int kSubwarp_, int kRowsPerBlock_, int kVec_, int kColsPerThread_>
struct SpmmConfig {
  static constexpr int kSubwarp = kSubwarp_;
  static constexpr int kRowsPerBlock = kRowsPerBlock_;
  static constexpr int kVec = kVec_;
  static constexpr int kColsPerThread = kColsPerThread_;
  static constexpr int kThreads = kSubwarp * kRowsPerBlock;
  static constexpr int kColsPerBlock = kSubwarp * kColsPerThread;
  static_assert(kSubwarp >= 1 && kSubwarp <= 32 && (kSubwarp & (kSubwarp - 1)) == 0,
                "kSubwarp must be a power of two in [1, 32] (a subwarp lives inside one warp)");
  static_assert(kVec == 1 || kVec == 2 || kVec == 4 || kVec == 8, "kVec must be 1, 2, 4 or 8 elements");
  static_assert(kColsPerThread % kVec == 0, "kColsPerThread must be a multiple of kVec");
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "a block must be whole warps, at most 1024 threads");
};

// CSR SDDMM: out[j] = dot(A[rows[j], :], B[cols[j], :]) over M (both row-major [*, M]).
//   kWarpsPerBlock warps per block; each warp reduces kNnzPerWarp nonzeros in turn
template <int kWarpsPerBlock_, int kNnzPerWarp_, int kVec_>
struct SddmmConfig {
  static constexpr int kWarpsPerBlock = kWarpsPerBlock_;
  static constexpr int kNnzPerWarp = kNnzPerWarp_;
  static constexpr int kVec = kVec_;
  static constexpr int kThreads = 32 * kWarpsPerBlock;
  static_assert(kWarpsPerBlock >= 1 && kWarpsPerBlock <= 32, "kWarpsPerBlock must be in [1, 32]");
  static_assert(kNnzPerWarp >= 1, "kNnzPerWarp must be >= 1");
  static_assert(kVec == 1 || kVec == 2 || kVec == 4 || kVec == 8, "kVec must be 1, 2, 4 or 8 elements");
};

// Tensor-core SpMM ("load as sparse, compute as dense"): a kTileM x kTileK tile of
// A is densified in shared memory from its CSR rows, a kTileK x kTileN tile of B
// is copied beside it, and WMMA 16x16x16 (fp16/bf16 in, fp32 accumulate) multiplies
// them. For 70-90% sparsity, where a dense tile still has work for the tensor cores.
template <int kTileM_, int kTileN_, int kTileK_, int kWarps_>
struct TensorCoreConfig {
  static constexpr int kTileM = kTileM_;
  static constexpr int kTileN = kTileN_;
  static constexpr int kTileK = kTileK_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kFragsM = kTileM / 16;
  static constexpr int kFragsN = kTileN / 16;
  static_assert(kTileM % 16 == 0 && kTileN % 16 == 0 && kTileK % 16 == 0, "tiles are multiples of 16 (WMMA)");
  static_assert((kFragsM * kFragsN) % kWarps == 0, "every warp gets the same number of 16x16 fragments");
  static_assert(kTileM <= kThreads, "one thread densifies each tile row");
};

// Element type traits: fp32 math on every storage type.
template <typename T> struct Math;
template <> struct Math<float> {
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
};
template <> struct Math<__half> {
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Math<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// A vector of kVec elements of T, loaded/stored as one access when aligned.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

}  // namespace cuda
}  // namespace sparsekern
