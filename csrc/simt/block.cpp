// Scheduling one block: every CUDA thread is a fiber; every barrier, warp collective and grid barrier
// is a point where the fiber yields to this scheduler.
//
// The scheduler runs warp by warp: it picks a warp (in the schedule's order), runs its lanes (in the
// schedule's order) until each is blocked, completes warp collectives as their last lane arrives and
// keeps going with that warp until all its lanes wait at a block-level barrier or have exited; then the
// next warp. So warps drift apart as far as the block barriers let them, which is what exposes a
// missing __syncthreads; lanes within a warp only meet at collectives, which exposes a missing
// __syncwarp. After every block barrier the order is taken afresh.
#include "simt/block.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FASTBN_SIMT_ASAN_REPORTS 1
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace fastbn {
namespace simt {
namespace detail {

__thread const ThreadContext* tl_thread = nullptr;

namespace {
__thread BlockRun* tl_block = nullptr;
__thread void* tl_emulated = nullptr;  // the running BlockRun::Thread

constexpr unsigned kFullMask = 0xffffffffu;

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::sync: return "__syncwarp";
    case WarpOp::shfl_idx: return "__shfl_sync";
    case WarpOp::shfl_up: return "__shfl_up_sync";
    case WarpOp::shfl_down: return "__shfl_down_sync";
    case WarpOp::shfl_xor: return "__shfl_xor_sync";
    case WarpOp::ballot: return "__ballot_sync";
    case WarpOp::any: return "__any_sync";
    case WarpOp::all: return "__all_sync";
  }
  return "?";
}

const char* barrier_name(BarrierKind kind) {
  switch (kind) {
    case BarrierKind::sync: return "__syncthreads";
    case BarrierKind::count: return "__syncthreads_count";
    case BarrierKind::and_: return "__syncthreads_and";
    case BarrierKind::or_: return "__syncthreads_or";
  }
  return "?";
}

bool is_shuffle(WarpOp op) {
  return op == WarpOp::shfl_idx || op == WarpOp::shfl_up || op == WarpOp::shfl_down || op == WarpOp::shfl_xor;
}

std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

std::string coords(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

// Source lane of a shuffle, following the PTX ISA's definition of shfl.sync, which is what the CUDA
// intrinsics compile to: width w becomes the segment mask 32-w, only the low 5 bits of the lane /
// offset operand count, and a source outside the lane's segment (or past the clamp) means "keep your
// own value".
unsigned shuffle_source(WarpOp op, unsigned lane, int operand, int width) {
  const unsigned b = static_cast<unsigned>(operand) & 31u;
  const unsigned segmask = static_cast<unsigned>(32 - width) & 31u;
  const unsigned min_lane = lane & segmask;
  const unsigned clamp = op == WarpOp::shfl_up ? 0u : 31u;
  const int max_lane = static_cast<int>((lane & segmask) | (clamp & ~segmask));
  int j = static_cast<int>(lane);
  bool in_range = false;
  switch (op) {
    case WarpOp::shfl_up:
      j = static_cast<int>(lane) - static_cast<int>(b);
      in_range = j >= max_lane;
      break;
    case WarpOp::shfl_down:
      j = static_cast<int>(lane + b);
      in_range = j <= max_lane;
      break;
    case WarpOp::shfl_xor:
      j = static_cast<int>(lane ^ b);
      in_range = j <= max_lane;
      break;
    case WarpOp::shfl_idx:
      j = static_cast<int>(min_lane | (b & ~segmask));
      in_range = j <= max_lane;
      break;
    default:
      break;
  }
  return in_range ? static_cast<unsigned>(j) : lane;
}

#ifdef FASTBN_SIMT_ASAN_REPORTS
// ASan reports name host threads; this adds which emulated CUDA thread made the bad access.
void report_emulated_thread() {
  const ThreadContext* t = tl_thread;
  BlockRun* block = tl_block;
  if (t == nullptr || block == nullptr) return;
  std::fprintf(stderr, "fastbn simt: the access above was made by kernel %s, block %s, thread %s\n",
               block->kernel_name().c_str(), coords(t->block_idx).c_str(), coords(t->thread_idx).c_str());
}
#endif

}  // namespace

[[noreturn]] void outside_kernel(const char* what) {
  throw std::runtime_error(std::string("fastbn simt: ") + what +
                           " used outside a kernel (only emulated threads of a launch have one)");
}

BlockRun* BlockRun::current() { return tl_block; }

BlockRun::Thread& BlockRun::running() { return *static_cast<Thread*>(tl_emulated); }

BlockRun::BlockRun(const LaunchState& launch, unsigned linear_index, uint3 block_idx)
    : launch_(launch), linear_index_(linear_index), block_idx_(block_idx) {
#ifdef FASTBN_SIMT_ASAN_REPORTS
  static const bool registered = (__sanitizer_set_death_callback(&report_emulated_thread), true);
  (void)registered;
#endif
  const dim3 bd = launch.config.block;
  const unsigned n = launch.threads_per_block;
  const std::size_t shared = launch.config.shared_bytes;
  if (shared > 0) {
    // Exactly the requested size, so AddressSanitizer builds catch overruns of dynamic shared memory.
    dynamic_shared_ = static_cast<unsigned char*>(std::malloc(shared));
    if (dynamic_shared_ == nullptr) throw std::bad_alloc();
    // Shared memory starts out as garbage on the GPU. Make it garbage here too, and different garbage
    // under each schedule, so that reading before writing shows in the results.
    const Schedule& s = launch.schedule;
    if (s.order == Order::shuffle) {
      std::uint64_t x = s.seed ^ (0x9E3779B97F4A7C15ull * (linear_index + 1));
      for (std::size_t i = 0; i < shared; ++i) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;  // Knuth's MMIX LCG
        dynamic_shared_[i] = static_cast<unsigned char>(x >> 56);
      }
    } else {
      std::memset(dynamic_shared_, s.order == Order::forward ? 0xFF : 0x7F, shared);
    }
  }
  threads_.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = threads_[i];
    t.linear = i;
    t.ctx.thread_idx = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    t.ctx.block_idx = block_idx;
    t.ctx.block_dim = bd;
    t.ctx.grid_dim = launch.config.grid;
    t.ctx.dynamic_shared = dynamic_shared_;
  }
  warps_.resize((n + 31) / 32);
  for (unsigned w = 0; w < warps_.size(); ++w) warps_[w].lanes = std::min(32u, n - 32 * w);
  // Stacks last: if a mapping fails, the destructor returns the ones already taken.
  for (Thread& t : threads_) {
    t.stack = acquire_stack();
    t.fiber.prepare(t.stack, &BlockRun::fiber_entry);
  }
}

