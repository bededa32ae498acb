// The schema of every fastbn op, in one list shared by the extension (ops.cpp, library "fastbn") and the
// emulated CUDA build used by the tests (library "fastbn_simt"), so the two cannot drift apart.
// Tensor(a!) marks the arguments an op mutates in place. The backward ops' output is the forward's output, read
// only for the ReLU mask (relu and output given: output > 0; relu alone: the pre-activation recomputed from input).
#pragma once

namespace fastbn {

inline constexpr const char* kOpSchemas[] = {
    "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, bool relu) "
    "-> (Tensor output, Tensor save_mean, Tensor save_invstd)",
    "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor running_mean, "
    "Tensor running_var, float eps, bool relu) -> Tensor",
    "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor? bias, Tensor? output, Tensor mean, "
    "Tensor invstd, bool training, bool relu, bool[4] output_mask) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)",
    "local_stats(Tensor input) -> (Tensor mean, Tensor var, Tensor count)",
    "normalize(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
    "bool relu) -> Tensor",
    "backward_reduce(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
    "Tensor? bias, Tensor? output, bool relu) -> (Tensor sum_dy, Tensor sum_dy_xhat)",
    "backward_elementwise(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
    "Tensor? bias, Tensor? output, Tensor mean_dy, Tensor mean_dy_xhat, bool relu) -> Tensor",
};

}  // namespace fastbn
