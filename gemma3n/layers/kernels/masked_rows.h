// A sparse FFN's products for many tokens at once (a prefill chunk, a training batch), computing
// only the units each token keeps: those where `mask` [T, F] is nonzero (the gate after its
// gaussian top-k, ~5% of the units in E4B's sparse layers). w is bf16 stored rows first [F, D].
//   MaskedRowsDot: y[t, f] = x[t] · w[f] where mask[t, f] != 0, else 0   (y [T, F] bf16, each
//     float32 sum rounded as XLA rounds a bf16 product)
//     (the up projection; the down projection's gradient in its input)
//   MaskedRowsSum: y[t] = sum over f with mask[t, f] != 0 of h[t, f] · w[f]   (y [T, D] float32)
//     (the down projection; the up projection's gradient in its input)
// Each token's kept units differ, so a dense product's register tiles do not apply; what makes
// these fast is the cache: w is walked in blocks of kMaskedBlock rows (512 KB at D = 2048, in
// L2, the next one prefetched meanwhile), and every token's kept rows of a block are taken
// while it is there, so w streams from memory once per thread instead of once per token. Sums
// are float32 (bf16 products exact), in another order than a dense product's. AVX-512 BF16
// only (elsewhere the dense products).
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_MASKED_ROWS_H_
#define GEMMA3N_KERNELS_MASKED_ROWS_H_

#include <type_traits>
#include <vector>

#include "common.h"
#include "rows.h"

namespace gemma3n_kernels {

constexpr int64_t kMaskedBlock = 128;
// Values a kernel step reads of a row: D must be a multiple of it.
constexpr int64_t kMaskedLane = 32;
// Tokens a pass takes (more go in several passes): the dot's x rows (2 MB at D = 2048) and the
// sum's float32 y rows stay in cache while w's blocks pass. Measured at E4B's widths, 2048
// tokens in one pass took 1.4x (dot) and 1.3x (sum) the time of 4 passes of 512.
constexpr int64_t kMaskedTokens = 512;
// Columns of y MaskedRowsSum keeps in registers at once (8 float32 vectors).
constexpr int64_t kMaskedSumColumns = 128;

// The units each token keeps, grouped by blocks of kMaskedBlock rows of w: token t's ids in block
// b are ids[start(t, b) .. start(t, b + 1)), increasing.
struct KeptUnits {
  int64_t blocks = 0;
  std::vector<int64_t> starts;  // [T * (blocks + 1)]
  std::vector<int32_t> ids;

  int64_t start(int64_t t, int64_t b) const { return starts[t * (blocks + 1) + b]; }
};

// A bf16 value is nonzero unless its bits are +0 or -0 (jnp's `!= 0`).
inline bool NonzeroBf16(uint16_t v) { return (v & 0x7fff) != 0; }

#ifdef GEMMA3N_X86
// Bit i: mask[i] != 0, for the 32 values at mask.
AVX512_TARGET inline uint32_t NonzeroBits(const uint16_t* mask) {
  __m512i v = _mm512_and_si512(_mm512_loadu_si512(mask), _mm512_set1_epi16(0x7fff));
  return _mm512_test_epi16_mask(v, v);
}

// Token by token, in parallel: counts, then (into their places) the ids and block starts.
AVX512_TARGET inline KeptUnits FindKept(ffi::ThreadPool& pool, const uint16_t* mask, int64_t t_size,
                                        int64_t f) {
  KeptUnits kept;
  kept.blocks = (f + kMaskedBlock - 1) / kMaskedBlock;
  std::vector<int64_t> counts(t_size + 1, 0);
  ParallelFor(pool, t_size, Grain(f * 2), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int64_t n = 0;
      for (int64_t c = 0; c < f; c += kMaskedLane)
        n += __builtin_popcount(NonzeroBits(mask + t * f + c));
      counts[t + 1] = n;
    }
  });
  for (int64_t t = 0; t < t_size; ++t) counts[t + 1] += counts[t];
  kept.ids.resize(counts[t_size]);
  kept.starts.resize(t_size * (kept.blocks + 1));
  ParallelFor(pool, t_size, Grain(f * 2), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int64_t at = counts[t];
      int64_t* starts = kept.starts.data() + t * (kept.blocks + 1);
      for (int64_t c = 0; c < f; c += kMaskedLane) {
        if (c % kMaskedBlock == 0) starts[c / kMaskedBlock] = at;
        for (uint32_t bits = NonzeroBits(mask + t * f + c); bits; bits &= bits - 1)
          kept.ids[at++] = static_cast<int32_t>(c + __builtin_ctz(bits));
      }
      starts[kept.blocks] = at;
    }
  });
  return kept;
}

// Prefetches part `part` of `parts` of block b's rows of w (rows first, d values each) into L2:
// a block's every row is read by some token (1 - 0.95^T of them), so the next block is
// streamed in while this one is used, a slice per token.
inline void PrefetchBlockPart(const uint16_t* w, int64_t f, int64_t d, int64_t b, int64_t part,
                              int64_t parts) {
  int64_t first = b * kMaskedBlock * d, last = std::min(f, (b + 1) * kMaskedBlock) * d;
  if (first >= last) return;
  int64_t bytes = (last - first) * 2, lo = bytes * part / parts, hi = bytes * (part + 1) / parts;
  const char* base = reinterpret_cast<const char*>(w + first);
  for (int64_t at = lo / kCacheLine * kCacheLine; at < hi; at += kCacheLine)
    _mm_prefetch(base + at, _MM_HINT_T1);
}

