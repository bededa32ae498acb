// The Autograd kernels of forward_train and forward_eval, so that torch.ops.fastbn.forward_train/forward_eval
// (and everything built on them: fastbn.functional.batch_norm, the modules) are differentiable, with the whole
// graph bookkeeping in C++: a Python autograd.Function cost 30-50 us per layer and training step over torch's own
// BatchNorm (fastbn.BatchNorm2d forward and backward of a 2x8x4x4 input, 2-core EPYC, torch.utils.benchmark: 99-123
// us against torch's 68-73 through Python, 75-87 against torch's 41-74 here).
//
// The backward calls the backward op (one fused pass where the kernels allow it). Under create_graph (double
// backward) it differentiates instead a composite of ATen ops that autograd can differentiate again.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "op_tensors.h"
#include "ops.h"

namespace fastbn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops below autograd, called through the dispatcher (CPU or CUDA kernel, or a fake one while tracing).
const auto& forward_train_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::forward_train", "")
                             .typed<decltype(cpu::forward_train)>();
  return op;
}

const auto& forward_eval_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbn::forward_eval", "")
                             .typed<decltype(cpu::forward_eval)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastbn::backward", "").typed<decltype(cpu::backward)>();
  return op;
}

Tensor value_or_undefined(const OptTensor& t) { return defined(t) ? *t : Tensor(); }

// Whether autograd must record the op: grad mode on and input, weight, bias or residual requiring grad.
bool records_graph(const Tensor& input, std::initializer_list<const OptTensor*> params) {
  if (!at::GradMode::is_enabled()) return false;
  if (input.requires_grad()) return true;
  for (const OptTensor* p : params) {
    if (defined(*p) && (*p)->requires_grad()) return true;
  }
  return false;
}

// BN forward (and ReLU) in ATen ops; batch statistics when mean is undefined (training).
Tensor reference_forward(const Tensor& input, const Tensor& weight, const Tensor& bias, Tensor mean, Tensor invstd,
                         bool relu, double eps) {
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = -1;
  const Tensor x = input.to(acc_dtype(input));
  if (!mean.defined()) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
    Tensor var;
    std::tie(var, mean) = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
    invstd = at::rsqrt(var + eps);
  }
  Tensor y = (x - mean.view(shape)) * invstd.view(shape);
  if (weight.defined()) y = y * weight.to(y.scalar_type()).view(shape);
  if (bias.defined()) y = y + bias.to(y.scalar_type()).view(shape);
  if (relu) y = at::relu(y);
  return y.to(input.scalar_type());
}

// What both Functions save: the tensors the backward op reads, and its flags.
struct Saved {
  Tensor input, weight, bias, output, mean, invstd;
  bool training, relu;
  double eps;
};

// The output the backward masks the ReLU with: the forward's output after a residual add (which the next layer
// keeps anyway, as torch's relu keeps its result), none where the kernels recompute the mask from the input.
Tensor mask_output(const OptTensor& residual, const Tensor& output, bool relu) {
  return relu && defined(residual) ? output : Tensor();
}

// Also records the edge of each of (input, weight, bias, residual), -1 where it was not given: autograd numbers
// only the tensors passed, in argument order.
void save(AutogradContext* ctx, const Saved& s, const OptTensor& residual) {
  ctx->save_for_backward({s.input, s.weight, s.bias, s.output, s.mean, s.invstd});
  ctx->saved_data["training"] = s.training;
  ctx->saved_data["relu"] = s.relu;
  ctx->saved_data["eps"] = s.eps;
  int64_t next = 1;  // the input is edge 0
  auto edge = [&](bool given) { return given ? next++ : int64_t(-1); };
  const int64_t w = edge(s.weight.defined()), b = edge(s.bias.defined());
  ctx->saved_data["edges"] = std::vector<int64_t>{0, w, b, edge(defined(residual))};
}

Saved load(AutogradContext* ctx) {
  const variable_list t = ctx->get_saved_variables();
  return {t[0], t[1], t[2], t[3], t[4], t[5], ctx->saved_data["training"].toBool(), ctx->saved_data["relu"].toBool(),
          ctx->saved_data["eps"].toDouble()};
}

