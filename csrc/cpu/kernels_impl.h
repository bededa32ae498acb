// The vectorised kernels for the kPlanes (NCHW) and kRows (channels-last, (N, C)) layouts. No include guard:
// each cpu_kernels_<capability>.cpp includes it once through kernels_build.h, after <ATen/cpu/vec/vec.h> for its
// capability, with FASTBN_CPU_CAP naming the namespace the copy lives in (so copies never collide at link time).
//
// Passes over memory (E = numel × element size):
//   stats                 1E read, one pass of shifted sums per tile (RunTiles: runs of contiguous positions,
//                         summed per position in L1, or per channel in registers for long planes); per-tile
//                         partials in double, folded per channel with Chan's merge.
//   normalize             1E read + 1E write (+1E read of the residual).
//   forward_fused         training forward on kPlanes: 1E read + 1E write, per block of whole channels (FusedBlocks)
//                         whose statistics are computed and which is then normalized from L2 by one thread.
//   backward_reduce       2E read (x, dy) (+1E of the forward's output when the ReLU mask is read from it), on the
//                         same tiles.
//   backward_elementwise  2E read + 1E write (dy only when eval without ReLU: 1E + 1E; +1E for g_out).
//   backward_fused        backward on kPlanes (training; eval when dw or db is wanted): 2E read + 1E write, per
//                         block of whole channels (FusedBlocks, kernels.h) reduced and then differentiated from
//                         cache, by one thread (many channels; it prefetches its next block meanwhile when the
//                         two fit in L2) or by all (channel-major).
// Outputs larger than streaming_store_bytes() are written with non-temporal stores (stream_output). The writers
// end a run that is not a whole number of vectors (a 7x7 or 14x14 plane) with a whole vector that overlaps the one
// before (vector_steps), runs shorter than a vector with masked loads and stores (VecIO); rows of C channels
// (channels_last) are taken rows_per_run at a time, a whole number of vectors, when C is not a multiple of the
// vector width.
// Parallelisation (at::parallel_for over work items, both layouts): reductions use tiles of (run group ×
// channel block × position chunk) cut from the shape alone, elementwise ops (plane, chunk) items or row
// ranges, so a (20, 6, 65536) and a (32, 2048, 7, 7) input both feed every thread. Reductions write per-tile
// partials merged in a fixed order: results do not depend on the thread count.
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
// Fewer elements than this run on one thread: waking the pool costs more than it saves. torch's batch norm takes
// every thread at any size; from 32768 down to 8192, bench_ops float32 NCHW, 2-vCPU Xeon, two alternating runs,
// fastbn's ms: forward-train 1x512x7x7 0.043/0.043 -> 0.032/0.031, backward 0.032/0.032 -> 0.026/0.025, forward-train
// 1x256x7x7 0.025/0.023 -> 0.018/0.018; larger shapes unchanged.
constexpr int64_t kParallelMin = 8192;

// Elementwise passes whose output is larger than streaming_store_bytes() (kernels.h) write it with non-temporal
// stores: a plain store first reads each line it writes (read-for-ownership), a third stream of traffic, for data
// that is evicted before anyone reads it again. Only outputs whose runs (planes, rows_per_run rows) all start on a line
// stream: where runs end mid-line, the lines they share take plain stores beside streamed ones, and a 7x7 NCHW
// normalize ran 10x slower so. Measured on the 2-core EPYC, alternating runs: backward NCHW 32x64x56x56 (25.7 MB
// of dx) 1.73 -> 1.41 ms streaming, 32x128x28x28 (12.8 MB) 0.75 -> 0.68 ms; eval channels_last 32x256x14x14
// (6.4 MB) 0.17 -> 0.11 ms. An output whose pages are not in memory yet (pages_in_memory, kernels.h) takes plain
// stores: each page faults on its first store and the kernel zeroes it into the cache, where plain stores overwrite
// it, while streamed lines made the zeroed ones go to memory as well.
inline int64_t rows_per_run(int64_t C, int64_t W);
template <int64_t W>
inline bool stream_output(const Geometry& g, const at::Tensor& out) {
  const int64_t run = g.layout == Layout::kPlanes ? g.S : rows_per_run(g.C, W) * g.C;
  const int64_t run_bytes = run * int64_t(out.element_size());
  const int64_t nbytes = static_cast<int64_t>(out.nbytes());
  return nbytes > streaming_store_bytes() && run_bytes % 64 == 0 &&
         reinterpret_cast<uintptr_t>(out.data_ptr()) % 64 == 0 && pages_in_memory(out.data_ptr(), nbytes);
}

template <typename VecT>
inline void store_vector(void* p, const VecT& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (stream && reinterpret_cast<uintptr_t>(p) % sizeof(VecT) == 0) {
    if constexpr (sizeof(VecT) == 32) {
      __m256i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm256_stream_si256(static_cast<__m256i*>(p), bits);
      return;
    }
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (sizeof(VecT) == 64) {
      __m512i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm512_stream_si512(static_cast<__m512i*>(p), bits);
      return;
    }
#endif
  }
#endif
  v.store(p);
}

// Orders a thread's non-temporal stores before the stores that follow (the end of a parallel region).
inline void stream_fence(bool stream) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if (stream) _mm_sfence();
#endif
}

// The first count (< a vector) elements of a 16-bit vector: run tails. AVX-512 has masked 16-bit loads and stores.
// ATen's 256-bit and scalar 16-bit vectors copy a partial count through memcpy, a library call per run tail (a
// float16 7x7 NCHW normalize ran 2.6x slower than torch's so), and a copy through a local buffer stalls on
// store-to-load forwarding (a third of that normalize's time in perf). The 256-bit versions below stay in
// registers: a masked load of whole 32-bit pairs and the odd last element blended in; a store in power-of-two
// pieces from the register.
#if defined(CPU_CAPABILITY_AVX2)
template <typename scalar_t>
C10_ALWAYS_INLINE Vectorized<scalar_t> load_prefix_16bit(const scalar_t* p, int64_t count) {
  const __m256i pairs = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count / 2)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), pairs);
  if (count & 1) {
    int16_t last;
    std::memcpy(&last, p + count - 1, sizeof(last));
    const __m256i lane = _mm256_cmpeq_epi16(_mm256_set1_epi16(static_cast<int16_t>(count - 1)),
                                            _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    v = _mm256_blendv_epi8(v, _mm256_set1_epi16(last), lane);
  }
  return v;
}
template <typename scalar_t>
C10_ALWAYS_INLINE void store_prefix_16bit(scalar_t* p, const Vectorized<scalar_t>& v, int64_t count) {
  const __m256i bits = v;
  __m128i part = _mm256_castsi256_si128(bits);
  if (count & 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), part);
    part = _mm256_extracti128_si256(bits, 1);
    p += 8;
  }
  if (count & 4) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), part);
    part = _mm_srli_si128(part, 8);
    p += 4;
  }
  if (count & 2) {
    const int32_t pair = _mm_cvtsi128_si32(part);
    std::memcpy(p, &pair, sizeof(pair));
    part = _mm_srli_si128(part, 4);
    p += 2;
  }
  if (count & 1) {
    const int16_t last = static_cast<int16_t>(_mm_extract_epi16(part, 0));
    std::memcpy(p, &last, sizeof(last));
  }
}
#else
template <typename scalar_t>
C10_ALWAYS_INLINE Vectorized<scalar_t> load_prefix_16bit(const scalar_t* p, int64_t count) {
  return Vectorized<scalar_t>::loadu(p, count);
}
template <typename scalar_t>
C10_ALWAYS_INLINE void store_prefix_16bit(scalar_t* p, const Vectorized<scalar_t>& v, int64_t count) {
  v.store(p, count);
}
#endif

// The per-run loops are inlined by force, and 16-bit loads take the two float halves with std::get: g++ had left
// std::tuple's assignment (of a std::tie) and normalize_run / backward_run themselves out of line, so every 7x7 plane
// paid calls, a vzeroupper and vectors passed through memory. bench_ops on the 2-vCPU Xeon, before -> after, geomean
// (worst shape): eval NCHW bfloat16 1.04x (0.53x) -> 1.30x (1.12x), float16 0.97x (0.51x) -> 1.14x (0.97x);
// forward-train channels_last bfloat16 1.50x (0.95x) -> 1.70x (1.44x), float16 1.43x (0.89x) -> 1.65x (1.41x); float32
// unchanged. Flattening VecIO's load and store as well (to inline ATen's convert_float_bfloat16, which g++'s
// inline-unit-growth limit leaves out of line in some callers) changed no timing.

// Loads kWidth elements of scalar_t as kParts vectors of acc_t (16-bit types widen to two float vectors). A
// count below kWidth reads only the first count elements (masked loads on AVX2/AVX-512) and zeroes the other lanes;
// stores write only the first count: a run's tail takes the vector path too.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int kParts = std::is_same_v<scalar_t, acc_t> ? 1 : 2;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kWidth = kVec * kParts;
  static_assert(kParts == 1 || Vectorized<scalar_t>::size() == kWidth, "16-bit vector must hold two float vectors");

  static C10_ALWAYS_INLINE void load(const scalar_t* p, Vec (&v)[kParts], int64_t count = kWidth) {
    if constexpr (kParts == 1) {
      v[0] = Vec::loadu(p, count);
    } else {
      const auto halves = at::vec::convert_to_float<scalar_t>(load_16bit(p, count));
      v[0] = std::get<0>(halves);
      v[1] = std::get<1>(halves);
    }
  }
  // A non-temporal store of a whole vector where p is aligned to the vector size, a plain store elsewhere.
  static C10_ALWAYS_INLINE void store(scalar_t* p, const Vec (&v)[kParts], bool stream, int64_t count = kWidth) {
    if constexpr (kParts == 1) {
      store_part(p, v[0], stream, count);
    } else {
      store_part(p, at::vec::convert_from_float<scalar_t>(v[0], v[1]), stream, count);
    }
  }

 private:
  static C10_ALWAYS_INLINE Vectorized<scalar_t> load_16bit(const scalar_t* p, int64_t count) {
    if (count == kWidth) return Vectorized<scalar_t>::loadu(p);
    return load_prefix_16bit(p, count);
  }
  template <typename VecT>
  static C10_ALWAYS_INLINE void store_part(scalar_t* p, const VecT& v, bool stream, int64_t count) {
    if (count == kWidth) {
      store_vector(p, v, stream);
    } else if constexpr (kParts == 1) {
      v.store(p, count);
    } else {
      store_prefix_16bit(p, v, count);
    }
  }
};

