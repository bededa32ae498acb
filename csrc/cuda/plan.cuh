// Host side of the fastbn CUDA kernels: the geometry ops.cu classifies an input into, the launch shapes
// derived from it, and the launchers of stats.cu, forward.cu and backward.cu (explicitly instantiated there
// for the six (scalar_t, param_t) combinations of dispatch.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/bn_common.cuh"
#include "dispatch.h"

namespace fastbn {
namespace cuda {

enum class Layout { kPlanes, kRows };

// An input in the planes or rows layout (bn_common.cuh); general strided inputs never get here.
struct Geometry {
  Layout layout;
  int64_t N = 0, C = 0, S = 1;  // planes: (N, C, S)
  int64_t R = 0;                // rows: R rows of C channels
  int64_t numel = 0;
  int64_t m = 0;                // values per channel
  bool aligned = false;         // every big tensor 16-byte aligned and the row/plane length a multiple of a pack
  bool idx64 = false;           // offsets need 64 bits
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
  p.S = static_cast<index_t>(g.S);
  p.CS = static_cast<index_t>(g.C * g.S);
  p.su = static_cast<index_t>(g.S / W);
  p.units = static_cast<index_t>(g.N * (g.S / W));
  p.by_su = Divider<index_t>(p.su);
  p.vec = W;
  return p;
}

template <typename index_t, typename scalar_t>
RowsGeom<index_t> rows_geom(const Geometry& g) {
  return RowsGeom<index_t>{static_cast<index_t>(g.R), static_cast<index_t>(g.C), unit_width<scalar_t>(g)};
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

// Σg and Σg·(x - mean) per channel (g = dy masked by the recomputed ReLU), into `out`.
template <typename S, typename P, typename A>
void launch_backward_reduce(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* res,
                            const BwdParams<P, A>& params, const BwdReduceOut<P, A>& out, bool relu);

// dx (nullable) and grad_residual = g (nullable).
template <typename S, typename P, typename A>
void launch_backward_elementwise(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* res,
                                 S* dx, S* dr, const BwdParams<P, A>& params, bool training, bool relu);

// Single-read training backward (reduce, grid barrier, dx); false when it does not fit.
template <typename S, typename P, typename A>
bool launch_persistent_backward(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* res,
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
