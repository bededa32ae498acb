// Backward: the per-channel reduction (Σg, Σg·x̂ with g = dy masked by the recomputed ReLU), the
// elementwise dx / grad_residual, and the persistent single-read training backward.
#include "cuda/plan.cuh"

namespace fastbn {
namespace cuda {
namespace {

// g = dy, zeroed where the forward's pre-activation (recomputed with the forward's arithmetic) is not > 0.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void masked_grad(const Pack<scalar_t, W>& dyv, const Pack<scalar_t, W>& xv,
                                            const scalar_t* __restrict__ res, const Coef<acc_t>* k, bool relu,
                                            acc_t (&g)[W], acc_t (&xmu)[W]) {
  Pack<scalar_t, W> rv;
  if (relu && res != nullptr) rv = load_pack<W>(res);
#pragma unroll
  for (int v = 0; v < W; ++v) {
    const acc_t xa = static_cast<acc_t>(xv.val[v]);
    g[v] = static_cast<acc_t>(dyv.val[v]);
    xmu[v] = xa - k[v].mean;
    if (relu) {
      const bool has_res = res != nullptr;
      const acc_t pre = pre_activation(xa, k[v], has_res ? static_cast<acc_t>(rv.val[v]) : acc_t(0), has_res);
      if (!relu_passes(pre)) g[v] = acc_t(0);
    }
  }
}

// dx and grad_residual of W elements.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_grads(scalar_t* __restrict__ dx, scalar_t* __restrict__ dr, const acc_t (&g)[W],
                                            const acc_t (&xmu)[W], const BwdCoef<acc_t>* b, bool training) {
  if (dx != nullptr) {
    Pack<scalar_t, W> out;
#pragma unroll
    for (int v = 0; v < W; ++v) out.val[v] = static_cast<scalar_t>(grad_input(g[v], xmu[v], b[v], training));
    store_pack<W>(dx, out);
  }
  if (dr != nullptr) {
    Pack<scalar_t, W> out;
#pragma unroll
    for (int v = 0; v < W; ++v) out.val[v] = static_cast<scalar_t>(g[v]);
    store_pack<W>(dr, out);
  }
}

// Backward reduction, planes layout. Traffic: 2E read (+1E residual when relu). Launch: grid (C, splits),
// 1-D blocks; last-block-done merge of the (Σg, Σg·(x-mean)) partials in split order, then the epilogue
// (grad_weight, grad_bias, or the sums / means for the elementwise pass).
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_reduce_planes_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ res, PlanesGeom<index_t> g,
                                  BwdParams<param_t, acc_t> params, BwdReduceOut<param_t, acc_t> out,
                                  Sums2<acc_t>* partials, unsigned* counters, bool relu) {
  __shared__ Sums2<acc_t> scratch[32];
  const index_t c = blockIdx.x;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  Sums2<acc_t> sum{acc_t(0), acc_t(0)};
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    Coef<acc_t> k[W];
    k[0] = params.get(c, acc_t(0), acc_t(0)).fwd;
#pragma unroll
    for (int v = 1; v < W; ++v) k[v] = k[0];
    acc_t sg[W], sgx[W];
#pragma unroll
    for (int v = 0; v < W; ++v) sg[v] = sgx[v] = acc_t(0);
    const index_t step = static_cast<index_t>(splits) * blockDim.x;
    for (index_t u = static_cast<index_t>(split) * blockDim.x + threadIdx.x; u < g.units; u += step) {
      const index_t off = g.template offset<W>(c, u);
      acc_t gv[W], xmu[W];
      masked_grad<W>(load_pack<W>(dy + off), load_pack<W>(x + off), res != nullptr ? res + off : nullptr, k, relu, gv,
                     xmu);
#pragma unroll
      for (int v = 0; v < W; ++v) {
        sg[v] += gv[v];
        sgx[v] = fma_acc(gv[v], xmu[v], sgx[v]);
      }
    }
#pragma unroll
    for (int v = 0; v < W; ++v) {
      sum.g += sg[v];
      sum.gx += sgx[v];
    }
  });
  sum = block_reduce(sum, Sums2Op<acc_t>(), scratch);
  if (splits == 1) {
    if (threadIdx.x == 0) out.finalize(c, sum);
    return;
  }
  if (threadIdx.x == 0) partials[c * splits + split] = sum;
  if (!arrive_last(counters + c, splits)) return;
  sum = merge_partials_block(partials + c * splits, 1, splits, Sums2Op<acc_t>(), scratch);
  if (threadIdx.x == 0) out.finalize(c, sum);
}

