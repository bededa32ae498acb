// Device helpers shared by the fastbn kernels: warp / block / 2-D block / grid reductions and the split
// (last-block-done) merges of per-channel partials, the Welford-Chan merge
// of (count, mean, M2) triples, 16-byte vector loads and stores with a scalar path, the grid barrier.
//
// Written once for both sides: compiled by nvcc for the GPU, and by the host compiler against the SIMT
// emulator (FASTBN_SIMT) for the tests. Everything here assumes a block of a multiple of 32 threads.
//
// Determinism: every reduction combines values in an order fixed by thread and block indices, never by
// arrival order, so a kernel built from these gives the same bits on every run and under every
// emulator schedule.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/launch.cuh"

namespace fastbn {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ unsigned block_thread_count() { return blockDim.x * blockDim.y * blockDim.z; }

__device__ __forceinline__ unsigned block_thread_rank() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

__device__ __forceinline__ unsigned grid_block_count() { return gridDim.x * gridDim.y * gridDim.z; }

__device__ __forceinline__ unsigned grid_block_rank() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}

// ---------------------------------------------------------------------------------------------------
// Reduction operators. Each is a functor op(a, b) with an identity().

template <typename T>
struct SumOp {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
  __device__ __forceinline__ static T identity() { return T(0); }
};

// ---------------------------------------------------------------------------------------------------
// Welford / Chan: per-thread running statistics and their merge.
//
// Welford's (1962) one-value update and the pairwise merge of Chan, Golub & LeVeque (1979), the same
// combination ATen's WelfordOps uses; the count is an integer so that it stays exact past 2^24.
template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;  // sum of squared deviations from the mean
  int64_t count;
};

template <typename acc_t>
__host__ __device__ __forceinline__ Welford<acc_t> welford_init() {
  return Welford<acc_t>{acc_t(0), acc_t(0), 0};
}

template <typename acc_t>
__host__ __device__ __forceinline__ void welford_add(Welford<acc_t>& w, acc_t x) {
  w.count += 1;
  const acc_t delta = x - w.mean;
  w.mean += delta / static_cast<acc_t>(w.count);
  w.m2 += delta * (x - w.mean);
}

template <typename acc_t>
__host__ __device__ __forceinline__ Welford<acc_t> welford_merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  const int64_t count = a.count + b.count;
  if (count == 0) return a;
  const acc_t b_share = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  const acc_t delta = b.mean - a.mean;
  Welford<acc_t> out;
  out.mean = a.mean + delta * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * b_share;
  out.count = count;
  return out;
}

template <typename acc_t>
struct WelfordOp {
  __device__ __forceinline__ Welford<acc_t> operator()(const Welford<acc_t>& a, const Welford<acc_t>& b) const {
    return welford_merge(a, b);
  }
  __device__ __forceinline__ static Welford<acc_t> identity() { return welford_init<acc_t>(); }
};

// Two sums reduced together (the backward's Σg and Σg·(x - mean)).
template <typename acc_t>
struct Sums2 {
  acc_t g, gx;
};

template <typename acc_t>
struct Sums2Op {
  __device__ __forceinline__ Sums2<acc_t> operator()(const Sums2<acc_t>& a, const Sums2<acc_t>& b) const {
    return Sums2<acc_t>{a.g + b.g, a.gx + b.gx};
  }
  __device__ __forceinline__ static Sums2<acc_t> identity() { return Sums2<acc_t>{acc_t(0), acc_t(0)}; }
};

// ---------------------------------------------------------------------------------------------------
// Warp shuffles of reduction values: the built-in types directly, Welford triples and Sums2 field by field.

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(kFullMask, v, lane_mask);
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_xor(const Welford<acc_t>& v, int lane_mask) {
  Welford<acc_t> out;
  out.mean = __shfl_xor_sync(kFullMask, v.mean, lane_mask);
  out.m2 = __shfl_xor_sync(kFullMask, v.m2, lane_mask);
  out.count = static_cast<int64_t>(__shfl_xor_sync(kFullMask, static_cast<long long>(v.count), lane_mask));
  return out;
}

