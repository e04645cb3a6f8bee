// mlxcy's CPU kernels for linear layers, as an MLX primitive.
//
// y = x @ W.T (+ bias) where W is in MLX's affine quantized layout (4 or 8
// bits packed little-end first into uint32 words along a row; one scale and
// one bias per `group_size` values of a row: w = scale * q + bias), or plain
// float32 / bfloat16 / float16.
//
// MLX 0.32's CPU quantized_matmul is a scalar loop and its float GEMM a
// reference one; these kernels replace both on the CPU:
//  - one row of x (decode): a dot product per weight row, the packed weight
//    read once, unpacked in registers (AVX2: 8 values per uint32 with one
//    variable shift), accumulated in float32 with FMA;
//  - several rows (prefill): six weight rows at a time are unpacked into a
//    float32 panel that stays in L1/L2, then a 6 x 16 register-blocked
//    micro-kernel multiplies it with x packed 16 rows at a time.
// Output rows are split over a persistent thread pool (cpu_pool.h).  AVX2+FMA
// code is compiled per function (target attributes) and chosen at run time
// from CPUID, so the module runs on any x86-64; other CPUs and other
// architectures take the portable scalar code.
//
// Rows of x meet 4-, 5- and 8-bit weights as int16 per block of 32 with
// integer dot products by default (activation_mode; docs/cpu.md has the
// accuracy), up to int16_max_rows() rows; larger products run as the float GEMM.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include <mlx/mlx.h>
#include <mlx/primitives.h>
#include <mlx/allocator.h>
#include <mlx/backend/cpu/encoder.h>

#include "mlxcy/cpu_pool.h"

#if defined(__x86_64__) || defined(_M_X64)
#define MLXCY_X86 1
#include <immintrin.h>
#define MLXCY_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MLXCY_VNNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
// helpers whose vector arrays must stay in registers
#define MLXCY_INLINE inline __attribute__((always_inline))
// loops over a few rows' vectors, unrolled so that those stay in registers
// (GCC keeps arrays of vectors on the stack otherwise)
#define MLXCY_UNROLL _Pragma("GCC unroll 8")
#else
#define MLXCY_X86 0
#endif

namespace mlxcy::cpu {
namespace mx = mlx::core;

// ------------------------------------------------------------ dispatch ---

inline bool cpu_has_avx2() {
#if MLXCY_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// AVX-512 with VNNI (vpdpwssd) and 256-bit EVEX forms (VL); libgcc reports
// these only when the OS saves the AVX-512 registers.
inline bool cpu_has_vnni() {
#if MLXCY_X86
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

// 0: portable scalar code; 1: AVX2+FMA; 2: AVX2+FMA, and AVX-512 VNNI for
// the int16 products.  Each level applies when the CPU has it, else the next
// lower one; the default is the highest.
inline int& simd_level_setting() {
  static int level = 2;
  return level;
}
inline bool use_avx2() { return simd_level_setting() >= 1 && cpu_has_avx2(); }
inline bool use_vnni() { return simd_level_setting() >= 2 && cpu_has_vnni(); }
inline void set_simd_level(int level) { simd_level_setting() = level; }

// How one row of x (a decode step) meets 4-, 5- and 8-bit weights: 0 float32
// (exact), 1 int16 per block of 32 with integer dot products (vpmaddwd; x's
// rounding error <= amax / 65534 per block: ~3e-5 of a product's largest
// value, ~4e-4 relative on SmolLM2's decode logits), 2 int8 per block of 32
// (vpmaddubsw, llama.cpp's approach, 4-bit only; ~6e-3 per product).  The float kernel spends ~5 instructions per 8 weights
// on unpacking and converting them and is compute-bound on these CPUs; the
// int16 one ~3 (docs/cpu.md has the figures).
enum Activations { kFloat32 = 0, kInt16 = 1, kInt8 = 2 };   // cpu_kernels.ACTIVATIONS' order
inline int& activation_mode() {
  static int mode = kInt16;
  return mode;
}
inline void set_activation_mode(int mode) { activation_mode() = mode; }

inline const char* isa_name() {
  return use_vnni() ? "avx512vnni" : use_avx2() ? "avx2+fma" : "scalar";
}

// ------------------------------------------------------ scalar helpers ---

enum class Elt { F32, BF16, F16 };

inline Elt elt_of(mx::Dtype t) {
  if (t == mx::float32) return Elt::F32;
  if (t == mx::bfloat16) return Elt::BF16;
  if (t == mx::float16) return Elt::F16;
  throw std::invalid_argument("mlxcy cpu kernels: expected float32, bfloat16 or float16");
}

inline float bf16_to_f(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f_to_bf16(float f) {   // round to nearest even, as MLX does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float load_elt(const void* p, Elt t, int64_t i) {
  switch (t) {
    case Elt::F32: return static_cast<const float*>(p)[i];
    case Elt::BF16: return bf16_to_f(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<float>(static_cast<const mx::float16_t*>(p)[i]);
  }
}

inline void store_elt(void* p, Elt t, int64_t i, float v) {
  switch (t) {
    case Elt::F32: static_cast<float*>(p)[i] = v; break;
    case Elt::BF16: static_cast<uint16_t*>(p)[i] = f_to_bf16(v); break;
    default: static_cast<mx::float16_t*>(p)[i] = static_cast<mx::float16_t>(v); break;
  }
}

// ------------------------------------------------------ weight operand ---

// A [N, K] weight: quantized (bits 4 or 8, w packed uint32, scales/biases
// [N, K / gs]) or float (bits 0, w of type `wt`).  Rows are `w_ld` elements
// (uint32 words, or floats) apart; the last axis is contiguous.
struct Weight {
  int N = 0, K = 0, gs = 0, bits = 0;
  const void* w = nullptr;
  int64_t w_ld = 0;
  Elt wt = Elt::F32;            // float weights' type
  const void* s = nullptr;      // scales
  const void* b = nullptr;      // biases
  int64_t sb_ld = 0;
  Elt st = Elt::F32;            // scales' and biases' type
  const void* bias = nullptr;   // optional [N] output bias
  Elt bias_t = Elt::F32;
};

// ------------------------------------------------------- scalar kernels ---

// Value k of a packed row.  MLX packs `bits`-bit values as one little-endian
// bit stream (value k at bits [k * bits, (k + 1) * bits)), so 4 and 8 bits fall
// on nibble/byte boundaries and 2, 3, 5 and 6 bits may straddle two bytes.
inline float qvalue(const uint32_t* row, int bits, int k) {
  if (bits == 4) return float((row[k >> 3] >> ((k & 7) * 4)) & 0xfu);
  if (bits == 8) return float((row[k >> 2] >> ((k & 3) * 8)) & 0xffu);
  const int64_t bit = int64_t(k) * bits;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(row) + (bit >> 3);
  const int sh = int(bit & 7);
  unsigned v = p[0];
  if (sh + bits > 8) v |= unsigned(p[1]) << 8;   // only read the second byte when used
  return float((v >> sh) & ((1u << bits) - 1));
}

inline bool supported_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}

// One weight row unpacked into float32 (scale * q + bias, or the float row).
inline void row_to_f32_scalar(const Weight& W, int n, float* dst) {
  if (W.bits == 0) {
    for (int k = 0; k < W.K; ++k) dst[k] = load_elt(W.w, W.wt, int64_t(n) * W.w_ld + k);
    return;
  }
  const uint32_t* row = static_cast<const uint32_t*>(W.w) + int64_t(n) * W.w_ld;
  for (int g = 0; g < W.K / W.gs; ++g) {
    float s = load_elt(W.s, W.st, int64_t(n) * W.sb_ld + g);
    float b = load_elt(W.b, W.st, int64_t(n) * W.sb_ld + g);
    for (int k = g * W.gs; k < (g + 1) * W.gs; ++k) dst[k] = s * qvalue(row, W.bits, k) + b;
  }
}

// y[n] = dot(W[n], x) for n in [n0, n1); xsum[g]: sums of x over each group.
inline void matvec_scalar(const Weight& W, const float* x, const float* xsum, float* y,
                          int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    float acc = 0;
    if (W.bits == 0) {
      for (int k = 0; k < W.K; ++k) acc += load_elt(W.w, W.wt, int64_t(n) * W.w_ld + k) * x[k];
    } else {
      const uint32_t* row = static_cast<const uint32_t*>(W.w) + int64_t(n) * W.w_ld;
      for (int g = 0; g < W.K / W.gs; ++g) {
        float d = 0;
        for (int k = g * W.gs; k < (g + 1) * W.gs; ++k) d += x[k] * qvalue(row, W.bits, k);
        acc += load_elt(W.s, W.st, int64_t(n) * W.sb_ld + g) * d +
               load_elt(W.b, W.st, int64_t(n) * W.sb_ld + g) * xsum[g];
      }
    }
    y[n] = acc;
  }
}

// tile[i][l] = dot(wf[i], xp[., l]) for a 6 x 16 tile; xp is 16 x-rows packed
// k-major ([K][16]), wf six unpacked weight rows ([6][K]).
inline void tile_6x16_scalar(const float* wf, const float* xp, int K, float* tile) {
  for (int i = 0; i < 6; ++i)
    for (int l = 0; l < 16; ++l) {
      float acc = 0;
      for (int k = 0; k < K; ++k) acc += wf[int64_t(i) * K + k] * xp[int64_t(k) * 16 + l];
      tile[i * 16 + l] = acc;
    }
}

// --------------------------------------------------------- AVX2 kernels ---
#if MLXCY_X86

MLXCY_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

MLXCY_AVX2 inline float hsum_max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// Per-lane constants of unpack8<BITS>: lane i (value 8 t + i) takes bytes
// b_i, b_i + 1 (b_i = i * BITS / 8) of the group's BITS bytes into its low
// 16 bits, then shifts right by i * BITS % 8.  4 bits: the shifts of one word.
template <int BITS>
struct Unpack {
  __m256i shifts, mask, bytes;
  MLXCY_AVX2 Unpack() {
    alignas(32) int32_t sh[8];
    alignas(32) int8_t ctl[32];
    for (int i = 0; i < 8; ++i) {
      const int bit = i * BITS;
      sh[i] = BITS == 4 ? bit : bit & 7;
      // _mm256_shuffle_epi8 indexes within each 128-bit half; every 64-bit
      // quarter holds the same 8 bytes, so lanes 4-7 use the same indices.
      const int b = bit >> 3;
      ctl[4 * i + 0] = int8_t(b);
      ctl[4 * i + 1] = int8_t(b + 1 <= 7 ? b + 1 : -128);
      ctl[4 * i + 2] = -128;
      ctl[4 * i + 3] = -128;
    }
    shifts = _mm256_load_si256(reinterpret_cast<const __m256i*>(sh));
    bytes = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctl));
    mask = _mm256_set1_epi32((1 << (BITS == 8 ? 8 : BITS)) - 1);
  }
};

// Eight weight values starting at k = 8 t of a packed row (or group), as float32.
template <int BITS>
MLXCY_AVX2 inline __m256 unpack8(const uint32_t* row, int t, const Unpack<BITS>& u) {
  if constexpr (BITS == 4) {
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(int(row[t])), u.shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, u.mask));
  } else if constexpr (BITS == 8) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 2 * t));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  } else {
    // eight values = BITS bytes; read exactly those (never past the row's
    // end), in loads of 4, 2 and 1 bytes (a 5- or 6-byte memcpy is a call)
    const uint8_t* p = reinterpret_cast<const uint8_t*>(row) + t * BITS;
    uint64_t v = 0;
    if constexpr (BITS >= 4) {
      uint32_t lo;
      std::memcpy(&lo, p, 4);
      v = lo;
    }
    if constexpr (BITS == 6 || BITS == 2 || BITS == 3) {
      uint16_t mid;
      std::memcpy(&mid, p + (BITS >= 4 ? 4 : 0), 2);
      v |= uint64_t(mid) << (BITS >= 4 ? 32 : 0);
    }
    if constexpr (BITS == 5 || BITS == 3) v |= uint64_t(p[BITS - 1]) << (8 * (BITS - 1));
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi64x(int64_t(v)), u.bytes);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, u.shifts), u.mask));
  }
}

