// Registers the CUDA implementations of the fastbn ops (ops.cu) behind the shared argument checks. The
// library itself (schemas) is defined once, in ../ops.cpp.
#include <torch/library.h>

#include "checks.h"

TORCH_LIBRARY_IMPL(fastbn, CUDA, m) { FASTBN_REGISTER_OPS(m, cuda); }