// Backward reduction, rows layout. Traffic: 2E read (+1E residual when relu). Launch: grid (tiles, splits),
// blocks (tx, ty), dynamic shared memory of tx*ty partial pairs; last-block-done merge per tile.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_reduce_rows_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ res, RowsGeom<index_t> g,
                                BwdParams<param_t, acc_t> params, BwdReduceOut<param_t, acc_t> out,
                                Sums2<acc_t>* partials, unsigned* counters, bool relu) {
  Sums2<acc_t>* smem = dynamic_shared<Sums2<acc_t>>();
  const unsigned split = blockIdx.y, splits = gridDim.y;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    const bool active = c0 < g.C;
    Sums2<acc_t> lanes[W];
#pragma unroll
    for (int v = 0; v < W; ++v) lanes[v] = Sums2Op<acc_t>::identity();
    if (active) {
      Coef<acc_t> k[W];
#pragma unroll
      for (int v = 0; v < W; ++v) k[v] = params.get(c0 + v, acc_t(0), acc_t(0)).fwd;
      const index_t step = static_cast<index_t>(splits) * blockDim.y;
      for (index_t r = static_cast<index_t>(split) * blockDim.y + threadIdx.y; r < g.R; r += step) {
        const index_t off = r * g.C + c0;
        acc_t gv[W], xmu[W];
        masked_grad<W>(load_pack<W>(dy + off), load_pack<W>(x + off), res != nullptr ? res + off : nullptr, k, relu,
                       gv, xmu);
#pragma unroll
        for (int v = 0; v < W; ++v) {
          lanes[v].g += gv[v];
          lanes[v].gx = fma_acc(gv[v], xmu[v], lanes[v].gx);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < W; ++v) lanes[v] = reduce_y(lanes[v], Sums2Op<acc_t>(), smem);
    const bool leader = active && threadIdx.y == 0;
    if (splits == 1) {
      if (leader)
#pragma unroll
        for (int v = 0; v < W; ++v) out.finalize(c0 + v, lanes[v]);
      return;
    }
    if (leader)
#pragma unroll
      for (int v = 0; v < W; ++v) partials[static_cast<int64_t>(split) * g.C + c0 + v] = lanes[v];
    if (!arrive_last(counters + blockIdx.x, splits)) return;
#pragma unroll
    for (int v = 0; v < W; ++v) {
      const Sums2<acc_t> total =
          merge_partials_y(partials + (active ? c0 + v : 0), g.C, splits, active, Sums2Op<acc_t>(), smem);
      if (leader) out.finalize(c0 + v, total);
    }
  });
}

// Backward elementwise, planes layout. Traffic: training 2E read + 1E write (dx) [+1E write grad_residual]
// [+1E read residual with relu]; eval without relu reads only dy. Launch: as the planes normalize.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_elementwise_planes_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                       const scalar_t* __restrict__ res, scalar_t* __restrict__ dx,
                                       scalar_t* __restrict__ dr, PlanesGeom<index_t> g,
                                       BwdParams<param_t, acc_t> params, bool training, bool relu) {
  const index_t c = blockIdx.x;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const bool need_x = training || relu;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    BwdCoef<acc_t> b[W];
    Coef<acc_t> k[W];
    b[0] = params.get(c);
#pragma unroll
    for (int v = 0; v < W; ++v) {
      b[v] = b[0];
      k[v] = b[0].fwd;
    }
    const index_t step = static_cast<index_t>(splits) * blockDim.x;
    for (index_t u = static_cast<index_t>(split) * blockDim.x + threadIdx.x; u < g.units; u += step) {
      const index_t off = g.template offset<W>(c, u);
      Pack<scalar_t, W> xv{};
      if (need_x) xv = load_pack<W>(x + off);
      acc_t gv[W], xmu[W];
      masked_grad<W>(load_pack<W>(dy + off), xv, res != nullptr ? res + off : nullptr, k, relu, gv, xmu);
      store_grads<W>(dx != nullptr ? dx + off : nullptr, dr != nullptr ? dr + off : nullptr, gv, xmu, b, training);
    }
  });
}

