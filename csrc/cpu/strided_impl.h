// The general strided path: any input strides (a transposed, sliced or cropped view, a slice of the channels or
// samples), and any mix of layouts between the input and the other tensor operands (grad_output, residual, the
// forward's output, the gradients). Each operand is addressed through its own strides, so nothing is copied.
//
// The non-channel dims are merged wherever every operand allows it (as TensorIterator coalesces dims); when the
// innermost of them is contiguous in every operand, the walk hands out runs of it and the per-run loops of
// kernels_impl.h process them in vectors (one_channel_sums, normalize_run, backward_run). A channel slice of an
// NCHW tensor is then runs of H·W values. Runs whose values are not adjacent (every other element of the last dim)
// take the vector loops in the reductions, gathered through a Staging; otherwise, and where runs are shorter than
// a vector, they are walked one value at a time, still without the odometer of the outer dims between values. Included
// once per CPU capability, after kernels_impl.h (kernels_build.h).
// Where the channels are contiguous in every operand (a channel slice of channels_last or of an (N, C) matrix), a
// channel's values are a column: the rows walk (Walk::kRows) takes the positions in memory order instead, each a
// row of C values, with the per-channel coefficients and sums in arrays along the row, as the kRows kernels do.
// Against the value-by-value walk both replace, float32, 2-vCPU Xeon, medians of 20 calls, forward-train / eval /
// backward in ms (torch's in brackets): channel slice 32x64x28x28 of 128 channels 5.07 / 2.14 / 5.29 -> 0.42 / 0.26 /
// 0.65 (1.38 / 0.68 / 1.55); 32x64x56x56 with H and W transposed 19.4 / 9.2 / 20.6 -> 1.6 / 1.0 / 2.8 (6.4 / 3.9 /
// 9.3); every other value of a 112-wide last dim 20.7 / 9.6 / 23.4 -> 5.1 / 2.3 / 11.1 (6.6 / 3.5 / 10.3); rows walk:
// 4096x1024 slice of 2048 columns 44.0 / 32.5 / 65.8 -> 1.6 / 0.7 / 2.0 (15.2 / 1.8 / 99.5), channels_last
// 32x64x28x28 slice of 128 channels 0.69 / 0.40 / 0.91 (5.0 / 0.9 / 25.6).
//
// The elementwise passes (normalize, backward_elementwise) walk the runs of all channels in the input's memory
// order (Walk::kOrdered): per channel, the 7x7 planes of a channel slice are 196 bytes each, a sample apart, and the
// hardware prefetchers did not follow (eval of a 32x2048x7x7 slice of 4096 channels 3.24 -> 1.20 ms, torch 2.15 ms;
// bench_ops --formats channel_slice, 2-vCPU Xeon).
//
// Passes over memory are the unfused kernels': stats 1E, normalize 2E, backward_reduce 2E, backward_elementwise
// 3E. Runs longer than kChunk are walked as pieces of at most kChunk values, and work items are pieces making about
// kChunk values (of one channel in the reductions), so a single huge channel still splits across threads;
// reductions keep per-item partials and merge them per channel in a fixed order.
#ifndef FASTBN_CPU_CAP
#error "define FASTBN_CPU_CAP before including strided_impl.h"
#endif

