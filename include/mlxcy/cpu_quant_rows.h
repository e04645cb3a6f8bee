// mlxcy's int16 CPU kernels for several rows of x at once, compiled once per
// instruction set: cpu_quant.h includes this file twice (so no include
// guard), defining first
//   MLXCY_ROWS_NS    the namespace (avx2_rows, vnni_rows),
//   MLXCY_ROWS_ISA   the functions' target attribute,
//   MLXCY_ROWS_VNNI  1: multiply-adds accumulate in one instruction
//                    (AVX-512 VNNI vpdpwssd on 256-bit vectors, with
//                    AVX-512VL's 32 vector registers); 0: vpmaddwd + vpaddd.
//
// R rows of x (a speculative step's verification, a small batch) against one
// pass over the weights: each block is unpacked once and met by every row's
// x, so a row after the first costs its multiply-adds and scaling, not the
// unpacking.  One row of x (a decode step) is the same kernels' pass of one
// row, and each row's arithmetic in a pass is independent of the
// other rows', so its y is bit-identical to its one-row product
// (verification sees the logits plain decoding would).  Rows of x are xld
// int16 (xq), dld (xd) and sld (xsum) values apart; row i of y starts at
// y + i * ldy.

namespace MLXCY_ROWS_NS {

// Rows of x per pass over the weights: four under both instruction sets.
// AVX2, Qwen2.5-Coder-0.5B's forwards of 6, 9 and 13 positions (2026-12-06):
// 83-85, 110-112 and 169-172 ms in passes of four against 95-97, 127-131
// and 190-197 in passes of two; SmolLM2-135M's (4 bits) alike either way.
constexpr int kRows = 4;

// acc + the pairwise products of a and b (int16 pairs summed into int32 lanes).
MLXCY_ROWS_ISA MLXCY_INLINE __m256i dpw(__m256i acc, __m256i a, __m256i b) {
#if MLXCY_ROWS_VNNI
  return _mm256_dpwssd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

// A pair of 4-bit blocks (32 bytes from p) as four vectors of 16 values.
// The bytes are read as 16-bit lanes, each holding four nibbles: masks and
// shifts within the lane give the vectors (no widening shuffle), vector t
// holding nibble t of each lane, which meets x's run t (quantize_i16).
// `half`: only the first block is readable.
struct PairQ4 {
  __m256i a, b, c, d;
};
MLXCY_ROWS_ISA MLXCY_INLINE PairQ4 unpack_pair_q4(const uint8_t* p, bool half) {
  const __m256i v = half ? _mm256_zextsi128_si256(
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                         : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m = _mm256_set1_epi16(0x000f);
  return {_mm256_and_si256(v, m), _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
          _mm256_and_si256(_mm256_srli_epi16(v, 8), m), _mm256_srli_epi16(v, 12)};
}

// The integer dots of an unpacked pair with one row of x (from xp): lanes
// 0-3 sum the first block's products, lanes 4-7 the second's.
MLXCY_ROWS_ISA MLXCY_INLINE __m256i dot_q4(const PairQ4& w, const int16_t* xp) {
  const __m256i* x = reinterpret_cast<const __m256i*>(xp);
  __m256i s = _mm256_madd_epi16(w.a, _mm256_loadu_si256(x));
  s = dpw(s, w.b, _mm256_loadu_si256(x + 1));
  s = dpw(s, w.c, _mm256_loadu_si256(x + 2));
  return dpw(s, w.d, _mm256_loadu_si256(x + 3));
}

// Asks for the weights 1 KB ahead of p (the row being read, then the next
// rows) into cache: without it, products from memory (weights past the
// caches) streamed 5-20% slower in the loops below, which read 32 bytes a
// step (one thread, 2026-12-07).
MLXCY_ROWS_ISA MLXCY_INLINE void prefetch_ahead(const uint8_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_T0);
}

// matvec_q4_i16_rows_t: R rows of x (quantize_i16's layout) against 4-bit
// rows [n0, n1) of W, scales and biases of type T, groups of 32 << LB values,
// each pair of blocks unpacked once and met by every row.  A row's odd last
// block is read as a whole pair: the 16 bytes past it belong to the next row
// and meet x's zero padding (integers: the product is exactly 0); only the
// array's last row reads half a pair there.
#if MLXCY_ROWS_VNNI
// VNNI: a float step per batch of 8 blocks (x's scales in quantize_i16's
// batch layout): each row's four pair dots reduced by three hadds into one
// lane per block, in kPairOrder.  vpdpwssd leaves the multiply ports few
// slots for float steps: per pair (AVX2's form) ran 10-15% slower here.
// The batch of 8 blocks from rp (pairs of them: `pairs` <= 4, the last one
// half when `half_last`) met by R rows of x from xp: h[i] as the one-row
// kernel's hadd tree gives it (missing pairs are zeros).  Each row meets a
// pair right after the pair before it, so that one partial vector a row is
// live besides h (with all rows' dots of two pairs live, AVX2's 16
// registers held no more than two rows).
template <int R>
MLXCY_ROWS_ISA MLXCY_INLINE void batch_q4_rows(const uint8_t* rp, const int16_t* xp, int64_t xld,
                                               int pairs, bool half_last, __m256i* h) {
  const __m256i z = _mm256_setzero_si256();
  __m256i p[R];
  PairQ4 w = unpack_pair_q4(rp, half_last && pairs == 1);
  MLXCY_UNROLL
  for (int i = 0; i < R; ++i) p[i] = dot_q4(w, xp + i * xld);
  if (pairs > 1) {
    w = unpack_pair_q4(rp + 32, half_last && pairs == 2);
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) h[i] = _mm256_hadd_epi32(p[i], dot_q4(w, xp + i * xld + 64));
  } else {
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) h[i] = _mm256_hadd_epi32(p[i], z);
  }
  if (pairs > 2) {
    w = unpack_pair_q4(rp + 64, half_last && pairs == 3);
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) p[i] = dot_q4(w, xp + i * xld + 128);
  }
  if (pairs > 3) {
    w = unpack_pair_q4(rp + 96, half_last);
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i)
      h[i] = _mm256_hadd_epi32(h[i], _mm256_hadd_epi32(p[i], dot_q4(w, xp + i * xld + 192)));
  } else {
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i)
      h[i] = _mm256_hadd_epi32(h[i], _mm256_hadd_epi32(pairs > 2 ? p[i] : z, z));
  }
}

