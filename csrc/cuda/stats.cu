// Per-channel statistics (Welford triples, deterministic grid merge, running-stat update on the device):
// local_stats and the first pass of the two-pass forward-train.
#include "cuda/plan.cuh"

namespace fastbn {
namespace cuda {
namespace {

// Statistics, planes layout.
// Traffic: 1E read. Launch: grid (C, splits), 1-D blocks of 32..512 threads; block (c, s) reduces units
// s*T + t, step splits*T, of channel c. With splits > 1 each block writes a Welford partial and the last
// block of the channel to arrive (integer counter per channel) merges the partials in split order and runs
// the epilogue (saved statistics, running-stat update).
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    stats_planes_kernel(PlanesGeom<index_t> g, Welford<acc_t>* partials, unsigned* counters,
                        const scalar_t* __restrict__ x, StatsOut<param_t, acc_t> out) {
  __shared__ Welford<acc_t> scratch[32];
  const index_t c = blockIdx.x;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const double factor = out.factor();
  const acc_t shift = static_cast<acc_t>(x[c * g.S]);
  acc_t s1 = 0, s2 = 0;
  int64_t n = 0;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    acc_t sh[W], a1[W], a2[W];
    init_shifted<W>(shift, sh, a1, a2);
    index_t count = 0;
    const index_t step = static_cast<index_t>(splits) * blockDim.x;
    for (index_t u = static_cast<index_t>(split) * blockDim.x + threadIdx.x; u < g.units; u += step) {
      add_shifted<W>(load_pack<W>(x + g.x_offset(g.template pos<W>(c, u))), sh, a1, a2);
      ++count;
    }
#pragma unroll
    for (int v = 0; v < W; ++v) {
      s1 += a1[v];
      s2 += a2[v];
    }
    n = static_cast<int64_t>(count) * W;
  });
  split_reduce_block(welford_from_shifted(s1, s2, n), WelfordOp<acc_t>(), scratch, partials, counters, c, split,
                     splits, [&](const Welford<acc_t>& w) { out.finalize(c, unshift(w, shift), factor); });
}

// Statistics, rows layout (channels_last, (N, C)).
// Traffic: 1E read. Launch: grid (tiles, splits), blocks (tx, ty) with tx*W channels per tile; a thread
// accumulates its W channels over rows split*ty + threadIdx.y, step splits*ty; the block reduces over y
// (dynamic shared memory: tx*ty Welford triples); with splits > 1 the last block of the tile to arrive
// (integer counter per tile) merges the partials in split order and runs the epilogue.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    stats_rows_kernel(RowsGeom<index_t> g, Welford<acc_t>* partials, unsigned* counters,
                      const scalar_t* __restrict__ x, StatsOut<param_t, acc_t> out) {
  Welford<acc_t>* smem = dynamic_shared<Welford<acc_t>>();
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const double factor = out.factor();
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    const bool active = c0 < g.C;
    acc_t shift[W], a1[W], a2[W];
#pragma unroll
    for (int v = 0; v < W; ++v) shift[v] = a1[v] = a2[v] = acc_t(0);
    index_t count = 0;
    if (active) {
      const auto first = peek_pack<W>(x + c0);
#pragma unroll
      for (int v = 0; v < W; ++v) shift[v] = static_cast<acc_t>(first.val[v]);
      const index_t step = static_cast<index_t>(splits) * blockDim.y;
      for (index_t r = static_cast<index_t>(split) * blockDim.y + threadIdx.y; r < g.R; r += step) {
        add_shifted<W>(load_pack<W>(x + g.x_offset(g.pos(r, c0))), shift, a1, a2);
        ++count;
      }
    }
    Welford<acc_t> lanes[W];
#pragma unroll
    for (int v = 0; v < W; ++v)
      lanes[v] = reduce_y(welford_from_shifted(a1[v], a2[v], int64_t(count)), WelfordOp<acc_t>(), smem);
    split_merge_y(lanes, WelfordOp<acc_t>(), smem, partials, counters, g.C, c0, active, split, splits,
                  [&](int v, const Welford<acc_t>& w) { out.finalize(c0 + v, unshift(w, shift[v]), factor); });
  });
}

}  // namespace

template <typename S, typename P, typename A>
void launch_stats(const Geometry& g, const at::Tensor& input, const StatsOut<P, A>& out) {
  launch_grid_stride<S, Welford<A>>(
      g, input,
      [](auto index) {
        using index_t = decltype(index);
        return std::make_pair(stats_planes_kernel<S, P, A, index_t>, stats_rows_kernel<S, P, A, index_t>);
      },
      static_cast<const S*>(input.data_ptr()), out);
}

#define FASTBN_INSTANTIATE_STATS(S, P, A) \
  template void launch_stats<S, P, A>(const Geometry&, const at::Tensor&, const StatsOut<P, A>&);
FASTBN_CUDA_INSTANTIATE(FASTBN_INSTANTIATE_STATS)

}  // namespace cuda
}  // namespace fastbn