// Backward elementwise, rows layout. Traffic: as the planes kernel. Launch: as the rows normalize.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_elementwise_rows_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ res, scalar_t* __restrict__ dx,
                                     scalar_t* __restrict__ dr, RowsGeom<index_t> g,
                                     BwdParams<param_t, acc_t> params, bool training, bool relu) {
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const bool need_x = training || relu;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    if (c0 >= g.C) return;
    BwdCoef<acc_t> b[W];
    Coef<acc_t> k[W];
#pragma unroll
    for (int v = 0; v < W; ++v) {
      b[v] = params.get(c0 + v);
      k[v] = b[v].fwd;
    }
    const index_t step = static_cast<index_t>(splits) * blockDim.y;
    for (index_t r = static_cast<index_t>(split) * blockDim.y + threadIdx.y; r < g.R; r += step) {
      const index_t off = r * g.C + c0;
      Pack<scalar_t, W> xv{};
      if (need_x) xv = load_pack<W>(x + off);
      acc_t gv[W], xmu[W];
      masked_grad<W>(load_pack<W>(dy + off), xv, res != nullptr ? res + off : nullptr, k, relu, gv, xmu);
      store_grads<W>(dx != nullptr ? dx + off : nullptr, dr != nullptr ? dr + off : nullptr, gv, xmu, b, training);
    }
  });
}

// Persistent training backward, planes layout. Traffic: 3E (+1E write grad_residual, +1E read residual
// with relu): x and g are read once into registers (kBytes each per thread), reduced, and dx is computed
// from registers after one grid barrier. Launch: cooperative, grid (gc, splits), `rounds` channels per
// block, as the persistent forward.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, int kBytes>
__global__ void __launch_bounds__(kMaxThreads)
    persistent_backward_planes_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ res, scalar_t* __restrict__ dx,
                                      scalar_t* __restrict__ dr, PlanesGeom<index_t> g, index_t C, unsigned rounds,
                                      BwdParams<param_t, acc_t> params, BwdReduceOut<param_t, acc_t> out,
                                      Sums2<acc_t>* partials, bool relu) {
  __shared__ Sums2<acc_t> scratch[32];
  const unsigned gc = gridDim.x, split = blockIdx.y, splits = gridDim.y;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    constexpr int kSlots = kBytes / static_cast<int>(sizeof(scalar_t) * W);
    const int per_round = kSlots / static_cast<int>(rounds);
    Pack<scalar_t, W> xbuf[kSlots], gbuf[kSlots];
    for (unsigned r = 0; r < rounds; ++r) {
      const index_t c = static_cast<index_t>(blockIdx.x + r * gc);
      if (c >= C) break;  // block-uniform
      Coef<acc_t> k[W];
      k[0] = params.get(c, acc_t(0), acc_t(0)).fwd;
#pragma unroll
      for (int v = 1; v < W; ++v) k[v] = k[0];
      Sums2<acc_t> sum{acc_t(0), acc_t(0)};
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (s / per_round != static_cast<int>(r)) continue;
        const index_t u = (static_cast<index_t>(s % per_round) * splits + split) * blockDim.x + threadIdx.x;
        if (u < g.units) {
          const index_t off = g.template offset<W>(c, u);
          xbuf[s] = load_pack<W>(x + off);
          acc_t gv[W], xmu[W];
          masked_grad<W>(load_pack<W>(dy + off), xbuf[s], res != nullptr ? res + off : nullptr, k, relu, gv, xmu);
#pragma unroll
          for (int v = 0; v < W; ++v) {
            gbuf[s].val[v] = static_cast<scalar_t>(gv[v]);  // exact: dy or 0
            sum.g += gv[v];
            sum.gx = fma_acc(gv[v], xmu[v], sum.gx);
          }
          if (dr != nullptr) store_pack<W>(dr + off, gbuf[s]);
        }
      }
      sum = block_reduce(sum, Sums2Op<acc_t>(), scratch);
      if (threadIdx.x == 0) partials[c * splits + split] = sum;
    }
    grid_sync();
    if (dx == nullptr) {
      if (split == 0)
        for (unsigned r = 0; r < rounds; ++r) {
          const index_t c = static_cast<index_t>(blockIdx.x + r * gc);
          if (c >= C) break;
          const Sums2<acc_t> sum = merge_partials_block(partials + c * splits, 1, splits, Sums2Op<acc_t>(), scratch);
          if (threadIdx.x == 0) out.finalize(c, sum);
        }
      return;
    }
    for (unsigned r = 0; r < rounds; ++r) {
      const index_t c = static_cast<index_t>(blockIdx.x + r * gc);
      if (c >= C) break;
      const Sums2<acc_t> sum = merge_partials_block(partials + c * splits, 1, splits, Sums2Op<acc_t>(), scratch);
      if (split == 0 && threadIdx.x == 0) out.finalize(c, sum);
      acc_t mdy, mdyx;
      out.means(c, sum, mdy, mdyx);
      BwdCoef<acc_t> b[W];
      b[0] = params.get(c, mdy, mdyx);
#pragma unroll
      for (int v = 1; v < W; ++v) b[v] = b[0];
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (s / per_round != static_cast<int>(r)) continue;
        const index_t u = (static_cast<index_t>(s % per_round) * splits + split) * blockDim.x + threadIdx.x;
        if (u < g.units) {
          acc_t gv[W], xmu[W];
#pragma unroll
          for (int v = 0; v < W; ++v) {
            gv[v] = static_cast<acc_t>(gbuf[s].val[v]);
            xmu[v] = static_cast<acc_t>(xbuf[s].val[v]) - b[v].fwd.mean;
          }
          store_grads<W>(dx + g.template offset<W>(c, u), static_cast<scalar_t*>(nullptr), gv, xmu, b, true);
        }
      }
    }
  });
}

