// Backward: the per-channel reduction (Σg, Σg·x̂ with g = dy masked by the ReLU), the
// elementwise dx / grad_residual, and the persistent single-read training backward.
#include "cuda/plan.cuh"

namespace fastbn {
namespace cuda {
namespace {

// g = dy, zeroed with relu where the forward's output y (when given: a fused residual add) or else the forward's
// pre-activation, recomputed from x with the forward's arithmetic, is not > 0.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void masked_grad(const Pack<scalar_t, W>& dyv, const Pack<scalar_t, W>& xv,
                                            const scalar_t* __restrict__ y, const Coef<acc_t>* k, bool relu,
                                            acc_t (&g)[W], acc_t (&xmu)[W]) {
  const bool has_y = relu && y != nullptr;
  Pack<scalar_t, W> yv;
  if (has_y) yv = load_pack<W>(y);
#pragma unroll
  for (int v = 0; v < W; ++v) {
    const acc_t xa = static_cast<acc_t>(xv.val[v]);
    g[v] = static_cast<acc_t>(dyv.val[v]);
    xmu[v] = xa - k[v].mean;
    if (relu) {
      const acc_t out = has_y ? static_cast<acc_t>(yv.val[v]) : pre_activation(xa, k[v], acc_t(0), false);
      if (!relu_passes(out)) g[v] = acc_t(0);
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

// First pass of the persistent backward on W elements (pointers at their offset): x and g (exact: dy or 0)
// stay in registers (xb, gb), grad_residual is written when asked; g and x - mean are returned for the sums.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void keep_masked_grad(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                                 const scalar_t* __restrict__ y, scalar_t* __restrict__ dr,
                                                 const Coef<acc_t>* k, bool relu, Pack<scalar_t, W>& xb,
                                                 Pack<scalar_t, W>& gb, acc_t (&g)[W], acc_t (&xmu)[W]) {
  xb = load_pack<W>(x);
  masked_grad<W>(load_pack<W>(dy), xb, y, k, relu, g, xmu);
#pragma unroll
  for (int v = 0; v < W; ++v) gb.val[v] = static_cast<scalar_t>(g[v]);
  if (dr != nullptr) store_pack<W>(dr, gb);
}

// Second pass of the persistent backward: dx of W elements from the registers kept by keep_masked_grad.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_kept_dx(scalar_t* __restrict__ dx, const Pack<scalar_t, W>& xb,
                                              const Pack<scalar_t, W>& gb, const BwdCoef<acc_t>* b) {
  acc_t g[W], xmu[W];
#pragma unroll
  for (int v = 0; v < W; ++v) {
    g[v] = static_cast<acc_t>(gb.val[v]);
    xmu[v] = static_cast<acc_t>(xb.val[v]) - b[v].fwd.mean;
  }
  store_grads<W>(dx, static_cast<scalar_t*>(nullptr), g, xmu, b, true);
}

// Adds g and g * (x - mean) of W elements to per-lane sums.
template <int W, typename acc_t>
__device__ __forceinline__ void add_grads(Sums2<acc_t> (&lanes)[W], const acc_t (&g)[W], const acc_t (&xmu)[W]) {
#pragma unroll
  for (int v = 0; v < W; ++v) {
    lanes[v].g += g[v];
    lanes[v].gx = fma_acc(g[v], xmu[v], lanes[v].gx);
  }
}

// The reduction state of a rows column: zeroed sums and the forward's coefficients of its W channels (for
// the ReLU mask; only read when the column is active).
template <int W, typename param_t, typename acc_t, typename index_t>
__device__ __forceinline__ void rows_reduce_init(const BwdParams<param_t, acc_t>& params, index_t c0, bool active,
                                                 Sums2<acc_t> (&lanes)[W], Coef<acc_t> (&k)[W]) {
#pragma unroll
  for (int v = 0; v < W; ++v) lanes[v] = Sums2Op<acc_t>::identity();
  if (active)
#pragma unroll
    for (int v = 0; v < W; ++v) k[v] = params.get(c0 + v, acc_t(0), acc_t(0)).fwd;
}

// Backward reduction, planes layout. Traffic: 2E read (+1E read of y when relu and given); kEvalGrads (eval, whose
// dx = k*g needs no sums) also writes dx and grad_residual where not null, +1E each, so that eval's whole backward
// is one pass (a template flag: the training reduction keeps its registers). Launch: grid (C, splits), 1-D blocks;
// last-block-done merge of the (Σg, Σg·(x-mean)) partials in split order, then the epilogue (grad_weight,
// grad_bias, or the sums / means for the elementwise pass).
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, bool kEvalGrads>
__global__ void __launch_bounds__(kMaxThreads)
    backward_reduce_planes_kernel(PlanesGeom<index_t> g, Sums2<acc_t>* partials, unsigned* counters,
                                  const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ y, scalar_t* __restrict__ dx,
                                  scalar_t* __restrict__ dr, BwdParams<param_t, acc_t> params,
                                  BwdReduceOut<param_t, acc_t> out, bool relu) {
  __shared__ Sums2<acc_t> scratch[32];
  const index_t c = blockIdx.x;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  Sums2<acc_t> sum{acc_t(0), acc_t(0)};
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    BwdCoef<acc_t> b[W];
    Coef<acc_t> k[W];
    b[0] = params.get(c, acc_t(0), acc_t(0));
#pragma unroll
    for (int v = 0; v < W; ++v) {
      b[v] = b[0];
      k[v] = b[0].fwd;
    }
    Sums2<acc_t> lanes[W];
#pragma unroll
    for (int v = 0; v < W; ++v) lanes[v] = Sums2Op<acc_t>::identity();
    const index_t step = static_cast<index_t>(splits) * blockDim.x;
    for (index_t u = static_cast<index_t>(split) * blockDim.x + threadIdx.x; u < g.units; u += step) {
      const Pos<index_t> pos = g.template pos<W>(c, u);
      const index_t off = g.offset(pos);
      acc_t gv[W], xmu[W];
      masked_grad<W>(load_pack<W>(dy + off), load_pack<W>(x + g.x_offset(pos)), y != nullptr ? y + off : nullptr, k,
                     relu, gv, xmu);
      add_grads(lanes, gv, xmu);
      if constexpr (kEvalGrads)
        store_grads<W>(dx != nullptr ? dx + off : nullptr, dr != nullptr ? dr + off : nullptr, gv, xmu, b, false);
    }
#pragma unroll
    for (int v = 0; v < W; ++v) sum = Sums2Op<acc_t>()(sum, lanes[v]);
  });
  split_reduce_block(sum, Sums2Op<acc_t>(), scratch, partials, counters, c, split, splits,
                     [&](const Sums2<acc_t>& total) { out.finalize(c, total); });
}

// Backward reduction, rows layout. Traffic: as the planes kernel (kEvalGrads included). Launch: grid (tiles,
// splits), blocks (tx, ty), dynamic shared memory of tx*ty partial pairs; last-block-done merge per tile.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, bool kEvalGrads>
__global__ void __launch_bounds__(kMaxThreads)
    backward_reduce_rows_kernel(RowsGeom<index_t> g, Sums2<acc_t>* partials, unsigned* counters,
                                const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ y, scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
                                BwdParams<param_t, acc_t> params, BwdReduceOut<param_t, acc_t> out, bool relu) {
  Sums2<acc_t>* smem = dynamic_shared<Sums2<acc_t>>();
  const unsigned split = blockIdx.y, splits = gridDim.y;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    const bool active = c0 < g.C;
    Sums2<acc_t> lanes[W];
    Coef<acc_t> k[W];
    rows_reduce_init(params, c0, active, lanes, k);
    if (active) {
      BwdCoef<acc_t> b[W];
#pragma unroll
      for (int v = 0; v < W; ++v) b[v] = params.get(c0 + v, acc_t(0), acc_t(0));
      const index_t step = static_cast<index_t>(splits) * blockDim.y;
      for (index_t r = static_cast<index_t>(split) * blockDim.y + threadIdx.y; r < g.R; r += step) {
        const Pos<index_t> pos = g.pos(r, c0);
        const index_t off = g.offset(pos);
        acc_t gv[W], xmu[W];
        masked_grad<W>(load_pack<W>(dy + off), load_pack<W>(x + g.x_offset(pos)), y != nullptr ? y + off : nullptr, k,
                       relu, gv, xmu);
        add_grads(lanes, gv, xmu);
        if constexpr (kEvalGrads)
          store_grads<W>(dx != nullptr ? dx + off : nullptr, dr != nullptr ? dr + off : nullptr, gv, xmu, b, false);
      }
    }
#pragma unroll
    for (int v = 0; v < W; ++v) lanes[v] = reduce_y(lanes[v], Sums2Op<acc_t>(), smem);
    split_merge_y(lanes, Sums2Op<acc_t>(), smem, partials, counters, g.C, c0, active, split, splits,
                  [&](int v, const Sums2<acc_t>& total) { out.finalize(c0 + v, total); });
  });
}

