// Chooses the vectorised kernel table for this CPU once, with ATen's answer (so ATEN_CPU_CAPABILITY applies to
// fastbn exactly as it does to torch's own kernels).
#include "fp_contract.h"

#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace fastbn {
namespace cpu {
namespace {

enum class Capability { kDefault, kAvx2, kAvx512 };

Capability capability() {
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2" or "AVX512"
  // The CPU check guards against a torch that reports more than the kernels' target pragmas ask for.
  if (aten == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return Capability::kAvx512;
  }
  if ((aten == "AVX2" || aten == "AVX512") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return Capability::kAvx2;
  }
#endif
  return Capability::kDefault;
}

// The table for this CPU among one kind's three builds (make_kernels or make_strided_kernels).
template <typename scalar_t>
Kernels<scalar_t> for_this_cpu(Kernels<scalar_t> (*dflt)(), Kernels<scalar_t> (*avx2)(),
                               Kernels<scalar_t> (*avx512)()) {
  switch (capability()) {
    case Capability::kAvx512: {
      // The passes that write a big tensor use the 256-bit kernels: on the AVX-512 machine we measure on (an
      // AMD EPYC, 2 cores) 512-bit stores streaming a tensor larger than L2 ran up to 2x slower (eval
      // channels_last 32x128x28x28: 0.92 ms with 512-bit vectors, 0.50 ms with 256-bit, one thread), while
      // the read-only reductions gain from 512 bits (backward_reduce 0.99 vs 1.25 ms), and so does the fused
      // backward, mostly a reduction (NCHW ResNet-50 geomean over torch 1.37x with 512 bits, 1.29x with 256).
      // 16-bit types keep the 512-bit passes: AVX-512 converts them to and from float in one instruction and has
      // masked 16-bit loads and stores for run tails. Two alternating bench_ops runs, 256 -> 512 bits, geomean
      // over torch: eval bfloat16 NCHW 0.88/0.93 -> 1.10/1.06x, channels_last 1.00/0.98 -> 1.14/1.29x;
      // backward channels_last float16 1.21/1.18 -> 1.32/1.47x, bfloat16 1.34/1.29 -> 1.46/1.55x.
      Kernels<scalar_t> k = avx512();
      if constexpr (sizeof(scalar_t) != 2) {
        const Kernels<scalar_t> narrow = avx2();
        k.normalize = narrow.normalize;
        k.backward_elementwise = narrow.backward_elementwise;
      }
      return k;
    }
    case Capability::kAvx2:
      return avx2();
    default:
      return dflt();
  }
}

}  // namespace

template <typename scalar_t>
const Kernels<scalar_t>& vector_kernels() {
  static const Kernels<scalar_t> table = for_this_cpu<scalar_t>(
      &dflt::make_kernels<scalar_t>, &avx2::make_kernels<scalar_t>, &avx512::make_kernels<scalar_t>);
  return table;
}

template <typename scalar_t>
const Kernels<scalar_t>& strided_kernels() {
  static const Kernels<scalar_t> table = for_this_cpu<scalar_t>(
      &dflt::make_strided_kernels<scalar_t>, &avx2::make_strided_kernels<scalar_t>,
      &avx512::make_strided_kernels<scalar_t>);
  return table;
}

// Half the largest cache level's size from Linux's sysfs (what lscpu reports: per cache instance; sysconf's
// _SC_LEVEL3_CACHE_SIZE can report a whole host's L3 inside a VM), the level taken as at most kUsableCache (and as
// that where sysfs cannot be read). A shared L3 is not one process's to fill: on a 2-vCPU Xeon guest whose sysfs
// reports 480 MiB, copies ran at cache speed (55 GB/s) up to 32 MiB buffers and at memory speed (26 GB/s) from
// 128 MiB, and with a 240 MiB threshold outputs of 25-100 MB took plain stores, each line read before it was written.
// Streaming from 16 MiB there, fastbn over torch's time in bench_ops (float32, inputs out of cache, two runs each):
// forward-eval NCHW 32x64x56x56 1.03/1.03 -> 1.31/1.26, channels_last 32x128x56x56 1.04/1.01 -> 1.47/1.41;
// backward NCHW 32x128x56x56 1.04/1.00 -> 1.30/1.35; forward-train channels_last 32x1024x14x14 1.36/1.30 ->
// 1.78/1.71.
constexpr int64_t kUsableCache = int64_t(32) << 20;

int64_t streaming_store_bytes() {
  static const int64_t bytes = [] {
    int best_level = 0;
    int64_t best_size = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::ifstream level_file(dir + "level"), size_file(dir + "size");
      int level = 0;
      int64_t size = 0;
      std::string unit;
      if (!(level_file >> level) || !(size_file >> size)) continue;
      size_file >> unit;  // "32768K": the number is read, the suffix is left
      const int64_t scale = unit == "K" ? 1 << 10 : unit == "M" ? 1 << 20 : unit == "G" ? 1 << 30 : 1;
      if (level > best_level) {
        best_level = level;
        best_size = size * scale;
      }
    }
    return (best_size > 0 ? std::min(best_size, kUsableCache) : kUsableCache) / 2;
  }();
  return bytes;
}

bool pages_in_memory(const void* p, int64_t nbytes) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto in_memory = [](uintptr_t address) {
    unsigned char status = 0;
    return mincore(reinterpret_cast<void*>(address & ~(page - 1)), 1, &status) == 0 && (status & 1) != 0;
  };
  const uintptr_t first = reinterpret_cast<uintptr_t>(p);
  return nbytes <= 0 || (in_memory(first) && in_memory(first + static_cast<uintptr_t>(nbytes) - 1));
#else
  (void)p;
  (void)nbytes;
  return true;
#endif
}

#define FASTBN_INSTANTIATE(T)                                 \
  template const Kernels<T>& vector_kernels<T>();             \
  template const Kernels<T>& strided_kernels<T>();
FASTBN_INSTANTIATE(float)
FASTBN_INSTANTIATE(double)
FASTBN_INSTANTIATE(c10::Half)
FASTBN_INSTANTIATE(c10::BFloat16)
#undef FASTBN_INSTANTIATE

}  // namespace cpu
}  // namespace fastbn
