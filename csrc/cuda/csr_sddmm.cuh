// CSR SDDMM, parallel over nonzeros: out[j] = sum_m A[rows[j], m] * B[cols[j], m].
//
// Buffers (device memory, row-major):
//   A     T      [Ra, lda]  (dY^T for dW: rows are W's rows, M contiguous)
//   B     T      [Rb, ldb]  (X^T: rows are W's columns)
//   rows  int32  [nnz]      row of each nonzero
//   cols  Index  [nnz]      column of each nonzero
//   out   T      [nnz]
// Each warp takes kNnzPerWarp consecutive nonzeros (they mostly share a row, so the A
// row stays in L1); its lanes stride over m with kVec-wide loads, accumulate in fp32
// and finish with a butterfly warp reduction (__shfl_xor_sync).
#pragma once

#include "config.cuh"

namespace sparsekern {
namespace cuda {

template <typename Config, typename T, typename Index>
__global__ void __launch_bounds__(Config::kThreads) csr_sddmm_kernel(
    int nnz, int M, int Ra, int Rb, const T* __restrict__ A, int lda, const T* __restrict__ B, int ldb,
    const int* __restrict__ rows, const Index* __restrict__ cols, T* __restrict__ out) {
  constexpr int kVec = Config::kVec;
  const int warp = blockIdx.x * Config::kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int first = warp * Config::kNnzPerWarp;
  for (int t = 0; t < Config::kNnzPerWarp; ++t) {
    const int j = first + t;
    if (j >= nnz) return;  // uniform across the warp
    int r = rows[j];
    int c = static_cast<int>(cols[j]);
    r = r < Ra ? r : Ra - 1;  // validated upstream; clamp so nothing is read out of bounds
    c = c < Rb ? c : Rb - 1;
    const T* a = A + static_cast<long long>(r) * lda;
    const T* b = B + static_cast<long long>(c) * ldb;
    float acc = 0.f;
    for (int m = lane * kVec; m < M; m += 32 * kVec) {
      if (kVec > 1 && m + kVec <= M) {
        const Vec<T, kVec> av = *reinterpret_cast<const Vec<T, kVec>*>(a + m);
        const Vec<T, kVec> bv = *reinterpret_cast<const Vec<T, kVec>*>(b + m);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc += Math<T>::to_float(av.v[i]) * Math<T>::to_float(bv.v[i]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i)
          if (m + i < M) acc += Math<T>::to_float(a[m + i]) * Math<T>::to_float(b[m + i]);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[j] = Math<T>::from_float(acc);
  }
}

}  // namespace cuda
}  // namespace sparsekern
