// The vectorised kernels for the kPlanes (NCHW) and kRows (channels-last, (N, C)) layouts. No include guard:
// each cpu_kernels_<capability>.cpp includes this once, after <ATen/cpu/vec/vec.h> for its capability, with
// FASTBN_CPU_CAP naming the namespace the copy lives in (so copies never collide at link time).
//
// Passes over memory (E = numel × element size):
//   stats                 1E read. kPlanes: tiles of ≤ kTile values reduced exactly in two passes (the second
//                         from L2); kRows: one pass of shifted sums per (row block × channel block) tile. The
//                         per-tile partials are folded per channel with Chan's merge in double.
//   normalize             1E read + 1E write (+1E read of the residual).
//   backward_reduce       2E read (x, dy) (+1E residual when the ReLU mask needs it).
//   backward_elementwise  2E read + 1E write (dy only when eval without ReLU: 1E + 1E; +1E for g_out).
// Parallelisation (at::parallel_for over work items, both layouts): kPlanes reductions use tiles of
// (sample group × channel block × position chunk), elementwise ops (plane, chunk) items, so a (20, 6, 65536)
// and a (32, 2048, 7, 7) input both feed every thread; kRows uses (row block × channel block) tiles and
// row ranges. Reductions write per-tile partials merged in a fixed order: results do not depend on the
// thread count.
#ifndef FASTBN_CPU_CAP
#error "define FASTBN_CPU_CAP before including kernels_impl.h"
#endif

namespace fastbn {
namespace cpu {
namespace FASTBN_CPU_CAP {
namespace {

using at::vec::Vectorized;

// Values per elementwise work item on kPlanes.
constexpr int64_t kSegment = 8192;
// Fewer elements than this run on one thread: waking the pool costs more than it saves.
constexpr int64_t kParallelMin = 32768;

// Loads kWidth elements of scalar_t as kParts vectors of acc_t (16-bit types widen to two float vectors).
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kParts = std::is_same_v<scalar_t, acc_t> ? 1 : 2;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kWidth = kVec * kParts;
  static_assert(kParts == 1 || Vectorized<scalar_t>::size() == kWidth, "16-bit vector must hold two float vectors");

