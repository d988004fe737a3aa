// What every decode kernel shares: the instruction-set choice, the thread pool's ParallelFor,
// scalar conversions, the target attributes and the dispatch on the row count.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_COMMON_H_
#define GEMMA3N_KERNELS_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

// GEMMA3N_PORTABLE compiles only the scalar kernels, as on a CPU of another architecture (the
// tests compile that way, so that it keeps building).
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(GEMMA3N_PORTABLE)
#include <cpuid.h>
#include <immintrin.h>
#define GEMMA3N_X86 1
#endif

namespace ffi = xla::ffi;

namespace gemma3n_kernels {

constexpr int64_t kMaxRows = 16;
// Rows of the weight per scheduled chunk, at least: fewer would cost more in scheduling than
// they take to stream.
constexpr int64_t kMinChunkBytes = 1 << 16;
constexpr int64_t kChunksPerThread = 4;

enum Isa : int32_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

inline Isa BestIsa() {
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

// Whether the CPU has AMX with bfloat16 tiles, enabled by the OS: XLA's own products use it
// there, so the Python side leaves it products of many rows (gemma3n/layers/gemm.py) and bf16
// and int8 ones past a few rows (decode_kernels.max_rows).
inline bool HasAmxBf16() {
#ifdef GEMMA3N_X86
  constexpr unsigned kAmxBf16 = 1u << 22, kAmxTile = 1u << 24;        // CPUID.(7, 0):EDX
  constexpr unsigned kOsxsave = 1u << 27;                             // CPUID.1:ECX
  constexpr unsigned long long kTileState = (1ull << 17) | (1ull << 18);  // XCR0
  constexpr unsigned kAmx = kAmxBf16 | kAmxTile;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d & kAmx) != kAmx) return false;
  unsigned a1, b1, c1, d1;
  if (!__get_cpuid(1, &a1, &b1, &c1, &d1) || !(c1 & kOsxsave)) return false;
  unsigned lo, hi;
  __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((static_cast<unsigned long long>(hi) << 32 | lo) & kTileState) == kTileState;
#else
  return false;
#endif
}

inline Isa Choose(int32_t requested) {
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

inline int64_t Grain(int64_t row_bytes) {
  return std::max<int64_t>(1, kMinChunkBytes / std::max<int64_t>(1, row_bytes));
}

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// bf16 of a float32, rounded to nearest, ties to even, as XLA converts (no NaN case: the
// callers' values are finite).
inline uint16_t F32ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float F16ToF32(uint16_t h) {
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

// Fully unrolls a loop over a register tile's accumulators, so that GCC keeps them in registers
// (left to its later unrolling, it kept the arrays in memory too: a store of every accumulator
// per step, which made the 8-row bf16 tiles store-bound, ~2x slower).
#define UNROLL _Pragma("GCC unroll 16")

#ifdef GEMMA3N_X86
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
// A chunk's registers stay in its row loop's (GCC does not inline it there on its own).
#define INLINE inline __attribute__((always_inline))

AVX2_TARGET inline float Hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AVX2_TARGET inline int32_t Hsum256i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

#define AVX512_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,avx2,fma,f16c")))
#endif  // GEMMA3N_X86

// The register-tiled kernels (M >= 2) keep a tile of x rows times kTileWeightRows weight rows of
// accumulators in registers, so that one load of x serves every weight row of the tile and one
// load of the weight every x row: the x rows a weight row meets per load, not the weight, bound
// the untiled kernels at several rows (x is re-read from L1/L2 once per weight row). M rows of x
// go in up to four tiles of at most kTileRows over the same weight rows, which stay in L1 from
// the first tile to the last: 4 x 4 accumulators, 4 weight vectors and one of x fill 21 of
// AVX-512's 32 registers.
// Reading kTileWeightRows rows at once is a stream the hardware prefetchers follow badly (the
// tiles ran up to 2x slower than one row at a time from memory, as Int4ChunkAvx512 notes), so
// each tile prefetches the next block of weight rows into L2 itself, in address order.
constexpr int kTileRows = 4;
constexpr int kTileWeightRows = 4;
constexpr int64_t kCacheLine = 64;
// Past this K, one row of x is re-read from L2 for every weight row by a kernel that streams
// the weight a row at a time: Zen 4's 32 KB L1 holds the weight streaming through as well as x,
// which at E4B's FFN down (K = 16384) is 32 KB in bf16 (64 KB as the AVX2 kernel's float32),
// 24 KB rearranged for int4 and 16 KB in int8. One row of x then takes weight rows a few at a
// time, loading x once for all of them: the down projection streamed 1.3-1.75x faster from
// memory, for each kind and instruction set. Below it the row loop stays, since weight rows
// 4 KB apart or less (K = 2048) read together ran up to 2x slower (see kTileWeightRows).
constexpr int64_t kRowKernelMaxK = 8192;
static_assert(kMaxRows <= 4 * kTileRows, "x rows must fit four tiles");

#ifdef GEMMA3N_X86
// Prefetches into L2 the RW cache lines of the next block of RW weight rows (each row_bytes
// long) that match step `step` (RW lines, one per row) over this block: the steps over a block
// cover the whole next one. Past the weight's end it prefetches nothing useful, harmlessly (a
// prefetch never faults; the address is formed as an integer, not a pointer past the array).
template <int RW>
inline void PrefetchNextBlock(const void* block, int64_t row_bytes, int64_t step) {
  uintptr_t next = reinterpret_cast<uintptr_t>(block) + RW * row_bytes + step * RW * kCacheLine;
  for (int t = 0; t < RW; ++t)
    _mm_prefetch(reinterpret_cast<const char*>(next + t * kCacheLine), _MM_HINT_T1);
}
#endif  // GEMMA3N_X86

// The x rows of the first tile, of M: all of them; half (rounded up) when two tiles hold them;
// else a whole tile, the rest going in the next ones.
constexpr int FirstTileRows(int m) {
  return m <= kTileRows ? m : m <= 2 * kTileRows ? (m + 1) / 2 : kTileRows;
}

template <typename F, int... Ms>
void WithRowsIn(int64_t m, const F& kernel, std::integer_sequence<int, Ms...>) {
  ((m == Ms + 1 ? (kernel.template operator()<Ms + 1>(), 0) : 0), ...);
}

// Calls kernel.template operator()<M>() for the runtime row count m (1..kMaxRows).
template <typename F>
void WithRows(int64_t m, const F& kernel) {
  WithRowsIn(m, kernel, std::make_integer_sequence<int, kMaxRows>{});
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_COMMON_H_
