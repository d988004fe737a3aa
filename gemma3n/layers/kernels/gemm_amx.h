// bf16 products of many rows on AMX tiles (Intel Xeon since Sapphire Rapids):
//   y[M, N] = a[M, K] · w, w [N, K] transposed or [K, N], as gemm_bf16.h computes them.
// A header of the one translation unit decode_kernels.cc.
//
// A block of w (kAmxKc contracted values x kAmxNc columns) is packed by gemm_bf16.h's
// Bf16Columns::Pack into panels of kGemmNr columns, pairs of contracted values as 32-bit lanes,
// which is the layout `tdpbf16ps` reads its right operand in: a tile of 16 pairs x 16 columns is
// a 64-byte slice of 16 consecutive panel rows. The left tiles, 16 rows x 32 values, are read
// from a in place. Each step loads two left and two right tiles and accumulates four 16 x 16
// float32 tiles, the whole register file (8 tiles); the sums of a block of kAmxMc rows wait in
// a float32 buffer between blocks of k.
//
// Measured on a 2-core Xeon with AMX against XLA's products (which use AMX too, through
// YNNPACK): see gemma3n/layers/gemm.py.

#ifndef GEMMA3N_KERNELS_GEMM_AMX_H_
#define GEMMA3N_KERNELS_GEMM_AMX_H_

#include <sys/syscall.h>
#include <unistd.h>

#include "gemm_bf16.h"

