// Decode kernels: products of a few activation rows x [M, K] with a weight stored [N, K] (the
// serving order, contracted axis last), y [M, N], for M <= kMaxRows. Reached from JAX as XLA FFI
// custom calls (gemma3n/layers/decode_kernels.py). Each one streams the weight once, its rows
// split across XLA's own CPU thread pool, with the widest instructions the CPU has, picked at
// run time (or capped by the `isa` attribute, so tests reach every variant on one machine):
//   bf16 x bf16 -> f32   AVX-512 BF16 vdpbf16ps | AVX2 FMA | scalar
//   s8 x s8 -> s32       AVX-512 VNNI vpdpbusd  | AVX2 vpmaddwd | scalar    (exact)
//   s8 x int4 -> f32     int4 in groups of kInt4Group along K, one f16 scale per group;
//                        group sums exact in int32, then scaled and summed in float32.
//   s8 x gathered s8 rows -> s32   x [M, C] times rows ids[C] of a weight stored [F, D]
//                        (not [N, K]: a sparse FFN's down projection), exact.
// int4 packing: group g of row n is kInt4Group / 2 bytes; byte j holds element j in its low
// nibble and element j + kInt4Group / 2 in its high one, each stored as value + 8.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GEMMA3N_X86 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;
constexpr int64_t kInt4Group = 32;
constexpr int kInt4Offset = 8;
// The vector int4 kernels take a row kInt4ChunkGroups groups (64 bytes) at a time: one
// AVX-512 register, whose kInt4Lanes int32 lanes of vpdpbusd each sum 8 products of a group.
constexpr int64_t kInt4ChunkGroups = 4;
constexpr int64_t kInt4Chunk = kInt4ChunkGroups * kInt4Group;
constexpr int64_t kInt4Lanes = 16;
// Rows of the weight per scheduled chunk, at least: fewer would cost more in scheduling than
// they take to stream.
constexpr int64_t kMinChunkBytes = 1 << 16;
constexpr int64_t kChunksPerThread = 4;

enum Isa : int32_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

Isa BestIsa() {
#ifdef GEMMA3N_X86
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
        __builtin_cpu_supports("avx512vnni"))
      return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return kAvx2;
    return kScalar;
  }();
  return best;
#else
  return kScalar;
#endif
}

Isa Choose(int32_t requested) {
  Isa best = BestIsa();
  if (requested == kAuto) return best;
  return static_cast<Isa>(std::min<int32_t>(requested, best));
}

// Runs body(begin, end) over [0, n) in chunks on XLA's thread pool and the calling thread.
// Measured with jaxlib 0.10: the CPU client calls a handler on a thread outside its intra-op
// pool, whose size is the number of cores; the caller and threads - 1 helpers keep every core
// busy without oversubscribing.
// Chunks are claimed from a shared counter, so the call finishes even if no pool thread ever
// runs (XLA allows a pool of one, or tasks run inline); late tasks find nothing left and only
// touch the shared state they co-own.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const Body& body) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min((n + grain - 1) / grain, threads * kChunksPerThread);
  if (threads == 1 || chunks <= 1) {
    body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, n, &body] {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      body(n * c / chunks, n * (c + 1) / chunks);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule([work] { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) {
#ifdef GEMMA3N_X86
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
}

int64_t Grain(int64_t row_bytes) {
  return std::max<int64_t>(1, kMinChunkBytes / std::max<int64_t>(1, row_bytes));
}

float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

float F16ToF32(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = (sign << 31) | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = (sign << 31) | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign << 31;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; mant <<= 1; } while (!(mant & 0x400));
    bits = (sign << 31) | ((112 - e) << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// ---------------------------------------------------------------------------------------------
// Scalar kernels: any CPU; the reference the vector ones are tested against.

void Bf16Scalar(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t k,
                int64_t n, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += Bf16ToF32(x[i * k + j]) * Bf16ToF32(w[r * k + j]);
      y[i * n + r] = acc;
    }
}

void Int8Scalar(const int8_t* x, const int8_t* w, int32_t* y, int64_t m, int64_t k, int64_t n,
                int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t i = 0; i < m; ++i) {
      int32_t acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += int32_t{x[i * k + j]} * int32_t{w[r * k + j]};
      y[i * n + r] = acc;
    }
}

int Int4At(const uint8_t* row, int64_t j) {
  int64_t g = j / kInt4Group, e = j % kInt4Group, half = kInt4Group / 2;
  uint8_t byte = row[g * half + e % half];
  return (e < half ? (byte & 0xf) : (byte >> 4)) - kInt4Offset;
}

void Int4Scalar(const int8_t* x, const uint8_t* w, const uint16_t* scale, float* y, int64_t m,
                int64_t k, int64_t n, int64_t begin, int64_t end) {
  int64_t groups = k / kInt4Group;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * (k / 2);
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t e = 0; e < kInt4Group; ++e) {
          int64_t j = g * kInt4Group + e;
          dot += int32_t{x[i * k + j]} * Int4At(row, j);
        }
        acc += F16ToF32(scale[r * groups + g]) * static_cast<float>(dot);
      }
      y[i * n + r] = acc;
    }
  }
}