namespace fastbn {
namespace cpu {
namespace FASTBN_CPU_CAP {
namespace {

constexpr int64_t kChunk = 8192;  // values per piece of a run and per work item (at least one piece)
static_assert(kChunk <= kMaxChannelRun, "a piece is summed as one one_channel_sums tile");
// Rows walks: a reduction's work items are about 1/kRowItems of the rows, at least kChunk values and at most kMaxRuns
// rows (each float lane of their per-channel sums adds that many values, as in the tiled kernels); per item, C
// partial sums are merged.
constexpr int64_t kRowItems = 64;

enum class Walk {
  kRuns,     // per channel: runs of the innermost non-channel dim
  kOrdered,  // the runs of every channel in the input's memory order (elementwise passes), the channel per run
  kRows,     // the channels are contiguous in every operand: each position is a row of C values, walked in order
};

// Whether every operand holds its channels contiguously (a channel slice of channels_last or of an (N, C) matrix),
// so that the rows walk reads memory in order where the per-channel walk would read columns.
template <size_t K>
Walk walk_for(const std::array<const at::Tensor*, K>& ts) {
  const bool rows = ts[0]->size(1) > 1 && std::all_of(ts.begin(), ts.end(), [](const at::Tensor* t) {
    return t->stride(1) == 1;
  });
  return rows ? Walk::kRows : Walk::kRuns;
}

// Visits the runs of one channel (kRuns), of all channels (kOrdered) or the rows (kRows, one run per position) in a
// fixed order (the input's dims, largest stride outermost; dim 1 only with kOrdered, where it is never merged), a run
// longer than kChunk as pieces of kChunk values and the rest, handing f(off, c, n) the offset of the piece's first
// value in each of K operands, the channel (0 for rows) and the piece's values. item_pieces: pieces per work item
// (default: about kChunk values).
template <int K>
class Walker {
 public:
  explicit Walker(const std::array<const at::Tensor*, K>& ts, Walk walk = Walk::kRuns, int64_t item_pieces = 0) {
    const at::Tensor& x = *ts[0];
    std::vector<int64_t> dims;
    for (int64_t d = 0; d < x.dim(); ++d) {
      if ((d != 1 || walk == Walk::kOrdered) && x.size(d) > 1) dims.push_back(d);
    }
    std::stable_sort(dims.begin(), dims.end(), [&](int64_t a, int64_t b) { return x.stride(a) > x.stride(b); });
    for (const int64_t d : dims) {
      std::array<int64_t, K> st;
      for (int k = 0; k < K; ++k) st[k] = ts[k]->stride(d);
      // An inner dim continues the outer one in every operand: one dim of both.
      bool merge = !size_.empty() && d != 1 && channel_dim_ != static_cast<int>(size_.size()) - 1;
      for (int k = 0; k < K && merge; ++k) merge = stride_.back()[k] == st[k] * x.size(d);
      if (d == 1) channel_dim_ = static_cast<int>(size_.size());
      if (merge) {
        size_.back() *= x.size(d);
        stride_.back() = st;
      } else {
        size_.push_back(x.size(d));
        stride_.push_back(st);
      }
    }
    const int inner = static_cast<int>(size_.size()) - 1;
    if (walk != Walk::kRows && inner >= 0 && inner != channel_dim_) {  // the innermost dim is walked as runs
      run_ = size_.back();
      step_ = stride_.back();
      size_.pop_back();
      stride_.pop_back();
    }
    piece_ = std::min(run_, kChunk);
    pieces_per_run_ = div_up(run_, piece_);
    last_piece_ = run_ - (pieces_per_run_ - 1) * piece_;
    pieces_ = pieces_per_run_;
    for (const int64_t s : size_) pieces_ *= s;
    for (int k = 0; k < K; ++k) cstride_[k] = ts[k]->stride(1);
    row_ = walk == Walk::kRows ? x.size(1) : 1;
    chunk_pieces_ = item_pieces > 0 ? item_pieces : std::max<int64_t>(1, kChunk / (piece_ * row_));
  }

  int64_t run() const { return run_; }          // values per run
  const std::array<int64_t, K>& step() const { return step_; }  // per operand: elements between a run's values
  bool contiguous() const {  // a run's values are adjacent in every operand
    return std::all_of(step_.begin(), step_.end(), [](int64_t s) { return s == 1; });
  }
  int64_t chunks() const { return div_up(pieces_, chunk_pieces_); }  // work items per channel

