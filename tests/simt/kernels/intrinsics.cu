// The math, bit and load intrinsics, one column each, for comparison with torch on the host.
#include "cuda/device_utils.cuh"
#include "kernels.h"

namespace simt_test {
namespace {

constexpr int kColumns = 10;

__global__ void intrinsics_kernel(const float* __restrict__ x, float* __restrict__ out, int64_t n) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const float v = __ldg(x + i);
  float* o = out + i * kColumns;
  o[0] = rsqrtf(v);
  o[1] = __fdividef(v, 3.0f);
  o[2] = fmaf(v, 2.0f, 1.0f);
  o[3] = __expf(-v);
  o[4] = __saturatef(v - 1.0f);
  o[5] = static_cast<float>(__popc(__float_as_uint(v)));
  o[6] = __int_as_float(__float_as_int(v));
  o[7] = max(v, 1.5f) + min(v, 1.5f);
  o[8] = static_cast<float>(rsqrt(static_cast<double>(v)));
  o[9] = __ldcg(x + i) + __frcp_rn(v);
}

}  // namespace

void intrinsics(const float* x, float* out, int64_t n) {
  const unsigned blocks = static_cast<unsigned>((n + 63) / 64);
  fastbn::launch(intrinsics_kernel, dim3(blocks), dim3(64), 0, fastbn::current_stream(), x, out, n);
}

}  // namespace simt_test
