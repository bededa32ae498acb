#include "simt/fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FASTBN_SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTBN_SIMT_ASAN 1
#endif
#endif

#ifdef FASTBN_SIMT_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace fastbn {
namespace simt {
namespace detail {
namespace {

std::size_t page_size() {
  static const std::size_t size = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return size;
}

std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
#ifdef FASTBN_SIMT_ASAN
    std::size_t kib = 512;  // ASan's redzones make every frame several times larger
#else
    std::size_t kib = 64;
#endif
    if (const char* env = std::getenv("FASTBN_SIMT_STACK_KB")) kib = std::strtoull(env, nullptr, 10);
    if (kib < 16) kib = 16;
    const std::size_t page = page_size();
    return (kib * 1024 + page - 1) / page * page;
  }();
  return bytes;
}

struct StackPool {
  std::mutex mutex;
  std::vector<Stack> free;
};

StackPool& pool() {
  static StackPool* p = new StackPool();  // never destroyed: fibers may outlive static destruction order
  return *p;
}

}  // namespace

Stack acquire_stack() {
  {
    StackPool& p = pool();
    std::lock_guard<std::mutex> lock(p.mutex);
    if (!p.free.empty()) {
      Stack s = p.free.back();
      p.free.pop_back();
      return s;
    }
  }
  const std::size_t page = page_size();
  const std::size_t size = stack_bytes();
  void* mem = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED)
    throw std::runtime_error("fastbn simt: cannot map a " + std::to_string(size) + "-byte fiber stack");
  if (mprotect(mem, page, PROT_NONE) != 0) {
    munmap(mem, size + page);
    throw std::runtime_error("fastbn simt: cannot protect a fiber stack's guard page");
  }
  return Stack{static_cast<char*>(mem) + page, size};
}

void release_stack(Stack stack) {
#ifdef FASTBN_SIMT_ASAN
  // A fiber abandoned after an error (or one that finished) leaves poisoned redzones behind.
  __asan_unpoison_memory_region(stack.base, stack.size);
#endif
  StackPool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  p.free.push_back(stack);
}

void Context::prepare(Stack stack, void (*entry)()) {
  if (getcontext(&uc_) != 0) throw std::runtime_error("fastbn simt: getcontext failed");
  uc_.uc_stack.ss_sp = stack.base;
  uc_.uc_stack.ss_size = stack.size;
  uc_.uc_link = nullptr;  // fibers never return from their entry function: they switch away for good
  makecontext(&uc_, entry, 0);
  stack_bottom_ = stack.base;
  stack_size_ = stack.size;
  fake_stack_ = nullptr;
}

void Context::entered_from(Context& scheduler) {
#ifdef FASTBN_SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &scheduler.stack_bottom_, &scheduler.stack_size_);
#else
  (void)scheduler;
#endif
}

void Context::switch_to(Context& from, Context& to, bool from_finished) {
#ifdef FASTBN_SIMT_ASAN
  __sanitizer_start_switch_fiber(from_finished ? nullptr : &from.fake_stack_, to.stack_bottom_, to.stack_size_);
#else
  (void)from_finished;
#endif
  // swapcontext also saves and restores the signal mask (a system call each way); a hand-written
  // register switch would be faster, but this is portable and fast enough for test-sized grids.
  if (swapcontext(&from.uc_, &to.uc_) != 0) std::abort();
#ifdef FASTBN_SIMT_ASAN
  __sanitizer_finish_switch_fiber(from.fake_stack_, nullptr, nullptr);
#endif
}

}  // namespace detail
}  // namespace simt
}  // namespace fastbn
