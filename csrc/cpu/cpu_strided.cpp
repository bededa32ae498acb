// The general strided path: any input strides (a transposed or sliced view), and any mix of layouts between
// the input and the other tensor operands (grad_output, residual, the forward's output, the gradients). Each
// operand is addressed through its own strides, so nothing is copied; the inner loops are scalar, which is the
// price of generality (this path is the fallback, not the target of the performance work).
//
// Passes over memory are the same as the vectorised kernels' (kernels_impl.h): stats 1E, normalize 2E,
// backward_reduce 2E, backward_elementwise 3E. Work items are (channel, run of kChunk consecutive values of that
// channel), so a single huge channel still splits across threads; reductions keep per-item partials and merge
// them per channel in a fixed order.
#include "fp_contract.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <vector>

#include "../dispatch.h"
#include "kernels.h"
#include "math.h"

namespace fastbn {
namespace cpu {
namespace strided {
namespace {

constexpr int64_t kChunk = 8192;
constexpr int64_t kParallelMin = 32768;

// Visits the values of one channel in a fixed order (the input's dims other than 1, largest stride outermost),
// handing f the offset of the current value in each of K operands.
template <int K>
class Walker {
 public:
  explicit Walker(const std::array<const at::Tensor*, K>& ts) {
    const at::Tensor& x = *ts[0];
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim(); ++d) {
      if (d != 1 && x.size(d) > 1) dims.push_back(d);
    }
    std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
    nd_ = static_cast<int>(dims.size());
    size_.resize(nd_);
    stride_.resize(static_cast<size_t>(nd_) * K);
    for (int i = 0; i < nd_; ++i) {
      size_[i] = x.size(dims[i]);
      count_ *= size_[i];
      for (int k = 0; k < K; ++k) stride_[i * K + k] = ts[k]->stride(dims[i]);
    }
    for (int k = 0; k < K; ++k) cstride_[k] = ts[k]->stride(1);
  }

  int64_t count() const { return count_; }

  template <typename F>
  void walk(int64_t c, int64_t begin, int64_t end, F&& f) const {
    std::vector<int64_t> idx(nd_);
    int64_t off[K];
    for (int k = 0; k < K; ++k) off[k] = c * cstride_[k];
    int64_t rem = begin;
    for (int i = nd_ - 1; i >= 0; --i) {
      idx[i] = rem % size_[i];
      rem /= size_[i];
      for (int k = 0; k < K; ++k) off[k] += idx[i] * stride_[i * K + k];
    }
    for (int64_t n = begin; n < end; ++n) {
      f(static_cast<const int64_t*>(off));
      for (int i = nd_ - 1; i >= 0; --i) {
        for (int k = 0; k < K; ++k) off[k] += stride_[i * K + k];
        if (++idx[i] < size_[i]) break;
        for (int k = 0; k < K; ++k) off[k] -= size_[i] * stride_[i * K + k];
        idx[i] = 0;
      }
    }
  }