// Backward elementwise, planes layout. Traffic: training 2E read + 1E write (dx) [+1E write grad_residual]
// [+1E read of y with relu, when given]; eval reads no x without relu or with y. Launch: as the planes normalize.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_elementwise_planes_kernel(PlanesGeom<index_t> g, const scalar_t* __restrict__ dy,
                                       const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                       scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
                                       BwdParams<param_t, acc_t> params, bool training, bool relu) {
  const index_t c = blockIdx.x;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const bool need_x = training || (relu && y == nullptr);
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
      const Pos<index_t> pos = g.template pos<W>(c, u);
      const index_t off = g.offset(pos);
      Pack<scalar_t, W> xv{};
      if (need_x) xv = load_pack<W>(x + g.x_offset(pos));
      acc_t gv[W], xmu[W];
      masked_grad<W>(load_pack<W>(dy + off), xv, y != nullptr ? y + off : nullptr, k, relu, gv, xmu);
      store_grads<W>(dx != nullptr ? dx + off : nullptr, dr != nullptr ? dr + off : nullptr, gv, xmu, b, training);
    }
  });
}

// Backward elementwise, rows layout. Traffic: as the planes kernel. Launch: as the rows normalize.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    backward_elementwise_rows_kernel(RowsGeom<index_t> g, const scalar_t* __restrict__ dy,
                                     const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                     scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
                                     BwdParams<param_t, acc_t> params, bool training, bool relu) {
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const bool need_x = training || (relu && y == nullptr);
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
      const Pos<index_t> pos = g.pos(r, c0);
      const index_t off = g.offset(pos);
      Pack<scalar_t, W> xv{};
      if (need_x) xv = load_pack<W>(x + g.x_offset(pos));
      acc_t gv[W], xmu[W];
      masked_grad<W>(load_pack<W>(dy + off), xv, y != nullptr ? y + off : nullptr, k, relu, gv, xmu);
      store_grads<W>(dx != nullptr ? dx + off : nullptr, dr != nullptr ? dr + off : nullptr, gv, xmu, b, training);
    }
  });
}

