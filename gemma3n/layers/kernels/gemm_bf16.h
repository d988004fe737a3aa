// bf16 x bf16 -> bf16 products of many rows (a prefill chunk, a training batch):
//   y[M, N] = a[M, K] · w[N, K]ᵀ   (kWeightRows: the forward product with a serving weight)
//   y[M, N] = a[M, K] · w[K, N]    (kWeightColumns: its gradients, dy · w and dyᵀ · x)
// on AVX-512 BF16 `vdpbf16ps`. XLA's CPU products (YNNPACK) run these shapes at ~300 GFLOP/s
// on a 2-core Zen 4 where torch's run ~390: the difference is most of a LoRA step.
//
// The classic blocked scheme (Goto & van de Geijn): a block of w (kGemmKc contracted values x
// up to kGemmNc columns) is packed into panels of kGemmNr columns, each k pair of a column one
// 32-bit lane, as vdpbf16ps reads it (gemm_pack.h); a block of a (kGemmMc rows) into panels of
// kGemmMr rows.
// A register tile of kGemmMr x kGemmNr float32 sums (24 of the 32 registers) then takes one
// broadcast of a's pair per row and three loads of w's panel per k pair: 24 vdpbf16ps to 11
// loads. With its operands in L1 the tile runs at the instruction's peak (~220 GFLOP/s a core
// measured, as a loop of vdpbf16ps alone); a whole product, blocks and packing included, at
// ~175-205 a core.
// Packing also pads: an odd K gets a zero pair half, the last panels zero rows and columns,
// so the tile needs no edge cases but its masked stores.
// Sums: float32, k in pairs in order within a block, blocks added in order, the total rounded to
// bfloat16 once; vdpbf16ps treats denormal inputs as zero and flushes denormal results (float32
// values below 1.2e-38).
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_GEMM_BF16_H_
#define GEMMA3N_KERNELS_GEMM_BF16_H_

#include <type_traits>

#include "gemm_few_rows.h"
#include "gemm_pack.h"

namespace gemma3n_kernels {

// Tile and block sizes, picked on a Zen 4 (one thread, E4B's FFN and head shapes): 8 x 48
// (24 accumulators, 3 panel loads and 8 broadcasts per k pair) ran ~5% faster than 12 x 32,
// 14 x 32 or 6 x 64; a w block of 768 columns (576 KB) that stays in the 1 MB L2 ran faster
// than 1536 or more.
constexpr int kGemmMr = 8;
constexpr int kGemmNr = 48;
constexpr int64_t kGemmMc = 24 * kGemmMr;
constexpr int64_t kGemmNc = 16 * kGemmNr;
static_assert(kGemmNr % 16 == 0 && kGemmMr <= 16,
              "a tile is whole vectors wide, a panel 16 rows at most");
// Columns a thread takes at least; fewer threads then split the rows instead (a narrow output,
// e.g. dx of an attention projection, would repack all of a for every few columns).
constexpr int64_t kGemmMinThreadColumns = 8 * kGemmNr;

enum WeightLayout : int32_t { kWeightRows = 0, kWeightColumns = 1 };

#ifdef GEMMA3N_X86
// a's rows [m0, m0 + mc) (those past m: 0) and contracted values [k0, k0 + kc) as panels of
// kGemmMr rows, each [kc / 2][kGemmMr] pairs (a value past k: 0).
AVX512_TARGET inline void PackRowsPanel(const uint16_t* a, int64_t m, int64_t k, int64_t m0,
                                        int64_t mc, int64_t k0, int64_t kc, uint32_t* out) {
  int64_t pairs = (kc + 1) / 2;
  for (int64_t p0 = 0; p0 < mc; p0 += kGemmMr, out += pairs * kGemmMr) {
    int rows = static_cast<int>(std::clamp<int64_t>(m - m0 - p0, 0, kGemmMr));
    PackPanel(a, k, m0 + p0, rows, kGemmMr, k0 / 2, pairs, out);
  }
}

// The right operand of a bf16 product, w [N, K] (kWeightRows: column j is w's row j) or [K, N]
// (kWeightColumns). The many-row kernel is a template over its right operand, which packs
// itself (gemm_quantized.h has two more).
struct Bf16Columns {
  const uint16_t* w;
  WeightLayout layout;
  int64_t n, k;
  AVX512_TARGET void Pack(int64_t n0, int64_t nc, int64_t k0, int64_t kc, uint32_t* out) const;
};

// Columns [n0, n0 + nc) of the product's right operand, contracted values [k0, k0 + kc), as
// panels of kGemmNr columns, each [kc / 2][kGemmNr] pairs; columns past n and values past k
// are 0.
AVX512_TARGET inline void Bf16Columns::Pack(int64_t n0, int64_t nc, int64_t k0, int64_t kc,
                                            uint32_t* out) const {
  int64_t pairs = (kc + 1) / 2;
  for (int64_t p0 = 0; p0 < nc; p0 += kGemmNr, out += pairs * kGemmNr) {
    int cols = static_cast<int>(std::clamp<int64_t>(n - n0 - p0, 0, kGemmNr));
    if (layout == kWeightRows) {
      PackPanel(w, k, n0 + p0, cols, kGemmNr, k0 / 2, pairs, out);
      continue;
    }
    if (cols < kGemmNr) std::fill(out, out + pairs * kGemmNr, 0u);
    // Rows 2q and 2q + 1 of w interleaved, 16 columns at a time (a row past k: zeros).
    for (int64_t q = 0; q < pairs; ++q) {
      const uint16_t* lo = w + (k0 + 2 * q) * n + n0 + p0;
      bool whole = k0 + 2 * q + 1 < k;
      for (int j = 0; j < cols; j += 16) {
        __mmask16 mask = static_cast<__mmask16>(cols - j >= 16 ? 0xffff : (1u << (cols - j)) - 1);
        __m512i even = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, lo + j));
        __m512i odd = _mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(whole ? mask : 0, lo + n + j));
        _mm512_mask_storeu_epi32(out + q * kGemmNr + j, mask,
                                 _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
      }
    }
  }
}