// The operands of the vector int4 kernels, with x rearranged once per call to match the
// chunks' unpacked nibbles: per chunk and row of x, xs holds the 4 groups' elements 0-15 (64
// bytes, the low nibbles' partners) then their elements 16-31; neg holds, per int32 lane of a
// chunk, minus kInt4Offset times the sum of the 8 x values the lane multiplies (so starting a
// lane's sum from it undoes the stored offset exactly). A last, partial chunk is zero-padded.
struct Int4Operands {
  Int4Operands(const int8_t* x, int64_t m, const uint8_t* w, const uint16_t* scale, float* y,
               int64_t k, int64_t n)
      : w(w), scale(scale), y(y), k(k), n(n), groups(k / kInt4Group),
        chunks((groups + kInt4ChunkGroups - 1) / kInt4ChunkGroups),
        xs_row(chunks * kInt4Chunk), neg_row(chunks * kInt4Lanes),
        xs(m * xs_row, 0), neg(m * neg_row, 0) {
    constexpr int64_t half = kInt4Group / 2, per_lane = 4;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < groups; ++g) {
        int64_t c = g / kInt4ChunkGroups, q = g % kInt4ChunkGroups;
        int8_t* to = xs.data() + i * xs_row + c * kInt4Chunk + q * half;
        int32_t* lane = neg.data() + i * neg_row + c * kInt4Lanes + q * (half / per_lane);
        for (int64_t h = 0; h < 2; ++h) {
          const int8_t* from = x + i * k + g * kInt4Group + h * half;
          std::memcpy(to + h * (kInt4Chunk / 2), from, half);
          for (int64_t e = 0; e < half; ++e) lane[e / per_lane] -= kInt4Offset * from[e];
        }
      }
  }
  int64_t FullChunks() const { return groups / kInt4ChunkGroups; }
  int64_t TailGroups() const { return groups - FullChunks() * kInt4ChunkGroups; }
  const uint8_t* Bytes(int64_t r, int64_t c) const {
    return w + r * (k / 2) + c * (kInt4Chunk / 2);
  }
  const uint16_t* Scales(int64_t r, int64_t c) const {
    return scale + r * groups + c * kInt4ChunkGroups;
  }
  const int8_t* XsAt(int64_t c) const { return xs.data() + c * kInt4Chunk; }
  const int32_t* NegAt(int64_t c) const { return neg.data() + c * kInt4Lanes; }

  const uint8_t* w;
  const uint16_t* scale;
  float* y;
  int64_t k, n, groups, chunks, xs_row, neg_row;
  std::vector<int8_t> xs;
  std::vector<int32_t> neg;
};

// A row's last, partial chunk copied into zeros: a zero nibble meets a zero x (and scale).
struct Int4Tail {
  Int4Tail(const Int4Operands& op, int64_t r) {
    int64_t c = op.FullChunks(), t = op.TailGroups();
    std::memcpy(bytes, op.Bytes(r, c), t * (kInt4Group / 2));
    std::memcpy(scales, op.Scales(r, c), t * sizeof(uint16_t));
  }
  uint8_t bytes[kInt4Chunk / 2] = {};
  uint16_t scales[kInt4ChunkGroups] = {};
};

