// Gathered rows: s8 x gathered s8 rows -> s32 (a sparse FFN's down projection), exact.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_ROWS_H_
#define GEMMA3N_KERNELS_ROWS_H_

#include "common.h"

namespace gemma3n_kernels {

// Gathered rows: y[M, D] = x[M, C] · w[ids[C], D], w int8 stored rows first [F, D] (a sparse
// layer's FFN down projection, of which only the kept units' rows are read), exact in int32.
// Columns [begin, end) of y.
inline void RowsInt8Scalar(const int8_t* x, const int32_t* ids, const int8_t* w, int32_t* y,
                           int64_t m, int64_t c, int64_t d, int64_t begin, int64_t end) {
  for (int64_t i = 0; i < m; ++i) {
    std::fill(y + i * d + begin, y + i * d + end, 0);
    for (int64_t j = 0; j < c; ++j) {
      const int8_t* row = w + int64_t{ids[j]} * d;
      for (int64_t col = begin; col < end; ++col) y[i * d + col] += int32_t{x[i * c + j]} * row[col];
    }
  }
}

// x of the gathered-rows kernels as int16 pairs (x[j], x[j + 1]) in int32 [M, ceil(C / 2)]:
// one vpmaddwd / vpdpwssd factor for two rows; an odd C's last pair ends in zero.
inline std::vector<int32_t> XPairs(const int8_t* x, int64_t m, int64_t c) {
  int64_t pairs = (c + 1) / 2;
  std::vector<int32_t> out(m * pairs);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < pairs; ++p) {
      int16_t lo = x[i * c + 2 * p], hi = 2 * p + 1 < c ? x[i * c + 2 * p + 1] : 0;
      out[i * pairs + p] = static_cast<int32_t>(static_cast<uint16_t>(lo) |
                                                (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16));
    }
  return out;
}

// Column of y that int32 lane l of the t-th vector of a gathered-rows strip holds: interleaving
// two rows' int16 values 128 bits at a time (vpunpck[lh]wd) puts columns 8L + 0..3 of each
// 128-bit lane L in the low vector, 8L + 4..7 in the high one.
constexpr int64_t StripColumn(int64_t t, int64_t l) {
  return 32 * (t / 2) + 8 * (l / 4) + 4 * (t % 2) + l % 4;
}

// Columns per strip of the AVX2 and the AVX-512 kernels below (on every CPU: the handler sizes
// its work with them).
constexpr int64_t kStrip2 = 16, kStrip512 = 64;

#ifdef GEMMA3N_X86
// Gathered rows, 16 columns per strip: two rows' int8 widened to int16, interleaved, and
// multiplied by the pair (x[j], x[j + 1]) with vpmaddwd: each int32 lane sums two products.
// Strips [begin, end) of kStrip2 columns.
template <int M>
AVX2_TARGET void RowsInt8Avx2(const int32_t* xp, const int32_t* ids, const int8_t* w, int32_t* y,
                              int64_t c, int64_t d, int64_t begin, int64_t end) {
  int64_t pairs = (c + 1) / 2;
  for (int64_t strip = begin; strip < end; ++strip) {
    int64_t col = strip * kStrip2;
    __m256i acc[M][2];
    UNROLL
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* r0 = w + int64_t{ids[2 * p]} * d + col;
      // An odd C's last row pairs with itself, times x's zero.
      const int8_t* r1 = 2 * p + 1 < c ? w + int64_t{ids[2 * p + 1]} * d + col : r0;
      __m256i a = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
      __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1)));
      __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
      UNROLL
      for (int i = 0; i < M; ++i) {
        __m256i f = _mm256_set1_epi32(xp[i * pairs + p]);
        acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(lo, f));
        acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(hi, f));
      }
    }
    UNROLL
    for (int i = 0; i < M; ++i) {
      alignas(32) int32_t lanes[2][8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[0]), acc[i][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes[1]), acc[i][1]);
      UNROLL
      for (int t = 0; t < 2; ++t)
        for (int l = 0; l < 8; ++l) y[i * d + col + StripColumn(t, l)] = lanes[t][l];
    }
  }
}

