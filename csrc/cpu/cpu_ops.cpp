// The seven CPU ops of fastbn (declared by FASTBN_DECLARE_OPS in ops.h; argument checks already done by the
// wrappers in ../ops.cpp). Each op: allocate outputs in the input's memory format, turn weight/bias/statistics
// into per-channel acc_t coefficients with plain loops over C (no ATen op launches on the hot path), then run
// at most one reduction pass and one elementwise pass (kernels.h) over the big tensors.
#include "fp_contract.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "../ops.h"
#include "../op_tensors.h"
#include "kernels.h"
#include "math.h"

namespace fastbn {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// weight/bias/running statistics (param_t, any strides: C elements are cheap to gather) as acc_t values.
template <typename param_t, typename acc_t>
std::vector<acc_t> channel_values(const OptTensor& t, int64_t C, acc_t fallback) {
  std::vector<acc_t> out(C, fallback);
  if (defined(t)) {
    const Tensor src = t->contiguous();
    const param_t* p = src.data_ptr<param_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<acc_t>(p[c]);
  }
  return out;
}

// acc_t statistics given to the op (mean, invstd, ...).
template <typename acc_t>
std::vector<acc_t> channel_values(const Tensor& t) {
  const Tensor src = t.contiguous();
  const acc_t* p = src.data_ptr<acc_t>();
  return std::vector<acc_t>(p, p + src.numel());
}

// In-place update of a caller's per-channel tensor: through its own memory when contiguous, otherwise through a
// contiguous temporary copied back (a strided view stays the caller's tensor).
template <typename param_t, typename F>
void update_channels(const Tensor& t, F&& f) {
  const Tensor dst = t.is_contiguous() ? t : t.contiguous();
  param_t* p = dst.data_ptr<param_t>();
  for (int64_t c = 0; c < dst.numel(); ++c) p[c] = static_cast<param_t>(f(c, static_cast<double>(p[c])));
  if (!dst.is_same(t)) t.copy_(dst);
}

// Per-channel normalize coefficients, y = (x - mean) * scale + shift with scale = invstd * weight. Every op
// builds them here, so the forward and the backward's recomputed ReLU mask share one arithmetic.
template <typename acc_t>
struct Coefficients {
  std::vector<acc_t> scale, shift;
};

template <typename param_t, typename acc_t>
Coefficients<acc_t> coefficients(const acc_t* invstd, const OptTensor& weight, const OptTensor& bias, int64_t C) {
  Coefficients<acc_t> k{channel_values<param_t, acc_t>(weight, C, acc_t(1)),
                        channel_values<param_t, acc_t>(bias, C, acc_t(0))};
  for (int64_t c = 0; c < C; ++c) k.scale[c] = invstd[c] * k.scale[c];
  return k;
}

template <typename param_t, typename acc_t>
void write_channels(const Tensor& t, const std::vector<acc_t>& values) {
  param_t* p = t.data_ptr<param_t>();
  for (size_t c = 0; c < values.size(); ++c) p[c] = static_cast<param_t>(values[c]);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& residual, const OptTensor& running_mean,
                                                 const OptTensor& running_var, const OptTensor& num_batches_tracked,
                                                 std::optional<double> momentum, double eps, bool relu) {
  const int64_t C = input.size(1);
  Tensor output = at::empty_like(input);
  Tensor save_mean = empty_channels(input, acc_dtype(input));
  Tensor save_invstd = empty_channels(input, acc_dtype(input));
  int64_t batches = 0;
  if (defined(num_batches_tracked)) batches = ++*num_batches_tracked->data_ptr<int64_t>();

  const auto param = param_dtype(input, {&weight, &bias, &running_mean, &running_var});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_forward_train", [&] {
    acc_t* mean = save_mean.data_ptr<acc_t>();
    acc_t* invstd = save_invstd.data_ptr<acc_t>();
    if (input.numel() == 0) {
      std::fill(mean, mean + C, acc_t(0));
      std::fill(invstd, invstd + C, acc_t(0));
      return;
    }
    const int64_t m = input.numel() / C;
    std::vector<acc_t> m2(C);
    const Tensor* res = defined(residual) ? &*residual : nullptr;
    const Geometry gn = classify(input, {res, &output});
    const FusedBlocks blocks(gn, static_cast<int64_t>(input.element_size()), res != nullptr ? 2 : 1, false);
    const auto& kernels = kernels_for<scalar_t>(gn);
    const bool fused = blocks.blocks > 0 && kernels.forward_fused != nullptr;
    if (fused) {
      const auto w = channel_values<param_t, acc_t>(weight, C, acc_t(1));
      const auto b = channel_values<param_t, acc_t>(bias, C, acc_t(0));
      kernels.forward_fused({blocks, gn, &input, res, &output, relu, w.data(), b.data(), eps, mean, m2.data(), invstd});
    } else {
      const Geometry gs = classify(input);
      kernels_for<scalar_t>(gs).stats({gs, &input, mean, m2.data()});
      for (int64_t c = 0; c < C; ++c) invstd[c] = invstd_of<acc_t>(m2[c], m, eps);
    }
    if (defined(running_mean)) {
      const double f = momentum.has_value() ? *momentum : 1.0 / static_cast<double>(batches);
      update_channels<param_t>(*running_mean, [&](int64_t c, double old) {
        return f * double(mean[c]) + (1 - f) * old;
      });
      update_channels<param_t>(*running_var, [&](int64_t c, double old) {
        return f * (double(m2[c]) / double(m - 1)) + (1 - f) * old;
      });
    }

    if (!fused) {
      const auto k = coefficients<param_t>(invstd, weight, bias, C);
      kernels.normalize({gn, &input, res, &output, mean, k.scale.data(), k.shift.data(), relu});
    }
  });
  return {output, save_mean, save_invstd};
}

Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                    const Tensor& running_mean, const Tensor& running_var, double eps, bool relu) {
  const int64_t C = input.size(1);
  Tensor output = at::empty_like(input);
  if (input.numel() == 0) return output;
  const OptTensor rm(running_mean), rv(running_var);
  const auto param = param_dtype(input, {&weight, &bias, &rm, &rv});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_forward_eval", [&] {
    const auto mean = channel_values<param_t, acc_t>(rm, C, acc_t(0));
    auto invstd = channel_values<param_t, acc_t>(rv, C, acc_t(1));
    for (acc_t& v : invstd) v = acc_t(1) / std::sqrt(v + static_cast<acc_t>(eps));
    const auto k = coefficients<param_t>(invstd.data(), weight, bias, C);
    const Tensor* res = defined(residual) ? &*residual : nullptr;
    const Geometry g = classify(input, {res, &output});
    kernels_for<scalar_t>(g).normalize({g, &input, res, &output, mean.data(), k.scale.data(), k.shift.data(), relu});
  });
  return output;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    const OptTensor& output, const Tensor& mean,
                                                    const Tensor& invstd, bool training, bool relu,
                                                    std::array<bool, 4> output_mask) {
  const int64_t C = input.size(1);
  const auto [need_dx, need_dw, need_db, need_dr] = output_mask;
  const auto param = param_dtype(input, {&weight, &bias});
  // grad_residual is written by a pass that reads dy anyway: the fused or elementwise pass, or the mask pass below.
  Tensor dx, dw, db, dr;
  std::tie(dx, dw, db, dr) = backward_outputs(input, param, output_mask);

  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_backward", [&] {
    std::vector<acc_t> sum_g(C, acc_t(0)), sum_gxmu(C, acc_t(0));
    const auto inv = channel_values<acc_t>(invstd);
    const int64_t numel = input.numel();
    const int64_t m = numel / C;
    if (numel > 0) {
      const auto mu = channel_values<acc_t>(mean);
      const auto k = coefficients<param_t>(inv.data(), weight, bias, C);
      const Tensor* y = relu && defined(output) ? &*output : nullptr;
      const Tensor* dx_p = need_dx ? &dx : nullptr;
      const Tensor* dr_p = need_dr ? &dr : nullptr;
      const Geometry ge = classify(input, {&grad_output, y, dx_p, dr_p});
      const FusedBlocks blocks(ge, static_cast<int64_t>(input.element_size()), y != nullptr ? 3 : 2, true);
      const auto& kernels = kernels_for<scalar_t>(ge);
      // One kernel for dx and the sums: training where fused blocks fit, eval when dw or db is wanted too (it then
      // reads dy once; eval's dx alone is the elementwise pass).
      const bool fused = need_dx && (training ? blocks.fits() : need_dw || need_db) &&
                         kernels.backward_fused != nullptr;
      if (fused) {
        kernels.backward_fused({blocks,
                                {ge, &grad_output, &input, y, mu.data(), k.scale.data(), k.shift.data(), relu,
                                 sum_g.data(), sum_gxmu.data()},
                                {ge, &grad_output, &input, y, mu.data(), k.scale.data(), k.shift.data(), relu,
                                 k.scale.data(), nullptr, nullptr, training, dx_p, dr_p},
                                inv.data()});
      }
      // Unfused training with an output mask and the residual's gradient wanted: that gradient, g = dy where the
      // output is > 0, is written first in a pass of its own (dy and the output in, g out), and BN's two passes
      // then read g and x with no mask, as torch's ReLU backward and BN backward do. 8E either way, but passes of
      // two input streams instead of three, and g still in cache for the reduction when it fits there. fastbn's
      // op alone, float32 channels_last, 2-core EPYC, medians of 3 alternating runs: 32x128x28x28 3.91 -> 3.07 ms,
      // 32x256x28x28 6.68 -> 5.77 ms, 32x64x112x112 29.9 -> 24.5 ms, 32x512x7x7 0.78 -> 0.71 ms.
      const bool mask_first = !fused && training && y != nullptr && need_dr && need_dx;
      const Tensor* g_in = &grad_output;
      const Tensor* y_in = y;
      bool relu_in = relu;
      if (mask_first) {  // relu masked by the output, no x (use_x false), no dx: only g is written, into dr
        kernels.backward_elementwise({ge, &grad_output, &input, y, mu.data(), k.scale.data(), k.shift.data(), true,
                                      k.scale.data(), k.scale.data(), k.scale.data(), false, nullptr, dr_p});
        g_in = &dr;
        y_in = nullptr;
        relu_in = false;
      }
      if (!fused && (need_dw || need_db || (need_dx && training))) {
        const Geometry g = classify(input, {g_in, y_in});
        kernels_for<scalar_t>(g).backward_reduce(
            {g, g_in, &input, y_in, mu.data(), k.scale.data(), k.shift.data(), relu_in, sum_g.data(),
             sum_gxmu.data()});
      }
      if (!fused && (need_dx || need_dr)) {
        // dx = scale·g + p·(x - mean) + q; p and q vanish in eval.
        std::vector<acc_t> p(C, acc_t(0)), q(C, acc_t(0));
        for (int64_t c = 0; c < C && training; ++c) {
          train_dx_coefficients(k.scale[c], inv[c], sum_g[c], sum_gxmu[c], m, p[c], q[c]);
        }
        kernels.backward_elementwise({ge, g_in, &input, y_in, mu.data(), k.scale.data(), k.shift.data(), relu_in,
                                      k.scale.data(), p.data(), q.data(), training, dx_p,
                                      mask_first ? nullptr : dr_p});
      }
    }
    if (need_dw) {
      std::vector<acc_t> gw(C);
      for (int64_t c = 0; c < C; ++c) gw[c] = sum_gxmu[c] * inv[c];
      write_channels<param_t>(dw, gw);
    }
    if (need_db) write_channels<param_t>(db, sum_g);
  });
  return {dx, dw, db, dr};
}