// Gradients of (input, weight, bias, residual), undefined where not wanted: the backward op, or the composite
// under create_graph.
std::array<Tensor, 4> gradients(AutogradContext* ctx, Tensor grad_output) {
  const Saved s = load(ctx);
  const std::vector<int64_t> edges = ctx->saved_data["edges"].toIntVector();
  std::array<bool, 4> needs{};
  for (int i = 0; i < 4; ++i) needs[i] = edges[i] >= 0 && ctx->needs_input_grad(edges[i]);
  std::array<Tensor, 4> grads;
  if (at::GradMode::is_enabled()) {
    // create_graph=True: autograd through reference_forward. After a residual add the ReLU's gradient is
    // grad_output where the output is > 0 (threshold_backward's mask, a constant to autograd), which is also the
    // residual's gradient and what BN's backward receives.
    bool relu = s.relu;
    if (s.output.defined()) {
      grad_output = at::where(s.output > 0, grad_output, at::zeros({}, grad_output.options()));
      relu = false;
    }
    const std::array<Tensor, 3> params{s.input, s.weight, s.bias};
    variable_list wanted;
    for (int i = 0; i < 3; ++i) {
      if (needs[i] && params[i].defined()) wanted.push_back(params[i]);
    }
    if (!wanted.empty()) {
      const Tensor y = s.training ? reference_forward(s.input, s.weight, s.bias, {}, {}, relu, s.eps)
                                  : reference_forward(s.input, s.weight, s.bias, s.mean.detach(),
                                                      s.invstd.detach(), relu, s.eps);
      const variable_list found =
          torch::autograd::grad({y}, wanted, {grad_output}, /*retain_graph=*/std::nullopt, /*create_graph=*/true,
                                /*allow_unused=*/true);
      size_t k = 0;
      for (int i = 0; i < 3; ++i) {
        if (needs[i] && params[i].defined()) grads[i] = found[k++];
      }
    }
    if (needs[3]) grads[3] = grad_output;
    return grads;
  }
  // Without a ReLU the residual's gradient is grad_output itself: no kernel work.
  const std::array<bool, 4> mask{needs[0], needs[1], needs[2], needs[3] && s.relu};
  if (mask[0] || mask[1] || mask[2] || mask[3]) {
    auto [dx, dw, db, dr] = backward_op().call(grad_output, s.input, s.weight, s.bias, s.output, s.mean, s.invstd,
                                               s.training, s.relu, mask);
    const std::array<Tensor, 4> all{dx, dw, db, dr};
    for (int i = 0; i < 4; ++i) {
      if (mask[i]) grads[i] = all[i];
    }
  }
  if (needs[3] && !s.relu) grads[3] = grad_output;
  return grads;
}

struct TrainingBatchNorm : public torch::autograd::Function<TrainingBatchNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked,
                               std::optional<double> momentum, double eps, bool relu) {
    auto [output, mean, invstd] = [&] {
      at::AutoDispatchBelowAutograd below;
      return forward_train_op().call(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                     momentum, eps, relu);
    }();
    save(ctx, {input, value_or_undefined(weight), value_or_undefined(bias), mask_output(residual, output, relu),
               mean, invstd, true, relu, eps},
         residual);
    ctx->mark_non_differentiable({mean, invstd});
    return {output, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto [dx, dw, db, dr] = gradients(ctx, grad_outputs[0]);
    return {dx, dw, db, dr, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

struct EvalBatchNorm : public torch::autograd::Function<EvalBatchNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                        const OptTensor& residual, const Tensor& running_mean, const Tensor& running_var,
                        double eps, bool relu) {
    const Tensor output = [&] {
      at::AutoDispatchBelowAutograd below;
      return forward_eval_op().call(input, weight, bias, residual, running_mean, running_var, eps, relu);
    }();
    // Saved as values, not as the buffers, so a later in-place update of the running statistics cannot
    // invalidate this graph. sqrt then reciprocal, both correctly rounded, as the kernels compute it: the
    // backward's recomputed ReLU mask must match the forward's bit for bit (rsqrt may be approximate on GPUs).
    const auto acc = acc_dtype(input);
    const Tensor mean = running_mean.detach().to(acc, /*non_blocking=*/false, /*copy=*/true);
    const Tensor invstd = at::sqrt(running_var.detach().to(acc) + eps).reciprocal();
    save(ctx, {input, value_or_undefined(weight), value_or_undefined(bias), mask_output(residual, output, relu),
               mean, invstd, false, relu, eps},
         residual);
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto [dx, dw, db, dr] = gradients(ctx, grad_outputs[0]);
    return {dx, dw, db, dr, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Straight to the op below autograd when no gradient can flow (inference, the running statistics' update under
// no_grad): the same result without recording a node.
std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& residual, const OptTensor& running_mean,
                                                 const OptTensor& running_var, const OptTensor& num_batches_tracked,
                                                 std::optional<double> momentum, double eps, bool relu) {
  if (!records_graph(input, {&weight, &bias, &residual})) {
    at::AutoDispatchBelowAutograd below;
    return forward_train_op().call(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                   momentum, eps, relu);
  }
  const variable_list out = TrainingBatchNorm::apply(input, weight, bias, residual, running_mean, running_var,
                                                     num_batches_tracked, momentum, eps, relu);
  return {out[0], out[1], out[2]};
}

Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                    const Tensor& running_mean, const Tensor& running_var, double eps, bool relu) {
  if (!records_graph(input, {&weight, &bias, &residual})) {
    at::AutoDispatchBelowAutograd below;
    return forward_eval_op().call(input, weight, bias, residual, running_mean, running_var, eps, relu);
  }
  return EvalBatchNorm::apply(input, weight, bias, residual, running_mean, running_var, eps, relu);
}

}  // namespace
}  // namespace fastbn

TORCH_LIBRARY_IMPL(fastbn, Autograd, m) {
  m.impl("forward_train", &fastbn::forward_train);
  m.impl("forward_eval", &fastbn::forward_eval);
}
