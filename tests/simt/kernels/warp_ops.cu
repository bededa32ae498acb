// Warp shuffles and votes, block votes, atomics: raw results for the tests to compare with CUDA's
// documented semantics, and the misuse the emulator must refuse.
#include "cuda/device_utils.cuh"
#include "kernels.h"

namespace simt_test {
namespace {

__global__ void shuffle_kernel(const double* __restrict__ values, const int* __restrict__ operands,
                               double* __restrict__ out, int op, int width) {
  const unsigned i = threadIdx.x;
  const double v = values[i];
  const int k = operands[i];
  double r = 0;
  switch (op) {
    case 0: r = __shfl_sync(fastbn::kFullMask, v, k, width); break;
    case 1: r = __shfl_up_sync(fastbn::kFullMask, v, static_cast<unsigned>(k), width); break;
    case 2: r = __shfl_down_sync(fastbn::kFullMask, v, static_cast<unsigned>(k), width); break;
    default: r = __shfl_xor_sync(fastbn::kFullMask, v, k, width); break;
  }
  out[i] = r;
  // The same exchange through the 32-bit overloads must pick the same lanes.
  const int as_int = __shfl_xor_sync(fastbn::kFullMask, static_cast<int>(i), 1);
  if (as_int != static_cast<int>(i ^ 1)) out[i] = -1e300;
}

__global__ void votes_kernel(const int* __restrict__ predicates, unsigned* __restrict__ out) {
  const unsigned i = threadIdx.x;
  const int p = predicates[i];
  const unsigned ballot = __ballot_sync(fastbn::kFullMask, p);
  const int any = __any_sync(fastbn::kFullMask, p);
  const int all = __all_sync(fastbn::kFullMask, p);
  __syncwarp();
  if (i % 32 == 0) {
    out[3 * (i / 32)] = ballot;
    out[3 * (i / 32) + 1] = static_cast<unsigned>(any);
    out[3 * (i / 32) + 2] = static_cast<unsigned>(all);
  }
}

__global__ void block_votes_kernel(const int* __restrict__ predicates, int* __restrict__ out) {
  const int p = predicates[threadIdx.x];
  const int count = __syncthreads_count(p);
  const int all = __syncthreads_and(p);
  const int any = __syncthreads_or(p);
  out[3 * threadIdx.x] = count;
  out[3 * threadIdx.x + 1] = all;
  out[3 * threadIdx.x + 2] = any;
}

// Every thread of every block: +1 / max / min / exch / cas on shared counters.
__global__ void atomics_kernel(int* ints, unsigned* uints, unsigned long long* ulls, float* floats, double* doubles) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(ints + 0, 1);
  atomicMax(ints + 1, t);
  atomicMin(ints + 2, -t);
  atomicSub(ints + 3, 2);
  atomicExch(ints + 4, 7);
  atomicCAS(ints + 5, 0, t + 1);  // only the first thread to get there swaps
  atomicAdd(uints + 0, 3u);
  atomicMax(uints + 1, static_cast<unsigned>(t));
  atomicInc(uints + 2, 9u);  // counts modulo 10
  atomicOr(uints + 3, 1u << (t % 32));
  atomicAdd(ulls + 0, 1ull << 33);
  atomicCAS(ulls + 1, 0ull, 5ull);
  atomicAdd(floats + 0, 0.5f);
  atomicExch(floats + 1, 2.5f);
  atomicAdd(doubles + 0, 0.25);
  __threadfence();
}

__global__ void partial_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void bad_width_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(fastbn::kFullMask, 1.0f, 1, 12);
}

}  // namespace

void warp_shuffle(const double* values, const int* operands, double* out, int op, int width, int threads) {
  fastbn::launch(shuffle_kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), values, operands, out, op, width);
}

void warp_votes(const int* predicates, unsigned* out, int threads) {
  fastbn::launch(votes_kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), predicates, out);
}

void block_votes(const int* predicates, int* out, int threads) {
  fastbn::launch(block_votes_kernel, dim3(1), dim3(threads), 0, fastbn::current_stream(), predicates, out);
}

void atomics(int* ints, unsigned* uints, unsigned long long* ulls, float* floats, double* doubles, int blocks,
             int threads) {
  fastbn::launch(atomics_kernel, dim3(blocks), dim3(threads), 0, fastbn::current_stream(), ints, uints, ulls, floats,
                 doubles);
}

void partial_mask(int* out) {
  fastbn::launch(partial_mask_kernel, dim3(1), dim3(32), 0, fastbn::current_stream(), out);
}

void width_not_power_of_two(float* out) {
  fastbn::launch(bad_width_kernel, dim3(1), dim3(32), 0, fastbn::current_stream(), out);
}

}  // namespace simt_test
