// CPU kernel of sparsekern::free_candidates, RigL growth's scan of one tile of
// scores (sparsekern/ops/candidates.py has the schema, the definition and the
// torch reference every other device runs).
//
// One read of the tile: for each score s (|g| when `absolute`, a gradient tile
// straight from the GEMM), keep position start + i when s is finite, s >
// threshold and start + i is not in `kept`. The torch form of the same is
// abs_, a compare, a nonzero, an isfinite and a membership test: five passes
// over a tile that does not fit in cache, which took more time than the GEMM
// that formed it (DEVELOPERS.md, "RigL growth scan").
//
// The tile is cut into chunks, each scanned by one thread into its own list,
// and the lists are joined in chunk order: the result is ascending and the
// same at every thread count.
//
// `stride` > 0: the tile is a 2-D block [h, w] of a wider score matrix (a
// cache-sized block of the gradient, scanned while it is still in cache), entry
// (i, j) at position start + i * stride + j (w <= stride). A work item is then
// a run of whole rows; each row is one contiguous range of positions.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace sparsekern {
namespace cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;  // scores per work item

// 32-byte vectors (GCC vector extensions, as tile_kernels.h): the compare runs on
// whatever ISA the variant is built for; a block of 4 vectors with no lane above the
// threshold (nearly all of them, once the threshold is a top-k bound) costs 4 loads,
// 4 compares and one test.
template <typename scalar_t>
struct ScanVec {
  static constexpr int kLanes = 32 / static_cast<int>(sizeof(scalar_t));
  using lane_int = std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>;
  typedef scalar_t V __attribute__((vector_size(32)));
  typedef scalar_t VU __attribute__((vector_size(32), aligned(sizeof(scalar_t)), __may_alias__));
  typedef lane_int I __attribute__((vector_size(32)));
  static constexpr lane_int kAbsMask = std::numeric_limits<lane_int>::max();  // all but the sign bit
};

// First index of kept[from..n) at or above p (kept ascending, from <= that index): a
// galloping search from the cursor, which costs O(log gap) and touches memory near it.
inline int64_t advance_to(const int64_t* kept, int64_t n, int64_t from, int64_t p) {
  if (from >= n || kept[from] >= p) return from;
  int64_t step = 1, lo = from, hi = from + 1;
  while (hi < n && kept[hi] < p) {
    lo = hi;
    step *= 2;
    hi = std::min(n, hi + step);
  }
  return std::lower_bound(kept + lo + 1, kept + hi, p) - kept;
}

// Scans s[i0, i1) (positions start + i); `k` is the cursor into `kept` carried between
// calls of one work item over ascending positions (-1: not yet placed).
template <typename scalar_t>
void scan_chunk(const scalar_t* s, int64_t i0, int64_t i1, scalar_t t, bool absolute,
                const int64_t* kept, int64_t n_kept, int64_t start, int64_t& k,
                std::vector<int64_t>& pos, std::vector<scalar_t>& val) {
  using SV = ScanVec<scalar_t>;
  using V = typename SV::V;
  using VU = typename SV::VU;
  using I = typename SV::I;
  constexpr int64_t L = SV::kLanes, kBlock = 4 * L;
  const V vt = V{} + t;
  const I mask = I{} + (absolute ? SV::kAbsMask : typename SV::lane_int(-1));
  // The cursor is placed at the first candidate (a binary search of `kept`, tens of MB at
  // 65536^2, misses the cache) and then gallops forward: the rows of a block are `stride`
  // positions apart, with hundreds of kept entries between them.
  auto take = [&](int64_t i) {
    const scalar_t v = absolute ? std::abs(s[i]) : s[i];
    if (!(v > t) || !std::isfinite(v)) return;
    const int64_t p = start + i;
    k = k < 0 ? std::lower_bound(kept, kept + n_kept, p) - kept : advance_to(kept, n_kept, k, p);
    if (k < n_kept && kept[k] == p) return;
    pos.push_back(p);
    val.push_back(v);
  };
  int64_t i = i0;
  for (; i + kBlock <= i1; i += kBlock) {  // NaN compares false: only candidates and +-Inf stop here
    I hit = I{}, lane[4];
    for (int u = 0; u < 4; ++u) {
      const V a = (V)((I) * reinterpret_cast<const VU*>(s + i + u * L) & mask);
      lane[u] = (I)(a > vt);
      hit |= lane[u];
    }
    uint64_t w[4];
    std::memcpy(w, &hit, sizeof(w));
    if ((w[0] | w[1] | w[2] | w[3]) == 0) continue;
    // only the lanes above the threshold (early in a growth scan a fifth of them, later few)
    for (int u = 0; u < 4; ++u) {
      typename SV::lane_int m[L];
      std::memcpy(m, &lane[u], sizeof(m));
      for (int64_t j = 0; j < L; ++j)
        if (m[j]) take(i + u * L + j);
    }
  }
  for (; i < i1; ++i) take(i);
}