// Gathered rows: y[M, D] = x[M, C] · w[ids[C], D], w int8 stored rows first [F, D] (a sparse
// layer's FFN down projection, of which only the kept units' rows are read), exact in int32.
// Columns [begin, end) of y.
void RowsInt8Scalar(const int8_t* x, const int32_t* ids, const int8_t* w, int32_t* y, int64_t m,
                    int64_t c, int64_t d, int64_t begin, int64_t end) {
  for (int64_t i = 0; i < m; ++i) {
    std::fill(y + i * d + begin, y + i * d + end, 0);
    for (int64_t j = 0; j < c; ++j) {
      const int8_t* row = w + int64_t{ids[j]} * d;
      for (int64_t col = begin; col < end; ++col) y[i * d + col] += int32_t{x[i * c + j]} * row[col];
    }
  }
}

// x of the gathered-rows kernels as int16 pairs (x[j], x[j + 1]) in int32 [M, ceil(C / 2)]:
// one vpmaddwd / vpdpwssd factor for two rows; an odd C's last pair ends in zero.
std::vector<int32_t> XPairs(const int8_t* x, int64_t m, int64_t c) {
  int64_t pairs = (c + 1) / 2;
  std::vector<int32_t> out(m * pairs);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < pairs; ++p) {
      int16_t lo = x[i * c + 2 * p], hi = 2 * p + 1 < c ? x[i * c + 2 * p + 1] : 0;
      out[i * pairs + p] = static_cast<int32_t>(static_cast<uint16_t>(lo) |
                                                (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16));
    }
  return out;
}

// Column of y that int32 lane l of the t-th vector of a gathered-rows strip holds: interleaving
// two rows' int16 values 128 bits at a time (vpunpck[lh]wd) puts columns 8L + 0..3 of each
// 128-bit lane L in the low vector, 8L + 4..7 in the high one.
constexpr int64_t StripColumn(int64_t t, int64_t l) {
  return 32 * (t / 2) + 8 * (l / 4) + 4 * (t % 2) + l % 4;
}

#ifdef GEMMA3N_X86
// ---------------------------------------------------------------------------------------------
// AVX2 kernels. Activations are widened once per call (x is a few rows; the weight is large).

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
// A chunk's registers stay in its row loop's (GCC does not inline it there on its own).
#define INLINE inline __attribute__((always_inline))

AVX2_TARGET float Hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2_TARGET int32_t Hsum256i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// xf: x as float32 [M, K].
template <int M>
AVX2_TARGET void Bf16Avx2(const float* xf, const uint16_t* w, float* y, int64_t k, int64_t n,
                          int64_t begin, int64_t end) {
  constexpr int64_t kStep = 8;
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* row = w + r * k;
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + kStep <= k; j += kStep) {
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
      __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      for (int i = 0; i < M; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + i * k + j), wv, acc[i]);
    }
    for (int i = 0; i < M; ++i) {
      float s = Hsum256(acc[i]);
      for (int64_t t = j; t < k; ++t) s += xf[i * k + t] * Bf16ToF32(row[t]);
      y[i * n + r] = s;
    }
  }
}

// x16: x widened to int16 [M, K].
template <int M>
AVX2_TARGET void Int8Avx2(const int16_t* x16, const int8_t* w, int32_t* y, int64_t k, int64_t n,
                          int64_t begin, int64_t end) {
  constexpr int64_t kStep = 16;
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = w + r * k;
    __m256i acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + kStep <= k; j += kStep) {
      __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
      for (int i = 0; i < M; ++i) {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + i * k + j));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(xv, wv));
      }
    }
    for (int i = 0; i < M; ++i) {
      int32_t s = Hsum256i(acc[i]);
      for (int64_t t = j; t < k; ++t) s += int32_t{x16[i * k + t]} * int32_t{row[t]};
      y[i * n + r] = s;
    }
  }
}