BlockRun::~BlockRun() {
  count_switches(switches_);
  for (Thread& t : threads_)
    if (t.stack.base != nullptr) release_stack(t.stack);
  std::free(dynamic_shared_);
}

void BlockRun::fiber_entry() {
  BlockRun* block = tl_block;
  Thread& t = block->running();
  t.fiber.entered_from(block->scheduler_);
  try {
    block->launch_.body(block->launch_.arg);
    block->thread_exited(t);
  } catch (...) {
    if (!block->error_) block->error_ = std::current_exception();
  }
  t.state = State::exited;
  Context::switch_to(t.fiber, block->scheduler_, /*from_finished=*/true);
  std::abort();  // a finished fiber is never resumed
}

void BlockRun::resume(Thread& t) {
  tl_block = this;
  tl_emulated = &t;
  tl_thread = &t.ctx;
  ++switches_;
  Context::switch_to(scheduler_, t.fiber);
  tl_thread = nullptr;
  tl_emulated = nullptr;
  tl_block = nullptr;
}

void BlockRun::suspend(Thread& t) { Context::switch_to(t.fiber, scheduler_); }

BlockRun::Status BlockRun::run() {
  const unsigned n = launch_.threads_per_block;
  for (;;) {
    const std::uint64_t epoch = barrier_epoch_;
    bool progress = false;
    schedule_order(launch_.schedule, (std::uint64_t(linear_index_) << 32) ^ decisions_++, warp_order_,
                   static_cast<unsigned>(warps_.size()));
    for (unsigned w : warp_order_) {
      progress |= run_warp(w);
      if (error_) break;
      if (barrier_epoch_ != epoch) break;  // a barrier released everybody: start over in order
    }
    if (error_) {
      std::exception_ptr e = error_;
      std::rethrow_exception(e);
    }
    if (exited_ == n) return Status::finished;
    if (!progress) {
      if (grid_arrived_ > 0 && grid_arrived_ == n) return Status::at_grid_barrier;
      fail("deadlock: no thread can go on; " + describe_waiting());
    }
  }
}

bool BlockRun::run_warp(unsigned w) {
  const std::uint64_t epoch = barrier_epoch_;
  const unsigned first = 32 * w;
  const unsigned lanes = warps_[w].lanes;
  bool ran = false;
  for (;;) {
    bool any = false;
    schedule_order(launch_.schedule, (std::uint64_t(linear_index_) << 32) ^ decisions_++, lane_order_, lanes);
    for (unsigned l : lane_order_) {
      Thread& t = threads_[first + l];
      if (t.state != State::runnable) continue;
      any = ran = true;
      resume(t);
      if (error_ || barrier_epoch_ != epoch) return true;
    }
    if (!any) return ran;
  }
}

void BlockRun::release_grid_barrier() {
  for (Thread& t : threads_)
    if (t.state == State::at_grid_barrier) t.state = State::runnable;
  for (Warp& w : warps_) w.at_block_level = 0;
  grid_arrived_ = 0;
  ++barrier_epoch_;
}

