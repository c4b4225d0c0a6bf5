// Launchers of the CUDA C++ kernels, as ops in the internal namespace
// `sparsekern_cuda` (CUDA dispatch key). The public `sparsekern` ops reach them
// through sparsekern/gpu/route.py, which validates the topology first (cached per
// version), picks this backend or Triton by declared capability, and lays the
// dense operands out as these kernels want them (transposed, M contiguous).
//
//   csr_spmm_t(b_t [K, M], values [nnz], offsets int32 [R+1], indices int32|int16 [nnz],
//              perm int32 [nnz]?, order int32 [R], bias [R]?, relu, tensor_cores) -> c_t [R, M]
//       c_t[r, m] = sum_k A[r, k] b_t[k, m] (+ bias[r]) (ReLU); A in CSR (values read
//       through perm when given). int16 indices hold columns < 65536 as unsigned bits.
//   csr_sddmm_t(a_t [Ra, M], b_t [Rb, M], rows int32 [nnz], cols int32|int16 [nnz]) -> [nnz]
//       out[j] = sum_m a_t[rows[j], m] b_t[cols[j], m]
//
// Every launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK(). Only c10/cuda headers are used
// (not ATen/cuda/CUDAContext.h, which pulls cuSPARSE/cuBLAS headers), so the file also
// compiles with a bare nvcc: tests/test_cuda_compile.py checks that in CI.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "csr_sddmm.cuh"
#include "csr_spmm.cuh"
#include "csr_spmm_tc.cuh"