// A scale or bias as float32 (F16C for float16: MLX's float16_t converts in software).
MLXCY_AVX2 inline float load_sb(const void* p, Elt t, int64_t i) {
  if (t == Elt::F32) return static_cast<const float*>(p)[i];
  if (t == Elt::BF16) return bf16_to_f(static_cast<const uint16_t*>(p)[i]);
  return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
}

// Eight float weights starting at k of a float row, as float32.
MLXCY_AVX2 inline __m256 load8(const void* row, Elt t, int64_t k) {
  if (t == Elt::F32) return _mm256_loadu_ps(static_cast<const float*>(row) + k);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
      static_cast<const uint16_t*>(row) + k));
  if (t == Elt::BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <int BITS>
MLXCY_AVX2 void matvec_q_avx2(const Weight& W, const float* x, const float* xsum, float* y,
                              int n0, int n1) {
  const Unpack<BITS> u;
  const int G = W.K / W.gs, steps = W.gs / 8, wpg = W.gs * BITS / 32;
  const uint32_t* w = static_cast<const uint32_t*>(W.w);
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    const uint32_t* r0 = w + int64_t(n) * W.w_ld;
    const uint32_t* r1 = r0 + W.w_ld;
    const int64_t si = int64_t(n) * W.sb_ld;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float bs0 = 0, bs1 = 0;
    for (int g = 0; g < G; ++g) {
      const float* xg = x + g * W.gs;
      const uint32_t* g0 = r0 + g * wpg;
      const uint32_t* g1 = r1 + g * wpg;
      __m256 a0 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps();
      __m256 a1 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
      for (int t = 0; t < steps; t += 2) {   // steps is even: gs >= 32
        __m256 x0 = _mm256_loadu_ps(xg + 8 * t), x1 = _mm256_loadu_ps(xg + 8 * t + 8);
        a0 = _mm256_fmadd_ps(x0, unpack8<BITS>(g0, t, u), a0);
        c0 = _mm256_fmadd_ps(x1, unpack8<BITS>(g0, t + 1, u), c0);
        a1 = _mm256_fmadd_ps(x0, unpack8<BITS>(g1, t, u), a1);
        c1 = _mm256_fmadd_ps(x1, unpack8<BITS>(g1, t + 1, u), c1);
      }
      acc0 = _mm256_fmadd_ps(_mm256_set1_ps(load_sb(W.s, W.st, si + g)),
                             _mm256_add_ps(a0, c0), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_set1_ps(load_sb(W.s, W.st, si + W.sb_ld + g)),
                             _mm256_add_ps(a1, c1), acc1);
      bs0 += load_sb(W.b, W.st, si + g) * xsum[g];
      bs1 += load_sb(W.b, W.st, si + W.sb_ld + g) * xsum[g];
    }
    y[n] = hsum8(acc0) + bs0;
    y[n + 1] = hsum8(acc1) + bs1;
  }
  if (n < n1) matvec_scalar(W, x, xsum, y, n, n1);
}