// Gathered rows, 64 columns (one cache line of each row) per strip, as RowsInt8Avx2 with
// vpdpwssd. Strips [begin, end) of kStrip512 columns.
template <int M>
AVX512_TARGET void RowsInt8Avx512(const int32_t* xp, const int32_t* ids, const int8_t* w,
                                  int32_t* y, int64_t c, int64_t d, int64_t begin, int64_t end) {
  constexpr int kVectors = 4;
  int64_t pairs = (c + 1) / 2;
  for (int64_t strip = begin; strip < end; ++strip) {
    int64_t col = strip * kStrip512;
    __m512i acc[M][kVectors];
    UNROLL
    for (int i = 0; i < M; ++i)
      UNROLL
      for (int t = 0; t < kVectors; ++t) acc[i][t] = _mm512_setzero_si512();
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* r0 = w + int64_t{ids[2 * p]} * d + col;
      const int8_t* r1 = 2 * p + 1 < c ? w + int64_t{ids[2 * p + 1]} * d + col : r0;
      __m512i v[kVectors];
      UNROLL
      for (int h = 0; h < 2; ++h) {
        __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 32 * h)));
        __m512i b = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + 32 * h)));
        v[2 * h] = _mm512_unpacklo_epi16(a, b);
        v[2 * h + 1] = _mm512_unpackhi_epi16(a, b);
      }
      UNROLL
      for (int i = 0; i < M; ++i) {
        __m512i f = _mm512_set1_epi32(xp[i * pairs + p]);
        UNROLL
        for (int t = 0; t < kVectors; ++t) acc[i][t] = _mm512_dpwssd_epi32(acc[i][t], v[t], f);
      }
    }
    UNROLL
    for (int i = 0; i < M; ++i) {
      alignas(64) int32_t lanes[kVectors][16];
      UNROLL
      for (int t = 0; t < kVectors; ++t) _mm512_store_si512(lanes[t], acc[i][t]);
      UNROLL
      for (int t = 0; t < kVectors; ++t)
        for (int l = 0; l < 16; ++l) y[i * d + col + StripColumn(t, l)] = lanes[t][l];
    }
  }
}
#endif  // GEMMA3N_X86

// The first `count` ids, each clamped into [0, f) (jnp.take(..., mode='clip') reads so too).
inline std::vector<int32_t> ClampedIds(const int32_t* ids, int64_t count, int64_t f) {
  std::vector<int32_t> rows(ids, ids + count);
  for (int32_t& r : rows) r = static_cast<int32_t>(std::clamp<int64_t>(r, 0, f - 1));
  return rows;
}

// The FFI handler's body (bound in decode_kernels.cc): x [M, C] times rows ids [C] of w [F, D].
inline ffi::Error RowsInt8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                               ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S8> w,
                               ffi::ResultBuffer<ffi::S32> y, int32_t isa) {
  auto xd = x.dimensions(), idd = ids.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || idd.size() != 1 || wd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("the gathered-rows kernel takes x [M, C], ids [C], "
                                       "w [F, D] and gives y [M, D]");
  if (xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("decode kernels take 1 to 16 rows of x");
  if (idd[0] != xd[1] || yd[0] != xd[0] || yd[1] != wd[1] || wd[0] < 1)
    return ffi::Error::InvalidArgument("gathered-rows kernel operand shapes do not match");
  int64_t m = xd[0], c = xd[1], f = wd[0], d = wd[1];
  std::vector<int32_t> rows = ClampedIds(ids.typed_data(), c, f);
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* yp = y->typed_data();
  Isa chosen = Choose(isa);
  int64_t strip = chosen == kAvx512 ? kStrip512 : kStrip2;
  int64_t strips = chosen == kScalar ? 0 : d / strip;
#ifdef GEMMA3N_X86
  if (strips > 0) {
    std::vector<int32_t> pairs = XPairs(xp, m, c);
    WithRows(m, [&]<int M>() {
      ParallelFor(pool, strips, Grain(c * strip), [&](int64_t b, int64_t e) {
        if (chosen == kAvx512) RowsInt8Avx512<M>(pairs.data(), rows.data(), wp, yp, c, d, b, e);
        else RowsInt8Avx2<M>(pairs.data(), rows.data(), wp, yp, c, d, b, e);
      });
    });
  }
#endif
  // The columns past the last whole strip (all of them on the scalar path).
  int64_t done = strips * strip;
  ParallelFor(pool, d - done, Grain(c), [&](int64_t b, int64_t e) {
    RowsInt8Scalar(xp, rows.data(), wp, yp, m, c, d, done + b, done + e);
  });
  return ffi::Error::Success();
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_ROWS_H_
