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
// Host C++ only: this file checks the tensors and calls the launch functions of
// csr_launch.cu (launch.h), which nvcc compiles without any torch header. Every
// launch is followed by C10_CUDA_KERNEL_LAUNCH_CHECK(). Only c10/cuda headers are
// used (not ATen/cuda/CUDAContext.h, which pulls cuSPARSE/cuBLAS headers).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "launch.h"

namespace sparsekern {
namespace cuda {
namespace {

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

// The kernels' value type for a tensor dtype; float64 (and anything else) is refused, naming the op.
ValueType value_type(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat: return ValueType::kFloat;
    case at::kHalf: return ValueType::kHalf;
    case at::kBFloat16: return ValueType::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", dtype, " is not supported on CUDA (float32, float16, bfloat16)");
  return ValueType::kFloat;  // not reached
}

IndexType index_type(const at::Tensor& t) {
  return t.scalar_type() == at::kShort ? IndexType::kUInt16 : IndexType::kInt32;
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
  const ValueType vt = value_type(dtype, "csr_spmm_t");
  auto c_t = at::empty({R, b_t.size(1)}, b_t.options());
  if (R == 0 || b_t.size(1) == 0) return c_t;
  SpmmArgs a{vt, index_type(indices), static_cast<int>(R), static_cast<int>(b_t.size(0)),
             static_cast<int>(b_t.size(1)), static_cast<int>(nnz), values.data_ptr(), offsets.data_ptr<int>(),
             indices.data_ptr(), perm ? perm->data_ptr<int>() : nullptr, order.data_ptr<int>(), b_t.data_ptr(),
             bias ? bias->data_ptr() : nullptr, relu, tensor_cores, c_t.data_ptr()};
  const int64_t col_blocks = csr_spmm_t_launch(a, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(col_blocks == 0, "csr_spmm_t: M=", b_t.size(1), " needs ", col_blocks, " column blocks (> 65535)");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return c_t;
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
  TORCH_CHECK(a_t.size(0) <= INT32_MAX && b_t.size(0) <= INT32_MAX && a_t.size(1) <= INT32_MAX &&
                  rows.numel() <= INT32_MAX, "csr_sddmm_t: sizes must fit int32");
  const ValueType vt = value_type(dtype, "csr_sddmm_t");
  auto out = at::empty({rows.numel()}, a_t.options());
  if (rows.numel() == 0) return out;
  if (a_t.size(1) == 0 || a_t.size(0) == 0 || b_t.size(0) == 0) return out.zero_();
  SddmmArgs a{vt, index_type(cols), static_cast<int>(rows.numel()), static_cast<int>(a_t.size(1)),
              static_cast<int>(a_t.size(0)), static_cast<int>(b_t.size(0)), a_t.data_ptr(), b_t.data_ptr(),
              rows.data_ptr<int>(), cols.data_ptr(), out.data_ptr()};
  csr_sddmm_t_launch(a, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