// x · w(ids[i]) for the R <= 4 ids ids[0..R), over d values (a multiple of 2 * kMaskedLane):
// one load of x serves every row.
template <int R>
AVX512_TARGET inline void DotRowsBf16(const uint16_t* x, const uint16_t* w, const int32_t* ids,
                                      int64_t d, float* out) {
  __m512 acc[R][2];
  const uint16_t* rows[R];
  UNROLL
  for (int r = 0; r < R; ++r) {
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    rows[r] = w + int64_t{ids[r]} * d;
  }
  for (int64_t i = 0; i < d; i += 2 * kMaskedLane) {
    __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + i);
    __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + i + kMaskedLane);
    UNROLL
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x0, (__m512bh)_mm512_loadu_si512(rows[r] + i));
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x1,
                                   (__m512bh)_mm512_loadu_si512(rows[r] + i + kMaskedLane));
    }
  }
  UNROLL
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
}

// y [T, F] bf16 (zeroed by the caller) at the kept units of blocks [begin, end), every token.
AVX512_TARGET inline void MaskedDotAvx512(const KeptUnits& kept, const uint16_t* x,
                                          const uint16_t* w, uint16_t* y, int64_t t_size,
                                          int64_t f, int64_t d, int64_t begin, int64_t end) {
  float sums[4];
  for (int64_t b = begin; b < end; ++b)
    for (int64_t t = 0; t < t_size; ++t) {
      if (b + 1 < end) PrefetchBlockPart(w, f, d, b + 1, t, t_size);
      const int32_t* ids = kept.ids.data();
      int64_t i = kept.start(t, b), stop = kept.start(t, b + 1);
      for (; i + 4 <= stop; i += 4) {
        DotRowsBf16<4>(x + t * d, w, ids + i, d, sums);
        for (int r = 0; r < 4; ++r) y[t * f + ids[i + r]] = F32ToBf16(sums[r]);
      }
      for (; i < stop; ++i) {
        DotRowsBf16<1>(x + t * d, w, ids + i, d, sums);
        y[t * f + ids[i]] = F32ToBf16(sums[0]);
      }
    }
}

// Columns [col, col + kMaskedSumColumns) of y[t] (float32, in the interleaved order of
// StripColumn, accumulated in place) plus the kept rows ids[i0, i1) of w times h[t]'s values
// there (ht: h's row t). Two rows at a time: their values interleaved (vpunpck[lh]wd) times the
// pair of their h values (vdpbf16ps); an odd count's last row pairs with itself times zero.
AVX512_TARGET inline void AddRowsAvx512(const KeptUnits& kept, int64_t i0, int64_t i1,
                                        const uint16_t* ht, const uint16_t* w, float* yt,
                                        int64_t d, int64_t col) {
  constexpr int kVectors = kMaskedSumColumns / 16;
  __m512 acc[kVectors];
  UNROLL
  for (int v = 0; v < kVectors; ++v) acc[v] = _mm512_loadu_ps(yt + col + 16 * v);
  for (int64_t i = i0; i < i1; i += 2) {
    int32_t u0 = kept.ids[i], u1 = i + 1 < i1 ? kept.ids[i + 1] : u0;
    uint32_t pair = ht[u0] | (i + 1 < i1 ? uint32_t{ht[u1]} << 16 : 0u);
    __m512bh h2 = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
    const uint16_t* r0 = w + int64_t{u0} * d + col;
    const uint16_t* r1 = w + int64_t{u1} * d + col;
    UNROLL
    for (int v = 0; v < kVectors; v += 2) {
      __m512i a = _mm512_loadu_si512(r0 + 16 * v), c = _mm512_loadu_si512(r1 + 16 * v);
      acc[v] = _mm512_dpbf16_ps(acc[v], (__m512bh)_mm512_unpacklo_epi16(a, c), h2);
      acc[v + 1] = _mm512_dpbf16_ps(acc[v + 1], (__m512bh)_mm512_unpackhi_epi16(a, c), h2);
    }
  }
  UNROLL
  for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(yt + col + 16 * v, acc[v]);
}

