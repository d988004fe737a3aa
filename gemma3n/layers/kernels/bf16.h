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
// AVX2 has no bf16 arithmetic, but one 32-byte load of a weight row holds 16 bf16 values, two
// per int32 lane: shifting each lane left by 16 gives the even-indexed ones as float32, and
// clearing its low half the odd-indexed ones. x is rearranged once per call to match, so a
// block of 16 costs a shift, an and and two FMAs, where widening 8 values at a time cost twice
// the instructions (and one accumulator per row left each FMA waiting on the last: the
// kernels ran at half the memory bandwidth).
constexpr int64_t kBf16Block = 16;
constexpr int64_t kBf16Half = kBf16Block / 2;
// The register tiles of the AVX2 kernels (M >= 2): kTileRows x rows times one weight row, with
// an accumulator for each half (8 chains of one FMA a block), 2 weight halves and 2 of x in 12
// of the 16 registers. Two weight rows a tile with one accumulator a pair (14 registers) ran
// slower: 25.6 ms against 18.5 for FFN gate + up at 8 rows, in one run on a Zen 3.
constexpr int kTileWeightRowsAvx2 = 1;
// One row of x past kRowKernelMaxK takes two weight rows a tile: 4 accumulators, 4 weight
// halves and 2 of x (FFN down at one row: 16.3-16.6 GB/s a row at a time, 27.7-29.4 two rows
// at a time, three rounds alternated on a Zen 4 running the AVX2 kernels; three rows: 28 GB/s).
constexpr int kLongRowTileWeightRowsAvx2 = 2;

// x [M, K] as float32 for the AVX2 kernels: each whole block of 16 values as its 8 even-indexed
// values, then its 8 odd-indexed ones; the last K % 16 values in order.
inline std::vector<float> SplitBf16X(const uint16_t* x, int64_t m, int64_t k) {
  std::vector<float> xs(m * k);
  int64_t whole = k / kBf16Block * kBf16Block;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = j % kBf16Block, at = j < whole ? j - e + (e % 2) * kBf16Half + e / 2 : j;
      xs[i * k + at] = Bf16ToF32(x[i * k + j]);
    }
  return xs;
}

// The even- and odd-indexed values of 16 bf16 weights at w, as float32.
AVX2_TARGET INLINE void Bf16Halves(const uint16_t* w, __m256& even, __m256& odd) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// acc += one block of split x (xs) times the weight halves.
AVX2_TARGET INLINE __m256 Bf16BlockFma(const float* xs, __m256 even, __m256 odd, __m256 acc) {
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(xs), even, acc);
  return _mm256_fmadd_ps(_mm256_loadu_ps(xs + kBf16Half), odd, acc);
}

// One row of x (split, xs [K]): a single stream through the weight; four accumulators keep
// four chains of FMAs in flight.
template <typename Rows>
AVX2_TARGET void Bf16RowAvx2(const float* xs, const Rows& w, float* y, int64_t k,
                             int64_t begin, int64_t end) {
  constexpr int kChains = 4;
  for (int64_t r = begin; r < end; ++r) {
    const uint16_t* row = w(r);
    __m256 acc[kChains], even, odd;
    UNROLL
    for (int u = 0; u < kChains; ++u) acc[u] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + kChains * kBf16Block <= k; j += kChains * kBf16Block)
      UNROLL
      for (int u = 0; u < kChains; ++u) {
        Bf16Halves(row + j + u * kBf16Block, even, odd);
        acc[u] = Bf16BlockFma(xs + j + u * kBf16Block, even, odd, acc[u]);
      }
    for (; j + kBf16Block <= k; j += kBf16Block) {
      Bf16Halves(row + j, even, odd);
      acc[0] = Bf16BlockFma(xs + j, even, odd, acc[0]);
    }
    float s = Hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; j < k; ++j) s += xs[j] * Bf16ToF32(row[j]);
    y[r] = s;
  }
}

// Rows [0, MT) of split x (and of y) against weight rows [r, r + RW), accumulators in
// registers, prefetching the next block as Bf16TileAvx512 does.
template <int MT, int RW, typename Rows>
AVX2_TARGET void Bf16TileAvx2(const float* xs, const Rows& w, float* y, int64_t k, int64_t n,
                              int64_t r) {
  // A prefetch step covers one cache line of each row: two blocks.
  constexpr int64_t kBlocksPerLine = kCacheLine / (kBf16Block * 2);
  const uint16_t* rows[RW];
  UNROLL
  for (int t = 0; t < RW; ++t) rows[t] = w(r + t);
  __m256 acc[MT][RW], acc_odd[MT][RW];
  UNROLL
  for (int i = 0; i < MT; ++i)
    UNROLL
    for (int t = 0; t < RW; ++t) acc[i][t] = acc_odd[i][t] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kBf16Block <= k; j += kBf16Block) {
    if ((j / kBf16Block) % kBlocksPerLine == 0)
      w.template PrefetchNext<RW>(r, j / (kBf16Block * kBlocksPerLine));
    __m256 even[RW], odd[RW];
    UNROLL
    for (int t = 0; t < RW; ++t) Bf16Halves(rows[t] + j, even[t], odd[t]);
    UNROLL
    for (int i = 0; i < MT; ++i) {
      __m256 xe = _mm256_loadu_ps(xs + i * k + j), xo = _mm256_loadu_ps(xs + i * k + j + kBf16Half);
      UNROLL
      for (int t = 0; t < RW; ++t)
      {
        acc[i][t] = _mm256_fmadd_ps(xe, even[t], acc[i][t]);
        acc_odd[i][t] = _mm256_fmadd_ps(xo, odd[t], acc_odd[i][t]);
      }
    }
  }
  UNROLL
  for (int i = 0; i < MT; ++i)
    UNROLL
    for (int t = 0; t < RW; ++t) {
      float s = Hsum256(_mm256_add_ps(acc[i][t], acc_odd[i][t]));
      for (int64_t tail = j; tail < k; ++tail)
        s += xs[i * k + tail] * Bf16ToF32(rows[t][tail]);
      y[i * n + r + t] = s;
    }
}

// All M rows of split x against weight rows [r, r + RW): one to four tiles.
template <int M, int RW, typename Rows>
AVX2_TARGET void Bf16BlockAvx2(const float* xs, const Rows& w, float* y, int64_t k, int64_t n,
                               int64_t r) {
  constexpr int kFirst = FirstTileRows(M);
  Bf16TileAvx2<kFirst, RW>(xs, w, y, k, n, r);
  if constexpr (M > kFirst)
    Bf16BlockAvx2<M - kFirst, RW>(xs + kFirst * k, w, y + kFirst * n, k, n, r);
}

// M rows of split x (Bf16RowAvx2 takes M = 1 up to kRowKernelMaxK), weight rows [begin, end),
// RW at a time.
template <int M, int RW, typename Rows>
AVX2_TARGET void Bf16TiledAvx2(const float* xs, const Rows& w, float* y, int64_t k, int64_t n,
                               int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + RW <= end; r += RW) Bf16BlockAvx2<M, RW>(xs, w, y, k, n, r);
  for (; r < end; ++r) Bf16BlockAvx2<M, 1>(xs, w, y, k, n, r);
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

// M rows of x (Bf16RowAvx512 takes M = 1 up to kRowKernelMaxK), weight rows [begin, end).
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