  // Runs f(c, begin, end, chunk) over the (channel, chunk of pieces) items in parallel: [chunk][C] is a partial's slot.
  template <typename F>
  void for_items(int64_t C, F&& f) const {
    const int64_t chunks = this->chunks();
    const int64_t item_values = std::min(pieces_, chunk_pieces_) * piece_ * row_;
    at::parallel_for(0, C * chunks, std::max<int64_t>(1, kParallelMin / item_values),
                     [&](int64_t b, int64_t e) {
                       for (int64_t item = b; item < e; ++item) {
                         const int64_t c = item / chunks, k = item % chunks;
                         f(c, k * chunk_pieces_, std::min(pieces_, (k + 1) * chunk_pieces_), k);
                       }
                     });
  }

  // Values of one channel in the pieces [begin, end) (every pieces_per_run_-th piece is a run's last, shorter one),
  // and in work item `chunk` of a channel (the partials' counts).
  int64_t values(int64_t begin, int64_t end) const {
    const int64_t last_pieces = end / pieces_per_run_ - begin / pieces_per_run_;
    return (end - begin) * piece_ - last_pieces * (piece_ - last_piece_);
  }
  int64_t chunk_values(int64_t chunk) const {
    return values(chunk * chunk_pieces_, std::min(pieces_, (chunk + 1) * chunk_pieces_));
  }

  template <typename F>
  void walk(int64_t c, int64_t begin, int64_t end, F&& f) const {
    const int nd = static_cast<int>(size_.size());
    std::vector<int64_t> idx(nd);
    int64_t off[K], piece_off[K];
    for (int k = 0; k < K; ++k) off[k] = channel_dim_ < 0 ? c * cstride_[k] : 0;
    int64_t rem = begin / pieces_per_run_, piece = begin % pieces_per_run_;
    for (int i = nd - 1; i >= 0; --i) {
      idx[i] = rem % size_[i];
      rem /= size_[i];
      for (int k = 0; k < K; ++k) off[k] += idx[i] * stride_[i][k];
    }
    for (int64_t n = begin; n < end; ++n) {
      for (int k = 0; k < K; ++k) piece_off[k] = off[k] + piece * piece_ * step_[k];
      const bool last = piece == pieces_per_run_ - 1;
      f(static_cast<const int64_t*>(piece_off), channel_dim_ < 0 ? c : idx[channel_dim_], last ? last_piece_ : piece_);
      if (!last) {
        ++piece;
        continue;
      }
      piece = 0;
      for (int i = nd - 1; i >= 0; --i) {
        for (int k = 0; k < K; ++k) off[k] += stride_[i][k];
        if (++idx[i] < size_[i]) break;
        for (int k = 0; k < K; ++k) off[k] -= size_[i] * stride_[i][k];
        idx[i] = 0;
      }
    }
  }

 private:
  int64_t run_ = 1;
  int64_t row_ = 1;  // values per position: C for kRows
  int channel_dim_ = -1;  // kOrdered: the channel dim's place in size_ (when over 1 channel)
  std::array<int64_t, K> step_{};
  int64_t piece_ = 1, pieces_per_run_ = 1, last_piece_ = 1;  // values of a piece, of a run's last piece
  int64_t pieces_ = 1;  // per channel (kRuns), in all (kOrdered, kRows)
  int64_t chunk_pieces_ = 1;
  std::vector<int64_t> size_;
  std::vector<std::array<int64_t, K>> stride_;  // [dim][operand]
  int64_t cstride_[K];
};

// Whether the walk's runs take the vector loops: at least a vector long, and, for the elementwise passes (not
// `staged`), contiguous in every operand.
template <typename scalar_t, int K>
bool vector_runs(const Walker<K>& w, bool staged = false) {
  return w.run() >= VecIO<scalar_t>::kWidth && (staged || w.contiguous());
}

// The reductions' vector loops on runs whose values are not adjacent in some operand (every other value of the
// last dim): such an operand's values are gathered into a buffer of at most kStage values first, one buffer per
// operand and thread. Their value-by-value loops accumulate in double, a chain per value; the elementwise passes'
// are as fast as the vector loops behind a gather, and stay. A 32x64x56x56 float input taking every other value of
// a 112-wide last dim, fastbn's ms, 2-vCPU Xeon, medians of 40 calls, 4 alternating runs: backward 9.1-11.9 ->
// 6.8-8.7, forward-train 5.7-6.0 -> 4.0-4.3, eval unchanged (2.1-2.5). In 5 runs of three variants, staging
// normalize too took eval from 1.8-2.1 to 2.0-3.0, and staging the backward's elementwise pass gained nothing.
constexpr int64_t kStage = 1024;  // 4 KiB of float per operand: the buffers stay in the L1 cache

template <typename scalar_t, int K>
class Staging {
 public:
  explicit Staging(const Walker<K>& w) : step_(w.step()), stage_(w.contiguous() ? kChunk : kStage) {
    for (int k = 0; k < K; ++k) {
      if (step_[k] != 1) buf_[k].resize(kStage);
    }
  }

