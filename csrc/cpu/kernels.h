// The CPU kernels' arguments and entry points. ops.cpp computes per-channel coefficients (plain loops over C,
// acc_t) and hands them here; the kernels only stream the big tensors.
//
// The vectorised kernels (kernels_impl.h) are compiled once per CPU capability (cpu_kernels_default.cpp,
// cpu_kernels_avx2.cpp, cpu_kernels_avx512.cpp: the build passes no -m flags, so a target pragma per file is how the
// AVX paths get built) and vector_kernels<scalar_t>() picks a table at run time, as ATen's DispatchStub does and with
// the same answer (ATEN_CPU_CAPABILITY is honoured); so is the strided path (strided_impl.h), whose table
// strided_kernels<scalar_t>() picks the same way.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "layout.h"

namespace fastbn {
namespace cpu {

// Per-channel statistics: mean and m2 = sum of squared deviations, over geom.per_channel() values.
template <typename scalar_t>
struct StatsArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry geom;
  const at::Tensor* x;
  acc_t* mean;  // C
  acc_t* m2;    // C
};

// y = relu?(pre_activation(x - mean, scale, shift) [+ residual]), per channel coefficients of C acc_t values.
template <typename scalar_t>
struct NormalizeArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry geom;
  const at::Tensor* x;
  const at::Tensor* residual;  // nullable
  const at::Tensor* y;         // allocated like x
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  bool relu;
};

// g = dy, zeroed with relu where the forward's output (when given) or else the pre-activation recomputed from x is
// not > 0. sum_g[c] = Σ g, sum_gxmu[c] = Σ g·(x - mean).
template <typename scalar_t>
struct ReduceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry geom;
  const at::Tensor* dy;
  const at::Tensor* x;
  const at::Tensor* output;  // nullable; the forward's output, read only for the ReLU mask
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  bool relu;
  acc_t* sum_g;
  acc_t* sum_gxmu;
};

// dx = g·k + (x - mean)·p + q, and/or g itself (the residual's gradient when relu masks it).
template <typename scalar_t>
struct ElementwiseArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry geom;
  const at::Tensor* dy;
  const at::Tensor* x;
  const at::Tensor* output;  // nullable; as in ReduceArgs
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* shift;
  bool relu;
  const acc_t* k;
  const acc_t* p;  // ignored (and x not read) when !use_x
  const acc_t* q;
  bool use_x;              // false: eval without relu, dx = dy·k needs no x
  const at::Tensor* dx;    // nullable
  const at::Tensor* g_out; // nullable
};

// Equal, vector-aligned chunks of at most max_len positions covering a plane of S positions (S when it fits).
inline int64_t plane_chunk(int64_t S, int64_t max_len) {
  if (S <= max_len) return S;
  const int64_t chunks = (S + max_len - 1) / max_len;
  return std::min(max_len, ((S + chunks - 1) / chunks + 63) / 64 * 64);
}

// Runs a reduction tile sums per position in acc_t before its partial goes to double.
constexpr int64_t kMaxRuns = 1024;

// Positions of a one-channel reduction tile (a long plane): its runs are summed in registers, one run at a time,
// and folded into double every kMaxChannelRun positions, so a float lane never sums more than kMaxChannelRun / 32
// values (kMaxChannelRun / 16 with 256-bit vectors).
constexpr int64_t kMaxChannelRun = 16384;