// Lanes of part `part` (of kParts vectors of V lanes) among the first count elements.
template <int64_t V>
constexpr int64_t part_count(int64_t count, int part) {
  return std::clamp<int64_t>(count - part * V, 0, V);
}

// Calls step(i, kWidth) over the whole vectors of a run of n elements, then covers the tail: where the run is at
// least a vector long, with one whole vector ending at n that overlaps the one before (the writers compute those
// elements again, to the same values, into an output that aliases no input), else with step(0, n) (masked).
// A 7x7 NCHW plane is then three whole vectors and one overlapping one in float32 (one and one in 16-bit types),
// with no masked load or store. This replaced running a thread's planes as one range whose vectors straddling two
// planes took coefficients blended per lane: the same speed with one path for every run (eval NCHW over torch,
// bench_ops, two alternating runs per build on the 2-core EPYC: float32 geomean 1.19x, 1.19x before, 1.15x, 1.20x
// after; float16 1.08x, 0.99x before, 1.03x, 1.10x after).
template <int64_t kWidth, typename Step>
inline void vector_steps(int64_t n, Step&& step) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) step(i, kWidth);
  if (i == n) return;
  if (n >= kWidth) {
    step(n - kWidth, kWidth);
  } else {
    step(i, n);
  }
}

// A per-channel coefficient seen by an elementwise loop: one value for a whole plane (kPlanes), or an array
// indexed like the row itself (kRows, the element index is the channel).
template <typename acc_t>
struct PlaneCoef {
  using Vec = Vectorized<acc_t>;
  Vec v;
  acc_t s;
  explicit PlaneCoef(acc_t value) : v(value), s(value) {}
  Vec vec(int64_t, int, int64_t) const { return v; }
};