std::tuple<at::Tensor, at::Tensor> free_candidates_cpu(const at::Tensor& scores, double threshold,
                                                       bool absolute, const at::Tensor& kept,
                                                       int64_t start, int64_t stride) {
  TORCH_CHECK_TYPE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
                   "free_candidates: scores must be float32 or float64, got ", scores.scalar_type());
  TORCH_CHECK_TYPE(kept.scalar_type() == at::kLong, "free_candidates: kept must be int64, got ",
                   kept.scalar_type());
  TORCH_CHECK_VALUE(kept.dim() == 1, "free_candidates: kept must be 1-D, got ", kept.dim(), "-D");
  TORCH_CHECK_VALUE(start >= 0, "free_candidates: start must be >= 0, got ", start);
  TORCH_CHECK_VALUE(!std::isnan(threshold), "free_candidates: threshold must not be NaN");
  TORCH_CHECK_VALUE(scores.device().is_cpu() && kept.device().is_cpu(),
                    "free_candidates: scores and kept must be CPU tensors here");
  TORCH_CHECK_VALUE(stride >= 0, "free_candidates: stride must be >= 0, got ", stride);
  // rows x width: one row (the flat tile) unless a 2-D block with a row stride
  int64_t rows = 1, width = scores.numel();
  if (stride > 0) {
    TORCH_CHECK_VALUE(scores.dim() == 2, "free_candidates: with stride > 0, scores must be 2-D, got ",
                      scores.dim(), "-D");
    rows = scores.size(0);
    width = scores.size(1);
    TORCH_CHECK_VALUE(width <= stride, "free_candidates: a row of scores (", width,
                      " entries) is wider than stride (", stride, ")");
    TORCH_CHECK_VALUE(rows == 0 || (rows - 1) <= (std::numeric_limits<int64_t>::max() - start - width) / stride,
                      "free_candidates: start + rows * stride overflows int64");
  }
  const at::Tensor s = scores.contiguous().view(-1);
  const at::Tensor kp = kept.contiguous();
  const int64_t n = s.numel();
  // work items: chunks of the flat tile, or runs of about kChunk entries of whole rows
  const int64_t rows_per_item = stride > 0 ? std::max<int64_t>(1, kChunk / std::max<int64_t>(1, width)) : 0;
  const int64_t n_chunks = stride > 0 ? (rows + rows_per_item - 1) / rows_per_item : (n + kChunk - 1) / kChunk;
  at::Tensor out_pos, out_val;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "free_candidates", [&] {
    // compared in the scores' dtype, as torch compares a tensor with a Python float
    const scalar_t t = static_cast<scalar_t>(threshold);
    std::vector<std::vector<int64_t>> pos(n_chunks);
    std::vector<std::vector<scalar_t>> val(n_chunks);
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const int64_t* kptr = kp.data_ptr<int64_t>();
    const int64_t nk = kp.numel();
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t cursor = -1;
        if (stride == 0) {
          scan_chunk<scalar_t>(sp, c * kChunk, std::min(n, (c + 1) * kChunk), t, absolute, kptr, nk,
                               start, cursor, pos[c], val[c]);
          continue;
        }
        for (int64_t i = c * rows_per_item; i < std::min(rows, (c + 1) * rows_per_item); ++i)
          scan_chunk<scalar_t>(sp + i * width, 0, width, t, absolute, kptr, nk, start + i * stride,
                               cursor, pos[c], val[c]);
      }
    });
    int64_t total = 0;
    for (const auto& p : pos) total += static_cast<int64_t>(p.size());
    out_pos = at::empty({total}, kp.options());
    out_val = at::empty({total}, s.options());
    int64_t* op = out_pos.data_ptr<int64_t>();
    scalar_t* ov = out_val.data_ptr<scalar_t>();
    for (int64_t c = 0; c < n_chunks; ++c) {
      std::copy(pos[c].begin(), pos[c].end(), op);
      std::copy(val[c].begin(), val[c].end(), ov);
      op += pos[c].size();
      ov += val[c].size();
    }
  });
  return {out_pos, out_val};
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("free_candidates", &sparsekern::cpu::free_candidates_cpu);
}
