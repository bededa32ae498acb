// Planted bugs, each next to its correct twin: the emulator (or its AddressSanitizer build) must tell
// them apart. A GPU usually runs all of the buggy ones "fine".
#include "cuda/device_utils.cuh"
#include "kernels.h"

namespace simt_test {
namespace {

// The textbook shared-memory tree sum of one block, n == blockDim.x <= 1024 values. Without the
// barrier in the loop a thread adds its partner's slot before the partner has folded its own half in.
template <bool kBarriers>
__global__ void tree_sum_kernel(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float s[1024];
  s[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) s[threadIdx.x] += s[threadIdx.x + half];
    if (kBarriers) __syncthreads();
  }
  if (threadIdx.x == 0) *out = s[0];
}

// The same within one warp, where the barrier is __syncwarp.
template <bool kSyncwarp>
__global__ void warp_tree_sum_kernel(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float s[32];
  const unsigned lane = threadIdx.x;
  s[lane] = x[lane];
  __syncwarp();
  for (unsigned half = 16; half > 0; half /= 2) {
    if (lane < half) s[lane] += s[lane + half];
    if (kSyncwarp) __syncwarp();
  }
  if (lane == 0) *out = s[0];
}

// y[i] = i for i < limit; the caller passes limit > numel(y) to plant an out-of-bounds write.
__global__ void write_range_kernel(float* y, int64_t limit) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < limit; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = static_cast<float>(i);
}

// Each thread writes tile[threadIdx.x + shift] of a dynamic shared tile of blockDim.x floats; shift > 0
// runs past its end.
__global__ void shared_write_kernel(float* __restrict__ out, int shift) {
  float* tile = fastbn::dynamic_shared<float>();
  tile[threadIdx.x + shift] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x];
}

// Half the block returns before a barrier the other half waits at.
__global__ void early_return_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Two warps take different __syncthreads.
__global__ void divergent_barriers_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

}  // namespace

void tree_sum(const float* x, float* out, int64_t n, int threads, bool with_barriers) {
  (void)n;  // n == threads
  auto kernel = with_barriers ? tree_sum_kernel<true> : tree_sum_kernel<false>;
  fastbn::launch(kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), x, out);
}

void warp_tree_sum(const float* x, float* out, bool with_syncwarp) {
  auto kernel = with_syncwarp ? warp_tree_sum_kernel<true> : warp_tree_sum_kernel<false>;
  fastbn::launch(kernel, dim3(1), dim3(32), 0, fastbn::current_stream(), x, out);
}

void write_range(float* y, int64_t n, int64_t extra, int threads) {
  fastbn::launch(write_range_kernel, dim3(2), dim3(threads), 0, fastbn::current_stream(), y, n + extra);
}

void shared_write(float* out, int threads, int shift) {
  fastbn::launch(shared_write_kernel, dim3(1), dim3(threads), threads * sizeof(float), fastbn::current_stream(), out,
                 shift);
}

void early_return_then_barrier(float* out, int threads) {
  fastbn::launch(early_return_kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), out);
}

void divergent_barriers(float* out, int threads) {
  fastbn::launch(divergent_barriers_kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), out);
}

}  // namespace simt_test
