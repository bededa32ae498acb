// Normalize + affine + optional residual + optional ReLU: the second pass of the two-pass forward-train,
// forward-eval and the SyncBatchNorm normalize; and the persistent single-read forward-train.
#include "cuda/plan.cuh"

namespace fastbn {
namespace cuda {
namespace {

template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void normalize_units(const scalar_t* __restrict__ res, scalar_t* __restrict__ y,
                                                const Pack<scalar_t, W>& xv, const Coef<acc_t>* k, bool relu) {
  Pack<scalar_t, W> rv, out;
  if (res != nullptr) rv = load_pack<W>(res);
#pragma unroll
  for (int v = 0; v < W; ++v) {
    acc_t o = pre_activation(static_cast<acc_t>(xv.val[v]), k[v],
                             res != nullptr ? static_cast<acc_t>(rv.val[v]) : acc_t(0), res != nullptr);
    if (relu) o = relu_forward(o);
    out.val[v] = static_cast<scalar_t>(o);
  }
  store_pack<W>(y, out);
}

// Normalize, planes layout. Traffic: 2E (+1E residual). Launch: grid (C, splits), 1-D blocks of 32..512
// threads; block (c, s) handles units s*T + t, step splits*T, of channel c with its coefficients in
// registers. Thread 0 of block (0, 0) increments num_batches_tracked when given (the statistics kernel
// before it read the old value).
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    normalize_planes_kernel(PlanesGeom<index_t> g, const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                            scalar_t* __restrict__ y, NormParams<param_t, acc_t> params,
                            int64_t* num_batches_tracked, bool relu) {
  const index_t c = blockIdx.x;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  if (num_batches_tracked != nullptr && c == 0 && split == 0 && threadIdx.x == 0) *num_batches_tracked += 1;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    Coef<acc_t> k[W];
    k[0] = params.get(c);
#pragma unroll
    for (int v = 1; v < W; ++v) k[v] = k[0];
    const index_t step = static_cast<index_t>(splits) * blockDim.x;
    for (index_t u = static_cast<index_t>(split) * blockDim.x + threadIdx.x; u < g.units; u += step) {
      const Pos<index_t> pos = g.template pos<W>(c, u);
      const index_t off = g.offset(pos);
      normalize_units<W>(res != nullptr ? res + off : nullptr, y + off, load_pack<W>(x + g.x_offset(pos)), k, relu);
    }
  });
}

// Normalize, rows layout. Traffic: 2E (+1E residual). Launch: grid (tiles, splits), blocks (tx, ty); a thread
// keeps the coefficients of its W channels and walks rows split*ty + threadIdx.y, step splits*ty.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    normalize_rows_kernel(RowsGeom<index_t> g, const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                          scalar_t* __restrict__ y, NormParams<param_t, acc_t> params, int64_t* num_batches_tracked,
                          bool relu) {
  if (num_batches_tracked != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0)
    *num_batches_tracked += 1;
  const unsigned split = blockIdx.y, splits = gridDim.y;
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    if (c0 >= g.C) return;
    Coef<acc_t> k[W];
#pragma unroll
    for (int v = 0; v < W; ++v) k[v] = params.get(c0 + v);
    const index_t step = static_cast<index_t>(splits) * blockDim.y;
    for (index_t r = static_cast<index_t>(split) * blockDim.y + threadIdx.y; r < g.R; r += step) {
      const Pos<index_t> pos = g.pos(r, c0);
      const index_t off = g.offset(pos);
      normalize_units<W>(res != nullptr ? res + off : nullptr, y + off, load_pack<W>(x + g.x_offset(pos)), k, relu);
    }
  });
}

