// s8 x s8 -> s32 kernels: y[M, N] = x[M, K] · w[N, K], exact.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_INT8_H_
#define GEMMA3N_KERNELS_INT8_H_

#include "common.h"

namespace gemma3n_kernels {

// ---------------------------------------------------------------------------------------------
// Scalar kernels: any CPU; the reference the vector ones are tested against.

inline void Int8Scalar(const int8_t* x, const int8_t* w, int32_t* y, int64_t m, int64_t k,
                       int64_t n, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t i = 0; i < m; ++i) {
      int32_t acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += int32_t{x[i * k + j]} * int32_t{w[r * k + j]};
      y[i * n + r] = acc;
    }
}

#ifdef GEMMA3N_X86
// x16: x widened to int16 [M, K].
template <int M>
AVX2_TARGET void Int8Avx2(const int16_t* x16, const int8_t* w, int32_t* y, int64_t k, int64_t n,
                          int64_t begin, int64_t end) {
  constexpr int64_t kStep = 16;
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = w + r * k;
    __m256i acc[M];
    UNROLL
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + kStep <= k; j += kStep) {
      __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
      UNROLL
      for (int i = 0; i < M; ++i) {
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16 + i * k + j));
        acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(xv, wv));
      }
    }
    UNROLL
    for (int i = 0; i < M; ++i) {
      int32_t s = Hsum256i(acc[i]);
      for (int64_t t = j; t < k; ++t) s += int32_t{x16[i * k + t]} * int32_t{row[t]};
      y[i * n + r] = s;
    }
  }
}

// True if x [count] holds no -128: the condition of Int8RowAvx2.
inline bool WithoutInt8Min(const int8_t* x, int64_t count) {
  return std::find(x, x + count, int8_t{-128}) == x + count;
}

// One row of x, with no -128 in it (WithoutInt8Min), a single stream through the weight. Per
// 32 weight bytes, vpmaddubsw multiplies |w| (unsigned) by x·sign(w) (signed) and adds the
// products in pairs: |x| <= 127 and |w| <= 128, so a pair's sum is at most 2·127·128 = 32512
// and never saturates int16; vpmaddwd by ones then widens the pairs to int32. Exact, in 5
// instructions per 32 bytes, where widening the weight to int16 takes 8.
AVX2_TARGET INLINE __m256i Int8SignedPairs(__m256i xv, __m256i wv, __m256i acc) {
  __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// The same, of the 32 bytes at x and at w.
AVX2_TARGET INLINE __m256i Int8SignedPairs(const int8_t* x, const int8_t* w, __m256i acc) {
  return Int8SignedPairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)), acc);
}

AVX2_TARGET inline void Int8RowAvx2(const int8_t* x, const int8_t* w, int32_t* y, int64_t k,
                                    int64_t begin, int64_t end) {
  constexpr int64_t kStep = 32;
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = w + r * k;
    // Two accumulators: two independent chains.
    __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    int64_t j = 0;
    for (; j + 2 * kStep <= k; j += 2 * kStep) {
      acc[0] = Int8SignedPairs(x + j, row + j, acc[0]);
      acc[1] = Int8SignedPairs(x + j + kStep, row + j + kStep, acc[1]);
    }
    if (j + kStep <= k) {
      acc[0] = Int8SignedPairs(x + j, row + j, acc[0]);
      j += kStep;
    }
    int32_t s = Hsum256i(_mm256_add_epi32(acc[0], acc[1]));
    for (; j < k; ++j) s += int32_t{x[j]} * int32_t{row[j]};
    y[r] = s;
  }
}

// As Int8RowAvx2 (no -128 in x), for one row of x past kRowKernelMaxK: R weight rows at a time,
// each load of x serving all R; the last rows of the range, fewer than R, take Int8RowAvx2.
template <int R>
AVX2_TARGET void Int8RowsTileAvx2(const int8_t* x, const int8_t* w, int32_t* y, int64_t k,
                                  int64_t begin, int64_t end) {
  constexpr int64_t kStep = 32;
  int64_t r = begin;
  for (; r + R <= end; r += R) {
    const int8_t* row = w + r * k;
    __m256i acc[R];
    UNROLL
    for (int t = 0; t < R; ++t) acc[t] = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + kStep <= k; j += kStep) {
      __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j));
      UNROLL
      for (int t = 0; t < R; ++t)
        acc[t] = Int8SignedPairs(
            xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + t * k + j)), acc[t]);
    }
    UNROLL
    for (int t = 0; t < R; ++t) {
      int32_t s = Hsum256i(acc[t]);
      for (int64_t i = j; i < k; ++i) s += int32_t{x[i]} * int32_t{row[t * k + i]};
      y[r + t] = s;
    }
  }
  Int8RowAvx2(x, w, y, k, r, end);
}