// Persistent training backward, rows layout. Traffic: 3E (+ as the planes kernel). Launch: cooperative,
// grid (tiles, splits), blocks (tx, ty), kSlots rows per thread; coefficients through shared memory.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, int kBytes>
__global__ void __launch_bounds__(kMaxThreads)
    persistent_backward_rows_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ res, scalar_t* __restrict__ dx,
                                    scalar_t* __restrict__ dr, RowsGeom<index_t> g, BwdParams<param_t, acc_t> params,
                                    BwdReduceOut<param_t, acc_t> out, Sums2<acc_t>* partials, bool relu) {
  Sums2<acc_t>* smem = dynamic_shared<Sums2<acc_t>>();
  BwdCoef<acc_t>* coefs = reinterpret_cast<BwdCoef<acc_t>*>(smem + blockDim.x * blockDim.y);
  const unsigned split = blockIdx.y, splits = gridDim.y;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    constexpr int kSlots = kBytes / static_cast<int>(sizeof(scalar_t) * W);
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    const bool active = c0 < g.C;
    Pack<scalar_t, W> xbuf[kSlots], gbuf[kSlots];
    Sums2<acc_t> lanes[W];
#pragma unroll
    for (int v = 0; v < W; ++v) lanes[v] = Sums2Op<acc_t>::identity();
    if (active) {
      Coef<acc_t> k[W];
#pragma unroll
      for (int v = 0; v < W; ++v) k[v] = params.get(c0 + v, acc_t(0), acc_t(0)).fwd;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        const index_t r = (static_cast<index_t>(s) * splits + split) * blockDim.y + threadIdx.y;
        if (r < g.R) {
          const index_t off = r * g.C + c0;
          xbuf[s] = load_pack<W>(x + off);
          acc_t gv[W], xmu[W];
          masked_grad<W>(load_pack<W>(dy + off), xbuf[s], res != nullptr ? res + off : nullptr, k, relu, gv, xmu);
#pragma unroll
          for (int v = 0; v < W; ++v) {
            gbuf[s].val[v] = static_cast<scalar_t>(gv[v]);
            lanes[v].g += gv[v];
            lanes[v].gx = fma_acc(gv[v], xmu[v], lanes[v].gx);
          }
          if (dr != nullptr) store_pack<W>(dr + off, gbuf[s]);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < W; ++v) {
      const Sums2<acc_t> s = reduce_y(lanes[v], Sums2Op<acc_t>(), smem);
      if (active && threadIdx.y == 0) partials[static_cast<int64_t>(split) * g.C + c0 + v] = s;
    }
    grid_sync();
#pragma unroll
    for (int v = 0; v < W; ++v) {
      const Sums2<acc_t> s =
          merge_partials_y(partials + (active ? c0 + v : 0), g.C, splits, active, Sums2Op<acc_t>(), smem);
      if (active && threadIdx.y == 0) {
        if (split == 0) out.finalize(c0 + v, s);
        acc_t mdy, mdyx;
        out.means(c0 + v, s, mdy, mdyx);
        coefs[threadIdx.x * W + v] = params.get(c0 + v, mdy, mdyx);
      }
    }
    __syncthreads();
    if (!active || dx == nullptr) return;
    BwdCoef<acc_t> b[W];
#pragma unroll
    for (int v = 0; v < W; ++v) b[v] = coefs[threadIdx.x * W + v];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const index_t r = (static_cast<index_t>(s) * splits + split) * blockDim.y + threadIdx.y;
      if (r < g.R) {
        acc_t gv[W], xmu[W];
#pragma unroll
        for (int v = 0; v < W; ++v) {
          gv[v] = static_cast<acc_t>(gbuf[s].val[v]);
          xmu[v] = static_cast<acc_t>(xbuf[s].val[v]) - b[v].fwd.mean;
        }
        store_grads<W>(dx + r * g.C + c0, static_cast<scalar_t*>(nullptr), gv, xmu, b, true);
      }
    }
  });
}

}  // namespace

