// The CUDA kernels' host entry points (csrc/cuda/csr_launch.cu), as plain C++:
// raw pointers, sizes and a stream, no torch types. The ATen launcher
// (sparse_cuda.cpp) validates the tensors and calls these; so nvcc compiles only
// the kernels and CUDA's own headers, never ATen (tests/test_cuda_compile.py),
// and the launcher is ordinary C++ for the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparsekern {
namespace cuda {

enum class ValueType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };
enum class IndexType : int { kInt32 = 0, kUInt16 = 1 };  // int16 tensors hold columns < 65536 as unsigned bits

// c_t [R, N] = A [R, K] (CSR: values [nnz] through perm when given, offsets [R+1],
// indices [nnz], order [R]) . b_t [K, N] (+ bias [R]) (ReLU); every dense operand
// row-major and contiguous.
struct SpmmArgs {
  ValueType value_type;
  IndexType index_type;
  int R, K, N, nnz;
  const void* values;
  const int* offsets;
  const void* indices;
  const int* perm;      // nullable
  const int* order;
  const void* b_t;
  const void* bias;     // nullable
  bool relu;
  bool tensor_cores;    // fp16/bf16 only: the mma kernel
  void* c_t;
};

// out [nnz]: out[j] = sum_m a_t[rows[j], m] b_t[cols[j], m]; a_t [Ra, M], b_t [Rb, M].
struct SddmmArgs {
  ValueType value_type;
  IndexType index_type;
  int nnz, M, Ra, Rb;
  const void* a_t;
  const void* b_t;
  const int* rows;
  const void* cols;
  void* out;
};

// Launch on `stream`. Returns 0 after a launch (the caller then checks
// cudaGetLastError), or, without launching, the number of column blocks a too-wide
// N needs (more than the grid's 65535).
int64_t csr_spmm_t_launch(const SpmmArgs& a, cudaStream_t stream);
void csr_sddmm_t_launch(const SddmmArgs& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