template <typename acc_t>
__device__ __forceinline__ Sums2<acc_t> shfl_xor(const Sums2<acc_t>& v, int lane_mask) {
  return Sums2<acc_t>{__shfl_xor_sync(kFullMask, v.g, lane_mask), __shfl_xor_sync(kFullMask, v.gx, lane_mask)};
}

// Butterfly reduction over the warp: every lane ends with the total. The lower lane's value is always
// the left operand, so both partners of each exchange compute bitwise the same thing even for an
// operator that is not exactly commutative in floating point (the Welford merge).
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
  const unsigned lane = block_thread_rank() % kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = shfl_xor(v, offset);
    v = (lane & offset) ? op(other, v) : op(v, other);
  }
  return v;
}

// Reduction over the block; every thread gets the total. `scratch` is shared memory for 32 values of
// T. It may be reused right after the call returns: the barrier at the start of the next call keeps
// a fast warp from overwriting partials that a slow warp is still reading.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  const unsigned rank = block_thread_rank();
  const unsigned lane = rank % kWarpSize;
  const unsigned warp = rank / kWarpSize;
  const unsigned warps = block_thread_count() / kWarpSize;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : Op::identity();
  return warp_reduce(v, op);
}

// ---------------------------------------------------------------------------------------------------
// Loads of data other blocks of the same launch wrote: served from L2 (ld.global.cg), never from this
// SM's possibly stale L1. Word by word, so that it works for any trivially copyable T.
template <typename T>
__device__ __forceinline__ T load_coherent(const T* p) {
  static_assert(sizeof(T) % sizeof(unsigned) == 0, "load_coherent copies whole 32-bit words");
  static_assert(std::is_trivially_copyable<T>::value, "load_coherent copies bits");
  constexpr int kWords = sizeof(T) / sizeof(unsigned);
  unsigned words[kWords];
  const unsigned* src = reinterpret_cast<const unsigned*>(p);
#pragma unroll
  for (int i = 0; i < kWords; ++i) words[i] = __ldcg(src + i);
  T out;
  memcpy(&out, words, sizeof(T));
  return out;
}

// Deterministic multi-block reduction with a last-block-done counter (the threadFenceReduction
// pattern of the CUDA samples). Each of `blocks` blocks (ranked by `block_rank`) calls it with its
// block total (as returned by block_reduce, in every thread). The block that arrives last sums the
// partials in block-rank order, so the result does not depend on which block that was, and gets
// true with the total in `result` (every thread of it); the others get false. The last block resets
// *counter to 0, so a zeroed counter can be reused by the next launch (and by CUDA graphs).
// `partials` holds `blocks` values; `scratch` is block_reduce's shared memory.
template <typename T, typename Op>
__device__ __forceinline__ bool grid_reduce_last_block(T block_total, Op op, T* partials, unsigned* counter,
                                                       unsigned blocks, unsigned block_rank, T* scratch, T& result) {
  const unsigned rank = block_thread_rank();
  bool last = false;
  if (rank == 0) {
    partials[block_rank] = block_total;
    __threadfence();  // the partial is visible device-wide before the counter says so
    last = atomicAdd(counter, 1u) == blocks - 1;
  }
  if (!__syncthreads_or(last)) return false;
  __threadfence();  // and the partials of the others are read only after seeing the count
  T v = Op::identity();
  for (unsigned b = rank; b < blocks; b += block_thread_count()) v = op(v, load_coherent(partials + b));
  result = block_reduce(v, op, scratch);
  if (rank == 0) *counter = 0;
  return true;
}

// Barrier across every thread of a cooperative launch (fastbn::launch_cooperative).
__device__ __forceinline__ void grid_barrier() { grid_sync(); }