template <typename S, typename P, typename A>
void launch_backward_reduce(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* res,
                            const BwdParams<P, A>& params, const BwdReduceOut<P, A>& out, bool relu) {
  BOOL_SWITCH(g.idx64, kIdx64, [&] {
    using index_t = index_type<kIdx64>;
    if (g.layout == Layout::kPlanes) {
      const auto pg = planes_geom<index_t, S>(g);
      auto kernel = backward_reduce_planes_kernel<S, P, A, index_t>;
      const unsigned threads = planes_threads(pg.units);
      const unsigned splits = planes_splits(pg.units, g.C, threads, max_cooperative_blocks(kernel, threads, 0));
      at::Tensor partials = scratch_bytes(input, splits > 1 ? g.C * splits * int64_t(sizeof(Sums2<A>)) : 0);
      at::Tensor counters = zero_counters(input, splits > 1 ? g.C : 0);
      launch(kernel, dim3(static_cast<unsigned>(g.C), splits), dim3(threads), 0, current_stream(), dy, x, res, pg,
             params, out, reinterpret_cast<Sums2<A>*>(partials.data_ptr()),
             reinterpret_cast<unsigned*>(counters.data_ptr()), relu);
    } else {
      const auto rg = rows_geom<index_t, S>(g);
      auto kernel = backward_reduce_rows_kernel<S, P, A, index_t>;
      RowsConfig cfg = rows_shape(g.R, g.C, rg.vec);
      const size_t smem = cfg.threads() * sizeof(Sums2<A>);
      rows_splits(cfg, g.R, max_cooperative_blocks(kernel, cfg.threads(), smem));
      at::Tensor partials = scratch_bytes(input, cfg.splits > 1 ? g.C * cfg.splits * int64_t(sizeof(Sums2<A>)) : 0);
      at::Tensor counters = zero_counters(input, cfg.splits > 1 ? cfg.tiles : 0);
      launch(kernel, dim3(cfg.tiles, cfg.splits), dim3(cfg.tx, cfg.ty), smem, current_stream(), dy, x, res, rg,
             params, out, reinterpret_cast<Sums2<A>*>(partials.data_ptr()),
             reinterpret_cast<unsigned*>(counters.data_ptr()), relu);
    }
  });
}

template <typename S, typename P, typename A>
void launch_backward_elementwise(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* res,
                                 S* dx, S* dr, const BwdParams<P, A>& params, bool training, bool relu) {
  BOOL_SWITCH(g.idx64, kIdx64, [&] {
    using index_t = index_type<kIdx64>;
    if (g.layout == Layout::kPlanes) {
      const auto pg = planes_geom<index_t, S>(g);
      auto kernel = backward_elementwise_planes_kernel<S, P, A, index_t>;
      const unsigned threads = planes_threads(pg.units);
      const unsigned splits = planes_splits(pg.units, g.C, threads, max_cooperative_blocks(kernel, threads, 0));
      launch(kernel, dim3(static_cast<unsigned>(g.C), splits), dim3(threads), 0, current_stream(), dy, x, res, dx, dr,
             pg, params, training, relu);
    } else {
      const auto rg = rows_geom<index_t, S>(g);
      auto kernel = backward_elementwise_rows_kernel<S, P, A, index_t>;
      RowsConfig cfg = rows_shape(g.R, g.C, rg.vec);
      rows_splits(cfg, g.R, max_cooperative_blocks(kernel, cfg.threads(), 0));
      launch(kernel, dim3(cfg.tiles, cfg.splits), dim3(cfg.tx, cfg.ty), 0, current_stream(), dy, x, res, dx, dr, rg,
             params, training, relu);
    }
  });
}

