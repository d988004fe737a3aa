// int4 products of many rows (a prefill chunk) on AMX tiles, the weight's rows as the tiles'
// left operand:
//   yᵀ[N, M] = w[N, K] · a[M, K]ᵀ, written out as y[M, N] (scaled as gemm_quantized.h says).
// A header of the one translation unit decode_kernels.cc.
//
// `tdpbf16ps` reads its left operand as rows of 32 contracted values, which is how w [N, K]
// stores them, and its right one as pairs of contracted values side by side, which a [M, K]
// becomes by 16 x 16 transposes. gemm_amx.h takes a as the left operand, so it would transpose
// the weight: at a prefill chunk's 128 rows that packing costs about as much as the product.
// Here only a is transposed (M x K values, not N x K), and each block of 32 of w's rows is
// dequantized to bf16 once per block of a's rows, in natural order.
//
// Loops: rows of a in blocks of kRowsAmxMc, packed in panels of 16 rows ([kc / 2][16] pairs: a
// right tile is 16 consecutive pairs of a panel, 1 KB); the contracted values in blocks of
// kRowsAmxKc; each thread a range of w's rows, 32 at a time (two left tiles), dequantized into
// a buffer whose row stride is not a multiple of 4 KB (rows 4 KB apart share one L1 set), the
// next 32 rows prefetched meanwhile; each 32 x 32 block of yᵀ in four tiles of sums, kept in a
// float32 buffer between blocks of k, then transposed, scaled and stored.
//
// The same loops over bf16 weights (rows copied) ran slower than gemm_amx.h and XLA's products
// at 128-512 rows, and over int8 ones 1.5-2x slower than XLA's int8 products (which use the
// tiles' int8 form): those stay where they were. Measured on a 2-core Xeon with AMX: see
// gemma3n/layers/int4.py.

#ifndef GEMMA3N_KERNELS_GEMM_AMX_ROWS_H_
#define GEMMA3N_KERNELS_GEMM_AMX_ROWS_H_

#include "gemm_amx.h"
#include "gemm_quantized.h"

namespace gemma3n_kernels {

constexpr int64_t kRowsAmxGroup = 2 * kAmxTile;  // w rows, and a rows, of four tiles of sums
constexpr int64_t kRowsAmxMc = 128;               // a rows a block (a prefill chunk)
constexpr int64_t kRowsAmxKc = 2048;              // contracted values a block (E4B's width)
// The packed a block (512 KB) and a block of w's rows (130 KB) fit L2 (2 MB).
constexpr int64_t kRowsAmxPad = 32;               // bf16 values past each dequantized row
static_assert(kRowsAmxMc % kRowsAmxGroup == 0 && kRowsAmxKc % 32 == 0, "whole tiles");

#ifdef GEMMA3N_AMX
// Lines [part, part + 1) / parts of `bytes` bytes at p into L2, ahead of their use.
inline void PrefetchPart(const void* p, int64_t bytes, int64_t part, int64_t parts) {
  const char* c = static_cast<const char*>(p);
  int64_t lines = (bytes + 63) / 64;
  for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; ++l)
    _mm_prefetch(c + 64 * l, _MM_HINT_T1);
}

// Part `part` of `parts` of the bytes DequantRows reads for rows [n0, n0 + 32), values
// [k0, k0 + kc).
inline void PrefetchRows(const Int4Columns& w, int64_t n0, int64_t k0, int64_t kc, int64_t part,
                         int64_t parts) {
  for (int64_t i = 0; i < std::min(kRowsAmxGroup, w.n - n0); ++i) {
    PrefetchPart(w.Values(n0 + i, k0), kc / 2, part, parts);
    PrefetchPart(w.GroupScales(n0 + i, k0), kc / kInt4Group * 2, part, parts);
  }
}

// Rows [n0, n0 + 32) of w (those past n: 0), values [k0, k0 + kc), as bf16 into `to` (row
// stride ld).
AMX_TARGET inline void DequantRows(const Int4Columns& w, int64_t n0, int64_t k0, int64_t kc,
                                 uint16_t* to, int64_t ld) {
  for (int64_t i = 0; i < kRowsAmxGroup; ++i) {
    if (n0 + i < w.n)
      w.DequantRow(n0 + i, k0, kc, to + i * ld);
    else
      std::fill(to + i * ld, to + i * ld + kc, uint16_t{0});
  }
}

