// 16-byte vector loads and stores with scalar heads and tails, on tensors of every fastbn dtype.
// Takes at::Tensor (unlike the other test kernels) to show that ATen, csrc/dispatch.h and the
// emulated CUDA surface compile together, as they will in csrc/cuda.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cuda/device_utils.cuh"
#include "dispatch.h"
#include "kernels.h"

namespace simt_test {
namespace {

// y = a * x + b * y, computed in acc_t.
template <typename scalar_t, typename acc_t>
__global__ void axpby_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, acc_t a, acc_t b,
                             fastbn::VecSplit split) {
  constexpr int N = fastbn::kPackSize<scalar_t>;
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  fastbn::for_each_vectorized<N>(
      split, n, t, stride,
      [&](int64_t i) {
        const auto xv = fastbn::load_pack<N>(x + i);
        auto yv = fastbn::load_pack<N>(y + i);
#pragma unroll
        for (int k = 0; k < N; ++k)
          yv.val[k] = static_cast<scalar_t>(a * static_cast<acc_t>(xv.val[k]) + b * static_cast<acc_t>(yv.val[k]));
        fastbn::store_pack<N>(y + i, yv);
      },
      [&](int64_t i) { y[i] = static_cast<scalar_t>(a * static_cast<acc_t>(x[i]) + b * static_cast<acc_t>(y[i])); });
}

// Per-block sums through pack loads; visits[0] counts packs, visits[1] scalar elements.
template <typename scalar_t, typename acc_t>
__global__ void pack_sums_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ out, int64_t n,
                                 fastbn::VecSplit split, unsigned long long* visits) {
  constexpr int N = fastbn::kPackSize<scalar_t>;
  __shared__ acc_t scratch[32];
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  acc_t v = 0;
  unsigned long long packs = 0, scalars = 0;
  fastbn::for_each_vectorized<N>(
      split, n, t, stride,
      [&](int64_t i) {
        const auto p = fastbn::load_pack<N>(x + i);
#pragma unroll
        for (int k = 0; k < N; ++k) v += static_cast<acc_t>(p.val[k]);
        ++packs;
      },
      [&](int64_t i) {
        v += static_cast<acc_t>(x[i]);
        ++scalars;
      });
  atomicAdd(visits, packs);
  atomicAdd(visits + 1, scalars);
  const acc_t total = fastbn::block_reduce(v, fastbn::SumOp<acc_t>(), scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

}  // namespace

void axpby(const at::Tensor& x, at::Tensor& y, double a, double b, int blocks, int threads) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.numel() == y.numel() && x.dtype() == y.dtype(),
              "axpby: contiguous tensors of one size and dtype");
  FASTBN_DISPATCH(x.scalar_type(), x.scalar_type(), "axpby", [&] {
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    const auto split = fastbn::vec_split<fastbn::kPackSize<scalar_t>>(n, xp, yp);
    fastbn::launch(axpby_kernel<scalar_t, acc_t>, dim3(blocks), dim3(threads), 0, fastbn::current_stream(), xp, yp, n,
                   static_cast<acc_t>(a), static_cast<acc_t>(b), split);
  });
}

void pack_sums(const at::Tensor& x, at::Tensor& out, at::Tensor& visits, int blocks, int threads) {
  TORCH_CHECK(x.is_contiguous() && out.numel() == blocks && visits.numel() == 2 &&
                  visits.scalar_type() == at::kLong,
              "pack_sums: contiguous x, one output per block, two int64 visit counters");
  FASTBN_DISPATCH(x.scalar_type(), x.scalar_type(), "pack_sums", [&] {
    TORCH_CHECK(out.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "pack_sums: out must be of acc_t");
    const auto* xp = x.const_data_ptr<scalar_t>();
    const int64_t n = x.numel();
    const auto split = fastbn::vec_split<fastbn::kPackSize<scalar_t>>(n, xp);
    fastbn::launch(pack_sums_kernel<scalar_t, acc_t>, dim3(blocks), dim3(threads), 0, fastbn::current_stream(), xp,
                   out.mutable_data_ptr<acc_t>(), n, split,
                   reinterpret_cast<unsigned long long*>(visits.mutable_data_ptr<int64_t>()));
  });
}

}  // namespace simt_test
