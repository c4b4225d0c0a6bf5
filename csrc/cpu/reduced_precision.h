// bfloat16 / float16 operands of the CPU ops.
//
// The kernels compute in fp32: the launcher converts the activations
// (O(batch x features)) and the values (O(nnz)) to fp32 copies, runs the fp32
// kernel, and rounds the result once to the operands' dtype. That is fp32
// accumulation, as torch's own CPU bf16/fp16 matmul and conv, and never a dense
// weight. (Native bf16 tiles, which would halve the bytes the kernels move, are
// future work: DEVELOPERS.md.) Every dtype is checked before anything is
// converted, so a mismatch is still a TypeError naming the operand.
#pragma once

#include <ATen/ATen.h>

namespace sparsekern {
namespace cpu {

inline bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& like, const char* name,
                             const char* like_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(),
                   " but ", like_name, " have dtype ", like.scalar_type());
}

inline void check_same_dtype(const c10::optional<at::Tensor>& t, const at::Tensor& like,
                             const char* name, const char* like_name) {
  if (t.has_value()) check_same_dtype(*t, like, name, like_name);
}

inline at::Tensor to_fp32(const at::Tensor& t) { return t.to(at::kFloat); }

inline c10::optional<at::Tensor> to_fp32(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->to(at::kFloat)) : t;
}

}  // namespace cpu
}  // namespace sparsekern