  // f(i, n) for the stages [i, i + n) of a run of len values: the whole run when every operand's values are adjacent.
  template <typename F>
  void stages(int64_t len, F&& f) const {
    for (int64_t i = 0; i < len; i += stage_) f(i, std::min(stage_, len - i));
  }
  // Values [i, i + n) of operand k's run starting at `run`: in place, or gathered into k's buffer.
  const scalar_t* in(int k, const scalar_t* run, int64_t i, int64_t n) {
    if (step_[k] == 1) return run + i;
    const int64_t st = step_[k];
    scalar_t* b = buf_[k].data();
    for (int64_t j = 0; j < n; ++j) b[j] = run[(i + j) * st];
    return b;
  }

 private:
  std::array<int64_t, K> step_;
  std::array<std::vector<scalar_t>, K> buf_;
  int64_t stage_;
};

// The scalar loops' sums: add(i, a, b) adds value i of n into a and b, over four pairs of chains added into total_a
// and total_b at the end. One chain of dependent double adds held the statistics of a 32x64x56x56 input taking
// every other value of a 112-wide last dim to 3.4-5.2 ms, against 7 ms for torch's whole forward.
template <typename F>
C10_ALWAYS_INLINE void scalar_sums(int64_t n, F&& add, double& total_a, double& total_b) {
  double a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) add(i + j, a[j], b[j]);
  }
  for (; i < n; ++i) add(i, a[0], b[0]);
  total_a += (a[0] + a[1]) + (a[2] + a[3]);
  total_b += (b[0] + b[1]) + (b[2] + b[3]);
}

// Rows per work item of a rows-walk reduction over `rows` rows of C channels.
inline int64_t reduce_item_rows(int64_t rows, int64_t C) {
  return std::min(kMaxRuns, std::max({int64_t(1), kChunk / C, div_up(rows, kRowItems)}));
}

// f(i, count) for each vector of a row of C values, in order: count values at i, fewer in the last one.
template <typename scalar_t, typename F>
C10_ALWAYS_INLINE void row_vectors(int64_t C, F&& f) {
  using IO = VecIO<scalar_t>;
  for (int64_t i = 0; i < C; i += IO::kWidth) {
    const int64_t count = std::min(IO::kWidth, C - i);
    f(i, count);
  }
}

// The rows walk's statistics: per item, shifted sums per channel along the rows (shift: the item's first row),
// in acc_t arrays of C; per item and channel (mean, m2) in double, merged per channel in item order.
template <typename scalar_t>
void rows_stats(const StatsArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec;
  const int64_t C = a.x->size(1), rows = a.x->numel() / C;
  const Walker<1> w({a.x}, Walk::kRows, reduce_item_rows(rows, C));
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const int64_t items = w.chunks();
  std::vector<double> part_mean(items * C), part_m2(items * C);
  w.for_items(1, [&](int64_t, int64_t begin, int64_t end, int64_t chunk) {
    std::vector<acc_t> k(C), s(C, acc_t(0)), s2(C, acc_t(0));
    bool first = true;
    w.walk(0, begin, end, [&](const int64_t* off, int64_t, int64_t) {
      const scalar_t* row = x + off[0];
      if (first) {
        for (int64_t c = 0; c < C; ++c) k[c] = acc_t(row[c]);
        first = false;
      }
      row_vectors<scalar_t>(C, [&](int64_t i, int64_t count) {
        Vec v[P];
        IO::load(row + i, v, count);
        for (int q = 0; q < P; ++q) {
          const int64_t o = i + q * V, n = part_count<V>(count, q);
          if (n <= 0) continue;
          const Vec d = v[q] - Vec::loadu(&k[o], n);
          (Vec::loadu(&s[o], n) + d).store(&s[o], n);
          at::vec::fmadd(d, d, Vec::loadu(&s2[o], n)).store(&s2[o], n);
        }
      });
    });
    const double inv_n = 1.0 / double(end - begin);
    for (int64_t c = 0; c < C; ++c) {
      shifted_moments(double(k[c]), double(s[c]), double(s2[c]), inv_n, part_mean[chunk * C + c],
                      part_m2[chunk * C + c]);
    }
  });
  merge_partials(items, C, [&](int64_t i) { return w.chunk_values(i); }, part_mean.data(), part_m2.data(), a.mean,
                 a.m2);
}

template <typename scalar_t>
void strided_stats(const StatsArgs<scalar_t>& a) {
  if (walk_for<1>({a.x}) == Walk::kRows) return rows_stats(a);
  using acc_t = at::opmath_type<scalar_t>;
  const Walker<1> w({a.x});
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const int64_t C = a.x->size(1), chunks = w.chunks();
  const bool vec = vector_runs<scalar_t>(w, true);
  const auto& st = w.step();
  std::vector<double> part_mean(chunks * C), part_m2(chunks * C);  // [chunk][C]
  w.for_items(C, [&](int64_t c, int64_t begin, int64_t end, int64_t chunk) {
    const int64_t slot = chunk * C + c;
    Staging<scalar_t, 1> stage(w);
    // Shifted sums as in stats_tile, shifted by the item's first value so a large mean keeps its precision.
    acc_t k = 0;
    bool first = true;
    double s = 0, s2 = 0;
    w.walk(c, begin, end, [&](const int64_t* off, int64_t, int64_t len) {
      const scalar_t* run = x + off[0];
      if (first) {
        k = acc_t(run[0]);
        first = false;
      }
      if (vec) {
        stage.stages(len, [&](int64_t i, int64_t n) {
          double a_s, a_s2;
          one_channel_shifted_sums(stage.in(0, run, i, n), RunTile{0, 1, n, 0, 0, 1, 0}, k, a_s, a_s2);
          s += a_s;
          s2 += a_s2;
        });
      } else {
        scalar_sums(len, [&](int64_t i, double& a_s, double& a_s2) {
          const double d = double(acc_t(run[i * st[0]]) - k);
          a_s += d;
          a_s2 += d * d;
        }, s, s2);
      }
    });
    shifted_moments(double(k), s, s2, 1.0 / double(w.values(begin, end)), part_mean[slot], part_m2[slot]);
  });
  merge_partials(chunks, C, [&](int64_t k) { return w.chunk_values(k); }, part_mean.data(), part_m2.data(), a.mean,
                 a.m2);
}

template <typename scalar_t, bool kResidual, bool kRelu>
void rows_normalize(const NormalizeArgs<scalar_t>& a, const std::array<const at::Tensor*, 3>& ts) {
  using acc_t = at::opmath_type<scalar_t>;
  const Walker<3> w(ts, Walk::kRows);
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  scalar_t* y = a.y->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  const int64_t C = a.x->size(1);
  const RowCoef<acc_t> mean(a.mean), scale(a.scale), shift(a.shift);
  w.for_items(1, [&](int64_t, int64_t begin, int64_t end, int64_t) {
    w.walk(0, begin, end, [&](const int64_t* off, int64_t, int64_t) {
      normalize_run<scalar_t, kResidual, kRelu>(x + off[0], kResidual ? res + off[2] : nullptr, y + off[1], C, mean,
                                                scale, shift, false, 0);
    });
  });
}

template <typename scalar_t, bool kResidual, bool kRelu>
void strided_normalize_impl(const NormalizeArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::array<const at::Tensor*, 3> ts{a.x, a.y, kResidual ? a.residual : a.x};
  if (walk_for(ts) == Walk::kRows) return rows_normalize<scalar_t, kResidual, kRelu>(a, ts);
  const Walker<3> w(ts, Walk::kOrdered);
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  scalar_t* y = a.y->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  const bool vec = vector_runs<scalar_t>(w);
  const auto& st = w.step();
  w.for_items(1, [&](int64_t, int64_t begin, int64_t end, int64_t) {
    w.walk(0, begin, end, [&](const int64_t* off, int64_t c, int64_t len) {
      const acc_t mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
      if (vec) {
        normalize_run<scalar_t, kResidual, kRelu>(x + off[0], kResidual ? res + off[2] : nullptr, y + off[1], len,
                                                  PlaneCoef<acc_t>(mean), PlaneCoef<acc_t>(scale),
                                                  PlaneCoef<acc_t>(shift), false, 0);
        return;
      }
      for (int64_t i = 0; i < len; ++i) {
        acc_t o = pre_activation(acc_t(x[off[0] + i * st[0]]) - mean, scale, shift);
        if constexpr (kResidual) o = o + acc_t(res[off[2] + i * st[2]]);
        if constexpr (kRelu) o = relu_scalar(o);
        y[off[1] + i * st[1]] = scalar_t(o);
      }
    });
  });
}

template <typename scalar_t>
void strided_normalize(const NormalizeArgs<scalar_t>& a) {
  BOOL_SWITCH(a.residual != nullptr, kResidual, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] { strided_normalize_impl<scalar_t, kResidual, kRelu>(a); });
  });
}

