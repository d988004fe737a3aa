// Decode kernels: products of a few activation rows x [M, K] with a weight stored [N, K] (the
// serving order, contracted axis last), y [M, N], for M <= kMaxRows. Reached from JAX as XLA FFI
// custom calls (gemma3n/layers/decode_kernels.py). Each one streams the weight once, its rows
// split across XLA's own CPU thread pool, with the widest instructions the CPU has, picked at
// run time (or capped by the `isa` attribute, so tests reach every variant on one machine):
//   bf16 x bf16 -> f32   AVX-512 BF16 vdpbf16ps | AVX2 FMA | scalar
//   s8 x s8 -> s32       AVX-512 VNNI vpdpbusd  | AVX2 vpmaddwd | scalar    (exact)
//   s8 x int4 -> f32     int4 in groups of kInt4Group along K, one f16 scale per group;
//                        group sums exact in int32, then scaled and summed in float32.
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

#ifdef GEMMA3N_X86
// ---------------------------------------------------------------------------------------------
// AVX2 kernels. Activations are widened once per call (x is a few rows; the weight is large).

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

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

// The 32 nibbles of one int4 group as unsigned bytes in element order.
AVX2_TARGET __m256i Int4Group256(const uint8_t* bytes) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  __m128i mask = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
}

// corr: per 4 consecutive x values, kInt4Offset times their sum [M, K / 4] (undoes the offset
// of the stored nibbles exactly, in int32).
template <int M>
AVX2_TARGET void Int4Avx2(const int8_t* x, const int32_t* corr, const uint8_t* w,
                          const uint16_t* scale, float* y, int64_t k, int64_t n, int64_t begin,
                          int64_t end) {
  int64_t groups = k / kInt4Group;
  __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * (k / 2);
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i wv = Int4Group256(row + g * (kInt4Group / 2));
      __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[r * groups + g]));
      for (int i = 0; i < M; ++i) {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * k + g * kInt4Group));
        __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + (i * k + g * kInt4Group) / 4));
        __m256i d = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones), c);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[i]);
      }
    }
    for (int i = 0; i < M; ++i) y[i * n + r] = Hsum256(acc[i]);
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

// Two int4 groups per step: 64 nibbles as unsigned bytes in element order.
AVX512_TARGET __m512i Int4Pair512(const uint8_t* bytes) {
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  __m256i mask = _mm256_set1_epi8(0x0f);
  __m512i lo_hi = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_and_si256(b, mask)),
      _mm256_and_si256(_mm256_srli_epi16(b, 4), mask), 1);   // [lo g0, lo g1, hi g0, hi g1]
  return _mm512_shuffle_i64x2(lo_hi, lo_hi, _MM_SHUFFLE(3, 1, 2, 0));  // [lo g0, hi g0, lo g1, hi g1]
}

template <int M>
AVX512_TARGET void Int4Avx512(const int8_t* x, const int32_t* corr, const uint8_t* w,
                              const uint16_t* scale, float* y, int64_t k, int64_t n,
                              int64_t begin, int64_t end) {
  int64_t groups = k / kInt4Group;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* row = w + r * (k / 2);
    const uint16_t* srow = scale + r * groups;
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      __m512i wv = Int4Pair512(row + g * (kInt4Group / 2));
      __m512 s = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castps_pd(_mm512_set1_ps(_cvtsh_ss(srow[g]))),
          _mm256_castps_pd(_mm256_set1_ps(_cvtsh_ss(srow[g + 1]))), 1));
      for (int i = 0; i < M; ++i) {
        int64_t at = i * k + g * kInt4Group;
        // Starting from -corr leaves exactly sum(q * x) per lane.
        __m512i d = _mm512_dpbusd_epi32(_mm512_sub_epi32(_mm512_setzero_si512(),
                                                         _mm512_loadu_si512(corr + at / 4)),
                                        wv, _mm512_loadu_si512(x + at));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i]);
      }
    }
    float tail[M] = {};
    if (g < groups) {  // an odd last group, 256 bits wide
      __m256i wv = Int4Group256(row + g * (kInt4Group / 2));
      __m256 s = _mm256_set1_ps(_cvtsh_ss(srow[g]));
      for (int i = 0; i < M; ++i) {
        int64_t at = i * k + g * kInt4Group;
        __m256i d = _mm256_dpbusd_epi32(
            _mm256_sub_epi32(_mm256_setzero_si256(),
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr + at / 4))),
            wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + at)));
        tail[i] = Hsum256(_mm256_mul_ps(_mm256_cvtepi32_ps(d), s));
      }
    }
    for (int i = 0; i < M; ++i) y[i * n + r] = _mm512_reduce_add_ps(acc[i]) + tail[i];
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
      std::vector<int32_t> corr(m * k / 4);
      for (int64_t q = 0; q < m * k / 4; ++q)
        corr[q] = kInt4Offset * (xp[4 * q] + xp[4 * q + 1] + xp[4 * q + 2] + xp[4 * q + 3]);
      bool wide = Choose(isa) == kAvx512;
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) {
          if (wide) Int4Avx512<M>(xp, corr.data(), wp, sp, yp, k, n, b, e);
          else Int4Avx2<M>(xp, corr.data(), wp, sp, yp, k, n, b, e);
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

// The instruction set the kernels use on this CPU (an Isa value), for the Python side to report.
extern "C" int32_t Gemma3nKernelIsa() { return BestIsa(); }