// One chunk of kInt4Chunk values (4 groups, 64 bytes) of an int4 row, in halves of two groups:
// the low nibbles of a half's 32 bytes are elements 0-15 of its two groups, the high ones
// elements 16-31, as bytes; xs holds x in that order (Int4Operands), so each int32 lane sums 8
// products of one group. neg: minus the offset's share per lane; s: the 4 groups' scales.
template <int M>
AVX2_TARGET INLINE void Int4ChunkAvx2(const uint8_t* bytes, const uint16_t* s, const int8_t* xs,
                                      const int32_t* neg, int64_t xs_row, int64_t neg_row,
                                      __m256 (&acc)[M]) {
  const __m256i mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  __m256 s4 = _mm256_castps128_ps256(
      _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))));
  for (int h = 0; h < 2; ++h) {
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * h));
    __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    // Lanes 0-3 group 2h, lanes 4-7 group 2h + 1.
    __m256 sv = _mm256_permutevar8x32_ps(s4, _mm256_set_epi32(2 * h + 1, 2 * h + 1, 2 * h + 1,
                                                              2 * h + 1, 2 * h, 2 * h, 2 * h, 2 * h));
    for (int i = 0; i < M; ++i) {
      const int8_t* xi = xs + i * xs_row + 32 * h;
      // Pair sums of at most 2 x 15 x 128 in magnitude, low plus high: no int16 saturation.
      __m256i pairs = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(
                                       reinterpret_cast<const __m256i*>(xi + kInt4Chunk / 2))));
      __m256i d = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(neg + i * neg_row + 8 * h)));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sv, acc[i]);
    }
  }
}

template <int M>
AVX2_TARGET void Int4Avx2(const Int4Operands& op, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c < op.FullChunks(); ++c)
      Int4ChunkAvx2<M>(op.Bytes(r, c), op.Scales(r, c), op.XsAt(c), op.NegAt(c), op.xs_row,
                       op.neg_row, acc);
    if (c < op.chunks) {
      Int4Tail tail(op, r);
      Int4ChunkAvx2<M>(tail.bytes, tail.scales, op.XsAt(c), op.NegAt(c), op.xs_row, op.neg_row,
                       acc);
    }
    for (int i = 0; i < M; ++i) op.y[i * op.n + r] = Hsum256(acc[i]);
  }
}

// Gathered rows, 16 columns per strip: two rows' int8 widened to int16, interleaved, and
// multiplied by the pair (x[j], x[j + 1]) with vpmaddwd: each int32 lane sums two products.
// Strips [begin, end) of kStrip2 columns.
constexpr int64_t kStrip2 = 16;

template <int M>
AVX2_TARGET void RowsInt8Avx2(const int32_t* xp, const int32_t* ids, const int8_t* w, int32_t* y,
                              int64_t c, int64_t d, int64_t begin, int64_t end) {
  int64_t pairs = (c + 1) / 2;
  for (int64_t strip = begin; strip < end; ++strip) {
    int64_t col = strip * kStrip2;
    __m256i acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* r0 = w + int64_t{ids[2 * p]} * d + col;
      // An odd C's last row pairs with itself, times x's zero.
      const int8_t* r1 = 2 * p + 1 < c ? w + int64_t{ids[2 * p + 1]} * d + col : r0;
      __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
      __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1)));
      __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
      for (int i = 0; i < M; ++i) {
        __m256i f = _mm256_set1_epi32(xp[i * pairs + p]);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(lo, f));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(hi, f));
      }
    }
    for (int i = 0; i < M; ++i) {
      alignas(32) int32_t lanes[2][8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), acc[i][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), acc[i][1]);
      for (int t = 0; t < 2; ++t)
        for (int l = 0; l < 8; ++l) y[i * d + col + StripColumn(t, l)] = lanes[t][l];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 kernels (BF16 and VNNI extensions). Tails are masked loads: zeros add nothing.

#define AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,avx2,fma,f16c")))