int BlockRun::block_barrier(BarrierKind kind, int predicate, const char* file, int line) {
  Thread& t = running();
  Warp& warp = warps_[t.linear / 32];
  if (exited_ > 0)
    fail(std::string(barrier_name(kind)) + " at " + site(file, line) + " reached after " + std::to_string(exited_) +
             " thread(s) of the block returned: every thread must reach every barrier (a GPU hangs or "
             "silently miscounts)",
         &t);
  if (warp.at_warp_op > 0)
    fail(std::string(barrier_name(kind)) + " at " + site(file, line) + " while lanes of the same warp wait at " +
             op_name(warp.op) + " (" + site(warp.file, warp.line) + "): divergent warp",
         &t);
  if (grid_arrived_ > 0)
    fail(std::string(barrier_name(kind)) + " at " + site(file, line) + " while other threads wait at the grid barrier (" +
             site(grid_file_, grid_line_) + ")",
         &t);
  if (barrier_arrived_ == 0) {
    barrier_kind_ = kind;
    barrier_file_ = file;
    barrier_line_ = line;
    barrier_count_ = 0;
  } else if (kind != barrier_kind_ || line != barrier_line_ || std::strcmp(file, barrier_file_) != 0) {
    fail("divergent barriers: this thread reached " + std::string(barrier_name(kind)) + " at " + site(file, line) +
             " while " + std::to_string(barrier_arrived_) + " thread(s) wait at " + barrier_name(barrier_kind_) +
             " at " + site(barrier_file_, barrier_line_),
         &t);
  }
  barrier_count_ += predicate != 0;
  ++barrier_arrived_;
  ++warp.at_block_level;
  t.state = State::at_barrier;
  if (barrier_arrived_ == launch_.threads_per_block) {
    const unsigned n = launch_.threads_per_block;
    int result = 0;
    switch (kind) {
      case BarrierKind::sync: result = 0; break;
      case BarrierKind::count: result = barrier_count_; break;
      case BarrierKind::and_: result = barrier_count_ == static_cast<int>(n); break;
      case BarrierKind::or_: result = barrier_count_ > 0; break;
    }
    for (Thread& other : threads_) {
      other.result = static_cast<std::uint64_t>(result);
      other.state = State::runnable;
    }
    for (Warp& w : warps_) w.at_block_level = 0;
    barrier_arrived_ = 0;
    ++barrier_epoch_;
  }
  suspend(t);
  return static_cast<int>(t.result);
}

std::uint64_t BlockRun::warp_collective(WarpOp op, unsigned mask, std::uint64_t bits, int operand, int width,
                                        const char* file, int line) {
  Thread& t = running();
  const unsigned w = t.linear / 32;
  Warp& warp = warps_[w];
  const std::string here = std::string(op_name(op)) + " at " + site(file, line);
  if (mask != kFullMask) {
    char hex[16];
    std::snprintf(hex, sizeof(hex), "0x%08x", mask);
    fail(here + " with mask " + hex + ": the emulator runs full-mask (0xffffffff) warp operations only", &t);
  }
  if (is_shuffle(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0))
    fail(here + " with width " + std::to_string(width) + ": width must be a power of two in [1, 32]", &t);
  if (warp.exited > 0)
    fail(here + " with a full mask, but " + std::to_string(warp.exited) + " lane(s) of this warp have returned", &t);
  if (warp.at_block_level > 0)
    fail(here + " while other lanes of this warp wait at a block or grid barrier: divergent warp", &t);
  if (warp.at_warp_op == 0) {
    warp.op = op;
    warp.width = width;
    warp.file = file;
    warp.line = line;
  } else if (op != warp.op || width != warp.width) {
    fail(here + " (width " + std::to_string(width) + ") while other lanes of this warp wait at " + op_name(warp.op) +
             " at " + site(warp.file, warp.line) + " (width " + std::to_string(warp.width) + "): divergent warp",
         &t);
  }
  t.operand_bits = bits;
  t.operand = operand;
  t.state = State::at_warp_op;
  if (++warp.at_warp_op == warp.lanes) complete_warp_op(warp, 32 * w);
  suspend(t);
  return t.result;
}

