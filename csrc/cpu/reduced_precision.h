// bfloat16 / float16 operands of the CPU ops.
//
// The linear kernels take bf16/fp16 tiles natively (tile_lanes.h: 16-bit
// elements widened in registers, or AVX512-BF16 dot products, fp32 accumulation),
// and so does the conv ops' im2col route (small planes) that runs on them. The
// direct conv kernels compute in fp32: their launchers convert the activations (O(batch x
// features)) and the values (O(nnz)) to fp32 copies, run the fp32 kernel, and
// round the result once to the operands' dtype. Both are fp32 accumulation, as
// torch's own CPU bf16/fp16 matmul and conv, and never a dense weight. Every
// dtype is checked before anything is converted, so a mismatch is still a
// TypeError naming the operand.
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

// A contiguous copy in the kernels' compute dtype: fp32 for bf16/fp16, else t's own.
inline at::Tensor acc_copy(const at::Tensor& t) {
  return is_reduced(t) ? t.to(at::kFloat).contiguous() : t.contiguous();
}

inline c10::optional<at::Tensor> to_fp32(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->to(at::kFloat)) : t;
}

}  // namespace cpu
}  // namespace sparsekern
