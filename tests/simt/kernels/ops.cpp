// torch.ops.fastbn_simt_test: the emulator's controls and its test kernels, on CPU tensors.
// Outputs are allocated here; the kernels (tests/simt/kernels/*.cu) only see pointers.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"
#include "emulator_controls.h"
#include "simt/runtime.h"

namespace simt_test {
namespace {

using at::Tensor;

void check(const Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype, name,
              ": expected a contiguous CPU tensor of ", dtype, ", got ", t.scalar_type());
}

template <typename T>
T* ptr(Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
template <typename T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

// --- reductions.cu
Tensor warp_sums_op(const Tensor& x) {
  check(x, at::kFloat, "warp_sums");
  TORCH_CHECK(x.numel() % 32 == 0, "warp_sums: a multiple of 32 values");
  Tensor out = at::empty({x.numel() / 32}, x.options());
  warp_sums(cptr<float>(x), ptr<float>(out), x.numel() / 32);
  return out;
}

Tensor block_sums_op(const Tensor& x, int64_t blocks, int64_t threads, int64_t repeats) {
  check(x, at::kDouble, "block_sums");
  Tensor out = at::full({blocks, repeats}, std::nan(""), x.options());
  block_sums(cptr<double>(x), ptr<double>(out), x.numel(), int(blocks), int(threads), int(repeats));
  return out;
}

Tensor block_stats_op(const Tensor& x, int64_t threads) {
  check(x, at::kFloat, "block_stats");
  Tensor out = at::empty({threads, 3}, x.options());
  block_stats(cptr<float>(x), ptr<float>(out), x.numel(), int(threads));
  return out;
}

Tensor block_merge_op(const Tensor& triples) {
  check(triples, at::kFloat, "block_merge");
  TORCH_CHECK(triples.dim() == 2 && triples.size(1) == 3, "block_merge: (threads, 3) triples");
  Tensor out = at::empty_like(triples);
  block_merge(cptr<float>(triples), ptr<float>(out), int(triples.size(0)));
  return out;
}

Tensor grid_sum_op(const Tensor& x, int64_t blocks, int64_t threads, Tensor counter) {
  check(x, at::kFloat, "grid_sum");
  check(counter, at::kInt, "grid_sum counter");
  Tensor out = at::full({}, std::nan(""), x.options());
  Tensor partials = at::full({blocks}, std::nan(""), x.options());
  grid_sum(cptr<float>(x), ptr<float>(out), ptr<float>(partials), reinterpret_cast<unsigned*>(ptr<int>(counter)),
           x.numel(), int(blocks), int(threads));
  return out;
}

Tensor grid_stats_op(const Tensor& x, int64_t blocks_per_row, int64_t threads, Tensor counters) {
  check(x, at::kDouble, "grid_stats");
  check(counters, at::kInt, "grid_stats counters");
  TORCH_CHECK(x.dim() == 2 && counters.numel() == x.size(0), "grid_stats: (rows, cols) input, one counter per row");
  Tensor out = at::full({x.size(0), 3}, std::nan(""), x.options());
  // Welford<double> is (mean, m2, count): 24 bytes per partial.
  Tensor partials = at::empty({x.size(0) * blocks_per_row * 24}, x.options().dtype(at::kByte));
  grid_stats(cptr<double>(x), ptr<double>(out), partials.data_ptr(), reinterpret_cast<unsigned*>(ptr<int>(counters)),
             x.size(0), x.size(1), int(blocks_per_row), int(threads));
  return out;
}

// --- cooperative.cu
std::tuple<Tensor, Tensor> center_op(const Tensor& x, int64_t blocks, int64_t threads) {
  check(x, at::kFloat, "center_cooperative");
  Tensor y = at::full_like(x, std::nan(""));
  Tensor partials = at::full({blocks}, std::nan(""), x.options());
  Tensor total = at::full({}, std::nan(""), x.options());
  center_cooperative(cptr<float>(x), ptr<float>(y), ptr<float>(partials), ptr<float>(total), x.numel(), int(blocks),
                     int(threads));
  return {y, total};
}

Tensor count_phases_op(int64_t phases, int64_t blocks, int64_t threads) {
  Tensor out = at::zeros({phases + phases * blocks}, at::kInt);
  count_phases_cooperative(ptr<int>(out), int(phases), int(blocks), int(threads));
  return out;
}

Tensor grid_sync_in_ordinary_launch_op() {
  Tensor out = at::zeros({32}, at::kInt);
  grid_sync_in_ordinary_launch(ptr<int>(out));
  return out;
}

// --- warp_ops.cu
Tensor warp_shuffle_op(const Tensor& values, const Tensor& operands, int64_t op, int64_t width) {
  check(values, at::kDouble, "warp_shuffle values");
  check(operands, at::kInt, "warp_shuffle operands");
  Tensor out = at::empty_like(values);
  warp_shuffle(cptr<double>(values), cptr<int>(operands), ptr<double>(out), int(op), int(width), int(values.numel()));
  return out;
}

Tensor warp_votes_op(const Tensor& predicates) {
  check(predicates, at::kInt, "warp_votes");
  const int64_t warps = (predicates.numel() + 31) / 32;
  Tensor out = at::zeros({warps, 3}, at::kInt);
  warp_votes(cptr<int>(predicates), reinterpret_cast<unsigned*>(ptr<int>(out)), int(predicates.numel()));
  return out;
}

Tensor block_votes_op(const Tensor& predicates) {
  check(predicates, at::kInt, "block_votes");
  Tensor out = at::zeros({predicates.numel(), 3}, at::kInt);
  block_votes(cptr<int>(predicates), ptr<int>(out), int(predicates.numel()));
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> atomics_op(int64_t blocks, int64_t threads) {
  Tensor ints = at::tensor({0, 0, 0, 0, 0, 0}, at::kInt);
  ints[1] = -1;
  ints[2] = 1;
  Tensor uints = at::zeros({4}, at::kInt);
  Tensor ulls = at::zeros({2}, at::kLong);
  Tensor floats = at::zeros({2}, at::kFloat);
  Tensor doubles = at::zeros({1}, at::kDouble);
  atomics(ptr<int>(ints), reinterpret_cast<unsigned*>(ptr<int>(uints)),
          reinterpret_cast<unsigned long long*>(ptr<int64_t>(ulls)), ptr<float>(floats), ptr<double>(doubles),
          int(blocks), int(threads));
  return {ints, uints, ulls, floats, doubles};
}

void partial_mask_op() {
  Tensor out = at::zeros({32}, at::kInt);
  partial_mask(ptr<int>(out));
}

void bad_width_op() {
  Tensor out = at::zeros({32}, at::kFloat);
  width_not_power_of_two(ptr<float>(out));
}

// --- intrinsics.cu
Tensor intrinsics_op(const Tensor& x) {
  check(x, at::kFloat, "intrinsics");
  Tensor out = at::full({x.numel(), 10}, std::nan(""), x.options());
  intrinsics(cptr<float>(x), ptr<float>(out), x.numel());
  return out;
}

// --- shared_memory.cu
Tensor reverse_dynamic_op(const Tensor& x, int64_t threads, int64_t shared_bytes) {
  check(x, at::kFloat, "reverse_dynamic");
  Tensor y = at::full_like(x, std::nan(""));
  reverse_blocks_dynamic(cptr<float>(x), ptr<float>(y), x.numel(), int(threads), shared_bytes);
  return y;
}

Tensor reverse_static_op(const Tensor& x) {
  check(x, at::kFloat, "reverse_static");
  Tensor y = at::full_like(x, std::nan(""));
  reverse_blocks_static(cptr<float>(x), ptr<float>(y), x.numel());
  return y;
}

Tensor dynamic_shared_mixed_op(const Tensor& x, int64_t threads) {
  check(x, at::kDouble, "dynamic_shared_mixed");
  Tensor out = at::full({(x.numel() + threads - 1) / threads, 2}, std::nan(""), x.options());
  dynamic_shared_mixed(cptr<double>(x), ptr<double>(out), x.numel(), int(threads));
  return out;
}

// --- vector.cu
void axpby_op(const Tensor& x, Tensor y, double a, double b, int64_t blocks, int64_t threads) {
  axpby(x, y, a, b, int(blocks), int(threads));
}

std::tuple<Tensor, Tensor> pack_sums_op(const Tensor& x, int64_t blocks, int64_t threads) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = at::full({blocks}, std::nan(""), x.options().dtype(acc));
  Tensor visits = at::zeros({2}, at::kLong);
  pack_sums(x, out, visits, int(blocks), int(threads));
  return {out, visits};
}

// --- planted.cu
Tensor tree_sum_op(const Tensor& x, bool with_barriers) {
  check(x, at::kFloat, "tree_sum");
  Tensor out = at::full({}, std::nan(""), x.options());
  tree_sum(cptr<float>(x), ptr<float>(out), x.numel(), int(x.numel()), with_barriers);
  return out;
}

Tensor warp_tree_sum_op(const Tensor& x, bool with_syncwarp) {
  check(x, at::kFloat, "warp_tree_sum");
  TORCH_CHECK(x.numel() == 32, "warp_tree_sum: 32 values");
  Tensor out = at::full({}, std::nan(""), x.options());
  warp_tree_sum(cptr<float>(x), ptr<float>(out), with_syncwarp);
  return out;
}

void write_range_op(Tensor y, int64_t extra, int64_t threads) {
  check(y, at::kFloat, "write_range");
  write_range(ptr<float>(y), y.numel(), extra, int(threads));
}

Tensor shared_write_op(int64_t threads, int64_t shift) {
  Tensor out = at::zeros({threads}, at::kFloat);
  shared_write(ptr<float>(out), int(threads), int(shift));
  return out;
}

void early_return_op(int64_t threads) {
  Tensor out = at::zeros({threads}, at::kFloat);
  early_return_then_barrier(ptr<float>(out), int(threads));
}

void divergent_barriers_op(int64_t threads) {
  Tensor out = at::zeros({threads}, at::kFloat);
  divergent_barriers(ptr<float>(out), int(threads));
}

}  // namespace
}  // namespace simt_test

