// Static and dynamic shared memory: per block, shared by the block's threads, separate between blocks.
#include "cuda/device_utils.cuh"
#include "kernels.h"

namespace simt_test {
namespace {

// Each block reverses its tile of blockDim.x elements through dynamic shared memory.
__global__ void reverse_dynamic_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  float* tile = fastbn::dynamic_shared<float>();
  const int64_t base = blockIdx.x * int64_t(blockDim.x);
  const int64_t i = base + threadIdx.x;
  const int64_t count = n - base < blockDim.x ? n - base : blockDim.x;  // the last tile may be short
  if (i < n) tile[threadIdx.x] = x[i];
  __syncthreads();
  if (i < n) y[i] = tile[count - 1 - threadIdx.x];
}

constexpr int kStaticTile = 128;

__global__ void __launch_bounds__(kStaticTile) reverse_static_kernel(const float* __restrict__ x, float* __restrict__ y,
                                                                     int64_t n) {
  __shared__ float tile[kStaticTile];
  const int64_t base = blockIdx.x * int64_t(kStaticTile);
  const int64_t i = base + threadIdx.x;
  const int64_t count = n - base < kStaticTile ? n - base : kStaticTile;
  if (i < n) tile[threadIdx.x] = x[i];
  __syncthreads();
  if (i < n) y[i] = tile[count - 1 - threadIdx.x];
}

// Dynamic shared memory carved into a double array and an int array (doubles first, for alignment):
// a shared-memory tree sum of x and a count of its positive values, per block.
__global__ void mixed_kernel(const double* __restrict__ x, double* __restrict__ out, int64_t n) {
  double* sums = fastbn::dynamic_shared<double>();
  int* counts = reinterpret_cast<int*>(sums + blockDim.x);
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const double v = i < n ? x[i] : 0.0;
  sums[threadIdx.x] = v;
  counts[threadIdx.x] = v > 0;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      sums[threadIdx.x] += sums[threadIdx.x + half];
      counts[threadIdx.x] += counts[threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = sums[0];
    out[2 * blockIdx.x + 1] = counts[0];
  }
}

}  // namespace

void reverse_blocks_dynamic(const float* x, float* y, int64_t n, int threads, int64_t shared_bytes) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  fastbn::launch(reverse_dynamic_kernel, dim3(blocks), dim3(threads), static_cast<std::size_t>(shared_bytes),
                 fastbn::current_stream(), x, y, n);
}

void reverse_blocks_static(const float* x, float* y, int64_t n) {
  const unsigned blocks = static_cast<unsigned>((n + kStaticTile - 1) / kStaticTile);
  fastbn::launch(reverse_static_kernel, dim3(blocks), dim3(kStaticTile), 0, fastbn::current_stream(), x, y, n);
}

void dynamic_shared_mixed(const double* x, double* out, int64_t n, int threads) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  const std::size_t bytes = threads * (sizeof(double) + sizeof(int));
  fastbn::launch(mixed_kernel, dim3(blocks), dim3(threads), bytes, fastbn::current_stream(), x, out, n);
}

}  // namespace simt_test