// The rows walk's backward sums: per item, Σg and Σg·(x - mean) per channel along the rows in acc_t arrays of C;
// per item and channel in double, summed per channel in item order.
template <typename scalar_t, bool kOutputMask, bool kRelu>
void rows_backward_reduce(const ReduceArgs<scalar_t>& a, const std::array<const at::Tensor*, 3>& ts) {
  constexpr bool kRecompute = kRecomputeMask<kOutputMask, kRelu>;
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec;
  const int64_t C = a.x->size(1), rows = a.x->numel() / C;
  const Walker<3> w(ts, Walk::kRows, reduce_item_rows(rows, C));
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* y = kOutputMask ? a.output->template data_ptr<scalar_t>() : nullptr;
  const int64_t items = w.chunks();
  std::vector<double> part_g(items * C), part_gx(items * C);
  const Vec zero(acc_t(0));
  w.for_items(1, [&](int64_t, int64_t begin, int64_t end, int64_t chunk) {
    std::vector<acc_t> sum_g(C, acc_t(0)), sum_gx(C, acc_t(0));
    w.walk(0, begin, end, [&](const int64_t* off, int64_t, int64_t) {
      row_vectors<scalar_t>(C, [&](int64_t i, int64_t count) {
        Vec d[P], v[P], yv[P];
        IO::load(dy + off[1] + i, d, count);
        IO::load(x + off[0] + i, v, count);
        if constexpr (kOutputMask) IO::load(y + off[2] + i, yv, count);
        for (int q = 0; q < P; ++q) {
          const int64_t o = i + q * V, n = part_count<V>(count, q);
          if (n <= 0) continue;
          Vec sg = Vec::loadu(&sum_g[o], n), sgx = Vec::loadu(&sum_gx[o], n);
          add_g<Vec, kOutputMask, kRelu>(d[q], v[q], kOutputMask ? yv[q] : zero, Vec::loadu(a.mean + o, n),
                                         kRecompute ? Vec::loadu(a.scale + o, n) : zero,
                                         kRecompute ? Vec::loadu(a.shift + o, n) : zero, sg, sgx);
          sg.store(&sum_g[o], n);
          sgx.store(&sum_gx[o], n);
        }
      });
    });
    for (int64_t c = 0; c < C; ++c) {
      part_g[chunk * C + c] = sum_g[c];
      part_gx[chunk * C + c] = sum_gx[c];
    }
  });
  sum_slots(a, items, part_g.data(), part_gx.data(), 0, C);
}

