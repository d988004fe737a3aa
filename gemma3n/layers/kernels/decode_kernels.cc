// Decode kernels: products of a few activation rows x [M, K] with a weight stored [N, K] (the
// serving order, contracted axis last), y [M, N], for M <= kMaxRows. Reached from JAX as XLA FFI
// custom calls (gemma3n/layers/decode_kernels.py). Each one streams the weight once, its rows
// split across XLA's own CPU thread pool, with the widest instructions the CPU has, picked at
// run time (or capped by the `isa` attribute, so tests reach every variant on one machine):
//   bf16 x bf16 -> f32   AVX-512 BF16 vdpbf16ps | AVX2 FMA on even/odd halves | scalar
//   s8 x s8 -> s32       AVX-512 VNNI vpdpbusd  | AVX2 vpmaddubsw (one row, x without -128)
//                        or vpmaddwd | scalar    (exact)
//   s8 x int4 -> f32     int4 in groups of kInt4Group along K, one f16 scale per group;
//                        group sums exact in int32, then scaled and summed in float32;
//                        or rows ids[C] of w [F, K] read in place (a sparse FFN's kept units).
//   bf16 x bf16 -> bf16  many rows (gemm_bf16.h): x [M, K] · w [N, K]ᵀ or, for its gradients,
//                        g [M, N] · w [N, K] and gᵀ · x; float32 sums rounded to bf16 once;
//                        up to 256 rows, x · w [N, K]ᵀ reads w in place (gemm_few_rows.h);
//   bf16 x int4 or int8 -> f32 or bf16   many rows, w converted to bf16 (gemm_quantized.h);
//                        both AVX-512 BF16 only (else XLA's products), or AMX tiles
//                        (gemm_amx.h; w [N, K] gemm_amx_rows.h), chosen in gemm_handlers.h
//   int4 -> bf16         the int4 weight dequantized, for XLA's product of a prefill chunk
//                        elsewhere.
//   s8 x gathered s8 rows -> s32   x [M, C] times rows ids[C] of a weight stored [F, D]
//                        (not [N, K]: a sparse FFN's down projection), exact.
//   bf16 gathered, both ways, for the units a step's tokens keep in a sparse FFN (ids[C], of
//                        which the first `count`): x [M, K] · rows ids of w [F, K] -> [M, C]
//                        (the up projection; columns past count are 0), and x [M, C] times
//                        rows ids of w [F, D] -> [M, D] (the down projection).
//   bf16 masked rows, many tokens (masked_rows.h): each token's own kept units of a sparse FFN,
//                        x [T, D] · w [F, D]ᵀ where mask [T, F] != 0, and h [T, F] · w [F, D]
//                        over them; AVX-512 BF16 only.
//   kept ids             a sparse FFN's kept units: jnp.nonzero with a size (kept_ids.h).
//   cross-entropy        a training loss's chunk of logits: each row's loss and its gradient
//                        (cross_entropy.h); AVX-512 only.
// int4 packing: group g of row n is kInt4Group / 2 bytes; byte j holds element j in its low
// nibble and element j + kInt4Group / 2 in its high one, each stored as value + 8.
//
// The kernels live in headers by concept, all compiled here as one unit: common.h (ISA choice,
// ParallelFor, conversions), bf16.h, int8.h, rows.h and rows_bf16.h (gathered rows), int4.h,
// int4_dequant.h, gemm_*.h (products of many rows), masked_rows.h, kept_ids.h; this file holds
// the FFI handlers.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "bf16.h"
#include "common.h"
#include "cross_entropy.h"
#include "gemm_handlers.h"
#include "int4_dequant.h"
#include "int8.h"
#include "kept_ids.h"
#include "masked_rows.h"
#include "rows.h"
#include "rows_bf16.h"

