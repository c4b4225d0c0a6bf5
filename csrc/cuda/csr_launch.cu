// Grid setup and launch of the CUDA kernels (launch.h declares the entry points):
// picks the template instance by value type, index type, permutation, alignment
// and tensor cores, from raw pointers. No torch headers: nvcc compiles this file
// and the kernels alone.
#include <cstdint>

#include "csr_sddmm.cuh"
#include "csr_spmm.cuh"
#include "csr_spmm_tc.cuh"
#include "launch.h"

namespace sparsekern {
namespace cuda {
namespace {

bool aligned(const void* p, int bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

template <typename T, typename Index, bool kPermuted, int kVec>
int64_t launch_spmm(const SpmmArgs& a, cudaStream_t stream) {
  const T* vals = static_cast<const T*>(a.values);
  const Index* idx = static_cast<const Index*>(a.indices);
  const T* B = static_cast<const T*>(a.b_t);
  const T* bias = static_cast<const T*>(a.bias);
  T* C = static_cast<T*>(a.c_t);
  if constexpr (sizeof(T) == 2) {
    if (a.tensor_cores) {
      using Cfg = TensorCoreConfig<64, 64, 32, 4>;
      dim3 grid((a.R + Cfg::kTileM - 1) / Cfg::kTileM, (a.N + Cfg::kTileN - 1) / Cfg::kTileN);
      csr_spmm_tc_kernel<Cfg, T, Index, kPermuted><<<grid, Cfg::kThreads, 0, stream>>>(
          a.R, a.K, a.N, vals, a.offsets, idx, a.perm, B, a.N, bias, a.relu, C, a.N);
      return 0;
    }
  }
  using Cfg = SpmmConfig<32, 4, kVec, 2 * kVec>;  // a warp per row, 64 columns per thread pair of vectors
  const int64_t col_blocks = (int64_t(a.N) + Cfg::kColsPerBlock - 1) / Cfg::kColsPerBlock;
  if (col_blocks > 65535) return col_blocks;
  dim3 grid((a.R + Cfg::kRowsPerBlock - 1) / Cfg::kRowsPerBlock, static_cast<unsigned>(col_blocks));
  if (aligned(vals, 4 * sizeof(T)) && aligned(idx, 4 * sizeof(Index))) {
    csr_spmm_kernel<Cfg, T, Index, kPermuted, 4><<<grid, Cfg::kThreads, 0, stream>>>(
        a.R, a.K, a.N, a.nnz, vals, a.offsets, idx, a.perm, a.order, B, a.N, bias, a.relu, C, a.N);
  } else {
    csr_spmm_kernel<Cfg, T, Index, kPermuted, 1><<<grid, Cfg::kThreads, 0, stream>>>(
        a.R, a.K, a.N, a.nnz, vals, a.offsets, idx, a.perm, a.order, B, a.N, bias, a.relu, C, a.N);
  }
  return 0;
}

template <typename T, typename Index, bool kPermuted>
int64_t spmm_vec(const SpmmArgs& a, cudaStream_t stream) {
  constexpr int kVec16 = 16 / sizeof(T);  // 16-byte vectors: 8 halves or 4 floats
  if (a.N % kVec16 == 0 && aligned(a.b_t, 16) && aligned(a.c_t, 16))
    return launch_spmm<T, Index, kPermuted, kVec16>(a, stream);
  return launch_spmm<T, Index, kPermuted, 1>(a, stream);
}

template <typename T>
int64_t spmm_typed(const SpmmArgs& a, cudaStream_t stream) {
  const bool idx16 = a.index_type == IndexType::kUInt16, p = a.perm != nullptr;
  if (idx16 && p) return spmm_vec<T, uint16_t, true>(a, stream);
  if (idx16) return spmm_vec<T, uint16_t, false>(a, stream);
  if (p) return spmm_vec<T, int, true>(a, stream);
  return spmm_vec<T, int, false>(a, stream);
}

template <typename T, typename Index, int kVec>
void launch_sddmm(const SddmmArgs& a, cudaStream_t stream) {
  using Cfg = SddmmConfig<8, 4, kVec>;
  const int per_block = Cfg::kWarpsPerBlock * Cfg::kNnzPerWarp;
  const unsigned blocks = static_cast<unsigned>((a.nnz + per_block - 1) / per_block);
  csr_sddmm_kernel<Cfg, T, Index><<<blocks, Cfg::kThreads, 0, stream>>>(
      a.nnz, a.M, a.Ra, a.Rb, static_cast<const T*>(a.a_t), a.M, static_cast<const T*>(a.b_t), a.M, a.rows,
      static_cast<const Index*>(a.cols), static_cast<T*>(a.out));
}

template <typename T>
void sddmm_typed(const SddmmArgs& a, cudaStream_t stream) {
  constexpr int kVec16 = 16 / sizeof(T);
  const bool vec = a.M % kVec16 == 0 && aligned(a.a_t, 16) && aligned(a.b_t, 16);
  if (a.index_type == IndexType::kUInt16) {
    if (vec) launch_sddmm<T, uint16_t, kVec16>(a, stream);
    else launch_sddmm<T, uint16_t, 1>(a, stream);
  } else {
    if (vec) launch_sddmm<T, int, kVec16>(a, stream);
    else launch_sddmm<T, int, 1>(a, stream);
  }
}

}  // namespace

int64_t csr_spmm_t_launch(const SpmmArgs& a, cudaStream_t stream) {
  switch (a.value_type) {
    case ValueType::kHalf: return spmm_typed<__half>(a, stream);
    case ValueType::kBFloat16: return spmm_typed<__nv_bfloat16>(a, stream);
    default: return spmm_typed<float>(a, stream);
  }
}

void csr_sddmm_t_launch(const SddmmArgs& a, cudaStream_t stream) {
  switch (a.value_type) {
    case ValueType::kHalf: sddmm_typed<__half>(a, stream); break;
    case ValueType::kBFloat16: sddmm_typed<__nv_bfloat16>(a, stream); break;
    default: sddmm_typed<float>(a, stream); break;
  }
}

}  // namespace cuda
}  // namespace sparsekern