// The largest magnitude of 32 values (the scale of an int8/int16 block).
inline float amax32(const float* xb) {
  float amax = 0;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
  return amax;
}

// x [K] as int8 per block of 32 (xd[j] = amax / 127), each block's even k
// first, then its odd k (the order of a 4-bit row's low and high nibbles).
inline void quantize_i8(const float* x, int K, int8_t* xq, float* xd) {
  for (int j = 0; j < K / 32; ++j) {
    const float* xb = x + 32 * j;
    const float d = amax32(xb) / 127.f, inv = d > 0 ? 1.f / d : 0.f;
    xd[j] = d;
    for (int i = 0; i < 16; ++i) {
      xq[32 * j + i] = int8_t(std::nearbyint(xb[2 * i] * inv));
      xq[32 * j + 16 + i] = int8_t(std::nearbyint(xb[2 * i + 1] * inv));
    }
  }
}

// x quantized per block of 32: xq int8 with each block's even k first, then
// its odd k (the order of a 4-bit row's low and high nibbles), xd the blocks'
// scales.  y[n] = sum_g s[n,g] * sum_blocks(xd * idot) + b[n,g] * xsum[g].
MLXCY_AVX2 inline void matvec_q4_i8_avx2(const Weight& W, const int8_t* xq, const float* xd,
                                         const float* xsum, float* y, int n0, int n1) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  const int G = W.K / W.gs, bpg = W.gs / 32;   // 32-value blocks per group
  const uint8_t* w = static_cast<const uint8_t*>(W.w);
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = w + int64_t(n) * W.w_ld * 4;
    const int64_t si = int64_t(n) * W.sb_ld;
    __m256 acc = _mm256_setzero_ps();
    float bs = 0;
    for (int g = 0; g < G; ++g) {
      const float s = load_sb(W.s, W.st, si + g);
      for (int j = g * bpg; j < (g + 1) * bpg; ++j) {
        __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * j));
        __m256i q = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32 * j));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * xd[j]), acc);
      }
      bs += load_sb(W.b, W.st, si + g) * xsum[g];
    }
    y[n] = hsum8(acc) + bs;
  }
}

// Within each batch of 8 blocks, the order in which VNNI's 4-bit kernel's
// reduction yields the blocks' sums (cpu_quant_rows.h, batch_q4_rows).
constexpr int kPairOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Floats per row of quantize_i16's block scales xd.  4 bits, `batch` false
// (AVX2's kernel): 8 per pair of blocks, lanes 0-3 the first block's scale,
// 4-7 the second's (the lanes of its pair dot).  4 bits with `batch` (VNNI's)
// and 5 and 8 bits: one per block, padded to a multiple of 8 with zeros (the
// kernels read 8 at a time); 4 bits permuted by kPairOrder within each batch
// of 8 blocks.
inline int xd_stride(int bits, int K, bool batch) {
  const int NB = K / 32;
  return bits == 4 && !batch ? 8 * ((NB + 1) / 2) : (NB + 7) / 8 * 8;
}

// x [K] as int16 per block of 32 (block j's scale amax / 32767 in xd as
// xd_stride lays it out; xd arrives zeroed, and stays zero past the blocks
// and in an absent odd block's lanes), in the order a row's packed
// values are read.  5 and 8 bits: k order.  4 bits: two blocks (64 values)
// at a time as four runs of 16, run q holding values 4 i + q (i < 16) -- the
// nibbles a 16-bit lane of the 32 bytes holds, bits 4q..4q+3; an odd last
// block is paired with zeros (xq holds K rounded up to 64).
//
// AVX2 (the int16 kernels' only callers run under it): vcvtps2dq rounds to
// nearest even, as lrint does in the default rounding mode, and x * inv is
// the same float32 product, so the values are the scalar rounding's; a
// call to lrint per value was ~4% of a SmolLM2 decode step.
MLXCY_AVX2 inline void quantize_i16(const float* x, int K, int bits, bool batch, int16_t* xq,
                                    float* xd) {
  const int NB = K / 32;
  const bool pairs = bits == 4 && !batch;
  const __m256 sign = _mm256_set1_ps(-0.f);
  alignas(32) int16_t q[64];
  for (int j = 0; j < NB; ++j) {
    const float* xb = x + 32 * j;
    __m256 m = _mm256_setzero_ps();
    for (int t = 0; t < 4; ++t)
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * t)));
    const float amax = hsum_max8(m);
    const __m256 inv = _mm256_set1_ps(amax > 0 ? 32767.f / amax : 0.f);
    if (pairs)
      std::fill_n(xd + 4 * j, 4, amax / 32767.f);
    else
      xd[j] = amax / 32767.f;
    int16_t* out = bits == 4 ? q + 32 * (j & 1) : xq + 32 * j;
    for (int t = 0; t < 2; ++t) {
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 16 * t), inv));
      const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 16 * t + 8), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * t),
                         _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8));
    }
    // 4 bits: a pair of blocks (64 values, the second zero if absent) as runs
    if (bits == 4 && ((j & 1) || j == NB - 1)) {
      if (!(j & 1)) std::memset(q + 32, 0, 32 * sizeof(int16_t));
      int16_t* dst = xq + 64 * (j / 2);
      for (int r = 0; r < 4; ++r)
        for (int i = 0; i < 16; ++i) dst[16 * r + i] = q[4 * i + r];
    }
  }
  if (bits != 4 || pairs) return;
  for (int j0 = 0; j0 < xd_stride(bits, K, batch); j0 += 8) {
    float t[8];
    for (int l = 0; l < 8; ++l) t[l] = xd[j0 + kPairOrder[l]];
    std::memcpy(xd + j0, t, sizeof t);
  }
}

// 16 5-bit values from p on (reads 16 bytes: 6 past the 10 it uses).  Value
// i of 8 (40 bits, 5 bytes) lies in bytes i * 5 / 8 and the next, from bit
// i * 5 % 8 on.  A 16-bit lane takes those two bytes (vpshufb; the upper
// 128-bit half reads 8 values further, 5 bytes on), a multiply by
// 2^(11 - bit) moves the value to the lane's top 5 bits and a shift right by
// 11 brings it down: AVX2 has no per-lane variable 16-bit shift.
MLXCY_AVX2 inline __m256i unpack16_5(const uint8_t* p) {
  const __m256i bytes = _mm256_setr_epi8(0, 1, 0, 1, 1, 2, 1, 2, 2, 3, 3, 4, 3, 4, 4, 5,
                                         5, 6, 5, 6, 6, 7, 6, 7, 7, 8, 8, 9, 8, 9, 9, 10);
  const __m256i mul = _mm256_setr_epi16(2048, 64, 512, 16, 128, 1024, 32, 256,
                                        2048, 64, 512, 16, 128, 1024, 32, 256);
  const __m256i v =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(v, bytes), mul), 11);
}

// Block j (32 values) of a 5- or 8-bit row as two vectors of 16 int16, in
// k order.  5 bits read 6 bytes past the block.
template <int BITS>
MLXCY_AVX2 inline void block_i16(const uint8_t* row, int j, __m256i& a, __m256i& b) {
  if constexpr (BITS == 5) {
    a = unpack16_5(row + 20 * j);
    b = unpack16_5(row + 20 * j + 10);
  } else {
    a = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32 * j)));
    b = _mm256_cvtepu8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32 * j + 16)));
  }
}

