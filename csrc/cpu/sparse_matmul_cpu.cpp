// CPU launchers for sparsekern::spmm, spmm_t and sddmm (CSR and BSR; fp32, fp64, and
// bf16/fp16 tiles with fp32 accumulation: tile_lanes.h).
//
// Every launcher validates what its kernel will read (shapes, dtypes, devices,
// monotone offsets, every index in range) before the kernel runs; the kernels
// then trust the structure (tile_kernels.h).
//
// Work split: the batch (M) is cut into tiles of T rows, and the tiles into
// groups whose packed operands fit kPackBudget. For every group, all threads
// first pack the dense operand(s) of every tile into the transposed layout,
// then the output rows, cut into several chunks per thread balanced by nonzero
// count, are handed out one at a time (dynamic), and each chunk runs over every
// tile of the group in order. So an op has two barriers per group (one group
// up to batch 256 at 4096 features), not two per tile, and a thread that the OS
// deschedules (a busy neighbour, DataLoader workers) holds up at most one
// chunk: the others take the rest. The SDDMM accumulates each nonzero within
// one chunk, tiles in order, whichever thread runs it: the result is
// deterministic, and the same at every thread count. Batch 1 still uses every
// thread.
#include <omp.h>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "linear_ops.h"
#include "reduced_precision.h"
#include "tile_kernels.h"
#include "tile_kernels_bf16dot.h"