template <typename scalar_t, bool kOutputMask, bool kRelu>
void strided_backward_reduce_impl(const ReduceArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::array<const at::Tensor*, 3> ts{a.x, a.dy, kOutputMask ? a.output : a.x};
  if (walk_for(ts) == Walk::kRows) return rows_backward_reduce<scalar_t, kOutputMask, kRelu>(a, ts);
  const Walker<3> w(ts);
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* y = kOutputMask ? a.output->template data_ptr<scalar_t>() : nullptr;
  const int64_t C = a.x->size(1), chunks = w.chunks();
  const bool vec = vector_runs<scalar_t>(w, true);
  const auto& st = w.step();
  std::vector<double> part_g(chunks * C), part_gx(chunks * C);  // [chunk][C]
  w.for_items(C, [&](int64_t c, int64_t begin, int64_t end, int64_t chunk) {
    const acc_t mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
    Staging<scalar_t, 3> stage(w);
    double sg = 0, sgx = 0;
    w.walk(c, begin, end, [&](const int64_t* off, int64_t, int64_t len) {
      if (vec) {
        stage.stages(len, [&](int64_t i, int64_t n) {
          double tg, tgx;
          one_channel_grad_sums<scalar_t, kOutputMask, kRelu>(
              stage.in(1, dy + off[1], i, n), stage.in(0, x + off[0], i, n),
              kOutputMask ? stage.in(2, y + off[2], i, n) : nullptr, RunTile{0, 1, n, 0, 0, 1, 0}, mean, scale, shift,
              [](int64_t) {}, tg, tgx);
          sg += tg;
          sgx += tgx;
        });
        return;
      }
      scalar_sums(len, [&](int64_t i, double& tg, double& tgx) {
        const acc_t xmu = acc_t(x[off[0] + i * st[0]]) - mean;
        const acc_t g = masked_grad(acc_t(dy[off[1] + i * st[1]]), xmu, scale, shift, kRelu, kOutputMask,
                                    kOutputMask ? acc_t(y[off[2] + i * st[2]]) : acc_t(0));
        tg += double(g);
        tgx += double(g * xmu);
      }, sg, sgx);
    });
    part_g[chunk * C + c] = sg;
    part_gx[chunk * C + c] = sgx;
  });
  sum_slots(a, chunks, part_g.data(), part_gx.data(), 0, C);
}