// n <= 8 scales or biases from i on, as float32, zero past n (never read past them).
MLXCY_AVX2 inline __m256 load_sb8(const void* p, Elt t, int64_t i, int n) {
  if (n == 8) {
    if (t == Elt::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
        static_cast<const uint16_t*>(p) + i));
    if (t == Elt::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // n < 8: reading past them could leave the array.  With 8 - n values before
  // them, read the 8 that end with them and move them down (a copy into a
  // buffer read back as one vector stalls on store forwarding: a quarter of
  // the 4-bit kernel's time at K = 576, whose last 2 of 18 groups come here).
  if (i + n >= 8) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 v = load_sb8(p, t, i + n - 8, 8);
    const __m256i from = _mm256_add_epi32(lane, _mm256_set1_epi32(8 - n));
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(v, from), keep);
  }
  // the first values of an array: copied into zeros
  if (t == Elt::F32) {
    alignas(32) float f[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(f, static_cast<const float*>(p) + i, sizeof(float) * n);
    return _mm256_load_ps(f);
  }
  alignas(16) uint16_t h[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(h, static_cast<const uint16_t*>(p) + i, sizeof(uint16_t) * n);
  return load_sb8(h, t, 0, 8);
}

// Eight scales or biases of type T from p + i on, as float32.
template <Elt T>
MLXCY_AVX2 inline __m256 load_sb8_t(const void* p, int64_t i) {
  if constexpr (T == Elt::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h = _mm_loadu_si128(
      reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if constexpr (T == Elt::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The 8 >> LB scales of a batch of 8 blocks (groups of 32 << LB values) in
// lanes 0 .. (8 >> LB) - 1, the other lanes undefined; reads only those.
template <Elt T, int LB>
MLXCY_AVX2 inline __m256 load_batch_scales(const void* p, int64_t i) {
  if constexpr (LB == 0) {
    return load_sb8_t<T>(p, i);
  } else if constexpr (T == Elt::F32) {
    const float* f = static_cast<const float*>(p) + i;
    return _mm256_castps128_ps256(LB == 1 ? _mm_loadu_ps(f)
                                          : _mm_castpd_ps(_mm_load_sd(
                                                reinterpret_cast<const double*>(f))));
  } else {
    const uint16_t* u = static_cast<const uint16_t*>(p) + i;
    __m128i h;
    if constexpr (LB == 1) {
      h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(u));
    } else {
      int32_t v;
      std::memcpy(&v, u, sizeof v);
      h = _mm_cvtsi32_si128(v);
    }
    if constexpr (T == Elt::F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// acc + a 5- or 8-bit block's dot (8 int32 lanes, exact) times its weight
// scale sw and its x scale (*xd): the float step per block and row of x.
// Without horizontal sums (hadd issues at half the rate of other integer
// ops): AVX2 and VNNI, 2-5 rows of x 12-22% faster than eight blocks reduced
// by hadds and scaled at once; one row 5-bit 22% faster, 8-bit 7% slower
// from cache and 17% faster from memory (one thread, 2026-12-07).
MLXCY_AVX2 MLXCY_INLINE __m256 scale_block(__m256 acc, __m256i dot, __m256 sw, const float* xd) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sw, _mm256_broadcast_ss(xd)), acc);
}

// acc + the biases of row si's G groups times x's group sums, then summed:
// the last float steps of a row of every int16 kernel.
template <Elt T>
MLXCY_AVX2 MLXCY_INLINE float finish_row(const Weight& W, int64_t si, int G, const float* xsum,
                                         __m256 acc) {
  const int G8 = G & ~7;
  for (int g0 = 0; g0 < G8; g0 += 8)
    acc = _mm256_fmadd_ps(load_sb8_t<T>(W.b, si + g0), _mm256_loadu_ps(xsum + g0), acc);
  if (G8 < G)
    acc = _mm256_fmadd_ps(load_sb8(W.b, T, si + G8, G - G8), _mm256_loadu_ps(xsum + G8), acc);
  return hsum8(acc);
}

// The weight scales of a 4-bit row's pair of blocks q (groups of 32 << LB
// values, the row's scales from p + si on) as the pair dot's lanes meet
// them: lanes 0-3 the first block's, 4-7 the second's.  `half`: the second
// block is absent; only the first block's scale is read (all lanes: the
// absent block's lanes hold zero dots and meet x's zero scale).
template <Elt T, int LB>
MLXCY_AVX2 MLXCY_INLINE __m256 pair_scales(const void* p, int64_t si, int q, bool half) {
  if (LB > 0 || half) return _mm256_set1_ps(load_sb(p, T, si + ((2 * q) >> LB)));
  __m128 two;   // the two blocks' scales in lanes 0 and 1
  if constexpr (T == Elt::F32) {
    two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(
        static_cast<const float*>(p) + si + 2 * q)));
  } else {
    int32_t v;
    std::memcpy(&v, static_cast<const uint16_t*>(p) + si + 2 * q, sizeof v);
    const __m128i h = _mm_cvtsi32_si128(v);
    two = T == Elt::F16 ? _mm_cvtph_ps(h)
                        : _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  }
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two),
                                  _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

// acc + a pair dot's lanes (exact integers) times the blocks' weight scales
// sc and x scales (8 from xd: quantize_i16's pair layout): AVX2's 4-bit
// float step, one per pair and row of x.
MLXCY_AVX2 MLXCY_INLINE __m256 scale_pair(__m256 acc, __m256i dot, __m256 sc, const float* xd) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(sc, _mm256_loadu_ps(xd)), acc);
}

// Bytes of weight rows that the several-rows kernels' passes meet in turn
// before moving on (cpu_quant_rows.h's rows_lb), so that the passes after
// the first read them from cache.  AVX2 on a 2-core Xeon, 2026-12-06: 11 rows
// of x against a 136 MB 8-bit head (Qwen2.5-Coder's) 49-51 ms in one tile,
// 35-39 in tiles of 16-256 KB (those sizes alike); 84 MB of 4-bit weights
// 28 ms against 25; weights that fit the caches the same either way.
inline int64_t& rows_tile_bytes() {
  static int64_t b = int64_t(64) << 10;
  return b;
}
inline void set_rows_tile_bytes(int64_t b) { rows_tile_bytes() = b; }

// The int16 kernels for several rows of x, once per instruction set.
#define MLXCY_ROWS_NS avx2_rows
#define MLXCY_ROWS_ISA MLXCY_AVX2
#define MLXCY_ROWS_VNNI 0
#include "mlxcy/cpu_quant_rows.h"
#define MLXCY_ROWS_NS vnni_rows
#define MLXCY_ROWS_ISA MLXCY_VNNI
#define MLXCY_ROWS_VNNI 1
#include "mlxcy/cpu_quant_rows.h"

