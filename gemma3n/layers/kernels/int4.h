// s8 x int4 -> f32 kernels: int4 weights in groups of kInt4Group along K, one f16 scale each.
// A header of the one translation unit decode_kernels.cc.

#ifndef GEMMA3N_KERNELS_INT4_H_
#define GEMMA3N_KERNELS_INT4_H_

#include "common.h"

namespace gemma3n_kernels {

constexpr int64_t kInt4Group = 32;
constexpr int kInt4Offset = 8;
// The vector int4 kernels take a row kInt4ChunkGroups groups (64 bytes) at a time: one
// AVX-512 register, whose kInt4Lanes int32 lanes of vpdpbusd each sum 8 products of a group.
constexpr int64_t kInt4ChunkGroups = 4;
constexpr int64_t kInt4Chunk = kInt4ChunkGroups * kInt4Group;
constexpr int64_t kInt4Lanes = 16;
// AVX-512 converts the float16 scales of this many chunks (16 groups) with one instruction.
constexpr int kInt4ScaleChunks = 4;

inline int Int4At(const uint8_t* row, int64_t j) {
  int64_t g = j / kInt4Group, e = j % kInt4Group, half = kInt4Group / 2;
  uint8_t byte = row[g * half + e % half];
  return (e < half ? (byte & 0xf) : (byte >> 4)) - kInt4Offset;
}

// The operands of the int4 kernels, with x rearranged once per call to match the chunks'
// unpacked nibbles: per chunk and row of x, xs holds the 4 groups' elements 0-15 (64 bytes, the
// low nibbles' partners) then their elements 16-31; neg holds, per int32 lane of a chunk, minus
// kInt4Offset times the sum of the 8 x values the lane multiplies (so starting a lane's sum from
// it undoes the stored offset exactly). A last, partial chunk is zero-padded. Column r of y is
// the weight's row r, or with `ids` (in range) its row ids[r]: the kept units' rows of a sparse
// layer's up projection, read where they lie.
struct Int4Operands {
  Int4Operands(const int8_t* x, int64_t m, const uint8_t* w, const uint16_t* scale, float* y,
               int64_t k, int64_t n, const int32_t* ids = nullptr)
      : x(x), w(w), scale(scale), y(y), ids(ids), k(k), n(n), groups(k / kInt4Group),
        chunks((groups + kInt4ChunkGroups - 1) / kInt4ChunkGroups),
        xs_row(chunks * kInt4Chunk), neg_row(chunks * kInt4Lanes),
        xs(m * xs_row, 0), neg(m * neg_row, 0) {
    constexpr int64_t half = kInt4Group / 2, per_lane = 4;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < groups; ++g) {
        int64_t c = g / kInt4ChunkGroups, q = g % kInt4ChunkGroups;
        int8_t* to = xs.data() + i * xs_row + c * kInt4Chunk + q * half;
        int32_t* lane = neg.data() + i * neg_row + c * kInt4Lanes + q * (half / per_lane);
        for (int64_t h = 0; h < 2; ++h) {
          const int8_t* from = x + i * k + g * kInt4Group + h * half;
          std::memcpy(to + h * (kInt4Chunk / 2), from, half);
          for (int64_t e = 0; e < half; ++e) lane[e / per_lane] -= kInt4Offset * from[e];
        }
      }
  }
  int64_t FullChunks() const { return groups / kInt4ChunkGroups; }
  int64_t TailGroups() const { return groups - FullChunks() * kInt4ChunkGroups; }
  int64_t Stored(int64_t r) const { return ids ? int64_t{ids[r]} : r; }
  const uint8_t* Bytes(int64_t r, int64_t c) const {
    return w + Stored(r) * (k / 2) + c * (kInt4Chunk / 2);
  }
  const uint16_t* Scales(int64_t r, int64_t c) const {
    return scale + Stored(r) * groups + c * kInt4ChunkGroups;
  }
  const int8_t* XsAt(int64_t c) const { return xs.data() + c * kInt4Chunk; }
  const int32_t* NegAt(int64_t c) const { return neg.data() + c * kInt4Lanes; }

