// The emulated CUDA build of the tests: csrc/cuda's op implementations (compiled by the host compiler
// against the SIMT emulator, FASTBN_SIMT) registered for CPU tensors under the library fastbn_simt, with the
// same schemas and argument checks as the real fastbn library (which `import fastbn` loads in the same
// process: this file must never define "fastbn" itself, hence no csrc/ops.cpp here), plus the emulator's
// controls (schedule, resident blocks) for the tests.
#include <torch/library.h>

#include "checks.h"
#include "schemas.h"
#include "emulator_controls.h"

TORCH_LIBRARY(fastbn_simt, m) {
  for (const char* schema : fastbn::kOpSchemas) m.def(schema);
  simt_test::define_emulator_controls(m);
}

TORCH_LIBRARY_IMPL(fastbn_simt, CPU, m) { FASTBN_REGISTER_OPS(m, cuda); }
