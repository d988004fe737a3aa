// bf16 x int4 -> f32 products of many rows (a prefill chunk, a LoRA batch over an int4 base):
//   y[M, N] = a[M, K] · w[N, K]ᵀ,  w in int4 groups (int4.h's layout, one f16 scale a group)
// on the many-row bf16 kernel (gemm_bf16.h), which packs each block of w once per call: here
// the packing dequantizes it too, each value (nibble - 8) · scale rounded to bf16 as
// DequantInt4Avx512 does, so the product is that of the bf16 weight XLA's path multiplies
// (int4.py's PREFILL_DTYPE), with float32 sums in another order. Each row is then scaled by
// its activation row's scale (x was quantized to int8 per row) and stored as float32 or
// bfloat16, so no float32 result goes through memory to XLA for it.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_GEMM_INT4_H_
#define GEMMA3N_KERNELS_GEMM_INT4_H_

#include "gemm_bf16.h"
#include "int4.h"

namespace gemma3n_kernels {

static_assert(kGemmKc % kInt4Group == 0, "a block of k holds whole groups");

#ifdef GEMMA3N_X86
// The int4 weight q [N, K / 2], scale [N, K / 32] as the right operand of the many-row kernel
// (K a multiple of kInt4Group, so every block of k is whole groups).
struct Int4Columns {
  const uint8_t* q;
  const uint16_t* scale;
  int64_t n, k;

  // As Bf16Columns::Pack: a panel's rows dequantized into a bf16 block [kGemmNr][kc] (36 KB, in
  // L1/L2), then packed from there.
  AVX512_TARGET void Pack(int64_t n0, int64_t nc, int64_t k0, int64_t kc, uint32_t* out) const {
    alignas(64) uint16_t rows[kGemmNr * kGemmKc];
    int64_t pairs = kc / 2, groups = k / kInt4Group;
    for (int64_t p0 = 0; p0 < nc; p0 += kGemmNr, out += pairs * kGemmNr) {
      int cols = static_cast<int>(std::clamp<int64_t>(n - n0 - p0, 0, kGemmNr));
      for (int i = 0; i < cols; ++i) {
        int64_t row = n0 + p0 + i;
        DequantInt4RowAvx512(q + row * (k / 2) + k0 / 2, scale + row * groups + k0 / kInt4Group,
                             rows + i * kc, kc / kInt4Group);
      }
      PackPanel(rows, kc, 0, cols, kGemmNr, 0, pairs, out);
    }
  }
};
#endif  // GEMMA3N_X86

// The FFI handler's body (bound in decode_kernels.cc): a [M, K] bf16 times q [N, K / 2] with
// scales [N, K / 32], each row of the result times its row_scale [M, 1] (float32) -> y [M, N],
// float32 or bfloat16 (the product scaled, then rounded once, as XLA would).
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
  auto type = y->element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("the int4 product gives float32 or bfloat16");
#ifdef GEMMA3N_X86
  if (BestIsa() == kAvx512) {
    int64_t m = ad[0], k = ad[1], n = qd[0];
    auto ap = reinterpret_cast<const uint16_t*>(a.typed_data());
    Int4Columns w{q.typed_data(), reinterpret_cast<const uint16_t*>(scale.typed_data()), n, k};
    if (type == ffi::DataType::F32)
      GemmAvx512(pool, ap, w, y->typed_data<float>(), row_scale.typed_data(), m, k, n);
    else
      GemmAvx512(pool, ap, w, y->reinterpret_data<uint16_t>(),
                 row_scale.typed_data(), m, k, n);
    return ffi::Error::Success();
  }
#endif
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "the int4 product kernel needs AVX-512 BF16");
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_INT4_H_