template <typename acc_t>
struct RowCoef {
  using Vec = Vectorized<acc_t>;
  const acc_t* p;
  explicit RowCoef(const acc_t* ptr) : p(ptr) {}
  // The coefficients of elements [i, i + count), part `part` of them (see VecIO).
  Vec vec(int64_t i, int part, int64_t count) const {
    constexpr int64_t V = Vec::size();
    return Vec::loadu(p + i + part * V, part_count<V>(count, part));
  }
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
// Reductions see both layouts as tiles of runs: `runs` runs of L contiguous positions, run j starting `stride`
// elements after run j - 1, every position belonging to one channel.
//   kRows:   a run is one row's channels [c0, c1); stride C, one run per row.
//   kPlanes: a run is sample n's planes [c0, c1), positions [s0, s1) of each; stride C·S, one run per sample. Short
//            planes (7×7) put many whole planes in a run, long ones (112×112) are cut into chunks of one plane.
// Per-position accumulators (L acc_t values each, in L1) take the runs in memory order, a group of runs at a time:
// the loads stream sequentially, each accumulator vector is loaded and stored once per group, and there is no
// per-plane loop overhead however short the planes are. A tile's positions are folded into its channels once, at
// the end. The backward sums kPlanes tiles of planes at least a vector long plane by plane instead
// (plane_by_plane_sums). ATen's channels-last reductions also vectorise along C with per-row-block partials.
// A group reads kGroupStreams streams at once: four runs of x for the statistics, two runs of x and dy for the
// backward. On the 2-core EPYC the backward's four-run groups (eight streams) were slower: its reduction on
// channels_last 32x256x14x14 0.33 -> 0.29 ms with two-run groups, (4096, 1024) 0.95 -> 0.83 ms, alternating runs.
constexpr int kGroupStreams = 4;
// Positions per run: three L-value acc_t arrays (shift or mean, and two sums) stay within a 32 KiB L1.
constexpr int64_t kMaxRun = 2048;
// Tile shape: at least kMinItems work items when the tensor allows (a constant, so results do not depend on the
// thread count) and tiles of kMinTile values or more; at least kMinRuns runs per tile (a tile's fixed costs are
// per position, its work per position and run), narrowing the tile to no fewer than kMinRun positions to get
// there; at most kMaxRuns (kernels.h) runs summed in acc_t before a partial goes to double.
constexpr int64_t kMinItems = 64;
constexpr int64_t kMinTile = 16384;  // values: smaller tensors are not cut along the runs
constexpr int64_t kMinRuns = 64;
constexpr int64_t kMinRun = 256;

struct RunTile {
  int64_t c0, c1;     // channels
  int64_t len;        // positions per channel in a run (1 for kRows)
  int64_t base;       // element offset of the first run
  int64_t stride;     // elements between runs
  int64_t runs;       // number of runs
  int64_t slot;       // partial slot: the tile's row of the [slot][C] partial arrays
  int64_t reps = 1;   // kRows: rows per run (rows_per_run); position i is in channel c0 + (i / len) % (c1 - c0)
  int64_t L() const { return (c1 - c0) * len * reps; }
};

// kRows runs of whole rows: rows_per_run(C, W) rows of C channels make a whole number of W-element vectors, so
// channels_last with C not a multiple of the vector width (6, 24, 40) has no partial vector (or scalar loop) per
// row: a reduction tile's run and an elementwise run are that many rows, their per-position values repeating
// every C. 1 when C is a multiple of W, or when the rows needed would make a run longer than kMaxRun. On the
// 2-core EPYC, float32 channels_last, fastbn's ops alone against one run per row (medians of 4 alternating
// runs): (20, 6, 65536) forward-train 9.4 -> 3.2 ms, eval 3.3 -> 2.0 ms, backward 13.3 -> 4.9 ms, backward
// with the ReLU mask recomputed 23.9 -> 6.5 ms; 32x24x112x112 forward-train 4.9 -> 3.5 ms, backward with ReLU
// 12.9 -> 7.6 ms; 32x40x56x56 backward with ReLU 4.5 -> 2.5 ms.
inline int64_t rows_per_run(int64_t C, int64_t W) {
  const int64_t rows = W / std::gcd(C, W);
  return rows * C <= kMaxRun ? rows : 1;
}

// Cuts a tensor of either layout into tiles; slot_count(slot) is the number of values per channel in a slot.
struct RunTiles {
  Layout layout;
  int64_t N, C, S;
  int64_t chunk, chunks;  // kPlanes: positions per run per channel, chunks per plane (kRows: 1, 1)
  int64_t cb, cblocks;    // channels per tile, channel blocks
  int64_t G, groups;      // runs (samples, rows or rows_per_run rows) per tile, run groups
  int64_t reps = 1;       // kRows tiles of whole rows: rows per run; the last tail() rows are one more tile
  // width: the vector width of the kernels, for rows_per_run.
  RunTiles(const Geometry& g, int64_t width) : layout(g.layout), N(g.N), C(g.C), S(g.S) {
    if (layout == Layout::kPlanes && S > kMaxRun) {  // one channel per tile, summed in registers
      chunk = plane_chunk(S, kMaxChannelRun);
      chunks = div_up(S, chunk);
    } else {
      chunk = layout == Layout::kPlanes ? S : 1;
      chunks = 1;
    }
    const int64_t cb_max = std::clamp<int64_t>(kMaxRun / chunk, 1, C);
    const int64_t cb_min = std::clamp<int64_t>(kMinRun / chunk, 1, cb_max);
    const int64_t min_runs = std::min(N, kMinRuns);
    for (cb = cb_max;; cb = std::max(cb_min, cb / 2)) {
      cblocks = div_up(C, cb);
      const int64_t fewest = div_up(N, kMaxRuns);
      const int64_t most = std::max(fewest, std::min(N, N * cb * chunk / kMinTile));
      groups = std::clamp<int64_t>(div_up(kMinItems, cblocks * chunks), fewest, most);
      G = div_up(N, groups);
      if (G >= min_runs || cb == cb_min) break;
    }
    const int64_t rows = rows_per_run(C, width);
    if (layout == Layout::kRows && cb == C && N >= rows) {
      reps = rows;
      G = div_up(G, reps);
    }
    groups = div_up(N / reps, G);
  }
  // Per-position buffer length; one-channel plane tiles need none.
  int64_t max_L() const { return layout == Layout::kPlanes && cb == 1 ? 1 : cb * chunk * reps; }
  int64_t tail() const { return N % reps; }
  int64_t items() const { return groups * cblocks * chunks + (tail() > 0); }
  int64_t slots() const { return groups * chunks + (tail() > 0); }
  int64_t grain() const { return std::max<int64_t>(1, kParallelMin / (G * reps * cb * chunk)); }
  RunTile at(int64_t item) const {
    if (tail() > 0 && item == groups) {  // the rows after the last whole run, as one shorter run
      return RunTile{0, C, 1, (N - tail()) * C, C, 1, groups, tail()};
    }
    const int64_t k = item % chunks, rest = item / chunks;
    const int64_t cbi = rest % cblocks, g = rest / cblocks;
    const int64_t n0 = g * G, c0 = cbi * cb, s0 = k * chunk;
    const int64_t runs = N / reps;
    RunTile t{c0, std::min(C, c0 + cb), std::min(S, s0 + chunk) - s0, 0, 0, std::min(runs, n0 + G) - n0,
              g * chunks + k, reps};
    if (layout == Layout::kPlanes) {
      t.base = (n0 * C + c0) * S + s0;
      t.stride = C * S;
    } else {
      t.base = n0 * reps * C + c0;
      t.stride = reps * C;
    }
    return t;
  }
  int64_t slot_count(int64_t slot) const {
    if (tail() > 0 && slot == groups) return tail();
    const int64_t g = slot / chunks, k = slot % chunks, runs = N / reps;
    return (std::min(runs, g * G + G) - g * G) * reps * (std::min(S, k * chunk + chunk) - k * chunk);
  }
};

// Calls group(offset, G) for each full group of G runs, then group(offset, 1) for the runs left.
template <int G, typename Group>
inline void run_groups(const RunTile& t, Group&& group) {
  int64_t j = 0;
  for (; j + G <= t.runs; j += G) group(t.base + j * t.stride, std::integral_constant<int, G>{});
  for (; j < t.runs; ++j) group(t.base + j * t.stride, std::integral_constant<int, 1>{});
}

// Inside a group of G runs, prefetches the same positions of a later group's runs: the group's runs are separate
// streams (a row apart on kRows, a sample apart on kPlanes) that the hardware prefetchers follow late. The later
// group is at least kPrefetchBytes ahead: the next group of 256-byte rows (channels_last with 64 channels) is only
// a few lines away. On the 2-core EPYC, 8 KiB ahead beat the next group (channels_last forward-train 32x256x14x14
// 0.50 -> 0.44 ms, best of 4 alternating) and 16 KiB ahead.
constexpr int64_t kPrefetchBytes = 8192;
template <typename T>
constexpr int64_t kPrefetchElements = kPrefetchBytes / int64_t(sizeof(T));
// Whole runs, `stride` elements apart, that make at least kPrefetchBytes: how far ahead a reduction prefetches.
// Runs that start past the tensor's end are not requested (a partial last run of rows may still reach a few lines
// past it): their lines belong to other allocations and would be read from memory for nothing, and at small batches
// many requests fell there (at batch 1 every one: the next run is the next sample; the last group of four runs of
// every fused forward block). bench_ops, float32 NCHW, 2-vCPU Xeon, two alternating runs of both builds, fastbn's ms
// before -> after: backward 1x1024x14x14 0.197/0.200 -> 0.151/0.143, forward-train 4x256x28x28 0.448/0.459 ->
// 0.341/0.349, 8x512x28x28 1.505/1.497 -> 1.360/1.337; batch 32 unchanged.
template <typename T>
inline int64_t prefetch_runs(int64_t stride) {
  return div_up(kPrefetchElements<T>, stride);
}
template <int G, typename T>
struct GroupPrefetch {
  int64_t stride;  // elements between runs
  int64_t ahead;   // runs
  int64_t runs;    // of the G runs requested, those inside the tensor
  // group_offset: element offset of the group's first run; numel: the tensor's elements.
  GroupPrefetch(int64_t run_stride, int64_t group_offset, int64_t numel)
      : stride(run_stride),
        ahead(std::max<int64_t>(G, prefetch_runs<T>(stride))),
        runs(std::clamp<int64_t>(div_up(numel - group_offset, stride) - ahead, 0, G)) {}
  void operator()(const T* p) const {
    if constexpr (G > 1) {
      for (int j = 0; j < G; ++j) {
        if (j < runs) __builtin_prefetch(p + (ahead + j) * stride);
      }
    }
  }
};

// Vectors per run up to which a tile's sums stay in registers (per float vector; 16-bit types use two): three
// arrays of them (a shift or mean and two sums) within the vector registers, 32 with AVX-512, 16 with AVX2. Eight
// AVX-512 vectors take channels_last with 128 channels: its backward reduction went from 1.16-1.32x torch's time
// to 0.81-1.15x (three alternating runs on the 2-core EPYC, each timed against torch in the same process).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRegVectors = 8;
#else
constexpr int kRegVectors = 4;
#endif

// Calls f(std::integral_constant<int, n>{}) for a run of n vectors, 1 <= n <= Max.
template <int Max, typename F>
inline void with_vector_count(int64_t n, F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (void)((n == I + 1 ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
  }(std::make_integer_sequence<int, Max>{});
}

// Expands a per-channel value over a tile's positions: out[i] = f(c0 + (i / len) % (c1 - c0)).
template <typename acc_t, typename F>
inline void expand_channels(const RunTile& t, acc_t* out, F&& f) {
  const int64_t row = (t.c1 - t.c0) * t.len;
  for (int64_t j = 0; j < t.c1 - t.c0; ++j) std::fill(out + j * t.len, out + (j + 1) * t.len, f(t.c0 + j));
  for (int64_t r = 1; r < t.reps; ++r) std::copy(out, out + row, out + r * row);
}

// Σ of a tile position range in double (a channel's positions after the runs are summed).
template <typename acc_t>
inline double position_sum(const acc_t* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  double r = 0;
  if (n < 2 * V) {  // kRows: one position per channel
    for (int64_t i = 0; i < n; ++i) r += double(p[i]);
    return r;
  }
  Vec a0(acc_t(0)), a1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    a0 = a0 + Vec::loadu(p + i);
    a1 = a1 + Vec::loadu(p + i + V);
  }
  for (; i < n; ++i) r += double(p[i]);
  return r + double(hsum(a0 + a1));
}

// A tile's per-position sums folded per channel, in double: out[j] = Σ over the positions of channel t.c0 + j.
// kRows tiles have one position per channel: a conversion loop the compiler vectorises (a call of position_sum per
// channel took a tenth of the backward reduction's time on channels_last 32x512x7x7, hot in cache).
template <typename acc_t>
inline void channel_sums(const RunTile& t, const acc_t* p, double* out) {
  const int64_t channels = t.c1 - t.c0;
  if (t.len == 1) {
    for (int64_t j = 0; j < channels; ++j) out[j] = double(p[j]);
    for (int64_t r = 1; r < t.reps; ++r) {
      for (int64_t j = 0; j < channels; ++j) out[j] += double(p[r * channels + j]);
    }
  } else {
    for (int64_t j = 0; j < channels; ++j) out[j] = position_sum(p + j * t.len, t.len);
  }
}

// Sums a one-channel tile (a long plane, or a chunk of one) into two double totals: vf(offset, a, b) adds the
// kWidth values at offset into the vector sums a and b, sf(offset, a, b) one value into scalar sums. The runs are
// read one after the other, each a sequential stream, with two pairs of vector chains; the sums go to double
// once kMaxChannelRun positions have been summed (after each run of a long plane, after every 20 28x28 planes),
// so a float lane sums at most kMaxChannelRun / 32 values and short planes do not pay a horizontal sum each.
// pf(offset) prefetches every input at offset: while a run is summed, the first kRunPrefetchBytes of the next one
// are requested, so the hardware prefetchers (which stop at page boundaries) find the next stream under way.
constexpr int64_t kRunPrefetchBytes = 2048;

template <typename scalar_t, typename VF, typename SF, typename PF>
inline void one_channel_sums(const RunTile& t, VF&& vf, SF&& sf, PF&& pf, double& total_a, double& total_b) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::kWidth;
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  const int64_t fold_runs = std::max<int64_t>(1, kMaxChannelRun / t.len);
  total_a = total_b = 0;
  Vec a0(acc_t(0)), a1(acc_t(0)), b0(acc_t(0)), b1(acc_t(0));
  acc_t ta = 0, tb = 0;
  for (int64_t r = 0; r < t.runs; ++r) {
    const int64_t base = t.base + r * t.stride;
    if (r + 1 < t.runs) {
      const int64_t ahead = std::min<int64_t>(t.len, kRunPrefetchBytes / sizeof(scalar_t));
      for (int64_t i = 0; i < ahead; i += kLine) pf(base + t.stride + i);
    }
    int64_t i = 0;
    for (; i + 2 * W <= t.len; i += 2 * W) {
      vf(base + i, a0, b0);
      vf(base + i + W, a1, b1);
    }
    for (; i + W <= t.len; i += W) vf(base + i, a0, b0);
    for (; i < t.len; ++i) sf(base + i, ta, tb);
    if ((r + 1) % fold_runs == 0 || r + 1 == t.runs) {
      total_a += double(hsum(a0 + a1)) + double(ta);
      total_b += double(hsum(b0 + b1)) + double(tb);
      a0 = a1 = b0 = b1 = Vec(acc_t(0));
      ta = tb = 0;
    }
  }
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
      const double frac_b = double(n_b) / double(n + n_b), frac_a = double(n) / double(n + n_b);
      const double w = double(n) * frac_b;
      const part_t* pm = part_mean + j * C + begin;
      const part_t* pq = part_m2 + j * C + begin;
      for (int64_t c = 0; c < nc; ++c) {
        const double delta = double(pm[c]) - mean[c];
        // The weighted mean rather than mean + delta·frac_b: a partial mean of inf then stays inf, as torch's
        // sum would (inf + (finite - inf)·frac is NaN).
        mean[c] = mean[c] * frac_a + double(pm[c]) * frac_b;
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
// Statistics of a tile in one pass of shifted sums: with k = the channel's first value in the tile, Σ(x - k) and
// Σ(x - k)² in acc_t give mean = k + Σd/n and m2 = Σd² - (Σd)²/n. The shift is one of the channel's own values,
// so d is of the order of the spread, not of the mean (1e4 + randn keeps its digits: x - k is exact there). A
// tile sums at most kMaxRuns runs per position; its partial goes to double at once, and merge_partials combines
// the tiles in a fixed order.
// Per-tile buffers of the statistics: each channel's shift expanded per position, and the two per-position sums.
template <typename acc_t>
struct StatsBuffers {
  std::vector<acc_t> shift, sum, sq;
  explicit StatsBuffers(int64_t max_L) : shift(max_L), sum(max_L), sq(max_L) {}
};

// Σ(x - k) and Σ(x - k)² over a one-channel tile (one_channel_sums), into s and s2.
template <typename scalar_t>
void one_channel_shifted_sums(const scalar_t* x, const RunTile& t, at::opmath_type<scalar_t> k, double& s,
                              double& s2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  const Vec kv(k);
  one_channel_sums<scalar_t>(
      t,
      [&](int64_t o, Vec& a, Vec& b) {
        Vec v[P];
        IO::load(x + o, v);
        for (int q = 0; q < P; ++q) {
          const Vec d = v[q] - kv;
          a = a + d;
          b = at::vec::fmadd(d, d, b);
        }
      },
      [&](int64_t o, acc_t& a, acc_t& b) {
        const acc_t d = acc_t(x[o]) - k;
        a += d;
        b += d * d;
      },
      [&](int64_t o) { __builtin_prefetch(x + o); }, s, s2);
}

// (mean, m2) from the shifted sums s = Σ(x - k) and s2 = Σ(x - k)² over n values, inv_n = 1 / n.
inline void shifted_moments(double k, double s, double s2, double inv_n, double& mean, double& m2) {
  mean = k + s * inv_n;
  const double d2 = s2 - s * (s * inv_n);
  m2 = d2 < 0 ? 0 : d2;  // rounding only; NaN stays NaN
}

// (mean, m2) of one tile per channel, in double: out_mean[j], out_m2[j] for channel t.c0 + j.
template <typename scalar_t>
void stats_tile(const scalar_t* x, int64_t numel, const RunTile& t, StatsBuffers<at::opmath_type<scalar_t>>& buf,
                double* out_mean, double* out_m2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec, W = IO::kWidth;
  const int64_t L = t.L();
  const double inv_n = 1.0 / double(t.runs * t.len * t.reps);
  const auto fold = [&](int64_t j, double k, double s, double s2) {
    shifted_moments(k, s, s2, inv_n, out_mean[j], out_m2[j]);
  };
  if (t.c1 - t.c0 == 1 && t.len > 1) {
    const acc_t k = acc_t(x[t.base]);
    double s, s2;
    one_channel_shifted_sums(x, t, k, s, s2);
    fold(0, double(k), s, s2);
    return;
  }
  acc_t* shift = buf.shift.data();
  acc_t* sum = buf.sum.data();
  acc_t* sq = buf.sq.data();
  expand_channels(t, shift, [&](int64_t c) { return acc_t(x[t.base + (c - t.c0) * t.len]); });
  // Runs of at most kRegVectors vectors (channels-last with few channels): the sums stay in registers. Each vector's
  // line of a run kPrefetchBytes or more ahead is requested as it is read: without that, channels_last statistics
  // read at two thirds of the speed of a plain sum() of the same tensor (32x128x28x28, inputs out of cache, 2-core
  // EPYC: 299, 295, 301 us against 206, 208, 198 us for the sum; with it 233, 256, 205 us against 197, 231, 142 us).
  const auto in_registers = [&](auto nv_tag) {
    constexpr int NV = decltype(nv_tag)::value;
    Vec k[NV][P], s[NV][P], s2[NV][P];
    for (int v = 0; v < NV; ++v) {
      for (int q = 0; q < P; ++q) {
        k[v][q] = Vec::loadu(&shift[v * W + q * V]);
        s[v][q] = Vec(acc_t(0));
        s2[v][q] = Vec(acc_t(0));
      }
    }
    const int64_t ahead = prefetch_runs<scalar_t>(t.stride) * t.stride;
    for (int64_t r = 0; r < t.runs; ++r) {
      const scalar_t* run = x + t.base + r * t.stride;
      const bool prefetch = t.base + r * t.stride + ahead < numel;
      for (int v = 0; v < NV; ++v) {
        Vec d[P];
        if (prefetch) __builtin_prefetch(run + v * W + ahead);
        IO::load(run + v * W, d);
        for (int q = 0; q < P; ++q) {
          d[q] = d[q] - k[v][q];
          s[v][q] = s[v][q] + d[q];
          s2[v][q] = at::vec::fmadd(d[q], d[q], s2[v][q]);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      for (int q = 0; q < P; ++q) {
        s[v][q].store(&sum[v * W + q * V]);
        s2[v][q].store(&sq[v * W + q * V]);
      }
    }
  };
  if (L % W == 0 && L / W <= kRegVectors / P) {
    with_vector_count<kRegVectors / P>(L / W, in_registers);
  } else {
    std::fill_n(sum, L, acc_t(0));
    std::fill_n(sq, L, acc_t(0));
    run_groups<kGroupStreams>(t, [&](int64_t off, auto g_tag) {
      constexpr int G = decltype(g_tag)::value;
      const scalar_t* run = x + off;
      const GroupPrefetch<G, scalar_t> prefetch(t.stride, off, numel);
      int64_t i = 0;
      for (; i + W <= L; i += W) {
        Vec k[P], s[P], s2[P], d[G][P];
        prefetch(run + i);
        for (int q = 0; q < P; ++q) {
          k[q] = Vec::loadu(&shift[i + q * V]);
          s[q] = Vec::loadu(&sum[i + q * V]);
          s2[q] = Vec::loadu(&sq[i + q * V]);
        }
        for (int j = 0; j < G; ++j) {
          IO::load(run + j * t.stride + i, d[j]);
          for (int q = 0; q < P; ++q) d[j][q] = d[j][q] - k[q];
        }
        for (int q = 0; q < P; ++q) {
          if constexpr (G == 4) {
            s[q] = s[q] + ((d[0][q] + d[1][q]) + (d[2][q] + d[3][q]));
            s2[q] = s2[q] + (at::vec::fmadd(d[1][q], d[1][q], d[0][q] * d[0][q]) +
                             at::vec::fmadd(d[3][q], d[3][q], d[2][q] * d[2][q]));
          } else {
            static_assert(G == 1);
            s[q] = s[q] + d[0][q];
            s2[q] = at::vec::fmadd(d[0][q], d[0][q], s2[q]);
          }
          s[q].store(&sum[i + q * V]);
          s2[q].store(&sq[i + q * V]);
        }
      }
      for (; i < L; ++i) {
        for (int j = 0; j < G; ++j) {
          const acc_t d = acc_t(run[j * t.stride + i]) - shift[i];
          sum[i] += d;
          sq[i] += d * d;
        }
      }
    });
  }
  channel_sums(t, sum, out_mean);  // Σd and Σd² per channel, folded into (mean, m2) in place
  channel_sums(t, sq, out_m2);
  for (int64_t j = 0; j < t.c1 - t.c0; ++j) fold(j, double(shift[j * t.len]), out_mean[j], out_m2[j]);
}

template <typename scalar_t>
void stats(const StatsArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const RunTiles rt(a.geom, VecIO<scalar_t>::kWidth);
  const int64_t C = rt.C;
  // Partials in double: a tile mean of 1e4 + randn data rounded to float would lose the digits the merge needs.
  std::vector<double> part_mean(rt.slots() * C), part_m2(rt.slots() * C);

  at::parallel_for(0, rt.items(), rt.grain(), [&](int64_t begin, int64_t end) {
    StatsBuffers<acc_t> buf(rt.max_L());
    for (int64_t item = begin; item < end; ++item) {
      const RunTile t = rt.at(item);
      stats_tile<scalar_t>(x, a.x->numel(), t, buf, &part_mean[t.slot * C + t.c0], &part_m2[t.slot * C + t.c0]);
    }
  });
  merge_partials(rt.slots(), C, [&](int64_t slot) { return rt.slot_count(slot); }, part_mean.data(), part_m2.data(),
                 a.mean, a.m2);
}

// kPlanes elementwise work items: (plane, chunk of ≤ kSegment positions) in memory order, over the planes of
// channels [c0, c1) (all channels by default).
struct PlaneChunks {
  int64_t C, S, c0, cn, chunk, chunks, items;
  PlaneChunks(const Geometry& g, int64_t first = 0, int64_t last = -1)
      : C(g.C), S(g.S), c0(first), cn((last < 0 ? g.C : last) - first) {
    chunk = S > kSegment ? kSegment : S;
    chunks = div_up(S, chunk);
    items = g.N * cn * chunks;
  }
  int64_t grain() const { return std::max<int64_t>(1, kParallelMin / chunk); }
  // Calls f(offset, length, c) for the items [begin, end). The (sample, channel, chunk) counters step along: the
  // divisions per item were among the hottest instructions of a 7x7 normalize in perf.
  template <typename F>
  void visit(int64_t begin, int64_t end, F&& f) const {
    int64_t k = begin % chunks, rest = begin / chunks;
    int64_t ci = rest % cn, n = rest / cn;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = c0 + ci, plane = n * C + c;
      const int64_t off = plane * S + k * chunk;
      f(off, std::min(chunk, (plane + 1) * S - off), c);
      if (++k == chunks) {
        k = 0;
        if (++ci == cn) {
          ci = 0;
          ++n;
        }
      }
    }
  }
};

// K per-channel arrays as RowCoefs along kRows runs of `rows` whole rows: the arrays themselves for one-row runs, else
// copies repeated over the rows (a run's positions are its rows' channels one after the other).
template <typename acc_t, size_t K>
struct RowRunCoefs {
  std::vector<acc_t> repeated;
  std::array<const acc_t*, K> arrays;
  RowRunCoefs(int64_t C, int64_t rows, const std::array<const acc_t*, K>& channel_arrays)
      : repeated(rows > 1 ? K * rows * C : 0), arrays(channel_arrays) {
    for (size_t j = 0; j < K && rows > 1; ++j) {
      acc_t* out = repeated.data() + j * rows * C;
      for (int64_t r = 0; r < rows; ++r) std::copy(channel_arrays[j], channel_arrays[j] + C, out + r * C);
      arrays[j] = out;
    }
  }
  // The coefficients of a run starting at channel c0 (0 for runs of several rows).
  std::array<RowCoef<acc_t>, K> at(int64_t c0) const {
    return [&]<size_t... J>(std::index_sequence<J...>) {
      return std::array<RowCoef<acc_t>, K>{RowCoef<acc_t>(arrays[J] + c0)...};
    }(std::make_index_sequence<K>{});
  }
};

// Runs an elementwise pass in parallel: f(offset, length, coefs) for every contiguous run (a chunk of a plane on
// kPlanes, rows_per_run(C, W) rows on kRows), coefs[j] being the run's view of the per-channel acc_t array
// arrays[j] (kRows runs of several rows read copies of the arrays repeated over the run). Non-temporal stores
// (stream) are fenced at the end of each thread's share.
template <typename acc_t, int64_t W, size_t K, typename F>
void elementwise_runs(const Geometry& g, bool stream, const std::array<const acc_t*, K>& arrays, F&& f) {
  auto each = [&](auto&& make) {  // {make(arrays[0]), ...}
    return [&]<size_t... J>(std::index_sequence<J...>) {
      return std::array<decltype(make(arrays[0])), K>{make(arrays[J])...};
    }(std::make_index_sequence<K>{});
  };
  auto plane_coefs = [&](int64_t c) { return each([c](const acc_t* a) { return PlaneCoef<acc_t>(a[c]); }); };
  if (g.layout == Layout::kPlanes) {
    const PlaneChunks pc(g);
    at::parallel_for(0, pc.items, pc.grain(), [&](int64_t begin, int64_t end) {
      pc.visit(begin, end, [&](int64_t off, int64_t n, int64_t c) { f(off, n, plane_coefs(c)); });
      stream_fence(stream);
    });
    return;
  }
  const int64_t C = g.C, rows = rows_per_run(C, W), run = rows * C, total = g.N * C;
  const RowRunCoefs<acc_t, K> repeated(C, rows, arrays);
  const auto coefs = repeated.at(0);
  at::parallel_for(0, div_up(g.N, rows), std::max<int64_t>(1, kParallelMin / run), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i * run, std::min(run, total - i * run), coefs);
    stream_fence(stream);
  });
}

// ---------------------------------------------------------------------------------------------------------
// Normalize, one vector step: elements [i, i + count) of a run.
template <typename scalar_t, bool kResidual, bool kRelu, typename Coef>
C10_ALWAYS_INLINE void normalize_vector(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t i, int64_t count,
                                        const Coef& mean, const Coef& scale, const Coef& shift, bool stream) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  const Vec zero(acc_t(0));
  Vec v[P], r[P];
  IO::load(x + i, v, count);
  if constexpr (kResidual) IO::load(res + i, r, count);
  for (int q = 0; q < P; ++q) {
    Vec o = pre_activation(v[q] - mean.vec(i, q, count), scale.vec(i, q, count), shift.vec(i, q, count));
    if constexpr (kResidual) o = o + r[q];
    if constexpr (kRelu) o = Vec::blendv(o, zero, o < zero);
    v[q] = o;
  }
  IO::store(y + i, v, stream, count);
}

