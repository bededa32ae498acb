// Defines the fastbn ops (schemas in schemas.h) and registers the CPU implementations behind the shared
// argument checks (checks.h). The CUDA implementations are registered in cuda/register.cu.
#include <Python.h>
#include <torch/library.h>

#include "checks.h"
#include "schemas.h"

TORCH_LIBRARY(fastbn, m) {
  for (const char* schema : fastbn::kOpSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(fastbn, CPU, m) { FASTBN_REGISTER_OPS(m, cpu); }

// Importable as the Python module fastbn._C: importing it runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