namespace sparsekern {
namespace cpu {
namespace {

// Chunk boundaries over rows [0, R) so each chunk has about the same cost
// (nonzeros plus a per-row overhead); boundaries are rounded up to `align`
// rows so two threads never write the same output cache line.
std::vector<int64_t> balance_rows(const int32_t* offs, int64_t R, int nchunks, int64_t align) {
  std::vector<int64_t> b(nchunks + 1, R);
  b[0] = 0;
  const int64_t kRowCost = 4;
  const int64_t total = static_cast<int64_t>(offs[R]) + R * kRowCost;
  int64_t r = 0;
  for (int ch = 1; ch < nchunks; ++ch) {
    const int64_t target = total * ch / nchunks;
    while (r < R && static_cast<int64_t>(offs[r]) + r * kRowCost < target) ++r;
    const int64_t ra = std::min(R, (r + align - 1) / align * align);
    b[ch] = std::max(b[ch - 1], ra);
  }
  return b;
}

constexpr int64_t kPackCols = 256;  // feature columns per packing work item
// Bytes of packed (transposed) operand per group of batch tiles: 8 MiB holds
// batch 256 x 4096 features x fp64, or batch 512 in fp32.
constexpr int64_t kPackBudget = int64_t(8) << 20;
// Row chunks per thread: more lets the threads that run take the work of one
// that does not; fewer keeps each chunk's rows long (measured in DEVELOPERS.md).
constexpr int kChunksPerThread = 4;

// Number of row chunks for nt threads over R rows aligned to `align`.
inline int row_chunks(int nt, int64_t R, int64_t align) {
  if (nt <= 1) return 1;
  const int64_t aligned = std::max<int64_t>(1, (R + align - 1) / align);
  return static_cast<int>(std::min<int64_t>(static_cast<int64_t>(nt) * kChunksPerThread, aligned));
}

// Batch tiles per group: as many as the budget allows, at least one.
inline int64_t group_tiles(int64_t ntiles, int64_t bytes_per_tile) {
  return std::max<int64_t>(1, std::min<int64_t>(ntiles, kPackBudget / std::max<int64_t>(bytes_per_tile, 1)));
}

// Whether the AVX512-BF16 kernels (tile_kernels_bf16dot.h) exist for these tiles: bf16, T = 32.
template <typename scalar_t, int NV>
constexpr bool kDotTiles = SPARSEKERN_BF16_DOT && std::is_same<scalar_t, c10::BFloat16>::value && NV == 4;

// The dtype of Acc<scalar_t>: the accumulators that outlive one kernel call.
template <typename scalar_t>
constexpr at::ScalarType acc_dtype() {
  return c10::CppTypeToScalarType<Acc<scalar_t>>::value;
}

template <typename scalar_t, int T>
void pack_range(const at::Tensor& x, int64_t n0, int64_t nvalid, int64_t cb, scalar_t* xt) {
  const int64_t K = x.size(1);
  const int64_t ce = std::min(cb + kPackCols, K);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  if (x.stride(0) == 1 && x.size(0) > 1) {
    // x is a transposed view: each feature is already a contiguous batch run.
    const int64_t s1 = x.stride(1);
    for (int64_t c = cb; c < ce; ++c) {
      std::memcpy(xt + c * T, xp + c * s1 + n0, nvalid * sizeof(scalar_t));
      for (int64_t t = nvalid; t < T; ++t) xt[c * T + t] = scalar_t(0);
    }
  } else {
    pack_tile<scalar_t, T>(xp, x.stride(0), x.stride(1), n0, nvalid, cb, ce, xt);
  }
}

// Batch tiles per CSR SDDMM pass (csr_sddmm_tile's NB): reading and writing each
// output once, and reducing across lanes once, per NB tiles measured 1.1-1.25x
// faster than one tile per pass (DEVELOPERS.md). As many as keep their packed x
// tiles within kPassXBudget (with the streamed rows, in the core's L2: 2 MiB on
// Zen 4 and Sapphire Rapids); 4 where 4 x NV dy vectors fit the registers
// (AVX-512's 32), else at most 2.
constexpr int64_t kPassXBudget = int64_t(1) << 20;

template <typename scalar_t, int NV>
#if defined(__AVX512F__)
constexpr int kMaxTilesPerPass = 4 * NV <= 16 ? 4 : 2;
#else
constexpr int kMaxTilesPerPass = 2;
#endif

template <typename scalar_t, int NV>
int sddmm_tiles_per_pass(int64_t KT) {
  const int64_t fit = kPassXBudget / std::max<int64_t>(KT * static_cast<int64_t>(sizeof(scalar_t)), 1);
  return static_cast<int>(std::min<int64_t>({fit >= 4 ? 4 : fit >= 2 ? 2 : 1, kMaxTilesPerPass<scalar_t, NV>}));
}

// csr_sddmm_tile over CSR rows [r0, r1) and up to `avail` consecutive packed tiles
// (strides NT and KT elements) as one pass; returns the number of tiles taken.
template <typename scalar_t, int NV>
int64_t csr_sddmm_pass(int64_t avail, const int32_t* offs, const int32_t* idx, int64_t r0, int64_t r1,
                       const scalar_t* dg, int64_t NT, const scalar_t* xg, int64_t KT, bool add,
                       Acc<scalar_t>* op) {
  auto run = [&](auto nb_c) -> int64_t {
    constexpr int NB = decltype(nb_c)::value;
    const scalar_t* d[NB];
    const scalar_t* x[NB];
    for (int b = 0; b < NB; ++b) {
      d[b] = dg + b * NT;
      x[b] = xg + b * KT;
    }
    if (add)
      csr_sddmm_tile<scalar_t, NV, NB, true>(offs, idx, d, x, r0, r1, op);
    else
      csr_sddmm_tile<scalar_t, NV, NB, false>(offs, idx, d, x, r0, r1, op);
    return NB;
  };
  if constexpr (kMaxTilesPerPass<scalar_t, NV> >= 4)
    if (avail >= 4) return run(std::integral_constant<int, 4>{});
  if (avail >= 2) return run(std::integral_constant<int, 2>{});
  return run(std::integral_constant<int, 1>{});
}

// CSR forward and gather-form dX in column panels of kPanelCols features
// (csr_spmm_tile_panels) when rows hold on average >= 64 nonzeros per panel (density
// >= 1/4) and there are at least two panels: then one x panel serves enough FMAs from
// L1 to repay the per-row cursor and the partial sums' round trip. Measured 1.1-1.45x
// at density 0.5 and 1.0-1.3x at 0.3, 0.7-0.95x at 0.1, on Zen 4 and Sapphire Rapids-
// class Xeons (DEVELOPERS.md). The choice depends only on the structure, never on the
// batch or the thread count, so results stay bitwise the same at every thread count.
constexpr int64_t kPanelCols = 256;

inline bool use_column_panels(int64_t R, int64_t K, int64_t nnz) {
  return K >= 2 * kPanelCols && 4 * nnz >= R * K;
}

// y[M, R*bs] = x[M, C*bs] . A^T (+ bias) where A is W (forward) or, with perm_t given,
// W^T (dX = dY . W): BSR reads W's blocks through t_perm, transposed; CSR takes values
// already in W^T's order (perm_t unused). bias, when given, holds Acc<scalar_t>.
template <typename scalar_t, int NV>
void spmm_launch(const at::Tensor& x, const TopologyView& tv, const at::Tensor& values,
                 const at::Tensor& offs_t, const at::Tensor& idx_t, const at::Tensor* perm_t,
                 const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  constexpr int T = TileConfig<scalar_t, NV>::kTile;
  const bool transposed = perm_t != nullptr;
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t R = offs_t.numel() - 1;  // (block) rows of A
  const int32_t* offs = offs_t.data_ptr<int32_t>();
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  const int32_t* perm = transposed ? perm_t->data_ptr<int32_t>() : nullptr;
  const scalar_t* vals = values.data_ptr<scalar_t>();
  const Acc<scalar_t>* bp = bias.has_value() ? bias->data_ptr<Acc<scalar_t>>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t ldy = y.stride(0);
  const int nt = std::max(1, at::get_num_threads());
  const int nch = row_chunks(nt, R, tv.bsr ? 1 : 16);
  const auto bounds = balance_rows(offs, R, nch, tv.bsr ? 1 : 16);
  const int64_t KT = std::max<int64_t>(K, 1) * T;
  const int64_t ntiles = (M + T - 1) / T;
  const int64_t G = group_tiles(ntiles, KT * static_cast<int64_t>(sizeof(scalar_t)));
  at::Tensor xt_t = at::empty({G * KT}, x.options());
  scalar_t* xt = xt_t.data_ptr<scalar_t>();
  const int64_t npack = (K + kPackCols - 1) / kPackCols;
  const bool dot = kDotTiles<scalar_t, NV> && bf16_dot_enabled();
  const bool panels = !tv.bsr && use_column_panels(R, K, R > 0 ? offs[R] : 0);
#pragma omp parallel num_threads(nt)
  for (int64_t g0 = 0; g0 < ntiles; g0 += G) {
    const int64_t gn = std::min<int64_t>(G, ntiles - g0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < gn * npack; ++p) {
      const int64_t n0 = (g0 + p / npack) * T;
      pack_range<scalar_t, T>(x, n0, std::min<int64_t>(T, M - n0), (p % npack) * kPackCols,
                              xt + (p / npack) * KT);
    }
#pragma omp for schedule(dynamic, 1)
    for (int ch = 0; ch < nch; ++ch) {
      const int64_t r0 = bounds[ch], r1 = bounds[ch + 1];
      for (int64_t tile = 0; tile < gn; ++tile) {
        const int64_t n0 = (g0 + tile) * T, nvalid = std::min<int64_t>(T, M - n0);
        const scalar_t* xg = xt + tile * KT;
#if SPARSEKERN_BF16_DOT
        if constexpr (kDotTiles<scalar_t, NV>) {
          if (dot) {
            if (!tv.bsr)
              csr_spmm_tile_dot(offs, idx, vals, xg, r0, r1, yp, ldy, n0, nvalid, bp);
            else if (transposed)
              bsr_spmm_tile_dot<true, true>(offs, idx, perm, vals, tv.bs, xg, r0, r1, yp, ldy, n0, nvalid, bp);
            else
              bsr_spmm_tile_dot<false, false>(offs, idx, perm, vals, tv.bs, xg, r0, r1, yp, ldy, n0, nvalid,
                                              bp);
            continue;
          }
        }
#endif
        if (panels)
          csr_spmm_tile_panels<scalar_t, NV>(offs, idx, vals, xg, r0, r1, yp, ldy, n0, nvalid, bp, K,
                                             kPanelCols);
        else if (!tv.bsr)
          csr_spmm_tile<scalar_t, NV>(offs, idx, vals, xg, r0, r1, yp, ldy, n0, nvalid, bp);
        else if (transposed)
          bsr_spmm_tile<scalar_t, NV, true, true>(offs, idx, perm, vals, tv.bs, xg, r0, r1, yp, ldy,
                                                  n0, nvalid, bp);
        else
          bsr_spmm_tile<scalar_t, NV, false, false>(offs, idx, perm, vals, tv.bs, xg, r0, r1, yp,
                                                    ldy, n0, nvalid, bp);
      }
    }
  }
}

// CSR values in W^T's order: out[j] = values[t_perm[j]] (t_perm checked by the caller). One
// O(nnz) pass per dX call, so the gather-form kernels stream values instead of reading them
// at random once per batch tile.
template <typename scalar_t>
at::Tensor values_in_transpose_order(const at::Tensor& values, const at::Tensor& t_perm) {
  at::Tensor out = at::empty_like(values);
  const scalar_t* v = values.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  const int32_t* pm = t_perm.data_ptr<int32_t>();
  at::parallel_for(0, values.numel(), int64_t(1) << 16, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) o[j] = v[static_cast<uint32_t>(pm[j])];
  });
  return out;
}

// CSR dX in scatter form, one batch tile per thread (see csr_spmm_t_scatter_tile); used
// for fp32/fp64 when there are at least 2 tiles per thread, the gather form would not use
// column panels, and a tile's dx accumulators fit in L1 (kScatterAccBudget) or the CPU is
// an AMD one. Its read-modify-write of the accumulators measured 1.4-2.2x slower than the
// gather form when they live in L2 on a Sapphire Rapids-class Xeon, but 1.02-1.25x faster
// on Zen 4 (the gather form at 0.80-0.98x of its speed); 0.7-0.95x of the gather form's
// time on the Xeon when they fit in L1 (DEVELOPERS.md).
constexpr int64_t kScatterAccBudget = int64_t(48) << 10;

inline bool l2_scatter_is_cheap() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
#else
  return false;
#endif
}

