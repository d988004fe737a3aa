// bf16 x bf16 -> bf16 products of a few rows (a short prefill chunk, a batch of streams) with a
// serving weight: y[M, N] = a[M, K] · w[N, K]ᵀ, for M <= kFewRowsMaxM and K even.
//
// The many-row kernel (gemm_bf16.h) packs every block of w into panels, once a call: the same
// work at 64 rows as at 512, ~10% of the product at 128 rows and ~25% at 48. Here the operands
// swap roles: w's rows are read where they lie, one k pair of kFewRowsWr rows broadcast at a
// time, and a, small, is packed once into panels of kFewRowsWidth rows that the tile loads as
// vectors (the last panel only the vectors its rows need, so at most 15 rows are padding).
// Every output sums the same pairs in the same order, block by block of kGemmKc, as the
// many-row kernel, so the two agree bit for bit. Against it, 2 threads on a Zen 4, E4B's
// projections summed: 1.1-1.25x at 48-64 rows, 1.05-1.15x at 128, 1.0-1.08x at 256, slower at
// 512 (hence the limit).
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_GEMM_FEW_ROWS_H_
#define GEMMA3N_KERNELS_GEMM_FEW_ROWS_H_

#include "common.h"
#include "gemm_pack.h"

namespace gemma3n_kernels {

// A tile: kFewRowsWr weight rows x kFewRowsVectors vectors of 16 rows of a, 24 float32 sums;
// per k pair 4 loads of a's panel and 6 broadcasts. It ran 8-10% faster than 8 x 48 at 128 and
// 256 rows (2 threads, E4B's FFN shapes), which panels of 48 rows do not divide.
constexpr int kFewRowsWr = 6;
constexpr int kFewRowsVectors = 4;
constexpr int64_t kFewRowsWidth = 16 * kFewRowsVectors;
constexpr int64_t kFewRowsMaxM = 4 * kFewRowsWidth;
// Weight rows a block, whose float32 sums (for every row of a) wait between blocks of k.
constexpr int64_t kFewRowsNc = 128 * kFewRowsWr;
// Weight rows a thread takes at least; with fewer the threads split a's panels instead.
constexpr int64_t kFewRowsMinThreadRows = 16 * kFewRowsWr;

// Pairs a block of k holds (K even).
inline int64_t FewRowsBlockPairs(int64_t k) { return std::min(kGemmKc, k) / 2; }

#ifdef GEMMA3N_X86
// Vectors of 16 rows that a's panel p holds: kFewRowsVectors, fewer for the last.
inline int FewRowsPanelVectors(int64_t m, int64_t p) {
  return static_cast<int>(std::min<int64_t>(kFewRowsVectors, (m - p * kFewRowsWidth + 15) / 16));
}

// Units [u0, u1) of a [M, K] packed: unit u is panel u % panels of block of k u / panels, as
// [pairs][16 x its vectors] at out + u * FewRowsBlockPairs(k) * kFewRowsWidth (rows past m: 0).
AVX512_TARGET inline void PackFewRows(const uint16_t* a, int64_t m, int64_t k, int64_t u0,
                                      int64_t u1, uint32_t* out) {
  int64_t panels = (m + kFewRowsWidth - 1) / kFewRowsWidth;
  for (int64_t u = u0; u < u1; ++u) {
    int64_t p = u % panels, k0 = u / panels * kGemmKc;
    int rows = static_cast<int>(std::min<int64_t>(kFewRowsWidth, m - p * kFewRowsWidth));
    PackPanel(a, k, p * kFewRowsWidth, rows, 16 * FewRowsPanelVectors(m, p), k0 / 2,
              std::min(kGemmKc, k - k0) / 2, out + u * FewRowsBlockPairs(k) * kFewRowsWidth);
  }
}

// Pair q of a weight row as one 32-bit lane (memcpy: the row is bf16, not uint32).
inline int32_t PairBits(const uint16_t* row, int64_t q) {
  int32_t bits;
  std::memcpy(&bits, row + 2 * q, sizeof(bits));
  return bits;
}

// Weight rows w[0..kFewRowsWr) (each from its block's first pair) x one panel of a (V vectors)
// over `pairs`: sums into `partial` ([weight row][a row], stride ld_partial) or, with y (at
// y[a row 0][weight row 0], row stride ldy), added up and rounded to bfloat16 there, as the
// many-row kernel's TileOut does. Only `w_rows` x `a_rows` are stored.
template <int V>
AVX512_TARGET inline void FewRowsTile(const uint16_t* const* w, const uint32_t* a, int64_t pairs,
                                      float* partial, int64_t ld_partial, bool first, uint16_t* y,
                                      int64_t ldy, int w_rows, int a_rows) {
  __m512 acc[kFewRowsWr][V];
  UNROLL
  for (int i = 0; i < kFewRowsWr; ++i)
    UNROLL
    for (int v = 0; v < V; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q, a += 16 * V) {
    __m512bh av[V];
    UNROLL
    for (int v = 0; v < V; ++v) av[v] = (__m512bh)_mm512_loadu_si512(a + 16 * v);
    UNROLL
    for (int i = 0; i < kFewRowsWr; ++i) {
      __m512bh wi = (__m512bh)_mm512_set1_epi32(PairBits(w[i], q));
      UNROLL
      for (int v = 0; v < V; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], wi, av[v]);
    }
  }
  UNROLL
  for (int v = 0; v < V; ++v) {
    int left = std::min(a_rows - 16 * v, 16);
    __mmask16 mask = static_cast<__mmask16>((1u << left) - 1);
    // A vector holds 16 rows of a for one weight row: y wants them across, so the rounded
    // values go through `across` (one small transpose per tile, ~1% of its time).
    alignas(32) uint16_t across[kFewRowsWr][16];
    UNROLL
    for (int i = 0; i < kFewRowsWr; ++i) {
      float* sums = partial + i * ld_partial + 16 * v;
      __m512 sum = acc[i][v];
      if (!first) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, sums));
      if (y == nullptr)
        _mm512_mask_storeu_ps(sums, mask, sum);
      else  // vcvtneps2bf16, as the many-row kernel rounds
        _mm256_store_si256(reinterpret_cast<__m256i*>(across[i]), (__m256i)_mm512_cvtneps_pbh(sum));
    }
    if (y != nullptr)
      for (int l = 0; l < left; ++l)
        for (int i = 0; i < w_rows; ++i) y[(16 * v + l) * ldy + i] = across[i][l];
  }
}

