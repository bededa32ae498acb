// threadIdx / blockIdx / blockDim / gridDim for the emulated thread that is running right now.
//
// The scheduler points tl_thread at the running fiber's context before every switch into it. The fibers
// of one block never leave their OS thread, so an OS-thread-local pointer is always the current CUDA
// thread's. `__thread` (not C++ thread_local) keeps the access a plain TLS load without init guards.
#pragma once

#include "simt/keywords.h"

namespace fastbn {
namespace simt {

struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* dynamic_shared;  // this block's dynamic shared memory (nullptr when none was asked for)
};

namespace detail {
extern __thread const ThreadContext* tl_thread;
[[noreturn]] void outside_kernel(const char* what);
}  // namespace detail

inline const ThreadContext& this_thread(const char* what) {
  const ThreadContext* t = detail::tl_thread;
  if (__builtin_expect(t == nullptr, 0)) detail::outside_kernel(what);
  return *t;
}

}  // namespace simt
}  // namespace fastbn

// Macros because CUDA spells them as variables; each reads the current fiber's context.
#define threadIdx (::fastbn::simt::this_thread("threadIdx").thread_idx)
#define blockIdx (::fastbn::simt::this_thread("blockIdx").block_idx)
#define blockDim (::fastbn::simt::this_thread("blockDim").block_dim)
#define gridDim (::fastbn::simt::this_thread("gridDim").grid_dim)