void BlockRun::complete_warp_op(Warp& warp, unsigned first) {
  Thread* lane = &threads_[first];
  switch (warp.op) {
    case WarpOp::sync:
      break;
    case WarpOp::ballot:
    case WarpOp::any:
    case WarpOp::all: {
      std::uint64_t ballot = 0;
      for (unsigned l = 0; l < warp.lanes; ++l) ballot |= (lane[l].operand_bits != 0 ? 1ull : 0ull) << l;
      const std::uint64_t everyone = warp.lanes == 32 ? 0xffffffffull : ((1ull << warp.lanes) - 1);
      const std::uint64_t r = warp.op == WarpOp::ballot ? ballot
                              : warp.op == WarpOp::any  ? (ballot != 0)
                                                        : (ballot == everyone);
      for (unsigned l = 0; l < warp.lanes; ++l) lane[l].result = r;
      break;
    }
    default:
      for (unsigned l = 0; l < warp.lanes; ++l) {
        const unsigned src = shuffle_source(warp.op, l, lane[l].operand, warp.width);
        if (src >= warp.lanes)
          fail(std::string(op_name(warp.op)) + " at " + site(warp.file, warp.line) + ": lane " + std::to_string(l) +
                   " reads lane " + std::to_string(src) + ", which does not exist (this warp has only " +
                   std::to_string(warp.lanes) + " threads)",
               &lane[l]);
        lane[l].result = lane[src].operand_bits;
      }
      break;
  }
  for (unsigned l = 0; l < warp.lanes; ++l) lane[l].state = State::runnable;
  warp.at_warp_op = 0;
}

void BlockRun::grid_barrier(const char* file, int line) {
  Thread& t = running();
  Warp& warp = warps_[t.linear / 32];
  const std::string here = "grid barrier at " + site(file, line);
  if (!launch_.config.cooperative)
    fail(here + " in a kernel not launched with fastbn::launch_cooperative (blocks of an ordinary launch are "
                "not all resident: on a GPU this hangs)",
         &t);
  if (exited_ > 0)
    fail(here + " reached after " + std::to_string(exited_) + " thread(s) of the block returned", &t);
  if (warp.at_warp_op > 0)
    fail(here + " while lanes of the same warp wait at " + op_name(warp.op) + ": divergent warp", &t);
  if (barrier_arrived_ > 0)
    fail(here + " while other threads of the block wait at " + barrier_name(barrier_kind_) + " at " +
             site(barrier_file_, barrier_line_),
         &t);
  grid_file_ = file;
  grid_line_ = line;
  ++grid_arrived_;
  ++warp.at_block_level;
  t.state = State::at_grid_barrier;
  suspend(t);
}

void BlockRun::thread_exited(Thread& t) {
  Warp& warp = warps_[t.linear / 32];
  ++exited_;
  ++warp.exited;
  if (barrier_arrived_ > 0)
    fail("thread returned while " + std::to_string(barrier_arrived_) + " thread(s) of its block wait at " +
             barrier_name(barrier_kind_) + " at " + site(barrier_file_, barrier_line_),
         &t);
  if (warp.at_warp_op > 0)
    fail("thread returned while lanes of its warp wait at " + std::string(op_name(warp.op)) + " at " +
             site(warp.file, warp.line),
         &t);
  if (grid_arrived_ > 0)
    fail("thread returned while " + std::to_string(grid_arrived_) + " thread(s) of its block wait at the grid barrier at " +
             site(grid_file_, grid_line_),
         &t);
}

std::string BlockRun::describe_waiting() const {
  std::ostringstream out;
  unsigned counts[5] = {0, 0, 0, 0, 0};
  for (const Thread& t : threads_) ++counts[static_cast<int>(t.state)];
  out << counts[1] << " at " << barrier_name(barrier_kind_) << " (" << site(barrier_file_, barrier_line_) << "), "
      << counts[2] << " at warp operations, " << counts[3] << " at the grid barrier, " << counts[4] << " returned";
  return out.str();
}

void BlockRun::fail(const std::string& what, const Thread* t) const {
  std::string msg = "fastbn simt: " + what + " [kernel " + launch_.kernel_name() + ", block " + coords(block_idx_);
  if (t != nullptr) msg += ", thread " + coords(t->ctx.thread_idx) + " (warp " + std::to_string(t->linear / 32) +
                           ", lane " + std::to_string(t->linear % 32) + ")";
  throw std::runtime_error(msg + "]");
}

// Entry points of sync.h.
namespace {
BlockRun& block_or_die(const char* what) {
  BlockRun* b = BlockRun::current();
  if (b == nullptr) outside_kernel(what);
  return *b;
}
}  // namespace

int block_barrier(BarrierKind kind, int predicate, const char* file, int line) {
  return block_or_die(barrier_name(kind)).block_barrier(kind, predicate, file, line);
}

std::uint64_t warp_collective(WarpOp op, unsigned mask, std::uint64_t bits, int operand, int width, const char* file,
                              int line) {
  return block_or_die(op_name(op)).warp_collective(op, mask, bits, operand, width, file, line);
}

void grid_barrier(const char* file, int line) { block_or_die("the grid barrier").grid_barrier(file, line); }

unsigned char* dynamic_shared_memory() { return block_or_die("dynamic shared memory").dynamic_shared(); }

}  // namespace detail
}  // namespace simt
}  // namespace fastbn
