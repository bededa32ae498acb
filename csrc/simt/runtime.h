// Host side of the emulator: running a grid, choosing the schedule, limits and counters.
//
// csrc/cuda code never calls this directly; fastbn::launch / fastbn::launch_cooperative
// (csrc/cuda/launch.cuh) do. Tests reach set_schedule() and stats() through ops of their extension.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "simt/keywords.h"

namespace fastbn {
namespace simt {

// The order in which the emulator starts blocks, warps within a block, and lanes within a warp.
// Every block barrier, warp collective and grid barrier is a switch point, and after each one the
// order is applied afresh (for `shuffle`, with a new permutation drawn from the seed), so a kernel
// whose result depends on which thread gets there first gives different bits under different orders.
enum class Order : int { forward, reverse, shuffle };

struct Schedule {
  Order order = Order::forward;
  std::uint64_t seed = 0;
};

// "forward", "reverse", "shuffle" or "shuffle:SEED"; throws std::invalid_argument on anything else.
Schedule parse_schedule(const std::string& text);
std::string to_string(const Schedule& schedule);

// The schedule of the following launches. The initial one comes from the environment variable
// FASTBN_SIMT_SCHEDULE (same syntax), else forward.
void set_schedule(const Schedule& schedule);
Schedule current_schedule();

// How many blocks a cooperative launch may have (they must all be resident at once; every thread of
// every block is then a live fiber). FASTBN_SIMT_RESIDENT_BLOCKS sets the initial value, else 16.
unsigned max_resident_blocks();
void set_max_resident_blocks(unsigned blocks);

// The device limits the emulator enforces, as an sm_80/sm_90 GPU does.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr std::size_t kMaxSharedBytesPerBlock = 227 * 1024;

struct Stats {
  std::uint64_t launches = 0;  // grids run
  std::uint64_t blocks = 0;
  std::uint64_t threads = 0;
  std::uint64_t switches = 0;  // fiber switches: how much synchronisation the kernels did
  std::uint64_t bytes_loaded = 0;  // global memory traffic the kernels counted (fastbn::count_traffic)
  std::uint64_t bytes_stored = 0;
};
Stats stats();
void reset_stats();

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  std::size_t shared_bytes = 0;
  bool cooperative = false;
  const void* kernel = nullptr;  // only used to name the kernel in error messages
};

// Runs body(arg) once per emulated thread of the grid and returns when all have finished. Throws
// std::runtime_error (with the kernel, block and thread named) on an invalid configuration or on
// anything the emulator catches: divergent or deadlocked barriers, partial masks, a grid barrier
// outside a cooperative launch, an exception escaping the kernel.
void run_grid(const LaunchConfig& config, void (*body)(void*), void* arg);

namespace detail {
void count_traffic(std::uint64_t loaded, std::uint64_t stored);

template <typename Kernel, typename Params>
struct KernelCall {
  Kernel kernel;
  Params params;
  static void run(void* self) {
    auto* call = static_cast<KernelCall*>(self);
    // Each emulated thread gets its own copy of the parameters, as CUDA threads do.
    Params copy = call->params;
    std::apply(call->kernel, std::move(copy));
  }
};
}  // namespace detail

// Converts the arguments to the kernel's parameter types once (as a CUDA launch does), then runs the
// grid. `kernel` is a plain function: __global__ expands to nothing here.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "wrong number of kernel arguments");
  using Tuple = std::tuple<std::decay_t<Params>...>;
  detail::KernelCall<void (*)(Params...), Tuple> call{kernel, Tuple(std::forward<Args>(args)...)};
  LaunchConfig named = config;
  named.kernel = reinterpret_cast<const void*>(kernel);
  run_grid(named, &decltype(call)::run, &call);
}

}  // namespace simt
}  // namespace fastbn