// Weight rows [c0, c1) x a's panels [p0, p1) of y, on this thread; `ap` is a packed by
// PackFewRows.
AVX512_TARGET inline void FewRowsBlock(const uint32_t* ap, const uint16_t* w, uint16_t* y,
                                       int64_t m, int64_t k, int64_t n, int64_t p0, int64_t p1,
                                       int64_t c0, int64_t c1) {
  int64_t panels = (m + kFewRowsWidth - 1) / kFewRowsWidth, block_pairs = FewRowsBlockPairs(k);
  int64_t ld_partial = (p1 - p0) * kFewRowsWidth;
  // The tile for a panel of 1-4 vectors (only the last panel has fewer than 4).
  static constexpr decltype(&FewRowsTile<1>) kTiles[] = {FewRowsTile<1>, FewRowsTile<2>,
                                                         FewRowsTile<3>, FewRowsTile<4>};
  static_assert(std::size(kTiles) == kFewRowsVectors);
  std::vector<float> partial(k > kGemmKc ? kFewRowsNc * ld_partial : 0);
  for (int64_t jc = c0; jc < c1; jc += kFewRowsNc) {
    int64_t nc = std::min(kFewRowsNc, c1 - jc);
    for (int64_t pc = 0; pc < k; pc += kGemmKc) {
      int64_t pairs = std::min(kGemmKc, k - pc) / 2;
      bool last = pc + kGemmKc >= k;
      for (int64_t j = jc; j < jc + nc; j += kFewRowsWr) {
        int w_rows = static_cast<int>(std::min<int64_t>(kFewRowsWr, jc + nc - j));
        // Rows past n repeat the last one; their sums are not stored.
        const uint16_t* rows[kFewRowsWr];
        for (int i = 0; i < kFewRowsWr; ++i) rows[i] = w + std::min(j + i, n - 1) * k + pc;
        for (int64_t p = p0; p < p1; ++p) {
          int64_t row = p * kFewRowsWidth;
          int a_rows = static_cast<int>(std::min<int64_t>(kFewRowsWidth, m - row));
          const uint32_t* a = ap + (pc / kGemmKc * panels + p) * block_pairs * kFewRowsWidth;
          float* sums = partial.empty()
                            ? nullptr
                            : partial.data() + (j - jc) * ld_partial + (p - p0) * kFewRowsWidth;
          uint16_t* out = last ? y + row * n + j : nullptr;
          kTiles[FewRowsPanelVectors(m, p) - 1](rows, a, pairs, sums, ld_partial, pc == 0, out, n,
                                                 w_rows, a_rows);
        }
      }
    }
  }
}

// The whole product on the thread pool: a packed by all threads, then each thread a
// contiguous range of weight rows, or of a's panels when the weight rows are too few to share.
inline void GemmFewRowsAvx512(ffi::ThreadPool& pool, const uint16_t* a, const uint16_t* w,
                              uint16_t* y, int64_t m, int64_t k, int64_t n) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t panels = (m + kFewRowsWidth - 1) / kFewRowsWidth;
  int64_t units = panels * ((k + kGemmKc - 1) / kGemmKc);
  std::unique_ptr<uint32_t[]> ap(new uint32_t[units * FewRowsBlockPairs(k) * kFewRowsWidth]);
  ParallelFor(pool, units, 1, [&](int64_t b, int64_t e) { PackFewRows(a, m, k, b, e, ap.get()); });
  if (n >= threads * kFewRowsMinThreadRows || panels < threads) {
    int64_t groups = (n + kFewRowsWr - 1) / kFewRowsWr;
    ParallelFor(pool, groups, (groups + threads - 1) / threads, [&](int64_t b, int64_t e) {
      FewRowsBlock(ap.get(), w, y, m, k, n, 0, panels, b * kFewRowsWr,
                   std::min(n, e * kFewRowsWr));
    });
  } else {
    ParallelFor(pool, panels, (panels + threads - 1) / threads, [&](int64_t b, int64_t e) {
      FewRowsBlock(ap.get(), w, y, m, k, n, b, e, 0, n);
    });
  }
}
#endif  // GEMMA3N_X86

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_FEW_ROWS_H_