// Cooperative-grid reduction: every block publishes its total, waits at the grid barrier, then reduces
// all partials in block-rank order, so every block gets bitwise the same total.
template <typename T, typename Op>
__device__ __forceinline__ T grid_reduce_cooperative(T block_total, Op op, T* partials, T* scratch) {
  const unsigned rank = block_thread_rank();
  const unsigned blocks = grid_block_count();
  if (rank == 0) partials[grid_block_rank()] = block_total;
  grid_sync();
  T v = Op::identity();
  for (unsigned b = rank; b < blocks; b += block_thread_count()) v = op(v, load_coherent(partials + b));
  return block_reduce(v, op, scratch);
}

// ---------------------------------------------------------------------------------------------------
// Reduction over threadIdx.y of a 2-D block (blockDim.y a power of two), in a fixed tree order; the
// total is returned to the threads with threadIdx.y == 0 (others get partial values). `smem` holds
// blockDim.x * blockDim.y values; it may be reused after the call (the leading barrier protects it).
template <typename T, typename Op>
__device__ __forceinline__ T reduce_y(T v, Op op, T* smem) {
  const unsigned tid = threadIdx.y * blockDim.x + threadIdx.x;
  __syncthreads();
  smem[tid] = v;
  __syncthreads();
  for (unsigned s = blockDim.y / 2; s > 0; s /= 2) {
    if (threadIdx.y < s) smem[tid] = op(smem[tid], smem[tid + s * blockDim.x]);
    __syncthreads();
  }
  return smem[threadIdx.x];
}

// Merge of per-block partials of one channel written by `splits` blocks (partials[s * pstride]),
// read coherently; the block's threads split the list in a fixed order and meet in block_reduce.
// Every thread returns the total. For 1-D (planes) blocks.
template <typename T, typename Op>
__device__ __forceinline__ T merge_partials_block(const T* partials, int64_t pstride, unsigned splits, Op op,
                                                  T* scratch) {
  T v = Op::identity();
  for (unsigned s = block_thread_rank(); s < splits; s += block_thread_count())
    v = op(v, load_coherent(partials + s * pstride));
  return block_reduce(v, op, scratch);
}

// The same for a 2-D (rows) block: the threads of one column (same threadIdx.x) merge the partials of
// one channel; the total is returned to threadIdx.y == 0.
template <typename T, typename Op>
__device__ __forceinline__ T merge_partials_y(const T* partials, int64_t pstride, unsigned splits, bool active,
                                              Op op, T* smem) {
  T v = Op::identity();
  if (active)
    for (unsigned s = threadIdx.y; s < splits; s += blockDim.y) v = op(v, load_coherent(partials + s * pstride));
  return reduce_y(v, op, smem);
}

// Last-block-done arrival for a group of `splits` blocks sharing `counter` (threadFenceReduction, as
// in grid_reduce_last_block): call after this block's partials are written. True in every
// thread of the block that arrives last; that block resets the counter for the next launch.
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned splits) {
  bool last = false;
  __syncthreads();  // every thread's partial is written
  if (block_thread_rank() == 0) {
    __threadfence();
    last = atomicAdd(counter, 1u) == splits - 1;
  }
  last = __syncthreads_or(last);
  if (last) {
    __threadfence();
    if (block_thread_rank() == 0) *counter = 0;
  }
  return last;
}

// The end of a reduction split over `splits` blocks per channel, 1-D blocks: block `split` of channel c
// reduces its value v; with one split it is the total, else each block writes its partial to
// partials[c * splits + split] and the last block of the channel to arrive (counters[c]) merges them in
// split order. finish(total) runs in thread 0 of the block holding the total.
template <typename T, typename Op, typename I, typename Finish>
__device__ __forceinline__ void split_reduce_block(T v, Op op, T* scratch, T* partials, unsigned* counters, I c,
                                                   unsigned split, unsigned splits, Finish finish) {
  v = block_reduce(v, op, scratch);
  if (splits > 1) {
    if (block_thread_rank() == 0) partials[c * splits + split] = v;
    if (!arrive_last(counters + c, splits)) return;
    v = merge_partials_block(partials + c * splits, 1, splits, op, scratch);
  }
  if (block_thread_rank() == 0) finish(v);
}