template <Elt T>
MLXCY_AVX2 inline __m256 load8_t(const void* row, int64_t k) {
  if constexpr (T == Elt::F32) return _mm256_loadu_ps(static_cast<const float*>(row) + k);
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(
      static_cast<const uint16_t*>(row) + k));
  if constexpr (T == Elt::BF16)   // bf16 -> fp32: the 16 bits moved to the top
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <Elt T>
MLXCY_AVX2 void matvec_f_avx2_t(const Weight& W, const float* x, float* y, int n0, int n1) {
  const int K16 = W.K & ~15;
  const int64_t isz = T == Elt::F32 ? 4 : 2;
  int n = n0;
  for (; n + 2 <= n1; n += 2) {
    const char* r0 = static_cast<const char*>(W.w) + int64_t(n) * W.w_ld * isz;
    const char* r1 = r0 + W.w_ld * isz;
    __m256 a0 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps();
    __m256 a1 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
    int k = 0;
    for (; k < K16; k += 16) {
      __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
      a0 = _mm256_fmadd_ps(x0, load8_t<T>(r0, k), a0);
      c0 = _mm256_fmadd_ps(x1, load8_t<T>(r0, k + 8), c0);
      a1 = _mm256_fmadd_ps(x0, load8_t<T>(r1, k), a1);
      c1 = _mm256_fmadd_ps(x1, load8_t<T>(r1, k + 8), c1);
    }
    float s0 = hsum8(_mm256_add_ps(a0, c0)), s1 = hsum8(_mm256_add_ps(a1, c1));
    for (; k < W.K; ++k) {
      s0 += load_elt(r0, T, k) * x[k];
      s1 += load_elt(r1, T, k) * x[k];
    }
    y[n] = s0;
    y[n + 1] = s1;
  }
  if (n < n1) matvec_scalar(W, x, nullptr, y, n, n1);
}

MLXCY_AVX2 inline void matvec_f_avx2(const Weight& W, const float* x, float* y, int n0,
                                     int n1) {
  if (W.wt == Elt::BF16) return matvec_f_avx2_t<Elt::BF16>(W, x, y, n0, n1);
  if (W.wt == Elt::F16) return matvec_f_avx2_t<Elt::F16>(W, x, y, n0, n1);
  return matvec_f_avx2_t<Elt::F32>(W, x, y, n0, n1);
}

// Weight row n unpacked into float32 (K values).
template <int BITS>
MLXCY_AVX2 void row_to_f32_q_avx2(const Weight& W, int n, float* dst) {
  const Unpack<BITS> u;
  const int G = W.K / W.gs, steps = W.gs / 8, wpg = W.gs * BITS / 32;
  const uint32_t* row = static_cast<const uint32_t*>(W.w) + int64_t(n) * W.w_ld;
  const int64_t si = int64_t(n) * W.sb_ld;
  for (int g = 0; g < G; ++g) {
    __m256 s = _mm256_set1_ps(load_sb(W.s, W.st, si + g));
    __m256 b = _mm256_set1_ps(load_sb(W.b, W.st, si + g));
    const uint32_t* rg = row + g * wpg;
    float* d = dst + g * W.gs;
    for (int t = 0; t < steps; ++t)
      _mm256_storeu_ps(d + 8 * t, _mm256_fmadd_ps(unpack8<BITS>(rg, t, u), s, b));
  }
}

MLXCY_AVX2 inline void row_to_f32_f_avx2(const Weight& W, int n, float* dst) {
  const void* row = static_cast<const char*>(W.w) +
                    int64_t(n) * W.w_ld * (W.wt == Elt::F32 ? 4 : 2);
  int k = 0;
  for (; k + 8 <= W.K; k += 8) _mm256_storeu_ps(dst + k, load8(row, W.wt, k));
  for (; k < W.K; ++k) dst[k] = load_elt(row, W.wt, k);
}

MLXCY_AVX2 inline void tile_6x16_avx2(const float* wf, const float* xp, int K, float* tile) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  const float *w0 = wf, *w1 = wf + K, *w2 = wf + 2 * K, *w3 = wf + 3 * K, *w4 = wf + 4 * K,
              *w5 = wf + 5 * K;
  for (int k = 0; k < K; ++k) {
    __m256 b0 = _mm256_loadu_ps(xp + int64_t(k) * 16);
    __m256 b1 = _mm256_loadu_ps(xp + int64_t(k) * 16 + 8);
    __m256 a = _mm256_broadcast_ss(w0 + k);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(w1 + k);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(w2 + k);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(w3 + k);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(w4 + k);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(w5 + k);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  _mm256_storeu_ps(tile + 0, c00);
  _mm256_storeu_ps(tile + 8, c01);
  _mm256_storeu_ps(tile + 16, c10);
  _mm256_storeu_ps(tile + 24, c11);
  _mm256_storeu_ps(tile + 32, c20);
  _mm256_storeu_ps(tile + 40, c21);
  _mm256_storeu_ps(tile + 48, c30);
  _mm256_storeu_ps(tile + 56, c31);
  _mm256_storeu_ps(tile + 64, c40);
  _mm256_storeu_ps(tile + 72, c41);
  _mm256_storeu_ps(tile + 80, c50);
  _mm256_storeu_ps(tile + 88, c51);
}

// tile_6x16_avx2 for a block of at most 8 x-rows (lanes 0-7 of xp; tile's
// lanes 8-15 are left as they are): half the FMAs when few rows remain, as in
// speculative verification (k + 1 rows) and small server batches.
MLXCY_AVX2 inline void tile_6x8_avx2(const float* wf, const float* xp, int K, float* tile) {
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps();
  __m256 c3 = _mm256_setzero_ps(), c4 = _mm256_setzero_ps(), c5 = _mm256_setzero_ps();
  const float *w0 = wf, *w1 = wf + K, *w2 = wf + 2 * K, *w3 = wf + 3 * K, *w4 = wf + 4 * K,
              *w5 = wf + 5 * K;
  for (int k = 0; k < K; ++k) {
    __m256 b = _mm256_loadu_ps(xp + int64_t(k) * 16);
    c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w0 + k), b, c0);
    c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w1 + k), b, c1);
    c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(w2 + k), b, c2);
    c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(w3 + k), b, c3);
    c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(w4 + k), b, c4);
    c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(w5 + k), b, c5);
  }
  _mm256_storeu_ps(tile + 0, c0);
  _mm256_storeu_ps(tile + 16, c1);
  _mm256_storeu_ps(tile + 32, c2);
  _mm256_storeu_ps(tile + 48, c3);
  _mm256_storeu_ps(tile + 64, c4);
  _mm256_storeu_ps(tile + 80, c5);
}

#endif  // MLXCY_X86

// ---------------------------------------------------- kernel front ends ---

inline void matvec_rows(const Weight& W, const float* x, const float* xsum, float* y, int n0,
                        int n1) {
#if MLXCY_X86
  if (use_avx2()) {
    switch (W.bits) {
      case 0: return matvec_f_avx2(W, x, y, n0, n1);
      case 2: return matvec_q_avx2<2>(W, x, xsum, y, n0, n1);
      case 3: return matvec_q_avx2<3>(W, x, xsum, y, n0, n1);
      case 4: return matvec_q_avx2<4>(W, x, xsum, y, n0, n1);
      case 5: return matvec_q_avx2<5>(W, x, xsum, y, n0, n1);
      case 6: return matvec_q_avx2<6>(W, x, xsum, y, n0, n1);
      case 8: return matvec_q_avx2<8>(W, x, xsum, y, n0, n1);
    }
  }
#endif
  matvec_scalar(W, x, xsum, y, n0, n1);
}

inline void row_to_f32(const Weight& W, int n, float* dst) {
#if MLXCY_X86
  if (use_avx2()) {
    switch (W.bits) {
      case 0: return row_to_f32_f_avx2(W, n, dst);
      case 2: return row_to_f32_q_avx2<2>(W, n, dst);
      case 3: return row_to_f32_q_avx2<3>(W, n, dst);
      case 4: return row_to_f32_q_avx2<4>(W, n, dst);
      case 5: return row_to_f32_q_avx2<5>(W, n, dst);
      case 6: return row_to_f32_q_avx2<6>(W, n, dst);
      case 8: return row_to_f32_q_avx2<8>(W, n, dst);
    }
  }
#endif
  row_to_f32_scalar(W, n, dst);
}

