// CUDA's atomic functions and memory fences on host memory.
//
// GCC's __atomic builtins give real atomicity, which matters because a cooperative launch runs its
// blocks on separate OS threads (one at a time, but still). CUDA atomics are relaxed, and so are these:
// ordering comes from __threadfence, as it must on the GPU. Every function returns the old value.
#pragma once

#include <atomic>
#include <cstring>

#include "simt/keywords.h"

namespace fastbn {
namespace simt {
namespace detail {

template <typename T, typename F>
inline T atomic_update(T* address, F f) {
  // Compare-and-swap loop on the bit pattern, for the float operations no builtin provides.
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- or 64-bit atomics only");
  using Bits = typename std::conditional<sizeof(T) == 4, unsigned int, unsigned long long>::type;
  Bits* bits_address = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(bits_address, __ATOMIC_RELAXED);
  for (;;) {
    T old_value;
    std::memcpy(&old_value, &expected, sizeof(T));
    const T new_value = f(old_value);
    Bits desired;
    std::memcpy(&desired, &new_value, sizeof(T));
    if (__atomic_compare_exchange_n(bits_address, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return old_value;
  }
}

}  // namespace detail
}  // namespace simt
}  // namespace fastbn

#define FASTBN_SIMT_INTEGER_ATOMICS(T)                                                                   \
  inline T atomicAdd(T* address, T val) { return __atomic_fetch_add(address, val, __ATOMIC_RELAXED); } \
  inline T atomicExch(T* address, T val) { return __atomic_exchange_n(address, val, __ATOMIC_RELAXED); } \
  inline T atomicCAS(T* address, T compare, T val) {                                                    \
    __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);     \
    return compare; /* holds the old value whether or not the swap happened */                          \
  }                                                                                                     \
  inline T atomicMax(T* address, T val) {                                                               \
    return ::fastbn::simt::detail::atomic_update(address, [val](T old) { return old < val ? val : old; }); \
  }                                                                                                     \
  inline T atomicMin(T* address, T val) {                                                               \
    return ::fastbn::simt::detail::atomic_update(address, [val](T old) { return val < old ? val : old; }); \
  }                                                                                                     \
  inline T atomicAnd(T* address, T val) { return __atomic_fetch_and(address, val, __ATOMIC_RELAXED); } \
  inline T atomicOr(T* address, T val) { return __atomic_fetch_or(address, val, __ATOMIC_RELAXED); }   \
  inline T atomicXor(T* address, T val) { return __atomic_fetch_xor(address, val, __ATOMIC_RELAXED); }

FASTBN_SIMT_INTEGER_ATOMICS(int)
FASTBN_SIMT_INTEGER_ATOMICS(unsigned int)
FASTBN_SIMT_INTEGER_ATOMICS(unsigned long long)
#undef FASTBN_SIMT_INTEGER_ATOMICS

// CUDA has atomicMax/atomicMin (but not Add/Exch/CAS) for signed 64-bit integers.
inline long long atomicMax(long long* address, long long val) {
  return ::fastbn::simt::detail::atomic_update(address, [val](long long old) { return old < val ? val : old; });
}
inline long long atomicMin(long long* address, long long val) {
  return ::fastbn::simt::detail::atomic_update(address, [val](long long old) { return val < old ? val : old; });
}

inline int atomicSub(int* address, int val) { return __atomic_fetch_sub(address, val, __ATOMIC_RELAXED); }
inline unsigned int atomicSub(unsigned int* address, unsigned int val) {
  return __atomic_fetch_sub(address, val, __ATOMIC_RELAXED);
}

// atomicInc/atomicDec wrap around at `val`, exactly as CUDA documents:
// inc: old >= val ? 0 : old + 1;  dec: (old == 0 || old > val) ? val : old - 1.
inline unsigned int atomicInc(unsigned int* address, unsigned int val) {
  return ::fastbn::simt::detail::atomic_update(address, [val](unsigned int old) { return old >= val ? 0u : old + 1u; });
}
inline unsigned int atomicDec(unsigned int* address, unsigned int val) {
  return ::fastbn::simt::detail::atomic_update(
      address, [val](unsigned int old) { return (old == 0u || old > val) ? val : old - 1u; });
}

inline float atomicAdd(float* address, float val) {
  return ::fastbn::simt::detail::atomic_update(address, [val](float old) { return old + val; });
}
inline double atomicAdd(double* address, double val) {
  return ::fastbn::simt::detail::atomic_update(address, [val](double old) { return old + val; });
}
inline float atomicExch(float* address, float val) {
  return ::fastbn::simt::detail::atomic_update(address, [val](float) { return val; });
}

// All fences are full fences on the host; the emulator never runs two emulated threads at once, so
// they only have to keep the compiler from moving memory accesses across them.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
