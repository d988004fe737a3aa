// Kept ids: the units a sparse FFN keeps after its top-k, found in one pass over the gate.
// A header of the one translation unit decode_kernels.cc.
//
// For each row of top [R, F] (or, `any_row`, for all rows at once: the units any row keeps),
// the ids of its nonzero values in increasing order, the first S of them, padded with 0, and
// their count (all of them, also past S): what jnp.nonzero(row, size=S, fill_value=0) and
// jnp.sum(row != 0) give. XLA runs jnp.nonzero as several cumulative sums and a scatter over F,
// ~150 us a call at E4B's F = 16384 (2-core Xeon), once per sparse layer in every decode step.

#ifndef GEMMA3N_KERNELS_KEPT_IDS_H_
#define GEMMA3N_KERNELS_KEPT_IDS_H_

#include "common.h"

namespace gemma3n_kernels {

// Appends to out (room for `size`; n counts all) the ids in [begin, end) at which any of the
// `per_group` rows at `first` (row stride f) is nonzero. `Bits` is the unsigned integer of the
// value's width; a value is nonzero unless it is +0 or -0 (jnp's `!= 0`; NaN is nonzero there).
template <typename Bits>
void AppendKept(const Bits* first, int64_t per_group, int64_t f, int64_t begin, int64_t end,
                int32_t* out, int64_t size, int64_t& n) {
  constexpr Bits kMagnitude = static_cast<Bits>(static_cast<Bits>(~Bits{0}) >> 1);
  for (int64_t j = begin; j < end; ++j) {
    Bits bits = 0;
    for (int64_t r = 0; r < per_group; ++r) bits |= first[r * f + j] & kMagnitude;
    if (bits != 0) {
      if (n < size) out[n] = static_cast<int32_t>(j);
      ++n;
    }
  }
}

#ifdef GEMMA3N_X86
// AppendKept for bfloat16 over [0, f), 32 values a compare; returns where it stopped (the rest
// is the scalar loop's).
AVX512_TARGET inline int64_t AppendKeptBf16Avx512(const uint16_t* first, int64_t per_group,
                                                  int64_t f, int32_t* out, int64_t size,
                                                  int64_t& n) {
  constexpr int64_t kLane = 32;
  const __m512i magnitude = _mm512_set1_epi16(0x7fff);
  int64_t j = 0;
  for (; j + kLane <= f; j += kLane) {
    __m512i any = _mm512_setzero_si512();
    for (int64_t r = 0; r < per_group; ++r)
      any = _mm512_or_si512(any, _mm512_loadu_si512(first + r * f + j));
    for (uint32_t bits = _mm512_test_epi16_mask(any, magnitude); bits; bits &= bits - 1) {
      if (n < size) out[n] = static_cast<int32_t>(j + __builtin_ctz(bits));
      ++n;
    }
  }
  return j;
}
#endif  // GEMMA3N_X86

// The kept ids of top [R, F] (see the top of this file) into ids [G, S] and counts [G].
template <typename Bits>
void KeptIds(const Bits* top, int64_t rows, int64_t f, bool any_row, int32_t* ids, int64_t size,
             int32_t* counts, Isa isa) {
  int64_t groups = any_row ? 1 : rows, per_group = any_row ? rows : 1;
  for (int64_t g = 0; g < groups; ++g) {
    const Bits* first = top + g * f;
    int32_t* out = ids + g * size;
    int64_t n = 0, done = 0;
#ifdef GEMMA3N_X86
    if constexpr (sizeof(Bits) == 2)
      if (isa == kAvx512) done = AppendKeptBf16Avx512(first, per_group, f, out, size, n);
#endif
    AppendKept(first, per_group, f, done, f, out, size, n);
    std::fill(out + std::min(n, size), out + size, 0);
    counts[g] = static_cast<int32_t>(n);
  }
}

// top [R, F] bfloat16 or float32 -> ids [G, S] and counts [G], G = 1 if `any_row` else R.
inline ffi::Error KeptIdsImpl(ffi::AnyBuffer top, ffi::ResultBuffer<ffi::S32> ids,
                              ffi::ResultBuffer<ffi::S32> counts, bool any_row, int32_t isa) {
  auto td = top.dimensions(), id = ids->dimensions(), cd = counts->dimensions();
  if (td.size() != 2 || id.size() != 2 || cd.size() != 1)
    return ffi::Error::InvalidArgument("kept ids take top [R, F] and give ids [G, S], counts [G]");
  int64_t groups = any_row ? 1 : td[0];
  if (id[0] != groups || cd[0] != groups || td[1] > INT32_MAX)
    return ffi::Error::InvalidArgument("kept ids operand shapes do not match");
  int32_t* ip = ids->typed_data();
  int32_t* cp = counts->typed_data();
  switch (top.element_type()) {
    case ffi::DataType::BF16:
      KeptIds(reinterpret_cast<const uint16_t*>(top.untyped_data()), td[0], td[1], any_row, ip,
              id[1], cp, Choose(isa));
      return ffi::Error::Success();
    case ffi::DataType::F32:
      KeptIds(reinterpret_cast<const uint32_t*>(top.untyped_data()), td[0], td[1], any_row, ip,
              id[1], cp, Choose(isa));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("kept ids take bfloat16 or float32 values");
  }
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_KEPT_IDS_H_