// The same for 2-D blocks whose column threads hold W lanes (channels c0 .. c0 + W - 1 of C; `active` when
// the column has channels), already reduced over threadIdx.y (reduce_y: totals in threadIdx.y == 0; each
// lane is reduced as soon as it is made, which keeps register pressure down): partials[split * C + c], one
// counter per block column group (counters[blockIdx.x]). finish(v, total) runs in threadIdx.y == 0 of
// active columns.
template <int W, typename T, typename Op, typename I, typename Finish>
__device__ __forceinline__ void split_merge_y(const T (&lanes)[W], Op op, T* smem, T* partials, unsigned* counters,
                                              I C, I c0, bool active, unsigned split, unsigned splits, Finish finish) {
  const bool leader = active && threadIdx.y == 0;
  if (splits == 1) {
    if (leader)
#pragma unroll
      for (int v = 0; v < W; ++v) finish(v, lanes[v]);
    return;
  }
  if (leader)
#pragma unroll
    for (int v = 0; v < W; ++v) partials[static_cast<int64_t>(split) * C + c0 + v] = lanes[v];
  if (!arrive_last(counters + blockIdx.x, splits)) return;
#pragma unroll
  for (int v = 0; v < W; ++v) {
    const T total = merge_partials_y(partials + (active ? c0 + v : 0), C, splits, active, op, smem);
    if (leader) finish(v, total);
  }
}

// ---------------------------------------------------------------------------------------------------
// 16-byte vector loads and stores.

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

// Elements of T in one 16-byte pack.
template <typename T>
constexpr int kPackSize = 16 / sizeof(T);

// The kernels move the big tensors (x, dy, y, residual, dx, ...) through load_pack and store_pack and nothing else
// (but scalar or peek_pack samples of a channel's first values), so that the emulator's traffic count
// (count_traffic) is their memory traffic, in the E units of the kernels' comments.
// A load that is not the tensors' traffic: each thread's sample of its channels' first values (the shift).
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> peek_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  count_traffic(sizeof(Pack<T, N>), 0);
  return peek_pack<N>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  count_traffic(0, sizeof(Pack<T, N>));
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// How a range of n elements splits for vector access: [0, head) scalar until the first pointer is
// 16-byte aligned, then `packs` whole packs, then a scalar tail from tail_begin to n. Every pointer
// passed must be at the same offset from a 16-byte boundary, else everything is scalar (head == n).
struct VecSplit {
  int64_t head;
  int64_t packs;
  int64_t tail_begin;
};

template <int N, typename T, typename... Others>
__host__ __device__ __forceinline__ VecSplit vec_split(int64_t n, const T* first, const Others*... others) {
  constexpr uintptr_t kBytes = sizeof(T) * N;
  const uintptr_t misalignment = reinterpret_cast<uintptr_t>(first) % kBytes;
  const bool together = misalignment % sizeof(T) == 0 &&
                        ((reinterpret_cast<uintptr_t>(others) % kBytes == misalignment) && ...);
  if (!together) return VecSplit{n, 0, n};
  int64_t head = misalignment == 0 ? 0 : static_cast<int64_t>((kBytes - misalignment) / sizeof(T));
  if (head > n) head = n;
  const int64_t packs = (n - head) / N;
  return VecSplit{head, packs, head + packs * N};
}

// Visits [0, n) split by `s` with thread `t` of `stride` threads: on_scalar(i) for single elements of
// the head and the tail, on_pack(i) for the pack of elements [i, i + N) (i is then pack-aligned).
template <int N, typename OnPack, typename OnScalar>
__device__ __forceinline__ void for_each_vectorized(const VecSplit& s, int64_t n, int64_t t, int64_t stride,
                                                    OnPack on_pack, OnScalar on_scalar) {
  for (int64_t i = t; i < s.head; i += stride) on_scalar(i);
  for (int64_t p = t; p < s.packs; p += stride) on_pack(s.head + p * N);
  for (int64_t i = s.tail_begin + t; i < n; i += stride) on_scalar(i);
}

}  // namespace fastbn