namespace sparsekern {
namespace cuda {
namespace {

template <typename S> struct CudaType { using type = S; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

bool aligned(const void* p, int bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

void check_common(const at::Tensor& t, const char* name, at::ScalarType dtype, int dim, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, name, " is on ", t.device(), ", expected ", dev);
  TORCH_CHECK(t.scalar_type() == dtype, name, " is ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == dim, name, " has ", t.dim(), " dims, expected ", dim);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_index(const at::Tensor& t, const char* name, int64_t n, const at::Device& dev) {
  TORCH_CHECK(t.device() == dev, name, " is on ", t.device(), ", expected ", dev);
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kShort, name, " must be int32 or int16, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.is_contiguous(), name, " must be contiguous [", n, "], got ",
              t.sizes());
}

template <typename T, typename Index, bool kPermuted, int kVec>
void launch_spmm(const at::Tensor& b_t, const at::Tensor& values, const at::Tensor& offsets,
                 const at::Tensor& indices, const int* perm, const at::Tensor& order, const T* bias, bool relu,
                 bool tensor_cores, at::Tensor& c_t) {
  const int R = static_cast<int>(offsets.numel() - 1), K = static_cast<int>(b_t.size(0));
  const int N = static_cast<int>(b_t.size(1)), nnz = static_cast<int>(values.numel());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const T* vals = reinterpret_cast<const T*>(values.data_ptr());
  const Index* idx = reinterpret_cast<const Index*>(indices.data_ptr());
  const T* B = reinterpret_cast<const T*>(b_t.data_ptr());
  T* C = reinterpret_cast<T*>(c_t.data_ptr());
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores) {
      using Cfg = TensorCoreConfig<64, 64, 32, 4>;
      dim3 grid((R + Cfg::kTileM - 1) / Cfg::kTileM, (N + Cfg::kTileN - 1) / Cfg::kTileN);
      csr_spmm_tc_kernel<Cfg, T, Index, kPermuted><<<grid, Cfg::kThreads, 0, stream>>>(
          R, K, N, vals, offsets.data_ptr<int>(), idx, perm, B, N, bias, relu, C, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  using Cfg = SpmmConfig<32, 4, kVec, 2 * kVec>;  // a warp per row, 64 columns per thread pair of vectors
  dim3 grid((R + Cfg::kRowsPerBlock - 1) / Cfg::kRowsPerBlock, (N + Cfg::kColsPerBlock - 1) / Cfg::kColsPerBlock);
  TORCH_CHECK(grid.y <= 65535, "csr_spmm_t: M=", N, " needs ", grid.y, " column blocks (> 65535)");
  const bool ent_vec = aligned(vals, 4 * sizeof(T)) && aligned(idx, 4 * sizeof(Index));
  if (ent_vec) {
    csr_spmm_kernel<Cfg, T, Index, kPermuted, 4><<<grid, Cfg::kThreads, 0, stream>>>(
        R, K, N, nnz, vals, offsets.data_ptr<int>(), idx, perm, order.data_ptr<int>(), B, N, bias, relu, C, N);
  } else {
    csr_spmm_kernel<Cfg, T, Index, kPermuted, 1><<<grid, Cfg::kThreads, 0, stream>>>(
        R, K, N, nnz, vals, offsets.data_ptr<int>(), idx, perm, order.data_ptr<int>(), B, N, bias, relu, C, N);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename Index, bool kPermuted>
void spmm_vec(const at::Tensor& b_t, const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
              const int* perm, const at::Tensor& order, const T* bias, bool relu, bool tc, at::Tensor& c_t) {
  constexpr int kVec16 = 16 / sizeof(T);  // 16-byte vectors: 8 halves or 4 floats
  const int N = static_cast<int>(b_t.size(1));
  if (N % kVec16 == 0 && aligned(b_t.data_ptr(), 16) && aligned(c_t.data_ptr(), 16)) {
    launch_spmm<T, Index, kPermuted, kVec16>(b_t, values, offsets, indices, perm, order, bias, relu, tc, c_t);
  } else {
    launch_spmm<T, Index, kPermuted, 1>(b_t, values, offsets, indices, perm, order, bias, relu, tc, c_t);
  }
}

at::Tensor csr_spmm_t(const at::Tensor& b_t, const at::Tensor& values, const at::Tensor& offsets,
                      const at::Tensor& indices, const c10::optional<at::Tensor>& perm, const at::Tensor& order,
                      const c10::optional<at::Tensor>& bias, bool relu, bool tensor_cores) {
  const auto dev = b_t.device();
  TORCH_CHECK(dev.is_cuda(), "csr_spmm_t: b_t must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(dev);
  const auto dtype = values.scalar_type();
  check_common(b_t, "b_t", dtype, 2, dev);
  check_common(values, "values", dtype, 1, dev);
  check_common(offsets, "offsets", at::kInt, 1, dev);
  const int64_t R = offsets.numel() - 1, nnz = values.numel();
  check_index(indices, "indices", nnz, dev);
  check_common(order, "order", at::kInt, 1, dev);
  TORCH_CHECK(order.numel() == R, "order has ", order.numel(), " entries, expected R=", R);
  if (perm) check_index(*perm, "perm", nnz, dev);
  TORCH_CHECK(!perm || perm->scalar_type() == at::kInt, "perm must be int32");
  if (bias) {
    check_common(*bias, "bias", dtype, 1, dev);
    TORCH_CHECK(bias->numel() == R, "bias has ", bias->numel(), " entries, expected R=", R);
  }
  TORCH_CHECK(b_t.size(0) <= INT32_MAX && b_t.size(1) <= INT32_MAX && nnz <= INT32_MAX, "csr_spmm_t: sizes must fit int32");
  TORCH_CHECK(indices.scalar_type() == at::kInt || b_t.size(0) <= 65536, "int16 indices need K <= 65536");
  auto c_t = at::empty({R, b_t.size(1)}, b_t.options());
  if (R == 0 || b_t.size(1) == 0) return c_t;
  const int* p = perm ? perm->data_ptr<int>() : nullptr;
  const bool idx16 = indices.scalar_type() == at::kShort;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "csr_spmm_t", [&] {
    using T = typename CudaType<scalar_t>::type;
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "csr_spmm_t: float64 is not supported on CUDA");
    } else {
      const T* bp = bias ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
      if (idx16 && p) spmm_vec<T, uint16_t, true>(b_t, values, offsets, indices, p, order, bp, relu, tensor_cores, c_t);
      else if (idx16) spmm_vec<T, uint16_t, false>(b_t, values, offsets, indices, p, order, bp, relu, tensor_cores, c_t);
      else if (p) spmm_vec<T, int, true>(b_t, values, offsets, indices, p, order, bp, relu, tensor_cores, c_t);
      else spmm_vec<T, int, false>(b_t, values, offsets, indices, p, order, bp, relu, tensor_cores, c_t);
    }
  });
  return c_t;
}

template <typename T, typename Index, int kVec>
void launch_sddmm(const at::Tensor& a_t, const at::Tensor& b_t, const at::Tensor& rows, const at::Tensor& cols,
                  at::Tensor& out) {
  using Cfg = SddmmConfig<8, 4, kVec>;
  const int nnz = static_cast<int>(rows.numel());
  const int per_block = Cfg::kWarpsPerBlock * Cfg::kNnzPerWarp;
  const unsigned blocks = static_cast<unsigned>((nnz + per_block - 1) / per_block);
  csr_sddmm_kernel<Cfg, T, Index><<<blocks, Cfg::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      nnz, static_cast<int>(a_t.size(1)), static_cast<int>(a_t.size(0)), static_cast<int>(b_t.size(0)),
      reinterpret_cast<const T*>(a_t.data_ptr()), static_cast<int>(a_t.size(1)),
      reinterpret_cast<const T*>(b_t.data_ptr()), static_cast<int>(b_t.size(1)), rows.data_ptr<int>(),
      reinterpret_cast<const Index*>(cols.data_ptr()), reinterpret_cast<T*>(out.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor csr_sddmm_t(const at::Tensor& a_t, const at::Tensor& b_t, const at::Tensor& rows, const at::Tensor& cols) {
  const auto dev = a_t.device();
  TORCH_CHECK(dev.is_cuda(), "csr_sddmm_t: a_t must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(dev);
  const auto dtype = a_t.scalar_type();
  check_common(a_t, "a_t", dtype, 2, dev);
  check_common(b_t, "b_t", dtype, 2, dev);
  TORCH_CHECK(a_t.size(1) == b_t.size(1), "a_t and b_t must share M: ", a_t.sizes(), " vs ", b_t.sizes());
  check_common(rows, "rows", at::kInt, 1, dev);
  check_index(cols, "cols", rows.numel(), dev);
  auto out = at::empty({rows.numel()}, a_t.options());
  if (rows.numel() == 0) return out;
  if (a_t.size(1) == 0 || a_t.size(0) == 0 || b_t.size(0) == 0) return out.zero_();
  const bool idx16 = cols.scalar_type() == at::kShort;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "csr_sddmm_t", [&] {
    using T = typename CudaType<scalar_t>::type;
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "csr_sddmm_t: float64 is not supported on CUDA");
    } else {
      constexpr int kVec16 = 16 / sizeof(T);
      const bool vec = a_t.size(1) % kVec16 == 0 && aligned(a_t.data_ptr(), 16) && aligned(b_t.data_ptr(), 16);
      if (idx16) {
        if (vec) launch_sddmm<T, uint16_t, kVec16>(a_t, b_t, rows, cols, out);
        else launch_sddmm<T, uint16_t, 1>(a_t, b_t, rows, cols, out);
      } else {
        if (vec) launch_sddmm<T, int, kVec16>(a_t, b_t, rows, cols, out);
        else launch_sddmm<T, int, 1>(a_t, b_t, rows, cols, out);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

TORCH_LIBRARY(sparsekern_cuda, m) {
  m.def("csr_spmm_t(Tensor b_t, Tensor values, Tensor offsets, Tensor indices, Tensor? perm, Tensor order, "
        "Tensor? bias, bool relu, bool tensor_cores) -> Tensor");
  m.def("csr_sddmm_t(Tensor a_t, Tensor b_t, Tensor rows, Tensor cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekern_cuda, CUDA, m) {
  m.impl("csr_spmm_t", &sparsekern::cuda::csr_spmm_t);
  m.impl("csr_sddmm_t", &sparsekern::cuda::csr_sddmm_t);
}