template <typename S, typename P, typename A>
bool launch_persistent_backward(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* res,
                                S* dx, S* dr, const BwdParams<P, A>& params, const BwdReduceOut<P, A>& out,
                                bool relu) {
  constexpr int kBytes = kPersistentBackwardBytes;
  // A tensor that fits on chip always has 32-bit offsets: no 64-bit instantiation.
  if (g.idx64) return false;
  using index_t = int32_t;
  return [&] {
    if (g.layout == Layout::kPlanes) {
      const auto pg = planes_geom<index_t, S>(g);
      const int64_t slots = kBytes / (int64_t(sizeof(S)) * pg.vec);
      auto kernel = persistent_backward_planes_kernel<S, P, A, index_t, kBytes>;
      PersistentPlanes shape;
      // The rounds are bounded by the slot count of the vector width (kBytes / 16).
      if (!persistent_planes_shape(pg.units, g.C, slots, kBytes / 16,
                                   [&](unsigned t) { return int64_t(max_cooperative_blocks(kernel, t, 0)); }, shape))
        return false;
      const unsigned threads = shape.threads;
      const int64_t gc = shape.gc, rounds = shape.rounds, splits = shape.splits;
      at::Tensor partials = scratch_bytes(input, g.C * splits * int64_t(sizeof(Sums2<A>)));
      launch_cooperative(kernel, dim3(static_cast<unsigned>(gc), static_cast<unsigned>(splits)), dim3(threads), 0,
                         current_stream(), dy, x, res, dx, dr, pg, static_cast<index_t>(g.C),
                         static_cast<unsigned>(rounds), params, out, reinterpret_cast<Sums2<A>*>(partials.data_ptr()),
                         relu);
      return true;
    }
    const auto rg = rows_geom<index_t, S>(g);
    const int64_t slots = kBytes / (int64_t(sizeof(S)) * rg.vec);
    auto kernel = persistent_backward_rows_kernel<S, P, A, index_t, kBytes>;
    RowsConfig cfg = rows_shape(g.R, g.C, rg.vec);
    const size_t smem = cfg.threads() * sizeof(Sums2<A>) + cfg.tx * kPackSize<S> * sizeof(BwdCoef<A>);
    const int64_t resident = max_cooperative_blocks(kernel, cfg.threads(), smem);
    const int64_t splits = div_up(g.R, int64_t(cfg.ty) * slots);
    if (int64_t(cfg.tiles) * splits > resident) return false;
    at::Tensor partials = scratch_bytes(input, g.C * splits * int64_t(sizeof(Sums2<A>)));
    launch_cooperative(kernel, dim3(cfg.tiles, static_cast<unsigned>(splits)), dim3(cfg.tx, cfg.ty), smem,
                       current_stream(), dy, x, res, dx, dr, rg, params, out,
                       reinterpret_cast<Sums2<A>*>(partials.data_ptr()), relu);
    return true;
  }();
}

#define FASTBN_INSTANTIATE_BACKWARD(S, P, A)                                                                        \
  template void launch_backward_reduce<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*, const S*,   \
                                                const BwdParams<P, A>&, const BwdReduceOut<P, A>&, bool);          \
  template void launch_backward_elementwise<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*,       \
                                                     const S*, S*, S*, const BwdParams<P, A>&, bool, bool);         \
  template bool launch_persistent_backward<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*,        \
                                                    const S*, S*, S*, const BwdParams<P, A>&,                      \
                                                    const BwdReduceOut<P, A>&, bool);
FASTBN_CUDA_INSTANTIATE(FASTBN_INSTANTIATE_BACKWARD)

}  // namespace cuda
}  // namespace fastbn
