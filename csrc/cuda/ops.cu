// The seven fastbn ops on CUDA (declared by FASTBN_DECLARE_OPS in ops.h; argument checks already done by the
// wrappers of FASTBN_REGISTER_OPS). Each op picks its layout from the strides and its path from the size:
//
//  - layout: planes when each sample of the input is an NCHW-contiguous block and planes hold more than one
//    value; rows when the channels are contiguous and the other dims make one uniform row stride (channels_last
//    2d/3d, (N, C), (N, C, 1, 1)). The input's samples or rows may lie further apart than a dense tensor's: its
//    channel slices (x.chunk(2, dim=1)), every other sample, columns of an (N, C) matrix run in place (x_outer).
//    Any other input (crops, transposed or permuted spatial dims, steps inside a plane) runs on a contiguous copy,
//    its outputs copied into tensors of at::empty_like(input)'s strides where those differ. grad_output /
//    residual / output that are not dense in the input's layout are copied into it first. Those copies are the
//    only ones, and only for those cases.
//  - path (forward-train, training backward with grad_input): the persistent single-read kernels when the
//    tensor fits in the registers of the blocks that can be resident at once (max_cooperative_blocks), else
//    two passes. FASTBN_CUDA_PATH=persistent|two_pass|auto overrides it (tests, benchmarks); "persistent"
//    still takes two passes when the tensor does not fit. Eval backward is one pass: the reduction kernel writes
//    dx when dw or db is asked, the elementwise kernel alone runs otherwise.
//  - 16-byte vectors when every big tensor is 16-byte aligned and the plane (planes) or row (rows) length and x's
//    outer stride are multiples of a pack; otherwise the same kernels run on single elements (misaligned views,
//    odd tails).
//  - 32-bit indexing when the offsets fit, else 64-bit.
//
// No host synchronisation anywhere: scratch space comes from the caching allocator, num_batches_tracked is
// read and incremented on the device, so a CUDA graph captures every op.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "op_tensors.h"
#include "cuda/plan.cuh"
#include "ops.h"