// Persistent training backward, planes layout. Traffic: 3E (+1E write grad_residual, +1E read of y with
// relu, when given): x and g are read once into registers (kBytes each per thread), reduced, and dx is computed
// from registers after one grid barrier. Launch: cooperative, grid (gc, splits), `rounds` channels per
// block, as the persistent forward.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, int kBytes>
__global__ void __launch_bounds__(kMaxThreads)
    persistent_backward_planes_kernel(PlanesGeom<index_t> g, index_t C, unsigned rounds, Sums2<acc_t>* partials,
                                      const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ y, scalar_t* __restrict__ dx,
                                      scalar_t* __restrict__ dr, BwdParams<param_t, acc_t> params,
                                      BwdReduceOut<param_t, acc_t> out, bool relu) {
  __shared__ Sums2<acc_t> scratch[32];
  const unsigned split = blockIdx.y, splits = gridDim.y;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    constexpr int kSlots = kBytes / static_cast<int>(sizeof(scalar_t) * W);
    const int per_round = kSlots / static_cast<int>(rounds);
    Pack<scalar_t, W> xbuf[kSlots], gbuf[kSlots];
    for_each_round(C, rounds, [&](unsigned r, index_t c) {
      Coef<acc_t> k[W];
      k[0] = params.get(c, acc_t(0), acc_t(0)).fwd;
#pragma unroll
      for (int v = 1; v < W; ++v) k[v] = k[0];
      Sums2<acc_t> sum{acc_t(0), acc_t(0)};
      for_each_slot<kSlots>(g.units, r, per_round, [&](int s, index_t u) {
        const Pos<index_t> pos = g.template pos<W>(c, u);
        const index_t off = g.offset(pos);
        acc_t gv[W], xmu[W];
        keep_masked_grad<W>(dy + off, x + g.x_offset(pos), y != nullptr ? y + off : nullptr,
                            dr != nullptr ? dr + off : nullptr, k, relu, xbuf[s], gbuf[s], gv, xmu);
#pragma unroll
        for (int v = 0; v < W; ++v) {
          sum.g += gv[v];
          sum.gx = fma_acc(gv[v], xmu[v], sum.gx);
        }
      });
      sum = block_reduce(sum, Sums2Op<acc_t>(), scratch);
      if (threadIdx.x == 0) partials[c * splits + split] = sum;
    });
    grid_sync();
    if (dx == nullptr) {
      if (split == 0)
        for_each_round(C, rounds, [&](unsigned, index_t c) {
          const Sums2<acc_t> sum = merge_partials_block(partials + c * splits, 1, splits, Sums2Op<acc_t>(), scratch);
          if (threadIdx.x == 0) out.finalize(c, sum);
        });
      return;
    }
    for_each_round(C, rounds, [&](unsigned r, index_t c) {
      const Sums2<acc_t> sum = merge_partials_block(partials + c * splits, 1, splits, Sums2Op<acc_t>(), scratch);
      if (split == 0 && threadIdx.x == 0) out.finalize(c, sum);
      acc_t mdy, mdyx;
      out.means(c, sum, mdy, mdyx);
      BwdCoef<acc_t> b[W];
      b[0] = params.get(c, mdy, mdyx);
#pragma unroll
      for (int v = 1; v < W; ++v) b[v] = b[0];
      for_each_slot<kSlots>(g.units, r, per_round, [&](int s, index_t u) {
        store_kept_dx<W>(dx + g.offset(g.template pos<W>(c, u)), xbuf[s], gbuf[s], b);
      });
    });
  });
}