namespace {

using namespace gemma3n_kernels;

// Checks x [M, K] against w [N, K·num/den] and y [M, N]; returns an error or Success.
ffi::Error CheckShapes(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions wd,
                       ffi::AnyBuffer::Dimensions yd, int64_t num, int64_t den) {
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("decode kernels take x [M, K], w [N, K] and give y [M, N]");
  if (xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("decode kernels take 1 to 16 rows of x");
  if (wd[1] * den != xd[1] * num || yd[0] != xd[0] || yd[1] != wd[0])
    return ffi::Error::InvalidArgument("decode kernel operand shapes do not match");
  return ffi::Error::Success();
}

// Columns [0, rows) of y [M, n] (row stride n): x [M, K] · w(r) for each weight row r < rows.
template <typename Rows>
void Bf16Rows(ffi::ThreadPool& pool, const uint16_t* xp, const Rows& w, float* yp, int64_t m,
              int64_t k, int64_t rows, int64_t n, int32_t isa) {
  int64_t grain = Grain(k * 2);
  switch (Choose(isa)) {
#ifdef GEMMA3N_X86
    case kAvx512:
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, rows, grain, [&](int64_t b, int64_t e) {
          if (M == 1 && k <= kRowKernelMaxK) Bf16RowAvx512(xp, w, yp, k, b, e);
          else Bf16TiledAvx512<M>(xp, w, yp, k, n, b, e);
        });
      });
      break;
    case kAvx2: {
      std::vector<float> xs = SplitBf16X(xp, m, k);
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, rows, grain, [&](int64_t b, int64_t e) {
          if (M == 1 && k <= kRowKernelMaxK) Bf16RowAvx2(xs.data(), w, yp, k, b, e);
          else if constexpr (M == 1)
            Bf16TiledAvx2<1, kLongRowTileWeightRowsAvx2>(xs.data(), w, yp, k, n, b, e);
          else Bf16TiledAvx2<M, kTileWeightRowsAvx2>(xs.data(), w, yp, k, n, b, e);
        });
      });
      break;
    }
#endif
    default:
      ParallelFor(pool, rows, grain, [&](int64_t b, int64_t e) { Bf16Scalar(xp, w, yp, m, k, n, b, e); });
  }
}

ffi::Error Bf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), y->dimensions(), 1, 1); e.failure())
    return e;
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  Bf16Rows(pool, x.typed_data(), DenseRows{w.typed_data(), k}, y->typed_data(), m, k, n, n, isa);
  return ffi::Error::Success();
}

// `count`'s one value, clamped into [0, c]; -1 if the buffer does not hold one value.
int64_t CountOf(ffi::Buffer<ffi::S32>& count, int64_t c) {
  if (count.element_count() != 1) return -1;
  return std::clamp<int64_t>(count.typed_data()[0], 0, c);
}

ffi::Error GatheredBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                            ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> count,
                            ffi::Buffer<ffi::BF16> w, ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  auto xd = x.dimensions(), idd = ids.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || idd.size() != 1 || wd.size() != 2 || yd.size() != 2 || xd[0] < 1 ||
      xd[0] > kMaxRows || wd[1] != xd[1] || yd[0] != xd[0] || yd[1] != idd[0] || wd[0] < 1 ||
      CountOf(count, idd[0]) < 0)
    return ffi::Error::InvalidArgument("the gathered bf16 kernel takes x [M, K] (1 to 16 rows), "
                                       "ids [C], a count and w [F, K], and gives y [M, C]");
  int64_t m = xd[0], k = xd[1], f = wd[0], c = idd[0], used = CountOf(count, c);
  std::vector<int32_t> rows = ClampedIds(ids.typed_data(), used, f);
  float* yp = y->typed_data();
  for (int64_t i = 0; i < m; ++i) std::fill(yp + i * c + used, yp + (i + 1) * c, 0.0f);
  Bf16Rows(pool, x.typed_data(), GatheredRows{w.typed_data(), k, rows.data(), used}, yp, m, k,
           used, c, isa);
  return ffi::Error::Success();
}

ffi::Error RowsBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::S32> ids,
                        ffi::Buffer<ffi::S32> count, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  auto xd = x.dimensions(), idd = ids.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || idd.size() != 1 || wd.size() != 2 || yd.size() != 2 || xd[0] < 1 ||
      xd[0] > kMaxRows || idd[0] != xd[1] || yd[0] != xd[0] || yd[1] != wd[1] || wd[0] < 1 ||
      CountOf(count, xd[1]) < 0)
    return ffi::Error::InvalidArgument("the gathered-rows bf16 kernel takes x [M, C] (1 to 16 rows), "
                                       "ids [C], a count and w [F, D], and gives y [M, D]");
  int64_t m = xd[0], c = xd[1], f = wd[0], d = wd[1], used = CountOf(count, c);
  std::vector<int32_t> rows = ClampedIds(ids.typed_data(), used, f);
  const GatheredRows gathered{w.typed_data(), d, rows.data(), used};
  const uint16_t* xp = x.typed_data();
  float* yp = y->typed_data();
  Isa chosen = Choose(isa);
  int64_t strip = chosen == kAvx512 ? kRowStrip512 : kRowStrip2;
  int64_t strips = chosen == kScalar ? 0 : d / strip;
  int64_t grain = Grain(used * strip * 2);
#ifdef GEMMA3N_X86
  if (strips > 0 && chosen == kAvx512) {
    std::vector<uint32_t> pairs = XPairsBf16(xp, m, c, used);
    WithRows(m, [&]<int M>() {
      ParallelFor(pool, strips, grain, [&](int64_t b, int64_t e) {
        RowsBf16Avx512<M>(pairs.data(), gathered, yp, d, b, e);
      });
    });
  } else if (strips > 0) {
    std::vector<float> xf(m * c);
    for (int64_t i = 0; i < m * c; ++i) xf[i] = Bf16ToF32(xp[i]);
    WithRows(m, [&]<int M>() {
      ParallelFor(pool, strips, grain, [&](int64_t b, int64_t e) {
        RowsBf16Avx2<M>(xf.data(), c, gathered, yp, d, b, e);
      });
    });
  }