// Blocks of whole channels for the fused passes (training forward, backward): each block's inputs (all samples)
// stay in cache between its reduction and its elementwise pass, so they are read from memory once (training
// backward 3E instead of 5E, eval backward with dw or db 3E instead of 4E, forward 2E instead of 3E). Cut from the
// shape alone (results do not depend on the thread count). On the 2-core EPYC, 256 KiB blocks beat 4 MiB ones at
// 7x7 and 14x14 (backward 32x512x14x14 0.89 vs 1.27 ms) and matched 1 MiB ones elsewhere; 64, 128 and 512 KiB were
// no better. Two schedules:
//   per-thread     one thread reduces a block and writes its output (from L2), prefetching the next block while it
//                  writes when the block is at most kMaxPrefetchedBytes: C >= kMinBlocks, N <= kMaxRuns. Forward and
//                  backward. A larger block (one channel of 56x56 or 112x112 planes at batch 32: 0.4-3.2 MB of
//                  inputs) and its successor do not both fit in L2, and the prefetch evicted the lines the output
//                  pass was about to read again. On a 2-vCPU Xeon (2 MiB L2), fastbn's time, float32 NCHW inputs out
//                  of cache, 3 alternating runs each, prefetching against not: backward 32x64x112x112 17.0-17.5 ->
//                  13.6 ms, 32x128x56x56 7.0-7.3 -> 5.9-6.1 ms, 32x256x56x56 14.1-14.4 -> 11.6-12.0 ms; forward
//                  32x64x112x112 9.2-9.5 -> 8.0-8.3 ms. The forward's 0.4 MB blocks (56x56) still gain from it.
//   channel-major  fewer channels than kMinBlocks (a (20, 6, 65536) input): the blocks are the reduction's own
//                  channel blocks (RunTiles), taken one after the other, every thread reducing a share of the block
//                  and then writing a share of its dx, from the last-level cache when the block fits there.
//                  Backward only (the forward takes the unfused passes there).
// The backward's per-thread blocks are one channel each, its planes summed in registers (one_channel_sums), once planes
// reach kMinRegisterPlane positions: several channels' per-position sums (mean and two sums, 47 KiB at 5x28x28) outgrew
// L1. Those per-position sums have since given way to plane_by_plane_sums (kernels_impl.h) for blocks of several
// channels; against it the one-channel blocks neither win nor lose overall (fastbn's backward over torch's time,
// float32 NCHW in cache, medians of 9 alternating runs, one channel against blocks of 5: 4x128x28x28 0.86 against 1.02,
// 8x512x28x28 0.67 against 0.59, 8x128x28x28 0.79 against 0.76, 16x256x28x28 0.61 against 0.62; out of cache within
// 5%), so the threshold stays. Against the per-position sums: fastbn's backward alone, float32 NCHW, 2-core EPYC, 8
// alternating pairs, per-position against registers: inputs in cache 8x128x28x28 1.28x faster, 4x128x28x28 1.63x,
// 16x256x28x28 1.08x; out of cache 8x128x28x28 1.10x, 8x512x28x28 1.06x. Shorter planes kept blocks of several channels
// then (EPYC, against the per-position sums): at 14x14 registers won in cache at batch 8 (8x512x14x14 1.16-1.21x) but
// lost out of it, where a channel's runs are only 784 bytes (32x256x14x14 0.87x, 32x1024x14x14 0.92x, 8x512x14x14
// 0.97x), and 7x7 lost both ways (8x2048x7x7 0.89x in cache). At batch 32 and 28x28 the blocks were one channel already
// (kMaxBytes). The forward gained on some shapes and lost on others (8x128x28x28 1.17x, 32x256x28x28 0.90x out of
// cache) and keeps its blocks.
// Since then, small batches take one-channel blocks at shorter planes too, once a channel is at most kMaxFewRuns runs
// of at least kMinFewRunsValues values in all: a channel's dy and x are then a few streams read once, and its dx pass
// reads them from L1, as torch's own per-channel loop does; blocks of several channels had left that loop faster than
// fastbn. On the 2-vCPU Xeon, float32 NCHW, torch's time over fastbn's, blocks of several channels -> one channel,
// bench_ops out of cache: 8x2048x7x7 0.73 -> 0.93, 8x512x7x7 0.81 -> 0.96, 8x1024x14x14 0.89 -> 1.03, 4x1024x14x14
// 0.85 -> 1.00, 2x512x14x14 0.78 -> 1.01; --warm-cache: 0.65 -> 0.87, 0.83 -> 0.85, 0.75 -> 0.92, 0.67 -> 0.94,
// 0.62 -> 0.78. Channels of fewer values lost (1x2048x7x7 0.68 -> 0.54 out of cache, 0.65 -> 0.34 in cache), and at
// batch 16 one-channel blocks were no better (16x2048x7x7 0.98 -> 0.92, 16x1024x14x14 1.11 -> 1.12). A one-channel tile
// sums a plane's tail past its whole vectors one value at a time (one_channel_sums), so planes whose tail is more than
// an eighth of them keep their blocks: float16 8x2048x7x7 (49 = 32 + 17 values) took 0.65 ms in one-channel blocks
// against 0.33 ms in blocks of several.
struct FusedBlocks {
  static constexpr int64_t kMaxPositions = 4096;  // per-position sums of one tile: ≤ 16 KiB per array
  static constexpr int64_t kMaxBytes = 1 << 18;   // a block's inputs; the next block is prefetched meanwhile
  static constexpr int64_t kMinBlocks = 16;       // work items for the threads
  static constexpr int64_t kMinRegisterPlane = 512;  // backward: one channel per block from 28x28 planes
  static constexpr int64_t kMaxFewRuns = 8;           // backward: one channel per block at batches up to 8 ...
  static constexpr int64_t kMinFewRunsValues = 384;   // ... when a channel holds this many values (8x7x7 or 2x14x14)
  static constexpr int64_t kVectorBytes = 64;         // the widest vector (AVX-512), for a plane's tail ...
  static constexpr int64_t kMaxTailShare = 8;         // ... past whole vectors: at most 1/kMaxTailShare of the plane
  static constexpr int64_t kMaxPrefetchedBytes = 1 << 19;  // blocks up to this size prefetch their successor
  bool channel_major = false;
  int64_t cb = 0;      // per-thread: channels per block
  int64_t blocks = 0;  // per-thread: blocks; 0 (and !channel_major): the shape does not fit, use the unfused passes
  int64_t chunk = 0;   // per-thread: positions per tile: S, or chunks of a long plane (plane_chunk)
  bool prefetch_next = false;  // per-thread: request the next block's inputs while writing this block's output
  // element_bytes: of the input's dtype; tensors: how many input-sized tensors a pass reads.
  FusedBlocks(const Geometry& g, int64_t element_bytes, int64_t tensors, bool backward) {
    if (g.layout != Layout::kPlanes) return;
    if (g.C < kMinBlocks) {
      channel_major = true;
      return;
    }
    if (g.N > kMaxRuns) return;
    const int64_t channel_bytes = g.N * g.S * element_bytes * tensors;
    cb = std::min({kMaxPositions / g.S, kMaxBytes / channel_bytes, g.C / kMinBlocks});
    const bool few_runs = g.N <= kMaxFewRuns && g.N * g.S >= kMinFewRunsValues &&
                          kMaxTailShare * (g.S % (kVectorBytes / element_bytes)) <= g.S;
    cb = backward && (g.S >= kMinRegisterPlane || few_runs) ? 1 : std::max<int64_t>(cb, 1);
    blocks = (g.C + cb - 1) / cb;
    chunk = plane_chunk(g.S, cb == 1 ? kMaxChannelRun : kMaxPositions);
    prefetch_next = cb * channel_bytes <= kMaxPrefetchedBytes;
  }
  bool fits() const { return channel_major || blocks > 0; }
};

