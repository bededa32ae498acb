// The emulated CUDA build of the tests: csrc/cuda's op implementations (compiled by the host compiler
// against the SIMT emulator, FASTBN_SIMT) registered for CPU tensors under the library fastbn_simt, with the
// same schemas and argument checks as the real fastbn library (which `import fastbn` loads in the same
// process: this file must never define "fastbn" itself, hence no csrc/ops.cpp here), plus the emulator's
// controls (schedule, resident blocks) for the tests.
#include <torch/library.h>

#include "checks.h"
#include "schemas.h"
#include "simt/runtime.h"

namespace {
void set_schedule(const std::string& s) { fastbn::simt::set_schedule(fastbn::simt::parse_schedule(s)); }
std::string schedule() { return fastbn::simt::to_string(fastbn::simt::current_schedule()); }
void set_resident_blocks(int64_t n) { fastbn::simt::set_max_resident_blocks(static_cast<unsigned>(n)); }
int64_t resident_blocks() { return fastbn::simt::max_resident_blocks(); }
std::vector<int64_t> stats() {
  const auto s = fastbn::simt::stats();
  return {int64_t(s.launches), int64_t(s.blocks), int64_t(s.threads), int64_t(s.switches)};
}
void reset_stats() { fastbn::simt::reset_stats(); }
}  // namespace

TORCH_LIBRARY(fastbn_simt, m) {
  for (const char* schema : fastbn::kOpSchemas) m.def(schema);
  m.def("set_schedule", &set_schedule);
  m.def("schedule", &schedule);
  m.def("set_resident_blocks", &set_resident_blocks);
  m.def("resident_blocks", &resident_blocks);
  m.def("stats", &stats);
  m.def("reset_stats", &reset_stats);
}

TORCH_LIBRARY_IMPL(fastbn_simt, CPU, m) { FASTBN_REGISTER_OPS(m, cuda); }
