// Per-channel statistics (Welford triples, deterministic grid merge, running-stat update on the device):
// local_stats and the first pass of the two-pass forward-train.
#include "cuda/plan.cuh"

namespace fastbn {
namespace cuda {
namespace {

// Statistics, planes layout (NCHW-contiguous).
// Traffic: 1E read. Launch: grid (C, splits), 1-D blocks of 32..512 threads; block (c, s) reduces units
// s*T + t, step splits*T, of channel c. With splits > 1 each block writes a Welford partial and the last
// block of the channel to arrive (integer counter per channel) merges the partials in split order and runs
// the epilogue (saved statistics, running-stat update).
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    stats_planes_kernel(const scalar_t* __restrict__ x, PlanesGeom<index_t> g, StatsOut<param_t, acc_t> out,
                        Welford<acc_t>* partials, unsigned* counters) {
  __shared__ Welford<acc_t> scratch[32];
  const index_t c = blockIdx.x;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const double factor = out.factor();
  const acc_t shift = static_cast<acc_t>(x[c * g.S]);
  acc_t s1 = 0, s2 = 0;
  int64_t n = 0;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    acc_t a1[W], a2[W];
#pragma unroll
    for (int v = 0; v < W; ++v) a1[v] = a2[v] = acc_t(0);
    index_t count = 0;
    const index_t step = static_cast<index_t>(splits) * blockDim.x;
    for (index_t u = static_cast<index_t>(split) * blockDim.x + threadIdx.x; u < g.units; u += step) {
      const auto p = load_pack<W>(x + g.template offset<W>(c, u));
#pragma unroll
      for (int v = 0; v < W; ++v) {
        const acc_t d = static_cast<acc_t>(p.val[v]) - shift;
        a1[v] += d;
        a2[v] = fma_acc(d, d, a2[v]);
      }
      ++count;
    }
#pragma unroll
    for (int v = 0; v < W; ++v) {
      s1 += a1[v];
      s2 += a2[v];
    }
    n = static_cast<int64_t>(count) * W;
  });
  Welford<acc_t> w = block_reduce(welford_from_shifted(s1, s2, n), WelfordOp<acc_t>(), scratch);
  if (splits == 1) {
    if (threadIdx.x == 0) out.finalize(c, unshift(w, shift), factor);
    return;
  }
  if (threadIdx.x == 0) partials[c * splits + split] = w;
  if (!arrive_last(counters + c, splits)) return;
  w = merge_partials_block(partials + c * splits, 1, splits, WelfordOp<acc_t>(), scratch);
  if (threadIdx.x == 0) out.finalize(c, unshift(w, shift), factor);
}

// Statistics, rows layout (channels_last, (N, C)).
// Traffic: 1E read. Launch: grid (tiles, splits), blocks (tx, ty) with tx*W channels per tile; a thread
// accumulates its W channels over rows split*ty + threadIdx.y, step splits*ty; the block reduces over y
// (dynamic shared memory: tx*ty Welford triples); with splits > 1 the last block of the tile to arrive
// (integer counter per tile) merges the partials in split order and runs the epilogue.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    stats_rows_kernel(const scalar_t* __restrict__ x, RowsGeom<index_t> g, StatsOut<param_t, acc_t> out,
                      Welford<acc_t>* partials, unsigned* counters) {
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
      const auto first = load_pack<W>(x + c0);
#pragma unroll
      for (int v = 0; v < W; ++v) shift[v] = static_cast<acc_t>(first.val[v]);
      const index_t step = static_cast<index_t>(splits) * blockDim.y;
      for (index_t r = static_cast<index_t>(split) * blockDim.y + threadIdx.y; r < g.R; r += step) {
        const auto p = load_pack<W>(x + r * g.C + c0);
#pragma unroll
        for (int v = 0; v < W; ++v) {
          const acc_t d = static_cast<acc_t>(p.val[v]) - shift[v];
          a1[v] += d;
          a2[v] = fma_acc(d, d, a2[v]);
        }
        ++count;
      }
    }
    Welford<acc_t> lanes[W];
#pragma unroll
    for (int v = 0; v < W; ++v)
      lanes[v] = reduce_y(welford_from_shifted(a1[v], a2[v], int64_t(count)), WelfordOp<acc_t>(), smem);
    const bool leader = active && threadIdx.y == 0;
    if (splits == 1) {
      if (leader)
#pragma unroll
        for (int v = 0; v < W; ++v) out.finalize(c0 + v, unshift(lanes[v], shift[v]), factor);
      return;
    }
    if (leader)
#pragma unroll
      for (int v = 0; v < W; ++v) partials[static_cast<int64_t>(split) * g.C + c0 + v] = lanes[v];
    if (!arrive_last(counters + blockIdx.x, splits)) return;
#pragma unroll
    for (int v = 0; v < W; ++v) {
      const Welford<acc_t> total =
          merge_partials_y(partials + (active ? c0 + v : 0), g.C, splits, active, WelfordOp<acc_t>(), smem);
      if (leader) out.finalize(c0 + v, unshift(total, shift[v]), factor);
    }
  });
}

}  // namespace

template <typename S, typename P, typename A>
void launch_stats(const Geometry& g, const at::Tensor& input, const StatsOut<P, A>& out) {
  const S* x = static_cast<const S*>(input.data_ptr());
  BOOL_SWITCH(g.idx64, kIdx64, [&] {
    using index_t = index_type<kIdx64>;
    if (g.layout == Layout::kPlanes) {
      const auto pg = planes_geom<index_t, S>(g);
      auto kernel = stats_planes_kernel<S, P, A, index_t>;
      const unsigned threads = planes_threads(pg.units);
      const unsigned splits = planes_splits(pg.units, g.C, threads, max_cooperative_blocks(kernel, threads, 0));
      at::Tensor partials = scratch_bytes(input, splits > 1 ? g.C * splits * int64_t(sizeof(Welford<A>)) : 0);
      at::Tensor counters = zero_counters(input, splits > 1 ? g.C : 0);
      launch(kernel, dim3(static_cast<unsigned>(g.C), splits), dim3(threads), 0, current_stream(), x, pg, out,
             reinterpret_cast<Welford<A>*>(partials.data_ptr()),
             reinterpret_cast<unsigned*>(counters.data_ptr()));
    } else {
      const auto rg = rows_geom<index_t, S>(g);
      auto kernel = stats_rows_kernel<S, P, A, index_t>;
      RowsConfig cfg = rows_shape(g.R, g.C, rg.vec);
      const size_t smem = cfg.threads() * sizeof(Welford<A>);
      rows_splits(cfg, g.R, max_cooperative_blocks(kernel, cfg.threads(), smem));
      at::Tensor partials = scratch_bytes(input, cfg.splits > 1 ? g.C * cfg.splits * int64_t(sizeof(Welford<A>)) : 0);
      at::Tensor counters = zero_counters(input, cfg.splits > 1 ? cfg.tiles : 0);
      launch(kernel, dim3(cfg.tiles, cfg.splits), dim3(cfg.tx, cfg.ty), smem, current_stream(), x, rg, out,
             reinterpret_cast<Welford<A>*>(partials.data_ptr()),
             reinterpret_cast<unsigned*>(counters.data_ptr()));
    }
  });
}

#define FASTBN_INSTANTIATE_STATS(S, P, A) \
  template void launch_stats<S, P, A>(const Geometry&, const at::Tensor&, const StatsOut<P, A>&);
FASTBN_CUDA_INSTANTIATE(FASTBN_INSTANTIATE_STATS)

}  // namespace cuda
}  // namespace fastbn