template <typename scalar_t, int NV>
void spmm_t_scatter_launch(const at::Tensor& dy, const TopologyView& tv, const at::Tensor& values,
                           const at::Tensor& offs_t, const at::Tensor& idx_t, at::Tensor& dx) {
  constexpr int T = TileConfig<scalar_t, NV>::kTile;
  const int64_t M = dy.size(0), R = tv.rows, C = tv.cols;
  const int nt = std::max(1, at::get_num_threads());
  const int64_t ntiles = (M + T - 1) / T;
  // Per thread: the packed dy tile (scalar_t) and the dx accumulators (Acc<scalar_t>).
  at::Tensor dy_scratch = at::empty({nt * R * T}, dy.options());
  at::Tensor dx_scratch = at::empty({nt * C * T}, dy.options().dtype(acc_dtype<scalar_t>()));
  scalar_t* dyp_all = dy_scratch.data_ptr<scalar_t>();
  Acc<scalar_t>* dxp_all = dx_scratch.data_ptr<Acc<scalar_t>>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const int32_t* offs = offs_t.data_ptr<int32_t>();
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  const scalar_t* vals = values.data_ptr<scalar_t>();
#pragma omp parallel num_threads(nt)
  {
    scalar_t* dyt = dyp_all + omp_get_thread_num() * R * T;
    Acc<scalar_t>* dxt = dxp_all + omp_get_thread_num() * C * T;
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t n0 = tile * T, nvalid = std::min<int64_t>(T, M - n0);
      for (int64_t cb = 0; cb < R; cb += kPackCols) pack_range<scalar_t, T>(dy, n0, nvalid, cb, dyt);
      std::fill(dxt, dxt + C * T, Acc<scalar_t>(0));
      csr_spmm_t_scatter_tile<scalar_t, NV>(offs, idx, vals, R, dyt, dxt);
      store_transposed<scalar_t, T>(dxt, C, dxp, dx.stride(0), n0, nvalid, 0);
    }
  }
}

