// bf16 x bf16 -> f32 kernels: y[M, N] = x[M, K] · w[N, K], float32 sums.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_BF16_H_
#define GEMMA3N_KERNELS_BF16_H_

#include "common.h"

namespace gemma3n_kernels {

// Where the kernels find weight row r (of K values): the kernels are templates over it.
// The rows of a weight [N, K], in order.
struct DenseRows {
  const uint16_t* w;
  int64_t k;
  const uint16_t* operator()(int64_t r) const { return w + r * k; }
#ifdef GEMMA3N_X86
  // Step `step` of a block of RW rows starting at r prefetches its share of the next block.
  template <int RW>
  void PrefetchNext(int64_t r, int64_t step) const { PrefetchNextBlock<RW>(w + r * k, k * 2, step); }
#endif
};

// Rows ids[0..count) of a weight [F, K] (a sparse FFN's kept units), ids within [0, F).
struct GatheredRows {
  const uint16_t* w;
  int64_t k;
  const int32_t* ids;
  int64_t count;
  const uint16_t* operator()(int64_t r) const { return w + int64_t{ids[r]} * k; }
#ifdef GEMMA3N_X86
  // Line `step` of each of the next block's RW rows: the steps over a block (one line of each
  // row per step) cover the whole next block, as DenseRows' prefetch does.
  template <int RW>
  void PrefetchNext(int64_t r, int64_t step) const {
    UNROLL
    for (int t = 0; t < RW && r + RW + t < count; ++t)
      _mm_prefetch(reinterpret_cast<const char*>((*this)(r + RW + t)) + step * kCacheLine,
                   _MM_HINT_T1);
  }
#endif
};

// ---------------------------------------------------------------------------------------------
// Scalar kernels: any CPU; the reference the vector ones are tested against.

template <typename Rows>
void Bf16Scalar(const uint16_t* x, const Rows& w, float* y, int64_t m, int64_t k, int64_t n,
                int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0;
      for (int64_t j = 0; j < k; ++j) acc += Bf16ToF32(x[i * k + j]) * Bf16ToF32(w(r)[j]);
      y[i * n + r] = acc;
    }
}

#ifdef GEMMA3N_X86
// xf: x as float32 [M, K].
template <int M, typename Rows>
AVX2_TARGET void Bf16Avx2(const float* xf, const Rows& w, float* y, int64_t k, int64_t n,
                          int64_t begin, int64_t end) {
  constexpr int64_t kStep = 8;
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* row = w(r);
    __m256 acc[M];
    UNROLL
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + kStep <= k; j += kStep) {
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j));
      __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      UNROLL
      for (int i = 0; i < M; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + i * k + j), wv, acc[i]);
    }
    UNROLL
    for (int i = 0; i < M; ++i) {
      float s = Hsum256(acc[i]);
      for (int64_t t = j; t < k; ++t) s += xf[i * k + t] * Bf16ToF32(row[t]);
      y[i * n + r] = s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AVX-512 (BF16 extension). Tails are masked loads: zeros add nothing.

// One row of x: a single stream through the weight, which the hardware prefetchers follow best.
template <typename Rows>
AVX512_TARGET void Bf16RowAvx512(const uint16_t* x, const Rows& w, float* y, int64_t k,
                                 int64_t begin, int64_t end) {
  constexpr int64_t kStep = 32;
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* row = w(r);
    // Two accumulators keep two independent chains of vdpbf16ps in flight.
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 * kStep <= k; j += 2 * kStep) {
      acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(x + j),
                              (__m512bh)_mm512_loadu_si512(row + j));
      acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(x + j + kStep),
                              (__m512bh)_mm512_loadu_si512(row + j + kStep));
    }
    for (; j < k; j += kStep) {
      __mmask32 mask = k - j >= kStep ? ~__mmask32{0} : (__mmask32{1} << (k - j)) - 1;
      acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + j),
                              (__m512bh)_mm512_maskz_loadu_epi16(mask, row + j));
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
}

// Rows [0, MT) of x (and of y) against weight rows [r, r + RW), accumulators in registers (see
// kTileRows). One accumulator per pair: the order of additions differs from Bf16RowAvx512's.
template <int MT, int RW, typename Rows>
AVX512_TARGET void Bf16TileAvx512(const uint16_t* x, const Rows& w, float* y, int64_t k,
                                  int64_t n, int64_t r) {
  constexpr int64_t kStep = 32;
  const uint16_t* rows[RW];
  UNROLL
  for (int t = 0; t < RW; ++t) rows[t] = w(r + t);
  __m512 acc[MT][RW];
  UNROLL
  for (int i = 0; i < MT; ++i)
    UNROLL
    for (int t = 0; t < RW; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j += kStep) {
    __mmask32 mask = k - j >= kStep ? ~__mmask32{0} : (__mmask32{1} << (k - j)) - 1;
    __m512bh wv[RW];
    w.template PrefetchNext<RW>(r, j / kStep);
    UNROLL
    for (int t = 0; t < RW; ++t) wv[t] = (__m512bh)_mm512_maskz_loadu_epi16(mask, rows[t] + j);
    UNROLL
    for (int i = 0; i < MT; ++i) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * k + j);
      UNROLL
      for (int t = 0; t < RW; ++t) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], xv, wv[t]);
    }
  }
  UNROLL
  for (int i = 0; i < MT; ++i)
    UNROLL
    for (int t = 0; t < RW; ++t) y[i * n + r + t] = _mm512_reduce_add_ps(acc[i][t]);
}

// All M rows of x against weight rows [r, r + RW): one to four tiles.
template <int M, int RW, typename Rows>
AVX512_TARGET void Bf16BlockAvx512(const uint16_t* x, const Rows& w, float* y, int64_t k,
                                   int64_t n, int64_t r) {
  constexpr int kFirst = FirstTileRows(M);
  Bf16TileAvx512<kFirst, RW>(x, w, y, k, n, r);
  if constexpr (M > kFirst)
    Bf16BlockAvx512<M - kFirst, RW>(x + kFirst * k, w, y + kFirst * n, k, n, r);
}

// M >= 2 rows of x (Bf16RowAvx512 takes M = 1), weight rows [begin, end).
template <int M, typename Rows>
AVX512_TARGET void Bf16TiledAvx512(const uint16_t* x, const Rows& w, float* y, int64_t k,
                                   int64_t n, int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + kTileWeightRows <= end; r += kTileWeightRows)
    Bf16BlockAvx512<M, kTileWeightRows>(x, w, y, k, n, r);
  for (; r < end; ++r) Bf16BlockAvx512<M, 1>(x, w, y, k, n, r);
}
#endif  // GEMMA3N_X86

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_BF16_H_