// Persistent forward-train, planes layout. Traffic: 2E (+1E residual): x is read once into registers
// (kBytes per thread), reduced, and normalized from registers after one grid barrier. Launch: cooperative,
// grid (gc, splits) with gc <= C; block (b, s) handles channels b, b + gc, ... (`rounds` of them), each with
// kSlots/rounds register slots of W elements per thread. Every block merges the partials of its channels in
// split order (so all get the same bits); blocks of split 0 run the statistics epilogue; block (0, 0)
// increments num_batches_tracked after the barrier (every read of it came before).
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, int kBytes>
__global__ void __launch_bounds__(kMaxThreads)
    persistent_forward_planes_kernel(PlanesGeom<index_t> g, index_t C, unsigned rounds, Welford<acc_t>* partials,
                                     const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                                     scalar_t* __restrict__ y, StatsOut<param_t, acc_t> out,
                                     NormParams<param_t, acc_t> params, int64_t* num_batches_tracked, bool relu) {
  __shared__ Welford<acc_t> scratch[32];
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const double factor = out.factor();
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    constexpr int kSlots = kBytes / static_cast<int>(sizeof(scalar_t) * W);
    const int per_round = kSlots / static_cast<int>(rounds);
    Pack<scalar_t, W> buf[kSlots];
    for_each_round(C, rounds, [&](unsigned r, index_t c) {
      acc_t shift[W], a1[W], a2[W];
      init_shifted<W>(static_cast<acc_t>(x[c * g.S]), shift, a1, a2);
      index_t count = 0;
      for_each_slot<kSlots>(g.units, r, per_round, [&](int s, index_t u) {
        buf[s] = load_pack<W>(x + g.x_offset(g.template pos<W>(c, u)));
        add_shifted<W>(buf[s], shift, a1, a2);
        ++count;
      });
      acc_t s1 = 0, s2 = 0;
#pragma unroll
      for (int v = 0; v < W; ++v) {
        s1 += a1[v];
        s2 += a2[v];
      }
      const Welford<acc_t> w = block_reduce(welford_from_shifted(s1, s2, int64_t(count) * W),
                                            WelfordOp<acc_t>(), scratch);
      if (threadIdx.x == 0) partials[c * splits + split] = w;
    });
    grid_sync();
    for_each_round(C, rounds, [&](unsigned r, index_t c) {
      const acc_t shift = static_cast<acc_t>(x[c * g.S]);
      const Welford<acc_t> w =
          unshift(merge_partials_block(partials + c * splits, 1, splits, WelfordOp<acc_t>(), scratch), shift);
      if (split == 0 && threadIdx.x == 0) out.finalize(c, w, factor);
      Coef<acc_t> k[W];
      k[0] = params.get(c, w.mean, out.invstd(w));
#pragma unroll
      for (int v = 1; v < W; ++v) k[v] = k[0];
      for_each_slot<kSlots>(g.units, r, per_round, [&](int s, index_t u) {
        const index_t off = g.offset(g.template pos<W>(c, u));
        normalize_units<W>(res != nullptr ? res + off : nullptr, y + off, buf[s], k, relu);
      });
    });
  });
  if (num_batches_tracked != nullptr && blockIdx.x == 0 && split == 0 && threadIdx.x == 0) *num_batches_tracked += 1;
}