// Scales of the product's rows [M] and columns [N], each nullptr when there are none.
struct Scales {
  const float* row = nullptr;
  const float* col = nullptr;
};

// Where a tile's sums go. A product of more than one block of k keeps its sums in float32 in
// `partial` (row stride ld_partial) until the last block, which adds its own to them and stores
// the total into y (row stride ldy), times its column's scale, then its row's, where given (a
// float32 product each): as float32, or (Out = uint16_t) rounded to bfloat16, as XLA rounds a
// bfloat16 product; y is nullptr before the last block. Rounding here, not in XLA after the
// call: XLA's CPU conversion of float32 to bfloat16 ran at ~2.3 ns a value (161 ms for a
// [256, 262144] chunk of logits) and twice the bytes went through memory.
template <typename Out>
struct TileOut {
  float* partial;
  int64_t ld_partial;
  Out* y;
  int64_t ldy;
  bool first;  // the product's first block of k: nothing in `partial` yet
  Scales scales;  // from the tile's first row and column
};

// The `rows` x `cols` tile (at most kGemmMr x kGemmNr) of a panel · w panel over `pairs` k
// pairs, to `out`.
template <typename Out>
AVX512_TARGET inline void GemmTileAvx512(const uint32_t* a, const uint32_t* w, int64_t pairs,
                                         const TileOut<Out>& out, int rows, int cols) {
  constexpr int kVectors = kGemmNr / 16;
  __m512 acc[kGemmMr][kVectors];
  UNROLL
  for (int i = 0; i < kGemmMr; ++i)
    UNROLL
    for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q, a += kGemmMr, w += kGemmNr) {
    __m512bh wv[kVectors];
    UNROLL
    for (int v = 0; v < kVectors; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(w + 16 * v);
    UNROLL
    for (int i = 0; i < kGemmMr; ++i) {
      __m512bh ai = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i]));
      UNROLL
      for (int v = 0; v < kVectors; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, wv[v]);
    }
  }
  __mmask16 masks[kVectors];
  UNROLL
  for (int v = 0; v < kVectors; ++v) {
    int left = std::clamp(cols - 16 * v, 0, 16);
    masks[v] = static_cast<__mmask16>((1u << left) - 1);
  }
  UNROLL
  for (int i = 0; i < kGemmMr; ++i) {
    if (i >= rows) break;
    float* partial = out.partial + i * out.ld_partial;
    UNROLL
    for (int v = 0; v < kVectors; ++v) {
      __m512 sum = acc[i][v];
      if (!out.first) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(masks[v], partial + 16 * v));
      if (out.y != nullptr && out.scales.col != nullptr)
        sum = _mm512_mul_ps(sum, _mm512_maskz_loadu_ps(masks[v], out.scales.col + 16 * v));
      if (out.y != nullptr && out.scales.row != nullptr)
        sum = _mm512_mul_ps(sum, _mm512_set1_ps(out.scales.row[i]));
      if (out.y == nullptr) {
        _mm512_mask_storeu_ps(partial + 16 * v, masks[v], sum);
      } else if constexpr (std::is_same_v<Out, float>) {
        _mm512_mask_storeu_ps(out.y + i * out.ldy + 16 * v, masks[v], sum);
      } else {
        // vcvtneps2bf16: to nearest, ties to even (XLA's rounding; denormals flush to zero).
        __m256i rounded = (__m256i)_mm512_cvtneps_pbh(sum);
        _mm256_mask_storeu_epi16(out.y + i * out.ldy + 16 * v, masks[v], rounded);
      }
    }
  }
}