template <Elt T, int LB, int R>
MLXCY_ROWS_ISA void matvec_q4_i16_rows_t(const Weight& W, const int16_t* xq, int64_t xld,
                                         const float* xd, int dld, const float* xsum, int sld,
                                         float* y, int64_t ldy, int n0, int n1) {
  const int G = W.K / W.gs, NB = W.K / 32, NB8 = NB & ~7, rb = NB - NB8;
  const int64_t ld = W.w_ld * 4;
  const __m256i order = _mm256_setr_epi32(0, 2 >> LB, 4 >> LB, 6 >> LB, 1 >> LB, 3 >> LB,
                                          5 >> LB, 7 >> LB);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* r = static_cast<const uint8_t*>(W.w) + int64_t(n) * ld;
    const int64_t si = int64_t(n) * W.sb_ld;
    __m256 acc[R];
    __m256i h[R];
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    // the batch's dots h times its weight scales sc and each row's x scales
    auto scale = [&](int j0, __m256 sc) MLXCY_ROWS_ISA __attribute__((always_inline)) {
      MLXCY_UNROLL
      for (int i = 0; i < R; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h[i]),
                                 _mm256_mul_ps(sc, _mm256_loadu_ps(xd + i * dld + j0)), acc[i]);
    };
    for (int j0 = 0; j0 < NB8; j0 += 8) {
      prefetch_ahead(r + 16 * j0);
      prefetch_ahead(r + 16 * j0 + 64);
      batch_q4_rows<R>(r + 16 * j0, xq + 32 * j0, xld, 4, false, h);
      scale(j0, _mm256_permutevar8x32_ps(load_batch_scales<T, LB>(W.s, si + (j0 >> LB)), order));
    }
    if (rb) {   // the partial batch
      batch_q4_rows<R>(r + 16 * NB8, xq + 32 * NB8, xld, (rb + 1) / 2,
                       n == W.N - 1 && (rb & 1), h);
      scale(NB8, _mm256_permutevar8x32_ps(
                     load_sb8(W.s, T, si + (NB8 >> LB), (rb + (1 << LB) - 1) >> LB), order));
    }
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) y[i * ldy + n] = finish_row<T>(W, si, G, xsum + i * sld, acc[i]);
  }
}
#else
// AVX2: a float step per pair of blocks and row of x (scale_pair; pair
// layout of xd, see quantize_i16), no horizontal sums: four rows of x 15-20%
// faster than three hadds per batch of 8 blocks (which AVX2's 16 registers
// also could not keep from spilling), one row alike.
template <Elt T, int LB, int R>
MLXCY_ROWS_ISA void matvec_q4_i16_rows_t(const Weight& W, const int16_t* xq, int64_t xld,
                                         const float* xd, int dld, const float* xsum, int sld,
                                         float* y, int64_t ldy, int n0, int n1) {
  const int NB = W.K / 32, G = W.K / W.gs;
  const int64_t ld = W.w_ld * 4;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* r = static_cast<const uint8_t*>(W.w) + int64_t(n) * ld;
    const int64_t si = int64_t(n) * W.sb_ld;
    __m256 acc[R];
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    // pair q; `half`: the row's odd last block
    auto pair = [&](int q, bool half) MLXCY_ROWS_ISA __attribute__((always_inline)) {
      const PairQ4 u = unpack_pair_q4(r + 32 * q, half && n == W.N - 1);
      const __m256 sc = pair_scales<T, LB>(W.s, si, q, half);
      MLXCY_UNROLL
      for (int i = 0; i < R; ++i)
        acc[i] = scale_pair(acc[i], dot_q4(u, xq + i * xld + 64 * q), sc, xd + i * dld + 8 * q);
    };
    for (int q = 0; q < NB / 2; ++q) {
      if (!(q & 1)) prefetch_ahead(r + 32 * q);
      pair(q, false);
    }
    if (NB & 1) pair(NB / 2, true);
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) y[i * ldy + n] = finish_row<T>(W, si, G, xsum + i * sld, acc[i]);
  }
}