  static inline void load(const scalar_t* p, Vec (&v)[kParts]) {
    if constexpr (kParts == 1) {
      v[0] = Vec::loadu(p);
    } else {
      std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    }
  }
  static inline void store(scalar_t* p, const Vec (&v)[kParts]) {
    if constexpr (kParts == 1) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
};

// A per-channel coefficient seen by an elementwise loop: one value for a whole plane (kPlanes), or an array
// indexed like the row itself (kRows, the element index is the channel).
template <typename acc_t>
struct PlaneCoef {
  using Vec = Vectorized<acc_t>;
  Vec v;
  acc_t s;
  explicit PlaneCoef(acc_t value) : v(value), s(value) {}
  Vec vec(int64_t, int) const { return v; }
  acc_t at(int64_t) const { return s; }
};

template <typename acc_t>
struct RowCoef {
  using Vec = Vectorized<acc_t>;
  const acc_t* p;
  explicit RowCoef(const acc_t* ptr) : p(ptr) {}
  Vec vec(int64_t i, int part) const { return Vec::loadu(p + i + part * Vec::size()); }
  acc_t at(int64_t i) const { return p[i]; }
};

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  acc_t r = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) r += buf[i];
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// kPlanes reductions work on tiles: samples [n0, n1) × channels [c0, c1) × positions [s0, s1) of each plane,
// at most kTile values. A tile reads runs of (c1 - c0)·(s1 - s0) ≥ kRun contiguous values (one per sample),
// so short planes (7×7) are read in long sequential runs rather than one 49-value row per channel and sample,
// and every channel keeps its accumulators in L1 for the whole tile. Each (tile, channel) gives a partial,
// stored at [slot][c] with slot = (sample group, position chunk).
constexpr int64_t kRun = 4096;
constexpr int64_t kTile = 16384;

struct PlaneTiles {
  int64_t N, C, S, chunk, chunks, cb, cblocks, G, groups;
  explicit PlaneTiles(const Geometry& g) : N(g.N), C(g.C), S(g.S) {
    if (S > kRun) {
      chunks = div_up(S, kRun);
      chunk = div_up(div_up(S, chunks), 64) * 64;  // equal, vector-aligned chunks
      chunks = div_up(S, chunk);
    } else {
      chunk = S;
      chunks = 1;
    }
    cb = std::clamp<int64_t>(kRun / chunk, 1, C);
    cblocks = div_up(C, cb);
    G = std::clamp<int64_t>(kTile / (cb * chunk), 1, N);
    groups = div_up(N, G);
  }
  int64_t items() const { return groups * cblocks * chunks; }
  int64_t slots() const { return groups * chunks; }
  int64_t grain() const { return std::max<int64_t>(1, kParallelMin / (G * cb * chunk)); }
  struct Tile {
    int64_t n0, n1, c0, c1, s0, s1, slot;
  };
  Tile at(int64_t item) const {
    const int64_t k = item % chunks, rest = item / chunks;
    const int64_t cbi = rest % cblocks, g = rest / cblocks;
    return {g * G, std::min(N, g * G + G), cbi * cb, std::min(C, cbi * cb + cb), k * chunk,
            std::min(S, k * chunk + chunk), g * chunks + k};
  }
  int64_t slot_count(int64_t slot) const {
    const int64_t g = slot / chunks, k = slot % chunks;
    return (std::min(N, g * G + G) - g * G) * (std::min(S, k * chunk + chunk) - k * chunk);
  }
};

// Adds f(v) over one contiguous run of n values into two vector accumulators (two chains hide the add
// latency) and a scalar tail.
template <typename scalar_t, typename VF, typename SF>
inline void run_sum(const scalar_t* p, int64_t n, Vectorized<at::opmath_type<scalar_t>>& acc,
                    at::opmath_type<scalar_t>& tail, VF&& vf, SF&& sf) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t W = IO::kWidth;
  Vec a0(0), a1(0);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    Vec v[P], u[P];
    IO::load(p + i, v);
    IO::load(p + i + W, u);
    for (int q = 0; q < P; ++q) {
      a0 = vf(a0, v[q]);
      a1 = vf(a1, u[q]);
    }
  }
  for (; i + W <= n; i += W) {
    Vec v[P];
    IO::load(p + i, v);
    for (int q = 0; q < P; ++q) a0 = vf(a0, v[q]);
  }
  for (; i < n; ++i) tail = sf(tail, at::opmath_type<scalar_t>(p[i]));
  acc = acc + (a0 + a1);
}

// Folds per-slot (count, mean, m2) partials of every channel into a.mean / a.m2 with Chan et al.'s parallel
// variance merge in double, slot by slot in a fixed order (results do not depend on the thread count). A slot's
// count is the same for all its channels, so the merge weights are computed once per slot and the loop over
// channels has no division (it vectorises).
template <typename part_t, typename acc_t, typename Count>
void merge_partials(int64_t slots, int64_t C, Count&& count, const part_t* part_mean, const part_t* part_m2,
                    acc_t* out_mean, acc_t* out_m2) {
  at::parallel_for(0, C, std::max<int64_t>(1, 16384 / slots), [&](int64_t begin, int64_t end) {
    const int64_t nc = end - begin;
    std::vector<double> mean(part_mean + begin, part_mean + end), m2(part_m2 + begin, part_m2 + end);
    int64_t n = count(0);
    for (int64_t j = 1; j < slots; ++j) {
      const int64_t n_b = count(j);
      if (n_b == 0) continue;
      const double frac_b = double(n_b) / double(n + n_b), w = double(n) * frac_b;
      const part_t* pm = part_mean + j * C + begin;
      const part_t* pq = part_m2 + j * C + begin;
      for (int64_t c = 0; c < nc; ++c) {
        const double delta = double(pm[c]) - mean[c];
        mean[c] = mean[c] + delta * frac_b;
        m2[c] = m2[c] + double(pq[c]) + delta * delta * w;
      }
      n += n_b;
    }
    for (int64_t c = 0; c < nc; ++c) {
      out_mean[begin + c] = static_cast<acc_t>(mean[c]);
      out_m2[begin + c] = static_cast<acc_t>(m2[c]);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Statistics. Per tile and channel, an exact two-pass (the tile is ≤ kTile values, so the second pass reads
// cache); the first pass sums x - (the channel's first value in the tile), so a large mean (1e4 + randn) does
// not lose digits to a growing float sum. Partials are then combined per channel with Chan et al.'s parallel
// variance merge in double, in a fixed order (independent of the thread count).
template <typename scalar_t>
void stats_planes(const StatsArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t V = IO::kVec;
  const int64_t C = a.geom.C, S = a.geom.S;
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const PlaneTiles pt(a.geom);
  std::vector<acc_t> part_mean(pt.slots() * C), part_m2(pt.slots() * C);

  at::parallel_for(0, pt.items(), pt.grain(), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(pt.cb * V), tail(pt.cb), center(pt.cb);
    for (int64_t item = begin; item < end; ++item) {
      const auto t = pt.at(item);
      const int64_t nc = t.c1 - t.c0, len = t.s1 - t.s0, count = (t.n1 - t.n0) * len;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(tail.begin(), tail.end(), acc_t(0));
      for (int64_t j = 0; j < nc; ++j) center[j] = acc_t(x[(t.n0 * C + t.c0 + j) * S + t.s0]);
      for (int64_t n = t.n0; n < t.n1; ++n) {
        for (int64_t j = 0; j < nc; ++j) {
          const Vec k(center[j]);
          const acc_t ks = center[j];
          Vec sum = Vec::loadu(&acc[j * V]);
          run_sum<scalar_t>(
              x + (n * C + t.c0 + j) * S + t.s0, len, sum, tail[j], [&](Vec s, Vec v) { return s + (v - k); },
              [&](acc_t s, acc_t v) { return s + (v - ks); });
          sum.store(&acc[j * V]);
        }
      }
      for (int64_t j = 0; j < nc; ++j) {
        center[j] = center[j] + (hsum(Vec::loadu(&acc[j * V])) + tail[j]) / acc_t(count);
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(tail.begin(), tail.end(), acc_t(0));
      for (int64_t n = t.n0; n < t.n1; ++n) {
        for (int64_t j = 0; j < nc; ++j) {
          const Vec k(center[j]);
          const acc_t ks = center[j];
          Vec sum = Vec::loadu(&acc[j * V]);
          run_sum<scalar_t>(
              x + (n * C + t.c0 + j) * S + t.s0, len, sum, tail[j],
              [&](Vec s, Vec v) {
                const Vec d = v - k;
                return at::vec::fmadd(d, d, s);
              },
              [&](acc_t s, acc_t v) { return s + (v - ks) * (v - ks); });
          sum.store(&acc[j * V]);
        }
      }
      for (int64_t j = 0; j < nc; ++j) {
        part_mean[t.slot * C + t.c0 + j] = center[j];
        part_m2[t.slot * C + t.c0 + j] = hsum(Vec::loadu(&acc[j * V])) + tail[j];
      }
    }
  });

  merge_partials(pt.slots(), C, [&](int64_t slot) { return pt.slot_count(slot); }, part_mean.data(), part_m2.data(),
                 a.mean, a.m2);
}

// kRows reductions: tiles of rows [r0, r1) × channels [c0, c1) (c1 - c0 ≤ kRowChannels, so a tile's per-channel
// accumulators stay in L1). A tile is read in memory order, kRowGroup rows at a time: each accumulator vector is
// loaded and stored once per group of rows, and the rows stream sequentially (walking one channel vector down
// the rows instead would stride by the row length, 4 KiB and more at 1024+ channels, defeating L1 and the
// prefetchers). ATen's channels-last reductions also vectorise along C with per-row-block partials.
constexpr int64_t kRowChannels = 1024;
constexpr int kRowGroup = 4;

struct RowTiles {
  int64_t R, C, cw, cblocks, B, rblocks;
  explicit RowTiles(const Geometry& g) : R(g.N), C(g.C) {
    cw = std::min<int64_t>(C, kRowChannels);
    cblocks = div_up(C, cw);
    B = std::clamp<int64_t>(4 * kTile / cw, 16, 1024);
    B = std::min(B, R);
    rblocks = div_up(R, B);
  }
  int64_t items() const { return rblocks * cblocks; }
  int64_t grain() const { return std::max<int64_t>(1, kParallelMin / (B * cw)); }
  void at(int64_t item, int64_t& r0, int64_t& r1, int64_t& c0, int64_t& c1, int64_t& rb) const {
    rb = item / cblocks;
    const int64_t cbi = item % cblocks;
    r0 = rb * B;
    r1 = std::min(R, r0 + B);
    c0 = cbi * cw;
    c1 = std::min(C, c0 + cw);
  }
  int64_t count(int64_t rb) const { return std::min(R, rb * B + B) - rb * B; }
};

// Calls group(r, G) for row groups of G = kRowGroup rows, then G = 1 for the rows left.
template <typename Group>
inline void row_groups(int64_t r0, int64_t r1, Group&& group) {
  int64_t r = r0;
  for (; r + kRowGroup <= r1; r += kRowGroup) group(r, std::integral_constant<int, kRowGroup>{});
  for (; r < r1; ++r) group(r, std::integral_constant<int, 1>{});
}

// Statistics of a tile in one pass with shifted sums: with k = the tile's first row (per channel), Σ(x - k) and
// Σ(x - k)² in acc_t give mean = k + Σd/n and m2 = Σd² - (Σd)²/n. The shift is one of the channel's own values,
// so d is of the order of the spread, not of the mean (1e4 + randn keeps its digits: x - k is exact there), and
// a tile holds at most 1024 rows; tiles are merged in double (merge_partials).
template <typename scalar_t>
void stats_rows(const StatsArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec, W = IO::kWidth;
  const int64_t C = a.geom.C;
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const RowTiles rt(a.geom);
  // Partials in double: a tile mean of 1e4 + randn data rounded to float would lose the digits the merge needs.
  std::vector<double> part_mean(rt.rblocks * C), part_m2(rt.rblocks * C);

  at::parallel_for(0, rt.items(), rt.grain(), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> shift(rt.cw), sum(rt.cw), sq(rt.cw);
    for (int64_t item = begin; item < end; ++item) {
      int64_t r0, r1, c0, c1, rb;
      rt.at(item, r0, r1, c0, c1, rb);
      const int64_t nc = c1 - c0;
      for (int64_t c = 0; c < nc; ++c) shift[c] = acc_t(x[r0 * C + c0 + c]);
      std::fill(sum.begin(), sum.begin() + nc, acc_t(0));
      std::fill(sq.begin(), sq.begin() + nc, acc_t(0));
      // Rows of at most kNV vectors (64 float channels): the accumulators stay in registers for the whole tile,
      // and walking the rows one after another is still sequential.
      const auto in_registers = [&](auto nv_tag) {
        constexpr int NV = decltype(nv_tag)::value;
        Vec k[NV][P], s[NV][P], s2[NV][P];
        for (int j = 0; j < NV; ++j) {
          for (int q = 0; q < P; ++q) {
            k[j][q] = Vec::loadu(&shift[j * W + q * V]);
            s[j][q] = Vec(acc_t(0));
            s2[j][q] = Vec(acc_t(0));
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          for (int j = 0; j < NV; ++j) {
            Vec v[P];
            IO::load(x + r * C + c0 + j * W, v);
            for (int q = 0; q < P; ++q) {
              const Vec d = v[q] - k[j][q];
              s[j][q] = s[j][q] + d;
              s2[j][q] = at::vec::fmadd(d, d, s2[j][q]);
            }
          }
        }
        for (int j = 0; j < NV; ++j) {
          for (int q = 0; q < P; ++q) {
            s[j][q].store(&sum[j * W + q * V]);
            s2[j][q].store(&sq[j * W + q * V]);
          }
        }
      };
      constexpr int kNV = 4 / P;
      if (nc % W == 0 && nc / W <= kNV) {
        switch (nc / W) {
          case 1:
            in_registers(std::integral_constant<int, 1>{});
            break;
          case 2:
            in_registers(std::integral_constant<int, std::min(2, kNV)>{});
            break;
          case 3:
            in_registers(std::integral_constant<int, std::min(3, kNV)>{});
            break;
          default:  // nc / W == kNV
            in_registers(std::integral_constant<int, kNV>{});
            break;
        }
      } else {
        row_groups(r0, r1, [&](int64_t r, auto g_tag) {
          constexpr int G = decltype(g_tag)::value;
          const scalar_t* row = x + r * C + c0;
          int64_t c = 0;
          for (; c + W <= nc; c += W) {
            Vec k[P], s[P], s2[P], d[G][P];
            for (int q = 0; q < P; ++q) {
              k[q] = Vec::loadu(&shift[c + q * V]);
              s[q] = Vec::loadu(&sum[c + q * V]);
              s2[q] = Vec::loadu(&sq[c + q * V]);
            }
            for (int j = 0; j < G; ++j) {
              IO::load(row + j * C + c, d[j]);
              for (int q = 0; q < P; ++q) d[j][q] = d[j][q] - k[q];
            }
            for (int q = 0; q < P; ++q) {
              if constexpr (G == 4) {
                s[q] = s[q] + ((d[0][q] + d[1][q]) + (d[2][q] + d[3][q]));
                s2[q] = s2[q] + (at::vec::fmadd(d[1][q], d[1][q], d[0][q] * d[0][q]) +
                                 at::vec::fmadd(d[3][q], d[3][q], d[2][q] * d[2][q]));
              } else {
                s[q] = s[q] + d[0][q];
                s2[q] = at::vec::fmadd(d[0][q], d[0][q], s2[q]);
              }
              s[q].store(&sum[c + q * V]);
              s2[q].store(&sq[c + q * V]);
            }
          }
          for (; c < nc; ++c) {
            for (int j = 0; j < G; ++j) {
              const acc_t d = acc_t(row[j * C + c]) - shift[c];
              sum[c] += d;
              sq[c] += d * d;
            }
          }
        });
      }
      const double n = double(r1 - r0);
      double* out_mean = part_mean.data() + rb * C + c0;
      double* out_m2 = part_m2.data() + rb * C + c0;
      for (int64_t c = 0; c < nc; ++c) {
        const double s = sum[c];
        out_mean[c] = double(shift[c]) + s / n;
        const double m2 = double(sq[c]) - s * (s / n);
        out_m2[c] = m2 < 0 ? 0 : m2;  // rounding only; NaN stays NaN
      }
    }
  });
  merge_partials(rt.rblocks, C, [&](int64_t rb) { return rt.count(rb); }, part_mean.data(), part_m2.data(), a.mean,
                 a.m2);
}

template <typename scalar_t>
void stats(const StatsArgs<scalar_t>& a) {
  if (a.geom.layout == Layout::kPlanes) {
    stats_planes(a);
  } else {
    stats_rows(a);
  }
}

// kPlanes elementwise work items: (plane, chunk of ≤ kSegment positions) in memory order.
struct PlaneChunks {
  int64_t C, S, chunk, chunks, items;
  explicit PlaneChunks(const Geometry& g) : C(g.C), S(g.S) {
    chunk = S > kSegment ? kSegment : S;
    chunks = div_up(S, chunk);
    items = g.N * g.C * chunks;
  }
  int64_t grain() const { return std::max<int64_t>(1, kParallelMin / chunk); }
};

// ---------------------------------------------------------------------------------------------------------
// Normalize: one contiguous run of n elements whose coefficients come from Coef (plane or row).
template <typename scalar_t, bool kResidual, bool kRelu, typename Coef>
inline void normalize_run(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t n, const Coef& mean,
                          const Coef& scale, const Coef& shift) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  const Vec zero(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) {
    Vec v[P], r[P];
    IO::load(x + i, v);
    if constexpr (kResidual) IO::load(res + i, r);
    for (int q = 0; q < P; ++q) {
      Vec o = pre_activation(v[q] - mean.vec(i, q), scale.vec(i, q), shift.vec(i, q));
      if constexpr (kResidual) o = o + r[q];
      if constexpr (kRelu) o = Vec::blendv(o, zero, o < zero);
      v[q] = o;
    }
    IO::store(y + i, v);
  }
  for (; i < n; ++i) {
    acc_t o = pre_activation(acc_t(x[i]) - mean.at(i), scale.at(i), shift.at(i));
    if constexpr (kResidual) o = o + acc_t(res[i]);
    if constexpr (kRelu) o = relu_scalar(o);
    y[i] = scalar_t(o);
  }
}

template <typename scalar_t, bool kResidual, bool kRelu>
void normalize_impl(const NormalizeArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geom;
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  scalar_t* y = a.y->template data_ptr<scalar_t>();
  if (g.layout == Layout::kPlanes) {
    const PlaneChunks pc(g);
    at::parallel_for(0, pc.items, pc.grain(), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t plane = item / pc.chunks, c = plane % pc.C;
        const int64_t off = plane * pc.S + (item % pc.chunks) * pc.chunk;
        const int64_t n = std::min(pc.chunk, (plane + 1) * pc.S - off);
        normalize_run<scalar_t, kResidual, kRelu>(x + off, kResidual ? res + off : nullptr, y + off, n,
                                                  PlaneCoef<acc_t>(a.mean[c]), PlaneCoef<acc_t>(a.scale[c]),
                                                  PlaneCoef<acc_t>(a.shift[c]));
      }
    });
  } else {
    const int64_t C = g.C;
    at::parallel_for(0, g.N, std::max<int64_t>(1, kParallelMin / C), [&](int64_t begin, int64_t end) {
      const RowCoef<acc_t> mean(a.mean), scale(a.scale), shift(a.shift);
      for (int64_t r = begin; r < end; ++r) {
        normalize_run<scalar_t, kResidual, kRelu>(x + r * C, kResidual ? res + r * C : nullptr, y + r * C, C, mean,
                                                  scale, shift);
      }
    });
  }
}

template <typename scalar_t>
void normalize(const NormalizeArgs<scalar_t>& a) {
  BOOL_SWITCH(a.residual != nullptr, kResidual, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] { normalize_impl<scalar_t, kResidual, kRelu>(a); });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward reduction: g (masked dy) and g·(x - mean), per channel, on the same tiles as the statistics;
// per-tile float sums, combined per channel in double.
template <typename T, bool kResidual, bool kRelu>
inline T masked(T dy, T xmu, T scale, T shift, T res) {
  if constexpr (kRelu) {
    T pre = pre_activation(xmu, scale, shift);
    if constexpr (kResidual) pre = pre + res;
    const T zero(static_cast<typename T::value_type>(0));
    return T::blendv(zero, dy, pre > zero);
  } else {
    return dy;
  }
}
template <typename T, bool kResidual, bool kRelu>
inline T masked_scalar(T dy, T xmu, T scale, T shift, T res) {
  if constexpr (kRelu) {
    T pre = pre_activation(xmu, scale, shift);
    if constexpr (kResidual) pre = pre + res;
    return pre > T(0) ? dy : T(0);
  } else {
    return dy;
  }
}

template <typename scalar_t, bool kResidual, bool kRelu>
void backward_reduce_planes(const ReduceArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec, W = IO::kWidth;
  const int64_t C = a.geom.C, S = a.geom.S;
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  const PlaneTiles pt(a.geom);
  std::vector<acc_t> part_g(pt.slots() * C), part_gx(pt.slots() * C);

  at::parallel_for(0, pt.items(), pt.grain(), [&](int64_t begin, int64_t end) {
    // Per-channel vector accumulators as plain acc_t arrays (loadu/store): std::vector<Vectorized> would be
    // built by baseline-target library code that cannot inline the AVX constructors.
    std::vector<acc_t> acc_g(pt.cb * V), acc_gx(pt.cb * V);
    std::vector<acc_t> tail_g(pt.cb), tail_gx(pt.cb);
    for (int64_t item = begin; item < end; ++item) {
      const auto t = pt.at(item);
      const int64_t nc = t.c1 - t.c0, len = t.s1 - t.s0;
      std::fill(acc_g.begin(), acc_g.end(), acc_t(0));
      std::fill(acc_gx.begin(), acc_gx.end(), acc_t(0));
      std::fill(tail_g.begin(), tail_g.end(), acc_t(0));
      std::fill(tail_gx.begin(), tail_gx.end(), acc_t(0));
      for (int64_t n = t.n0; n < t.n1; ++n) {
        for (int64_t j = 0; j < nc; ++j) {
          const int64_t c = t.c0 + j, off = (n * C + c) * S + t.s0;
          const acc_t mean = a.mean[c], scale = a.scale[c], shift = a.shift[c];
          const Vec vmean(mean), vscale(scale), vshift(shift);
          Vec sg0(acc_t(0)), sg1(acc_t(0)), sx0(acc_t(0)), sx1(acc_t(0));
          const auto step = [&](int64_t i, Vec& sg, Vec& sx) {
            Vec d[P], v[P], r[P];
            IO::load(dy + off + i, d);
            IO::load(x + off + i, v);
            if constexpr (kResidual) IO::load(res + off + i, r);
            for (int q = 0; q < P; ++q) {
              const Vec xmu = v[q] - vmean;
              const Vec g =
                  masked<Vec, kResidual, kRelu>(d[q], xmu, vscale, vshift, kResidual ? r[q] : Vec(acc_t(0)));
              sg = sg + g;
              sx = at::vec::fmadd(g, xmu, sx);
            }
          };
          int64_t i = 0;
          for (; i + 2 * W <= len; i += 2 * W) {  // two chains hide the add latency
            step(i, sg0, sx0);
            step(i + W, sg1, sx1);
          }
          for (; i + W <= len; i += W) step(i, sg0, sx0);
          for (; i < len; ++i) {
            const acc_t xmu = acc_t(x[off + i]) - mean;
            const acc_t g = masked_scalar<acc_t, kResidual, kRelu>(acc_t(dy[off + i]), xmu, scale, shift,
                                                                   kResidual ? acc_t(res[off + i]) : acc_t(0));
            tail_g[j] += g;
            tail_gx[j] += g * xmu;
          }
          (Vec::loadu(&acc_g[j * V]) + (sg0 + sg1)).store(&acc_g[j * V]);
          (Vec::loadu(&acc_gx[j * V]) + (sx0 + sx1)).store(&acc_gx[j * V]);
        }
      }
      for (int64_t j = 0; j < nc; ++j) {
        part_g[t.slot * C + t.c0 + j] = hsum(Vec::loadu(&acc_g[j * V])) + tail_g[j];
        part_gx[t.slot * C + t.c0 + j] = hsum(Vec::loadu(&acc_gx[j * V])) + tail_gx[j];
      }
    }
  });

  const int64_t slots = pt.slots();
  for (int64_t c = 0; c < C; ++c) {
    double tg = 0, tgx = 0;
    for (int64_t j = 0; j < slots; ++j) {
      tg += part_g[j * C + c];
      tgx += part_gx[j * C + c];
    }
    a.sum_g[c] = static_cast<acc_t>(tg);
    a.sum_gxmu[c] = static_cast<acc_t>(tgx);
  }
}

template <typename scalar_t, bool kResidual, bool kRelu>
void backward_reduce_rows(const ReduceArgs<scalar_t>& a) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec, W = IO::kWidth;
  const int64_t C = a.geom.C;
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  const RowTiles rt(a.geom);
  std::vector<acc_t> part_g(rt.rblocks * C), part_gx(rt.rblocks * C);

  at::parallel_for(0, rt.items(), rt.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      int64_t r0, r1, c0, c1, rb;
      rt.at(item, r0, r1, c0, c1, rb);
      const int64_t nc = c1 - c0;
      // The tile's accumulators live in its rows of the partial arrays (L1-sized: ≤ kRowChannels per array).
      acc_t* acc_g = part_g.data() + rb * C + c0;
      acc_t* acc_gx = part_gx.data() + rb * C + c0;
      std::fill(acc_g, acc_g + nc, acc_t(0));
      std::fill(acc_gx, acc_gx + nc, acc_t(0));
      const acc_t* mean_p = a.mean + c0;
      const acc_t* scale_p = a.scale + c0;
      const acc_t* shift_p = a.shift + c0;
      row_groups(r0, r1, [&](int64_t r, auto g_tag) {
        constexpr int G = decltype(g_tag)::value;
        const int64_t base = r * C + c0;
        int64_t c = 0;
        for (; c + W <= nc; c += W) {
          Vec mean[P], scale[P], shift[P], sg[P], sgx[P];
          for (int q = 0; q < P; ++q) {
            const int64_t cc = c + q * V;
            mean[q] = Vec::loadu(mean_p + cc);
            if constexpr (kRelu) {
              scale[q] = Vec::loadu(scale_p + cc);
              shift[q] = Vec::loadu(shift_p + cc);
            }
            sg[q] = Vec::loadu(acc_g + cc);
            sgx[q] = Vec::loadu(acc_gx + cc);
          }
          for (int j = 0; j < G; ++j) {
            const int64_t off = base + j * C + c;
            Vec d[P], v[P], rr[P];
            IO::load(dy + off, d);
            IO::load(x + off, v);
            if constexpr (kResidual) IO::load(res + off, rr);
            for (int q = 0; q < P; ++q) {
              const Vec xmu = v[q] - mean[q];
              const Vec g =
                  masked<Vec, kResidual, kRelu>(d[q], xmu, scale[q], shift[q], kResidual ? rr[q] : Vec(acc_t(0)));
              sg[q] = sg[q] + g;
              sgx[q] = at::vec::fmadd(g, xmu, sgx[q]);
            }
          }
          for (int q = 0; q < P; ++q) {
            sg[q].store(acc_g + c + q * V);
            sgx[q].store(acc_gx + c + q * V);
          }
        }
        for (; c < nc; ++c) {
          for (int j = 0; j < G; ++j) {
            const int64_t off = base + j * C + c;
            const acc_t xmu = acc_t(x[off]) - mean_p[c];
            const acc_t g = masked_scalar<acc_t, kResidual, kRelu>(acc_t(dy[off]), xmu, scale_p[c], shift_p[c],
                                                                   kResidual ? acc_t(res[off]) : acc_t(0));
            acc_g[c] += g;
            acc_gx[c] += g * xmu;
          }
        }
      });
    }
  });