// out holds Acc<scalar_t> (the sums over batch tiles are rounded once, by the caller).
template <typename scalar_t, int NV>
void sddmm_launch(const at::Tensor& dy, const at::Tensor& x, const TopologyView& tv,
                  const at::Tensor& offs_t, const at::Tensor& idx_t, at::Tensor& out) {
  constexpr int T = TileConfig<scalar_t, NV>::kTile;
  const int64_t M = x.size(0), K = x.size(1), N = dy.size(1);
  const int32_t* offs = offs_t.data_ptr<int32_t>();
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  Acc<scalar_t>* op = out.data_ptr<Acc<scalar_t>>();
  const int nt = std::max(1, at::get_num_threads());
  const int nch = row_chunks(nt, tv.rows, 1);
  const auto bounds = balance_rows(offs, tv.rows, nch, 1);
  const int64_t KT = std::max<int64_t>(K, 1) * T, NT = std::max<int64_t>(N, 1) * T;
  const int64_t ntiles = (M + T - 1) / T;
  const int64_t G = group_tiles(ntiles, (KT + NT) * static_cast<int64_t>(sizeof(scalar_t)));
  at::Tensor xt_t = at::empty({G * KT}, x.options());
  at::Tensor dyt_t = at::empty({G * NT}, x.options());
  scalar_t* xt = xt_t.data_ptr<scalar_t>();
  scalar_t* dyt = dyt_t.data_ptr<scalar_t>();
  const int64_t npx = (K + kPackCols - 1) / kPackCols;
  const int64_t npy = (N + kPackCols - 1) / kPackCols;
  const bool dot = kDotTiles<scalar_t, NV> && !tv.bsr && bf16_dot_enabled();
  const int nb = sddmm_tiles_per_pass<scalar_t, NV>(KT);
#pragma omp parallel num_threads(nt)
  for (int64_t g0 = 0; g0 < ntiles; g0 += G) {
    const int64_t gn = std::min<int64_t>(G, ntiles - g0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < gn * (npx + npy); ++q) {
      const int64_t tile = q / (npx + npy), p = q % (npx + npy);
      const int64_t n0 = (g0 + tile) * T, nvalid = std::min<int64_t>(T, M - n0);
      if (p < npx)
        pack_range<scalar_t, T>(x, n0, nvalid, p * kPackCols, xt + tile * KT);
      else
        pack_range<scalar_t, T>(dy, n0, nvalid, (p - npx) * kPackCols, dyt + tile * NT);
    }
#pragma omp for schedule(dynamic, 1)
    for (int ch = 0; ch < nch; ++ch) {
      const int64_t r0 = bounds[ch], r1 = bounds[ch + 1];
      for (int64_t tile = 0; tile < gn;) {
        // The first batch tile writes the output, later tiles add to it.
        const bool add = g0 + tile > 0;
        const scalar_t* xg = xt + tile * KT;
        const scalar_t* dg = dyt + tile * NT;
#if SPARSEKERN_BF16_DOT
        if constexpr (kDotTiles<scalar_t, NV>) {
          if (dot) {
            if (add)
              csr_sddmm_tile_dot<true>(offs, idx, dg, xg, r0, r1, op);
            else
              csr_sddmm_tile_dot<false>(offs, idx, dg, xg, r0, r1, op);
            ++tile;
            continue;
          }
        }
#endif
        if (tv.bsr) {
          bsr_sddmm_tile<scalar_t, NV>(offs, idx, tv.bs, dg, xg, r0, r1, add, op);
          ++tile;
          continue;
        }
        tile += csr_sddmm_pass<scalar_t, NV>(std::min<int64_t>(nb, gn - tile), offs, idx, r0, r1, dg, NT, xg, KT,
                                             add, op);
      }
    }
  }
}

