// The platform layer of csrc/cuda: the one place that knows whether the kernels are being compiled by
// nvcc for a GPU or by the host compiler for the SIMT emulator (FASTBN_SIMT, csrc/simt/).
//
// Every kernel launch in csrc/cuda goes through fastbn::launch or fastbn::launch_cooperative instead of
// <<<...>>>, with the current stream, under a device guard; each launch is checked:
//
//   const fastbn::DeviceGuard guard(input);
//   fastbn::launch(my_kernel<scalar_t, kRelu>, grid, block, shared_bytes, fastbn::current_stream(),
//                  x_ptr, y_ptr, n);
//
// Kernel code itself does not test FASTBN_SIMT: it uses threadIdx & co., __syncthreads, the *_sync
// warp intrinsics with full masks, atomics, c10::Half / c10::BFloat16 and plain structs (not float4 or
// __half), fastbn::dynamic_shared<T>() instead of `extern __shared__`, and fastbn::grid_sync() in
// cooperative kernels.
#pragma once

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#ifdef FASTBN_SIMT

#include "simt/simt.h"

namespace fastbn {

using Stream = cudaStream_t;

// The emulator runs every launch to completion on the calling thread: there is no stream to pick.
inline Stream current_stream() { return nullptr; }

// Nothing to guard: emulated kernels run on CPU tensors.
class DeviceGuard {
 public:
  template <typename TensorLike>
  explicit DeviceGuard(const TensorLike&) {}
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes, Stream /*stream*/,
            Args&&... args) {
  simt::LaunchConfig config;
  config.grid = grid;
  config.block = block;
  config.shared_bytes = shared_bytes;
  simt::launch_kernel(kernel, config, std::forward<Args>(args)...);
}

// All blocks resident at once, so the kernel may call fastbn::grid_sync(). The grid must not have more
// blocks than max_cooperative_blocks() allows.
template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
                        Stream /*stream*/, Args&&... args) {
  simt::LaunchConfig config;
  config.grid = grid;
  config.block = block;
  config.shared_bytes = shared_bytes;
  config.cooperative = true;
  simt::launch_kernel(kernel, config, std::forward<Args>(args)...);
}

// How many blocks of `kernel` a cooperative launch may have.
template <typename... Params>
unsigned max_cooperative_blocks(void (*)(Params...), int /*block_threads*/, std::size_t /*shared_bytes*/) {
  return simt::max_resident_blocks();
}

// This block's dynamic shared memory (the launch's shared_bytes), 16-byte aligned.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  return reinterpret_cast<T*>(simt::detail::dynamic_shared_memory());
}

// Barrier across every thread of a cooperative launch; memory written before it is visible after it.
__device__ __forceinline__ void grid_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::detail::grid_barrier(file, line);
}

// Adds to the emulator's count of bytes loaded from and stored to global memory (simt::stats()), which the tests
// compare with the traffic the kernels' comments state.
__device__ __forceinline__ void count_traffic(std::size_t loaded, std::size_t stored) {
  simt::detail::count_traffic(loaded, stored);
}

}  // namespace fastbn

#else  // nvcc

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace fastbn {

using Stream = cudaStream_t;

// The current stream of the current device (set the device first, with a DeviceGuard).
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Makes the tensor's device current for the scope (allocations, the current stream, launches).
class DeviceGuard {
 public:
  template <typename TensorLike>
  explicit DeviceGuard(const TensorLike& tensor) : guard_(tensor.device()) {}

 private:
  c10::cuda::CUDAGuard guard_;
};

namespace detail {
// Above 48 KiB of dynamic shared memory a kernel must opt in, once per kernel and size.
template <typename Kernel>
void allow_shared_bytes(Kernel kernel, std::size_t shared_bytes) {
  if (shared_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
}
}  // namespace detail

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes, Stream stream,
            Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  detail::allow_shared_bytes(kernel, shared_bytes);
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename... Params, typename... Args>
void launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes,
                        Stream stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  detail::allow_shared_bytes(kernel, shared_bytes);
  // cudaLaunchCooperativeKernel takes the address of each argument, already of the parameter's type.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  std::apply(
      [&](auto&... p) {
        void* pointers[] = {static_cast<void*>(&p)..., nullptr};
        C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, pointers,
                                                   shared_bytes, stream));
      },
      params);
}

template <typename... Params>
unsigned max_cooperative_blocks(void (*kernel)(Params...), int block_threads, std::size_t shared_bytes) {
  detail::allow_shared_bytes(kernel, shared_bytes);
  int device = c10::cuda::current_device();
  int sms = 0;
  int per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, reinterpret_cast<const void*>(kernel),
                                                               block_threads, shared_bytes));
  return static_cast<unsigned>(sms * per_sm);
}

template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char fastbn_dynamic_shared[];
  return reinterpret_cast<T*>(fastbn_dynamic_shared);
}

__device__ __forceinline__ void grid_sync() { cooperative_groups::this_grid().sync(); }

// Counted by the emulator only.
__device__ __forceinline__ void count_traffic(std::size_t, std::size_t) {}

}  // namespace fastbn

#endif  // FASTBN_SIMT
