// The emulator's process-wide settings (schedule, resident-block limit), its counters, and the
// permutations the schedules are made of.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "simt/block.h"
#include "simt/runtime.h"

namespace fastbn {
namespace simt {
namespace {

struct Settings {
  std::mutex mutex;
  Schedule schedule;
  unsigned resident_blocks = 16;
  Settings() {
    if (const char* env = std::getenv("FASTBN_SIMT_SCHEDULE")) schedule = parse_schedule(env);
    if (const char* env = std::getenv("FASTBN_SIMT_RESIDENT_BLOCKS")) {
      const long v = std::strtol(env, nullptr, 10);
      if (v < 1) throw std::invalid_argument("FASTBN_SIMT_RESIDENT_BLOCKS must be a positive integer");
      resident_blocks = static_cast<unsigned>(v);
    }
  }
};

Settings& settings() {
  static Settings s;
  return s;
}

struct Counters {
  std::atomic<std::uint64_t> launches{0}, blocks{0}, threads{0}, switches{0}, bytes_loaded{0}, bytes_stored{0};
};
Counters& counters() {
  static Counters c;
  return c;
}

// SplitMix64 (Steele, Lea & Flood 2014): a well-mixed 64-bit stream from any seed, so that nearby
// seeds and salts still give unrelated permutations.
std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

Schedule parse_schedule(const std::string& text) {
  Schedule s;
  if (text == "forward") {
    s.order = Order::forward;
  } else if (text == "reverse") {
    s.order = Order::reverse;
  } else if (text == "shuffle") {
    s.order = Order::shuffle;
  } else if (text.rfind("shuffle:", 0) == 0) {
    s.order = Order::shuffle;
    const std::string digits = text.substr(8);
    if (digits.empty() || digits.size() > 19 || digits.find_first_not_of("0123456789") != std::string::npos)
      throw std::invalid_argument("fastbn simt: bad shuffle seed in schedule '" + text + "'");
    s.seed = std::strtoull(digits.c_str(), nullptr, 10);
  } else {
    throw std::invalid_argument("fastbn simt: schedule must be forward, reverse, shuffle or shuffle:SEED, got '" +
                                text + "'");
  }
  return s;
}

std::string to_string(const Schedule& schedule) {
  switch (schedule.order) {
    case Order::forward: return "forward";
    case Order::reverse: return "reverse";
    case Order::shuffle: return "shuffle:" + std::to_string(schedule.seed);
  }
  return "?";
}

void set_schedule(const Schedule& schedule) {
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.schedule = schedule;
}

Schedule current_schedule() {
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.schedule;
}

unsigned max_resident_blocks() {
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.resident_blocks;
}

void set_max_resident_blocks(unsigned blocks) {
  if (blocks == 0) throw std::invalid_argument("fastbn simt: at least one block must be resident");
  Settings& s = settings();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.resident_blocks = blocks;
}

Stats stats() {
  Counters& c = counters();
  Stats s;
  s.launches = c.launches.load();
  s.blocks = c.blocks.load();
  s.threads = c.threads.load();
  s.switches = c.switches.load();
  s.bytes_loaded = c.bytes_loaded.load();
  s.bytes_stored = c.bytes_stored.load();
  return s;
}

void reset_stats() {
  Counters& c = counters();
  c.launches = 0;
  c.blocks = 0;
  c.threads = 0;
  c.switches = 0;
  c.bytes_loaded = 0;
  c.bytes_stored = 0;
}

namespace detail {

void count_launch(std::uint64_t blocks, std::uint64_t threads) {
  Counters& c = counters();
  c.launches += 1;
  c.blocks += blocks;
  c.threads += threads;
}

void count_switches(std::uint64_t switches) { counters().switches += switches; }

void count_traffic(std::uint64_t loaded, std::uint64_t stored) {
  Counters& c = counters();
  if (loaded != 0) c.bytes_loaded.fetch_add(loaded, std::memory_order_relaxed);
  if (stored != 0) c.bytes_stored.fetch_add(stored, std::memory_order_relaxed);
}

void schedule_order(const Schedule& schedule, std::uint64_t salt, std::vector<unsigned>& out, unsigned n) {
  out.resize(n);
  for (unsigned i = 0; i < n; ++i) out[i] = schedule.order == Order::reverse ? n - 1 - i : i;
  if (schedule.order != Order::shuffle) return;
  // Fisher-Yates shuffle (Knuth, TAOCP vol. 2, Algorithm P) driven by SplitMix64.
  std::uint64_t state = schedule.seed ^ (salt * 0xD1B54A32D192ED03ull);
  for (unsigned i = n; i > 1; --i) {
    const unsigned j = static_cast<unsigned>(splitmix64(state) % i);
    std::swap(out[i - 1], out[j]);
  }
}

}  // namespace detail
}  // namespace simt
}  // namespace fastbn