  const int8_t* x;
  const uint8_t* w;
  const uint16_t* scale;
  float* y;
  const int32_t* ids;
  int64_t k, n, groups, chunks, xs_row, neg_row;
  std::vector<int8_t> xs;
  std::vector<int32_t> neg;
};

// A row's last, partial chunk copied into zeros: a zero nibble meets a zero x (and scale).
struct Int4Tail {
  Int4Tail(const Int4Operands& op, int64_t r) {
    int64_t c = op.FullChunks(), t = op.TailGroups();
    std::memcpy(bytes, op.Bytes(r, c), t * (kInt4Group / 2));
    std::memcpy(scales, op.Scales(r, c), t * sizeof(uint16_t));
  }
  uint8_t bytes[kInt4Chunk / 2] = {};
  uint16_t scales[kInt4ChunkGroups] = {};
};

inline void Int4Scalar(const Int4Operands& op, int64_t m, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* row = op.Bytes(r, 0);
    const uint16_t* scale = op.Scales(r, 0);
    for (int64_t i = 0; i < m; ++i) {
      float acc = 0;
      for (int64_t g = 0; g < op.groups; ++g) {
        int32_t dot = 0;
        for (int64_t e = 0; e < kInt4Group; ++e) {
          int64_t j = g * kInt4Group + e;
          dot += int32_t{op.x[i * op.k + j]} * Int4At(row, j);
        }
        acc += F16ToF32(scale[g]) * static_cast<float>(dot);
      }
      op.y[i * op.n + r] = acc;
    }
  }
}

#ifdef GEMMA3N_X86
// A chunk of kInt4Chunk values (4 groups, 64 bytes) of an int4 row goes to AVX2 in halves of two
// groups: the low nibbles of a half's 32 bytes are elements 0-15 of its two groups, the high
// ones elements 16-31, as bytes; xs holds x in that order (Int4Operands), so each int32 lane
// sums 8 products of one group. Half h's nibbles, and its two groups' scales over the lanes
// (lanes 0-3 group 2h, lanes 4-7 group 2h + 1; s4: the chunk's 4 scales).
struct Int4HalfAvx2 {
  __m256i lo, hi;
  __m256 scales;
};

AVX2_TARGET INLINE __m256 Int4ScalesAvx2(const uint16_t* s) {
  return _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))));
}

AVX2_TARGET INLINE Int4HalfAvx2 UnpackInt4HalfAvx2(const uint8_t* bytes, __m256 s4, int h) {
  const __m256i mask = _mm256_set1_epi8(0x0f);
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * h));
  return {_mm256_and_si256(b, mask), _mm256_and_si256(_mm256_srli_epi16(b, 4), mask),
          _mm256_permutevar8x32_ps(s4, _mm256_set_epi32(2 * h + 1, 2 * h + 1, 2 * h + 1,
                                                        2 * h + 1, 2 * h, 2 * h, 2 * h, 2 * h))};
}

// acc + (a half · x's matching bytes x_lo, x_hi, starting each lane from neg) · scales.
AVX2_TARGET INLINE __m256 Int4HalfFmaAvx2(const Int4HalfAvx2& w, __m256i x_lo, __m256i x_hi,
                                          __m256i neg, __m256 acc) {
  // Pair sums of at most 2 x 15 x 128 in magnitude, low plus high: no int16 saturation.
  __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w.lo, x_lo), _mm256_maddubs_epi16(w.hi, x_hi));
  __m256i d = _mm256_add_epi32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)), neg);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), w.scales, acc);
}

// x's bytes for half h of a chunk (xi: the chunk's in xs), and the lanes' neg.
AVX2_TARGET INLINE void LoadInt4XAvx2(const int8_t* xi, const int32_t* neg, int h, __m256i& x_lo,
                                      __m256i& x_hi, __m256i& neg_h) {
  x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 32 * h));
  x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + 32 * h + kInt4Chunk / 2));
  neg_h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(neg + 8 * h));
}