template <typename scalar_t>
void strided_backward_reduce(const ReduceArgs<scalar_t>& a) {
  BOOL_SWITCH(a.relu && a.output != nullptr, kOutputMask, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] {
      if constexpr (!kOutputMask || kRelu) strided_backward_reduce_impl<scalar_t, kOutputMask, kRelu>(a);
    });
  });
}

template <typename scalar_t, bool kOutputMask, bool kRelu, bool kTrain>
void rows_backward_elementwise(const ElementwiseArgs<scalar_t>& a, const std::array<const at::Tensor*, 5>& ts) {
  using acc_t = at::opmath_type<scalar_t>;
  const Walker<5> w(ts, Walk::kRows);
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* y = kOutputMask ? a.output->template data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = a.dx ? a.dx->template data_ptr<scalar_t>() : nullptr;
  scalar_t* gout = a.g_out ? a.g_out->template data_ptr<scalar_t>() : nullptr;
  const int64_t C = a.x->size(1);
  const RowCoef<acc_t> mean(a.mean), scale(a.scale), shift(a.shift), k(a.k);
  const RowCoef<acc_t> p(kTrain ? a.p : a.k), q(kTrain ? a.q : a.k);  // p, q unused when !kTrain
  w.for_items(1, [&](int64_t, int64_t begin, int64_t end, int64_t) {
    w.walk(0, begin, end, [&](const int64_t* off, int64_t, int64_t) {
      backward_run<scalar_t, kOutputMask, kRelu, kTrain>(dy + off[1], x + off[0], kOutputMask ? y + off[2] : nullptr,
                                                         dx ? dx + off[3] : nullptr, gout ? gout + off[4] : nullptr,
                                                         C, mean, scale, shift, k, p, q, false);
    });
  });
}