#endif

// The integer dots of an unpacked block (a, b: its values in k order) with
// one row of x at the block (x).
MLXCY_ROWS_ISA MLXCY_INLINE __m256i dot_i16(__m256i a, __m256i b, const int16_t* x) {
  return dpw(_mm256_madd_epi16(a, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), b,
             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)));
}

// R rows of x against 5- or 8-bit rows [n0, n1) of W, scales and biases of
// type T, groups of 32 << LB values: each block unpacked once and met by
// every row, a float step per block (scale_block).
template <int BITS, Elt T, int LB, int R>
MLXCY_ROWS_ISA void matvec_q_i16_rows_t(const Weight& W, const int16_t* xq, int64_t xld,
                                        const float* xd, int dld, const float* xsum, int sld,
                                        float* y, int64_t ldy, int n0, int n1) {
  const int G = W.K / W.gs, NB = W.K / 32;
  const uint8_t* w = static_cast<const uint8_t*>(W.w);
  const int64_t ld = W.w_ld * 4;
  thread_local std::vector<uint8_t> lastrow;   // 5 bits: the array's last row, padded
  for (int n = n0; n < n1; ++n) {
    const uint8_t* r = w + int64_t(n) * ld;
    if (BITS == 5 && n == W.N - 1) {   // block_i16 reads past the block
      lastrow.assign(size_t(ld) + 16, 0);
      std::memcpy(lastrow.data(), r, size_t(ld));
      r = lastrow.data();
    }
    const int64_t si = int64_t(n) * W.sb_ld;
    __m256 acc[R];
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
    for (int j = 0; j < NB; ++j) {
      if (!(j & 1)) prefetch_ahead(r + 4 * BITS * j);
      __m256i a, b;
      block_i16<BITS>(r, j, a, b);
      const __m256 sw = _mm256_set1_ps(load_sb(W.s, T, si + (j >> LB)));
      MLXCY_UNROLL
      for (int i = 0; i < R; ++i)
        acc[i] = scale_block(acc[i], dot_i16(a, b, xq + i * xld + 32 * j), sw, xd + i * dld + j);
    }
    MLXCY_UNROLL
    for (int i = 0; i < R; ++i) y[i * ldy + n] = finish_row<T>(W, si, G, xsum + i * sld, acc[i]);
  }
}

