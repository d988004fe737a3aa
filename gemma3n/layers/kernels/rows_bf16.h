// Gathered rows in bf16: y[M, D] = sum over c < count of x[M, c] · w[ids[c], :], w bf16 stored
// rows first [F, D] (a sparse FFN's down projection, of which only the units some token keeps
// are read), float32 sums. x [M, C] bf16, C >= count.
// A header of the one translation unit decode_kernels.cc.
//
// Columns are cut into strips (one cache line of a row each); a chunk of strips walks the rows
// in blocks of kRowBlock, so that a block's lines of the chunk (kRowBlock x the chunk's strips)
// stay in L1 while every strip takes them, and prefetches the next block's lines into L2 as it
// goes (the rows are scattered: the hardware prefetchers cannot guess them).

#ifndef GEMMA3N_KERNELS_ROWS_BF16_H_
#define GEMMA3N_KERNELS_ROWS_BF16_H_

#include "bf16.h"
#include "common.h"
#include "rows.h"

namespace gemma3n_kernels {

constexpr int64_t kRowBlock = 64;

// Columns [begin, end) of y; any CPU.
inline void RowsBf16Scalar(const uint16_t* x, int64_t c_size, const GatheredRows& w, float* y,
                           int64_t m, int64_t d, int64_t begin, int64_t end) {
  for (int64_t i = 0; i < m; ++i) {
    std::fill(y + i * d + begin, y + i * d + end, 0.0f);
    for (int64_t c = 0; c < w.count; ++c) {
      float xv = Bf16ToF32(x[i * c_size + c]);
      const uint16_t* row = w(c);
      for (int64_t col = begin; col < end; ++col) y[i * d + col] += xv * Bf16ToF32(row[col]);
    }
  }
}

// Columns per strip of the AVX2 and the AVX-512 kernels below (on every CPU: the handlers size
// their work with them).
constexpr int64_t kRowStrip2 = 16, kRowStrip512 = 32;

#ifdef GEMMA3N_X86
// Prefetches line `col` of the row kRowBlock after row c, if there is one.
inline void PrefetchNextBlockRow(const GatheredRows& w, int64_t c, int64_t col) {
  if (c + kRowBlock < w.count)
    _mm_prefetch(reinterpret_cast<const char*>(w(c + kRowBlock) + col), _MM_HINT_T1);
}

// Strips [begin, end) of kRowStrip2 columns; xf: x as float32 [M, C].
template <int M>
AVX2_TARGET void RowsBf16Avx2(const float* xf, int64_t c_size, const GatheredRows& w, float* y,
                              int64_t d, int64_t begin, int64_t end) {
  std::vector<float> sums(M * (end - begin) * kRowStrip2, 0.0f);
  for (int64_t c0 = 0; c0 < w.count; c0 += kRowBlock) {
    int64_t c1 = std::min(w.count, c0 + kRowBlock);
    for (int64_t s = begin; s < end; ++s) {
      int64_t col = s * kRowStrip2;
      float* strip = sums.data() + (s - begin) * M * kRowStrip2;
      __m256 acc[M][2];
      UNROLL
      for (int i = 0; i < M; ++i)
        UNROLL
        for (int t = 0; t < 2; ++t) acc[i][t] = _mm256_loadu_ps(strip + (2 * i + t) * 8);
      for (int64_t c = c0; c < c1; ++c) {
        PrefetchNextBlockRow(w, c, col);
        const uint16_t* row = w(c) + col;
        __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))), 16));
        __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 8))), 16));
        UNROLL
        for (int i = 0; i < M; ++i) {
          __m256 f = _mm256_set1_ps(xf[i * c_size + c]);
          acc[i][0] = _mm256_fmadd_ps(f, lo, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(f, hi, acc[i][1]);
        }
      }
      UNROLL
      for (int i = 0; i < M; ++i)
        UNROLL
        for (int t = 0; t < 2; ++t) _mm256_storeu_ps(strip + (2 * i + t) * 8, acc[i][t]);
    }
  }
  for (int64_t s = begin; s < end; ++s)
    UNROLL
    for (int i = 0; i < M; ++i)
      std::copy_n(sums.data() + ((s - begin) * M + i) * kRowStrip2, kRowStrip2,
                  y + i * d + s * kRowStrip2);
}

// Strips [begin, end) of kRowStrip512 columns. Two rows at a time: their bf16 values
// interleaved 128 bits at a time (vpunpck[lh]wd, lanes as StripColumn says) times the pair
// (x[c], x[c + 1]) with vdpbf16ps. xp: x as those pairs, [M, ceil(count / 2)] (XPairsBf16).
template <int M>
AVX512_TARGET void RowsBf16Avx512(const uint32_t* xp, const GatheredRows& w, float* y, int64_t d,
                                  int64_t begin, int64_t end) {
  int64_t pairs = (w.count + 1) / 2;
  std::vector<float> sums(M * (end - begin) * kRowStrip512, 0.0f);
  for (int64_t c0 = 0; c0 < w.count; c0 += kRowBlock) {
    int64_t c1 = std::min(w.count, c0 + kRowBlock);
    for (int64_t s = begin; s < end; ++s) {
      int64_t col = s * kRowStrip512;
      float* strip = sums.data() + (s - begin) * M * kRowStrip512;
      __m512 acc[M][2];
      UNROLL
      for (int i = 0; i < M; ++i)
        UNROLL
        for (int t = 0; t < 2; ++t) acc[i][t] = _mm512_loadu_ps(strip + (2 * i + t) * 16);
      for (int64_t c = c0; c < c1; c += 2) {
        PrefetchNextBlockRow(w, c, col);
        PrefetchNextBlockRow(w, c + 1, col);
        const uint16_t* r0 = w(c) + col;
        // An odd count's last row pairs with itself, times x's zero.
        const uint16_t* r1 = c + 1 < c1 ? w(c + 1) + col : r0;
        __m512i a = _mm512_loadu_si512(r0), b = _mm512_loadu_si512(r1);
        __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, b);
        __m512bh hi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        UNROLL
        for (int i = 0; i < M; ++i) {
          __m512bh f = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(xp[i * pairs + c / 2]));
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], lo, f);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], hi, f);
        }
      }
      UNROLL
      for (int i = 0; i < M; ++i)
        UNROLL
        for (int t = 0; t < 2; ++t) _mm512_storeu_ps(strip + (2 * i + t) * 16, acc[i][t]);
    }
  }
  for (int64_t s = begin; s < end; ++s)
    UNROLL
    for (int i = 0; i < M; ++i)
      UNROLL
      for (int t = 0; t < 2; ++t)
        for (int l = 0; l < 16; ++l)
          y[i * d + s * kRowStrip512 + StripColumn(t, l)] =
              sums[((s - begin) * M + i) * kRowStrip512 + t * 16 + l];
}
#endif  // GEMMA3N_X86

// x [M, C] bf16 as pairs (x[c], x[c + 1]) in uint32 [M, ceil(count / 2)], low half first; an odd
// count's last pair ends in zero.
inline std::vector<uint32_t> XPairsBf16(const uint16_t* x, int64_t m, int64_t c_size,
                                        int64_t count) {
  int64_t pairs = (count + 1) / 2;
  std::vector<uint32_t> out(m * pairs);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < pairs; ++p) {
      uint32_t hi = 2 * p + 1 < count ? x[i * c_size + 2 * p + 1] : 0;
      out[i * pairs + p] = x[i * c_size + 2 * p] | (hi << 16);
    }
  return out;
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_ROWS_BF16_H_