namespace fastbn {
namespace cuda {

PathChoice path_choice() {
  const char* env = std::getenv("FASTBN_CUDA_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return PathChoice::kAuto;
  if (std::strcmp(env, "persistent") == 0) return PathChoice::kPersistent;
  if (std::strcmp(env, "two_pass") == 0) return PathChoice::kTwoPass;
  TORCH_CHECK(false, "FASTBN_CUDA_PATH must be persistent, two_pass or auto, got '", env, "'");
}

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

const OptTensor& none() {
  static const OptTensor n;
  return n;
}


// The outer stride of a tensor of these sizes and strides in `layout`: planes, each sample a contiguous (C, S)
// block, the stride between samples; rows, the channels contiguous and the other dims (0, 2, 3, ...) one run of
// rows, the stride between rows. nullopt when the tensor is not laid out that way. Dims of size 1 have no say; a
// single sample or row gets the dense stride.
std::optional<int64_t> outer_stride(Layout layout, at::IntArrayRef sizes, at::IntArrayRef strides) {
  const int64_t dim = static_cast<int64_t>(sizes.size());
  if (layout == Layout::kPlanes) {
    int64_t expected = 1;
    for (int64_t d = dim - 1; d >= 1; --d) {
      if (sizes[d] != 1 && strides[d] != expected) return std::nullopt;
      expected *= sizes[d];
    }
    return sizes[0] == 1 ? expected : strides[0];
  }
  if (sizes[1] != 1 && strides[1] != 1) return std::nullopt;
  std::optional<int64_t> row;
  int64_t expected = 0;
  for (int64_t d = dim - 1; d >= 0; --d) {  // the row dims, innermost first: ..., 3, 2, 0
    if (d == 1 || sizes[d] == 1) continue;
    if (!row) {
      row = strides[d];
    } else if (strides[d] != expected) {
      return std::nullopt;
    }
    expected = strides[d] * sizes[d];
  }
  return row.value_or(sizes[1]);
}

// The strides at::empty_like(input) gives the outputs: the input's own when it is dense, else dense strides in the
// input's dimension order, read off a meta tensor made the same way (which allocates nothing).
std::vector<int64_t> output_strides(const Tensor& input) {
  if (input.is_non_overlapping_and_dense()) return input.strides().vec();
  return at::empty_like(input, input.options().device(at::kMeta)).strides().vec();
}

// The layout of `input` (its outputs dense in it), or nullopt for the fallback on a contiguous copy.
std::optional<Geometry> classify(const Tensor& input) {
  Geometry g;
  g.numel = input.numel();
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.S *= input.size(d);
  g.m = g.C == 0 ? 0 : g.numel / g.C;
  g.R = g.m;
  const std::vector<int64_t> out_strides = output_strides(input);
  const auto fits = [&](Layout layout) {
    g.layout = layout;
    const auto x_outer = outer_stride(layout, input.sizes(), input.strides());
    if (!x_outer || outer_stride(layout, input.sizes(), out_strides) != g.dense_outer()) return false;
    g.x_outer = *x_outer;
    return true;
  };
  if (!(g.S > 1 && fits(Layout::kPlanes)) && !fits(Layout::kRows)) return std::nullopt;
  // Offsets plus one grid stride must stay below 2^31 for 32-bit indexing; so must x's last offset.
  const int64_t limit = std::numeric_limits<int32_t>::max() - (int64_t(1) << 26);
  const int64_t x_last = ((g.layout == Layout::kPlanes ? g.N : g.R) - 1) * g.x_outer + g.dense_outer();
  g.idx64 = g.numel > limit || x_last > limit;
  return g;
}

bool dense_in_layout(const Geometry& g, const Tensor& t) {
  return outer_stride(g.layout, t.sizes(), t.strides()) == g.dense_outer();
}

// t (grad_output, residual, the forward's output) in the input's layout: itself, or a copy when it is laid out
// differently.
Tensor in_layout(const Geometry& g, const Tensor& input, const Tensor& t) {
  if (dense_in_layout(g, t)) return t;
  Tensor copy = at::empty_like(input);
  copy.copy_(t);
  return copy;
}
OptTensor in_layout(const Geometry& g, const Tensor& input, const OptTensor& t) {
  if (!defined(t)) return t;
  return in_layout(g, input, *t);
}

template <typename scalar_t>
void set_alignment(Geometry& g, std::initializer_list<const void*> pointers) {
  const int64_t pack = kPackSize<scalar_t>;
  bool ok = (g.layout == Layout::kPlanes ? g.S : g.C) % pack == 0 && g.x_outer % pack == 0;
  for (const void* p : pointers) ok = ok && (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0);
  g.aligned = ok;
}

template <typename T>
T* data(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return defined(t) ? static_cast<const T*>(t->data_ptr()) : nullptr;
}
template <typename T>
ChannelIn<T> channel_in(const OptTensor& t) {
  return defined(t) ? ChannelIn<T>{static_cast<const T*>(t->data_ptr()), t->stride(0)} : ChannelIn<T>{nullptr, 0};
}
template <typename T>
ChannelIn<T> channel_in(const Tensor& t) {
  return ChannelIn<T>{static_cast<const T*>(t.data_ptr()), t.stride(0)};
}

// Normalize coefficients from saved (or all-reduced) statistics; eval sets from_running instead.
template <typename P, typename A>
NormParams<P, A> norm_params(const OptTensor& mean, const OptTensor& invstd, const OptTensor& weight,
                             const OptTensor& bias) {
  NormParams<P, A> params{};
  params.mean = channel_in<A>(mean);
  params.invstd = channel_in<A>(invstd);
  params.from_running = false;
  params.weight = channel_in<P>(weight);
  params.bias = channel_in<P>(bias);
  return params;
}

// Backward coefficients (without the mean terms) and the matching reduction epilogue (without outputs).
template <typename P, typename A>
BwdParams<P, A> bwd_params(const Tensor& mean, const Tensor& invstd, const OptTensor& weight, const OptTensor& bias) {
  BwdParams<P, A> params{};
  params.mean = channel_in<A>(mean);
  params.invstd = channel_in<A>(invstd);
  params.weight = channel_in<P>(weight);
  params.bias = channel_in<P>(bias);
  return params;
}
template <typename P, typename A>
BwdReduceOut<P, A> bwd_reduce_out(const BwdParams<P, A>& params, int64_t m) {
  BwdReduceOut<P, A> out{};
  out.invstd = params.invstd;
  out.m = m;
  return out;
}

// A result computed on a contiguous copy, with the strides at::empty_like(input) gives: itself when it has them
// (an input that is not dense gets dense outputs in its dimension order), else a copy.
Tensor like_input(const Tensor& input, const Tensor& result) {
  if (result.strides() == at::IntArrayRef(output_strides(input))) return result;
  Tensor out = at::empty_like(input);
  out.copy_(result);
  return out;
}

OptTensor contiguous_or_none(const OptTensor& t) {
  if (!defined(t)) return t;
  return t->contiguous();
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> forward_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                 const OptTensor& residual, const OptTensor& running_mean,
                                                 const OptTensor& running_var, const OptTensor& num_batches_tracked,
                                                 std::optional<double> momentum, double eps, bool relu) {
  const DeviceGuard guard(input);
  const auto acc = acc_dtype(input);
  if (input.numel() == 0) {
    if (defined(num_batches_tracked)) num_batches_tracked->add_(1);
    return {at::empty_like(input), zero_channels(input, acc), zero_channels(input, acc)};
  }
  std::optional<Geometry> geom = classify(input);
  if (!geom) {
    auto [y, mean, invstd] = forward_train(input.contiguous(), weight, bias, contiguous_or_none(residual),
                                           running_mean, running_var, num_batches_tracked, momentum, eps, relu);
    return {like_input(input, y), mean, invstd};
  }
  Geometry g = *geom;
  const OptTensor res = in_layout(g, input, residual);
  Tensor output = at::empty_like(input);
  Tensor save_mean = empty_channels(input, acc);
  Tensor save_invstd = empty_channels(input, acc);
  const auto param = param_dtype(input, {&weight, &bias, &running_mean, &running_var});
  int64_t* nbt = defined(num_batches_tracked) ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_forward_train", [&] {
    const scalar_t* x = data<const scalar_t>(input);
    const scalar_t* r = ptr_or_null<scalar_t>(res);
    scalar_t* y = data<scalar_t>(output);
    set_alignment<scalar_t>(g, {x, r, y});
    StatsOut<param_t, acc_t> out{};
    out.mean = save_mean.data_ptr<acc_t>();
    out.second = save_invstd.data_ptr<acc_t>();
    out.second_is_var = false;
    out.eps = eps;
    out.m = g.m;
    if (defined(running_mean)) {
      out.running_mean = static_cast<param_t*>(running_mean->data_ptr());
      out.rm_stride = running_mean->stride(0);
      out.running_var = static_cast<param_t*>(running_var->data_ptr());
      out.rv_stride = running_var->stride(0);
    }
    out.num_batches_tracked = nbt;
    out.has_momentum = momentum.has_value();
    out.momentum = momentum.value_or(0.0);
    const auto params = norm_params<param_t, acc_t>(save_mean, save_invstd, weight, bias);
    if (path_choice() != PathChoice::kTwoPass &&
        launch_persistent_forward<scalar_t, param_t, acc_t>(g, input, x, r, y, out, params, nbt, relu))
      return;
    launch_stats<scalar_t, param_t, acc_t>(g, input, out);
    launch_normalize<scalar_t, param_t, acc_t>(g, input, x, r, y, params, nbt, relu);
  });
  return {output, save_mean, save_invstd};
}

Tensor forward_eval(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                    const Tensor& running_mean, const Tensor& running_var, double eps, bool relu) {
  const DeviceGuard guard(input);
  if (input.numel() == 0) return at::empty_like(input);
  std::optional<Geometry> geom = classify(input);
  if (!geom)
    return like_input(input, forward_eval(input.contiguous(), weight, bias, contiguous_or_none(residual), running_mean,
                                          running_var, eps, relu));
  Geometry g = *geom;
  const OptTensor res = in_layout(g, input, residual);
  Tensor output = at::empty_like(input);
  const OptTensor rm(running_mean), rv(running_var);
  const auto param = param_dtype(input, {&weight, &bias, &rm, &rv});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_forward_eval", [&] {
    const scalar_t* x = data<const scalar_t>(input);
    const scalar_t* r = ptr_or_null<scalar_t>(res);
    scalar_t* y = data<scalar_t>(output);
    set_alignment<scalar_t>(g, {x, r, y});
    auto params = norm_params<param_t, acc_t>(none(), none(), weight, bias);
    params.rmean = channel_in<param_t>(running_mean);
    params.rvar = channel_in<param_t>(running_var);
    params.from_running = true;
    params.eps = eps;
    launch_normalize<scalar_t, param_t, acc_t>(g, input, x, r, y, params, nullptr, relu);
  });
  return output;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    const OptTensor& output, const Tensor& mean,
                                                    const Tensor& invstd, bool training, bool relu,
                                                    std::array<bool, 4> output_mask) {
  const DeviceGuard guard(input);
  const auto [need_dx, need_dw, need_db, need_dr] = output_mask;
  const auto param = param_dtype(input, {&weight, &bias});
  const bool empty = input.numel() == 0;
  std::optional<Geometry> geom = empty ? std::nullopt : classify(input);
  if (!empty && !geom) {
    auto [dx, dw, db, dr] = backward(grad_output.contiguous(), input.contiguous(), weight, bias,
                                     contiguous_or_none(output), mean, invstd, training, relu, output_mask);
    return {need_dx ? like_input(input, dx) : dx, dw, db, need_dr ? like_input(input, dr) : dr};
  }
  Tensor dx, dw, db, dr;
  std::tie(dx, dw, db, dr) = backward_outputs(input, param, output_mask);
  if (empty) return {dx, dw, db, dr};

  Geometry g = *geom;
  const Tensor dy = in_layout(g, input, grad_output);
  const OptTensor out_y = relu ? in_layout(g, input, output) : none();
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_backward", [&] {
    const scalar_t* x = data<const scalar_t>(input);
    const scalar_t* d = data<const scalar_t>(dy);
    const scalar_t* yp = ptr_or_null<scalar_t>(out_y);
    scalar_t* dxp = need_dx ? static_cast<scalar_t*>(dx.data_ptr()) : nullptr;
    scalar_t* drp = need_dr ? static_cast<scalar_t*>(dr.data_ptr()) : nullptr;
    set_alignment<scalar_t>(g, {x, d, yp, dxp, drp});
    auto params = bwd_params<param_t, acc_t>(mean, invstd, weight, bias);
    auto out = bwd_reduce_out(params, g.m);
    out.grad_weight = need_dw ? static_cast<param_t*>(dw.data_ptr()) : nullptr;
    out.grad_bias = need_db ? static_cast<param_t*>(db.data_ptr()) : nullptr;
    if (training && need_dx && path_choice() != PathChoice::kTwoPass &&
        launch_persistent_backward<scalar_t, param_t, acc_t>(g, input, d, x, yp, dxp, drp, params, out, relu))
      return;
    Tensor means;
    if (training && need_dx) {
      means = at::empty({2 * g.C}, input.options().dtype(acc_dtype(input)));
      out.mean_dy = means.data_ptr<acc_t>();
      out.mean_dy_xhat = out.mean_dy + g.C;
    }
    // Eval's dx = k*g needs no sums: with dw or db it is written by the reduction's pass (3E instead of 4E).
    const bool eval_in_reduce = !training && (need_dw || need_db);
    if (need_dw || need_db || (training && need_dx))
      launch_backward_reduce<scalar_t, param_t, acc_t>(g, input, d, x, yp, eval_in_reduce ? dxp : nullptr,
                                                       eval_in_reduce ? drp : nullptr, params, out, relu);
    if ((need_dx || need_dr) && !eval_in_reduce) {
      if (training && need_dx) {
        params.mean_dy = ChannelIn<acc_t>{out.mean_dy, 1};
        params.mean_dy_xhat = ChannelIn<acc_t>{out.mean_dy_xhat, 1};
      }
      launch_backward_elementwise<scalar_t, param_t, acc_t>(g, input, d, x, yp, dxp, drp, params, training, relu);
    }
  });
  return {dx, dw, db, dr};
}

