// The FFI handlers' bodies of the products of many rows (bound in decode_kernels.cc), and which
// kernel takes each product. Python asks for AMX tiles (`amx`, gemma3n/layers/gemm.py); on a CPU
// with them, for K a multiple of 32, a bf16 product of kAmxMinRows rows or more takes
// gemm_amx.h and an int4 one gemm_amx_rows.h; else the AVX-512 kernels (gemm_bf16.h,
// gemm_few_rows.h; int8 and int4 through gemm_quantized.h).
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_GEMM_HANDLERS_H_
#define GEMMA3N_KERNELS_GEMM_HANDLERS_H_

#include "gemm_amx_rows.h"

namespace gemma3n_kernels {

// Whether a product contracting k values runs on AMX tiles, asked to by `amx`.
inline bool OnAmx(int32_t amx, int64_t k) { return amx && k % 32 == 0 && AmxUsable(); }

// bf16: y [M, N] = a [M, K] · w, rounded to bfloat16: w [N, K] transposed (layout kWeightRows)
// or w [K, N]. Not on AMX tiles (`OnAmx`), a few rows times w [N, K] (K even) take
// gemm_few_rows.h, which reads w in place.
inline ffi::Error GemmBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a,
                               ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::BF16> y,
                               int32_t layout, int32_t amx) {
  auto ad = a.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (ad.size() != 2 || wd.size() != 2 || yd.size() != 2 ||
      (layout != kWeightRows && layout != kWeightColumns))
    return ffi::Error::InvalidArgument(
        "the bf16 product takes a [M, K], w [N, K] or [K, N], y [M, N]");
  int64_t m = ad[0], k = ad[1], n = layout == kWeightRows ? wd[0] : wd[1];
  if ((layout == kWeightRows ? wd[1] : wd[0]) != k || yd[0] != m || yd[1] != n)
    return ffi::Error::InvalidArgument("bf16 product operand shapes do not match");
#ifdef GEMMA3N_X86
  if (BestIsa() == kAvx512) {
    auto ap = reinterpret_cast<const uint16_t*>(a.typed_data());
    auto wp = reinterpret_cast<const uint16_t*>(w.typed_data());
    auto yp = reinterpret_cast<uint16_t*>(y->typed_data());
    Bf16Columns columns{wp, static_cast<WeightLayout>(layout), n, k};
#ifdef GEMMA3N_AMX
    if (m >= kAmxMinRows && OnAmx(amx, k)) {
      GemmAmx(pool, ap, columns, yp, m, k, n);
      return ffi::Error::Success();
    }
#endif
    if (layout == kWeightRows && m <= kFewRowsMaxM && k % 2 == 0)
      GemmFewRowsAvx512(pool, ap, wp, yp, m, k, n);
    else
      GemmAvx512(pool, ap, columns, yp, Scales{}, m, k, n);
    return ffi::Error::Success();
  }
#endif
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "the bf16 product kernel needs AVX-512 BF16");
}

// y [M, N] (float32 or bfloat16) = a [M, K] · w, scaled as gemm_quantized.h says; an error if
// y is another type or the CPU lacks AVX-512 BF16. int4 products take AMX tiles as `OnAmx`
// says; int8 ones never (XLA's int8 products, on the tiles' int8 form, ran 1.5-2x faster).
template <typename Columns>
ffi::Error ScaledGemm(ffi::ThreadPool& pool, const ffi::Buffer<ffi::BF16>& a, const Columns& w,
                      const float* row_scale, const float* col_scale,
                      ffi::Result<ffi::AnyBuffer>& y, int32_t amx) {
  auto type = y->element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("the quantized products give float32 or bfloat16");
#ifdef GEMMA3N_X86
  if (BestIsa() == kAvx512) {
    int64_t m = a.dimensions()[0], k = a.dimensions()[1];
    auto ap = reinterpret_cast<const uint16_t*>(a.typed_data());
    Scales scales{row_scale, col_scale};
    auto product = [&](auto* yp) {
#ifdef GEMMA3N_AMX
      if constexpr (std::is_same_v<Columns, Int4Columns>)
        if (OnAmx(amx, k)) return GemmRowsAmx(pool, ap, w, yp, scales, m, k);
#endif
      GemmAvx512(pool, ap, w, yp, scales, m, k, w.n);
    };
    if (type == ffi::DataType::F32) product(y->typed_data<float>());
    else product(y->reinterpret_data<uint16_t>());
    return ffi::Error::Success();
  }
#endif
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "the quantized product kernels need AVX-512 BF16");
}

// int4: a [M, K] bf16, row scales
// [M, 1], q [N, K / 2], scales [N, K / 32].
inline ffi::Error GemmInt4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a,
                               ffi::Buffer<ffi::F32> row_scale, ffi::Buffer<ffi::U8> q,
                               ffi::Buffer<ffi::F16> scale, ffi::Result<ffi::AnyBuffer> y,
                               int32_t amx) {
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
  return ScaledGemm(pool, a, w, row_scale.typed_data(), nullptr, y, amx);
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
  return ScaledGemm(pool, a, w, row_scale.typed_data(), col_scale.typed_data(), y, 0);
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_HANDLERS_H_