 private:
  int nd_ = 0;
  int64_t count_ = 1;
  std::vector<int64_t> size_;
  std::vector<int64_t> stride_;  // [dim][operand]
  int64_t cstride_[K];
};

// Runs f(c, begin, end, item) over (channel, chunk) items in parallel.
template <typename F>
void for_chunks(int64_t C, int64_t m, F&& f) {
  const int64_t chunks = div_up(m, kChunk);
  at::parallel_for(0, C * chunks, std::max<int64_t>(1, kParallelMin / std::min(m, kChunk)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t item = b; item < e; ++item) {
                       const int64_t c = item / chunks, k = item % chunks;
                       f(c, k * kChunk, std::min(m, (k + 1) * kChunk), item);
                     }
                   });
}

template <typename scalar_t>
void stats(const StatsArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Walker<1> w({a.x});
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const int64_t C = a.x->size(1), m = w.count(), chunks = div_up(m, kChunk);
  std::vector<acc_t> part_mean(C * chunks), part_m2(C * chunks);
  for_chunks(C, m, [&](int64_t c, int64_t begin, int64_t end, int64_t item) {
    // Gathered into a buffer so the chunk is reduced exactly in two passes.
    std::vector<acc_t> buf;
    buf.reserve(end - begin);
    w.walk(c, begin, end, [&](const int64_t* off) { buf.push_back(acc_t(x[off[0]])); });
    // Shifted by the chunk's first value so a large mean keeps its precision (see kernels_impl.h).
    const acc_t shift = buf[0];
    acc_t sum = 0;
    for (acc_t v : buf) sum += v - shift;
    const acc_t mean = shift + sum / acc_t(end - begin);
    acc_t m2 = 0;
    for (acc_t v : buf) m2 += (v - mean) * (v - mean);
    part_mean[item] = mean;
    part_m2[item] = m2;
  });
  for (int64_t c = 0; c < C; ++c) {
    int64_t n = 0;
    double mean = 0, m2 = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t count = std::min(m, (k + 1) * kChunk) - k * kChunk;
      chan_merge<double>(n, mean, m2, count, part_mean[c * chunks + k], part_m2[c * chunks + k]);
    }
    a.mean[c] = static_cast<acc_t>(mean);
    a.m2[c] = static_cast<acc_t>(m2);
  }
}

template <typename scalar_t>
void normalize(const NormalizeArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_res = a.residual != nullptr;
  const Walker<3> w({a.x, a.y, has_res ? a.residual : a.x});
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  scalar_t* y = a.y->template data_ptr<scalar_t>();
  const scalar_t* res = has_res ? a.residual->template data_ptr<scalar_t>() : nullptr;
  for_chunks(a.x->size(1), w.count(), [&](int64_t c, int64_t begin, int64_t end, int64_t) {
    const acc_t mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
    w.walk(c, begin, end, [&](const int64_t* off) {
      acc_t o = pre_activation(acc_t(x[off[0]]) - mean, scale, shift);
      if (has_res) o = o + acc_t(res[off[2]]);
      if (a.relu) o = relu_scalar(o);
      y[off[1]] = scalar_t(o);
    });
  });
}

template <typename scalar_t>
void backward_reduce(const ReduceArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_y = a.relu && a.output != nullptr;
  const Walker<3> w({a.x, a.dy, has_y ? a.output : a.x});
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* y = has_y ? a.output->template data_ptr<scalar_t>() : nullptr;
  const int64_t C = a.x->size(1), m = w.count(), chunks = div_up(m, kChunk);
  std::vector<acc_t> part_g(C * chunks), part_gx(C * chunks);
  for_chunks(C, m, [&](int64_t c, int64_t begin, int64_t end, int64_t item) {
    const acc_t mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
    acc_t sg = 0, sgx = 0;
    w.walk(c, begin, end, [&](const int64_t* off) {
      const acc_t xmu = acc_t(x[off[0]]) - mean;
      const acc_t g =
          masked_grad(acc_t(dy[off[1]]), xmu, scale, shift, a.relu, has_y, has_y ? acc_t(y[off[2]]) : acc_t(0));
      sg += g;
      sgx += g * xmu;
    });
    part_g[item] = sg;
    part_gx[item] = sgx;
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t tg = 0, tgx = 0;
    for (int64_t k = 0; k < chunks; ++k) {
      tg += part_g[c * chunks + k];
      tgx += part_gx[c * chunks + k];
    }
    a.sum_g[c] = tg;
    a.sum_gxmu[c] = tgx;
  }
}

template <typename scalar_t>
void backward_elementwise(const ElementwiseArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool has_y = a.relu && a.output != nullptr;
  const bool need_x = a.use_x || (a.relu && !has_y);
  const Walker<5> w({a.x, a.dy, has_y ? a.output : a.x, a.dx ? a.dx : a.x, a.g_out ? a.g_out : a.x});
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* y = has_y ? a.output->template data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = a.dx ? a.dx->template data_ptr<scalar_t>() : nullptr;
  scalar_t* gout = a.g_out ? a.g_out->template data_ptr<scalar_t>() : nullptr;
  for_chunks(a.x->size(1), w.count(), [&](int64_t c, int64_t begin, int64_t end, int64_t) {
    const acc_t mean = a.mean[c], scale = a.scale[c], shift = a.shift[c], k = a.k[c];
    const acc_t p = a.use_x ? a.p[c] : acc_t(0), q = a.use_x ? a.q[c] : acc_t(0);
    w.walk(c, begin, end, [&](const int64_t* off) {
      const acc_t xmu = need_x ? acc_t(x[off[0]]) - mean : acc_t(0);
      const acc_t g =
          masked_grad(acc_t(dy[off[1]]), xmu, scale, shift, a.relu, has_y, has_y ? acc_t(y[off[2]]) : acc_t(0));
      if (dx) dx[off[3]] = scalar_t(a.use_x ? (xmu * p + g * k) + q : g * k);
      if (gout) gout[off[4]] = scalar_t(g);
    });
  });
}

}  // namespace

FASTBN_DEFINE_CPU_KERNELS({&stats<scalar_t>, &normalize<scalar_t>, nullptr, &backward_reduce<scalar_t>,
                           &backward_elementwise<scalar_t>, nullptr})

}  // namespace strided
}  // namespace cpu
}  // namespace fastbn