// BSR dW in outer-product form when bs is a multiple of the column step
// (one or two vectors) and of 8: parallel over block rows balanced by nonzero
// blocks. Other block sizes take the tile form (returns false). out holds Acc<scalar_t>.
template <typename scalar_t>
bool bsr_sddmm_outer_launch(const at::Tensor& dy_in, const at::Tensor& x_in, const TopologyView& tv,
                            const at::Tensor& offs_t, const at::Tensor& idx_t, at::Tensor& out) {
  using Narrow = BlockLanes<scalar_t, 1>;
  using Wide = BlockLanes<scalar_t, 2>;  // 64-byte vectors for fp32 on AVX-512, else Narrow
  constexpr int W = Narrow::kW;
  if (!tv.bsr || tv.bs % W != 0 || tv.bs % 8 != 0) return false;
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const int32_t* offs = offs_t.data_ptr<int32_t>();
  const int32_t* idx = idx_t.data_ptr<int32_t>();
  const int nt = std::max(1, at::get_num_threads());
  const int nch = row_chunks(nt, tv.rows, 1);
  const auto bounds = balance_rows(offs, tv.rows, nch, 1);
  // Register blocks, measured best for b = 16 and 32 (4096x4096, batch 256, density 0.1):
  // 32-byte lanes, two vectors of columns x eight rows (16 accumulators, 10 loads per 16
  // FMAs): dW 7.9x / 8.2x dense on Zen 3 (four x four: 7.3x / 5.7x); 64-byte lanes (b a
  // multiple of 16) one vector x 16 rows, or for b a multiple of 32 two x eight: dW
  // 1.4-1.6x faster than 32-byte lanes on a Sapphire Rapids-class Xeon (DEVELOPERS.md).
  // Two vectors of columns only when they tile the block exactly (b = 24, 40, 56 in
  // fp32 step one vector: two would write past the block).
  const bool wide = Wide::kW > W && tv.bs % Wide::kW == 0;
  const int64_t jv = tv.bs % (2 * (wide ? Wide::kW : W)) == 0 ? 2 : 1;
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  Acc<scalar_t>* op = out.data_ptr<Acc<scalar_t>>();
  const int64_t M = x.size(0), ldy = dy.stride(0), ldx = x.stride(0);
  // Batch chunks of 256 rows keep the x (256 x in) and dy panels in L2/L3.
  constexpr int64_t kChunk = 256;
  const bool dot = SPARSEKERN_BF16_DOT && std::is_same<scalar_t, c10::BFloat16>::value && tv.bs % 16 == 0 &&
                   bf16_dot_enabled();
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int ch = 0; ch < nch; ++ch) {
    const int64_t r0 = bounds[ch], r1 = bounds[ch + 1];
    for (int64_t n0 = 0; n0 < M; n0 += kChunk) {
      const int64_t n1 = std::min(n0 + kChunk, M);
#if SPARSEKERN_BF16_DOT
      if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
        if (dot) {
          bsr_sddmm_outer_dot(offs, idx, tv.bs, dyp, ldy, xp, ldx, n0, n1, n0 > 0, r0, r1, op);
          continue;
        }
      }
#endif
      const bool acc = n0 > 0;
      if (wide && jv == 2)
        bsr_sddmm_outer<scalar_t, 2, 8, Wide>(offs, idx, tv.bs, dyp, ldy, xp, ldx, n0, n1, acc, r0, r1, op);
      else if (wide)
        bsr_sddmm_outer<scalar_t, 1, 16, Wide>(offs, idx, tv.bs, dyp, ldy, xp, ldx, n0, n1, acc, r0, r1, op);
      else if (jv == 2)
        bsr_sddmm_outer<scalar_t, 2, 8, Narrow>(offs, idx, tv.bs, dyp, ldy, xp, ldx, n0, n1, acc, r0, r1, op);
      else
        bsr_sddmm_outer<scalar_t, 1, 8, Narrow>(offs, idx, tv.bs, dyp, ldy, xp, ldx, n0, n1, acc, r0, r1, op);
    }
  }
  return true;
}