// Normalize: one contiguous run of n elements whose coefficients come from Coef (plane or row).
// The elementwise passes prefetch their inputs kPrefetchBytes ahead, into the next runs of the thread's share
// (alternating runs on the 2-core EPYC: eval channels_last 32x2048x7x7 0.88 -> 0.67 ms, 32x256x14x14
// 0.25 -> 0.18 ms, median of 4).
template <typename scalar_t, bool kResidual, bool kRelu, typename Coef>
C10_ALWAYS_INLINE void normalize_run(const scalar_t* x, const scalar_t* res, scalar_t* y, int64_t n,
                                     const Coef& mean, const Coef& scale, const Coef& shift, bool stream,
                                     int64_t prefetch_ahead) {
  vector_steps<VecIO<scalar_t>::kWidth>(n, [&](int64_t i, int64_t count) {
    if (prefetch_ahead != 0) {  // kPrefetchBytes ahead, or the next fused block's (forward_fused_impl)
      __builtin_prefetch(x + i + prefetch_ahead);
      if constexpr (kResidual) __builtin_prefetch(res + i + prefetch_ahead);
    }
    normalize_vector<scalar_t, kResidual, kRelu>(x, res, y, i, count, mean, scale, shift, stream);
  });
}

template <typename scalar_t, bool kResidual, bool kRelu>
void normalize_impl(const NormalizeArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  scalar_t* y = a.y->template data_ptr<scalar_t>();
  const bool stream = stream_output<VecIO<scalar_t>::kWidth>(a.geom, *a.y);
  elementwise_runs<acc_t, VecIO<scalar_t>::kWidth, 3>(
      a.geom, stream, {a.mean, a.scale, a.shift}, [&](int64_t off, int64_t n, const auto& coef) {
        normalize_run<scalar_t, kResidual, kRelu>(x + off, kResidual ? res + off : nullptr, y + off, n, coef[0],
                                                  coef[1], coef[2], stream, kPrefetchElements<scalar_t>);
      });
}