// One row of x (a single stream through the weight, which the hardware prefetchers follow
// best). xu: x + 128 as unsigned bytes [K] (vpdpbusd multiplies unsigned by signed bytes); the
// weight row's own sum, times 128, is taken off again at the end.
AVX512_TARGET inline void Int8RowAvx512(const uint8_t* xu, const int8_t* w, int32_t* y,
                                        int64_t k, int64_t begin, int64_t end) {
  constexpr int64_t kStep = 64;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = w + r * k;
    __m512i acc = _mm512_setzero_si512(), wsum = _mm512_setzero_si512();
    for (int64_t j = 0; j < k; j += kStep) {
      __mmask64 mask = k - j >= kStep ? ~__mmask64{0} : (__mmask64{1} << (k - j)) - 1;
      __m512i wv = _mm512_maskz_loadu_epi8(mask, row + j);
      wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
      acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(mask, xu + j), wv);
    }
    // Modulo 2^32, like the vector sums: wrapped partial sums still give the exact result.
    uint32_t offset = 128u * static_cast<uint32_t>(_mm512_reduce_add_epi32(wsum));
    y[r] = static_cast<int32_t>(static_cast<uint32_t>(_mm512_reduce_add_epi32(acc)) - offset);
  }
}

// Rows [0, MT) of x (and of y) against weight rows [r, r + RW), accumulators in registers (see
// kTileRows). Here the weight is the unsigned factor of vpdpbusd, as w + 128 (its sign bit
// flipped): x needs no conversion, and the offset's share, 128 times the sum of x's row
// (xsum), is the same for every weight row, so it is taken off once at the end.
template <int MT, int RW>
AVX512_TARGET void Int8TileAvx512(const int8_t* x, const int32_t* xsum, const int8_t* w,
                                  int32_t* y, int64_t k, int64_t n, int64_t r) {
  constexpr int64_t kStep = 64;
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* row = w + r * k;
  __m512i acc[MT][RW];
  UNROLL
  for (int i = 0; i < MT; ++i)
    UNROLL
    for (int t = 0; t < RW; ++t) acc[i][t] = _mm512_setzero_si512();
  for (int64_t j = 0; j < k; j += kStep) {
    // Past K, w + 128 meets x's zeros: nothing added.
    __mmask64 mask = k - j >= kStep ? ~__mmask64{0} : (__mmask64{1} << (k - j)) - 1;
    __m512i wu[RW];
    PrefetchNextBlock<RW>(row, k, j / kStep);
    UNROLL
    for (int t = 0; t < RW; ++t)
      wu[t] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, row + t * k + j), sign);
    UNROLL
    for (int i = 0; i < MT; ++i) {
      __m512i xv = _mm512_maskz_loadu_epi8(mask, x + i * k + j);
      UNROLL
      for (int t = 0; t < RW; ++t) acc[i][t] = _mm512_dpbusd_epi32(acc[i][t], wu[t], xv);
    }
  }
  // Modulo 2^32, like the vector sums: wrapped partial sums still give the exact result.
  UNROLL
  for (int i = 0; i < MT; ++i) {
    uint32_t offset = 128u * static_cast<uint32_t>(xsum[i]);
    UNROLL
    for (int t = 0; t < RW; ++t)
      y[i * n + r + t] = static_cast<int32_t>(
          static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][t])) - offset);
  }
}

// All M rows of x against weight rows [r, r + RW): one to four tiles.
template <int M, int RW>
AVX512_TARGET void Int8BlockAvx512(const int8_t* x, const int32_t* xsum, const int8_t* w,
                                   int32_t* y, int64_t k, int64_t n, int64_t r) {
  constexpr int kFirst = FirstTileRows(M);
  Int8TileAvx512<kFirst, RW>(x, xsum, w, y, k, n, r);
  if constexpr (M > kFirst)
    Int8BlockAvx512<M - kFirst, RW>(x + kFirst * k, xsum + kFirst, w, y + kFirst * n, k, n, r);
}

// M rows of x (Int8RowAvx512 takes M = 1 up to kRowKernelMaxK), weight rows [begin, end);
// xsum [M]: the sums of x's rows.
template <int M>
AVX512_TARGET void Int8TiledAvx512(const int8_t* x, const int32_t* xsum, const int8_t* w,
                                   int32_t* y, int64_t k, int64_t n,
                                   int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + kTileWeightRows <= end; r += kTileWeightRows)
    Int8BlockAvx512<M, kTileWeightRows>(x, xsum, w, y, k, n, r);
  for (; r < end; ++r) Int8BlockAvx512<M, 1>(x, xsum, w, y, k, n, r);
}
#endif  // GEMMA3N_X86

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_INT8_H_