  std::vector<double> tg(C, 0.0), tgx(C, 0.0);
  for (int64_t rb = 0; rb < rt.rblocks; ++rb) {
    for (int64_t c = 0; c < C; ++c) {
      tg[c] += part_g[rb * C + c];
      tgx[c] += part_gx[rb * C + c];
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    a.sum_g[c] = static_cast<acc_t>(tg[c]);
    a.sum_gxmu[c] = static_cast<acc_t>(tgx[c]);
  }
}

template <typename scalar_t>
void backward_reduce(const ReduceArgs<scalar_t>& a) {
  // The residual only matters through the ReLU mask.
  BOOL_SWITCH(a.relu && a.residual != nullptr, kResidual, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] {
      if constexpr (!kResidual || kRelu) {
        if (a.geom.layout == Layout::kPlanes) {
          backward_reduce_planes<scalar_t, kResidual, kRelu>(a);
        } else {
          backward_reduce_rows<scalar_t, kResidual, kRelu>(a);
        }
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward elementwise over one contiguous run.
template <typename scalar_t, bool kResidual, bool kRelu, bool kTrain, typename Coef>
inline void backward_run(const scalar_t* dy, const scalar_t* x, const scalar_t* res, scalar_t* dx, scalar_t* gout,
                         int64_t n, const Coef& mean, const Coef& scale, const Coef& shift, const Coef& k,
                         const Coef& p, const Coef& q) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr bool kNeedX = kTrain || kRelu;
  const Vec zero(acc_t(0));
  int64_t i = 0;
  for (; i + IO::kWidth <= n; i += IO::kWidth) {
    Vec d[P], v[P], r[P], out[P];
    IO::load(dy + i, d);
    if constexpr (kNeedX) IO::load(x + i, v);
    if constexpr (kResidual) IO::load(res + i, r);
    for (int j = 0; j < P; ++j) {
      Vec g = d[j];
      Vec xmu;
      if constexpr (kNeedX) xmu = v[j] - mean.vec(i, j);
      if constexpr (kRelu) {
        Vec pre = pre_activation(xmu, scale.vec(i, j), shift.vec(i, j));
        if constexpr (kResidual) pre = pre + r[j];
        g = Vec::blendv(zero, g, pre > zero);
        d[j] = g;
      }
      if constexpr (kTrain) {
        out[j] = at::vec::fmadd(xmu, p.vec(i, j), g * k.vec(i, j)) + q.vec(i, j);
      } else {
        out[j] = g * k.vec(i, j);
      }
    }
    if (dx != nullptr) IO::store(dx + i, out);
    if (gout != nullptr) IO::store(gout + i, d);
  }
  for (; i < n; ++i) {
    acc_t g = acc_t(dy[i]);
    acc_t xmu = 0;
    if constexpr (kNeedX) xmu = acc_t(x[i]) - mean.at(i);
    if constexpr (kRelu) {
      acc_t pre = pre_activation(xmu, scale.at(i), shift.at(i));
      if constexpr (kResidual) pre = pre + acc_t(res[i]);
      if (!(pre > acc_t(0))) g = acc_t(0);
    }
    if (dx != nullptr) dx[i] = scalar_t(kTrain ? (xmu * p.at(i) + g * k.at(i)) + q.at(i) : g * k.at(i));
    if (gout != nullptr) gout[i] = scalar_t(g);
  }
}

template <typename scalar_t, bool kResidual, bool kRelu, bool kTrain>
void backward_elementwise_impl(const ElementwiseArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geom;
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = a.dx != nullptr ? a.dx->template data_ptr<scalar_t>() : nullptr;
  scalar_t* gout = a.g_out != nullptr ? a.g_out->template data_ptr<scalar_t>() : nullptr;
  const acc_t* p_arr = kTrain ? a.p : a.k;  // p, q unused when !kTrain
  const acc_t* q_arr = kTrain ? a.q : a.k;
  if (g.layout == Layout::kPlanes) {
    const PlaneChunks pc(g);
    at::parallel_for(0, pc.items, pc.grain(), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t plane = item / pc.chunks, c = plane % pc.C;
        const int64_t off = plane * pc.S + (item % pc.chunks) * pc.chunk;
        const int64_t n = std::min(pc.chunk, (plane + 1) * pc.S - off);
        backward_run<scalar_t, kResidual, kRelu, kTrain>(
            dy + off, x + off, kResidual ? res + off : nullptr, dx ? dx + off : nullptr, gout ? gout + off : nullptr,
            n, PlaneCoef<acc_t>(a.mean[c]), PlaneCoef<acc_t>(a.scale[c]), PlaneCoef<acc_t>(a.shift[c]),
            PlaneCoef<acc_t>(a.k[c]), PlaneCoef<acc_t>(p_arr[c]), PlaneCoef<acc_t>(q_arr[c]));
      }
    });
  } else {
    const int64_t C = g.C;
    at::parallel_for(0, g.N, std::max<int64_t>(1, kParallelMin / C), [&](int64_t begin, int64_t end) {
      const RowCoef<acc_t> mean(a.mean), scale(a.scale), shift(a.shift), k(a.k), p(p_arr), q(q_arr);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t off = r * C;
        backward_run<scalar_t, kResidual, kRelu, kTrain>(dy + off, x + off, kResidual ? res + off : nullptr,
                                                         dx ? dx + off : nullptr, gout ? gout + off : nullptr, C,
                                                         mean, scale, shift, k, p, q);
      }
    });
  }
}

template <typename scalar_t>
void backward_elementwise(const ElementwiseArgs<scalar_t>& a) {
  BOOL_SWITCH(a.relu && a.residual != nullptr, kResidual, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] {
      BOOL_SWITCH(a.use_x, kTrain, [&] {
        if constexpr (!kResidual || kRelu) backward_elementwise_impl<scalar_t, kResidual, kRelu, kTrain>(a);
      });
    });
  });
}

}  // namespace

FASTBN_DEFINE_CPU_KERNELS({&stats<scalar_t>, &normalize<scalar_t>, &backward_reduce<scalar_t>,
                           &backward_elementwise<scalar_t>})

}  // namespace FASTBN_CPU_CAP
}  // namespace cpu
}  // namespace fastbn
