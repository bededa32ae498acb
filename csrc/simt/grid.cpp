// Running a grid: ordinary launches run their blocks one after another on the calling thread;
// cooperative launches keep every block resident, one OS thread per block (so each has its own
// __shared__ variables, which are thread_local), and run them in turns between grid barriers.
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "simt/block.h"

namespace fastbn {
namespace simt {
namespace detail {

namespace {

// A cooperative grid's threads are all live fibers at once; beyond this many the emulator would need
// more fiber stacks (two memory mappings each) than a process should hold.
constexpr std::uint64_t kMaxResidentThreads = 16384;

std::string dims(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

void validate(const LaunchState& launch) {
  const LaunchConfig& c = launch.config;
  const std::string what = "fastbn simt: cannot launch " + launch.kernel_name() + " with grid " + dims(c.grid) +
                           ", block " + dims(c.block) + ", " + std::to_string(c.shared_bytes) +
                           " bytes of dynamic shared memory: ";
  if (c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.block.x == 0 || c.block.y == 0 || c.block.z == 0)
    throw std::runtime_error(what + "empty grid or block (cudaErrorInvalidConfiguration)");
  if (c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64 ||
      std::uint64_t(c.block.x) * c.block.y * c.block.z > kMaxThreadsPerBlock)
    throw std::runtime_error(what + "more than 1024 threads per block, or a block dimension past its limit "
                                    "(cudaErrorInvalidConfiguration)");
  if (c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535)
    throw std::runtime_error(what + "grid dimension past its limit (cudaErrorInvalidConfiguration)");
  if (c.shared_bytes > kMaxSharedBytesPerBlock)
    throw std::runtime_error(what + "more dynamic shared memory than a block can have (227 KiB)");
}

uint3 block_coords(std::uint64_t linear, dim3 grid) {
  return uint3{static_cast<unsigned>(linear % grid.x), static_cast<unsigned>((linear / grid.x) % grid.y),
               static_cast<unsigned>(linear / (std::uint64_t(grid.x) * grid.y))};
}

void run_blocks_in_turn(const LaunchState& launch, std::uint64_t blocks) {
  // Block order is drawn like warp order, but over 64-bit block counts only when small enough to list;
  // grids of billions of blocks are not emulated in a test anyway.
  if (blocks > 0xffffffffull) throw std::runtime_error("fastbn simt: grid too large to emulate");
  std::vector<unsigned> order;
  schedule_order(launch.schedule, 0xB10C0000ull, order, static_cast<unsigned>(blocks));
  for (unsigned b : order) {
    BlockRun block(launch, b, block_coords(b, launch.config.grid));
    block.run();  // a grid barrier is refused in an ordinary launch, so run() only returns when done
  }
}

// Every block on its own OS thread; exactly one of them runs at a time (the coordinator hands out
// turns), so a cooperative launch is as deterministic as an ordinary one.
class CooperativeGrid {
 public:
  CooperativeGrid(const LaunchState& launch, unsigned blocks) : launch_(launch), workers_(blocks) {
    for (unsigned b = 0; b < blocks; ++b)
      workers_[b].block = std::make_unique<BlockRun>(launch, b, block_coords(b, launch.config.grid));
  }

  ~CooperativeGrid() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      quit_ = true;
    }
    cv_.notify_all();
    for (Worker& w : workers_)
      if (w.thread.joinable()) w.thread.join();
  }

  void run() {
    for (unsigned b = 0; b < workers_.size(); ++b) workers_[b].thread = std::thread([this, b] { serve(b); });
    std::vector<unsigned> order;
    for (std::uint64_t phase = 0;; ++phase) {
      schedule_order(launch_.schedule, 0xC0000000ull ^ phase, order, static_cast<unsigned>(workers_.size()));
      for (unsigned b : order) {
        if (workers_[b].finished) continue;
        take_turn(b);
        if (workers_[b].error) std::rethrow_exception(workers_[b].error);
        workers_[b].finished = workers_[b].status == BlockRun::Status::finished;
      }
      unsigned finished = 0;
      for (const Worker& w : workers_) finished += w.finished;
      if (finished == workers_.size()) return;
      if (finished > 0)
        throw std::runtime_error("fastbn simt: in cooperative kernel " + launch_.kernel_name() + ", " +
                                 std::to_string(finished) + " block(s) returned while " +
                                 std::to_string(workers_.size() - finished) +
                                 " wait at the grid barrier: every block must reach every grid barrier");
      for (Worker& w : workers_) w.block->release_grid_barrier();
    }
  }

 private:
  struct Worker {
    std::unique_ptr<BlockRun> block;
    std::thread thread;
    BlockRun::Status status = BlockRun::Status::finished;
    std::exception_ptr error;
    bool finished = false;
  };

  void take_turn(unsigned b) {
    std::unique_lock<std::mutex> lock(mutex_);
    turn_ = static_cast<int>(b);
    cv_.notify_all();
    cv_.wait(lock, [this] { return turn_ < 0; });
  }

  void serve(unsigned b) {
    Worker& w = workers_[b];
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      cv_.wait(lock, [this, b] { return quit_ || turn_ == static_cast<int>(b); });
      if (quit_) return;
      lock.unlock();
      try {
        w.status = w.block->run();
      } catch (...) {
        w.error = std::current_exception();
      }
      lock.lock();
      turn_ = -1;
      cv_.notify_all();
    }
  }

  const LaunchState& launch_;
  std::vector<Worker> workers_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int turn_ = -1;
  bool quit_ = false;
};

}  // namespace
}  // namespace detail

void run_grid(const LaunchConfig& config, void (*body)(void*), void* arg) {
  using namespace detail;
  if (BlockRun::current() != nullptr)
    throw std::runtime_error("fastbn simt: a kernel launched another kernel (dynamic parallelism is not emulated)");
  LaunchState launch;
  launch.config = config;
  launch.body = body;
  launch.arg = arg;
  launch.schedule = current_schedule();
  validate(launch);
  launch.threads_per_block = config.block.x * config.block.y * config.block.z;
  const std::uint64_t blocks = std::uint64_t(config.grid.x) * config.grid.y * config.grid.z;
  count_launch(blocks, blocks * launch.threads_per_block);
  if (!config.cooperative) {
    run_blocks_in_turn(launch, blocks);
    return;
  }
  const unsigned resident = max_resident_blocks();
  if (blocks > resident || blocks * launch.threads_per_block > kMaxResidentThreads)
    throw std::runtime_error("fastbn simt: cooperative launch of " + launch.kernel_name() + " with " +
                             std::to_string(blocks) + " blocks of " + std::to_string(launch.threads_per_block) +
                             " threads: the emulator keeps at most " + std::to_string(resident) + " blocks and " +
                             std::to_string(kMaxResidentThreads) +
                             " threads resident (cudaErrorCooperativeLaunchTooLarge); size the grid with "
                             "fastbn::max_cooperative_blocks");
  CooperativeGrid grid(launch, static_cast<unsigned>(blocks));
  grid.run();
}

}  // namespace simt
}  // namespace fastbn
