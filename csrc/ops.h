// C++ signatures of the fastbn ops (schemas in ops.cpp). Each device declares its implementations with
// FASTBN_DECLARE_OPS() inside its own namespace (fastbn::cpu, fastbn::cuda); argument checks are not
// the kernels' job: ops.cpp wraps every implementation with the shared checks before registering it.
//
// Conventions shared by every implementation:
//  - input is (N, C, *) in any memory format; outputs keep the input's memory format.
//  - weight, bias, running_mean, running_var have C elements and dtype param_t (dispatch.h).
//  - statistics (save_mean, save_invstd, mean, invstd, var, count, sums) are acc_t tensors of C elements
//    (count: a 0-dim acc_t tensor).
//  - normalize: y = (x - mean) * (invstd * weight) + bias [+ residual] [relu]. The mean is subtracted
//    before scaling, not folded into the shift, so data with a large mean (1e4 + randn) keeps its precision
//    at the same memory cost.
//  - relu backward masks dy where y <= 0 (or is NaN), as torch's threshold_backward does on relu's output: y is
//    the backward ops' output argument (the forward's output) when given, else the pre-activation recomputed
//    from the input (no residual in it). A fused residual add is masked through its output, which the next
//    layer keeps anyway, rather than by keeping the residual for the recomputation.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#define FASTBN_DECLARE_OPS()                                                                              \
  /* Training forward: statistics, running-stat update (num_batches_tracked += 1 when given; factor =  \
     momentum, or 1/num_batches_tracked when momentum is None), normalize + epilogue.                   \
     Returns (output, save_mean, save_invstd). */                                                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train(                                          \
      const at::Tensor& input, const std::optional<at::Tensor>& weight,                                  \
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,                  \
      const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,       \
      const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum, double eps, \
      bool relu);                                                                                        \
  /* Eval forward from running statistics. */                                                            \
  at::Tensor forward_eval(const at::Tensor& input, const std::optional<at::Tensor>& weight,              \
                          const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, \
                          const at::Tensor& running_mean, const at::Tensor& running_var, double eps,     \
                          bool relu);                                                                    \
  /* Backward. training=false treats mean/invstd as constants (eval). output_mask selects                \
     (grad_input, grad_weight, grad_bias, grad_residual); unselected ones: empty, input dtype. */       \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(                                   \
      const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,   \
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& output,                    \
      const at::Tensor& mean, const at::Tensor& invstd, bool training, bool relu,                        \
      std::array<bool, 4> output_mask);                                                                  \
  /* SyncBatchNorm pieces. */                                                                            \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> local_stats(const at::Tensor& input);                   \
  at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,        \
                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,   \
                       const std::optional<at::Tensor>& residual, bool relu);                            \
  std::tuple<at::Tensor, at::Tensor> backward_reduce(                                                    \
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,                    \
      const at::Tensor& invstd, const std::optional<at::Tensor>& weight,                                 \
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& output, bool relu);        \
  at::Tensor backward_elementwise(                                                                       \
      const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,                    \
      const at::Tensor& invstd, const std::optional<at::Tensor>& weight,                                 \
      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& output,                    \
      const at::Tensor& mean_dy, const at::Tensor& mean_dy_xhat, bool relu);

namespace fastbn {
namespace cpu {
FASTBN_DECLARE_OPS()
}  // namespace cpu
namespace cuda {
FASTBN_DECLARE_OPS()
}  // namespace cuda
}  // namespace fastbn