// Columns [c0, c1) of y[M, N] = a[M, K] · w (an operand packing itself as Bf16Columns does),
// scaled as TileOut says, rows [r0, r1), on this thread.
template <typename Columns, typename Out>
AVX512_TARGET inline void GemmBlock(const uint16_t* a, const Columns& w, Out* y, Scales scales,
                                    int64_t m, int64_t k, int64_t n, int64_t r0, int64_t r1,
                                    int64_t c0, int64_t c1) {
  int64_t kc_max = std::min(kGemmKc, k + (k & 1));
  std::vector<uint32_t> wp(kGemmNc * kc_max / 2), ap(kGemmMc * kc_max / 2);
  // The float32 sums of a column block, every row of this thread, between blocks of k.
  std::vector<float> partial(k > kGemmKc ? (r1 - r0) * kGemmNc : 0);
  for (int64_t jc = c0; jc < c1; jc += kGemmNc) {
    int64_t nc = std::min(kGemmNc, c1 - jc);
    for (int64_t pc = 0; pc < k; pc += kGemmKc) {
      int64_t kc = std::min(kGemmKc, k - pc), pairs = (kc + 1) / 2;
      int64_t panels = (nc + kGemmNr - 1) / kGemmNr;
      bool last = pc + kGemmKc >= k;
      w.Pack(jc, panels * kGemmNr, pc, kc, wp.data());
      for (int64_t ic = r0; ic < r1; ic += kGemmMc) {
        int64_t mc = std::min(kGemmMc, r1 - ic);
        int64_t row_panels = (mc + kGemmMr - 1) / kGemmMr;
        PackRowsPanel(a, std::min(m, r1), k, ic, row_panels * kGemmMr, pc, kc, ap.data());
        // One a panel (6 KB) stays in L1 while the block's w panels stream from L2: 3-8%
        // faster than the other way round (a w panel, 36 KB, does not fit L1).
        for (int64_t ip = 0; ip < row_panels; ++ip) {
          int64_t row = ic + ip * kGemmMr;
          int rows = static_cast<int>(std::min<int64_t>(kGemmMr, mc - ip * kGemmMr));
          for (int64_t jp = 0; jp < panels; ++jp) {
            int64_t col = jc + jp * kGemmNr;
            int cols = static_cast<int>(std::min<int64_t>(kGemmNr, nc - jp * kGemmNr));
            TileOut<Out> out{
                partial.empty() ? nullptr : partial.data() + (row - r0) * kGemmNc + (col - jc),
                kGemmNc, last ? y + row * n + col : nullptr, n, pc == 0,
                Scales{scales.row == nullptr ? nullptr : scales.row + row,
                       scales.col == nullptr ? nullptr : scales.col + col}};
            GemmTileAvx512(ap.data() + ip * pairs * kGemmMr, wp.data() + jp * pairs * kGemmNr,
                           pairs, out, rows, cols);
          }
        }
      }
    }
  }
}

// The whole product on the thread pool: each thread a contiguous range of columns, or of rows
// when the columns are too few to share.
template <typename Columns, typename Out>
void GemmAvx512(ffi::ThreadPool& pool, const uint16_t* a, const Columns& w, Out* y,
                Scales scales, int64_t m, int64_t k, int64_t n) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (n >= threads * kGemmMinThreadColumns) {
    int64_t panels = (n + kGemmNr - 1) / kGemmNr;
    ParallelFor(pool, panels, (panels + threads - 1) / threads, [&](int64_t b, int64_t e) {
      GemmBlock(a, w, y, scales, m, k, n, 0, m, b * kGemmNr, std::min(n, e * kGemmNr));
    });
  } else {
    int64_t panels = (m + kGemmMr - 1) / kGemmMr;
    ParallelFor(pool, panels, (panels + threads - 1) / threads, [&](int64_t b, int64_t e) {
      GemmBlock(a, w, y, scales, m, k, n, b * kGemmMr, std::min(m, e * kGemmMr), 0, n);
    });
  }
}
#endif  // GEMMA3N_X86

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_BF16_H_