// One chunk of a weight row against M rows of x. neg: minus the offset's share per lane; s: the
// 4 groups' scales.
template <int M>
AVX2_TARGET INLINE void Int4ChunkAvx2(const uint8_t* bytes, const uint16_t* s, const int8_t* xs,
                                      const int32_t* neg, int64_t xs_row, int64_t neg_row,
                                      __m256 (&acc)[M]) {
  __m256 s4 = Int4ScalesAvx2(s);
  UNROLL
  for (int h = 0; h < 2; ++h) {
    Int4HalfAvx2 w = UnpackInt4HalfAvx2(bytes, s4, h);
    UNROLL
    for (int i = 0; i < M; ++i) {
      __m256i x_lo, x_hi, neg_h;
      LoadInt4XAvx2(xs + i * xs_row, neg + i * neg_row, h, x_lo, x_hi, neg_h);
      acc[i] = Int4HalfFmaAvx2(w, x_lo, x_hi, neg_h, acc[i]);
    }
  }
}

template <int M>
AVX2_TARGET void Int4Avx2(const Int4Operands& op, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    __m256 acc[M];
    UNROLL
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c < op.FullChunks(); ++c)
      Int4ChunkAvx2<M>(op.Bytes(r, c), op.Scales(r, c), op.XsAt(c), op.NegAt(c), op.xs_row,
                       op.neg_row, acc);
    if (c < op.chunks) {
      Int4Tail tail(op, r);
      Int4ChunkAvx2<M>(tail.bytes, tail.scales, op.XsAt(c), op.NegAt(c), op.xs_row, op.neg_row,
                       acc);
    }
    UNROLL
    for (int i = 0; i < M; ++i) op.y[i * op.n + r] = Hsum256(acc[i]);
  }
}

// One row of x past kRowKernelMaxK, R weight rows at a time: each half-chunk of x is loaded
// once for all R. The last rows of the range, fewer than R, take the row loop.
template <int R>
AVX2_TARGET void Int4RowsTileAvx2(const Int4Operands& op, int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + R <= end; r += R) {
    __m256 acc[R];
    UNROLL
    for (int j = 0; j < R; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t c = 0; c < op.FullChunks(); ++c)
      UNROLL
      for (int h = 0; h < 2; ++h) {
        __m256i x_lo, x_hi, neg;
        LoadInt4XAvx2(op.XsAt(c), op.NegAt(c), h, x_lo, x_hi, neg);
        UNROLL
        for (int j = 0; j < R; ++j)
          acc[j] = Int4HalfFmaAvx2(
              UnpackInt4HalfAvx2(op.Bytes(r + j, c), Int4ScalesAvx2(op.Scales(r + j, c)), h),
              x_lo, x_hi, neg, acc[j]);
      }
    UNROLL
    for (int j = 0; j < R; ++j) {
      __m256 one[1] = {acc[j]};
      if (op.FullChunks() < op.chunks) {
        Int4Tail tail(op, r + j);
        Int4ChunkAvx2<1>(tail.bytes, tail.scales, op.XsAt(op.FullChunks()),
                         op.NegAt(op.FullChunks()), op.xs_row, op.neg_row, one);
      }
      op.y[r + j] = Hsum256(one[0]);
    }
  }
  if (r < end) Int4Avx2<1>(op, r, end);
}

// AVX-512 takes a chunk in one step: the 64 bytes' low nibbles are elements 0-15 of the 4
// groups, the high ones elements 16-31, so lane l of vpdpbusd sums products of group l / 4.
// (Reading 2 or 4 rows at once, to share the loads of x, ran ~1.3x faster on a weight in the
// cache, but 2x slower streaming one from memory at K = 2048: see kRowKernelMaxK.)
struct Int4ChunkBitsAvx512 {
  __m512i lo, hi;
  __m512 scales;
};

// The 4 groups' scales of chunk j of 4 consecutive chunks spread over its 16 lanes (lane l:
// group l / 4), from the 16 scales of the 4 chunks, converted at once (s16).
AVX512_TARGET INLINE __m512 SpreadInt4ScalesAvx512(__m512 s16, int j) {
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(_mm512_add_epi32(spread, _mm512_set1_epi32(4 * j)), s16);
}

