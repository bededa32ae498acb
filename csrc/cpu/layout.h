// How a CPU kernel walks a tensor, decided from its strides (never by copying it).
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace fastbn {
namespace cpu {

enum class Layout {
  kPlanes,   // NCHW-contiguous: element (n, c, s) at (n*C + c)*S + s; each (n, c) plane is a contiguous run of S
  kRows,     // channels-last / 2-D (N, C): element (r, c) at r*C + c; N counts the rows (S = 1)
  kStrided,  // anything else: walked with per-tensor strides (strided_impl.h)
};

struct Geometry {
  Layout layout = Layout::kStrided;
  int64_t N = 0;  // samples (kPlanes) or rows (kRows)
  int64_t C = 0;
  int64_t S = 1;  // contiguous run per (n, c) plane (kPlanes only)
  int64_t per_channel() const { return N * S; }
};

// Dims other than 1 with size > 1, sorted by stride, must tile memory densely from stride C upwards: then every
// position of the non-channel dims is a row of C contiguous channels. Size-1 dims carry no offset and are skipped,
// so (N, C, L) in channels-last-1d order, channels_last 2d/3d and a contiguous (N, C) all qualify.
inline bool is_rows(const at::Tensor& t) {
  const int64_t C = t.size(1);
  if (C > 1 && t.stride(1) != 1) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d != 1 && t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected = C;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// Requires numel > 0.
inline Geometry classify(const at::Tensor& x) {
  Geometry g;
  g.C = x.size(1);
  const int64_t spatial = x.numel() / (x.size(0) * g.C);
  // A contiguous tensor with one value per (n, c) plane is also rows of C; the rows kernels vectorise it along C.
  if (x.is_contiguous() && spatial > 1) {
    g.layout = Layout::kPlanes;
    g.N = x.size(0);
    g.S = spatial;
  } else if (is_rows(x)) {
    g.layout = Layout::kRows;
    g.N = x.numel() / g.C;
    g.S = 1;
  }
  return g;
}

// Same element offsets: strides agree on every dim that has more than one index.
inline bool same_strides(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// The fast paths address every operand with the input's offsets; a tensor laid out differently (a grad_output in
// another memory format, say) sends the whole op to the strided path rather than being copied.
inline Geometry classify(const at::Tensor& x, std::initializer_list<const at::Tensor*> others) {
  Geometry g = classify(x);
  if (g.layout == Layout::kStrided) return g;
  for (const at::Tensor* t : others) {
    if (t != nullptr && !same_strides(x, *t)) {
      g.layout = Layout::kStrided;
      break;
    }
  }
  return g;
}

}  // namespace cpu
}  // namespace fastbn
