// Input checks shared by every backend's launcher. Cheap (O(rows)) checks run
// here; per-nonzero index bounds are checked inside the kernels' loops.
// Errors raise c10::ValueError / c10::TypeError (Python ValueError/TypeError)
// naming the field and the expectation.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace sparsekern {

// A sparse weight W of shape [R * bs, C * bs] (bs = 1 for CSR) handed to an op:
// row_offsets [R + 1], col_indices [nnz], values [nnz] or [nnz, bs, bs], and
// the transpose W^T as t_offsets [C + 1], t_indices [nnz] (row of W),
// t_perm [nnz] (position in values). All index tensors are int32.
struct TopologyView {
  int64_t rows = 0;      // R: (block) rows of W
  int64_t cols = 0;      // C: (block) columns of W
  int64_t nnz = 0;       // nonzeros (CSR) or nonzero blocks (BSR)
  int64_t bs = 1;        // block size, 1 for CSR
  bool bsr = false;
};

// Block sizes the CPU kernels implement: 1 (CSR) or a multiple of 4 in [4, 64] (BSR).
inline bool cpu_block_size_ok(int64_t bs) { return bs == 1 || (bs >= 4 && bs <= 64 && bs % 4 == 0); }

inline void check_block_size(int64_t bs, const char* name) {
  TORCH_CHECK_VALUE(cpu_block_size_ok(bs), name,
                    " must be 1 (CSR) or a multiple of 4 in [4, 64] (BSR), got ", bs);
}

// a * b and a + b for non-negative sizes, refused (ValueError naming `what`)
// when the result does not fit int64: geometry products must never wrap.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &r), what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK_VALUE(!__builtin_add_overflow(a, b, &r), what, " overflows int64 (", a, " + ", b, ")");
  return r;
}

// Kernels index some arrays with int32: refuse sizes that do not fit.
inline void check_int32_size(int64_t n, const char* what) {
  TORCH_CHECK_VALUE(n >= 0 && n < (int64_t(1) << 31), what, " has ", n,
                    " elements; the CPU kernel indexes it with int32 (< 2^31)");
}

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// O(R) check that offsets start at 0, end at nnz and never decrease.
inline void check_offsets_host(const at::Tensor& offs, int64_t nnz, const char* name) {
  const int32_t* o = offs.data_ptr<int32_t>();
  const int64_t n = offs.numel();
  TORCH_CHECK_VALUE(o[0] == 0, name, "[0] must be 0, got ", o[0]);
  TORCH_CHECK_VALUE(o[n - 1] == nnz, name, "[-1] must equal nnz=", nnz, ", got ", o[n - 1]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(o[i] >= o[i - 1], name, " must be non-decreasing, but ", name, "[", i,
                      "]=", o[i], " < ", name, "[", i - 1, "]=", o[i - 1]);
  }
}

// O(n) check that every entry of an int32 index array lies in [0, bound):
// an unsigned max-reduction the compiler vectorises (~30 us for 1.7M entries),
// so kernels can run without per-nonzero bounds checks.
inline void check_indices_below(const at::Tensor& t, int64_t bound, const char* name) {
  const uint32_t* p = reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>());
  const int64_t n = t.numel();
  uint32_t mx = 0;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) mx = p[i] > mx ? p[i] : mx;
  if (n == 0 || static_cast<int64_t>(mx) < bound) return;
  int64_t i = 0;
  while (static_cast<int64_t>(p[i]) < bound) ++i;
  TORCH_CHECK_VALUE(false, name, "[", i, "]=", static_cast<int32_t>(p[i]), " is out of range [0, ",
                    bound, "): the topology is malformed; call validate()");
}

inline TopologyView check_topology(const at::Tensor& values, const at::Tensor& row_offsets,
                                   const at::Tensor& col_indices, const at::Tensor& t_offsets,
                                   const at::Tensor& t_indices, const at::Tensor& t_perm) {
  check_index(row_offsets, "row_offsets");
  check_index(col_indices, "col_indices");
  check_index(t_offsets, "t_offsets");
  check_index(t_indices, "t_indices");
  check_index(t_perm, "t_perm");
  TORCH_CHECK_VALUE(values.dim() == 1 || values.dim() == 3,
                    "values must be 1-D [nnz] (CSR) or 3-D [nnzb, b, b] (BSR), got shape ",
                    values.sizes());
  TORCH_CHECK_VALUE(values.is_contiguous(), "values must be contiguous");
  TopologyView v;
  v.bsr = values.dim() == 3;
  v.nnz = values.size(0);
  if (v.bsr) {
    v.bs = values.size(1);
    TORCH_CHECK_VALUE(values.size(2) == v.bs && v.bs >= 4 && cpu_block_size_ok(v.bs),
                      "values of a BSR weight must be [nnzb, b, b] with b in {4, 8, ..., 64}, got ",
                      values.sizes());
  }
  TORCH_CHECK_VALUE(row_offsets.numel() >= 1, "row_offsets must have rows+1 >= 1 entries");
  TORCH_CHECK_VALUE(t_offsets.numel() >= 1, "t_offsets must have cols+1 >= 1 entries");
  v.rows = row_offsets.numel() - 1;
  v.cols = t_offsets.numel() - 1;
  TORCH_CHECK_VALUE(col_indices.numel() == v.nnz, "col_indices has ", col_indices.numel(),
                    " entries, expected nnz=", v.nnz);
  TORCH_CHECK_VALUE(t_indices.numel() == v.nnz, "t_indices has ", t_indices.numel(),
                    " entries, expected nnz=", v.nnz);
  TORCH_CHECK_VALUE(t_perm.numel() == v.nnz, "t_perm has ", t_perm.numel(),
                    " entries, expected nnz=", v.nnz);
  const auto dev = values.device();
  for (const at::Tensor* t : {&row_offsets, &col_indices, &t_offsets, &t_indices, &t_perm}) {
    TORCH_CHECK_VALUE(t->device() == dev, "topology tensors must be on values' device ", dev,
                      ", got ", t->device());
  }
  return v;
}

inline void check_dense(const at::Tensor& t, const at::Tensor& values, const char* name,
                        int64_t expected_cols) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [M, features], got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), name, " has dtype ",
                   t.scalar_type(), " but values have dtype ", values.scalar_type());
  TORCH_CHECK_VALUE(t.device() == values.device(), name, " is on ", t.device(),
                    " but values are on ", values.device());
  TORCH_CHECK_VALUE(t.size(1) == expected_cols, name, " has ", t.size(1),
                    " features, expected ", expected_cols);
}

// An optional bias of an op whose output has `features` channels: [features],
// values' dtype and device.
inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& values,
                       int64_t features) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == features, "bias must be [", features,
                    "], got shape ", bias->sizes());
  TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "bias has dtype ",
                   bias->scalar_type(), " but values have dtype ", values.scalar_type());
  TORCH_CHECK_VALUE(bias->device() == values.device(), "bias is on ", bias->device(),
                    " but values are on ", values.device());
}

}  // namespace sparsekern
