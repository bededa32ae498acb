// The vectorised kernels built for AVX512 (ATen's at::vec::AVX512 vectors). The build passes no -m flags, so a
// target pragma enables the instructions for this file's kernels only; vector_kernels() (cpu_select.cpp) calls them only
// when the CPU has them. Compilers without GCC's target pragma fall back to the baseline table.
#include "fp_contract.h"

#include "kernels_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTBN_CPU_HAVE_AVX512 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// g++ does not update the target macros after a target pragma in C++ (it lexes ahead), and sleef.h,
// which at::vec includes, declares its vector functions only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "math.h"

#define FASTBN_CPU_CAP avx512
#include "kernels_impl.h"
#pragma GCC pop_options

#else

namespace fastbn {
namespace cpu {
namespace avx512 {
FASTBN_DEFINE_CPU_KERNELS(dflt::make_kernels<scalar_t>())
}  // namespace avx512
}  // namespace cpu
}  // namespace fastbn

#endif