namespace gemma3n_kernels {

constexpr int kAmxTile = 16;                    // rows of a tile; pairs of a right tile
constexpr int64_t kAmxKc = 384;                 // contracted values a block (12 steps of 32)
constexpr int64_t kAmxNc = 8 * kGemmNr;         // columns a block: 24 right tiles
// Rows a block: its float32 sums (768 KB) and the packed w block (288 KB) fit L2 (2 MB).
constexpr int64_t kAmxMc = 512;
// One left tile: padded to two, 16 rows (a rank-16 LoRA factor's weight gradient, [16, 512] by
// [512, 16384]) still ran 1.6x faster than on the AVX-512 kernel.
constexpr int64_t kAmxMinRows = 16;
static_assert(kAmxKc % 32 == 0 && kAmxNc % (2 * kAmxTile) == 0 && kGemmNr % kAmxTile == 0 &&
                  kAmxMc % (2 * kAmxTile) == 0,
              "blocks of whole tiles");

// A compiler without the AMX intrinsics (GCC before 11, clang before 12) builds the rest.
#if defined(GEMMA3N_X86) && (__has_include(<amxtileintrin.h>) || __has_include(<amxintrin.h>))
#define GEMMA3N_AMX 1
#endif

// Whether this process may use the tile registers: Linux hands them out on request only
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA), once per process.
inline bool AmxUsable() {
#if defined(GEMMA3N_AMX) && defined(__linux__)
  static const bool usable = [] {
    constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
    return HasAmxBf16() && syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

#ifdef GEMMA3N_AMX
#define AMX_TARGET                                                                            \
  __attribute__((target(                                                                     \
      "amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,avx2,fma,f16c")))

// ldtilecfg's 64-byte operand: palette 1, every tile 16 rows of 64 bytes.
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Both kernels' tile configuration: eight tiles of 16 rows x 64 bytes, for this thread.
AMX_TARGET inline void LoadTileConfig() {
  AmxConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = kAmxTile;
  _tile_loadconfig(&config);
}

// Four 16 x 16 float32 tiles of sums (rows r, r + 16 of the left operand; columns of right
// tiles t0 and t1) over a block of `steps` x 32 contracted values: tiles 0-3 the sums, 4-5 the
// left tiles, 6-7 the right ones. `left` is the block's left rows (row stride `lda` bf16),
// `tile0`/`tile1` the right tiles' first pairs in packed panels of `right_ld` pairs a row, the
// sums start from `from` (nullptr: zero) and go to `to` (row stride ldc floats, both);
// before_step(s) runs before step s (gemm_amx_rows.h prefetches there). Shared by both AMX
// kernels.
template <typename BeforeStep>
AMX_TARGET inline void AmxQuad(const uint16_t* left, int64_t lda, const uint32_t* tile0,
                               const uint32_t* tile1, int64_t right_ld, int64_t steps,
                               const float* from, float* to, int64_t ldc,
                               const BeforeStep& before_step) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4, w_stride = right_ld * 4;
  if (from == nullptr) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  } else {
    _tile_loadd(0, from, c_stride);
    _tile_loadd(1, from + kAmxTile, c_stride);
    _tile_loadd(2, from + kAmxTile * ldc, c_stride);
    _tile_loadd(3, from + kAmxTile * ldc + kAmxTile, c_stride);
  }
  for (int64_t s = 0; s < steps; ++s) {
    before_step(s);
    _tile_loadd(4, left + 32 * s, a_stride);
    _tile_loadd(5, left + kAmxTile * lda + 32 * s, a_stride);
    _tile_loadd(6, tile0 + kAmxTile * right_ld * s, w_stride);
    _tile_loadd(7, tile1 + kAmxTile * right_ld * s, w_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, to, c_stride);
  _tile_stored(1, to + kAmxTile, c_stride);
  _tile_stored(2, to + kAmxTile * ldc, c_stride);
  _tile_stored(3, to + kAmxTile * ldc + kAmxTile, c_stride);
}

// Columns [c0, c1) of y[M, N] = a[M, K] · w, rows [r0, r1), on this thread; K a multiple of 32.
// The left tiles are read from a in place (its rows are whole steps), the last rows, if fewer
// than two tiles, from a zero-padded copy. (A copy of each block of a, rows apart by a
// non-power-of-two stride, ran 1.1-2x slower at 512 rows: the three blocks overflow L2.)
AMX_TARGET inline void GemmBlockAmx(const uint16_t* a, const Bf16Columns& w, uint16_t* y,
                                    int64_t k, int64_t n, int64_t r0, int64_t r1, int64_t c0,
                                    int64_t c1) {
  LoadTileConfig();
  constexpr int64_t kGroup = 2 * kAmxTile, kPanelTiles = kGemmNr / kAmxTile;
  const int64_t rows = r1 - r0, whole = rows / kGroup * kGroup;
  const int64_t padded = (rows + kGroup - 1) / kGroup * kGroup;
  std::vector<uint16_t> tail(whole < rows ? kGroup * k : 0, 0);
  for (int64_t i = whole; i < rows; ++i)
    std::memcpy(tail.data() + (i - whole) * k, a + (r0 + i) * k, k * 2);
  std::vector<uint32_t> wp(kAmxNc * kAmxKc / 2);
  std::vector<float> sums(std::min(padded, kAmxMc) * kAmxNc);
  for (int64_t jc = c0; jc < c1; jc += kAmxNc) {
    const int64_t nc = std::min(kAmxNc, c1 - jc);
    const int64_t panels = (nc + kGemmNr - 1) / kGemmNr, tiles = (nc + kAmxTile - 1) / kAmxTile;
    for (int64_t ic = 0; ic < padded; ic += kAmxMc) {
      const int64_t mc = std::min(kAmxMc, padded - ic);
      for (int64_t pc = 0; pc < k; pc += kAmxKc) {
        const int64_t kc = std::min(kAmxKc, k - pc), pairs = kc / 2;
        w.Pack(jc, panels * kGemmNr, pc, kc, wp.data());
        // A right tile t: panel t / 3, its columns (t % 3) * 16 on.
        auto right = [&](int64_t t) {
          return wp.data() + (t / kPanelTiles) * pairs * kGemmNr + (t % kPanelTiles) * kAmxTile;
        };
        // Two left tiles stay in L1 while the block's right tiles stream from L2.
        for (int64_t i = 0; i < mc; i += kGroup) {
          const uint16_t* left = ic + i < whole ? a + (r0 + ic + i) * k + pc : tail.data() + pc;
          for (int64_t t = 0; t < tiles; t += 2) {
            float* block_sums = sums.data() + i * kAmxNc + t * kAmxTile;
            AmxQuad(left, k, right(t), right(t + 1), kGemmNr, kc / 32,
                    pc == 0 ? nullptr : block_sums, block_sums, kAmxNc, [](int64_t) {});
          }
        }
      }
      // Rounded to bfloat16 (vcvtneps2bf16: to nearest, ties to even, as XLA converts).
      for (int64_t i = 0; i < std::min(mc, rows - ic); ++i)
        for (int64_t j = 0; j < nc; j += 16) {
          __mmask16 mask = static_cast<__mmask16>(nc - j >= 16 ? 0xffff : (1u << (nc - j)) - 1);
          __m512 sum = _mm512_loadu_ps(sums.data() + i * kAmxNc + j);
          _mm256_mask_storeu_epi16(y + (r0 + ic + i) * n + jc + j, mask,
                                   (__m256i)_mm512_cvtneps_pbh(sum));
        }
    }
  }
  _tile_release();
}

// The whole product on the thread pool: each thread a range of columns, or of rows when the
// columns are too few to share (as GemmAvx512).
inline void GemmAmx(ffi::ThreadPool& pool, const uint16_t* a, const Bf16Columns& w, uint16_t* y,
                    int64_t m, int64_t k, int64_t n) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (n >= threads * kAmxNc) {
    int64_t blocks = (n + kAmxNc - 1) / kAmxNc;
    ParallelFor(pool, blocks, (blocks + threads - 1) / threads, [&](int64_t b, int64_t e) {
      GemmBlockAmx(a, w, y, k, n, 0, m, b * kAmxNc, std::min(n, e * kAmxNc));
    });
  } else {
    int64_t groups = (m + 2 * kAmxTile - 1) / (2 * kAmxTile);
    ParallelFor(pool, groups, (groups + threads - 1) / threads, [&](int64_t b, int64_t e) {
      GemmBlockAmx(a, w, y, k, n, b * 2 * kAmxTile, std::min(m, e * 2 * kAmxTile), 0, n);
    });
  }
}
#endif  // GEMMA3N_AMX

}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_GEMM_AMX_H_
