// One thread block of an emulated launch: its fibers, its barriers and warp collectives, its scheduler.
// Internal to the runtime (grid.cpp runs blocks; sync.h's entry points land here).
#pragma once

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "simt/fiber.h"
#include "simt/runtime.h"
#include "simt/sync.h"
#include "simt/thread_context.h"

namespace fastbn {
namespace simt {
namespace detail {

// What every block of one launch shares.
struct LaunchState {
  LaunchConfig config;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
  Schedule schedule;
  unsigned threads_per_block = 0;
  std::string kernel_name() const;  // demangled, looked up only when an error needs it
};

// Counters behind simt::stats().
void count_launch(std::uint64_t blocks, std::uint64_t threads);
void count_switches(std::uint64_t switches);

// Permutation of [0, n) for one scheduling decision; `salt` makes each decision's shuffle different.
void schedule_order(const Schedule& schedule, std::uint64_t salt, std::vector<unsigned>& out, unsigned n);

class BlockRun {
 public:
  enum class Status { finished, at_grid_barrier };

  BlockRun(const LaunchState& launch, unsigned linear_index, uint3 block_idx);
  ~BlockRun();
  BlockRun(const BlockRun&) = delete;
  BlockRun& operator=(const BlockRun&) = delete;

  // Runs the block's threads, on the calling OS thread, until all have returned or all wait at the
  // grid barrier. Rethrows (as std::runtime_error) whatever went wrong in any of them.
  Status run();
  // Lets the threads waiting at the grid barrier go on (every block of the grid has arrived).
  void release_grid_barrier();

  // Entry points of the emulated CUDA functions, called on a fiber of this block.
  int block_barrier(BarrierKind kind, int predicate, const char* file, int line);
  std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t bits, int operand, int width,
                                const char* file, int line);
  void grid_barrier(const char* file, int line);
  unsigned char* dynamic_shared() const { return dynamic_shared_; }

  std::string kernel_name() const { return launch_.kernel_name(); }

  // The block whose fiber is running on this OS thread (nullptr outside kernels).
  static BlockRun* current();

 private:
  enum class State : std::uint8_t { runnable, at_barrier, at_warp_op, at_grid_barrier, exited };
  struct Thread {
    ThreadContext ctx;
    Context fiber;
    Stack stack;
    State state = State::runnable;
    unsigned linear = 0;
    std::uint64_t operand_bits = 0;  // value offered to a shuffle, or a vote's predicate
    int operand = 0;                 // srcLane / delta / laneMask
    std::uint64_t result = 0;        // what the completed collective hands back to this thread
  };
  struct Warp {
    unsigned lanes = 0;
    unsigned at_warp_op = 0;
    unsigned at_block_level = 0;  // waiting at __syncthreads or the grid barrier
    unsigned exited = 0;
    WarpOp op = WarpOp::sync;
    int width = 32;
    const char* file = "";
    int line = 0;
  };

  static void fiber_entry();
  bool run_warp(unsigned warp);
  void resume(Thread& t);
  void suspend(Thread& t);
  void thread_exited(Thread& t);
  void complete_warp_op(Warp& warp, unsigned first);
  Thread& running();
  [[noreturn]] void fail(const std::string& what, const Thread* t = nullptr) const;
  std::string describe_waiting() const;

  const LaunchState& launch_;
  const unsigned linear_index_;
  const uint3 block_idx_;
  std::vector<Thread> threads_;
  std::vector<Warp> warps_;
  Context scheduler_;
  unsigned char* dynamic_shared_ = nullptr;
  std::exception_ptr error_;
  std::uint64_t decisions_ = 0;  // scheduling decisions taken so far: the salt of the next shuffle
  std::uint64_t switches_ = 0;

  unsigned exited_ = 0;
  // The __syncthreads being gathered.
  unsigned barrier_arrived_ = 0;
  int barrier_count_ = 0;
  BarrierKind barrier_kind_ = BarrierKind::sync;
  const char* barrier_file_ = "";
  int barrier_line_ = 0;
  std::uint64_t barrier_epoch_ = 0;  // bumped whenever a block-level barrier releases its threads
  // The grid barrier being gathered.
  unsigned grid_arrived_ = 0;
  const char* grid_file_ = "";
  int grid_line_ = 0;

  std::vector<unsigned> warp_order_;
  std::vector<unsigned> lane_order_;
};

}  // namespace detail
}  // namespace simt
}  // namespace fastbn