// Rows [begin, end) of y [T, D] float32 (zeroed by the caller): their tokens' kept rows of w,
// block by block, so that a block serves them all from L2; then each 32 columns put back in
// order from AddRowsAvx512's.
AVX512_TARGET inline void MaskedSumAvx512(const KeptUnits& kept, const uint16_t* h,
                                          const uint16_t* w, float* y, int64_t f, int64_t d,
                                          int64_t begin, int64_t end) {
  for (int64_t b = 0; b < kept.blocks; ++b)
    for (int64_t t = begin; t < end; ++t) {
      if (b + 1 < kept.blocks) PrefetchBlockPart(w, f, d, b + 1, t - begin, end - begin);
      int64_t i0 = kept.start(t, b), i1 = kept.start(t, b + 1);
      if (i0 == i1) continue;
      for (int64_t col = 0; col < d; col += kMaskedSumColumns)
        AddRowsAvx512(kept, i0, i1, h + t * f, w, y + t * d, d, col);
    }
  float strip[2 * 16];
  for (int64_t t = begin; t < end; ++t)
    for (int64_t col = 0; col < d; col += 32) {
      std::copy_n(y + t * d + col, 32, strip);
      for (int v = 0; v < 2; ++v)
        for (int l = 0; l < 16; ++l) y[t * d + col + StripColumn(v, l)] = strip[16 * v + l];
    }
}
#endif  // GEMMA3N_X86

// Checks a [T, A] operand, w [F, D], mask [T, F] and y [T, Y] for the masked kernels, where the
// operand's A and y's Y are D and F (dot) or F and D (sum).
inline ffi::Error CheckMasked(ffi::AnyBuffer::Dimensions ad, ffi::AnyBuffer::Dimensions wd,
                              ffi::AnyBuffer::Dimensions md, ffi::AnyBuffer::Dimensions yd,
                              bool sum) {
  if (ad.size() != 2 || wd.size() != 2 || md.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("the masked-rows kernels take 2-D operands");
  int64_t t = md[0], f = wd[0], d = wd[1];
  if (md[1] != f || ad[0] != t || yd[0] != t || ad[1] != (sum ? f : d) || yd[1] != (sum ? d : f))
    return ffi::Error::InvalidArgument("masked-rows kernel operand shapes do not match");
  if (d % kMaskedSumColumns != 0 || f % kMaskedLane != 0)
    return ffi::Error::InvalidArgument(
        "the masked-rows kernels take D a multiple of 128 and F of 32");
  return ffi::Error::Success();
}

// y: MaskedRowsDot's bf16 or MaskedRowsSum's float32, which says which one this is.
template <typename Y>
ffi::Error MaskedRowsImpl(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16>& a,
                          ffi::Buffer<ffi::BF16>& w, ffi::Buffer<ffi::BF16>& mask, Y& y) {
  constexpr bool sum = std::is_same_v<Y, ffi::ResultBuffer<ffi::F32>>;
  if (auto e = CheckMasked(a.dimensions(), w.dimensions(), mask.dimensions(), y->dimensions(),
                           sum);
      e.failure())
    return e;
  int64_t t = mask.dimensions()[0], f = w.dimensions()[0], d = w.dimensions()[1];
#ifdef GEMMA3N_X86
  if (BestIsa() == kAvx512) {
    const auto* ap = reinterpret_cast<const uint16_t*>(a.typed_data());
    const auto* wp = reinterpret_cast<const uint16_t*>(w.typed_data());
    const auto* mp = reinterpret_cast<const uint16_t*>(mask.typed_data());
    int64_t a_cols = sum ? f : d, y_cols = sum ? d : f;
    // Passes of kMaskedTokens tokens, each walking all of w.
    for (int64_t t0 = 0; t0 < t; t0 += kMaskedTokens) {
      int64_t tn = std::min(kMaskedTokens, t - t0);
      KeptUnits kept = FindKept(pool, mp + t0 * f, tn, f);
      const uint16_t* at = ap + t0 * a_cols;
      if constexpr (sum) {
        float* yp = y->typed_data() + t0 * y_cols;
        std::fill(yp, yp + tn * d, 0.0f);
        // A thread's tokens each: w is streamed once per thread.
        int64_t threads = std::max<int64_t>(1, pool.num_threads());
        ParallelFor(pool, tn, (tn + threads - 1) / threads, [&](int64_t b, int64_t e) {
          MaskedSumAvx512(kept, at, wp, yp, f, d, b, e);
        });
      } else {
        auto* yp = reinterpret_cast<uint16_t*>(y->typed_data()) + t0 * y_cols;
        ParallelFor(pool, tn, Grain(f * 2), [&](int64_t b, int64_t e) {
          std::fill(yp + b * f, yp + e * f, uint16_t{0});
        });
        ParallelFor(pool, kept.blocks, 1, [&](int64_t b, int64_t e) {
          MaskedDotAvx512(kept, at, wp, yp, tn, f, d, b, e);
        });
      }
    }
    return ffi::Error::Success();
  }
#endif
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "the masked-rows kernels need AVX-512 BF16");
}

// The kernels' operands: x (or h), w, the mask (the result is each handler's own).
inline auto MaskedRowsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::BF16>>()
      .Arg<ffi::Buffer<ffi::BF16>>();
}

inline ffi::Error MaskedRowsDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                                    ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::BF16> mask,
                                    ffi::ResultBuffer<ffi::BF16> y) {
  return MaskedRowsImpl(pool, x, w, mask, y);
}

inline ffi::Error MaskedRowsSumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> h,
                                    ffi::Buffer<ffi::BF16> w, ffi::Buffer<ffi::BF16> mask,
                                    ffi::ResultBuffer<ffi::F32> y) {
  return MaskedRowsImpl(pool, h, w, mask, y);
}

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_MASKED_ROWS_H_
