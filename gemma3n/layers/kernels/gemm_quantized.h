// Products of many rows (a prefill chunk, a LoRA batch over a quantized base) with int4 and
// int8 weights w [N, K], on the many-row bf16 kernel (gemm_bf16.h), which packs each block of
// w once per call: here the packing converts it to bf16 too, and the tile scales the sums:
//   int4: y[m, n] = (a · w_bf16ᵀ)[m, n] · row_scale[m], w_bf16 each (nibble - 8) · its group's
//         f16 scale rounded to bf16 as DequantInt4Avx512 does: the values XLA's path multiplies
//         (int4.py's PREFILL_DTYPE), float32 sums in another order.
//   int8: y[m, n] = (a · qᵀ)[m, n] · col_scale[n] · row_scale[m], q's values exact in bf16.
//         With a the activations quantized to int8 (also exact), every product is an integer
//         below 2^14, so the float32 sums equal XLA's int32 ones while every partial sum stays
//         below 2^24 in magnitude (past it, within float32 summation noise); then the same two
//         float32 products as int8.py's path, in its order.
// y is float32 or bfloat16 (rounded once, as XLA converts), so no float32 result goes through
// memory to XLA for the scaling.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_GEMM_QUANTIZED_H_
#define GEMMA3N_KERNELS_GEMM_QUANTIZED_H_

#include "gemm_bf16.h"
#include "int4_dequant.h"

namespace gemma3n_kernels {

static_assert(kGemmKc % kInt4Group == 0, "a block of k holds whole groups");

#ifdef GEMMA3N_X86
// As Bf16Columns::Pack: each panel's rows converted into a bf16 block [kGemmNr][kc] (36 KB, in
// L1/L2) by to_bf16(row, k0, kc, out), then packed from there.
template <typename ToBf16>
AVX512_TARGET inline void PackConverted(int64_t n, int64_t n0, int64_t nc, int64_t k0,
                                        int64_t kc, uint32_t* out, const ToBf16& to_bf16) {
  alignas(64) uint16_t rows[kGemmNr * kGemmKc];
  int64_t pairs = (kc + 1) / 2;
  for (int64_t p0 = 0; p0 < nc; p0 += kGemmNr, out += pairs * kGemmNr) {
    int cols = static_cast<int>(std::clamp<int64_t>(n - n0 - p0, 0, kGemmNr));
    for (int i = 0; i < cols; ++i) to_bf16(n0 + p0 + i, k0, kc, rows + i * kc);
    PackPanel(rows, kc, 0, cols, kGemmNr, 0, pairs, out);
  }
}
#endif  // GEMMA3N_X86

// The int4 weight q [N, K / 2], scale [N, K / 32] as the right operand of the many-row kernel
// (K a multiple of kInt4Group, so every block of k is whole groups).
struct Int4Columns {
  const uint8_t* q;
  const uint16_t* scale;
  int64_t n, k;

  // Row `row`'s packed values and its scales from contracted value k0 (a whole group) on.
  const uint8_t* Values(int64_t row, int64_t k0) const { return q + row * (k / 2) + k0 / 2; }
  const uint16_t* GroupScales(int64_t row, int64_t k0) const {
    return scale + row * (k / kInt4Group) + k0 / kInt4Group;
  }

#ifdef GEMMA3N_X86
  // Values [k0, k0 + kc) of row `row` as bf16 at `to`.
  AVX512_TARGET void DequantRow(int64_t row, int64_t k0, int64_t kc, uint16_t* to) const {
    DequantInt4RowAvx512(Values(row, k0), GroupScales(row, k0), to, kc / kInt4Group);
  }

  AVX512_TARGET void Pack(int64_t n0, int64_t nc, int64_t k0, int64_t kc, uint32_t* out) const {
    PackConverted(n, n0, nc, k0, kc, out, [this](int64_t row, int64_t k0, int64_t kc,
                                                 uint16_t* to) AVX512_TARGET {
      DequantRow(row, k0, kc, to);
    });
  }
#endif
};

// The int8 weight q [N, K] as the right operand of the many-row kernel.
struct Int8Columns {
  const int8_t* q;
  int64_t n, k;

#ifdef GEMMA3N_X86
  AVX512_TARGET void Pack(int64_t n0, int64_t nc, int64_t k0, int64_t kc, uint32_t* out) const {
    PackConverted(n, n0, nc, k0, kc, out, [this](int64_t row, int64_t k0, int64_t kc,
                                                 uint16_t* to) AVX512_TARGET {
      const int8_t* from = q + row * k + k0;
      for (int64_t j = 0; j < kc; j += 16) {
        __mmask16 mask = static_cast<__mmask16>(kc - j >= 16 ? 0xffff : (1u << (kc - j)) - 1);
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, from + j)));
        _mm256_mask_storeu_epi16(to + j, mask, (__m256i)_mm512_cvtneps_pbh(v));
      }
    });
  }
#endif
};

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_QUANTIZED_H_
