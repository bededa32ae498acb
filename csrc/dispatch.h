// The one dtype dispatch and the one runtime-flag-to-template switch of fastbn.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace fastbn {

// scalar_t: element type of input/output/residual/grad tensors.
// param_t:  element type of weight, bias and running statistics (scalar_t, or float for 16-bit inputs:
//           torch's mixed mode).
// acc_t:    accumulation and saved-statistics type: float, or double for double inputs.
template <typename Scalar, typename Param>
struct DispatchTypes {
  using scalar_t = Scalar;
  using param_t = Param;
  using acc_t = at::opmath_type<Scalar>;
};

template <typename Body>
decltype(auto) dispatch_types(c10::ScalarType input, c10::ScalarType param, const char* name, Body&& body) {
  using c10::ScalarType;
  const bool param_is_float = param == ScalarType::Float;
  switch (input) {
    case ScalarType::Float:
      return body(DispatchTypes<float, float>{});
    case ScalarType::Double:
      return body(DispatchTypes<double, double>{});
    case ScalarType::Half:
      return param_is_float ? body(DispatchTypes<c10::Half, float>{}) : body(DispatchTypes<c10::Half, c10::Half>{});
    case ScalarType::BFloat16:
      return param_is_float ? body(DispatchTypes<c10::BFloat16, float>{})
                            : body(DispatchTypes<c10::BFloat16, c10::BFloat16>{});
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, '"', name, "\" not implemented for '", c10::toString(input), "'");
  }
}

}  // namespace fastbn

// FASTBN_DISPATCH(input.scalar_type(), param_dtype, "name", [&] { ... scalar_t, param_t, acc_t ... });
#define FASTBN_DISPATCH(INPUT_DTYPE, PARAM_DTYPE, NAME, ...)                                   \
  ::fastbn::dispatch_types(INPUT_DTYPE, PARAM_DTYPE, NAME, [&](auto fastbn_types_) {          \
    using scalar_t [[maybe_unused]] = typename decltype(fastbn_types_)::scalar_t;              \
    using param_t [[maybe_unused]] = typename decltype(fastbn_types_)::param_t;                \
    using acc_t [[maybe_unused]] = typename decltype(fastbn_types_)::acc_t;                    \
    return __VA_ARGS__();                                                                      \
  })

// BOOL_SWITCH(has_residual, kResidual, [&] { kernel<kResidual>(...); });
#define BOOL_SWITCH(COND, CONST_NAME, ...)                 \
  [&] {                                                    \
    if (COND) {                                            \
      [[maybe_unused]] constexpr bool CONST_NAME = true;   \
      return __VA_ARGS__();                                \
    } else {                                               \
      [[maybe_unused]] constexpr bool CONST_NAME = false;  \
      return __VA_ARGS__();                                \
    }                                                      \
  }()