template <typename scalar_t>
void normalize(const NormalizeArgs<scalar_t>& a) {
  BOOL_SWITCH(a.residual != nullptr, kResidual, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] { normalize_impl<scalar_t, kResidual, kRelu>(a); });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Fused training forward over kPlanes (FusedBlocks, kernels.h, per-thread schedule): per block of whole channels one
// thread computes the block's statistics (stats_tile; the chunks of a long plane merged as stats merges its tiles),
// turns them into the normalize coefficients and writes y plane by plane while the block's x is still in L2,
// prefetching the next block's x meanwhile. Traffic: 1E read + 1E write (+1E residual), against 2E + 1E unfused.
template <typename scalar_t, bool kResidual, bool kRelu>
void forward_fused_impl(const FusedForwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = a.geom.N, C = a.geom.C, S = a.geom.S, cb = a.blocks.cb, chunk = a.blocks.chunk;
  const int64_t chunks = div_up(S, chunk);
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* res = kResidual ? a.residual->template data_ptr<scalar_t>() : nullptr;
  scalar_t* y = a.y->template data_ptr<scalar_t>();
  const bool stream = stream_output<VecIO<scalar_t>::kWidth>(a.geom, *a.y);
  const int64_t grain = N * C * S < kParallelMin ? a.blocks.blocks : 1;
  at::parallel_for(0, a.blocks.blocks, grain, [&](int64_t begin, int64_t end) {
    StatsBuffers<acc_t> buf(cb == 1 ? 1 : cb * chunk);  // one-channel tiles sum in registers
    std::vector<double> part_mean(chunks * cb), part_m2(chunks * cb);
    std::vector<acc_t> scale(cb), shift(cb);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * cb, c1 = std::min(C, c0 + cb), nc = c1 - c0;
      for (int64_t k = 0; k < chunks; ++k) {  // one tile unless a plane is longer than a tile
        const int64_t s0 = k * chunk;
        const RunTile t{c0, c1, std::min(chunk, S - s0), c0 * S + s0, C * S, N, 0};
        stats_tile<scalar_t>(x, a.x->numel(), t, buf, &part_mean[k * nc], &part_m2[k * nc]);
      }
      merge_partials(
          chunks, nc, [&](int64_t k) { return N * (std::min(S, k * chunk + chunk) - k * chunk); }, part_mean.data(),
          part_m2.data(), a.mean + c0, a.m2 + c0);
      for (int64_t c = c0; c < c1; ++c) {
        a.invstd[c] = invstd_of<acc_t>(a.m2[c], N * S, a.eps);
        scale[c - c0] = a.invstd[c] * a.weight[c];
        shift[c - c0] = a.bias[c];
      }
      const bool prefetch_next = a.blocks.prefetch_next && b + 1 < end;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t off = (n * C + c) * S;
          const int64_t ahead = prefetch_next && c + cb < C ? cb * S : 0;
          normalize_run<scalar_t, kResidual, kRelu>(x + off, kResidual ? res + off : nullptr, y + off, S,
                                                    PlaneCoef<acc_t>(a.mean[c]), PlaneCoef<acc_t>(scale[c - c0]),
                                                    PlaneCoef<acc_t>(shift[c - c0]), stream, ahead);
        }
      }
    }
    stream_fence(stream);
  });
}

template <typename scalar_t>
void forward_fused(const FusedForwardArgs<scalar_t>& a) {
  BOOL_SWITCH(a.residual != nullptr, kResidual, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] { forward_fused_impl<scalar_t, kResidual, kRelu>(a); });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward, what every schedule shares: the ReLU mask, the step that writes dx (and g) over one run, its tensors.
//
// The ReLU mask (kRelu): with kOutputMask, the forward's output y is read and g = dy where y > 0, as torch's
// threshold_backward does (a fused residual add is masked so: the output costs no memory the next layer does not
// keep anyway, the residual would); without it, the pre-activation is recomputed from x (no extra read).
template <bool kOutputMask, bool kRelu>
constexpr bool kRecomputeMask = kRelu && !kOutputMask;

template <typename T, bool kOutputMask, bool kRelu>
inline T masked(T dy, T xmu, T scale, T shift, T y) {
  if constexpr (kRelu) {
    const T zero(static_cast<typename T::value_type>(0));
    return T::blendv(zero, dy, (kOutputMask ? y : pre_activation(xmu, scale, shift)) > zero);
  } else {
    return dy;
  }
}

// Backward elementwise over one contiguous run.
template <typename scalar_t, bool kOutputMask, bool kRelu, bool kTrain, typename Coef>
C10_ALWAYS_INLINE void backward_run(const scalar_t* dy, const scalar_t* x, const scalar_t* y, scalar_t* dx,
                                    scalar_t* gout, int64_t n, const Coef& mean, const Coef& scale, const Coef& shift,
                                    const Coef& k, const Coef& p, const Coef& q, bool stream,
                                    int64_t prefetch_ahead = 0) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr bool kNeedX = kTrain || kRecomputeMask<kOutputMask, kRelu>;
  const Vec zero(acc_t(0));
  vector_steps<IO::kWidth>(n, [&](int64_t i, int64_t count) {
    Vec d[P], v[P], yv[P], out[P];
    if (prefetch_ahead != 0) {  // kPrefetchBytes ahead, or the next fused block's (backward_fused_impl)
      __builtin_prefetch(dy + i + prefetch_ahead, 0, 2);
      __builtin_prefetch(x + i + prefetch_ahead, 0, 2);
      if constexpr (kOutputMask) __builtin_prefetch(y + i + prefetch_ahead, 0, 2);
    }
    IO::load(dy + i, d, count);
    if constexpr (kNeedX) IO::load(x + i, v, count);
    if constexpr (kOutputMask) IO::load(y + i, yv, count);
    for (int j = 0; j < P; ++j) {
      Vec g = d[j];
      Vec xmu;
      if constexpr (kNeedX) xmu = v[j] - mean.vec(i, j, count);
      if constexpr (kRelu) {
        const Vec pre = kOutputMask ? yv[j] : pre_activation(xmu, scale.vec(i, j, count), shift.vec(i, j, count));
        g = Vec::blendv(zero, g, pre > zero);
        d[j] = g;
      }
      if constexpr (kTrain) {
        out[j] = at::vec::fmadd(xmu, p.vec(i, j, count), g * k.vec(i, j, count)) + q.vec(i, j, count);
      } else {
        out[j] = g * k.vec(i, j, count);
      }
    }
    if (dx != nullptr) IO::store(dx + i, out, stream, count);
    if (gout != nullptr) IO::store(gout + i, d, stream, count);
  });
}