std::tuple<Tensor, Tensor, Tensor> local_stats(const Tensor& input) {
  const DeviceGuard guard(input);
  const auto acc = acc_dtype(input);
  const int64_t C = input.size(1);
  const int64_t m = C == 0 ? 0 : input.numel() / C;
  Tensor count = at::full({}, static_cast<double>(m), input.options().dtype(acc));
  if (m == 0) return {zero_channels(input, acc), zero_channels(input, acc), count};
  std::optional<Geometry> geom = classify(input);
  if (!geom) return local_stats(input.contiguous());
  Geometry g = *geom;
  Tensor mean = empty_channels(input, acc);
  Tensor var = empty_channels(input, acc);
  FASTBN_DISPATCH(input.scalar_type(), acc, "fastbn_local_stats", [&] {
    set_alignment<scalar_t>(g, {input.data_ptr()});
    StatsOut<param_t, acc_t> out{};
    out.mean = mean.data_ptr<acc_t>();
    out.second = var.data_ptr<acc_t>();
    out.second_is_var = true;
    out.m = g.m;
    out.has_momentum = true;
    launch_stats<scalar_t, param_t, acc_t>(g, input, out);
  });
  return {mean, var, count};
}

Tensor normalize(const Tensor& input, const Tensor& mean, const Tensor& invstd, const OptTensor& weight,
                 const OptTensor& bias, const OptTensor& residual, bool relu) {
  const DeviceGuard guard(input);
  if (input.numel() == 0) return at::empty_like(input);
  std::optional<Geometry> geom = classify(input);
  if (!geom)
    return like_input(input,
                      normalize(input.contiguous(), mean, invstd, weight, bias, contiguous_or_none(residual), relu));
  Geometry g = *geom;
  const OptTensor res = in_layout(g, input, residual);
  Tensor output = at::empty_like(input);
  const auto param = param_dtype(input, {&weight, &bias});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_normalize", [&] {
    const scalar_t* x = data<const scalar_t>(input);
    const scalar_t* r = ptr_or_null<scalar_t>(res);
    scalar_t* y = data<scalar_t>(output);
    set_alignment<scalar_t>(g, {x, r, y});
    const auto params = norm_params<param_t, acc_t>(mean, invstd, weight, bias);
    launch_normalize<scalar_t, param_t, acc_t>(g, input, x, r, y, params, nullptr, relu);
  });
  return output;
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                           const Tensor& invstd, const OptTensor& weight, const OptTensor& bias,
                                           const OptTensor& output, bool relu) {
  const DeviceGuard guard(input);
  const auto acc = acc_dtype(input);
  if (input.numel() == 0) return {zero_channels(input, acc), zero_channels(input, acc)};
  std::optional<Geometry> geom = classify(input);
  if (!geom)
    return backward_reduce(grad_output.contiguous(), input.contiguous(), mean, invstd, weight, bias,
                           contiguous_or_none(output), relu);
  Geometry g = *geom;
  const Tensor dy = in_layout(g, input, grad_output);
  const OptTensor out_y = relu ? in_layout(g, input, output) : none();
  Tensor sum_dy = empty_channels(input, acc);
  Tensor sum_dy_xhat = empty_channels(input, acc);
  const auto param = param_dtype(input, {&weight, &bias});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_backward_reduce", [&] {
    const scalar_t* x = data<const scalar_t>(input);
    const scalar_t* d = data<const scalar_t>(dy);
    const scalar_t* yp = ptr_or_null<scalar_t>(out_y);
    set_alignment<scalar_t>(g, {x, d, yp});
    auto params = bwd_params<param_t, acc_t>(mean, invstd, weight, bias);
    auto out = bwd_reduce_out(params, g.m);
    out.sum_dy = sum_dy.data_ptr<acc_t>();
    out.sum_dy_xhat = sum_dy_xhat.data_ptr<acc_t>();
    launch_backward_reduce<scalar_t, param_t, acc_t>(g, input, d, x, yp, nullptr, nullptr, params, out, relu);
  });
  return {sum_dy, sum_dy_xhat};
}

