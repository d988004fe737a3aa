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

#ifdef GEMMA3N_X86
  AVX512_TARGET void Pack(int64_t n0, int64_t nc, int64_t k0, int64_t kc, uint32_t* out) const {
    PackConverted(n, n0, nc, k0, kc, out, [this](int64_t row, int64_t k0, int64_t kc,
                                                 uint16_t* to) AVX512_TARGET {
      DequantInt4RowAvx512(q + row * (k / 2) + k0 / 2,
                           scale + row * (k / kInt4Group) + k0 / kInt4Group, to, kc / kInt4Group);
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

// y [M, N] (float32 or bfloat16) = a [M, K] · w, scaled as the header says; an error if y is
// another type or the CPU lacks AVX-512 BF16.
template <typename Columns>
ffi::Error ScaledGemm(ffi::ThreadPool& pool, const ffi::Buffer<ffi::BF16>& a, const Columns& w,
                      const float* row_scale, const float* col_scale,
                      ffi::Result<ffi::AnyBuffer>& y) {
  auto type = y->element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("the quantized products give float32 or bfloat16");
#ifdef GEMMA3N_X86
  if (BestIsa() == kAvx512) {
    int64_t m = a.dimensions()[0], k = a.dimensions()[1];
    auto ap = reinterpret_cast<const uint16_t*>(a.typed_data());
    if (type == ffi::DataType::F32)
      GemmAvx512(pool, ap, w, y->typed_data<float>(), Scales{row_scale, col_scale}, m, k,
                 w.n);
    else
      GemmAvx512(pool, ap, w, y->reinterpret_data<uint16_t>(), Scales{row_scale, col_scale},
                 m, k, w.n);
    return ffi::Error::Success();
  }
#endif
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "the quantized product kernels need AVX-512 BF16");
}

// The FFI handlers' bodies (bound in decode_kernels.cc). int4: a [M, K] bf16, row scales
// [M, 1], q [N, K / 2], scales [N, K / 32].
inline ffi::Error GemmInt4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a,
                               ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::U8> q,
                               ffi::Buffer<ffi::F16> scale, ffi::Result<ffi::AnyBuffer> y) {
  auto ad = a.dimensions(), rd = row_scale.dimensions(), qd = q.dimensions(),
       sd = scale.dimensions(), yd = y->dimensions();
  if (ad.size() != 2 || rd.size() != 2 || qd.size() != 2 || sd.size() != 2 || yd.size() != 2 ||
      ad[1] % kInt4Group != 0 || qd[1] * 2 != ad[1] || sd[1] * kInt4Group != ad[1] ||
      sd[0] != qd[0] || rd[0] != ad[0] || rd[1] != 1 || yd[0] != ad[0] || yd[1] != qd[0])
    return ffi::Error::InvalidArgument(
        "the int4 product takes a [M, K], row scales [M, 1], q [N, K / 2] and scales [N, K / 32] "
        "(K a multiple of 32), and gives y [M, N]");
  Int4Columns w{q.typed_data(), reinterpret_cast<const uint16_t*>(scale.typed_data()), qd[0],
                ad[1]};
  return ScaledGemm(pool, a, w, row_scale.typed_data(), nullptr, y);
}

// int8: a [M, K] bf16, row scales [M, 1], q [N, K], column scales [N].
inline ffi::Error GemmInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a,
                               ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::S8> q,
                               ffi::Buffer<ffi::F32> col_scale, ffi::Result<ffi::AnyBuffer> y) {
  auto ad = a.dimensions(), rd = row_scale.dimensions(), qd = q.dimensions(),
       cd = col_scale.dimensions(), yd = y->dimensions();
  if (ad.size() != 2 || rd.size() != 2 || qd.size() != 2 || cd.size() != 1 || yd.size() != 2 ||
      qd[1] != ad[1] || cd[0] != qd[0] || rd[0] != ad[0] || rd[1] != 1 || yd[0] != ad[0] ||
      yd[1] != qd[0])
    return ffi::Error::InvalidArgument(
        "the int8 product takes a [M, K], row scales [M, 1], q [N, K] and scales [N], and "
        "gives y [M, N]");
  Int8Columns w{q.typed_data(), qd[0], ad[1]};
  return ScaledGemm(pool, a, w, row_scale.typed_data(), col_scale.typed_data(), y);
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_QUANTIZED_H_