// Small batches use one vector per tile (T = 8 fp32) so batch 1 wastes little.
template <typename scalar_t, typename F4, typename F1>
void by_tile_width(int64_t M, F4&& wide, F1&& narrow) {
  if (M <= TileConfig<scalar_t, 1>::kTile)
    narrow();
  else
    wide();
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ",
                    t.device());
}

// [..., F] -> [prod(...), F] (a view when possible), and the output shape [..., G].
at::Tensor flatten_lead(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1, name, " must have shape [..., features], got a 0-d tensor");
  int64_t lead = 1;  // explicit: reshape(-1, 0) is ambiguous for zero features
  for (int64_t d = 0; d + 1 < t.dim(); ++d) lead *= t.size(d);
  return t.reshape({lead, t.size(-1)});
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

}  // namespace

at::Tensor spmm_cpu(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& row_offsets,
                    const at::Tensor& col_indices, const at::Tensor& t_offsets,
                    const at::Tensor& t_indices, const at::Tensor& t_perm,
                    const c10::optional<at::Tensor>& bias) {
  const auto tv = check_topology(values, row_offsets, col_indices, t_offsets, t_indices, t_perm);
  check_cpu(values, "values");
  const at::Tensor x = flatten_lead(x_in, "x");
  check_dense(x, values, "x", tv.cols * tv.bs);
  check_offsets_host(row_offsets, tv.nnz, "row_offsets");
  check_indices_below(col_indices, tv.cols, "col_indices");
  check_bias(bias, values, tv.rows * tv.bs);
  // The kernels add the bias in compute lanes: fp32 for bf16/fp16 (O(features)).
  const auto b = bias.has_value() ? c10::optional<at::Tensor>(acc_copy(*bias)) : bias;
  at::Tensor y = at::empty({x.size(0), tv.rows * tv.bs}, x.options());
  if (y.numel() == 0) return y.view(with_last(x_in, tv.rows * tv.bs));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparsekern_spmm_cpu", [&] {
    by_tile_width<scalar_t>(
        x.size(0),
        [&] { spmm_launch<scalar_t, 4>(x, tv, values, row_offsets, col_indices, nullptr, b, y); },
        [&] { spmm_launch<scalar_t, 1>(x, tv, values, row_offsets, col_indices, nullptr, b, y); });
  });
  return y.view(with_last(x_in, tv.rows * tv.bs));
}

