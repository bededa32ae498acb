// Argument checks shared by every device (defined in checks.cpp), with messages in torch's wording.
// They run before an implementation touches any state, so a bad call leaves running statistics and
// num_batches_tracked as they were.
#pragma once

#include "ops.h"

namespace fastbn {

void check_forward_train(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& running_mean,
                         const std::optional<at::Tensor>& running_var,
                         const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
                         double eps);
void check_forward_eval(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                        const at::Tensor& running_mean, const at::Tensor& running_var, double eps);
void check_backward(const at::Tensor& grad_output, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& output,
                    const at::Tensor& mean, const at::Tensor& invstd);
void check_local_stats(const at::Tensor& input);
void check_normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& residual);
void check_backward_elementwise(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                                const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& output,
                                const at::Tensor& mean_dy, const at::Tensor& mean_dy_xhat);

// dtype of weight/bias/running statistics: the first one given, else the input's accumulation type.
c10::ScalarType param_dtype(const at::Tensor& input, std::initializer_list<const std::optional<at::Tensor>*> params);

}  // namespace fastbn

// Registers a device's implementations (namespace NS, declared with FASTBN_DECLARE_OPS) behind the
// shared checks. Used once per device: ops.cpp for CPU, cuda/register.cu for CUDA (and the emulated CUDA
// build of the tests, which registers the same implementations under the library fastbn_simt).
#define FASTBN_REGISTER_OPS(LIB, NS)                                                                        \
  do {                                                                                                      \
    using at::Tensor;                                                                                       \
    using OptT = std::optional<at::Tensor>;                                                                 \
    LIB.impl("forward_train", [](const Tensor& x, const OptT& w, const OptT& b, const OptT& r,              \
                                 const OptT& rm, const OptT& rv, const OptT& nbt,                           \
                                 std::optional<double> momentum, double eps, bool relu) {                   \
      ::fastbn::check_forward_train(x, w, b, r, rm, rv, nbt, momentum, eps);                                \
      return ::fastbn::NS::forward_train(x, w, b, r, rm, rv, nbt, momentum, eps, relu);                     \
    });                                                                                                     \
    LIB.impl("forward_eval", [](const Tensor& x, const OptT& w, const OptT& b, const OptT& r,               \
                                const Tensor& rm, const Tensor& rv, double eps, bool relu) {                \
      ::fastbn::check_forward_eval(x, w, b, r, rm, rv, eps);                                                \
      return ::fastbn::NS::forward_eval(x, w, b, r, rm, rv, eps, relu);                                    \
    });                                                                                                     \
    LIB.impl("backward", [](const Tensor& dy, const Tensor& x, const OptT& w, const OptT& b,                \
                            const OptT& y, const Tensor& mean, const Tensor& invstd, bool training,         \
                            bool relu, std::array<bool, 4> mask) {                                          \
      ::fastbn::check_backward(dy, x, w, b, y, mean, invstd);                                               \
      return ::fastbn::NS::backward(dy, x, w, b, y, mean, invstd, training, relu, mask);                    \
    });                                                                                                     \
    LIB.impl("local_stats", [](const Tensor& x) {                                                           \
      ::fastbn::check_local_stats(x);                                                                       \
      return ::fastbn::NS::local_stats(x);                                                                  \
    });                                                                                                     \
    LIB.impl("normalize", [](const Tensor& x, const Tensor& mean, const Tensor& invstd, const OptT& w,      \
                             const OptT& b, const OptT& r, bool relu) {                                     \
      ::fastbn::check_normalize(x, mean, invstd, w, b, r);                                                  \
      return ::fastbn::NS::normalize(x, mean, invstd, w, b, r, relu);                                       \
    });                                                                                                     \
    LIB.impl("backward_reduce", [](const Tensor& dy, const Tensor& x, const Tensor& mean,                   \
                                   const Tensor& invstd, const OptT& w, const OptT& b, const OptT& y,       \
                                   bool relu) {                                                             \
      ::fastbn::check_backward(dy, x, w, b, y, mean, invstd);                                               \
      return ::fastbn::NS::backward_reduce(dy, x, mean, invstd, w, b, y, relu);                             \
    });                                                                                                     \
    LIB.impl("backward_elementwise", [](const Tensor& dy, const Tensor& x, const Tensor& mean,              \
                                        const Tensor& invstd, const OptT& w, const OptT& b, const OptT& y,  \
                                        const Tensor& mean_dy, const Tensor& mean_dy_xhat, bool relu) {     \
      ::fastbn::check_backward_elementwise(dy, x, mean, invstd, w, b, y, mean_dy, mean_dy_xhat);            \
      return ::fastbn::NS::backward_elementwise(dy, x, mean, invstd, w, b, y, mean_dy, mean_dy_xhat, relu); \
    });                                                                                                     \
  } while (0)