// Backward with dx and the sums in one kernel: writes reduce.sum_g / sum_gxmu (for dw and db) and elementwise.dx /
// g_out, reading dy from memory once. In fused blocks where blocks.fits(): training (elementwise.use_x) computes
// elementwise.p and q per block from the sums; eval (dx = g·k, no p or q) writes each block's dx from cache. Eval
// only, elsewhere (kRows; kPlanes with more than kMaxRuns samples): the reduction writes each tile's dx after its sums.
template <typename scalar_t>
struct FusedBackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  FusedBlocks blocks;
  ReduceArgs<scalar_t> reduce;
  ElementwiseArgs<scalar_t> elementwise;
  const acc_t* invstd;
};

// Training forward over kPlanes in fused blocks (per-thread schedule only): writes mean, m2 and invstd
// (1 / sqrt(m2 / count + eps), math.h invstd_of) per channel, and y normalized with scale = invstd·weight and
// shift = bias.
template <typename scalar_t>
struct FusedForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  FusedBlocks blocks;
  Geometry geom;
  const at::Tensor* x;
  const at::Tensor* residual;  // nullable
  const at::Tensor* y;         // allocated like x
  bool relu;
  const acc_t* weight;  // C values (1 where there is no weight)
  const acc_t* bias;    // C values (0 where there is no bias)
  double eps;
  acc_t* mean;    // C
  acc_t* m2;      // C
  acc_t* invstd;  // C
};

