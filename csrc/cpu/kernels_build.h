// The tail of every cpu_kernels_<capability>.cpp: target macros, at::vec, math.h and one copy of the kernels in
// namespace FASTBN_CPU_CAP. No include guard: each of those files includes it once, after its target pragma (if
// any) and after defining FASTBN_CPU_CAP and, for the AVX builds, CPU_CAPABILITY_AVX2 or CPU_CAPABILITY_AVX512.
#ifndef FASTBN_CPU_CAP
#error "define FASTBN_CPU_CAP before including kernels_build.h"
#endif

// g++ does not update the target macros after a target pragma in C++ (it lexes ahead), and sleef.h, which at::vec
// includes, declares its vector functions only under them.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
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
#endif
#if defined(CPU_CAPABILITY_AVX512)
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
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "math.h"

#include "kernels_impl.h"
#include "strided_impl.h"
