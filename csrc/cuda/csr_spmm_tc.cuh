// Tensor-core CSR SpMM for 70-90% sparsity: "load as sparse, compute as dense".
// C[r, n] = sum_k A[r, k] B[k, n] (+ bias[r]) (ReLU), T = __half or __nv_bfloat16.
//
// Buffers: as csr_spmm.cuh (values/offsets/indices/perm for A [R, K] in CSR, B [K, ldb],
// bias [R] or nullptr, C [R, ldc]); no row order: tiles are rows in storage order.
//
// A block owns a kTileM x kTileN tile of C. For each kTileK slice of K it zeroes a
// kTileM x kTileK tile of A in shared memory, and each of the first kTileM threads
// walks its row's next entries (columns are sorted, so a cursor per row only moves
// forward) and writes them into the tile: A is read once, in its sparse form. A slice
// whose A tile is empty is skipped by the whole block (__syncthreads_or). Otherwise the
// B slice is copied beside it and WMMA 16x16x16 fragments (fp32 accumulators) multiply
// the two. At 90% sparsity a 32-wide slice of a row holds ~3 entries, so the densify
// step is short while the tensor cores do the multiply at dense speed.
#pragma once

#include <mma.h>

#include "config.cuh"

namespace sparsekern {
namespace cuda {

template <typename Config, typename T, typename Index, bool kPermuted>
__global__ void __launch_bounds__(Config::kThreads) csr_spmm_tc_kernel(
    int R, int K, int N, const T* __restrict__ values, const int* __restrict__ offsets,
    const Index* __restrict__ indices, const int* __restrict__ perm, const T* __restrict__ B, int ldb,
    const T* __restrict__ bias, bool relu, T* __restrict__ C, int ldc) {
  using namespace nvcuda;
  constexpr int kM = Config::kTileM, kN = Config::kTileN, kK = Config::kTileK;
  constexpr int kLdA = kK + 8, kLdB = kN + 8, kLdC = kN + 4;  // padding against bank conflicts
  constexpr int kFragsPerWarp = Config::kFragsM * Config::kFragsN / Config::kWarps;
  static_assert(sizeof(T) == 2, "the tensor-core path takes fp16 or bf16");

  __shared__ __align__(32) T As[kM * kLdA];
  __shared__ __align__(32) T Bs[kK * kLdB];
  __shared__ __align__(32) float Cs[kM * kLdC];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int m0 = blockIdx.x * kM;
  const int n0 = blockIdx.y * kN;
  const int my_row = m0 + tid;
  int cursor = 0, row_end = 0;
  if (tid < kM && my_row < R) {
    cursor = offsets[my_row];
    row_end = offsets[my_row + 1];
  }

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsPerWarp];
#pragma unroll
  for (int f = 0; f < kFragsPerWarp; ++f) wmma::fill_fragment(acc[f], 0.f);

  for (int k0 = 0; k0 < K; k0 += kK) {
    for (int i = tid; i < kM * kLdA; i += Config::kThreads) As[i] = Math<T>::from_float(0.f);
    __syncthreads();
    int found = 0;
    if (tid < kM) {
      while (cursor < row_end) {
        const int k = static_cast<int>(indices[cursor]);
        if (k >= k0 + kK) break;
        if (k >= k0) As[tid * kLdA + (k - k0)] = values[kPermuted ? perm[cursor] : cursor];
        ++cursor;
        found = 1;
      }
    }
    if (!__syncthreads_or(found)) continue;  // an empty A tile: nothing to multiply
    for (int i = tid; i < kK * kN; i += Config::kThreads) {
      const int kk = i / kN, nn = i % kN;
      const bool in = k0 + kk < K && n0 + nn < N;
      Bs[kk * kLdB + nn] = in ? B[static_cast<long long>(k0 + kk) * ldb + n0 + nn] : Math<T>::from_float(0.f);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < kFragsPerWarp; ++f) {
      const int frag = warp * kFragsPerWarp + f;
      const int fm = frag / Config::kFragsN, fn = frag % Config::kFragsN;
#pragma unroll
      for (int kk = 0; kk < kK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, As + fm * 16 * kLdA + kk, kLdA);
        wmma::load_matrix_sync(b, Bs + kk * kLdB + fn * 16, kLdB);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
    __syncthreads();
  }

  // Epilogue through shared memory: bias, ReLU, convert, bounds-checked store.
#pragma unroll
  for (int f = 0; f < kFragsPerWarp; ++f) {
    const int frag = warp * kFragsPerWarp + f;
    const int fm = frag / Config::kFragsN, fn = frag % Config::kFragsN;
    wmma::store_matrix_sync(Cs + fm * 16 * kLdC + fn * 16, acc[f], kLdC, wmma::mem_row_major);
  }
  __syncthreads();
  for (int i = tid; i < kM * kN; i += Config::kThreads) {
    const int mm = i / kN, nn = i % kN;
    const int r = m0 + mm, n = n0 + nn;
    if (r < R && n < N) {
      float y = Cs[mm * kLdC + nn] + (bias != nullptr ? Math<T>::to_float(bias[r]) : 0.f);
      C[static_cast<long long>(r) * ldc + n] = Math<T>::from_float(relu && y < 0.f ? 0.f : y);
    }
  }
}

}  // namespace cuda
}  // namespace sparsekern