template <typename scalar_t>
struct Kernels {
  void (*stats)(const StatsArgs<scalar_t>&);
  void (*normalize)(const NormalizeArgs<scalar_t>&);
  void (*forward_fused)(const FusedForwardArgs<scalar_t>&);  // nullptr in the strided table
  void (*backward_reduce)(const ReduceArgs<scalar_t>&);
  void (*backward_elementwise)(const ElementwiseArgs<scalar_t>&);
  void (*backward_fused)(const FusedBackwardArgs<scalar_t>&);  // nullptr in the strided table
};

// Per capability: make_kernels() is the planes/rows table (kernels_impl.h), make_strided_kernels() the strided one
// (strided_impl.h).
#define FASTBN_DECLARE_CPU_KERNELS(CAP)                  \
  namespace CAP {                                        \
  template <typename scalar_t>                           \
  Kernels<scalar_t> make_kernels();                      \
  template <typename scalar_t>                           \
  Kernels<scalar_t> make_strided_kernels();              \
  }
FASTBN_DECLARE_CPU_KERNELS(dflt)
FASTBN_DECLARE_CPU_KERNELS(avx2)
FASTBN_DECLARE_CPU_KERNELS(avx512)
#undef FASTBN_DECLARE_CPU_KERNELS

// Defines NAME() of the enclosing namespace as `return TABLE;` for every input dtype.
#define FASTBN_DEFINE_CPU_KERNELS(NAME, ...)                \
  template <typename scalar_t>                              \
  Kernels<scalar_t> NAME() {                                \
    return __VA_ARGS__;                                     \
  }                                                         \
  template Kernels<float> NAME<float>();                    \
  template Kernels<double> NAME<double>();                  \
  template Kernels<c10::Half> NAME<c10::Half>();            \
  template Kernels<c10::BFloat16> NAME<c10::BFloat16>();

// Bytes above which an elementwise pass writes its output with non-temporal stores: half the last-level cache, at
// most 16 MiB (a smaller output is likely still cached when its reader comes; a larger one has pushed its own start
// out).
int64_t streaming_store_bytes();

// Whether the first and the last page of the nbytes at p are in memory (mincore; true where it is unavailable). A
// block the allocator has just mapped is not: glibc maps blocks over its mmap threshold (32 MB at most) afresh and
// unmaps them on free. fastbn's forward-eval of NCHW 32x128x56x56 (51 MB of output) with glibc's default allocator,
// 2-vCPU Xeon, best of 3 medians: 11.6-11.8 ms with plain stores, 17.8-18.1 ms streamed; torch's 12.3-12.7 ms.
bool pages_in_memory(const void* p, int64_t nbytes);

// The tables for this CPU: vectorised (planes/rows layouts) and strided.
template <typename scalar_t>
const Kernels<scalar_t>& vector_kernels();
template <typename scalar_t>
const Kernels<scalar_t>& strided_kernels();

template <typename scalar_t>
const Kernels<scalar_t>& kernels_for(const Geometry& g) {
  return g.layout == Layout::kStrided ? strided_kernels<scalar_t>() : vector_kernels<scalar_t>();
}

}  // namespace cpu
}  // namespace fastbn
