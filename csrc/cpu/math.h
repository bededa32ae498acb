// Element arithmetic shared by every path, written once for scalars and at::vec vectors alike, so the forward,
// the backward's recomputed ReLU mask and the strided path round identically (fp_contract.h keeps the compiler
// from fusing the multiply-add in some places and not in others).
#pragma once

#include <cmath>
#include <cstdint>

namespace fastbn {
namespace cpu {
// Internal linkage on purpose: each cpu_kernels_<capability>.cpp includes this after its target pragma, and
// GCC inlines vector code only into functions compiled for the same target. Copies per translation unit
// also keep the linker from merging an AVX build of a helper into the baseline code that uses it.
namespace {

// The mean is subtracted before scaling (ops.h): data with a large mean keeps its precision.
template <typename T>
inline T pre_activation(T x_minus_mean, T scale, T shift) {
  return x_minus_mean * scale + shift;
}

// The backward's g for one value: dy, masked where relu and the forward's output y (when has_y) or else the
// pre-activation recomputed with normalize's arithmetic is not > 0 (torch's threshold_backward). The vector
// kernels pass relu and has_y as compile-time constants.
template <typename T>
inline T masked_grad(T dy, T xmu, T scale, T shift, bool relu, bool has_y, T y) {
  if (!relu) return dy;
  return (has_y ? y : pre_activation(xmu, scale, shift)) > T(0) ? dy : T(0);
}

// torch.relu: values < 0 become 0, NaN stays NaN.
template <typename T>
inline T relu_scalar(T v) {
  return v < T(0) ? T(0) : v;
}

// Training-mode dx = k·g + p·(x - mean) + q, with k = invstd·weight: p = -k·invstd²·Σg(x - mean)/m and
// q = -k·Σg/m over the channel's m values.
template <typename acc_t>
inline void train_dx_coefficients(acc_t k, acc_t invstd, acc_t sum_g, acc_t sum_gxmu, int64_t m, acc_t& p, acc_t& q) {
  p = -k * invstd * invstd * sum_gxmu / acc_t(m);
  q = -k * sum_g / acc_t(m);
}

// 1 / sqrt(variance + eps) from m2 over count values, in double like torch's CPU kernel.
template <typename acc_t>
inline acc_t invstd_of(acc_t m2, int64_t count, double eps) {
  return static_cast<acc_t>(1.0 / std::sqrt(double(m2) / double(count) + eps));
}

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace
}  // namespace cpu
}  // namespace fastbn