template <int M>
AVX512_TARGET void Bf16Avx512(const uint16_t* x, const uint16_t* w, float* y, int64_t k,
                              int64_t n, int64_t begin, int64_t end) {
  constexpr int64_t kStep = 32;
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* row = w + r * k;
    // Two accumulators per row keep two independent chains of vdpbf16ps in flight at M = 1.
    __m512 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 * kStep <= k; j += 2 * kStep) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(row + j);
      __m512bh w1 = (__m512bh)_mm512_loadu_si512(row + j + kStep);
      for (int i = 0; i < M; ++i) {
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_loadu_si512(x + i * k + j), w0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], (__m512bh)_mm512_loadu_si512(x + i * k + j + kStep), w1);
      }
    }
    for (; j < k; j += kStep) {
      __mmask32 mask = k - j >= kStep ? ~__mmask32{0} : (__mmask32{1} << (k - j)) - 1;
      __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, row + j);
      for (int i = 0; i < M; ++i)
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * k + j), wv);
    }
    for (int i = 0; i < M; ++i) y[i * n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
  }
}

// xu: x + 128 as unsigned bytes [M, K] (vpdpbusd multiplies unsigned by signed bytes); the
// weight row's own sum, times 128, is taken off again at the end.
template <int M>
AVX512_TARGET void Int8Avx512(const uint8_t* xu, const int8_t* w, int32_t* y, int64_t k,
                              int64_t n, int64_t begin, int64_t end) {
  constexpr int64_t kStep = 64;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = w + r * k;
    __m512i acc[M];
    __m512i wsum = _mm512_setzero_si512();
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_si512();
    for (int64_t j = 0; j < k; j += kStep) {
      __mmask64 mask = k - j >= kStep ? ~__mmask64{0} : (__mmask64{1} << (k - j)) - 1;
      __m512i wv = _mm512_maskz_loadu_epi8(mask, row + j);
      wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
      for (int i = 0; i < M; ++i)
        acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_maskz_loadu_epi8(mask, xu + i * k + j), wv);
    }
    // Modulo 2^32, like the vector sums: wrapped partial sums still give the exact result.
    uint32_t offset = 128u * static_cast<uint32_t>(_mm512_reduce_add_epi32(wsum));
    for (int i = 0; i < M; ++i)
      y[i * n + r] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i])) - offset);
  }
}

// One chunk (see Int4ChunkAvx2) in one step: the 64 bytes' low nibbles are elements 0-15 of
// the 4 groups, the high ones elements 16-31, so lane l of vpdpbusd sums products of group l / 4.
// (Reading 2 or 4 rows at once, to share the loads of x, ran ~1.3x faster on a weight in the
// cache, but 2x slower streaming one from memory: rows 1 KB apart defeat the prefetchers.)
template <int M>
AVX512_TARGET INLINE void Int4ChunkAvx512(const uint8_t* bytes, const uint16_t* s,
                                          const int8_t* xs, const int32_t* neg, int64_t xs_row,
                                          int64_t neg_row, __m512 (&acc)[M]) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512i b = _mm512_loadu_si512(bytes);
  __m512i lo = _mm512_and_si512(b, mask), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
  __m512 sv = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
      _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)))));
  for (int i = 0; i < M; ++i) {
    const int8_t* xi = xs + i * xs_row;
    __m512i d = _mm512_loadu_si512(neg + i * neg_row);
    d = _mm512_dpbusd_epi32(d, lo, _mm512_loadu_si512(xi));
    d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xi + kInt4Chunk / 2));
    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[i]);
  }
}

template <int M>
AVX512_TARGET void Int4Avx512(const Int4Operands& op, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c < op.FullChunks(); ++c)
      Int4ChunkAvx512<M>(op.Bytes(r, c), op.Scales(r, c), op.XsAt(c), op.NegAt(c), op.xs_row,
                         op.neg_row, acc);
    if (c < op.chunks) {
      Int4Tail tail(op, r);
      Int4ChunkAvx512<M>(tail.bytes, tail.scales, op.XsAt(c), op.NegAt(c), op.xs_row,
                         op.neg_row, acc);
    }
    for (int i = 0; i < M; ++i) op.y[i * op.n + r] = _mm512_reduce_add_ps(acc[i]);
  }
}

// Gathered rows, 64 columns (one cache line of each row) per strip, as RowsInt8Avx2 with
// vpdpwssd. Strips [begin, end) of kStrip512 columns.
constexpr int64_t kStrip512 = 64;