// The backward elementwise pass's tensors (ElementwiseArgs) as pointers, whether its output streams, and
// backward_run over the run at an element offset: what the unfused, fused, channel-major and tile-by-tile eval
// schedules share.
template <typename scalar_t>
struct BackwardData {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* y;
  scalar_t* dx;
  scalar_t* gout;
  bool stream;
  explicit BackwardData(const ElementwiseArgs<scalar_t>& e)
      : dy(e.dy->template data_ptr<scalar_t>()),
        x(e.x->template data_ptr<scalar_t>()),
        y(e.output != nullptr ? e.output->template data_ptr<scalar_t>() : nullptr),
        dx(e.dx != nullptr ? e.dx->template data_ptr<scalar_t>() : nullptr),
        gout(e.g_out != nullptr ? e.g_out->template data_ptr<scalar_t>() : nullptr),
        stream(stream_output<VecIO<scalar_t>::kWidth>(e.geom, e.dx != nullptr ? *e.dx : *e.g_out)) {}
  template <bool kOutputMask, bool kRelu, bool kTrain, typename Coef>
  C10_ALWAYS_INLINE void run(int64_t off, int64_t n, const Coef& mean, const Coef& scale, const Coef& shift,
                             const Coef& k, const Coef& p, const Coef& q, int64_t prefetch_ahead) const {
    backward_run<scalar_t, kOutputMask, kRelu, kTrain>(dy + off, x + off, kOutputMask ? y + off : nullptr,
                                                       dx ? dx + off : nullptr, gout ? gout + off : nullptr, n, mean,
                                                       scale, shift, k, p, q, stream, prefetch_ahead);
  }
};

// ---------------------------------------------------------------------------------------------------------
// Backward reduction: g (masked dy) and g·(x - mean), per channel, on the same tiles as the statistics;
// per-position acc_t sums, per-tile partials in double, summed over the tiles in a fixed order.

// Per-tile buffers of the backward reduction: mean (and scale, shift for a recomputed mask) expanded per position,
// and the two per-position sums.
template <typename acc_t, bool kRecompute>
struct ReduceBuffers {
  std::vector<acc_t> coef, sum_g, sum_gx;
  explicit ReduceBuffers(int64_t max_L) : coef((kRecompute ? 3 : 1) * max_L), sum_g(max_L), sum_gx(max_L) {}
};

// One vector of positions into the sums: g = masked dy, sg += g, sgx += g·(x - mean).
template <typename Vec, bool kOutputMask, bool kRelu>
inline void add_g(const Vec& d, const Vec& v, const Vec& y, const Vec& mean, const Vec& scale, const Vec& shift,
                  Vec& sg, Vec& sgx) {
  const Vec xmu = v - mean;
  const Vec g = masked<Vec, kOutputMask, kRelu>(d, xmu, scale, shift, y);
  sg = sg + g;
  sgx = at::vec::fmadd(g, xmu, sgx);
}

// Sums a kPlanes tile whose runs hold several whole planes of at least a vector (7x7 and up) plane by plane:
// each plane's vectors (the last one partial, its other lanes zero) add into the two sums of its channel in
// registers, which live in acc_g / acc_gx (channels × kWidth values, in L1) between the runs and go to double
// every kMaxChannelRun positions as in one_channel_sums. The runs are read in memory order, as the per-position
// sums read them, without their per-position mean and the load and store of both sums for every vector of every
// group of runs. At batch 8 in cache (a layer's backward finds dy just written) that extra traffic made the NCHW
// backward slower than torch's; fastbn's backward op over torch's, medians of three alternating runs per build on
// the 2-core EPYC: 8x128x14x14 1.18 -> 0.95x torch's time, 8x256x14x14 1.10 -> 0.98x, 8x512x7x7 1.00 -> 0.90x; out
// of cache 32x256x14x14 0.65 -> 0.56x, 32x1024x14x14 and the 7x7 shapes unchanged.
// plane(c) returns channel c's step(offset, count, sg, sgx), which adds the count values at offset into the sums
// sg and sgx; pf(offset) prefetches every input (of numel elements) at offset.
template <typename scalar_t, typename Plane, typename PF>
void plane_by_plane_sums(const RunTile& t, int64_t numel, typename VecIO<scalar_t>::acc_t* acc_g,
                         typename VecIO<scalar_t>::acc_t* acc_gx, double* out_g, double* out_gx, Plane&& plane,
                         PF&& pf) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec, W = IO::kWidth;
  const int64_t channels = t.c1 - t.c0, whole = t.len / W * W;
  const int64_t fold_runs = std::max<int64_t>(1, kMaxChannelRun / t.len);
  const int64_t ahead = prefetch_runs<scalar_t>(t.stride) * t.stride;
  std::fill_n(acc_g, channels * W, acc_t(0));
  std::fill_n(acc_gx, channels * W, acc_t(0));
  std::fill_n(out_g, channels, 0.0);
  std::fill_n(out_gx, channels, 0.0);
  for (int64_t r = 0; r < t.runs; ++r) {
    const int64_t run = t.base + r * t.stride;
    const bool prefetch = run + ahead < numel;
    for (int64_t j = 0; j < channels; ++j) {
      const auto step = plane(t.c0 + j);
      const int64_t o = run + j * t.len;
      Vec sg[P], sgx[P];
      for (int q = 0; q < P; ++q) {
        sg[q] = Vec::loadu(acc_g + j * W + q * V);
        sgx[q] = Vec::loadu(acc_gx + j * W + q * V);
      }
      for (int64_t i = 0; i < whole; i += W) {
        if (prefetch) pf(o + i + ahead);
        step(o + i, W, sg, sgx);
      }
      if (whole < t.len) step(o + whole, t.len - whole, sg, sgx);
      for (int q = 0; q < P; ++q) {
        sg[q].store(acc_g + j * W + q * V);
        sgx[q].store(acc_gx + j * W + q * V);
      }
    }
    if ((r + 1) % fold_runs == 0 || r + 1 == t.runs) {
      for (int64_t j = 0; j < channels; ++j) {
        out_g[j] += position_sum(acc_g + j * W, W);
        out_gx[j] += position_sum(acc_gx + j * W, W);
      }
      std::fill_n(acc_g, channels * W, acc_t(0));
      std::fill_n(acc_gx, channels * W, acc_t(0));
    }
  }
}

// Σg and Σg·(x - mean) over a one-channel tile (one_channel_sums), into sum_g and sum_gx; y is read only with
// kOutputMask; pf(offset) prefetches every input at offset.
template <typename scalar_t, bool kOutputMask, bool kRelu, typename PF>
void one_channel_grad_sums(const scalar_t* dy, const scalar_t* x, const scalar_t* y, const RunTile& t,
                           at::opmath_type<scalar_t> mean, at::opmath_type<scalar_t> scale,
                           at::opmath_type<scalar_t> shift, PF&& pf, double& sum_g, double& sum_gx) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  const Vec zero(acc_t(0)), vmean(mean), vscale(scale), vshift(shift);
  one_channel_sums<scalar_t>(
      t,
      [&](int64_t o, Vec& sg, Vec& sgx) {
        Vec d[P], v[P], yv[P];
        IO::load(dy + o, d);
        IO::load(x + o, v);
        if constexpr (kOutputMask) IO::load(y + o, yv);
        for (int q = 0; q < P; ++q) {
          add_g<Vec, kOutputMask, kRelu>(d[q], v[q], kOutputMask ? yv[q] : zero, vmean, vscale, vshift, sg, sgx);
        }
      },
      [&](int64_t o, acc_t& sg, acc_t& sgx) {
        const acc_t xmu = acc_t(x[o]) - mean;
        const acc_t g = masked_grad(acc_t(dy[o]), xmu, scale, shift, kRelu, kOutputMask,
                                    kOutputMask ? acc_t(y[o]) : acc_t(0));
        sg += g;
        sgx += g * xmu;
      },
      pf, sum_g, sum_gx);
}

