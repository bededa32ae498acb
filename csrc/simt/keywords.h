// CUDA's declaration qualifiers and built-in vector types, for csrc/cuda sources compiled by the host
// C++ compiler with FASTBN_SIMT defined. Only what the kernels need: no cuda_runtime.h is ever included
// on this side, so nothing here can clash with the real one.
#pragma once

#ifndef FASTBN_SIMT
#error "csrc/simt emulates CUDA on the host; it is only for builds with FASTBN_SIMT defined"
#endif
#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "csrc/simt must not be compiled by a CUDA compiler: under nvcc, csrc/cuda uses the real runtime"
#endif

// Every function is an ordinary host function; kernels are called once per emulated thread.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is already a GCC/Clang keyword.

// Shared memory is per block. A block's threads are fibers on one OS thread, and blocks that must be
// resident together (cooperative launches) each get their own OS thread, so thread-local storage is
// exactly "one copy per resident block". This also means `extern __shared__ T x[];` cannot be written:
// use fastbn::dynamic_shared<T>() (csrc/cuda/launch.cuh) for dynamic shared memory on both sides.
#define __shared__ static thread_local

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// Streams do not exist in the emulator (every launch runs to completion before it returns); the type
// exists so that host code passes a stream the same way on both sides.
struct CUstream_st;
using cudaStream_t = CUstream_st*;

constexpr int warpSize = 32;
