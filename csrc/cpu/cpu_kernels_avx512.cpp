// The vectorised and strided kernels built for AVX512 (ATen's at::vec::AVX512 vectors). The build passes no -m
// flags, so a target pragma enables the instructions for this file's kernels only; vector_kernels() and
// strided_kernels() (cpu_select.cpp) call them only when the CPU has them. Compilers without GCC's target pragma
// fall back to the baseline tables.
#include "fp_contract.h"

#include "kernels_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FASTBN_CPU_CAP avx512
#include "kernels_build.h"
#pragma GCC pop_options

#else

namespace fastbn {
namespace cpu {
namespace avx512 {
FASTBN_DEFINE_CPU_KERNELS(make_kernels, dflt::make_kernels<scalar_t>())
FASTBN_DEFINE_CPU_KERNELS(make_strided_kernels, dflt::make_strided_kernels<scalar_t>())
}  // namespace avx512
}  // namespace cpu
}  // namespace fastbn

#endif
