// CSR SpMM on CUDA cores, Sputnik-style: C[r, n] = sum_k A[r, k] B[k, n] (+ bias[r]) (ReLU).
//
// Buffers (all device memory, row-major):
//   values   T      [nnz]     A's nonzeros (read as values[perm[e]] when kPermuted: the
//                             transpose of W read through t_perm, no value copy)
//   offsets  int32  [R + 1]   row r's entries are [offsets[r], offsets[r+1])
//   indices  Index  [nnz]     column of each entry, < K; uint16_t when K <= 65536
//   perm     int32  [nnz]     only when kPermuted
//   order    int32  [R]       rows by length, longest first (row swizzle)
//   B        T      [K, ldb]  dense operand; columns [0, N) used
//   bias     T      [R]       or nullptr
//   C        T      [R, ldc]  output; columns [0, N) written
//
// Work split: blockIdx.x -> kRowsPerBlock consecutive slots of `order`, one subwarp of
// kSubwarp threads per row (subwarp tiling); blockIdx.y -> kColsPerBlock columns of B/C.
// Consecutive blocks share a B tile in L2. Each lane of a subwarp loads kEntVec entries
// (values and indices) at once, starting from the row start rounded down to a multiple
// of kEntVec (reverse-offset alignment), so every vector load is aligned; entries before
// the row start or after its end are masked to 0. The subwarp then broadcasts the
// entries lane to lane with shuffles (no shared memory), and every lane multiplies them
// into its columns of B with kVec-wide loads.
#pragma once

#include "config.cuh"

namespace sparsekern {
namespace cuda {

template <typename Config, typename T, typename Index, bool kPermuted, int kEntVec = 4>
__global__ void __launch_bounds__(Config::kThreads) csr_spmm_kernel(
    int R, int K, int N, int nnz, const T* __restrict__ values, const int* __restrict__ offsets,
    const Index* __restrict__ indices, const int* __restrict__ perm, const int* __restrict__ order,
    const T* __restrict__ B, int ldb, const T* __restrict__ bias, bool relu, T* __restrict__ C, int ldc) {
  constexpr int kSub = Config::kSubwarp;
  constexpr int kVec = Config::kVec;
  constexpr int kChunks = Config::kColsPerThread / kVec;
  static_assert(kEntVec == 1 || kEntVec == 2 || kEntVec == 4, "kEntVec must be 1, 2 or 4");

  const int lane = threadIdx.x % kSub;
  const int slot = blockIdx.x * Config::kRowsPerBlock + threadIdx.x / kSub;
  if (slot >= R) return;  // the whole subwarp leaves together
  const unsigned warp_lane = threadIdx.x % 32;
  const unsigned mask = (kSub == 32) ? 0xffffffffu
                                     : (((1u << kSub) - 1u) << (warp_lane / kSub * kSub));
  const int r = order[slot];
  const int start = offsets[r];
  const int end = offsets[r + 1];

  // Column of chunk c of this lane: lanes of a subwarp take consecutive kVec vectors.
  const int col0 = blockIdx.y * Config::kColsPerBlock + lane * kVec;
  float acc[Config::kColsPerThread];
#pragma unroll
  for (int i = 0; i < Config::kColsPerThread; ++i) acc[i] = 0.f;

  for (int base = start - start % kEntVec; base < end; base += kSub * kEntVec) {
    // This lane's kEntVec entries.
    const int e0 = base + lane * kEntVec;
    float v[kEntVec];
    int k[kEntVec];
    if (!kPermuted && kEntVec > 1 && e0 >= 0 && e0 + kEntVec <= nnz) {
      const Vec<T, kEntVec> vv = *reinterpret_cast<const Vec<T, kEntVec>*>(values + e0);
      const Vec<Index, kEntVec> kk = *reinterpret_cast<const Vec<Index, kEntVec>*>(indices + e0);
#pragma unroll
      for (int s = 0; s < kEntVec; ++s) {
        const bool in_row = e0 + s >= start && e0 + s < end;
        v[s] = in_row ? Math<T>::to_float(vv.v[s]) : 0.f;
        k[s] = in_row ? static_cast<int>(kk.v[s]) : 0;
      }
    } else {
#pragma unroll
      for (int s = 0; s < kEntVec; ++s) {
        const int e = e0 + s;
        const bool in_row = e >= start && e < end;
        v[s] = in_row ? Math<T>::to_float(values[kPermuted ? perm[e] : e]) : 0.f;
        k[s] = in_row ? static_cast<int>(indices[e]) : 0;
      }
    }
    // Broadcast every entry of the tile through the subwarp and multiply it in.
#pragma unroll
    for (int src = 0; src < kSub; ++src) {
#pragma unroll
      for (int s = 0; s < kEntVec; ++s) {
        const float val = __shfl_sync(mask, v[s], src, kSub);
        int kcol = __shfl_sync(mask, k[s], src, kSub);
        kcol = kcol < K ? kcol : K - 1;  // indices are validated upstream; never read past B anyway
        if (val == 0.f) continue;        // masked slots (and stored zeros) cost no loads
        const T* brow = B + static_cast<long long>(kcol) * ldb;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int n = col0 + c * kSub * kVec;
          if (kVec > 1 && n + kVec <= N) {
            const Vec<T, kVec> b = *reinterpret_cast<const Vec<T, kVec>*>(brow + n);
#pragma unroll
            for (int i = 0; i < kVec; ++i) acc[c * kVec + i] += val * Math<T>::to_float(b.v[i]);
          } else {
#pragma unroll
            for (int i = 0; i < kVec; ++i)
              if (n + i < N) acc[c * kVec + i] += val * Math<T>::to_float(brow[n + i]);
          }
        }
      }
    }
  }

  // Epilogue: bias, ReLU, convert, store.
  const float b = bias != nullptr ? Math<T>::to_float(bias[r]) : 0.f;
  T* crow = C + static_cast<long long>(r) * ldc;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int n = col0 + c * kSub * kVec;
    Vec<T, kVec> out;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      float y = acc[c * kVec + i] + b;
      out.v[i] = Math<T>::from_float(relu && y < 0.f ? 0.f : y);
    }
    if (kVec > 1 && n + kVec <= N) {
      *reinterpret_cast<Vec<T, kVec>*>(crow + n) = out;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (n + i < N) crow[n + i] = out.v[i];
    }
  }
}

}  // namespace cuda
}  // namespace sparsekern