template <int M>
AVX512_TARGET void RowsInt8Avx512(const int32_t* xp, const int32_t* ids, const int8_t* w,
                                  int32_t* y, int64_t c, int64_t d, int64_t begin, int64_t end) {
  constexpr int kVectors = 4;
  int64_t pairs = (c + 1) / 2;
  for (int64_t strip = begin; strip < end; ++strip) {
    int64_t col = strip * kStrip512;
    __m512i acc[M][kVectors];
    for (int i = 0; i < M; ++i)
      for (int t = 0; t < kVectors; ++t) acc[i][t] = _mm512_setzero_si512();
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* r0 = w + int64_t{ids[2 * p]} * d + col;
      const int8_t* r1 = 2 * p + 1 < c ? w + int64_t{ids[2 * p + 1]} * d + col : r0;
      __m512i v[kVectors];
      for (int h = 0; h < 2; ++h) {
        __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 32 * h)));
        __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 32 * h)));
        v[2 * h] = _mm512_unpacklo_epi16(a, b);
        v[2 * h + 1] = _mm512_unpackhi_epi16(a, b);
      }
      for (int i = 0; i < M; ++i) {
        __m512i f = _mm512_set1_epi32(xp[i * pairs + p]);
        for (int t = 0; t < kVectors; ++t) acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], v[t], f);
      }
    }
    for (int i = 0; i < M; ++i) {
      alignas(64) int32_t lanes[kVectors][16];
      for (int t = 0; t < kVectors; ++t) _mm512_store_si512(lanes[t], acc[i][t]);
      for (int t = 0; t < kVectors; ++t)
        for (int l = 0; l < 16; ++l) y[i * d + col + StripColumn(t, l)] = lanes[t][l];
    }
  }
}
#endif  // GEMMA3N_X86

// Calls kernel.template operator()<M>() for the runtime row count m (1..kMaxRows).
template <typename F>
void WithRows(int64_t m, const F& kernel) {
  switch (m) {
    case 1: kernel.template operator()<1>(); break;
    case 2: kernel.template operator()<2>(); break;
    case 3: kernel.template operator()<3>(); break;
    case 4: kernel.template operator()<4>(); break;
    case 5: kernel.template operator()<5>(); break;
    case 6: kernel.template operator()<6>(); break;
    case 7: kernel.template operator()<7>(); break;
    case 8: kernel.template operator()<8>(); break;
  }
}

// Checks x [M, K] against w [N, K·num/den] and y [M, N]; returns an error or Success.
ffi::Error CheckShapes(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions wd,
                       ffi::AnyBuffer::Dimensions yd, int64_t num, int64_t den) {
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("decode kernels take x [M, K], w [N, K] and give y [M, N]");
  if (xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("decode kernels take 1 to 8 rows of x");
  if (wd[1] * den != xd[1] * num || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("decode kernel operand shapes do not match");
  return ffi::Error::Success();
}

ffi::Error Bf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), y->dimensions(), 1, 1); e.failure())
    return e;
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  const uint16_t* xp = x.typed_data();
  const uint16_t* wp = w.typed_data();
  float* yp = y->typed_data();
  int64_t grain = Grain(k * 2);
  switch (Choose(isa)) {
#ifdef GEMMA3N_X86
    case kAvx512:
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Bf16Avx512<M>(xp, wp, yp, k, n, b, e); });
      });
      break;
    case kAvx2: {
      std::vector<float> xf(m * k);
      for (int64_t i = 0; i < m * k; ++i) xf[i] = Bf16ToF32(xp[i]);
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Bf16Avx2<M>(xf.data(), wp, yp, k, n, b, e); });
      });
      break;
    }