// Persistent training backward, rows layout. Traffic: 3E (+ as the planes kernel). Launch: cooperative,
// grid (tiles, splits), blocks (tx, ty), kSlots rows per thread; coefficients through shared memory.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, int kBytes>
__global__ void __launch_bounds__(kMaxThreads)
    persistent_backward_rows_kernel(RowsGeom<index_t> g, Sums2<acc_t>* partials, const scalar_t* __restrict__ dy,
                                    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                    scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
                                    BwdParams<param_t, acc_t> params, BwdReduceOut<param_t, acc_t> out, bool relu) {
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
    Coef<acc_t> k[W];
    rows_reduce_init(params, c0, active, lanes, k);
    if (active) {
      for_each_row_slot<kSlots>(g.R, [&](int s, index_t r) {
        const Pos<index_t> pos = g.pos(r, c0);
        const index_t off = g.offset(pos);
        acc_t gv[W], xmu[W];
        keep_masked_grad<W>(dy + off, x + g.x_offset(pos), y != nullptr ? y + off : nullptr,
                            dr != nullptr ? dr + off : nullptr, k, relu, xbuf[s], gbuf[s], gv, xmu);
        add_grads(lanes, gv, xmu);
      });
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
    for_each_row_slot<kSlots>(
        g.R, [&](int s, index_t r) { store_kept_dx<W>(dx + g.offset(g.pos(r, c0)), xbuf[s], gbuf[s], b); });
  });
}

}  // namespace

template <typename S, typename P, typename A>
void launch_backward_reduce(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* y,
                            S* eval_dx, S* eval_dr, const BwdParams<P, A>& params, const BwdReduceOut<P, A>& out,
                            bool relu) {
  BOOL_SWITCH(eval_dx != nullptr || eval_dr != nullptr, kEvalGrads, [&] {
    launch_grid_stride<S, Sums2<A>>(
        g, input,
        [](auto index) {
          using index_t = decltype(index);
          return std::make_pair(backward_reduce_planes_kernel<S, P, A, index_t, kEvalGrads>,
                                backward_reduce_rows_kernel<S, P, A, index_t, kEvalGrads>);
        },
        dy, x, y, eval_dx, eval_dr, params, out, relu);
  });
}

template <typename S, typename P, typename A>
void launch_backward_elementwise(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* y,
                                 S* dx, S* dr, const BwdParams<P, A>& params, bool training, bool relu) {
  launch_grid_stride<S, void>(
      g, input,
      [](auto index) {
        using index_t = decltype(index);
        return std::make_pair(backward_elementwise_planes_kernel<S, P, A, index_t>,
                              backward_elementwise_rows_kernel<S, P, A, index_t>);
      },
      dy, x, y, dx, dr, params, training, relu);
}

template <typename S, typename P, typename A>
bool launch_persistent_backward(const Geometry& g, const at::Tensor& input, const S* dy, const S* x, const S* y,
                                S* dx, S* dr, const BwdParams<P, A>& params, const BwdReduceOut<P, A>& out,
                                bool relu) {
  constexpr int kBytes = kPersistentBackwardBytes;
  return launch_persistent<S, Sums2<A>, BwdCoef<A>, kBytes>(
      g, input, persistent_backward_planes_kernel<S, P, A, int32_t, kBytes>,
      persistent_backward_rows_kernel<S, P, A, int32_t, kBytes>, dy, x, y, dx, dr, params, out, relu);
}

#define FASTBN_INSTANTIATE_BACKWARD(S, P, A)                                                                        \
  template void launch_backward_reduce<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*, const S*,   \
                                                S*, S*, const BwdParams<P, A>&, const BwdReduceOut<P, A>&, bool);  \
  template void launch_backward_elementwise<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*,       \
                                                     const S*, S*, S*, const BwdParams<P, A>&, bool, bool);         \
  template bool launch_persistent_backward<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*,        \
                                                    const S*, S*, S*, const BwdParams<P, A>&,                      \
                                                    const BwdReduceOut<P, A>&, bool);
FASTBN_CUDA_INSTANTIATE(FASTBN_INSTANTIATE_BACKWARD)

}  // namespace cuda
}  // namespace fastbn
