// int4 -> bf16 dequantization. A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_INT4_DEQUANT_H_
#define GEMMA3N_KERNELS_INT4_DEQUANT_H_

#include "int4.h"

namespace gemma3n_kernels {

// Dequantization to bf16: a block of rows at a time while the many-row kernel packs them
// (gemm_quantized.h), and for the XLA product of a prefill chunk where that kernel does not run
// (more rows of x than the decode kernels take; XLA's own elementwise loops took 4-5x longer
// than the product there):
// rows [begin, end) of the weight as bf16 out [N, K] in natural order, each value
// (nibble - 8) · scale (exact in float32) rounded to the nearest bf16, ties to even, as XLA
// converts. The values are finite, so the rounding needs no NaN case.

inline void DequantInt4Scalar(const uint8_t* w, const uint16_t* scale, uint16_t* out, int64_t k,
                              int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t j = 0; j < k; ++j)
      out[r * k + j] = F32ToBf16(static_cast<float>(Int4At(w + r * (k / 2), j)) *
                                 F16ToF32(scale[r * (k / kInt4Group) + j / kInt4Group]));
}

#ifdef GEMMA3N_X86
// 8 nibbles (as bytes) -> 8 bf16 values, AVX2: the rounding done on the float32 bits.
AVX2_TARGET INLINE __m128i Int4ToBf16Avx2(__m128i nibbles, __m256 scale) {
  __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(nibbles), _mm256_set1_epi32(kInt4Offset));
  __m256i bits = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(v), scale));
  __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
  // Lanes hold values below 2^16: packing them to 16 bits is exact.
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

AVX2_TARGET void DequantInt4Avx2(const uint8_t* w, const uint16_t* scale, uint16_t* out,
                                 int64_t k, int64_t begin, int64_t end) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  int64_t groups = k / kInt4Group;
  for (int64_t r = begin; r < end; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* bytes = w + r * (k / 2) + g * (kInt4Group / 2);
      __m256 s = _mm256_set1_ps(F16ToF32(scale[r * groups + g]));
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
      __m128i halves[2] = {_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask)};
      uint16_t* to = out + r * k + g * kInt4Group;
      UNROLL
      for (int h = 0; h < 2; ++h) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(to + 16 * h), Int4ToBf16Avx2(halves[h], s));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(to + 16 * h + 8),
                         Int4ToBf16Avx2(_mm_srli_si128(halves[h], 8), s));
      }
    }
}

// `groups` groups of one row (bytes, their scales) as bf16 values in natural order at `to`.
AVX512_TARGET INLINE void DequantInt4RowAvx512(const uint8_t* bytes, const uint16_t* scale,
                                               uint16_t* to, int64_t groups) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m512i offset = _mm512_set1_epi32(kInt4Offset);
  for (int64_t g = 0; g < groups; ++g, bytes += kInt4Group / 2, to += kInt4Group) {
    __m512 s = _mm512_set1_ps(F16ToF32(scale[g]));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    __m128i halves[2] = {_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask)};
    UNROLL
    for (int h = 0; h < 2; ++h) {
      __m512 v = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(halves[h]), offset)), s);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + 16 * h),
                          (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

AVX512_TARGET void DequantInt4Avx512(const uint8_t* w, const uint16_t* scale, uint16_t* out,
                                     int64_t k, int64_t begin, int64_t end) {
  int64_t groups = k / kInt4Group;
  for (int64_t r = begin; r < end; ++r)
    DequantInt4RowAvx512(w + r * (k / 2), scale + r * groups, out + r * k, groups);
}
#endif  // GEMMA3N_X86

// The FFI handler's body (bound in decode_kernels.cc): w [N, K / 2] and scales [N, K / 32] as
// bf16 out [N, K].
inline ffi::Error DequantInt4Bf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::U8> w,
                                      ffi::Buffer<ffi::F16> scale,
                                      ffi::ResultBuffer<ffi::BF16> out, int32_t isa) {
  auto wd = w.dimensions(), sd = scale.dimensions(), od = out->dimensions();
  if (wd.size() != 2 || sd.size() != 2 || od.size() != 2 || od[1] % kInt4Group != 0 ||
      wd[0] != od[0] || sd[0] != od[0] || wd[1] * 2 != od[1] || sd[1] * kInt4Group != od[1])
    return ffi::Error::InvalidArgument("int4 dequantization takes w [N, K / 2] and scales "
                                       "[N, K / 32] (K a multiple of 32), and gives [N, K]");
  int64_t n = od[0], k = od[1];
  const uint8_t* wp = w.typed_data();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.typed_data());
  uint16_t* op = reinterpret_cast<uint16_t*>(out->typed_data());
  Isa chosen = Choose(isa);
  ParallelFor(pool, n, Grain(k * 2), [&](int64_t b, int64_t e) {
#ifdef GEMMA3N_X86
    if (chosen == kAvx512) return DequantInt4Avx512(wp, sp, op, k, b, e);
    if (chosen == kAvx2) return DequantInt4Avx2(wp, sp, op, k, b, e);
#endif
    DequantInt4Scalar(wp, sp, op, k, b, e);
  });
  return ffi::Error::Success();
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_INT4_DEQUANT_H_