// tile[i][l] for l < mrows (at most 16) of a 6 x 16 tile.
inline void tile_6xm(const float* wf, const float* xp, int K, int mrows, float* tile) {
#if MLXCY_X86
  if (use_avx2()) {
    if (mrows <= 8) return tile_6x8_avx2(wf, xp, K, tile);
    return tile_6x16_avx2(wf, xp, K, tile);
  }
#endif
  tile_6x16_scalar(wf, xp, K, tile);
}

// Bytes of packed x that a GEMM's weight panels meet before moving on (see
// linear_f32): within an L2 (512 KB a core on the AMD EPYCs this project
// targets).  SmolLM2-135M Q4_1 on a 2-core Xeon (2 MB of L2 a core),
// 2026-12-06: classify of 64 prompts of 32 tokens 355-396 prompt tok/s with
// x in one run, 506-526 in runs of 512 KB or 1 MB, 478-481 in runs of 128-256 KB.
inline int64_t& gemm_run_bytes() {
  static int64_t b = int64_t(512) << 10;
  return b;
}
inline void set_gemm_run_bytes(int64_t b) { gemm_run_bytes() = b; }

// Rows of x at or above which the product runs as a GEMM (the weight
// unpacked once per six rows) rather than as one matvec per row of x.
inline int& gemm_min_rows() {
  static int m = 4;
  return m;
}
inline void set_gemm_min_rows(int m) { gemm_min_rows() = m; }

// Rows of x up to which an int16 product (4, 5 or 8 bits) runs on the
// several-rows kernels rather than as the float GEMM.  SmolLM2-135M Q4_1, a
// forward of M positions from an empty cache, ms, int16 against the GEMM
// (2026-12-08, two rounds): AVX2 M = 12 26 / 29-37, 16 35-39 / 37-45, 18
// 50 / 62-73 (VNNI 47 / 61-63).  So speculative verification (k + 1
// positions, at most 16) and small batches stay on the int16 path of one-row
// decoding, with the same per-row results.  Longer prompts keep the exact
// float GEMM, though the int16 kernels stay faster up to ~40 rows: their x
// rounded to int16 takes the logits ~6e-4 from exact (docs/cpu.md).
inline int int16_max_rows() { return 16; }

inline bool int16_product(const Weight& W) {
#if MLXCY_X86
  return use_avx2() && activation_mode() == kInt16 &&
         (W.bits == 4 || W.bits == 5 || W.bits == 8);
#else
  return false;
#endif
}

// Scratch buffers reused across calls by the thread that runs them.
inline std::vector<float>& scratch(int which) {
  thread_local std::vector<float> bufs[6];   // 0-3: linear_f32, 4: attention
  return bufs[which];
}

inline float* scratch_f(int which, size_t n) {
  auto& v = scratch(which);
  if (v.size() < n) v.resize(n);
  return v.data();
}

// y [M, N] (float32, row stride ldy) = x [M, K] (float32, contiguous) @ W.T (+ W.bias)
inline void linear_f32(const Weight& W, const float* x, int M, float* y, int64_t ldy) {
  const int N = W.N, K = W.K;
  const int G = W.bits ? K / W.gs : 0;
  auto add_bias = [&](float* yr, int n0, int n1) {
    if (W.bias)
      for (int n = n0; n < n1; ++n) yr[n] += load_elt(W.bias, W.bias_t, n);
  };
  const double work = double(M) * N * K;
  const int per_thread = work < 1.5e5 ? 0 : 4;   // small products: one task
  if (M < gemm_min_rows() || (M <= int16_max_rows() && int16_product(W))) {
    // 8 zeros past the end: the int16 kernel reads the sums 8 at a time
    float* xsum = scratch_f(0, size_t(M * G + 8));
    std::fill(xsum + M * G, xsum + M * G + 8, 0.f);
    for (int m = 0; m < M; ++m)
      for (int g = 0; g < G; ++g) {
        float s = 0;
        for (int k = g * W.gs; k < (g + 1) * W.gs; ++k) s += x[int64_t(m) * K + k];
        xsum[m * G + g] = s;
      }
#if MLXCY_X86
    const int mode = activation_mode();
    if (use_avx2() &&
        ((mode == kInt16 && (W.bits == 4 || W.bits == 5 || W.bits == 8)) ||
         (mode == kInt8 && W.bits == 4))) {
      const int NB = K / 32;
      thread_local std::vector<int16_t> xq16;
      thread_local std::vector<int8_t> xq8;
      // padded to a multiple of 8 with zeros: the int16 kernel reads 8 at a time
      const int NBp = (NB + 7) / 8 * 8;
      // the int16 kernels' instruction set, read once: x's layout follows it
      const bool vnni = use_vnni();
      const int dld = mode == kInt16 ? xd_stride(W.bits, K, vnni) : NBp;   // xd's row stride
      float* xd = scratch_f(3, size_t(M) * dld);
      std::fill(xd, xd + size_t(M) * dld, 0.f);
      const int Kp = (K + 63) / 64 * 64;   // 4 bits: blocks go in pairs
      if (mode == kInt16) {
        xq16.resize(size_t(M) * Kp);
        for (int m = 0; m < M; ++m)
          quantize_i16(x + int64_t(m) * K, K, W.bits, vnni, xq16.data() + int64_t(m) * Kp,
                       xd + m * dld);
      } else {
        xq8.resize(size_t(M) * K);
        for (int m = 0; m < M; ++m)
          quantize_i8(x + int64_t(m) * K, K, xq8.data() + int64_t(m) * K, xd + m * dld);
      }
      // the pool's threads see these through pointers (xq16/xq8 are this thread's)
      const int16_t* q16 = xq16.data();
      const int8_t* q8 = xq8.data();
      auto bodyq = [&](int n0, int n1) {
        // int16: passes that share each weight block's unpacking between
        // the rows of x (cpu_quant_rows.h; one row is a pass of one)
        if (mode == kInt16) {
          if (vnni) vnni_rows::product(W, M, q16, Kp, xd, dld, xsum, G, y, ldy, n0, n1);
          else avx2_rows::product(W, M, q16, Kp, xd, dld, xsum, G, y, ldy, n0, n1);
        } else {
          for (int m = 0; m < M; ++m)
            matvec_q4_i8_avx2(W, q8 + int64_t(m) * K, xd + m * dld, xsum + m * G, y + m * ldy,
                              n0, n1);
        }
        for (int m = 0; m < M; ++m) add_bias(y + m * ldy, n0, n1);
      };
      if (per_thread == 0) bodyq(0, N);
      else parallel_rows(N, 8, bodyq, per_thread);
      return;
    }
#endif
    auto body = [&](int n0, int n1) {
      for (int m = 0; m < M; ++m) {
        matvec_rows(W, x + int64_t(m) * K, xsum + m * G, y + m * ldy, n0, n1);
        add_bias(y + m * ldy, n0, n1);
      }
    };
    if (per_thread == 0) body(0, N);
    else parallel_rows(N, 8, body, per_thread);
    return;
  }
  // GEMM: x packed 16 rows at a time, k-major, zero-padded.
  const int MB = (M + 15) / 16;
  float* xp = scratch_f(1, size_t(MB) * K * 16);
  for (int mb = 0; mb < MB; ++mb) {
    float* dst = xp + int64_t(mb) * K * 16;
    for (int l = 0; l < 16; ++l) {
      int m = mb * 16 + l;
      if (m < M) {
        const float* xr = x + int64_t(m) * K;
        for (int k = 0; k < K; ++k) dst[int64_t(k) * 16 + l] = xr[k];
      } else {
        for (int k = 0; k < K; ++k) dst[int64_t(k) * 16 + l] = 0.f;
      }
    }
  }
  // x's blocks in runs that stay in cache while every weight panel meets
  // them (a run's panel of x about gemm_run_bytes()); a weight panel is
  // unpacked once per run.  Each output is one tile's sum over the whole K
  // either way, so the runs change no result.
  const int run_blocks = std::max(1, int(gemm_run_bytes() / (int64_t(K) * 16 * 4)));
  auto body = [&](int n0, int n1) {
    float* wf = scratch_f(2, size_t(6) * K);
    float tile[6 * 16];
    for (int r0 = 0; r0 < MB; r0 += run_blocks) {
      const int r1 = std::min(MB, r0 + run_blocks);
      for (int nb = n0; nb < n1; nb += 6) {
        int rows = std::min(6, n1 - nb);
        for (int i = 0; i < 6; ++i) {
          if (i < rows) row_to_f32(W, nb + i, wf + int64_t(i) * K);
          else std::memset(wf + int64_t(i) * K, 0, sizeof(float) * K);
        }
        for (int mb = r0; mb < r1; ++mb) {
          int mrows = std::min(16, M - mb * 16);
          tile_6xm(wf, xp + int64_t(mb) * K * 16, K, mrows, tile);
          for (int i = 0; i < rows; ++i) {
            float bv = W.bias ? load_elt(W.bias, W.bias_t, nb + i) : 0.f;
            for (int l = 0; l < mrows; ++l)
              y[int64_t(mb * 16 + l) * ldy + nb + i] = tile[i * 16 + l] + bv;
          }
        }
      }
    }
  };
  if (per_thread == 0) body(0, N);
  else parallel_rows(N, 6, body, per_thread);
}