// Sums g and g·(x - mean) of one tile per channel: out_g[j], out_gx[j] for channel t.c0 + j.
template <typename scalar_t, bool kOutputMask, bool kRelu>
void backward_reduce_tile(const ReduceArgs<scalar_t>& a, const RunTile& t,
                          ReduceBuffers<at::opmath_type<scalar_t>, kRecomputeMask<kOutputMask, kRelu>>& buf,
                          double* out_g, double* out_gx) {
  constexpr bool kRecompute = kRecomputeMask<kOutputMask, kRelu>;
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int P = IO::kParts;
  constexpr int64_t V = IO::kVec, W = IO::kWidth;
  const scalar_t* dy = a.dy->template data_ptr<scalar_t>();
  const scalar_t* x = a.x->template data_ptr<scalar_t>();
  const scalar_t* y = kOutputMask ? a.output->template data_ptr<scalar_t>() : nullptr;
  const int64_t numel = a.x->numel();
  const Vec zero(acc_t(0));
  // The W positions at element o (the first count of them) into sg, sgx, given the positions' mean, scale and shift.
  const auto add = [&](int64_t o, const Vec* mean, const Vec* scale, const Vec* shift, Vec* sg, Vec* sgx,
                       int64_t count = IO::kWidth) {
    Vec d[P], v[P], yv[P];
    IO::load(dy + o, d, count);
    IO::load(x + o, v, count);
    if constexpr (kOutputMask) IO::load(y + o, yv, count);
    for (int q = 0; q < P; ++q) {
      add_g<Vec, kOutputMask, kRelu>(d[q], v[q], kOutputMask ? yv[q] : zero, mean[q], kRecompute ? scale[q] : zero,
                                     kRecompute ? shift[q] : zero, sg[q], sgx[q]);
    }
  };
  // Requests the line of every input at element o.
  const auto prefetch_inputs = [&](int64_t o) {
    __builtin_prefetch(dy + o);
    __builtin_prefetch(x + o);
    if constexpr (kOutputMask) __builtin_prefetch(y + o);
  };
  const int64_t L = t.L();
  if (t.c1 - t.c0 == 1 && t.len > 1) {
    one_channel_grad_sums<scalar_t, kOutputMask, kRelu>(dy, x, y, t, a.mean[t.c0], a.scale[t.c0], a.shift[t.c0],
                                                         prefetch_inputs, out_g[0], out_gx[0]);
    return;
  }
  if (t.len >= W) {
    plane_by_plane_sums<scalar_t>(t, numel, buf.sum_g.data(), buf.sum_gx.data(), out_g, out_gx, [&](int64_t c) {
      Vec mean[P], scale[P], shift[P];
      for (int q = 0; q < P; ++q) {
        mean[q] = Vec(a.mean[c]);
        scale[q] = kRecompute ? Vec(a.scale[c]) : zero;
        shift[q] = kRecompute ? Vec(a.shift[c]) : zero;
      }
      return [=, &add](int64_t o, int64_t count, Vec* sg, Vec* sgx) {
        add(o, mean, scale, shift, sg, sgx, count);
      };
    }, prefetch_inputs);
    return;
  }
  acc_t* mean_p = buf.coef.data();
  acc_t* scale_p = mean_p + (kRecompute ? L : 0);
  acc_t* shift_p = scale_p + (kRecompute ? L : 0);
  acc_t* sum_g = buf.sum_g.data();
  acc_t* sum_gx = buf.sum_gx.data();
  expand_channels(t, mean_p, [&](int64_t c) { return a.mean[c]; });
  if constexpr (kRecompute) {
    expand_channels(t, scale_p, [&](int64_t c) { return a.scale[c]; });
    expand_channels(t, shift_p, [&](int64_t c) { return a.shift[c]; });
  }
  // Loads the positions [i, i + W) of the per-position mean (and scale, shift) arrays.
  const auto load_coef = [&](int64_t i, Vec* mean, Vec* scale, Vec* shift) {
    for (int q = 0; q < P; ++q) {
      mean[q] = Vec::loadu(mean_p + i + q * V);
      if constexpr (kRecompute) {
        scale[q] = Vec::loadu(scale_p + i + q * V);
        shift[q] = Vec::loadu(shift_p + i + q * V);
      }
    }
  };
  // With the mask's scale and shift, five arrays of vectors instead of three.
  constexpr int kRegVectorsG = kRegVectors / P / (kRecompute ? 2 : 1);
  if (L % W == 0 && L / W <= kRegVectorsG) {
    // Runs of at most kRegVectorsG vectors (channels_last with few channels): the sums stay in registers, and the
    // runs are read in memory order. One-row groups with the sums in L1 ran at about 60% of this on 64 channels
    // (a C++ probe on the 2-core EPYC: 26 against 44 GB/s per thread).
    const auto in_registers = [&](auto nv_tag) {
      constexpr int NV = decltype(nv_tag)::value;
      Vec mean[NV][P], scale[NV][P], shift[NV][P], sg[NV][P], sgx[NV][P];
      for (int v = 0; v < NV; ++v) {
        load_coef(v * W, mean[v], scale[v], shift[v]);
        for (int q = 0; q < P; ++q) {
          sg[v][q] = zero;
          sgx[v][q] = zero;
        }
      }
      for (int64_t j = 0; j < t.runs; ++j) {
        for (int v = 0; v < NV; ++v) add(t.base + j * t.stride + v * W, mean[v], scale[v], shift[v], sg[v], sgx[v]);
      }
      for (int v = 0; v < NV; ++v) {
        for (int q = 0; q < P; ++q) {
          sg[v][q].store(sum_g + v * W + q * V);
          sgx[v][q].store(sum_gx + v * W + q * V);
        }
      }
    };
    with_vector_count<kRegVectorsG>(L / W, in_registers);
  } else {
    std::fill_n(sum_g, L, acc_t(0));
    std::fill_n(sum_gx, L, acc_t(0));
    run_groups<kGroupStreams / 2>(t, [&](int64_t off, auto g_tag) {
      constexpr int G = decltype(g_tag)::value;
      const GroupPrefetch<G, scalar_t> prefetch(t.stride, off, numel);
      int64_t i = 0;
      for (; i + W <= L; i += W) {
        Vec mean[P], scale[P], shift[P], sg[P], sgx[P];
        prefetch(dy + off + i);
        prefetch(x + off + i);
        load_coef(i, mean, scale, shift);
        for (int q = 0; q < P; ++q) {
          sg[q] = Vec::loadu(sum_g + i + q * V);
          sgx[q] = Vec::loadu(sum_gx + i + q * V);
        }
        for (int j = 0; j < G; ++j) add(off + j * t.stride + i, mean, scale, shift, sg, sgx);
        for (int q = 0; q < P; ++q) {
          sg[q].store(sum_g + i + q * V);
          sgx[q].store(sum_gx + i + q * V);
        }
      }
      for (; i < L; ++i) {
        for (int j = 0; j < G; ++j) {
          const int64_t o = off + j * t.stride + i;
          const acc_t xmu = acc_t(x[o]) - mean_p[i];
          const acc_t g = masked_grad(acc_t(dy[o]), xmu, kRecompute ? scale_p[i] : acc_t(0),
                                      kRecompute ? shift_p[i] : acc_t(0), kRelu, kOutputMask,
                                      kOutputMask ? acc_t(y[o]) : acc_t(0));
          sum_g[i] += g;
          sum_gx[i] += g * xmu;
        }
      }
    });
  }
  channel_sums(t, sum_g, out_g);
  channel_sums(t, sum_gx, out_gx);
}

// Channels [c0, c1)'s sums over the per-slot partials ([slot][C] arrays), slot by slot in a fixed order. The slots
// are walked row by row: walking each channel's column touched a new line per slot, a tenth of the reduction's time
// on (4096, 1024) with its 64 slots.
template <typename scalar_t>
void sum_slots(const ReduceArgs<scalar_t>& a, int64_t slots, const double* part_g, const double* part_gx, int64_t c0,
               int64_t c1) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = a.geom.C;
  std::vector<double> tg(part_g + c0, part_g + c1), tgx(part_gx + c0, part_gx + c1);
  for (int64_t slot = 1; slot < slots; ++slot) {
    const double* pg = part_g + slot * C + c0;
    const double* pgx = part_gx + slot * C + c0;
    for (int64_t j = 0; j < c1 - c0; ++j) {
      tg[j] += pg[j];
      tgx[j] += pgx[j];
    }
  }
  for (int64_t j = 0; j < c1 - c0; ++j) {
    a.sum_g[c0 + j] = static_cast<acc_t>(tg[j]);
    a.sum_gxmu[c0 + j] = static_cast<acc_t>(tgx[j]);
  }
}

// Eval's dx = g·k (and g) of one reduction tile, written by the thread that has just summed it: the tile's dy (and x
// for a recomputed mask) are read again from L2 (98-256 KiB of dy per tile on the ResNet-50 shapes in channels_last;
// RunTiles bounds a tile at kMaxRuns runs of kMaxRun positions).
template <typename scalar_t, bool kOutputMask, bool kRelu>
void write_eval_tile(const BackwardData<scalar_t>& d, const ElementwiseArgs<scalar_t>& e, const RunTile& t,
                     const RowRunCoefs<at::opmath_type<scalar_t>, 4>& rows) {
  using acc_t = at::opmath_type<scalar_t>;
  if (e.geom.layout == Layout::kRows) {  // runs of L positions
    const auto c = rows.at(t.c0);
    for (int64_t r = 0; r < t.runs; ++r) {
      d.template run<kOutputMask, kRelu, false>(t.base + r * t.stride, t.L(), c[0], c[1], c[2], c[3], c[3], c[3], 0);
    }
    return;
  }
  for (int64_t r = 0; r < t.runs; ++r) {
    const int64_t run = t.base + r * t.stride;
    for (int64_t c = t.c0; c < t.c1; ++c) {  // kPlanes: a segment of t.len positions per channel
      const PlaneCoef<acc_t> mean(e.mean[c]), scale(e.scale[c]), shift(e.shift[c]), k(e.k[c]);
      d.template run<kOutputMask, kRelu, false>(run + (c - t.c0) * t.len, t.len, mean, scale, shift, k, k, k, 0);
    }
  }
}

// With eval_dx (eval with dx and dw or db), each tile's dx is written right after its sums (write_eval_tile): dy
// is read from memory once, 3E where a reduction and then an elementwise pass take 4E. fastbn's eval backward (dx, dw,
// db) over torch's time, float32, 2-core EPYC, medians of 4 alternating runs, two passes -> tile by tile: out of cache
// channels_last 32x64x56x56 1.03 -> 0.73, 32x256x14x14 1.17 -> 0.99, 32x1024x14x14 0.85 -> 0.72, (4096, 1024)
// 1.15 -> 0.77; in cache channels_last 8x64x56x56 1.06 -> 0.90, 8x256x28x28 1.01 -> 0.91, but 8x1024x14x14
// 1.10 -> 1.22. Writing dx inside the reduction's loops instead lost in cache: with the two-run groups 8x256x28x28
// read 1.44, with one-run groups 8x1024x14x14 read 1.8 (three stores per vector: dx and both per-position sums).
template <typename scalar_t, bool kOutputMask, bool kRelu>
void backward_reduce_impl(const ReduceArgs<scalar_t>& a, const ElementwiseArgs<scalar_t>* eval_dx = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const RunTiles rt(a.geom, VecIO<scalar_t>::kWidth);
  const int64_t C = rt.C;
  std::vector<double> part_g(rt.slots() * C), part_gx(rt.slots() * C);
  std::optional<BackwardData<scalar_t>> d;
  std::optional<RowRunCoefs<acc_t, 4>> rows;
  if (eval_dx != nullptr) {
    d.emplace(*eval_dx);
    rows.emplace(C, rt.reps,
                 std::array<const acc_t*, 4>{eval_dx->mean, eval_dx->scale, eval_dx->shift, eval_dx->k});
  }

  at::parallel_for(0, rt.items(), rt.grain(), [&](int64_t begin, int64_t end) {
    ReduceBuffers<acc_t, kRecomputeMask<kOutputMask, kRelu>> buf(rt.max_L());
    for (int64_t item = begin; item < end; ++item) {
      const RunTile t = rt.at(item);
      backward_reduce_tile<scalar_t, kOutputMask, kRelu>(a, t, buf, &part_g[t.slot * C + t.c0],
                                                         &part_gx[t.slot * C + t.c0]);
      if (d) write_eval_tile<scalar_t, kOutputMask, kRelu>(*d, *eval_dx, t, *rows);
    }
    if (d) stream_fence(d->stream);
  });

  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    sum_slots(a, rt.slots(), part_g.data(), part_gx.data(), begin, end);
  });
}