at::Tensor spmm_t_cpu(const at::Tensor& dy_in, const at::Tensor& values,
                      const at::Tensor& row_offsets, const at::Tensor& col_indices,
                      const at::Tensor& t_offsets, const at::Tensor& t_indices,
                      const at::Tensor& t_perm) {
  const auto tv = check_topology(values, row_offsets, col_indices, t_offsets, t_indices, t_perm);
  check_cpu(values, "values");
  const at::Tensor dy = flatten_lead(dy_in, "dy");
  check_dense(dy, values, "dy", tv.rows * tv.bs);
  at::Tensor dx = at::empty({dy.size(0), tv.cols * tv.bs}, dy.options());
  const auto out_shape = with_last(dy_in, tv.cols * tv.bs);
  if (dx.numel() == 0) return dx.view(out_shape);
  const c10::optional<at::Tensor> nobias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "sparsekern_spmm_t_cpu", [&] {
    constexpr int T = TileConfig<scalar_t, 4>::kTile;
    const int64_t ntiles = (dy.size(0) + T - 1) / T;
    const bool scatter = !tv.bsr && !is_16bit_v<scalar_t> && ntiles >= 2 * at::get_num_threads() &&
                         !use_column_panels(tv.cols, tv.rows, tv.nnz) &&
                         (tv.cols * T * static_cast<int64_t>(sizeof(Acc<scalar_t>)) <= kScatterAccBudget ||
                          l2_scatter_is_cheap());
    if (scatter) {
      // Scatter form reads W's own structure.
      check_offsets_host(row_offsets, tv.nnz, "row_offsets");
      check_indices_below(col_indices, tv.cols, "col_indices");
      spmm_t_scatter_launch<scalar_t, 4>(dy, tv, values, row_offsets, col_indices, dx);
      return;
    }
    // Gather form reads W^T's metadata; CSR values gathered into W^T's order once here
    // (the kernels then stream them), BSR blocks read through t_perm.
    check_offsets_host(t_offsets, tv.nnz, "t_offsets");
    check_indices_below(t_indices, tv.rows, "t_indices");
    check_indices_below(t_perm, tv.nnz, "t_perm");
    const at::Tensor vals = tv.bsr ? values : values_in_transpose_order<scalar_t>(values, t_perm);
    by_tile_width<scalar_t>(
        dy.size(0),
        [&] { spmm_launch<scalar_t, 4>(dy, tv, vals, t_offsets, t_indices, &t_perm, nobias, dx); },
        [&] { spmm_launch<scalar_t, 1>(dy, tv, vals, t_offsets, t_indices, &t_perm, nobias, dx); });
  });
  return dx.view(out_shape);
}