#endif
  // The columns past the last whole strip (all of them on the scalar path).
  int64_t done = strips * strip;
  ParallelFor(pool, d - done, Grain(used * 2), [&](int64_t b, int64_t e) {
    RowsBf16Scalar(xp, c, gathered, yp, m, d, done + b, done + e);
  });
  return ffi::Error::Success();
}

ffi::Error Int8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                    ffi::ResultBuffer<ffi::S32> y, int32_t isa) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), y->dimensions(), 1, 1); e.failure())
    return e;
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* yp = y->typed_data();
  int64_t grain = Grain(k);
  switch (Choose(isa)) {
#ifdef GEMMA3N_X86
    case kAvx512:
      if (m == 1 && k <= kRowKernelMaxK) {
        std::vector<uint8_t> xu(k);
        for (int64_t i = 0; i < k; ++i) xu[i] = static_cast<uint8_t>(int32_t{xp[i]} + 128);
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Int8RowAvx512(xu.data(), wp, yp, k, b, e); });
      } else {
        std::vector<int32_t> xsum(m, 0);
        for (int64_t i = 0; i < m * k; ++i) xsum[i / k] += xp[i];
        WithRows(m, [&]<int M>() {
          ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) {
            Int8TiledAvx512<M>(xp, xsum.data(), wp, yp, k, n, b, e);
          });
        });
      }
      break;
    case kAvx2: {
      if (m == 1 && WithoutInt8Min(xp, k)) {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) {
          if (k <= kRowKernelMaxK) Int8RowAvx2(xp, wp, yp, k, b, e);
          else Int8RowsTileAvx2<kTileWeightRows>(xp, wp, yp, k, b, e);
        });
        break;
      }
      std::vector<int16_t> x16(xp, xp + m * k);
      WithRows(m, [&]<int M>() {
        ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Int8Avx2<M>(x16.data(), wp, yp, k, n, b, e); });
      });
      break;
    }
#endif
    default:
      ParallelFor(pool, n, grain, [&](int64_t b, int64_t e) { Int8Scalar(xp, wp, yp, m, k, n, b, e); });
  }
  return ffi::Error::Success();
}

ffi::Error Int4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::U8> w,
                    ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y, int32_t isa) {
  if (auto e = CheckShapes(x.dimensions(), w.dimensions(), y->dimensions(), 1, 2); e.failure())
    return e;
  int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = w.dimensions()[0];
  auto sd = scale.dimensions();
  if (k % kInt4Group != 0 || sd.size() != 2 || sd[0] != n || sd[1] != k / kInt4Group)
    return ffi::Error::InvalidArgument("int4 decode kernel: K must be a multiple of 32 and the "
                                       "scales [N, K / 32]");
  const Int4Operands op(x.typed_data(), m, w.typed_data(),
                        reinterpret_cast<const uint16_t*>(scale.typed_data()), y->typed_data(),
                        k, n);
  Int4Products(pool, op, m, isa);
  return ffi::Error::Success();
}

// The gathered bf16 kernels' operands: x, ids, the count, w; y float32.
auto GatheredBf16Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int32_t>("isa");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMatvecBf16, Bf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nGemmBf16, GemmBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("layout")
                                  .Attr<int32_t>("amx"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nGemmInt4, GemmInt4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("amx"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nGemmInt8, GemmInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMaskedRowsDot, MaskedRowsDotImpl,
                              MaskedRowsBinding().Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMaskedRowsSum, MaskedRowsSumImpl,
                              MaskedRowsBinding().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nKeptIds, KeptIdsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<bool>("any_row")
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nGatheredBf16, GatheredBf16Impl, GatheredBf16Binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nRowsBf16, RowsBf16Impl, GatheredBf16Binding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMatvecInt8, Int8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nMatvecInt4, Int4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nGatheredInt4, GatheredInt4Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nDequantizeInt4Bf16, DequantInt4Bf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nRowsInt8, RowsInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int32_t>("isa"));

// The instruction set the kernels use on this CPU (an Isa value), for the Python side to report.
XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemma3nCrossEntropy, CrossEntropyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

extern "C" int32_t Gemma3nKernelIsa() { return BestIsa(); }
// 1 if the CPU has AMX bfloat16 tiles the OS enables (HasAmxBf16), else 0.
extern "C" int32_t Gemma3nCpuHasAmx() { return HasAmxBf16() ? 1 : 0; }