template <typename scalar_t, bool kOutputMask, bool kRelu, bool kTrain>
void strided_backward_elementwise_impl(const ElementwiseArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kNeedX = kTrain || kRecomputeMask<kOutputMask, kRelu>;
  const std::array<const at::Tensor*, 5> ts{a.x, a.dy, kOutputMask ? a.output : a.x, a.dx ? a.dx : a.x,
                                            a.g_out ? a.g_out : a.x};
  if (walk_for(ts) == Walk::kRows) return rows_backward_elementwise<scalar_t, kOutputMask, kRelu, kTrain>(a, ts);
  const Walker<5> w(ts, Walk::kOrdered);
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* y = kOutputMask ? a.output->template data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = a.dx ? a.dx->template data_ptr<scalar_t>() : nullptr;
  scalar_t* gout = a.g_out ? a.g_out->template data_ptr<scalar_t>() : nullptr;
  const bool vec = vector_runs<scalar_t>(w);
  const auto& st = w.step();
  w.for_items(1, [&](int64_t, int64_t begin, int64_t end, int64_t) {
    w.walk(0, begin, end, [&](const int64_t* off, int64_t c, int64_t len) {
      const acc_t mean = a.mean[c], scale = a.scale[c], shift = a.shift[c], k = a.k[c];
      const acc_t p = kTrain ? a.p[c] : acc_t(0), q = kTrain ? a.q[c] : acc_t(0);
      if (vec) {
        backward_run<scalar_t, kOutputMask, kRelu, kTrain>(
            dy + off[1], x + off[0], kOutputMask ? y + off[2] : nullptr, dx ? dx + off[3] : nullptr,
            gout ? gout + off[4] : nullptr, len, PlaneCoef<acc_t>(mean), PlaneCoef<acc_t>(scale),
            PlaneCoef<acc_t>(shift), PlaneCoef<acc_t>(k), PlaneCoef<acc_t>(p), PlaneCoef<acc_t>(q), false);
        return;
      }
      for (int64_t i = 0; i < len; ++i) {
        const acc_t xmu = kNeedX ? acc_t(x[off[0] + i * st[0]]) - mean : acc_t(0);
        const acc_t g = masked_grad(acc_t(dy[off[1] + i * st[1]]), xmu, scale, shift, kRelu, kOutputMask,
                                    kOutputMask ? acc_t(y[off[2] + i * st[2]]) : acc_t(0));
        if (dx) dx[off[3] + i * st[3]] = scalar_t(kTrain ? (xmu * p + g * k) + q : g * k);
        if (gout) gout[off[4] + i * st[4]] = scalar_t(g);
      }
    });
  });
}

template <typename scalar_t>
void strided_backward_elementwise(const ElementwiseArgs<scalar_t>& a) {
  BOOL_SWITCH(a.relu && a.output != nullptr, kOutputMask, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] {
      BOOL_SWITCH(a.use_x, kTrain, [&] {
        if constexpr (!kOutputMask || kRelu) strided_backward_elementwise_impl<scalar_t, kOutputMask, kRelu, kTrain>(a);
      });
    });
  });
}

}  // namespace

FASTBN_DEFINE_CPU_KERNELS(make_strided_kernels,
                          {&strided_stats<scalar_t>, &strided_normalize<scalar_t>, nullptr,
                           &strided_backward_reduce<scalar_t>, &strided_backward_elementwise<scalar_t>, nullptr})

}  // namespace FASTBN_CPU_CAP
}  // namespace cpu
}  // namespace fastbn
