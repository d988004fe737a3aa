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

// M >= 2 rows of x (Int8RowAvx512 takes M = 1), weight rows [begin, end); xsum [M]:
// the sums of x's rows.
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
