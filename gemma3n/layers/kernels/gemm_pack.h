// Packing bf16 matrices the way `vdpbf16ps` reads them, for the product kernels of many rows
// (gemm_bf16.h) and of few rows (gemm_few_rows.h): pairs of contracted values as 32-bit lanes,
// a panel of rows side by side per pair.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_GEMM_PACK_H_
#define GEMMA3N_KERNELS_GEMM_PACK_H_

#include "common.h"

namespace gemma3n_kernels {

// Contracted values a block: both product kernels sum each block of k in float32 from zero and
// add it to the blocks before, so with the same block their sums agree bit for bit.
constexpr int64_t kGemmKc = 384;
static_assert(kGemmKc % 32 == 0, "blocks start on whole 16-pair transposes");

inline uint32_t PairOf(uint16_t lo, uint16_t hi) { return lo | (uint32_t{hi} << 16); }

// Pair q of row `row` of a [rows, k] bf16 matrix (values 2q and 2q + 1), a value past k as 0.
inline uint32_t PairAt(const uint16_t* x, int64_t k, int64_t row, int64_t q) {
  int64_t c = 2 * q;
  return PairOf(x[row * k + c], c + 1 < k ? x[row * k + c + 1] : 0);
}

#ifdef GEMMA3N_X86
// The even and the odd 128-bit lanes of a, then of b.
AVX512_TARGET inline void EvenOddLanes(__m512i a, __m512i b, __m512i& even, __m512i& odd) {
  even = _mm512_shuffle_i32x4(a, b, 0x88);
  odd = _mm512_shuffle_i32x4(a, b, 0xdd);
}

// r[i] <- lane i of each of r[0..16): a 16 x 16 transpose of 32-bit lanes in four rounds of
// shuffles (8 of them per 16 lanes moved), where copying lane by lane took ~1.8 ns a lane.
AVX512_TARGET inline void Transpose16(__m512i r[16]) {
  __m512i t[16];
  UNROLL
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  UNROLL
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each r[i] now holds, per 128-bit lane L, column (i % 4) of rows 4L..4L+3 of block i / 4.
  UNROLL
  for (int i = 0; i < 4; ++i) {
    EvenOddLanes(r[i], r[i + 4], t[i], t[i + 4]);
    EvenOddLanes(r[i + 8], r[i + 12], t[i + 8], t[i + 12]);
  }
  UNROLL
  for (int i = 0; i < 4; ++i) {
    EvenOddLanes(t[i], t[i + 8], r[i], r[i + 8]);
    EvenOddLanes(t[i + 4], t[i + 12], r[i + 4], r[i + 12]);
  }
}

// out[q * stride + i] = pair q0 + q of row rows0 + i, for i < `rows` (<= 16) and q < 16, all
// pairs whole: 16 rows of 16 pairs transposed at once (rows past `rows` are not read).
AVX512_TARGET inline void PackPairs16(const uint16_t* x, int64_t k, int64_t row0, int rows,
                                      int64_t q0, uint32_t* out, int64_t stride) {
  __m512i r[16];
  UNROLL
  for (int i = 0; i < 16; ++i)
    r[i] = i < rows ? _mm512_loadu_si512(x + (row0 + i) * k + 2 * q0) : _mm512_setzero_si512();
  Transpose16(r);
  __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
  UNROLL
  for (int q = 0; q < 16; ++q) _mm512_mask_storeu_epi32(out + q * stride, mask, r[q]);
}

// Rows [row0, row0 + rows) (rows <= width; the others of the panel 0) of a [.., k] bf16 matrix,
// pairs [q0, q0 + pairs), as a panel [pairs][width]: out[q * width + i] = pair q0 + q of row
// row0 + i. 16 x 16 blocks of whole pairs are transposed with AVX-512.
AVX512_TARGET inline void PackPanel(const uint16_t* x, int64_t k, int64_t row0, int rows, int width,
                      int64_t q0, int64_t pairs, uint32_t* out) {
  if (rows < width) std::fill(out, out + pairs * width, 0u);
  int64_t whole = std::clamp<int64_t>(k / 2 - q0, 0, pairs) / 16 * 16;
  for (int i0 = 0; i0 < rows; i0 += 16)
    for (int64_t q = 0; q < whole; q += 16)
      PackPairs16(x, k, row0 + i0, std::min(16, rows - i0), q0 + q, out + q * width + i0, width);
  for (int i = 0; i < rows; ++i)
    for (int64_t q = whole; q < pairs; ++q) out[q * width + i] = PairAt(x, k, row0 + i, q0 + q);
}

#endif  // GEMMA3N_X86

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_PACK_H_
