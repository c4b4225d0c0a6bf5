// The CPU linear ops (sparse_matmul_cpu.cpp), callable from other CPU launchers:
// the conv ops' im2col route (conv_im2col.h) runs on them. Each validates its
// inputs as the registered op does.
#pragma once

#include <ATen/ATen.h>

namespace sparsekern {
namespace cpu {

// y [..., R*bs] = x [..., C*bs] . W^T (+ bias).
at::Tensor spmm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_offsets,
                    const at::Tensor& col_indices, const at::Tensor& t_offsets,
                    const at::Tensor& t_indices, const at::Tensor& t_perm,
                    const c10::optional<at::Tensor>& bias);

// dx [..., C*bs] = dy [..., R*bs] . W.
at::Tensor spmm_t_cpu(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_offsets,
                      const at::Tensor& col_indices, const at::Tensor& t_offsets,
                      const at::Tensor& t_indices, const at::Tensor& t_perm);

// dW values-shaped: (dy^T . x) at the topology's nonzeros.
at::Tensor sddmm_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_offsets,
                     const at::Tensor& col_indices, const at::Tensor& t_offsets,
                     const at::Tensor& t_indices, const at::Tensor& t_perm, int64_t block_size);

}  // namespace cpu
}  // namespace sparsekern
