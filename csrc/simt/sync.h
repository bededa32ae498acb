// Block barriers, warp shuffles and votes, and the grid barrier of cooperative launches.
//
// Each of these is a switch point: the calling fiber records its operand and yields to the block's
// scheduler, which completes the operation once every participant has arrived (csrc/simt/block.cpp).
// The call site (file:line, filled in by __builtin_FILE/__builtin_LINE default arguments) names the
// barrier in error messages and tells divergent barriers apart.
//
// Only full masks are emulated; a partial mask is reported as an error instead of being guessed at.
#pragma once

#include <cstdint>
#include <cstring>

#include "simt/keywords.h"

namespace fastbn {
namespace simt {
namespace detail {

enum class BarrierKind : int { sync, count, and_, or_ };
enum class WarpOp : int { sync, shfl_idx, shfl_up, shfl_down, shfl_xor, ballot, any, all };

int block_barrier(BarrierKind kind, int predicate, const char* file, int line);
std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t bits, int operand, int width,
                              const char* file, int line);
void grid_barrier(const char* file, int line);
unsigned char* dynamic_shared_memory();

template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T var, int operand, int width, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffled values are at most 64 bits");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(op, mask, bits, operand, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace detail
}  // namespace simt
}  // namespace fastbn

#define FASTBN_SIMT_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(FASTBN_SIMT_SITE) {
  ::fastbn::simt::detail::block_barrier(::fastbn::simt::detail::BarrierKind::sync, 1, file, line);
}
inline int __syncthreads_count(int predicate, FASTBN_SIMT_SITE) {
  return ::fastbn::simt::detail::block_barrier(::fastbn::simt::detail::BarrierKind::count, predicate, file, line);
}
inline int __syncthreads_and(int predicate, FASTBN_SIMT_SITE) {
  return ::fastbn::simt::detail::block_barrier(::fastbn::simt::detail::BarrierKind::and_, predicate, file, line);
}
inline int __syncthreads_or(int predicate, FASTBN_SIMT_SITE) {
  return ::fastbn::simt::detail::block_barrier(::fastbn::simt::detail::BarrierKind::or_, predicate, file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, FASTBN_SIMT_SITE) {
  ::fastbn::simt::detail::warp_collective(::fastbn::simt::detail::WarpOp::sync, mask, 0, 0, 32, file, line);
}

// One non-template overload per type CUDA provides, so that overload resolution (and what does not
// compile) is the same as under nvcc: c10::Half, for example, converts to float on both sides.
#define FASTBN_SIMT_SHUFFLES(T)                                                                             \
  inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, FASTBN_SIMT_SITE) {         \
    return ::fastbn::simt::detail::shuffle(::fastbn::simt::detail::WarpOp::shfl_idx, mask, var, srcLane,    \
                                           width, file, line);                                              \
  }                                                                                                         \
  inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, FASTBN_SIMT_SITE) {   \
    return ::fastbn::simt::detail::shuffle(::fastbn::simt::detail::WarpOp::shfl_up, mask, var,              \
                                           static_cast<int>(delta), width, file, line);              \
  }                                                                                                         \
  inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, FASTBN_SIMT_SITE) { \
    return ::fastbn::simt::detail::shuffle(::fastbn::simt::detail::WarpOp::shfl_down, mask, var,            \
                                           static_cast<int>(delta), width, file, line);              \
  }                                                                                                         \
  inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, FASTBN_SIMT_SITE) {    \
    return ::fastbn::simt::detail::shuffle(::fastbn::simt::detail::WarpOp::shfl_xor, mask, var, laneMask,   \
                                           width, file, line);                                              \
  }

FASTBN_SIMT_SHUFFLES(int)
FASTBN_SIMT_SHUFFLES(unsigned int)
FASTBN_SIMT_SHUFFLES(long)
FASTBN_SIMT_SHUFFLES(unsigned long)
FASTBN_SIMT_SHUFFLES(long long)
FASTBN_SIMT_SHUFFLES(unsigned long long)
FASTBN_SIMT_SHUFFLES(float)
FASTBN_SIMT_SHUFFLES(double)
#undef FASTBN_SIMT_SHUFFLES

inline unsigned __ballot_sync(unsigned mask, int predicate, FASTBN_SIMT_SITE) {
  return static_cast<unsigned>(::fastbn::simt::detail::warp_collective(
      ::fastbn::simt::detail::WarpOp::ballot, mask, predicate != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int predicate, FASTBN_SIMT_SITE) {
  return static_cast<int>(::fastbn::simt::detail::warp_collective(::fastbn::simt::detail::WarpOp::any, mask,
                                                                  predicate != 0, 0, 32, file, line));
}
inline int __all_sync(unsigned mask, int predicate, FASTBN_SIMT_SITE) {
  return static_cast<int>(::fastbn::simt::detail::warp_collective(::fastbn::simt::detail::WarpOp::all, mask,
                                                                  predicate != 0, 0, 32, file, line));
}

#undef FASTBN_SIMT_SITE