std::tuple<Tensor, Tensor, Tensor> local_stats(const Tensor& input) {
  const int64_t C = input.size(1);
  const auto acc = acc_dtype(input);
  Tensor mean = empty_channels(input, acc);
  Tensor var = empty_channels(input, acc);
  Tensor count = at::empty({}, input.options().dtype(acc));
  FASTBN_DISPATCH(input.scalar_type(), acc, "fastbn_local_stats", [&] {
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    const int64_t m = input.numel() / C;
    *count.data_ptr<acc_t>() = static_cast<acc_t>(m);
    if (m == 0) {
      std::fill(mp, mp + C, acc_t(0));
      std::fill(vp, vp + C, acc_t(0));
      return;
    }
    std::vector<acc_t> m2(C);
    const Geometry g = classify(input);
    kernels_for<scalar_t>(g).stats({g, &input, mp, m2.data()});
    for (int64_t c = 0; c < C; ++c) vp[c] = m2[c] / static_cast<acc_t>(m);
  });
  return {mean, var, count};
}

Tensor normalize(const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                 const OptTensor& bias, const OptTensor& residual, bool relu) {
  const int64_t C = input.size(1);
  Tensor output = at::empty_like(input);
  if (input.numel() == 0) return output;
  const auto param = param_dtype(input, {&weight, &bias});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_normalize", [&] {
    const auto mu = channel_values<acc_t>(mean);
    const auto inv = channel_values<acc_t>(invstd);
    const auto k = coefficients<param_t>(inv.data(), weight, bias, C);
    const Tensor* res = defined(residual) ? &*residual : nullptr;
    const Geometry g = classify(input, {res, &output});
    kernels_for<scalar_t>(g).normalize({g, &input, res, &output, mu.data(), k.scale.data(), k.shift.data(), relu});
  });
  return output;
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                           const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                           const OptTensor& output, bool relu) {
  const int64_t C = input.size(1);
  const auto acc = acc_dtype(input);
  Tensor sum_dy = empty_channels(input, acc);
  Tensor sum_dy_xhat = empty_channels(input, acc);
  const auto param = param_dtype(input, {&weight, &bias});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_backward_reduce", [&] {
    acc_t* sg = sum_dy.data_ptr<acc_t>();
    acc_t* sgx = sum_dy_xhat.data_ptr<acc_t>();
    std::fill(sg, sg + C, acc_t(0));
    std::fill(sgx, sgx + C, acc_t(0));
    if (input.numel() == 0) return;
    const auto mu = channel_values<acc_t>(mean);
    const auto inv = channel_values<acc_t>(invstd);
    const auto k = coefficients<param_t>(inv.data(), weight, bias, C);
    const Tensor* y = relu && defined(output) ? &*output : nullptr;
    const Geometry g = classify(input, {&grad_output, y});
    kernels_for<scalar_t>(g).backward_reduce(
        {g, &grad_output, &input, y, mu.data(), k.scale.data(), k.shift.data(), relu, sg, sgx});
    for (int64_t c = 0; c < C; ++c) sgx[c] *= inv[c];  // Σg·x̂ = invstd·Σg·(x - mean)
  });
  return {sum_dy, sum_dy_xhat};
}