// Persistent forward-train, rows layout. Traffic: 2E (+1E residual). Launch: cooperative, grid (tiles,
// splits), blocks (tx, ty); a thread keeps kSlots rows ((slot*splits + split)*ty + threadIdx.y) of its W
// channels in registers. Partials are reduced over y, merged after the grid barrier by every block of the
// tile in split order; the coefficients go through shared memory to the whole block.
template <typename scalar_t, typename param_t, typename acc_t, typename index_t, int kBytes>
__global__ void __launch_bounds__(kMaxThreads)
    persistent_forward_rows_kernel(RowsGeom<index_t> g, Welford<acc_t>* partials, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ res, scalar_t* __restrict__ y,
                                   StatsOut<param_t, acc_t> out, NormParams<param_t, acc_t> params,
                                   int64_t* num_batches_tracked, bool relu) {
  Welford<acc_t>* smem = dynamic_shared<Welford<acc_t>>();
  Coef<acc_t>* coefs = reinterpret_cast<Coef<acc_t>*>(smem + blockDim.x * blockDim.y);
  const unsigned split = blockIdx.y, splits = gridDim.y;
  const double factor = out.factor();
  with_width<scalar_t>(g.vec, [&](auto width) {
    constexpr int W = decltype(width)::value;
    constexpr int kSlots = kBytes / static_cast<int>(sizeof(scalar_t) * W);
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x) * W;
    const bool active = c0 < g.C;
    Pack<scalar_t, W> buf[kSlots];
    acc_t shift[W], a1[W], a2[W];
#pragma unroll
    for (int v = 0; v < W; ++v) shift[v] = a1[v] = a2[v] = acc_t(0);
    index_t count = 0;
    if (active) {
      const auto first = peek_pack<W>(x + c0);
#pragma unroll
      for (int v = 0; v < W; ++v) shift[v] = static_cast<acc_t>(first.val[v]);
      for_each_row_slot<kSlots>(g.R, [&](int s, index_t r) {
        buf[s] = load_pack<W>(x + g.x_offset(g.pos(r, c0)));
        add_shifted<W>(buf[s], shift, a1, a2);
        ++count;
      });
    }
#pragma unroll
    for (int v = 0; v < W; ++v) {
      const Welford<acc_t> w =
          reduce_y(welford_from_shifted(a1[v], a2[v], int64_t(count)), WelfordOp<acc_t>(), smem);
      if (active && threadIdx.y == 0) partials[static_cast<int64_t>(split) * g.C + c0 + v] = w;
    }
    grid_sync();
#pragma unroll
    for (int v = 0; v < W; ++v) {
      const Welford<acc_t> w = unshift(
          merge_partials_y(partials + (active ? c0 + v : 0), g.C, splits, active, WelfordOp<acc_t>(), smem), shift[v]);
      if (active && threadIdx.y == 0) {
        if (split == 0) out.finalize(c0 + v, w, factor);
        coefs[threadIdx.x * W + v] = params.get(c0 + v, w.mean, out.invstd(w));
      }
    }
    __syncthreads();
    if (!active) return;
    Coef<acc_t> k[W];
#pragma unroll
    for (int v = 0; v < W; ++v) k[v] = coefs[threadIdx.x * W + v];
    for_each_row_slot<kSlots>(g.R, [&](int s, index_t r) {
      const index_t off = g.offset(g.pos(r, c0));
      normalize_units<W>(res != nullptr ? res + off : nullptr, y + off, buf[s], k, relu);
    });
  });
  if (num_batches_tracked != nullptr && blockIdx.x == 0 && split == 0 && threadIdx.x == 0 && threadIdx.y == 0)
    *num_batches_tracked += 1;
}

}  // namespace

template <typename S, typename P, typename A>
void launch_normalize(const Geometry& g, const at::Tensor& input, const S* x, const S* res, S* y,
                      const NormParams<P, A>& params, int64_t* num_batches_tracked, bool relu) {
  launch_grid_stride<S, void>(
      g, input,
      [](auto index) {
        using index_t = decltype(index);
        return std::make_pair(normalize_planes_kernel<S, P, A, index_t>, normalize_rows_kernel<S, P, A, index_t>);
      },
      x, res, y, params, num_batches_tracked, relu);
}

template <typename S, typename P, typename A>
bool launch_persistent_forward(const Geometry& g, const at::Tensor& input, const S* x, const S* res, S* y,
                               const StatsOut<P, A>& out, const NormParams<P, A>& params,
                               int64_t* num_batches_tracked, bool relu) {
  constexpr int kBytes = kPersistentForwardBytes;
  return launch_persistent<S, Welford<A>, Coef<A>, kBytes>(
      g, input, persistent_forward_planes_kernel<S, P, A, int32_t, kBytes>,
      persistent_forward_rows_kernel<S, P, A, int32_t, kBytes>, x, res, y, out, params, num_batches_tracked, relu);
}

#define FASTBN_INSTANTIATE_FORWARD(S, P, A)                                                                    \
  template void launch_normalize<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*, S*,          \
                                          const NormParams<P, A>&, int64_t*, bool);                            \
  template bool launch_persistent_forward<S, P, A>(const Geometry&, const at::Tensor&, const S*, const S*, S*, \
                                                   const StatsOut<P, A>&, const NormParams<P, A>&, int64_t*, bool);
FASTBN_CUDA_INSTANTIATE(FASTBN_INSTANTIATE_FORWARD)

}  // namespace cuda
}  // namespace fastbn