// The 32 x 32 block of yᵀ in `sums` ([32 w rows][32 a rows] float32) as y's rows m0.. (up to
// `rows` of them) and columns n0.. (up to `cols`), times col_scale then row_scale where given.
template <typename Out>
AMX_TARGET inline void StoreTransposed(const float* sums, Out* y, int64_t ldy, int64_t m0,
                                       int64_t rows, int64_t n0, int64_t cols, Scales scales) {
  for (int64_t bn = 0; bn < kRowsAmxGroup; bn += kAmxTile) {
    int64_t left = std::clamp<int64_t>(cols - bn, 0, kAmxTile);
    if (left == 0) break;
    __mmask16 mask = static_cast<__mmask16>((1u << left) - 1);
    __m512 col_scale = scales.col == nullptr
                           ? _mm512_set1_ps(1.0f)
                           : _mm512_maskz_loadu_ps(mask, scales.col + n0 + bn);
    for (int64_t bm = 0; bm < std::min<int64_t>(kRowsAmxGroup, rows); bm += kAmxTile) {
      __m512i r[16];
      UNROLL
      for (int t = 0; t < 16; ++t)
        r[t] = _mm512_loadu_si512(sums + (bn + t) * kRowsAmxGroup + bm);
      Transpose16(r);  // r[u]: a row m0 + bm + u, w rows n0 + bn..
      for (int64_t u = 0; u < std::min<int64_t>(kAmxTile, rows - bm); ++u) {
        int64_t m = m0 + bm + u;
        __m512 sum = _mm512_castsi512_ps(r[u]);
        if (scales.col != nullptr) sum = _mm512_mul_ps(sum, col_scale);
        if (scales.row != nullptr) sum = _mm512_mul_ps(sum, _mm512_set1_ps(scales.row[m]));
        if constexpr (std::is_same_v<Out, float>)
          _mm512_mask_storeu_ps(y + m * ldy + n0 + bn, mask, sum);
        else
          _mm256_mask_storeu_epi16(y + m * ldy + n0 + bn, mask, (__m256i)_mm512_cvtneps_pbh(sum));
      }
    }
  }
}

// w's rows [n_begin, n_end) (a multiple of 32 apart, but for the last) of y[M, N] = a · wᵀ.
template <typename Out>
AMX_TARGET void GemmRowsBlockAmx(const uint16_t* a, const Int4Columns& w, Out* y, Scales scales,
                                 int64_t m, int64_t k, int64_t n_begin, int64_t n_end) {
  LoadTileConfig();
  const int64_t n = w.n, kc_max = std::min(k, kRowsAmxKc), ld = kc_max + kRowsAmxPad;
  const int64_t mc_max = std::min(kRowsAmxMc, (m + kRowsAmxGroup - 1) / kRowsAmxGroup *
                                                  kRowsAmxGroup);
  const int64_t groups = (n_end - n_begin + kRowsAmxGroup - 1) / kRowsAmxGroup;
  constexpr int64_t kQuad = kRowsAmxGroup * kRowsAmxGroup;  // the four tiles' floats
  std::vector<uint32_t> packed(kc_max / 2 * mc_max);
  std::vector<uint16_t> rows(kRowsAmxGroup * ld);
  std::vector<float> partial(k > kc_max ? groups * (mc_max / kRowsAmxGroup) * kQuad : 0);
  alignas(64) float sums[kQuad];
  for (int64_t ic = 0; ic < m; ic += kRowsAmxMc) {
    const int64_t mc = std::min(kRowsAmxMc, m - ic);
    const int64_t padded = (mc + kRowsAmxGroup - 1) / kRowsAmxGroup * kRowsAmxGroup;
    for (int64_t pc = 0; pc < k; pc += kRowsAmxKc) {
      const int64_t kc = std::min(kRowsAmxKc, k - pc), pairs = kc / 2;
      const bool first = pc == 0, last = pc + kc >= k;
      for (int64_t p = 0; p < padded; p += kAmxTile)
        PackPanel(a, k, ic + p, static_cast<int>(std::clamp<int64_t>(mc - p, 0, kAmxTile)),
                  kAmxTile, pc / 2, pairs, packed.data() + p * pairs);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t n0 = n_begin + g * kRowsAmxGroup;
        DequantRows(w, n0, pc, kc, rows.data(), ld);
        for (int64_t i = 0; i < padded; i += kRowsAmxGroup) {
          float* keep = partial.empty() ? nullptr
                                        : partial.data() + (g * (mc_max / kRowsAmxGroup) +
                                                            i / kRowsAmxGroup) * kQuad;
          // While the first 32 rows of a meet this group, the next group's rows come to L2.
          const bool fetch = i == 0 && g + 1 < groups;
          const uint32_t* right = packed.data() + i * pairs;
          AmxQuad(rows.data(), ld, right, right + kAmxTile * pairs, kAmxTile, kc / 32,
                  first ? nullptr : keep, last ? sums : keep, kRowsAmxGroup, [&](int64_t s) {
                    if (fetch) PrefetchRows(w, n0 + kRowsAmxGroup, pc, kc, s, kc / 32);
                  });
          if (last)
            StoreTransposed(sums, y, n, ic + i, mc - i, n0, std::min(n_end, n) - n0, scales);
        }
      }
    }
  }
  _tile_release();
}

// The whole product on the thread pool, each thread a range of w's rows.
template <typename Out>
void GemmRowsAmx(ffi::ThreadPool& pool, const uint16_t* a, const Int4Columns& w, Out* y,
                 Scales scales, int64_t m, int64_t k) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t groups = (w.n + kRowsAmxGroup - 1) / kRowsAmxGroup;
  ParallelFor(pool, groups, (groups + threads - 1) / threads, [&](int64_t b, int64_t e) {
    GemmRowsBlockAmx(a, w, y, scales, m, k, b * kRowsAmxGroup,
                     std::min(w.n, e * kRowsAmxGroup));
  });
}
#endif  // GEMMA3N_AMX

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_AMX_ROWS_H_
