// Softmax cross-entropy of a chunk of logits and its gradient in one call (a training loss):
//   z [R, V] bf16 (the unembedding's product), targets [R] s32, weights [R] f32 (a loss mask)
//   loss[r] = weight[r] · (log Σ_v exp z[r, v] - z[r, target[r]])      (float32; 0 where the
//             weight is 0, whose row is not read)
//   dz[r, v] = weight[r] · (softmax(z[r])[v] - [v = target[r]])          (rounded to bf16 once)
// Each row in three passes, the row (512 KB at E4B's vocabulary) staying in L2 after the first:
// its max, then Σ exp(z - max), then the gradient. XLA's CPU backend ran the same loss as
// separate elementwise loops and reductions over the chunk, with a float32 copy of the logits
// and a float32 gradient converted to bf16 after it: see gemma3n/layers/cross_entropy.py.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_CROSS_ENTROPY_H_
#define GEMMA3N_KERNELS_CROSS_ENTROPY_H_

#include <cmath>
#include <limits>

#include "common.h"

namespace gemma3n_kernels {

#ifdef GEMMA3N_X86
// exp(x) for lanes x <= 0 (a logit less the row's max) within ~2 float32 ulps: x = n ln 2 + r
// with |r| <= ln 2 / 2 (ln 2 in two parts, so r is exact), e^r by its degree-7 Taylor-like
// minimax polynomial (Cephes' expf coefficients), then scaled by 2^n. Below -87.3 (e^x under
// float32's smallest normal) it gives e^-87.3, which a softmax's sum or bf16 gradient rounds
// away as XLA's zero does. A NaN stays NaN (vmaxps returns its second operand then), so a NaN
// logit makes its row's loss and gradient NaN, as on XLA.
AVX512_TARGET INLINE __m512 ExpNonPositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.3f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 values (those past `mask`: `fill`) as float32 lanes.
AVX512_TARGET INLINE __m512 LoadBf16(const uint16_t* p, __mmask16 mask, float fill) {
  __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16);
  return _mm512_mask_blend_ps(mask, _mm512_set1_ps(fill), _mm512_castsi512_ps(bits));
}

inline __mmask16 TailMask(int64_t left) {
  return static_cast<__mmask16>(left >= 16 ? 0xffff : (1u << left) - 1);
}

// Row r of the chunk: its weighted loss, and its gradient into dz.
AVX512_TARGET inline float CrossEntropyRow(const uint16_t* z, int64_t v, int32_t target,
                                           float weight, uint16_t* dz) {
  constexpr float kLowest = -std::numeric_limits<float>::infinity();
  __m512 high = _mm512_set1_ps(kLowest);
  for (int64_t j = 0; j < v; j += 16)
    high = _mm512_max_ps(high, LoadBf16(z + j, TailMask(v - j), kLowest));
  const float max = _mm512_reduce_max_ps(high);
  // Four sums, so that the exponentials of consecutive vectors overlap.
  __m512 sums[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                    _mm512_setzero_ps()};
  const __m512 shift = _mm512_set1_ps(max);
  for (int64_t j = 0; j < v; j += 16) {
    __mmask16 mask = TailMask(v - j);
    __m512 e = ExpNonPositive(_mm512_sub_ps(LoadBf16(z + j, mask, max), shift));
    sums[(j / 16) % 4] = _mm512_add_ps(sums[(j / 16) % 4], _mm512_maskz_mov_ps(mask, e));
  }
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(sums[0], sums[1]),
                                                       _mm512_add_ps(sums[2], sums[3])));
  const float log_norm = max + std::log(sum);
  const __m512 scale = _mm512_set1_ps(weight / sum);
  for (int64_t j = 0; j < v; j += 16) {
    __mmask16 mask = TailMask(v - j);
    __m512 p = _mm512_mul_ps(ExpNonPositive(_mm512_sub_ps(LoadBf16(z + j, mask, max), shift)),
                             scale);
    _mm256_mask_storeu_epi16(dz + j, mask, (__m256i)_mm512_cvtneps_pbh(p));
  }
  const float z_target = Bf16ToF32(z[target]);
  // The target's softmax less one, in float32 before its one rounding.
  dz[target] = F32ToBf16(weight * (std::exp(z_target - max) / sum - 1.0f));
  return weight * (log_norm - z_target);
}
#endif  // GEMMA3N_X86

// The FFI handler's body (bound in decode_kernels.cc): z [R, V] bf16, targets [R] (each
// clamped into [0, V)), weights [R] -> loss [R] float32, dz [R, V] bf16. AVX-512 only.
inline ffi::Error CrossEntropyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> z,
                                   ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> weights,
                                   ffi::ResultBuffer<ffi::F32> loss,
                                   ffi::ResultBuffer<ffi::BF16> dz) {
  auto zd = z.dimensions();
  if (zd.size() != 2 || zd[1] < 1 || targets.element_count() != zd[0] ||
      weights.element_count() != zd[0] || loss->element_count() != zd[0] ||
      dz->dimensions().size() != 2 || dz->dimensions()[0] != zd[0] ||
      dz->dimensions()[1] != zd[1])
    return ffi::Error::InvalidArgument(
        "the cross-entropy kernel takes z [R, V], targets [R] and weights [R], and gives loss "
        "[R] and dz [R, V]");
#ifdef GEMMA3N_X86
  if (BestIsa() == kAvx512) {
    const int64_t rows = zd[0], v = zd[1];
    auto zp = reinterpret_cast<const uint16_t*>(z.typed_data());
    auto dp = reinterpret_cast<uint16_t*>(dz->typed_data());
    const int32_t* tp = targets.typed_data();
    const float* wp = weights.typed_data();
    float* lp = loss->typed_data();
    ParallelFor(pool, rows, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        if (wp[r] == 0.0f) {
          lp[r] = 0.0f;
          std::memset(dp + r * v, 0, v * sizeof(uint16_t));
          continue;
        }
        int32_t target = static_cast<int32_t>(std::clamp<int64_t>(tp[r], 0, v - 1));
        lp[r] = CrossEntropyRow(zp + r * v, v, target, wp[r], dp + r * v);
      }
    });
    return ffi::Error::Success();
  }
#endif
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "the cross-entropy kernel needs AVX-512");
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_CROSS_ENTROPY_H_
