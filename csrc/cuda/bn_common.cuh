// What the fastbn CUDA kernels (stats.cu, forward.cu, backward.cu) share: the element math (written once,
// so the forward's output and the backward's recomputed ReLU mask round identically), the geometry of the
// two layouts, per-channel parameter access and the statistics epilogue (saved statistics + running-stat
// update). The reductions they use (block, 2-D block, split / last-block-done merges) are device_utils.cuh's.
//
// Layouts (chosen on the host, ops.cu):
//   planes  NCHW, each sample contiguous (N, C, S): channel c of sample n is the contiguous run
//           [n*outer + c*S, +S), outer = C*S. A block works on one channel; its "units" are W consecutive
//           elements of a plane (W = one 16-byte pack when S % W == 0, every pointer is 16-byte aligned and
//           x_outer below is a multiple of W, else W = 1), numbered per channel.
//   rows    channels innermost and contiguous (channels_last, 2-D (N, C)): element (r, c) at r*outer + c,
//           outer = C. A block is blockDim.x column groups of W channels (one 16-byte pack when C % W == 0,
//           x_outer too, and aligned, else 1) by blockDim.y rows; a thread keeps its channels for the whole
//           kernel, so per-channel coefficients are loaded once.
//   The input x alone may have an outer stride of its own (x_outer): a view such as a channel slice
//   (x.chunk(2, 1)), every other sample, columns of an (N, C) matrix, or an expanded batch (0). Every other
//   tensor is dense in the layout.
//
// Statistics are accumulated per thread as sums shifted by the channel's first value (cheap, and exact
// enough: deviations from a sample of the channel stay of the order of the spread), turned into a Welford
// triple per thread and merged with Chan's formula across threads and blocks in an order fixed by indices
// (ATen's batch_norm_collect_statistics / channels-last kernels merge Welford triples the same way).
// Nothing here uses float atomics: the results are bitwise reproducible.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/device_utils.cuh"

