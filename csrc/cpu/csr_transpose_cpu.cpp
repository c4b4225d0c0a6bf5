// CPU kernel of sparsekern::csr_transpose: the transpose metadata (t_offsets,
// t_indices, t_perm) of a CSR/BSR structure, by a counting sort on the column
// (sparsekern/ops/transpose.py has the schema and the torch form that every other
// device runs, a stable sort by column).
//
// O(nnz + n_cols x chunks): each chunk of rows counts its columns, the counts
// give every (chunk, column) its first slot, and each chunk then places its
// entries in row order. That is the stable sort's order at any chunking, so the
// result is the same at every thread count. At nnz 21.5M (a 65536^2 layer at
// density 0.005) the torch form took about 3 s of a RigL rebuild.
//
// The structure may come from a file (check_structure runs this to compare a
// stored transpose), so it is checked before any write: offsets start at 0,
// never decrease and end at nnz; columns lie in [0, n_cols).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace sparsekern {
namespace cpu {
namespace {

template <typename off_t, typename col_t>
void transpose_into(const off_t* ro, int64_t R, const col_t* col, int64_t nnz, int64_t n_cols,
                    int32_t* t_off, int32_t* t_idx, int32_t* t_perm) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R));
  const int64_t rows_per = (R + chunks - 1) / std::max<int64_t>(1, chunks);
  std::vector<int64_t> count(static_cast<size_t>(chunks * n_cols), 0);
  std::vector<int64_t> bad(static_cast<size_t>(chunks), -1);  // first out-of-range entry per chunk
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = count.data() + c * n_cols;
      const int64_t e0 = ro[std::min(R, c * rows_per)], e1 = ro[std::min(R, (c + 1) * rows_per)];
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t j = static_cast<int64_t>(col[e]);
        if (j < 0 || j >= n_cols) {
          bad[c] = e;
          break;
        }
        ++cnt[j];
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    TORCH_CHECK_VALUE(bad[c] < 0, "csr_transpose: col_indices[", bad[c], "] = ",
                      static_cast<int64_t>(col[bad[c]]), " is outside [0, ", n_cols, ")");
  // first slot of every (chunk, column), column-major: column j's entries of chunk c
  // follow those of chunks < c
  int64_t run = 0;
  for (int64_t j = 0; j < n_cols; ++j) {
    t_off[j] = static_cast<int32_t>(run);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = count[c * n_cols + j];
      count[c * n_cols + j] = run;
      run += n;
    }
  }
  t_off[n_cols] = static_cast<int32_t>(run);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = count.data() + c * n_cols;
      for (int64_t r = c * rows_per; r < std::min(R, (c + 1) * rows_per); ++r)
        for (int64_t e = ro[r]; e < ro[r + 1]; ++e) {
          const int64_t slot = next[static_cast<int64_t>(col[e])]++;
          t_idx[slot] = static_cast<int32_t>(r);
          t_perm[slot] = static_cast<int32_t>(e);
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> csr_transpose_cpu(const at::Tensor& row_offsets,
                                                                 const at::Tensor& col_indices,
                                                                 int64_t n_cols) {
  auto is_index = [](const at::Tensor& t) {
    return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
  };
  TORCH_CHECK_TYPE(is_index(row_offsets), "csr_transpose: row_offsets must be int32 or int64, got ",
                   row_offsets.scalar_type());
  TORCH_CHECK_TYPE(is_index(col_indices), "csr_transpose: col_indices must be int32 or int64, got ",
                   col_indices.scalar_type());
  TORCH_CHECK_VALUE(row_offsets.dim() == 1 && row_offsets.numel() >= 1,
                    "csr_transpose: row_offsets must be 1-D with at least one entry");
  TORCH_CHECK_VALUE(col_indices.dim() == 1, "csr_transpose: col_indices must be 1-D, got ",
                    col_indices.dim(), "-D");
  TORCH_CHECK_VALUE(n_cols >= 0, "csr_transpose: n_cols must be >= 0, got ", n_cols);
  const int64_t nnz = col_indices.numel();
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(nnz <= kMax && row_offsets.numel() - 1 <= kMax,
                    "csr_transpose: the int32 transpose holds at most 2^31 - 1 entries and rows, got nnz ",
                    nnz, " and ", row_offsets.numel() - 1, " rows");
  const at::Tensor ro = row_offsets.to(at::kLong).contiguous();
  const at::Tensor ci = col_indices.contiguous();
  const int64_t R = ro.numel() - 1;
  const int64_t* o = ro.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(o[0] == 0, "csr_transpose: row_offsets[0] must be 0, got ", o[0]);
  TORCH_CHECK_VALUE(o[R] == nnz, "csr_transpose: row_offsets[-1] = ", o[R],
                    " but col_indices has ", nnz, " entries");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK_VALUE(o[r + 1] >= o[r], "csr_transpose: row_offsets decreases at row ", r);
  const auto i32 = ro.options().dtype(at::kInt);
  at::Tensor t_off = at::empty({n_cols + 1}, i32), t_idx = at::empty({nnz}, i32),
             t_perm = at::empty({nnz}, i32);
  auto run = [&](auto col_tag) {
    using col_t = decltype(col_tag);
    transpose_into<int64_t, col_t>(o, R, ci.data_ptr<col_t>(), nnz, n_cols, t_off.data_ptr<int32_t>(),
                                   t_idx.data_ptr<int32_t>(), t_perm.data_ptr<int32_t>());
  };
  if (ci.scalar_type() == at::kInt)
    run(int32_t{});
  else
    run(int64_t{});
  return {t_off, t_idx, t_perm};
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("csr_transpose", &sparsekern::cpu::csr_transpose_cpu);
}
