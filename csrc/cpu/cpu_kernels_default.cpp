// The vectorised and strided kernels for the baseline target (what the build's flags give: SSE2 on x86-64). Used
// where the CPU has no AVX2, or ATEN_CPU_CAPABILITY=default asks for it.
#include "fp_contract.h"

#include "kernels_prelude.h"

#define FASTBN_CPU_CAP dflt
#include "kernels_build.h"
