// Host launchers of the emulator's test kernels (tests/simt/kernels/*.cu), called by ops.cpp.
//
// Most take raw pointers so that the kernel files stay free of the heavy ATen headers and compile
// fast; vector.cu takes tensors to show that ATen and the emulated CUDA surface mix in one file.
#pragma once

#include <cstdint>

namespace at {
class Tensor;
}  // namespace at

namespace simt_test {

// reductions.cu
void warp_sums(const float* x, float* out, int64_t warps);                    // one warp per 32 values
void block_sums(const double* x, double* out, int64_t n, int blocks, int threads, int repeats);
void block_stats(const float* x, float* mean_m2_count, int64_t n, int threads);  // Welford; a row per thread
void block_merge(const float* triples, float* out, int threads);             // (mean, m2, count) rows
void grid_sum(const float* x, float* out, float* partials, unsigned* counter, int64_t n, int blocks, int threads);
void grid_stats(const double* x, double* out, void* partials, unsigned* counter, int64_t rows, int64_t cols,
                int blocks_per_row, int threads);

// cooperative.cu
void center_cooperative(const float* x, float* y, float* partials, float* total, int64_t n, int blocks, int threads);
void count_phases_cooperative(int* out, int phases, int blocks, int threads);
void grid_sync_in_ordinary_launch(int* out);

// warp_ops.cu: op 0 shfl, 1 up, 2 down, 3 xor; lane i offers values[i] and operand operands[i].
void warp_shuffle(const double* values, const int* operands, double* out, int op, int width, int threads);
void warp_votes(const int* predicates, unsigned* out, int threads);  // per warp: ballot, any, all
void block_votes(const int* predicates, int* out, int threads);      // syncthreads_count/and/or
void atomics(int* ints, unsigned* uints, unsigned long long* ulls, float* floats, double* doubles, int blocks,
             int threads);
void partial_mask(int* out);
void width_not_power_of_two(float* out);

// intrinsics.cu: x > 0; ten columns per element
void intrinsics(const float* x, float* out, int64_t n);

// shared_memory.cu
void reverse_blocks_dynamic(const float* x, float* y, int64_t n, int threads, int64_t shared_bytes);
void reverse_blocks_static(const float* x, float* y, int64_t n);
void dynamic_shared_mixed(const double* x, double* out, int64_t n, int threads);

// vector.cu
void axpby(const at::Tensor& x, at::Tensor& y, double a, double b, int blocks, int threads);
void pack_sums(const at::Tensor& x, at::Tensor& out, at::Tensor& visits, int blocks, int threads);

// planted.cu: bugs the emulator must catch, each next to its correct twin.
void tree_sum(const float* x, float* out, int64_t n, int threads, bool with_barriers);
void warp_tree_sum(const float* x, float* out, bool with_syncwarp);
void write_range(float* y, int64_t n, int64_t extra, int threads);  // writes y[0, n + extra)
void shared_write(float* out, int threads, int shift);              // writes shared tile[t + shift]
void early_return_then_barrier(float* out, int threads);
void divergent_barriers(float* out, int threads);

}  // namespace simt_test