// The most positions per sequence that a product treats as a step (a decode
// step, a speculative verification, a batch's step or its last positions);
// models/base.pyx's block primitives take steps of up to this many too.
constexpr int kStepPositions = 16;

// linear_f32 for a step's rows (at most kStepPositions positions per
// sequence, any number of sequences): with int16 products, in passes of at
// most int16_max_rows() rows, so that every row's result is bit-identical to
// its one-row product however many rows the step has (a batch's greedy
// speculative verification accepts exactly what plain decoding would emit;
// the float GEMM would round differently).  Prompts keep linear_f32's choice.
inline void linear_step(const Weight& W, const float* x, int M, float* y, int64_t ldy) {
  const int most = int16_product(W) ? int16_max_rows() : M;
  for (int m0 = 0; m0 < M; m0 += most) {
    const int n = std::min(most, M - m0);
    linear_f32(W, x + int64_t(m0) * W.K, n, y + int64_t(m0) * ldy, ldy);
  }
}

// ------------------------------------------------- arrays and primitive ---

// Element offset of flat index i of a (strided) array.
inline int64_t elem_loc(int64_t i, const mx::array& a) {
  int64_t loc = 0;
  for (int d = a.ndim() - 1; d >= 0; --d) {
    int64_t sz = a.shape(d);
    loc += (i % sz) * a.strides()[d];
    i /= sz;
  }
  return loc;
}

// a's elements as contiguous float32 (a copy unless a already is that).
inline const float* as_f32(const mx::array& a, std::vector<float>& buf) {
  if (a.dtype() == mx::float32 && a.flags().row_contiguous) return a.data<float>();
  buf.resize(a.size());
  Elt t = elt_of(a.dtype());
  const void* p = a.data<void>();
  bool contig = a.flags().row_contiguous;
  for (size_t i = 0; i < a.size(); ++i)
    buf[i] = load_elt(p, t, contig ? int64_t(i) : elem_loc(int64_t(i), a));
  return buf.data();
}

// The stride between an array's rows (its last axis) when that axis is
// contiguous and the leading axes flatten to rows one stride apart (a
// product's output, a column slice of one), else -1.
inline int64_t row_stride(const mx::array& a) {
  const int nd = a.ndim();
  if (nd < 1) return -1;
  const int64_t K = a.shape(nd - 1);
  if (K != 1 && a.strides()[nd - 1] != 1) return -1;
  int64_t ld = -1, rows = 1;
  for (int d = nd - 2; d >= 0; --d) {
    if (a.shape(d) == 1) continue;
    if (ld < 0) ld = a.strides()[d];           // the innermost leading axis of several
    else if (a.strides()[d] != ld * rows) return -1;
    rows *= a.shape(d);
  }
  return ld < 0 ? K : ld;
}

// A contiguous copy (any dtype) of a strided 2-D array.
inline std::vector<char> contiguous_bytes(const mx::array& a) {
  size_t isz = a.itemsize();
  std::vector<char> out(a.size() * isz);
  const char* p = a.data<char>();
  for (size_t i = 0; i < a.size(); ++i)
    std::memcpy(out.data() + i * isz, p + elem_loc(int64_t(i), a) * isz, isz);
  return out;
}

// Copies of strided operands that a Weight points into (rare: views with a
// non-contiguous last axis); they live as long as the Weight is used.
struct WeightKeep {
  std::vector<char> w, s, b, bias;
};

// A Weight over in[i], in[i+1], ... : w, then [scales, biases] when bits > 0,
// then [bias] when has_bias; advances i past them.
inline Weight bind_weight(const std::vector<mx::array>& in, size_t& i, int gs, int bits,
                          bool has_bias, WeightKeep& keep) {
  const mx::array& w = in[i++];
  Weight W;
  W.bits = bits;
  W.gs = gs;
  W.N = w.shape(0);
  auto ptr = [](const mx::array& a, std::vector<char>& hold, int64_t& ld) -> const void* {
    ld = row_stride(a);
    if (ld >= 0) return a.data<void>();
    hold = contiguous_bytes(a);
    ld = a.shape(1);
    return hold.data();
  };
  W.w = ptr(w, keep.w, W.w_ld);
  if (bits) {
    const mx::array& sc = in[i++];
    const mx::array& bi = in[i++];
    W.K = int(w.shape(1) * 32 / bits);
    int64_t bld = 0;
    W.s = ptr(sc, keep.s, W.sb_ld);
    W.b = ptr(bi, keep.b, bld);
    W.st = elt_of(sc.dtype());
    if (bi.dtype() != sc.dtype())
      throw std::invalid_argument("mlxcy cpu linear: scales and biases differ in dtype");
    if (bld != W.sb_ld) {   // make both contiguous so that one stride serves
      keep.s = contiguous_bytes(sc);
      keep.b = contiguous_bytes(bi);
      W.s = keep.s.data();
      W.b = keep.b.data();
      W.sb_ld = sc.shape(1);
    }
  } else {
    W.K = w.shape(1);
    W.wt = elt_of(w.dtype());
  }
  if (has_bias) {
    const mx::array& bias = in[i++];
    W.bias_t = elt_of(bias.dtype());
    if (bias.flags().row_contiguous) {
      W.bias = bias.data<void>();
    } else {
      keep.bias = contiguous_bytes(bias);
      W.bias = keep.bias.data();
    }
  }
  return W;
}

// Float32 results into `out` (any float dtype), element by element.
inline void store_f32(const float* y, mx::array& out) {
  if (out.dtype() == mx::float32) {
    std::memcpy(out.data<float>(), y, out.nbytes());
    return;
  }
  Elt ot = elt_of(out.dtype());
  void* o = out.data<void>();
  for (size_t i = 0; i < out.size(); ++i) store_elt(o, ot, int64_t(i), y[i]);
}

