// Chooses the vectorised kernel table for this CPU once, with ATen's answer (so ATEN_CPU_CAPABILITY applies to
// fastbn exactly as it does to torch's own kernels).
#include "fp_contract.h"

#include <ATen/Version.h>

#include <string>

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

}  // namespace

template <typename scalar_t>
const Kernels<scalar_t>& vector_kernels() {
  static const Kernels<scalar_t> table = [] {
    switch (capability()) {
      case Capability::kAvx512:
        return avx512::make_kernels<scalar_t>();
      case Capability::kAvx2:
        return avx2::make_kernels<scalar_t>();
      default:
        return dflt::make_kernels<scalar_t>();
    }
  }();
  return table;
}

template <typename scalar_t>
const Kernels<scalar_t>& strided_kernels() {
  static const Kernels<scalar_t> table = strided::make_kernels<scalar_t>();
  return table;
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
