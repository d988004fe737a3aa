// How fast this CPU's AMX tiles multiply when fed as our kernels feed them
// (gemma3n/layers/kernels/gemm_amx.h, gemm_amx_rows.h): four float32 tiles of sums, two left
// tiles (16 rows x 32 bf16) and two right tiles (16 pairs x 16 columns) loaded per four
// `tdpbf16ps`, one thread. Linux only, a CPU with AMX-BF16, GCC 11+ or clang 12+:
//
//   g++ -O2 -o bench/results/amx_tile_loop bench/amx_tile_loop.cc && bench/results/amx_tile_loop
//
// Prints ns per tdpbf16ps and TFLOP/s a core for: the products alone (no loads); all operands
// in L1 (48 KB); the right tiles streamed from L2 (twelve 24 KB blocks in turn); and the same
// with the left tiles' rows 4 KB apart (rows of a [.., 2048] bf16 matrix read in place, which
// share one L1 set). Results: bench/README.md.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

constexpr long kSteps = 12;          // 32-value steps a block: 384 contracted values
constexpr long kBlocks = 12;         // right blocks streamed in turn: 288 KB, in L2
constexpr long kRightBlock = 2 * kSteps * 256;   // two right tiles a step, 256 pairs each

// Seconds for `reps` blocks of kSteps steps; `load` false: the products alone.
__attribute__((target("amx-tile,amx-bf16"))) double Run(const uint16_t* left, long lda,
                                                       const uint32_t* right, long right_blocks,
                                                       bool load, long reps) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
  alignas(64) float sums[4 * 256];
  auto start = std::chrono::steady_clock::now();
  for (long r = 0; r < reps; ++r) {
    const uint32_t* block = right + (r % right_blocks) * kRightBlock;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (long s = 0; s < kSteps; ++s) {
      if (load) {
        _tile_loadd(4, left + 32 * s, lda * 2);
        _tile_loadd(5, left + 16 * lda + 32 * s, lda * 2);
        _tile_loadd(6, block + s * 256, 64);
        _tile_loadd(7, block + kSteps * 256 + s * 256, 64);
      }
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, sums, 64); _tile_stored(1, sums + 256, 64);
    _tile_stored(2, sums + 512, 64); _tile_stored(3, sums + 768, 64);
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  _tile_release();
  return seconds;
}

void Report(const char* name, const uint16_t* left, long lda, const uint32_t* right,
            long right_blocks, bool load) {
  constexpr long kReps = 400000;
  Run(left, lda, right, right_blocks, load, kReps / 10);     // warm the caches
  double seconds = Run(left, lda, right, right_blocks, load, kReps);
  double products = double(kReps) * kSteps * 4;
  std::printf("%-44s %6.2f ns a tdpbf16ps, %5.2f TFLOP/s a core\n", name,
              seconds / products * 1e9, products * 16 * 16 * 32 * 2 / seconds / 1e12);
}

}  // namespace

int main() {
  constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) {
    std::printf("no AMX tiles for this process (CPU or kernel)\n");
    return 1;
  }
  constexpr long kPacked = 32 * kSteps, kInPlace = 2048;   // left row strides, bf16 values
  std::vector<uint16_t> left(32 * kInPlace, 0x3f80);       // 1.0 in bf16
  std::vector<uint32_t> right(kBlocks * kRightBlock, 0x3f803f80);
  Report("products alone", left.data(), kPacked, right.data(), 1, false);
  Report("operands in L1", left.data(), kPacked, right.data(), 1, true);
  Report("right tiles from L2", left.data(), kPacked, right.data(), kBlocks, true);
  Report("right tiles from L2, left rows 4 KB apart", left.data(), kInPlace, right.data(),
         kBlocks, true);
}
