// The argument checks all devices share (declared in checks.h). A separate file from ops.cpp so that the
// emulated CUDA build of the tests links the same checks without defining the fastbn library twice.
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>

#include "checks.h"

namespace fastbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Python's repr of a float (shortest round-trip form), so messages read as torch's Python checks do.
std::string py_float(double v) {
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);
  if (s.find_first_of(".eninf") == std::string::npos) s += ".0";
  return s;
}

std::string torch_size(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << "torch.Size([";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "])";
  return os.str();
}

bool is_16bit(c10::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

void check_same_device(const Tensor& input, const Tensor& t) {
  TORCH_CHECK(t.device() == input.device(),
              "Expected all tensors to be on the same device, but found at least two devices, ", input.device(),
              " and ", t.device(), "!");
}

void check_input(const Tensor& input) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(dtype == at::kFloat || dtype == at::kDouble || is_16bit(dtype),
                              "\"batch_norm\" not implemented for '", c10::toString(dtype), "'");
  TORCH_CHECK_INDEX(input.dim() >= 2, "Dimension out of range (expected to be in range of [",
                    -std::max<int64_t>(input.dim(), 1), ", ", std::max<int64_t>(input.dim(), 1) - 1,
                    "], but got 1)");
}

// weight, bias and running statistics: C elements, the input's device, one shared dtype that is the
// input's or (for a 16-bit input) float32.
void check_params(const Tensor& input,
                  std::initializer_list<std::pair<const char*, const OptTensor*>> params) {
  const int64_t channels = input.size(1);
  const char* first_name = nullptr;
  c10::ScalarType first_dtype = input.scalar_type();
  for (const auto& [name, param] : params) {
    if (!param->has_value() || !(*param)->defined()) continue;
    const Tensor& t = **param;
    check_same_device(input, t);
    TORCH_CHECK(t.numel() == channels, name, " should contain ", channels, " elements not ", t.numel());
    const bool allowed =
        t.scalar_type() == input.scalar_type() || (is_16bit(input.scalar_type()) && t.scalar_type() == at::kFloat);
    TORCH_CHECK(allowed, "batch_norm: expected ", name, " to have scalar type ", input.scalar_type(),
                is_16bit(input.scalar_type()) ? " or Float" : "", " for ", input.scalar_type(),
                " input, but got ", t.scalar_type());
    if (first_name == nullptr) {
      first_name = name;
      first_dtype = t.scalar_type();
    } else {
      TORCH_CHECK(t.scalar_type() == first_dtype, "batch_norm: expected ", name, " to have scalar type ",
                  first_dtype, " like ", first_name, ", but got ", t.scalar_type());
    }
  }
}

// mean, invstd and the other per-channel statistics: C elements of the accumulation type.
void check_stats(const Tensor& input, std::initializer_list<std::pair<const char*, const Tensor*>> stats) {
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [name, t] : stats) {
    check_same_device(input, *t);
    TORCH_CHECK(t->numel() == input.size(1), name, " should contain ", input.size(1), " elements not ", t->numel());
    TORCH_CHECK(t->scalar_type() == acc, "expected scalar type ", acc, " but found ", t->scalar_type(), " (", name,
                ")");
  }
}

void check_same_as_input(const Tensor& input, const Tensor& t, const char* name) {
  check_same_device(input, t);
  TORCH_CHECK(t.sizes() == input.sizes(), "Expected ", name, " to have the same size as input, but got ", name,
              " of size ", t.sizes(), " and input of size ", input.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "expected scalar type ", input.scalar_type(), " but found ",
              t.scalar_type(), " (", name, ")");
}

// residual, and the forward's output handed to the backward ops: optional, shaped and typed like the input.
void check_same_as_input(const Tensor& input, const OptTensor& t, const char* name) {
  if (t.has_value() && t->defined()) check_same_as_input(input, *t, name);
}

}  // namespace

c10::ScalarType param_dtype(const Tensor& input, std::initializer_list<const OptTensor*> params) {
  for (const OptTensor* p : params) {
    if (p->has_value() && (*p)->defined()) return (*p)->scalar_type();
  }
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_forward_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                         const OptTensor& residual, const OptTensor& running_mean, const OptTensor& running_var,
                         const OptTensor& num_batches_tracked, std::optional<double> momentum, double eps) {
  check_input(input);
  check_params(input, {{"weight", &weight},
                       {"bias", &bias},
                       {"running_mean", &running_mean},
                       {"running_var", &running_var}});
  check_same_as_input(input, residual, "residual");
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_mean == has_var, "running_mean and running_var must either both be None or neither be None");
  const bool has_count = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (has_count) {
    check_same_device(input, *num_batches_tracked);
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1,
                "batch_norm: num_batches_tracked must be a Long tensor with one element, but got a ",
                num_batches_tracked->scalar_type(), " tensor of size ", num_batches_tracked->sizes());
  }
  TORCH_CHECK(momentum.has_value() || !has_mean || has_count,
              "batch_norm: momentum=None (cumulative moving average) needs num_batches_tracked");
  int64_t values_per_channel = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) values_per_channel *= input.size(d);
  TORCH_CHECK_VALUE(values_per_channel != 1, "Expected more than 1 value per channel when training, got input size ",
                    torch_size(input.sizes()));
  TORCH_CHECK_VALUE(eps > 0.0, "batch_norm eps must be positive during training, but got ", py_float(eps));
}

void check_forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& residual, const Tensor& running_mean, const Tensor& running_var, double eps) {
  check_input(input);
  const OptTensor mean(running_mean), var(running_var);
  check_params(input, {{"weight", &weight}, {"bias", &bias}, {"running_mean", &mean}, {"running_var", &var}});
  check_same_as_input(input, residual, "residual");
  TORCH_CHECK_VALUE(eps >= 0.0, "batch_norm eps must be non-negative, but got ", py_float(eps));
}

void check_backward(const Tensor& grad_output, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor& output, const Tensor& mean, const Tensor& invstd) {
  check_input(input);
  check_same_as_input(input, grad_output, "grad_output");
  check_params(input, {{"weight", &weight}, {"bias", &bias}});
  check_same_as_input(input, output, "output");
  check_stats(input, {{"mean", &mean}, {"invstd", &invstd}});
}

void check_local_stats(const Tensor& input) { check_input(input); }

void check_normalize(const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                     const OptTensor& bias, const OptTensor& residual) {
  check_input(input);
  check_params(input, {{"weight", &weight}, {"bias", &bias}});
  check_same_as_input(input, residual, "residual");
  check_stats(input, {{"mean", &mean}, {"invstd", &invstd}});
}

void check_backward_elementwise(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                const OptTensor& output, const Tensor& mean_dy, const Tensor& mean_dy_xhat) {
  check_backward(grad_output, input, weight, bias, output, mean, invstd);
  check_stats(input, {{"mean_dy", &mean_dy}, {"mean_dy_xhat", &mean_dy_xhat}});
}

}  // namespace fastbn