// RR rows of x against output rows [n0, n1) of W.
template <int BITS, Elt T, int LB, int RR>
MLXCY_ROWS_ISA void pass(const Weight& W, const int16_t* xq, int64_t xld, const float* xd, int dld,
                         const float* xsum, int sld, float* y, int64_t ldy, int n0, int n1) {
  if constexpr (BITS == 4)
    matvec_q4_i16_rows_t<T, LB, RR>(W, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  else
    matvec_q_i16_rows_t<BITS, T, LB, RR>(W, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
}

// Rows [0, R) of x against output rows [n0, n1) of W (4, 5 or 8 bits):
// passes of kRows rows, the last of them taking one more row where one would
// be left alone (a pass of one row reads the weights again for a single row:
// VNNI, 84 MB of 4-bit weights, 5 rows of x took 8.4 ms as 4 + 1, 4 rows
// 5.7), then a pass of the 1 (R = 1: a decode step), 2 or 3 rows left.
template <int BITS, Elt T, int LB>
MLXCY_ROWS_ISA void passes(const Weight& W, int R, const int16_t* xq, int64_t xld,
                           const float* xd, int dld, const float* xsum, int sld, float* y,
                           int64_t ldy, int n0, int n1) {
  int m = 0;
  for (; R - m >= kRows; m += kRows) {
    if (R - m == kRows + 1) {
      pass<BITS, T, LB, kRows + 1>(W, xq + m * xld, xld, xd + m * dld, dld, xsum + m * sld,
                                   sld, y + m * ldy, ldy, n0, n1);
      return;
    }
    pass<BITS, T, LB, kRows>(W, xq + m * xld, xld, xd + m * dld, dld, xsum + m * sld, sld,
                             y + m * ldy, ldy, n0, n1);
  }
  const int r = R - m;   // 0, 1, 2 or 3
  xq += m * xld;
  xd += m * dld;
  xsum += m * sld;
  y += m * ldy;
  if (r == 1) pass<BITS, T, LB, 1>(W, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  if (r == 2) pass<BITS, T, LB, 2>(W, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  if (r == 3) pass<BITS, T, LB, 3>(W, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
}

// The passes over tiles of about rows_tile_bytes() of W's rows, so that the
// passes after the first find the tile in cache rather than stream W again
// from memory (each pass over a whole 136 MB head would read it anew).
template <int BITS, Elt T, int LB>
MLXCY_ROWS_ISA void rows_lb(const Weight& W, int R, const int16_t* xq, int64_t xld, const float* xd,
                            int dld, const float* xsum, int sld, float* y, int64_t ldy, int n0,
                            int n1) {
  const int tile = int(std::clamp<int64_t>(rows_tile_bytes() / (int64_t(W.w_ld) * 4), 1,
                                            std::max(1, n1 - n0)));
  for (int t0 = n0; t0 < n1; t0 += tile)
    passes<BITS, T, LB>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, t0, std::min(n1, t0 + tile));
}

template <int BITS, Elt T>
MLXCY_ROWS_ISA void rows_t(const Weight& W, int R, const int16_t* xq, int64_t xld, const float* xd,
                           int dld, const float* xsum, int sld, float* y, int64_t ldy, int n0,
                           int n1) {
  if (W.gs == 32) return rows_lb<BITS, T, 0>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  if (W.gs == 64) return rows_lb<BITS, T, 1>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  return rows_lb<BITS, T, 2>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
}

template <int BITS>
MLXCY_ROWS_ISA void rows_i16(const Weight& W, int R, const int16_t* xq, int64_t xld,
                             const float* xd, int dld, const float* xsum, int sld, float* y,
                             int64_t ldy, int n0, int n1) {
  if (W.st == Elt::F16)
    return rows_t<BITS, Elt::F16>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  if (W.st == Elt::BF16)
    return rows_t<BITS, Elt::BF16>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  return rows_t<BITS, Elt::F32>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
}

// The entry: rows [0, R) of x, R >= 1, against output rows [n0, n1) of W
// (4, 5 or 8 bits); each row of y is that row's one-row product.
MLXCY_ROWS_ISA inline void product(const Weight& W, int R, const int16_t* xq, int64_t xld,
                                   const float* xd, int dld, const float* xsum, int sld,
                                   float* y, int64_t ldy, int n0, int n1) {
  if (W.bits == 4) return rows_i16<4>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  if (W.bits == 5) return rows_i16<5>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
  rows_i16<8>(W, R, xq, xld, xd, dld, xsum, sld, y, ldy, n0, n1);
}

}  // namespace MLXCY_ROWS_NS

#undef MLXCY_ROWS_NS
#undef MLXCY_ROWS_ISA
#undef MLXCY_ROWS_VNNI