// inputs: x, w, [scales, biases,] [bias]; out: x's leading shape + [N].
inline void linear_eval(const std::vector<mx::array>& in, mx::array& out, int gs, int bits,
                        bool has_bias) {
  const mx::array& x = in[0];
  size_t i = 1;
  WeightKeep keep;
  Weight W = bind_weight(in, i, gs, bits, has_bias, keep);
  const int M = int(x.size() / W.K);
  const int L = x.ndim() >= 3 ? x.shape(-2) : M;   // positions per sequence
  auto product = L <= kStepPositions ? linear_step : linear_f32;
  std::vector<float> xbuf;
  const float* xf = as_f32(x, xbuf);
  if (out.dtype() == mx::float32) {
    product(W, xf, M, out.data<float>(), W.N);
  } else {
    std::vector<float> ybuf(size_t(M) * W.N);
    product(W, xf, M, ybuf.data(), W.N);
    store_f32(ybuf.data(), out);
  }
}

// The MLX primitive: x @ W.T (+ bias), W quantized (bits 2-8) or float (bits 0).
// A CPU primitive's eval_cpu, as MLX's own CPU kernels run: the outputs
// allocated, every array registered with stream s's encoder, and f(inputs,
// outputs) queued on the stream's thread over weak copies (the graph keeps
// the arrays alive until the task has run).
template <class F>
void cpu_dispatch(mx::Stream s, const std::vector<mx::array>& inputs,
                  std::vector<mx::array>& outputs, F f) {
  auto& enc = mx::cpu::get_command_encoder(s);
  std::vector<mx::array> ins, outs;
  ins.reserve(inputs.size());
  for (auto& a : inputs) {
    enc.set_input_array(a);
    ins.push_back(mx::array::unsafe_weak_copy(a));
  }
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    enc.set_output_array(o);
    outs.push_back(mx::array::unsafe_weak_copy(o));
  }
  enc.dispatch([ins = std::move(ins), outs = std::move(outs), f = std::move(f)]() mutable {
    f(ins, outs);
  });
}

// The same for a UnaryPrimitive: f(inputs, out).
template <class F>
void cpu_dispatch(mx::Stream s, const std::vector<mx::array>& inputs, mx::array& out, F f) {
  std::vector<mx::array> outputs{out};   // a handle: out's data is set through it
  cpu_dispatch(s, inputs, outputs,
               [f = std::move(f)](std::vector<mx::array>& in, std::vector<mx::array>& o) mutable {
                 f(in, o[0]);
               });
}

class Linear : public mx::UnaryPrimitive {
 public:
  Linear(mx::Stream s, int group_size, int bits, bool has_bias)
      : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits), has_bias_(has_bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    cpu_dispatch(stream(), inputs, out,
                 [gs = gs_, bits = bits_, hb = has_bias_](auto& in, mx::array& y) {
                   linear_eval(in, y, gs, bits, hb);
                 });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlxcy cpu linear: this primitive runs on the CPU only");
  }

  // Backward: dx = cot @ W (W dequantized, by MLX ops); dbias = cot summed
  // over the leading axes.  No gradient for the (quantized) weight itself.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    std::vector<mx::array> grads;
    const mx::array& cot = cotangents[0];
    int bias_arg = bits_ ? 4 : 2;
    for (int a : argnums) {
      if (a == 0) {
        // float16 scales with float32 x: dequantize in float32 (exact), as the kernel reads them
        auto wide = [&](const mx::array& t) {
          return primals[0].dtype() == mx::float32 && t.dtype() != mx::float32
                     ? mx::astype(t, mx::float32, stream())
                     : t;
        };
        mx::array wd = bits_ ? mx::dequantize(primals[1], wide(primals[2]), wide(primals[3]),
                                              gs_, bits_, "affine", std::nullopt, std::nullopt,
                                              stream())
                             : primals[1];
        grads.push_back(mx::astype(mx::matmul(cot, wd, stream()), primals[0].dtype(), stream()));
      } else if (has_bias_ && a == bias_arg) {
        std::vector<int> axes(cot.ndim() - 1);
        std::iota(axes.begin(), axes.end(), 0);
        grads.push_back(mx::astype(mx::sum(cot, axes, false, stream()), primals[a].dtype(),
                                   stream()));
      } else if (!bits_ && a == 1) {
        // float weight: dW = cot^T @ x over the flattened leading axes
        int N = primals[1].shape(0), K = primals[1].shape(1);
        mx::array c2 = mx::reshape(cot, {-1, N}, stream());
        mx::array x2 = mx::reshape(primals[0], {-1, K}, stream());
        grads.push_back(mx::astype(mx::matmul(mx::transpose(c2, stream()), x2, stream()),
                                   primals[1].dtype(), stream()));
      } else {
        throw std::invalid_argument(
            "mlxcy cpu linear: no gradient with respect to a quantized weight, its scales or "
            "its biases");
      }
    }
    return grads;
  }

  const char* name() const override { return "MlxcyCpuLinear"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Linear*>(&other);
    return o && o->gs_ == gs_ && o->bits_ == bits_ && o->has_bias_ == has_bias_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape s = inputs[0].shape();
    s.back() = inputs[1].shape(0);
    return {s};
  }

 private:
  int gs_, bits_;
  bool has_bias_;
};

inline bool is_float(mx::Dtype t) {
  return t == mx::float32 || t == mx::bfloat16 || t == mx::float16;
}

// Can the kernels take this layer?  (Else callers use MLX's ops.)
inline bool linear_supported(const mx::array& x, const mx::array& w, const mx::array* scales,
                             int group_size, int bits) {
  if (!is_float(x.dtype()) || w.ndim() != 2 || x.ndim() < 1) return false;
  if (scales) {
    if (!supported_bits(bits)) return false;
    if (group_size != 32 && group_size != 64 && group_size != 128) return false;
    if (w.dtype() != mx::uint32 || !is_float(scales->dtype())) return false;
    return x.shape(-1) == int64_t(w.shape(1)) * 32 / bits;
  }
  return is_float(w.dtype()) && x.shape(-1) == w.shape(1);
}

// y = x @ dequantize(w).T (+ bias), on the CPU stream.  Output dtype: x's
// promoted with the scales' (quantized) or the weight's (float) dtype.
inline mx::array linear(const mx::array& x, const mx::array& w, const mx::array* scales,
                        const mx::array* biases, int group_size, int bits,
                        const mx::array* bias) {
  if (!linear_supported(x, w, scales, group_size, bits))
    throw std::invalid_argument("mlxcy cpu linear: unsupported shapes, dtypes, bits (" +
                                std::to_string(bits) + ") or group size (" +
                                std::to_string(group_size) + ")");
  if (scales && !biases)
    throw std::invalid_argument("mlxcy cpu linear: affine quantization needs biases");
  int N = w.shape(0);
  if (bias && (bias->ndim() != 1 || bias->shape(0) != N || !is_float(bias->dtype())))
    throw std::invalid_argument("mlxcy cpu linear: bias must be a float vector of length " +
                                std::to_string(N));
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> inputs = {x, w};
  mx::Dtype od = mx::promote_types(x.dtype(), scales ? scales->dtype() : w.dtype());
  if (scales) {
    inputs.push_back(*scales);
    inputs.push_back(*biases);
  }
  if (bias) {
    inputs.push_back(*bias);
    od = mx::promote_types(od, bias->dtype());
  }
  mx::Shape shape = x.shape();
  shape.back() = N;
  return mx::array(std::move(shape), od,
                   std::make_shared<Linear>(s, scales ? group_size : 0, scales ? bits : 0,
                                            bias != nullptr),
                   std::move(inputs));
}

}  // namespace mlxcy::cpu