#endif
    default:
      ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Bf16Scalar(xp, wp, yp, m, k, n, b, e); });
  }
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                    ffi::ResultBuffer<ffi::S32> y, int32_t isa) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), y->dimensions(), 1, 1); e.failure())
    return e;
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* yp = y->typed_data();
  int64_t grain = Grain(k);
  switch (Choose(isa)) {
#ifdef GEMMA3N_X86
    case kAvx512: {
      std::vector<uint8_t> xu(m * k);
      for (int64_t i = 0; i < m * k; ++i) xu[i] = static_cast<uint8_t>(int32_t{xp[i]} + 128);
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Int8Avx512<M>(xu.data(), wp, yp, k, n, b, e); });
      });
      break;
    }
    case kAvx2: {
      std::vector<int16_t> x16(xp, xp + m * k);
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Int8Avx2<M>(x16.data(), wp, yp, k, n, b, e); });
      });
      break;
    }
#endif
    default:
      ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Int8Scalar(xp, wp, yp, m, k, n, b, e); });
  }
  return ffi::Error::Success();
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::U8> w,
                    ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), y->dimensions(), 1, 2); e.failure())
    return e;
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  auto sd = scale.dimensions();
  if (k % kInt4Group != 0 || sd.size() != 2 || sd[0] != n || sd[1] != k / kInt4Group)
    return ffi::Error::InvalidArgument("int4 decode kernel: K must be a multiple of 32 and the "
                                       "scales [N, K / 32]");
  const int8_t* xp = x.typed_data();
  const uint8_t* wp = w.typed_data();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.typed_data());
  float* yp = y->typed_data();
  int64_t grain = Grain(k / 2);
  switch (Choose(isa)) {
#ifdef GEMMA3N_X86
    case kAvx512:
    case kAvx2: {
      const Int4Operands op(xp, m, wp, sp, yp, k, n);
      bool wide = Choose(isa) == kAvx512;
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) {
          if (wide) Int4Avx512<M>(op, b, e);
          else Int4Avx2<M>(op, b, e);
        });
      });
      break;
    }
#endif
    default:
      ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Int4Scalar(xp, wp, sp, yp, m, k, n, b, e); });
  }
  return ffi::Error::Success();
}

ffi::Error RowsInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S32> ids,
                        ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> y, int32_t isa) {
  auto xd = x.dimensions(), idd = ids.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || idd.size() != 1 || wd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("the gathered-rows kernel takes x [M, C], ids [C], "
                                       "w [F, D] and gives y [M, D]");
  if (xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("decode kernels take 1 to 8 rows of x");
  if (idd[0] != xd[1] || yd[0] != xd[0] || yd[1] != wd[1] || wd[0] < 1)
    return ffi::Error::InvalidArgument("gathered-rows kernel operand shapes do not match");
  int64_t m = xd[0], c = xd[1], f = wd[0], d = wd[1];
  // Out-of-range ids read the nearest row, as jnp.take(..., mode='clip') does.
  std::vector<int32_t> rows(ids.typed_data(), ids.typed_data() + c);
  for (int32_t& r : rows) r = static_cast<int32_t>(std::clamp<int64_t>(r, 0, f - 1));
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* yp = y->typed_data();
  Isa chosen = Choose(isa);
  int64_t strip = chosen == kAvx512 ? kStrip512 : kStrip2;
  int64_t strips = chosen == kScalar ? 0 : d / strip;
#ifdef GEMMA3N_X86
  if (strips > 0) {
    std::vector<int32_t> pairs = XPairs(xp, m, c);
    WithRows(m, [&]<int M>() {
      ParallelFor(pool, strips, Grain(c * strip), [&](int64_t b, int64_t e) {
        if (chosen == kAvx512) RowsInt8Avx512<M>(pairs.data(), rows.data(), wp, yp, c, d, b, e);
        else RowsInt8Avx2<M>(pairs.data(), rows.data(), wp, yp, c, d, b, e);
      });
    });
  }
#endif
  // The columns past the last whole strip (all of them on the scalar path).
  int64_t done = strips * strip;
  ParallelFor(pool, d - done, Grain(c), [&](int64_t b, int64_t e) {
    RowsInt8Scalar(xp, rows.data(), wp, yp, m, c, d, done + b, done + e);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMatvecBf16, Bf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMatvecInt8, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMatvecInt4, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nRowsInt8, RowsInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("isa"));

// The instruction set the kernels use on this CPU (an Isa value), for the Python side to report.
extern "C" int32_t Gemma3nKernelIsa() { return BestIsa(); }