template <typename scalar_t>
void backward_reduce(const ReduceArgs<scalar_t>& a) {
  // The output only matters through the ReLU mask.
  BOOL_SWITCH(a.relu && a.output != nullptr, kOutputMask, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] {
      if constexpr (!kOutputMask || kRelu) backward_reduce_impl<scalar_t, kOutputMask, kRelu>(a);
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Backward elementwise pass: dx (and g) over the whole tensor, from coefficients computed beforehand.
template <typename scalar_t, bool kOutputMask, bool kRelu, bool kTrain>
void backward_elementwise_impl(const ElementwiseArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const BackwardData<scalar_t> d(a);
  const acc_t* p_arr = kTrain ? a.p : a.k;  // p, q unused when !kTrain
  const acc_t* q_arr = kTrain ? a.q : a.k;
  elementwise_runs<acc_t, VecIO<scalar_t>::kWidth, 6>(
      a.geom, d.stream, {a.mean, a.scale, a.shift, a.k, p_arr, q_arr},
      [&](int64_t off, int64_t n, const auto& coef) {
        d.template run<kOutputMask, kRelu, kTrain>(off, n, coef[0], coef[1], coef[2], coef[3], coef[4], coef[5],
                                                   kPrefetchElements<scalar_t>);
      });
}

template <typename scalar_t>
void backward_elementwise(const ElementwiseArgs<scalar_t>& a) {
  BOOL_SWITCH(a.relu && a.output != nullptr, kOutputMask, [&] {
    BOOL_SWITCH(a.relu, kRelu, [&] {
      BOOL_SWITCH(a.use_x, kTrain, [&] {
        if constexpr (!kOutputMask || kRelu) backward_elementwise_impl<scalar_t, kOutputMask, kRelu, kTrain>(a);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------------------
// Fused backward over kPlanes (FusedBlocks, kernels.h): per block of whole channels, one thread sums the block as
// one tile (all N runs of cb·S positions), turns the sums into the dx coefficients (kTrain; eval's dx = g·k needs
// none) and writes dx plane by plane while the block's dy and x are still in cache. Traffic: 2E read + 1E write
// (+1E read of an output mask).
template <typename scalar_t, bool kOutputMask, bool kRelu, bool kTrain>
void backward_fused_impl(const FusedBackwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const ReduceArgs<scalar_t>& r = a.reduce;
  const ElementwiseArgs<scalar_t>& e = a.elementwise;
  const int64_t N = r.geom.N, C = r.geom.C, S = r.geom.S, cb = a.blocks.cb;
  const BackwardData<scalar_t> d(e);
  const int64_t grain = N * C * S < kParallelMin ? a.blocks.blocks : 1;
  const int64_t chunk = a.blocks.chunk;
  at::parallel_for(0, a.blocks.blocks, grain, [&](int64_t begin, int64_t end) {
    // One-channel tiles sum in registers.
    ReduceBuffers<acc_t, kRecomputeMask<kOutputMask, kRelu>> buf(cb == 1 ? 1 : cb * chunk);
    std::vector<acc_t> p(cb), q(cb);
    std::vector<double> sum_g(cb), sum_gx(cb), tile_g(cb), tile_gx(cb);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * cb, c1 = std::min(C, c0 + cb);
      std::fill(sum_g.begin(), sum_g.end(), 0.0);
      std::fill(sum_gx.begin(), sum_gx.end(), 0.0);
      for (int64_t s0 = 0; s0 < S; s0 += chunk) {  // one tile unless a plane is longer than a tile
        const RunTile t{c0, c1, std::min(chunk, S - s0), c0 * S + s0, C * S, N, 0};
        backward_reduce_tile<scalar_t, kOutputMask, kRelu>(r, t, buf, tile_g.data(), tile_gx.data());
        for (int64_t j = 0; j < c1 - c0; ++j) {
          sum_g[j] += tile_g[j];
          sum_gx[j] += tile_gx[j];
        }
      }
      for (int64_t j = 0; j < c1 - c0; ++j) {
        const int64_t c = c0 + j;
        r.sum_g[c] = static_cast<acc_t>(sum_g[j]);
        r.sum_gxmu[c] = static_cast<acc_t>(sum_gx[j]);
        if constexpr (kTrain) train_dx_coefficients(e.k[c], a.invstd[c], r.sum_g[c], r.sum_gxmu[c], N * S, p[j], q[j]);
      }
      const bool prefetch_next = a.blocks.prefetch_next && b + 1 < end;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t off = (n * C + c) * S;
          const int64_t ahead = prefetch_next && c + cb < C ? cb * S : 0;
          d.template run<kOutputMask, kRelu, kTrain>(off, S, PlaneCoef<acc_t>(e.mean[c]), PlaneCoef<acc_t>(e.scale[c]),
                                                     PlaneCoef<acc_t>(e.shift[c]), PlaneCoef<acc_t>(e.k[c]),
                                                     PlaneCoef<acc_t>(p[c - c0]), PlaneCoef<acc_t>(q[c - c0]), ahead);
        }
      }
    }
    stream_fence(d.stream);
  });
}

// The channel-major schedule (FusedBlocks, kernels.h): for each channel block of the reduction's tiling, all threads
// sum its tiles, the block's sums become dx coefficients, and all threads write its dx while the block's dy and x
// are in the last-level cache. Traffic: 2E read + 1E write when a block fits in that cache (a (20, 6, 65536)
// float block is 10.5 MB of inputs), the unfused 4E read + 1E write when it does not.
template <typename scalar_t, bool kOutputMask, bool kRelu, bool kTrain>
void backward_channel_major_impl(const FusedBackwardArgs<scalar_t>& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const ReduceArgs<scalar_t>& r = a.reduce;
  const ElementwiseArgs<scalar_t>& e = a.elementwise;
  const Geometry& geom = r.geom;
  const int64_t C = geom.C, m = geom.per_channel();
  const BackwardData<scalar_t> d(e);
  const RunTiles rt(geom, VecIO<scalar_t>::kWidth);  // kPlanes: whole runs of one sample
  const int64_t block_items = rt.groups * rt.chunks;  // items of one channel block, (group, chunk) pairs
  std::vector<double> part_g(rt.slots() * C), part_gx(rt.slots() * C);
  std::vector<acc_t> p(C), q(C);
  for (int64_t cbi = 0; cbi < rt.cblocks; ++cbi) {
    at::parallel_for(0, block_items, rt.grain(), [&](int64_t begin, int64_t end) {
      ReduceBuffers<acc_t, kRecomputeMask<kOutputMask, kRelu>> buf(rt.max_L());
      for (int64_t i = begin; i < end; ++i) {
        const RunTile t = rt.at(((i / rt.chunks) * rt.cblocks + cbi) * rt.chunks + i % rt.chunks);
        backward_reduce_tile<scalar_t, kOutputMask, kRelu>(r, t, buf, &part_g[t.slot * C + t.c0],
                                                           &part_gx[t.slot * C + t.c0]);
      }
    });
    const int64_t c0 = cbi * rt.cb, c1 = std::min(C, c0 + rt.cb);
    sum_slots(r, rt.slots(), part_g.data(), part_gx.data(), c0, c1);
    for (int64_t c = c0; c < c1 && kTrain; ++c) {
      train_dx_coefficients(e.k[c], a.invstd[c], r.sum_g[c], r.sum_gxmu[c], m, p[c], q[c]);
    }
    const PlaneChunks pc(geom, c0, c1);
    at::parallel_for(0, pc.items, pc.grain(), [&](int64_t begin, int64_t end) {
      pc.visit(begin, end, [&](int64_t off, int64_t n, int64_t c) {
        d.template run<kOutputMask, kRelu, kTrain>(off, n, PlaneCoef<acc_t>(e.mean[c]), PlaneCoef<acc_t>(e.scale[c]),
                                                   PlaneCoef<acc_t>(e.shift[c]), PlaneCoef<acc_t>(e.k[c]),
                                                   PlaneCoef<acc_t>(p[c]), PlaneCoef<acc_t>(q[c]),
                                                   kPrefetchElements<scalar_t>);
      });
      stream_fence(d.stream);
    });
  }
}

template <typename scalar_t>
void backward_fused(const FusedBackwardArgs<scalar_t>& a) {
  BOOL_SWITCH(a.reduce.relu && a.reduce.output != nullptr, kOutputMask, [&] {
    BOOL_SWITCH(a.reduce.relu, kRelu, [&] {
      BOOL_SWITCH(a.elementwise.use_x, kTrain, [&] {
        if constexpr (!kOutputMask || kRelu) {
          if (a.blocks.channel_major) {
            backward_channel_major_impl<scalar_t, kOutputMask, kRelu, kTrain>(a);
          } else if (a.blocks.fits()) {
            backward_fused_impl<scalar_t, kOutputMask, kRelu, kTrain>(a);
          } else {  // eval only (see FusedBackwardArgs)
            backward_reduce_impl<scalar_t, kOutputMask, kRelu>(a.reduce, &a.elementwise);
          }
        }
      });
    });
  });
}

}  // namespace

FASTBN_DEFINE_CPU_KERNELS(make_kernels,
                          {&stats<scalar_t>, &normalize<scalar_t>, &forward_fused<scalar_t>,
                           &backward_reduce<scalar_t>, &backward_elementwise<scalar_t>, &backward_fused<scalar_t>})

}  // namespace FASTBN_CPU_CAP
}  // namespace cpu
}  // namespace fastbn
