// Cooperative (persistent) kernels: every block resident, meeting at grid barriers.
#include "cuda/device_utils.cuh"
#include "kernels.h"

namespace simt_test {
namespace {

// y = x - mean(x) in one launch: reduce, grid barrier (inside grid_reduce_cooperative), normalize.
// The shape of a persistent BatchNorm forward.
__global__ void center_kernel(const float* __restrict__ x, float* __restrict__ y, float* partials,
                              float* __restrict__ total_out, int64_t n) {
  __shared__ float scratch[32];
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  float v = 0;
  for (int64_t i = first; i < n; i += stride) v += x[i];
  const float block_total = fastbn::block_reduce(v, fastbn::SumOp<float>(), scratch);
  const float total = fastbn::grid_reduce_cooperative(block_total, fastbn::SumOp<float>(), partials, scratch);
  if (blockIdx.x == 0 && threadIdx.x == 0) *total_out = total;
  const float mean = total / static_cast<float>(n);
  for (int64_t i = first; i < n; i += stride) y[i] = x[i] - mean;
}

// Phase p: every block adds 1 to arrivals[p], crosses the grid barrier, then records what it sees in
// seen[p * gridDim.x + block]: gridDim.x if the barrier held everybody back until all had arrived.
__global__ void phases_kernel(int* arrivals, int* seen, int phases) {
  for (int p = 0; p < phases; ++p) {
    if (threadIdx.x == 0) atomicAdd(arrivals + p, 1);
    fastbn::grid_barrier();
    if (threadIdx.x == 0) seen[p * gridDim.x + blockIdx.x] = atomicAdd(arrivals + p, 0);
    fastbn::grid_barrier();  // nobody starts phase p + 1 before everybody read phase p
  }
}

__global__ void barrier_kernel(int* out) {
  fastbn::grid_barrier();
  out[threadIdx.x] = 1;
}

}  // namespace

void center_cooperative(const float* x, float* y, float* partials, float* total, int64_t n, int blocks, int threads) {
  fastbn::launch_cooperative(center_kernel, dim3(blocks), dim3(threads), 0, fastbn::current_stream(), x, y, partials,
                             total, n);
}

void count_phases_cooperative(int* out, int phases, int blocks, int threads) {
  fastbn::launch_cooperative(phases_kernel, dim3(blocks), dim3(threads), 0, fastbn::current_stream(), out,
                             out + phases, phases);
}

void grid_sync_in_ordinary_launch(int* out) {
  fastbn::launch(barrier_kernel, dim3(2), dim3(32), 0, fastbn::current_stream(), out);
}

}  // namespace simt_test