Tensor backward_elementwise(const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& invstd,
                            const OptTensor& weight, const OptTensor& bias, const OptTensor& output,
                            const Tensor& mean_dy, const Tensor& mean_dy_xhat, bool relu) {
  const int64_t C = input.size(1);
  Tensor dx = at::empty_like(input);
  if (input.numel() == 0) return dx;
  const auto param = param_dtype(input, {&weight, &bias});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_backward_elementwise", [&] {
    const auto mu = channel_values<acc_t>(mean);
    const auto inv = channel_values<acc_t>(invstd);
    const auto mdy = channel_values<acc_t>(mean_dy);
    const auto mdyx = channel_values<acc_t>(mean_dy_xhat);
    const auto k = coefficients<param_t>(inv.data(), weight, bias, C);
    std::vector<acc_t> p(C), q(C);
    for (int64_t c = 0; c < C; ++c) {
      // dx = scale·(g - mean_dy - x̂·mean_dy_xhat), x̂ = (x - mean)·invstd
      p[c] = -k.scale[c] * inv[c] * mdyx[c];
      q[c] = -k.scale[c] * mdy[c];
    }
    const Tensor* y = relu && defined(output) ? &*output : nullptr;
    const Geometry g = classify(input, {&grad_output, y, &dx});
    kernels_for<scalar_t>(g).backward_elementwise({g, &grad_output, &input, y, mu.data(), k.scale.data(),
                                                   k.shift.data(), relu, k.scale.data(), p.data(), q.data(), true,
                                                   &dx, nullptr});
  });
  return dx;
}

}  // namespace cpu
}  // namespace fastbn