// One chunk's scales, spread.
AVX512_TARGET INLINE __m512 Int4ChunkScalesAvx512(const uint16_t* s) {
  return SpreadInt4ScalesAvx512(_mm512_castps128_ps512(_mm_cvtph_ps(
      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)))), 0);
}

AVX512_TARGET INLINE Int4ChunkBitsAvx512 UnpackInt4ChunkAvx512(const uint8_t* bytes,
                                                               __m512 scales) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  __m512i b = _mm512_loadu_si512(bytes);
  return {_mm512_and_si512(b, mask), _mm512_and_si512(_mm512_srli_epi16(b, 4), mask), scales};
}

// acc + (a chunk · x's bytes xi (a chunk of xs), starting each lane from neg) · scales.
AVX512_TARGET INLINE __m512 Int4ChunkFmaAvx512(const Int4ChunkBitsAvx512& w, const int8_t* xi,
                                               const int32_t* neg, __m512 acc) {
  __m512i d = _mm512_dpbusd_epi32(_mm512_loadu_si512(neg), w.lo, _mm512_loadu_si512(xi));
  d = _mm512_dpbusd_epi32(d, w.hi, _mm512_loadu_si512(xi + kInt4Chunk / 2));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), w.scales, acc);
}

template <int M>
AVX512_TARGET INLINE void Int4ChunkAvx512(const uint8_t* bytes, __m512 scales,
                                          const int8_t* xs, const int32_t* neg, int64_t xs_row,
                                          int64_t neg_row, __m512 (&acc)[M]) {
  Int4ChunkBitsAvx512 w = UnpackInt4ChunkAvx512(bytes, scales);
  UNROLL
  for (int i = 0; i < M; ++i) acc[i] = Int4ChunkFmaAvx512(w, xs + i * xs_row, neg + i * neg_row, acc[i]);
}

template <int M>
AVX512_TARGET void Int4Avx512(const Int4Operands& op, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    __m512 acc[M];
    UNROLL
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    int64_t c = 0;
    // The scales of kInt4ScaleChunks chunks converted at once: an E4B int4 decode step ran
    // 1.9 ms faster (of ~103; in-process alternation, median of 150 pairs).
    for (; c + kInt4ScaleChunks <= op.FullChunks(); c += kInt4ScaleChunks) {
      __m512 s16 = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(op.Scales(r, c))));
      UNROLL
      for (int j = 0; j < kInt4ScaleChunks; ++j)
        Int4ChunkAvx512<M>(op.Bytes(r, c + j), SpreadInt4ScalesAvx512(s16, j), op.XsAt(c + j),
                           op.NegAt(c + j), op.xs_row, op.neg_row, acc);
    }
    for (; c < op.FullChunks(); ++c)
      Int4ChunkAvx512<M>(op.Bytes(r, c), Int4ChunkScalesAvx512(op.Scales(r, c)), op.XsAt(c),
                         op.NegAt(c), op.xs_row, op.neg_row, acc);
    if (c < op.chunks) {
      Int4Tail tail(op, r);
      Int4ChunkAvx512<M>(tail.bytes, Int4ChunkScalesAvx512(tail.scales), op.XsAt(c),
                         op.NegAt(c), op.xs_row, op.neg_row, acc);
    }
    UNROLL
    for (int i = 0; i < M; ++i) op.y[i * op.n + r] = _mm512_reduce_add_ps(acc[i]);
  }
}