Tensor backward_elementwise(const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& invstd,
                            const OptTensor& weight, const OptTensor& bias, const OptTensor& output,
                            const Tensor& mean_dy, const Tensor& mean_dy_xhat, bool relu) {
  const DeviceGuard guard(input);
  if (input.numel() == 0) return at::empty_like(input);
  std::optional<Geometry> geom = classify(input);
  if (!geom)
    return like_input(input, backward_elementwise(grad_output.contiguous(), input.contiguous(), mean, invstd, weight,
                                                  bias, contiguous_or_none(output), mean_dy, mean_dy_xhat, relu));
  Geometry g = *geom;
  const Tensor dy = in_layout(g, input, grad_output);
  const OptTensor out_y = relu ? in_layout(g, input, output) : none();
  Tensor dx = at::empty_like(input);
  const auto param = param_dtype(input, {&weight, &bias});
  FASTBN_DISPATCH(input.scalar_type(), param, "fastbn_backward_elementwise", [&] {
    const scalar_t* x = data<const scalar_t>(input);
    const scalar_t* d = data<const scalar_t>(dy);
    const scalar_t* yp = ptr_or_null<scalar_t>(out_y);
    scalar_t* dxp = static_cast<scalar_t*>(dx.data_ptr());
    set_alignment<scalar_t>(g, {x, d, yp, dxp});
    auto params = bwd_params<param_t, acc_t>(mean, invstd, weight, bias);
    params.mean_dy = channel_in<acc_t>(mean_dy);
    params.mean_dy_xhat = channel_in<acc_t>(mean_dy_xhat);
    launch_backward_elementwise<scalar_t, param_t, acc_t>(g, input, d, x, yp, dxp, nullptr, params, true, relu);
  });
  return dx;
}

}  // namespace cuda
}  // namespace fastbn