at::Tensor sddmm_cpu(const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& row_offsets,
                     const at::Tensor& col_indices, const at::Tensor& t_offsets,
                     const at::Tensor& t_indices, const at::Tensor& t_perm, int64_t block_size) {
  check_block_size(block_size, "block_size");
  check_same_dtype(dy_in, x_in, "dy", "x");
  // A values-shaped placeholder lets check_topology see the layout.
  TORCH_CHECK_VALUE(dy_in.dim() >= 1 && x_in.dim() >= 1 &&
                        dy_in.sizes().slice(0, dy_in.dim() - 1) == x_in.sizes().slice(0, x_in.dim() - 1),
                    "dy [..., out] and x [..., in] must share their leading dims, got ",
                    dy_in.sizes(), " and ", x_in.sizes());
  const at::Tensor dy = flatten_lead(dy_in, "dy"), x = flatten_lead(x_in, "x");
  at::Tensor shape_probe =
      block_size == 1 ? at::empty({col_indices.numel()}, x.options())
                      : at::empty({col_indices.numel(), block_size, block_size}, x.options());
  const auto tv = check_topology(shape_probe, row_offsets, col_indices, t_offsets, t_indices, t_perm);
  check_cpu(x, "x");
  check_dense(x, shape_probe, "x", tv.cols * tv.bs);
  check_dense(dy, shape_probe, "dy", tv.rows * tv.bs);
  check_offsets_host(row_offsets, tv.nnz, "row_offsets");
  check_indices_below(col_indices, tv.cols, "col_indices");
  // Every kernel below writes each entry on its first batch tile: no zero fill.
  if (shape_probe.numel() == 0 || x.size(0) == 0) return at::zeros_like(shape_probe);
  // bf16/fp16: the sums over batch tiles stay fp32 and are rounded once, here.
  at::Tensor out = is_reduced(x) ? at::empty_like(shape_probe, shape_probe.options().dtype(at::kFloat))
                                 : shape_probe;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "sparsekern_sddmm_cpu", [&] {
    if (bsr_sddmm_outer_launch<scalar_t>(dy, x, tv, row_offsets, col_indices, out)) return;
    by_tile_width<scalar_t>(
        x.size(0),
        [&] { sddmm_launch<scalar_t, 4>(dy, x, tv, row_offsets, col_indices, out); },
        [&] { sddmm_launch<scalar_t, 1>(dy, x, tv, row_offsets, col_indices, out); });
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace cpu
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("spmm", &sparsekern::cpu::spmm_cpu);
  m.impl("spmm_t", &sparsekern::cpu::spmm_t_cpu);
  m.impl("sddmm", &sparsekern::cpu::sddmm_cpu);
}