TORCH_LIBRARY(fastbn_simt_test, m) {
  using namespace simt_test;
  simt_test::define_emulator_controls(m);
  m.def("warp_sums", &warp_sums_op);
  m.def("block_sums", &block_sums_op);
  m.def("block_stats", &block_stats_op);
  m.def("block_merge", &block_merge_op);
  m.def("grid_sum(Tensor x, int blocks, int threads, Tensor(a!) counter) -> Tensor", &grid_sum_op);
  m.def("grid_stats(Tensor x, int blocks_per_row, int threads, Tensor(a!) counters) -> Tensor", &grid_stats_op);
  m.def("center_cooperative", &center_op);
  m.def("count_phases", &count_phases_op);
  m.def("grid_sync_in_ordinary_launch", &grid_sync_in_ordinary_launch_op);
  m.def("warp_shuffle", &warp_shuffle_op);
  m.def("warp_votes", &warp_votes_op);
  m.def("block_votes", &block_votes_op);
  m.def("atomics", &atomics_op);
  m.def("partial_mask", &partial_mask_op);
  m.def("bad_width", &bad_width_op);
  m.def("intrinsics", &intrinsics_op);
  m.def("reverse_dynamic", &reverse_dynamic_op);
  m.def("reverse_static", &reverse_static_op);
  m.def("dynamic_shared_mixed", &dynamic_shared_mixed_op);
  m.def("axpby_(Tensor x, Tensor(a!) y, float a, float b, int blocks, int threads) -> ()", &axpby_op);
  m.def("pack_sums", &pack_sums_op);
  m.def("tree_sum", &tree_sum_op);
  m.def("warp_tree_sum", &warp_tree_sum_op);
  m.def("write_range_(Tensor(a!) y, int extra, int threads) -> ()", &write_range_op);
  m.def("shared_write", &shared_write_op);
  m.def("early_return", &early_return_op);
  m.def("divergent_barriers", &divergent_barriers_op);
}
