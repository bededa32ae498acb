// Output and temporary tensors of the ops, allocated the same way on every device, so that the
// outputs' dtypes and shapes agree across devices and with the fake implementations (fastbn/ops.py).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastbn {

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Accumulation and saved-statistics dtype: float64 for float64 inputs, float32 otherwise.
inline c10::ScalarType acc_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// C values of `dtype` on the input's device.
inline at::Tensor empty_channels(const at::Tensor& input, c10::ScalarType dtype) {
  return at::empty({input.size(1)}, input.options().dtype(dtype));
}
inline at::Tensor zero_channels(const at::Tensor& input, c10::ScalarType dtype) {
  return at::zeros({input.size(1)}, input.options().dtype(dtype));
}

// An output that output_mask did not select.
inline at::Tensor empty_unselected(const at::Tensor& input) { return at::empty({0}, input.options()); }

// (grad_input, grad_weight, grad_bias, grad_residual) of the backward op: the input's memory format for
// the first and last, C values of the parameters' dtype for the others (zeros for an empty input, which
// no kernel touches). grad_residual is a fresh tensor even where it equals grad_output: the schema
// promises outputs that do not alias inputs.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_outputs(
    const at::Tensor& input, c10::ScalarType param, std::array<bool, 4> output_mask) {
  const auto [need_dx, need_dw, need_db, need_dr] = output_mask;
  const bool empty = input.numel() == 0;
  auto channels = [&](bool wanted) {
    if (!wanted) return empty_unselected(input);
    return empty ? zero_channels(input, param) : empty_channels(input, param);
  };
  return {need_dx ? at::empty_like(input) : empty_unselected(input), channels(need_dw), channels(need_db),
          need_dr ? at::empty_like(input) : empty_unselected(input)};
}

}  // namespace fastbn
