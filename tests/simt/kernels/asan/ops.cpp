// torch.ops.fastbn_simt_asan_test: the planted out-of-bounds kernels (tests/simt/kernels/planted.cu) in
// an AddressSanitizer build. Kept to the few ops the ASan test needs, with light headers: the ASan build
// compiles every file again, instrumented.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

void check(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat,
              "expected a contiguous float CPU tensor");
}

void write_range_op(at::Tensor y, int64_t extra, int64_t threads) {
  check(y);
  simt_test::write_range(static_cast<float*>(y.data_ptr()), y.numel(), extra, int(threads));
}

void shared_write_op(at::Tensor out, int64_t shift) {
  check(out);
  simt_test::shared_write(static_cast<float*>(out.data_ptr()), int(out.numel()), int(shift));
}

}  // namespace

TORCH_LIBRARY(fastbn_simt_asan_test, m) {
  m.def("write_range_(Tensor(a!) y, int extra, int threads) -> ()", &write_range_op);
  m.def("shared_write_(Tensor(a!) out, int shift) -> ()", &shared_write_op);
}
