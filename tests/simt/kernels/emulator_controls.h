// The emulator's controls as ops of a test library: schedule, resident-block limit, launch statistics.
// Shared by the emulator's own test library and the emulated fastbn build.
#pragma once

#include <torch/library.h>

#include <string>
#include <vector>

#include "simt/runtime.h"

namespace simt_test {

inline void define_emulator_controls(torch::Library& m) {
  m.def("set_schedule", [](const std::string& s) { fastbn::simt::set_schedule(fastbn::simt::parse_schedule(s)); });
  m.def("schedule", []() { return fastbn::simt::to_string(fastbn::simt::current_schedule()); });
  m.def("set_resident_blocks",
        [](int64_t n) { fastbn::simt::set_max_resident_blocks(static_cast<unsigned>(n)); });
  m.def("resident_blocks", []() { return static_cast<int64_t>(fastbn::simt::max_resident_blocks()); });
  m.def("stats", []() {
    const auto s = fastbn::simt::stats();
    return std::vector<int64_t>{int64_t(s.launches), int64_t(s.blocks), int64_t(s.threads), int64_t(s.switches)};
  });
  m.def("traffic", []() {
    const auto s = fastbn::simt::stats();
    return std::vector<int64_t>{int64_t(s.bytes_loaded), int64_t(s.bytes_stored)};
  });
  m.def("reset_stats", []() { fastbn::simt::reset_stats(); });
}

}  // namespace simt_test