namespace fastbn {
namespace cuda {

// ---------------------------------------------------------------------------------------------------
// Element math. FMAs are explicit (__fmaf_rn / __fma_rn) so that nvcc's contraction cannot make the
// forward and the backward's mask round differently.
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename acc_t>
struct Coef {
  acc_t mean, scale, shift;
};

// scale = invstd * weight: computed by this one function in every kernel that normalizes or masks.
template <typename acc_t>
__device__ __forceinline__ acc_t channel_scale(acc_t invstd, acc_t weight) {
  return invstd * weight;
}

// (x - mean) * scale + shift [+ residual]: the value the ReLU sees, forward and backward.
template <typename acc_t>
__device__ __forceinline__ acc_t pre_activation(acc_t x, const Coef<acc_t>& k, acc_t residual, bool has_residual) {
  acc_t o = fma_acc(x - k.mean, k.scale, k.shift);
  if (has_residual) o = o + residual;
  return o;
}

// torch.relu: negatives become 0, NaN stays NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t relu_forward(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// threshold_backward on relu's output: the gradient passes where the output is > 0 (not NaN).
template <typename acc_t>
__device__ __forceinline__ bool relu_passes(acc_t pre) {
  return pre > acc_t(0);
}

template <typename T>
__device__ __forceinline__ float to_acc(T v, float) { return static_cast<float>(v); }
template <typename T>
__device__ __forceinline__ double to_acc(T v, double) { return static_cast<double>(v); }

__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

// ---------------------------------------------------------------------------------------------------
// Per-channel tensors of C elements (weight, bias, running and saved statistics) in any strides.
template <typename T>
struct ChannelIn {
  const T* p;
  int64_t stride;
  template <typename acc_t>
  __device__ __forceinline__ acc_t get(int64_t c, acc_t fallback) const {
    return p == nullptr ? fallback : static_cast<acc_t>(p[c * stride]);
  }
};

template <typename T>
struct ChannelOut {
  T* p;
  int64_t stride;
  __device__ __forceinline__ void set(int64_t c, T v) const { p[c * stride] = v; }
};

// ---------------------------------------------------------------------------------------------------
// Index division by a per-launch constant. 32-bit: multiply-high by a magic number (Granlund &
// Montgomery; the scheme of ATen's IntDivider), valid for dividends below 2^31, which int32 indexing
// guarantees. 64-bit: plain division.
template <typename index_t>
struct Divider {
  index_t d;
  Divider() = default;
  explicit Divider(index_t divisor) : d(divisor) {}
  __device__ __forceinline__ index_t div(index_t n) const { return n / d; }
};

template <>
struct Divider<int32_t> {
  uint32_t magic;
  uint32_t shift;
  Divider() = default;
  explicit Divider(int32_t divisor) {
    const uint32_t d = static_cast<uint32_t>(divisor);
    shift = 0;
    while (shift < 32 && (uint64_t(1) << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ int32_t div(int32_t n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * magic) >> 32);
    return static_cast<int32_t>((hi + u) >> shift);
  }
};

// ---------------------------------------------------------------------------------------------------
// Geometry of the two layouts (see the top of the file). `vec` is the unit width W as a runtime value;
// kernels branch on it once, block-uniformly, into code compiled for W = pack width and for W = 1.

// Where a unit lies: its outer index (sample n, planes; row r, rows) and its offset inside that sample or row.
template <typename index_t>
struct Pos {
  index_t outer, inner;
};

// The outer strides of both layouts: of x, and of every other tensor.
template <typename index_t>
struct OuterStrides {
  index_t outer;    // dense: C * S (planes), C (rows)
  index_t x_outer;  // outer, or x's own for a view
  __device__ __forceinline__ index_t offset(Pos<index_t> p) const { return p.outer * outer + p.inner; }
  __device__ __forceinline__ index_t x_offset(Pos<index_t> p) const { return p.outer * x_outer + p.inner; }
};

template <typename index_t>
struct PlanesGeom : OuterStrides<index_t> {
  index_t S;       // elements per plane
  index_t units;   // units per channel: N * S / W
  index_t su;      // units per plane: S / W
  Divider<index_t> by_su;
  int vec;         // W
  template <int W>
  __device__ __forceinline__ Pos<index_t> pos(index_t c, index_t u) const {
    const index_t n = by_su.div(u);
    return Pos<index_t>{n, c * S + (u - n * su) * W};
  }
};

template <typename index_t>
struct RowsGeom : OuterStrides<index_t> {
  index_t R;  // rows
  index_t C;  // channels (row length)
  int vec;    // W
  __device__ __forceinline__ Pos<index_t> pos(index_t r, index_t c0) const { return Pos<index_t>{r, c0}; }
};

// Persistent planes kernels: block b of a grid (gc, splits) handles channels b, b + gc, ... (`rounds` of
// them, fewer for the last blocks); body(r, c) for each, r the round. Block-uniform.
template <typename index_t, typename Body>
__device__ __forceinline__ void for_each_round(index_t C, unsigned rounds, Body body) {
  for (unsigned r = 0; r < rounds; ++r) {
    const index_t c = static_cast<index_t>(blockIdx.x + r * gridDim.x);
    if (c >= C) break;
    body(r, c);
  }
}

// The kSlots register slots of a persistent planes thread are split evenly over the rounds; slot s of round
// r holds unit ((s % per_round) * splits + split) * T + t of the channel. body(s, u) for the slots of round r
// whose unit is in range (s is a constant once unrolled, so slot arrays stay in registers).
template <int kSlots, typename index_t, typename Body>
__device__ __forceinline__ void for_each_slot(index_t units, unsigned r, int per_round, Body body) {
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    if (s / per_round != static_cast<int>(r)) continue;
    const index_t u = (static_cast<index_t>(s % per_round) * gridDim.y + blockIdx.y) * blockDim.x + threadIdx.x;
    if (u < units) body(s, u);
  }
}

// Persistent rows kernels: slot s of a thread holds row (s * splits + split) * ty + threadIdx.y of its
// channels; body(s, row) for the slots whose row is in range.
template <int kSlots, typename index_t, typename Body>
__device__ __forceinline__ void for_each_row_slot(index_t R, Body body) {
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const index_t r = (static_cast<index_t>(s) * gridDim.y + blockIdx.y) * blockDim.y + threadIdx.y;
    if (r < R) body(s, r);
  }
}

// Runs body(std::integral_constant<int, W>) with W the pack width of scalar_t or 1.
template <typename scalar_t, typename Body>
__device__ __forceinline__ void with_width(int vec, Body&& body) {
  if (vec > 1) {
    body(std::integral_constant<int, kPackSize<scalar_t>>{});
  } else {
    body(std::integral_constant<int, 1>{});
  }
}

// ---------------------------------------------------------------------------------------------------
// Per-thread sums of x - K -> a Welford triple of x - K. Every thread and block of a channel uses the same
// shift K (the channel's first value), so partials are merged in shifted coordinates, where the means are
// small and precise even for data with a large mean (1e4 + randn); unshift() adds K back once, at the end.
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> welford_from_shifted(acc_t s1, acc_t s2, int64_t n) {
  Welford<acc_t> w = welford_init<acc_t>();
  if (n == 0) return w;
  const acc_t mean_d = s1 / static_cast<acc_t>(n);
  w.count = n;
  w.mean = mean_d;
  const acc_t m2 = s2 - s1 * mean_d;
  w.m2 = m2 < acc_t(0) ? acc_t(0) : m2;
  return w;
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> unshift(Welford<acc_t> w, acc_t shift) {
  w.mean = shift + w.mean;
  return w;
}

// Adds the W values of a pack to per-lane shifted sums: a1 += x - K, a2 += (x - K)^2.
template <int W, typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_shifted(const Pack<scalar_t, W>& p, const acc_t (&shift)[W], acc_t (&a1)[W],
                                            acc_t (&a2)[W]) {
#pragma unroll
  for (int v = 0; v < W; ++v) {
    const acc_t d = static_cast<acc_t>(p.val[v]) - shift[v];
    a1[v] += d;
    a2[v] = fma_acc(d, d, a2[v]);
  }
}

// Zeroed shifted sums of W lanes, all with the shift K.
template <int W, typename acc_t>
__device__ __forceinline__ void init_shifted(acc_t k, acc_t (&shift)[W], acc_t (&a1)[W], acc_t (&a2)[W]) {
#pragma unroll
  for (int v = 0; v < W; ++v) {
    shift[v] = k;
    a1[v] = a2[v] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------------
// The statistics epilogue of one channel, run by exactly one thread per channel: saved statistics, and
// the running-stat update (torch's: in double, unbiased variance, factor = momentum or
// 1/num_batches_tracked where the counter is the value after this call's increment).
template <typename param_t, typename acc_t>
struct StatsOut {
  acc_t* mean;          // save_mean / local mean
  acc_t* second;        // save_invstd, or the biased variance (local_stats)
  bool second_is_var;
  double eps;
  int64_t m;            // values per channel
  param_t* running_mean;
  int64_t rm_stride;
  param_t* running_var;
  int64_t rv_stride;
  const int64_t* num_batches_tracked;  // read here; incremented by a later kernel or after a grid barrier
  double momentum;
  bool has_momentum;

  // Read once per thread before anything increments the counter.
  __device__ __forceinline__ double factor() const {
    if (has_momentum || running_mean == nullptr) return momentum;
    const int64_t batches = num_batches_tracked == nullptr ? 0 : *num_batches_tracked + 1;
    return 1.0 / static_cast<double>(batches);
  }

  __device__ __forceinline__ acc_t invstd(const Welford<acc_t>& w) const {
    return static_cast<acc_t>(1.0 / sqrt(static_cast<double>(w.m2) / static_cast<double>(m) + eps));
  }

  __device__ __forceinline__ void finalize(int64_t c, const Welford<acc_t>& w, double f) const {
    mean[c] = w.mean;
    second[c] = second_is_var ? w.m2 / static_cast<acc_t>(m) : invstd(w);
    if (running_mean != nullptr) {
      param_t* rm = running_mean + c * rm_stride;
      param_t* rv = running_var + c * rv_stride;
      *rm = static_cast<param_t>(f * static_cast<double>(w.mean) + (1 - f) * static_cast<double>(*rm));
      *rv = static_cast<param_t>(f * (static_cast<double>(w.m2) / static_cast<double>(m - 1)) +
                                 (1 - f) * static_cast<double>(*rv));
    }
  }
};

// Where the normalize coefficients come from: saved statistics (acc_t mean, invstd), or running
// statistics (param_t mean, var) and eps (eval). Weight and bias are optional.
template <typename param_t, typename acc_t>
struct NormParams {
  ChannelIn<acc_t> mean, invstd;         // used when !from_running
  ChannelIn<param_t> rmean, rvar;        // used when from_running
  bool from_running;
  double eps;
  ChannelIn<param_t> weight, bias;

  __device__ __forceinline__ Coef<acc_t> get(int64_t c) const {
    acc_t mu, inv;
    if (from_running) {
      mu = rmean.get(c, acc_t(0));
      inv = acc_t(1) / sqrt_acc(rvar.get(c, acc_t(1)) + static_cast<acc_t>(eps));
    } else {
      mu = mean.get(c, acc_t(0));
      inv = invstd.get(c, acc_t(0));
    }
    return Coef<acc_t>{mu, channel_scale(inv, weight.get(c, acc_t(1))), bias.get(c, acc_t(0))};
  }
  // With the statistics given directly (persistent forward).
  __device__ __forceinline__ Coef<acc_t> get(int64_t c, acc_t mu, acc_t inv) const {
    return Coef<acc_t>{mu, channel_scale(inv, weight.get(c, acc_t(1))), bias.get(c, acc_t(0))};
  }
};

// Backward coefficients of one channel: the forward's (mean, scale, shift) for the ReLU mask, and
// dx = k*g + p*(x - mean) + q with k = weight*invstd, p = -k*invstd*mean_dy_xhat, q = -k*mean_dy.
template <typename acc_t>
struct BwdCoef {
  Coef<acc_t> fwd;
  acc_t k, p, q;
};

template <typename param_t, typename acc_t>
struct BwdParams {
  ChannelIn<acc_t> mean, invstd;
  ChannelIn<param_t> weight, bias;
  ChannelIn<acc_t> mean_dy, mean_dy_xhat;  // null: eval (dx = k*g)

  __device__ __forceinline__ BwdCoef<acc_t> get(int64_t c) const {
    return get(c, mean_dy.get(c, acc_t(0)), mean_dy_xhat.get(c, acc_t(0)));
  }
  __device__ __forceinline__ BwdCoef<acc_t> get(int64_t c, acc_t mdy, acc_t mdyx) const {
    const acc_t mu = mean.get(c, acc_t(0));
    const acc_t inv = invstd.get(c, acc_t(0));
    const acc_t w = weight.get(c, acc_t(1));
    BwdCoef<acc_t> b;
    b.fwd = Coef<acc_t>{mu, channel_scale(inv, w), bias.get(c, acc_t(0))};
    b.k = w * inv;
    b.p = -b.k * inv * mdyx;
    b.q = -b.k * mdy;
    return b;
  }
};

// dx of one element (training: the reduction terms; eval: k*g).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_input(acc_t g, acc_t xmu, const BwdCoef<acc_t>& b, bool training) {
  return training ? fma_acc(xmu, b.p, g * b.k) + b.q : g * b.k;
}

// Epilogue of the backward reduction of one channel, one thread per channel. sums.gx is Σg·(x - mean).
template <typename param_t, typename acc_t>
struct BwdReduceOut {
  ChannelIn<acc_t> invstd;
  param_t* grad_weight;  // Σg·x̂
  param_t* grad_bias;    // Σg
  acc_t* sum_dy;         // backward_reduce's outputs
  acc_t* sum_dy_xhat;
  acc_t* mean_dy;        // workspace for the elementwise kernel of backward: Σg/m, Σg·x̂/m
  acc_t* mean_dy_xhat;
  int64_t m;

  // The mean terms of dx: Σg/m and Σg·x̂/m.
  __device__ __forceinline__ void means(int64_t c, const Sums2<acc_t>& s, acc_t& mdy, acc_t& mdyx) const {
    mdy = s.g / static_cast<acc_t>(m);
    mdyx = (s.gx * invstd.get(c, acc_t(0))) / static_cast<acc_t>(m);
  }

  __device__ __forceinline__ void finalize(int64_t c, const Sums2<acc_t>& s) const {
    const acc_t sgx = s.gx * invstd.get(c, acc_t(0));
    if (grad_weight != nullptr) grad_weight[c] = static_cast<param_t>(sgx);
    if (grad_bias != nullptr) grad_bias[c] = static_cast<param_t>(s.g);
    if (sum_dy != nullptr) {
      sum_dy[c] = s.g;
      sum_dy_xhat[c] = sgx;
    }
    if (mean_dy != nullptr) means(c, s, mean_dy[c], mean_dy_xhat[c]);
  }
};

}  // namespace cuda
}  // namespace fastbn
