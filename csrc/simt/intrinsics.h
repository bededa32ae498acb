// CUDA math, bit and load intrinsics used by the kernels, as host functions.
//
// The fast-math intrinsics (__fdividef, __expf, ...) are computed exactly here: the emulator checks the
// algorithm, not the last ulp of the GPU's approximations, and tests compare with tolerances anyway.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <math.h>

#include "simt/keywords.h"

// glibc 2.42 declares C23's rsqrtf/rsqrt itself; older ones need them defined.
#if defined(__GLIBC__) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 42)
#define FASTBN_SIMT_LIBC_HAS_RSQRT 1
#endif
#endif
#ifndef FASTBN_SIMT_LIBC_HAS_RSQRT
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
#endif

inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline double __dsqrt_rn(double x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __ddiv_rn(double x, double y) { return x / y; }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x == x ? x : 0.0f)); }

// CUDA's global max/min overloads (the same-type ones; int64_t is `long` here).
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned int max(unsigned int a, unsigned int b) { return a < b ? b : a; }
inline long max(long a, long b) { return a < b ? b : a; }
inline unsigned long max(unsigned long a, unsigned long b) { return a < b ? b : a; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a < b ? b : a; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline int min(int a, int b) { return b < a ? b : a; }
inline unsigned int min(unsigned int a, unsigned int b) { return b < a ? b : a; }
inline long min(long a, long b) { return b < a ? b : a; }
inline unsigned long min(unsigned long a, unsigned long b) { return b < a ? b : a; }
inline long long min(long long a, long long b) { return b < a ? b : a; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return b < a ? b : a; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }

namespace fastbn {
namespace simt {
namespace detail {
template <typename To, typename From>
inline To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
// Loads through memcpy, so that a kernel reading a float array as 32-bit words (as __ldcg on words
// does in fastbn::load_coherent) is no strict-aliasing violation for the host compiler.
template <typename T>
inline T load(const T* p) {
  static_assert(std::is_arithmetic<T>::value, "CUDA's cache-hinted loads take built-in types");
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void store(T* p, T v) {
  static_assert(std::is_arithmetic<T>::value, "CUDA's cache-hinted stores take built-in types");
  std::memcpy(p, &v, sizeof(T));
}
}  // namespace detail
}  // namespace simt
}  // namespace fastbn

inline int __float_as_int(float x) { return ::fastbn::simt::detail::bit_cast<int>(x); }
inline unsigned int __float_as_uint(float x) { return ::fastbn::simt::detail::bit_cast<unsigned int>(x); }
inline float __int_as_float(int x) { return ::fastbn::simt::detail::bit_cast<float>(x); }
inline float __uint_as_float(unsigned int x) { return ::fastbn::simt::detail::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return ::fastbn::simt::detail::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return ::fastbn::simt::detail::bit_cast<double>(x); }

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  unsigned int r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// Cache-hinted loads and stores: plain memory accesses on the host.
template <typename T>
inline T __ldg(const T* p) { return ::fastbn::simt::detail::load(p); }
template <typename T>
inline T __ldcg(const T* p) { return ::fastbn::simt::detail::load(p); }
template <typename T>
inline T __ldca(const T* p) { return ::fastbn::simt::detail::load(p); }
template <typename T>
inline T __ldcs(const T* p) { return ::fastbn::simt::detail::load(p); }
template <typename T>
inline T __ldlu(const T* p) { return ::fastbn::simt::detail::load(p); }
template <typename T>
inline void __stcg(T* p, T v) { ::fastbn::simt::detail::store(p, v); }
template <typename T>
inline void __stcs(T* p, T v) { ::fastbn::simt::detail::store(p, v); }
template <typename T>
inline void __stwt(T* p, T v) { ::fastbn::simt::detail::store(p, v); }