// As Int4RowsTileAvx2: one row of x past kRowKernelMaxK, R weight rows at a time (x's loads
// are the same for each, which the compiler keeps in registers).
template <int R>
AVX512_TARGET void Int4RowsTileAvx512(const Int4Operands& op, int64_t begin, int64_t end) {
  int64_t r = begin;
  for (; r + R <= end; r += R) {
    __m512 acc[R];
    UNROLL
    for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < op.FullChunks(); ++c)
      UNROLL
      for (int j = 0; j < R; ++j)
        acc[j] = Int4ChunkFmaAvx512(
            UnpackInt4ChunkAvx512(op.Bytes(r + j, c), Int4ChunkScalesAvx512(op.Scales(r + j, c))),
            op.XsAt(c), op.NegAt(c), acc[j]);
    UNROLL
    for (int j = 0; j < R; ++j) {
      __m512 one[1] = {acc[j]};
      if (op.FullChunks() < op.chunks) {
        Int4Tail tail(op, r + j);
        Int4ChunkAvx512<1>(tail.bytes, Int4ChunkScalesAvx512(tail.scales), op.XsAt(op.FullChunks()),
                           op.NegAt(op.FullChunks()), op.xs_row, op.neg_row, one);
      }
      op.y[r + j] = _mm512_reduce_add_ps(one[0]);
    }
  }
  if (r < end) Int4Avx512<1>(op, r, end);
}
#endif  // GEMMA3N_X86

// y [M, N] = x [M, K] · the weight's rows (op.Stored), on the instruction set `isa` asks for.
inline void Int4Products(ffi::ThreadPool& pool, const Int4Operands& op, int64_t m, int32_t isa) {
  int64_t grain = Grain(op.k / 2);
  Isa chosen = Choose(isa);
#ifdef GEMMA3N_X86
  if (chosen == kAvx512 || chosen == kAvx2) {
    bool wide = chosen == kAvx512;
    WithRows(m, [&]<int M>() {
      ParallelFor(pool, op.n, grain, [&](int64_t b, int64_t e) {
        bool tile = M == 1 && op.k > kRowKernelMaxK;
        if (wide && tile) Int4RowsTileAvx512<kTileWeightRows>(op, b, e);
        else if (wide) Int4Avx512<M>(op, b, e);
        else if (tile) Int4RowsTileAvx2<kTileWeightRows>(op, b, e);
        else Int4Avx2<M>(op, b, e);
      });
    });
    return;
  }
#endif
  ParallelFor(pool, op.n, grain, [&](int64_t b, int64_t e) { Int4Scalar(op, m, b, e); });
}

// The FFI handler's body (bound in decode_kernels.cc): y [M, C] = x [M, K] · rows ids [C]
// (clipped into range) of the weight (w [F, K / 2], scales [F, K / 32]), read in place.
inline ffi::Error GatheredInt4Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x,
                                   ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::U8> w,
                                   ffi::Buffer<ffi::F16> scale, ffi::ResultBuffer<ffi::F32> y,
                                   int32_t isa) {
  auto xd = x.dimensions(), idd = ids.dimensions(), wd = w.dimensions();
  auto sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || idd.size() != 1 || wd.size() != 2 || sd.size() != 2 || yd.size() != 2 ||
      xd[1] % kInt4Group != 0 || wd[1] * 2 != xd[1] || sd[0] != wd[0] ||
      sd[1] * kInt4Group != xd[1] || yd[0] != xd[0] || yd[1] != idd[0] || wd[0] < 1)
    return ffi::Error::InvalidArgument("the gathered int4 kernel takes x [M, K] (K a multiple "
                                       "of 32), ids [C], w [F, K / 2] and scales [F, K / 32], "
                                       "and gives y [M, C]");
  if (xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("decode kernels take 1 to 16 rows of x");
  std::vector<int32_t> rows(ids.typed_data(), ids.typed_data() + idd[0]);
  for (int32_t& r : rows) r = std::clamp<int32_t>(r, 0, static_cast<int32_t>(wd[0] - 1));
  const Int4Operands op(x.typed_data(), xd[0], w.typed_data(),
                        reinterpret_cast<const uint16_t*>(scale.typed_data()), y->typed_data(),
                        xd[1], idd[0], rows.data());
  Int4Products(pool, op, xd[0], isa);
  return ffi::Error::Success();
}
}  // namespace gemma3n_kernels

#endif  // GEMMA3N_KERNELS_INT4_H_
