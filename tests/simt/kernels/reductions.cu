// Reductions built from csrc/cuda/device_utils.cuh: warp, block, Welford, and the multi-block grid
// reduction with a last-block-done counter. Launch shapes are chosen by the tests.
#include "cuda/device_utils.cuh"
#include "kernels.h"

namespace simt_test {
namespace {

__global__ void warp_sums_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  const float total = fastbn::warp_reduce(x[i], fastbn::SumOp<float>());
  if (i % 32 == 0) out[i / 32] = total;
}

// Each block sums a grid-strided share `repeats` times into out[block * repeats + r], reusing the same
// scratch back to back: the barrier at the start of block_reduce is what keeps that correct.
__global__ void block_sums_kernel(const double* __restrict__ x, double* __restrict__ out, int64_t n, int repeats) {
  __shared__ double scratch[32];
  for (int r = 0; r < repeats; ++r) {
    double v = 0;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
      v += x[i] * (r + 1);
    const double total = fastbn::block_reduce(v, fastbn::SumOp<double>(), scratch);
    // Every thread holds the total; thread (r % blockDim.x) writes it, to check they all agree.
    if (threadIdx.x == static_cast<unsigned>(r) % blockDim.x) out[blockIdx.x * repeats + r] = total;
  }
}

__global__ void block_stats_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t n) {
  __shared__ fastbn::Welford<float> scratch[32];
  fastbn::Welford<float> w = fastbn::welford_init<float>();
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) fastbn::welford_add(w, x[i]);
  w = fastbn::block_reduce(w, fastbn::WelfordOp<float>(), scratch);
  // Every thread writes its own copy: they must agree to the bit although the merge is not exactly
  // commutative in floating point.
  out[3 * threadIdx.x] = w.mean;
  out[3 * threadIdx.x + 1] = w.m2;
  out[3 * threadIdx.x + 2] = static_cast<float>(w.count);
}

// Thread t starts from the triple (mean, m2, count) in row t: unequal counts are where the Welford
// merge stops being exactly commutative, so this is where threads could end up disagreeing.
__global__ void block_merge_kernel(const float* __restrict__ triples, float* __restrict__ out) {
  __shared__ fastbn::Welford<float> scratch[32];
  const unsigned t = threadIdx.x;
  fastbn::Welford<float> w{triples[3 * t], triples[3 * t + 1], static_cast<int64_t>(triples[3 * t + 2])};
  w = fastbn::block_reduce(w, fastbn::WelfordOp<float>(), scratch);
  out[3 * t] = w.mean;
  out[3 * t + 1] = w.m2;
  out[3 * t + 2] = static_cast<float>(w.count);
}

__global__ void grid_sum_kernel(const float* __restrict__ x, float* __restrict__ out, float* partials,
                                unsigned* counter, int64_t n) {
  __shared__ float scratch[32];
  float v = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v += x[i];
  const float block_total = fastbn::block_reduce(v, fastbn::SumOp<float>(), scratch);
  float total;
  if (fastbn::grid_reduce_last_block(block_total, fastbn::SumOp<float>(), partials, counter, gridDim.x, blockIdx.x,
                                     scratch, total) &&
      threadIdx.x == 0)
    *out = total;
}

// Row statistics of a (rows, cols) matrix with blockDim.y == 1: gridDim.y rows at a time, gridDim.x
// blocks per row, one counter and one slice of partials per row (the shape of per-channel BN stats).
__global__ void grid_stats_kernel(const double* __restrict__ x, double* __restrict__ out,
                                  fastbn::Welford<double>* partials, unsigned* counters, int64_t rows, int64_t cols) {
  __shared__ fastbn::Welford<double> scratch[32];
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    fastbn::Welford<double> w = fastbn::welford_init<double>();
    for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x)
      fastbn::welford_add(w, x[row * cols + c]);
    w = fastbn::block_reduce(w, fastbn::WelfordOp<double>(), scratch);
    fastbn::Welford<double> total;
    if (fastbn::grid_reduce_last_block(w, fastbn::WelfordOp<double>(), partials + row * gridDim.x, counters + row,
                                       gridDim.x, blockIdx.x, scratch, total) &&
        threadIdx.x == 0) {
      out[3 * row] = total.mean;
      out[3 * row + 1] = total.m2;
      out[3 * row + 2] = static_cast<double>(total.count);
    }
  }
}

}  // namespace

void warp_sums(const float* x, float* out, int64_t warps) {
  fastbn::launch(warp_sums_kernel, dim3(static_cast<unsigned>(warps)), dim3(32), 0, fastbn::current_stream(), x, out);
}

void block_sums(const double* x, double* out, int64_t n, int blocks, int threads, int repeats) {
  fastbn::launch(block_sums_kernel, dim3(blocks), dim3(threads), 0, fastbn::current_stream(), x, out, n, repeats);
}

void block_stats(const float* x, float* out, int64_t n, int threads) {
  fastbn::launch(block_stats_kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), x, out, n);
}

void block_merge(const float* triples, float* out, int threads) {
  fastbn::launch(block_merge_kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), triples, out);
}

void grid_sum(const float* x, float* out, float* partials, unsigned* counter, int64_t n, int blocks, int threads) {
  fastbn::launch(grid_sum_kernel, dim3(blocks), dim3(threads), 0, fastbn::current_stream(), x, out, partials, counter,
                 n);
}

void grid_stats(const double* x, double* out, void* partials, unsigned* counters, int64_t rows, int64_t cols,
                int blocks_per_row, int threads) {
  const unsigned rows_at_once = static_cast<unsigned>(rows < 4 ? rows : 4);
  fastbn::launch(grid_stats_kernel, dim3(blocks_per_row, rows_at_once), dim3(threads), 0, fastbn::current_stream(),
                 x, out, static_cast<fastbn::Welford<double>*>(partials), counters, rows, cols);
}

}  // namespace simt_test
