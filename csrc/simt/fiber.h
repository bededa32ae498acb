// Fibers: an execution context per emulated CUDA thread, switched with ucontext.
//
// Stacks are small (64 KiB by default, FASTBN_SIMT_STACK_KB to change), sit above a PROT_NONE guard
// page so that an overflow faults at once, and are pooled across launches: a kernel with 1024-thread
// blocks does not mmap 1024 stacks per block. Under AddressSanitizer every switch is announced with
// __sanitizer_start/finish_switch_fiber, without which ASan would take a fiber's stack for a wild one.
#pragma once

#include <ucontext.h>

#include <cstddef>

namespace fastbn {
namespace simt {
namespace detail {

struct Stack {
  void* base = nullptr;  // lowest usable address (the guard page is just below)
  std::size_t size = 0;
};

Stack acquire_stack();
void release_stack(Stack stack);

class Context {
 public:
  // Makes this context start `entry` on `stack` at the next switch into it.
  void prepare(Stack stack, void (*entry)());
  // First thing a fiber's entry function does: learns (for ASan) the stack it will switch back to.
  void entered_from(Context& scheduler);
  // Saves the running context into `from` and resumes `to`. `from_finished`: `from` is a fiber whose
  // work is done and that will only ever be prepared again, never resumed.
  static void switch_to(Context& from, Context& to, bool from_finished = false);

 private:
  ucontext_t uc_{};
  // This context's stack, for ASan: a fiber's own, or the scheduler's as reported by the first fiber.
  const void* stack_bottom_ = nullptr;
  std::size_t stack_size_ = 0;
  void* fake_stack_ = nullptr;  // ASan's fake stack of this context while it is switched out
};

}  // namespace detail
}  // namespace simt
}  // namespace fastbn
