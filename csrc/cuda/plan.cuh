// Host side of the fastbn CUDA kernels: the geometry ops.cu classifies an input into, the launch shapes
// derived from it, and the launchers of stats.cu, forward.cu and backward.cu (explicitly instantiated there
// for the six (scalar_t, param_t) combinations of dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "cuda/bn_common.cuh"
#include "dispatch.h"

namespace fastbn {
namespace cuda {

enum class Layout { kPlanes, kRows };

// An input in the planes or rows layout (bn_common.cuh), with its outputs; other strided inputs never get here.
struct Geometry {
  Layout layout;
  int64_t N = 0, C = 0, S = 1;  // planes: (N, C, S)
  int64_t R = 0;                // rows: R rows of C channels
  int64_t numel = 0;
  int64_t m = 0;                // values per channel
  int64_t x_outer = 0;          // the input's outer stride (dense_outer() unless it is a view)
  bool aligned = false;         // every big tensor 16-byte aligned, x_outer and the row/plane length a multiple of
                                // a pack
  bool idx64 = false;           // offsets need 64 bits
  int64_t dense_outer() const { return layout == Layout::kPlanes ? C * S : C; }
};

// The path of the fused ops: persistent single-read kernels when the tensor fits in the registers of the
// resident blocks, else two passes. FASTBN_CUDA_PATH=persistent|two_pass|auto (default auto) forces one
// for tests and benchmarks; "persistent" falls back to two passes when the tensor does not fit.
enum class PathChoice { kAuto, kPersistent, kTwoPass };
PathChoice path_choice();

// 256 threads a block at most: __launch_bounds__(256) leaves each thread up to 255 registers, which the
// persistent kernels need to hold their slice of the tensor without spilling (at 512 the cap is 128).
constexpr unsigned kMaxThreads = 256;
// Bytes of the input each thread of a persistent kernel keeps in registers (forward: x; backward: x and g).
constexpr int kPersistentForwardBytes = 128;
constexpr int kPersistentBackwardBytes = 64;

template <typename scalar_t>
inline int unit_width(const Geometry& g) {
  return g.aligned ? kPackSize<scalar_t> : 1;
}

template <typename index_t, typename scalar_t>
PlanesGeom<index_t> planes_geom(const Geometry& g) {
  const int W = unit_width<scalar_t>(g);
  PlanesGeom<index_t> p;
  p.outer = static_cast<index_t>(g.dense_outer());
  p.x_outer = static_cast<index_t>(g.x_outer);
  p.S = static_cast<index_t>(g.S);
  p.su = static_cast<index_t>(g.S / W);
  p.units = static_cast<index_t>(g.N * (g.S / W));
  p.by_su = Divider<index_t>(p.su);
  p.vec = W;
  return p;
}

template <typename index_t, typename scalar_t>
RowsGeom<index_t> rows_geom(const Geometry& g) {
  RowsGeom<index_t> r;
  r.outer = static_cast<index_t>(g.dense_outer());
  r.x_outer = static_cast<index_t>(g.x_outer);
  r.R = static_cast<index_t>(g.R);
  r.C = static_cast<index_t>(g.C);
  r.vec = unit_width<scalar_t>(g);
  return r;
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline unsigned pow2_floor(int64_t v) {
  unsigned p = 1;
  while (int64_t(p) * 2 <= v) p *= 2;
  return p;
}
inline unsigned pow2_ceil(int64_t v) {
  unsigned p = 1;
  while (int64_t(p) < v) p *= 2;
  return p;
}

// Planes: one block per (channel, split) of 32..512 threads; enough splits per channel to fill about two
// waves of resident blocks, each thread doing at least kMinUnits units.
struct PlanesConfig {
  unsigned threads, splits;
};
constexpr int64_t kMinUnits = 4;

// Threads per block: a quarter of the channel's units per kMinUnits-unit thread, so that even small
// channels get a few blocks (more blocks per SM, and split merges exercised by small test shapes).
inline unsigned planes_threads(int64_t units) {
  return std::min<unsigned>(kMaxThreads,
                            std::max<unsigned>(32, pow2_floor(std::max<int64_t>(1, units / (4 * kMinUnits)))));
}
inline unsigned planes_splits(int64_t units, int64_t C, unsigned threads, unsigned resident) {
  const int64_t want = std::max<int64_t>(1, (2 * int64_t(resident)) / std::max<int64_t>(1, C));
  const int64_t most = std::max<int64_t>(1, div_up(units, threads * kMinUnits));
  return static_cast<unsigned>(std::min<int64_t>({want, most, 65535}));
}

// Rows: blocks of tx column groups (W channels each) by ty rows, tiles of tx*W channels across grid.x and
// splits of the rows across grid.y.
struct RowsConfig {
  unsigned tx, ty, tiles, splits;
  unsigned threads() const { return tx * ty; }
};
inline RowsConfig rows_shape(int64_t R, int64_t C, int W) {
  RowsConfig c;
  c.tx = std::min<unsigned>(32, pow2_ceil(div_up(C, W)));
  c.ty = std::max<unsigned>(1, std::min<unsigned>(256 / c.tx, pow2_ceil(div_up(R, 4 * kMinUnits))));
  while (c.tx * c.ty < 32) c.ty *= 2;  // whole warps
  c.tiles = static_cast<unsigned>(div_up(C, int64_t(c.tx) * W));
  c.splits = 1;
  return c;
}
inline void rows_splits(RowsConfig& c, int64_t R, unsigned resident) {
  const int64_t want = std::max<int64_t>(1, (2 * int64_t(resident)) / c.tiles);
  const int64_t most = std::max<int64_t>(1, div_up(R, int64_t(c.ty) * kMinUnits));
  c.splits = static_cast<unsigned>(std::min<int64_t>({want, most, 65535}));
}

// A scratch buffer on the input's device, through the caching allocator.
inline at::Tensor scratch_bytes(const at::Tensor& like, int64_t bytes) {
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kByte));
}
// Counters of the last-block-done merges: zeroed here, and left zeroed by the last block.
inline at::Tensor zero_counters(const at::Tensor& like, int64_t n) {
  if (n == 0) return at::empty({1}, like.options().dtype(at::kInt));
  return at::zeros({n}, like.options().dtype(at::kInt));
}

// Persistent planes kernels: the smallest block (from `first` threads, doubling) whose grid of gc channel
// blocks x splits fits in the resident blocks; false when none does. `resident(threads)` asks the occupancy.
struct PersistentPlanes {
  unsigned threads;
  int64_t gc, rounds, splits;
};
template <typename Resident>
bool persistent_planes_shape(int64_t units, int64_t C, int64_t slots, int64_t max_rounds, Resident resident,
                             PersistentPlanes& out) {
  unsigned threads = std::min<unsigned>(kMaxThreads, std::max<unsigned>(32, pow2_ceil(div_up(units, slots * 8))));
  for (; threads <= kMaxThreads; threads *= 2) {
    const int64_t blocks = resident(threads);
    const int64_t gc = std::min<int64_t>(C, blocks);
    const int64_t rounds = div_up(C, gc);
    if (rounds > max_rounds) continue;
    const int64_t splits = div_up(units, int64_t(threads) * (slots / rounds));
    if (gc * splits > blocks) continue;
    out = PersistentPlanes{threads, gc, rounds, splits};
    return true;
  }
  return false;
}

template <bool kIdx64>
using index_type = std::conditional_t<kIdx64, int64_t, int32_t>;

// ---------------------------------------------------------------------------------------------------
// The two launch helpers of the kernel families: every launcher in stats.cu, forward.cu and backward.cu
// goes through one of them, so the shape rules above are applied in one place.

template <typename T>
constexpr size_t kSizeOrZero = sizeof(T);
template <>
constexpr size_t kSizeOrZero<void> = 0;

// kernel(geom, [partials, counters,] args...): a split reduction (Partial not void) also gets one Partial
// per channel and split and `groups` zeroed last-block-done counters (placeholders without splits).
template <typename Partial, typename Kernel, typename Geom, typename... Args>
void launch_split(Kernel kernel, dim3 grid, dim3 block, size_t smem, const at::Tensor& input, int64_t C,
                  int64_t groups, const Geom& geom, const Args&... args) {
  if constexpr (std::is_void<Partial>::value) {
    launch(kernel, grid, block, smem, current_stream(), geom, args...);
  } else {
    const bool split = grid.y > 1;
    at::Tensor partials = scratch_bytes(input, split ? C * grid.y * int64_t(sizeof(Partial)) : 0);
    at::Tensor counters = zero_counters(input, split ? groups : 0);
    launch(kernel, grid, block, smem, current_stream(), geom, reinterpret_cast<Partial*>(partials.data_ptr()),
           reinterpret_cast<unsigned*>(counters.data_ptr()), args...);
  }
}

// Grid-stride (two-pass) kernels. The index width comes from g.idx64 and the kernel from
// kernels(index_t{}), a pair (planes kernel, rows kernel). Planes: grid (C, splits), planes_threads threads;
// rows: grid (tiles, splits), blocks (tx, ty), with tx*ty Partials of dynamic shared memory for reductions.
template <typename S, typename Partial, typename Kernels, typename... Args>
void launch_grid_stride(const Geometry& g, const at::Tensor& input, Kernels kernels, const Args&... args) {
  BOOL_SWITCH(g.idx64, kIdx64, [&] {
    using index_t = index_type<kIdx64>;
    const auto k = kernels(index_t{});
    if (g.layout == Layout::kPlanes) {
      const auto pg = planes_geom<index_t, S>(g);
      const unsigned threads = planes_threads(pg.units);
      const unsigned splits = planes_splits(pg.units, g.C, threads, max_cooperative_blocks(k.first, threads, 0));
      launch_split<Partial>(k.first, dim3(static_cast<unsigned>(g.C), splits), dim3(threads), 0, input, g.C, g.C, pg,
                            args...);
    } else {
      const auto rg = rows_geom<index_t, S>(g);
      RowsConfig cfg = rows_shape(g.R, g.C, rg.vec);
      const size_t smem = cfg.threads() * kSizeOrZero<Partial>;
      rows_splits(cfg, g.R, max_cooperative_blocks(k.second, cfg.threads(), smem));
      launch_split<Partial>(k.second, dim3(cfg.tiles, cfg.splits), dim3(cfg.tx, cfg.ty), smem, input, g.C, cfg.tiles,
                            rg, args...);
    }
  });
}

// Persistent (cooperative) kernels, 32-bit indexing only (a tensor that fits on chip has 32-bit offsets, but for
// an input view whose samples or rows lie 2^31 values apart, which takes two passes: no 64-bit instantiation):
// planes_kernel(geom, C, rounds, partials, args...) on the persistent_planes_shape grid, or
// rows_kernel(geom, partials, args...) on grid (tiles, splits), blocks
// (tx, ty), with tx*ty Partials and tx*W Coefs of dynamic shared memory; one Partial per channel and split.
// False (nothing launched) when the grid would not be resident at once.
template <typename S, typename Partial, typename Coefs, int kBytes, typename PlanesKernel, typename RowsKernel,
          typename... Args>
bool launch_persistent(const Geometry& g, const at::Tensor& input, PlanesKernel planes_kernel, RowsKernel rows_kernel,
                       const Args&... args) {
  using index_t = int32_t;
  if (g.idx64) return false;
  if (g.layout == Layout::kPlanes) {
    const auto pg = planes_geom<index_t, S>(g);
    const int64_t slots = kBytes / (int64_t(sizeof(S)) * pg.vec);
    PersistentPlanes shape;
    // The rounds are bounded by the slot count of the vector width (kBytes / 16).
    if (!persistent_planes_shape(pg.units, g.C, slots, kBytes / 16,
                                 [&](unsigned t) { return int64_t(max_cooperative_blocks(planes_kernel, t, 0)); },
                                 shape))
      return false;
    at::Tensor partials = scratch_bytes(input, g.C * shape.splits * int64_t(sizeof(Partial)));
    launch_cooperative(planes_kernel, dim3(static_cast<unsigned>(shape.gc), static_cast<unsigned>(shape.splits)),
                       dim3(shape.threads), 0, current_stream(), pg, static_cast<index_t>(g.C),
                       static_cast<unsigned>(shape.rounds), reinterpret_cast<Partial*>(partials.data_ptr()), args...);
    return true;
  }
  const auto rg = rows_geom<index_t, S>(g);
  const int64_t slots = kBytes / (int64_t(sizeof(S)) * rg.vec);
  RowsConfig cfg = rows_shape(g.R, g.C, rg.vec);
  const size_t smem = cfg.threads() * sizeof(Partial) + cfg.tx * kPackSize<S> * sizeof(Coefs);
  const int64_t resident = max_cooperative_blocks(rows_kernel, cfg.threads(), smem);
  const int64_t splits = div_up(g.R, int64_t(cfg.ty) * slots);
  if (int64_t(cfg.tiles) * splits > resident) return false;
  at::Tensor partials = scratch_bytes(input, g.C * splits * int64_t(sizeof(Partial)));
  launch_cooperative(rows_kernel, dim3(cfg.tiles, static_cast<unsigned>(splits)), dim3(cfg.tx, cfg.ty), smem,
                     current_stream(), rg, reinterpret_cast<Partial*>(partials.data_ptr()), args...);
  return true;
}

// ---------------------------------------------------------------------------------------------------
// Launchers (S = scalar_t, P = param_t, A = acc_t).

// Per-channel statistics of x into `out` (local_stats, or the first pass of forward-train).
template <typename S, typename P, typename A>
void launch_stats(const Geometry& g, const at::Tensor& input, const StatsOut<P, A>& out);

// y = normalize(x) [+ residual] [relu]; increments *num_batches_tracked when it is not null.
template <typename S, typename P, typename A>
void launch_normalize(const Geometry& g, const at::Tensor& input, const S* x, const S* res, S* y,
                      const NormParams<P, A>& params, int64_t* num_batches_tracked, bool relu);

// Single-read forward-train; false (nothing launched) when the input does not fit.
template <typename S, typename P, typename A>
bool launch_persistent_forward(const Geometry& g, const at::Tensor& input, const S* x, const S* res, S* y,
                               const StatsOut<P, A>& out, const NormParams<P, A>& params,
                               int64_t* num_batches_tracked, bool relu);

// Σg and Σg·(x - mean) per channel (g = dy masked by the ReLU: y > 0 where y, the
// forward's output, is given, else the recomputed pre-activation > 0), into `out`; in the same pass eval's
// dx = k*g and grad_residual = g where eval_dx / eval_dr are not null (`params` then holds no mean terms).
template <typename S, typename P, typename A>
void launch_backward_reduce(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* y,
                            S* eval_dx, S* eval_dr, const BwdParams<P, A>& params, const BwdReduceOut<P, A>& out,
                            bool relu);

// dx (nullable) and grad_residual = g (nullable).
template <typename S, typename P, typename A>
void launch_backward_elementwise(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* y,
                                 S* dx, S* dr, const BwdParams<P, A>& params, bool training, bool relu);

// Single-read training backward (reduce, grid barrier, dx); false when it does not fit.
template <typename S, typename P, typename A>
bool launch_persistent_backward(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* y,
                                S* dx, S* dr, const BwdParams<P, A>& params, const BwdReduceOut<P, A>& out,
                                bool relu);

// Explicit instantiation of a launcher template for the six dtype combinations of dispatch.h.
#define FASTBN_CUDA_INSTANTIATE(MACRO)  \
  MACRO(float, float, float)            \
  MACRO(double, double, double)         \
  MACRO(c10::Half, float, float)        \
  MACRO(c10::Half, c10::Half, float)    \
  MACRO(c10::BFloat16, float, float)    \
  MACRO(c10::BFloat16, c10::BFloat16, float)

}  // namespace cuda
}  // namespace fastbn
