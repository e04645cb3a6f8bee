// Decode-time matrix-vector products (a few rows of activations against a
// weight matrix) as mlxcy's own CUDA kernels, with the pieces of a decoder
// block that sit around them fused in:
//
//   y = epilogue( prologue(x) @ W.T )
//
//   prologue  NORM: x -> w_norm * rms_norm(x)        (the block's RMSNorms)
//   W         bf16/fp16/fp32 [N, K], or MLX's affine 4/8-bit layout
//             (uint32 [N, K*bits/32], scales and biases [N, K/group])
//   epilogue  BIAS: + b;  ACT: act(gate) * up from the two halves of a fused
//             gate/up weight (SiLU or gelu-tanh);  RES: + residual
//
// On a CUDA GPU one decode step of a standard pre-norm block is then four of
// these launches (norm+qkv, o_proj+residual, norm+gate/up+act, down+residual)
// instead of eight MLX kernels, and each launch streams its weight once.
// (Off by default: through mx::fast::cuda_kernel each launch costs about twice
// the host time of an MLX op, which cancels the saving -- docs/benchmarks.md,
// "GPU decode kernels of our own".)
//
// The kernels are MLX custom CUDA kernels (mx::fast::cuda_kernel: compiled by
// NVRTC on first use for each shape, cached on disk by MLX); nothing here is
// compiled by the host compiler except the launch code, so CPU builds are
// unaffected.  tools/check_gpu_kernels.py compiles the device code below with
// nvcc for a set of instantiations (a check that needs no GPU).
//
// Work split: a block of 256 threads (8 warps) computes 8/KS output units;
// each unit's K axis is split over KS warps; each lane streams 16-byte chunks
// of the weight row (8 bf16 values, or 32 4-bit / 16 8-bit values within one
// quantization group), U chunks in flight at a time.  Activation rows come in
// tiles of RT rows (blockIdx.y); a tile's rows reuse each weight chunk loaded.
#pragma once

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include <mlx/fast.h>
#include <mlx/mlx.h>

#include "mlxcy/fused.h"   // cuda_default_device()

namespace mlxcy {
namespace mx = mlx::core;

// ---- device code ------------------------------------------------------------
// (file scope of the NVRTC program; T etc. are template parameters here and
// become constexprs in the generated kernel body below; the row counts B and
// NOUT are run-time values, so one compiled kernel serves every batch size
// within a row tile and every output width)
inline const char* gemv_device_source() {
  return R"CUDA(
namespace mlxcy_gpu {

// n consecutive values of T (n * sizeof(T) a multiple of 16 bytes, p 16-byte
// aligned) as floats
template <typename T, int n>
__device__ __forceinline__ void load_floats(const T* p, float* f) {
  constexpr int per = 16 / sizeof(T);
#pragma unroll
  for (int c = 0; c < n / per; ++c) {
    uint4 u = *reinterpret_cast<const uint4*>(p + c * per);
    const T* t = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < per; ++i) f[c * per + i] = static_cast<float>(t[i]);
  }
}

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// ACT 1: silu(g) * u; ACT 2: gelu_tanh(g) * u -- each op rounded to T, as
// MLX's compiled elementwise kernels of the unfused path do
template <typename T, int ACT>
__device__ __forceinline__ float activate(float g, float u) {
  float a;
  if (ACT == 1) {
    float s = round_to<T>(1.0f / (1.0f + __expf(-g)));
    a = round_to<T>(g * s);
  } else {
    float inner = round_to<T>(0.7978845608028654f * round_to<T>(g + round_to<T>(
        0.044715f * round_to<T>(g * round_to<T>(g * g)))));
    a = round_to<T>(round_to<T>(0.5f * g) * round_to<T>(1.0f + round_to<T>(tanhf(inner))));
  }
  return round_to<T>(a * u);
}

// y[b, n] for b < B, n < NOUT.  BITS 0: w is T [NM*NOUT, K]; 4 or 8: w is
// uint32 [NM*NOUT, K*BITS/32] with scales/qb T [NM*NOUT, K/GS].  NM = 2 when
// ACT (gate rows first, then up rows), else 1.
template <typename T, int K, int KS, int RT, int BITS, int GS, bool NORM, bool BIAS,
          bool RES, int ACT>
__device__ __forceinline__ void gemv(const T* x, int B, int NOUT, const T* nw, float eps,
                                     const void* wv, const T* sc, const T* qb,
                                     const T* bias, const T* res, T* y) {
  constexpr int WARPS = 8;
  constexpr int UPB = WARPS / KS;                         // output units per block
  constexpr int NM = ACT ? 2 : 1;                         // weight rows per unit
  constexpr bool Q = BITS > 0;
  constexpr int XV = 16 / sizeof(T);                      // T values per 16 bytes
  constexpr int VALS = Q ? 128 / BITS : XV;               // values per weight chunk
  constexpr int CH = K / VALS;                            // chunks per weight row
  constexpr int STRIDE = KS * 32;
  constexpr int ITERS = (CH + STRIDE - 1) / STRIDE;
  constexpr int U = ITERS < 4 ? ITERS : 4;                // chunks in flight per lane
  constexpr int NG = K / (GS > 0 ? GS : 1);               // groups per row
  static_assert(K % VALS == 0, "K must be a multiple of the chunk");
  static_assert(!Q || GS % VALS == 0, "a chunk must lie in one group");

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int unit = blockIdx.x * UPB + warp / KS;
  const int ks = warp % KS;
  const int b0 = blockIdx.y * RT;
  const int nb = min(RT, B - b0);
  const bool active = unit < NOUT;

  __shared__ float inv_s[RT];
  __shared__ float red[WARPS][NM * RT];

  if (NORM) {   // rsqrt(mean(x^2) + eps) of the tile's rows, a warp per row
    for (int b = warp; b < nb; b += WARPS) {
      const T* xr = x + (size_t)(b0 + b) * K;
      float ss = 0.0f;
      for (int k = lane * XV; k < K; k += 32 * XV) {
        float f[XV];
        load_floats<T, XV>(xr + k, f);
#pragma unroll
        for (int i = 0; i < XV; ++i) ss += f[i] * f[i];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (lane == 0) inv_s[b] = rsqrtf(ss / K + eps);
    }
    __syncthreads();
  }

  float acc[NM][RT];
#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int b = 0; b < RT; ++b) acc[m][b] = 0.0f;

  if (active) {
    const uint4* w4 = reinterpret_cast<const uint4*>(wv);
    const int first = ks * 32 + lane;
    for (int it0 = 0; it0 < ITERS; it0 += U) {
      uint4 wq[U][NM];
      float s[U][NM], z[U][NM];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = first + (it0 + u) * STRIDE;
        if (it0 + u < ITERS && c < CH) {
#pragma unroll
          for (int m = 0; m < NM; ++m) {
            const size_t row = (size_t)(unit + m * NOUT);
            wq[u][m] = w4[row * CH + c];
            if (Q) {
              const size_t g = row * NG + (c * VALS) / (GS > 0 ? GS : 1);
              s[u][m] = static_cast<float>(sc[g]);
              z[u][m] = static_cast<float>(qb[g]);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = first + (it0 + u) * STRIDE;
        if (!(it0 + u < ITERS && c < CH)) continue;
        const int k0 = c * VALS;
        float d[NM][RT], sx[RT];
#pragma unroll
        for (int b = 0; b < RT; ++b) {
          sx[b] = 0.0f;
#pragma unroll
          for (int m = 0; m < NM; ++m) d[m][b] = 0.0f;
        }
#pragma unroll
        for (int sub = 0; sub < VALS / XV; ++sub) {
          float wf[NM][XV];
#pragma unroll
          for (int m = 0; m < NM; ++m) {
            if (Q) {
              const uint32_t* words = reinterpret_cast<const uint32_t*>(&wq[u][m]);
#pragma unroll
              for (int i = 0; i < XV; ++i) {
                const int e = sub * XV + i;                 // value index in the chunk
                const int per = 32 / (BITS > 0 ? BITS : 32);
                wf[m][i] = static_cast<float>(
                    (words[e / per] >> ((e % per) * BITS)) & ((1u << BITS) - 1u));
              }
            } else {
              const T* t = reinterpret_cast<const T*>(&wq[u][m]);
#pragma unroll
              for (int i = 0; i < XV; ++i) wf[m][i] = static_cast<float>(t[i]);
            }
          }
          float nf[XV];
          if (NORM) load_floats<T, XV>(nw + k0 + sub * XV, nf);
#pragma unroll
          for (int b = 0; b < RT; ++b) {
            if (b < nb) {
              float xf[XV];
              load_floats<T, XV>(x + (size_t)(b0 + b) * K + k0 + sub * XV, xf);
              if (NORM) {   // w_norm * T(x * inv), as MLX's RMSNorm rounds
                const float inv = inv_s[b];
#pragma unroll
                for (int i = 0; i < XV; ++i) xf[i] = round_to<T>(nf[i] * round_to<T>(xf[i] * inv));
              }
#pragma unroll
              for (int i = 0; i < XV; ++i) {
                if (Q) sx[b] += xf[i];
#pragma unroll
                for (int m = 0; m < NM; ++m) d[m][b] = fmaf(wf[m][i], xf[i], d[m][b]);
              }
            }
          }
        }
#pragma unroll
        for (int m = 0; m < NM; ++m)
#pragma unroll
          for (int b = 0; b < RT; ++b)
            acc[m][b] += Q ? s[u][m] * d[m][b] + z[u][m] * sx[b] : d[m][b];
      }
    }
  }

#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int b = 0; b < RT; ++b) {
      float v = acc[m][b];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) red[warp][m * RT + b] = v;
    }
  __syncthreads();

  if (!active || ks != 0 || lane >= nb) return;
  const int b = lane;
  float v[NM];
#pragma unroll
  for (int m = 0; m < NM; ++m) {
    float t = 0.0f;
#pragma unroll
    for (int j = 0; j < KS; ++j) t += red[warp + j][m * RT + b];
    t = round_to<T>(t);                                   // the matmul's output
    if (BIAS) t = round_to<T>(t + static_cast<float>(bias[unit + m * NOUT]));
    v[m] = t;
  }
  float out = v[0];
  if (ACT) out = activate<T, ACT>(v[0], v[NM - 1]);
  const size_t o = (size_t)(b0 + b) * NOUT + unit;
  if (RES) out = static_cast<float>(res[o]) + out;
  y[o] = static_cast<T>(out);
}

}  // namespace mlxcy_gpu
)CUDA";
}

// The generated kernel's body (MLX declares the inputs x, nw, w, scales,
// qbiases, bias, res, the output y and the template constants before it).
inline const char* gemv_body_source() {
  return R"CUDA(
  mlxcy_gpu::gemv<T, K, KS, RT, BITS, GS, NORM, BIAS, RES, ACT>(
      x, x_shape[0], w_shape[0] / (ACT ? 2 : 1), nw, __int_as_float(EPS_BITS), w, scales,
      qbiases, bias, res, y);
)CUDA";
}

// ---- launch -----------------------------------------------------------------

// Optional parts of a gemv call (NULL / 0 when absent).
struct GemvArgs {
  const mx::array* scales = nullptr;   // quantized: scales and biases (MLX affine)
  const mx::array* qbiases = nullptr;
  int bits = 0;                        // 0: plain weight; 4 or 8: quantized
  int group_size = 0;
  const mx::array* bias = nullptr;     // [N]
  const mx::array* norm = nullptr;     // [K]: RMSNorm weight of the prologue
  float eps = 1e-5f;
  const mx::array* residual = nullptr; // same shape as the output
  int act = 0;                         // 1 SiLU, 2 gelu-tanh: gate/up halves
};

// Most activation rows a gemv call takes (more rows: MLX's GEMMs do better).
inline int& gemv_max_rows() {
  static int rows = 16;
  return rows;
}

// Whether gemv runs a kernel of ours for activations of dtype T with K
// features in `rows` rows against w; the reason it does not in *why.
inline bool gemv_supported(mx::Dtype T, int K, long rows, const mx::array& w,
                           const GemvArgs& a, std::string* why = nullptr) {
  auto no = [&](const char* r) {
    if (why) *why = r;
    return false;
  };
  if (!cuda_default_device()) return no("the default device is not a CUDA GPU");
  if (T != mx::bfloat16 && T != mx::float16 && T != mx::float32)
    return no("x must be bfloat16, float16 or float32");
  if (K <= 0 || rows <= 0) return no("x is empty");
  if (rows > gemv_max_rows()) return no("more rows than gemv_max_rows()");
  if (w.ndim() != 2) return no("w must be 2-D");
  int N = w.shape(0);
  if (a.act < 0 || a.act > 2) return no("act must be 0, 1 or 2");
  if (a.act && N % 2) return no("a gate/up weight needs an even number of rows");
  int xv = 16 / static_cast<int>(mx::size_of(T));
  if (a.bits) {
    if (a.bits != 4 && a.bits != 8) return no("only 4- and 8-bit weights");
    if (w.dtype() != mx::uint32) return no("quantized weights must be uint32");
    if (!a.scales || !a.qbiases) return no("quantized weights need scales and biases");
    int vals = 128 / a.bits;
    if (a.group_size <= 0 || a.group_size % vals || K % a.group_size)
      return no("unsupported group size");
    if (static_cast<long>(w.shape(1)) * 32 != static_cast<long>(K) * a.bits)
      return no("w does not match x's last axis");
    int ng = K / a.group_size;
    for (auto* s : {a.scales, a.qbiases})
      if (s->dtype() != T || s->ndim() != 2 || s->shape(0) != N || s->shape(1) != ng)
        return no("scales/biases must be [N, K/group] in x's dtype");
    if (vals % xv) return no("chunk size");
  } else {
    if (w.dtype() != T) return no("w must have x's dtype");
    if (w.shape(1) != K) return no("w does not match x's last axis");
    if (K % xv) return no("K must be a multiple of 16 bytes of x");
  }
  if (a.bias && (a.bias->dtype() != T || a.bias->ndim() != 1 || a.bias->shape(0) != N))
    return no("bias must be [N] in x's dtype");
  if (a.norm && (a.norm->dtype() != T || a.norm->ndim() != 1 || a.norm->shape(0) != K))
    return no("norm weight must be [K] in x's dtype");
  if (a.residual) {
    if (a.residual->dtype() != T) return no("residual must have x's dtype");
    if (static_cast<long>(a.residual->size()) != rows * (a.act ? N / 2 : N))
      return no("residual must have the output's size");
  }
  return true;
}

inline bool gemv_supported(const mx::array& x, const mx::array& w, const GemvArgs& a,
                           std::string* why = nullptr) {
  if (x.ndim() < 1 || x.size() == 0) {
    if (why) *why = "x is empty";
    return false;
  }
  int K = x.shape(-1);
  return gemv_supported(x.dtype(), K, static_cast<long>(x.size() / K), w, a, why);
}

// K-split: enough warps in flight to cover the memory latency (about 16 per
// SM on an H200), but at least one 16-byte chunk per lane.
inline int gemv_ksplit(int nout, int chunks) {
  int ks = 1;
  while (ks < 8 && static_cast<long>(nout) * ks < 2048 && chunks >= ks * 2 * 32) ks *= 2;
  return ks;
}

// y as described at the top of this file; shape x.shape[:-1] + [N or N/2].
// Call gemv_supported first (this throws where it would say no).
inline mx::array gemv(const mx::array& x, const mx::array& w, const GemvArgs& a) {
  std::string why;
  if (!gemv_supported(x, w, a, &why)) throw std::invalid_argument("gemv: " + why);
  static auto fn = mx::fast::cuda_kernel(
      "mlxcy_gemv", {"x", "nw", "w", "scales", "qbiases", "bias", "res"}, {"y"},
      gemv_body_source(), gemv_device_source());
  int K = x.shape(-1);
  int rows = static_cast<int>(x.size() / K);
  int N = w.shape(0);
  int nout = a.act ? N / 2 : N;
  auto T = x.dtype();
  int vals = a.bits ? 128 / a.bits : 16 / static_cast<int>(mx::size_of(T));
  int ks = gemv_ksplit(nout, K / vals);
  int rt = 1;
  while (rt < rows && rt < 8) rt *= 2;
  int upb = 8 / ks;
  int blocks = (nout + upb - 1) / upb;
  int tiles = (rows + rt - 1) / rt;
  int eps_bits;
  std::memcpy(&eps_bits, &a.eps, sizeof(eps_bits));
  auto x2 = mx::reshape(x, {rows, K});
  auto pick = [&](const mx::array* p) { return p ? *p : x2; };   // x: an unread filler
  std::vector<mx::array> in = {x2, pick(a.norm), w, pick(a.scales), pick(a.qbiases),
                               pick(a.bias),
                               a.residual ? mx::reshape(*a.residual, {rows, nout}) : x2};
  auto y = fn(in, {mx::Shape{rows, nout}}, {T}, {blocks * 256, tiles, 1}, {256, 1, 1},
              {{"T", T}, {"K", K}, {"KS", ks}, {"RT", rt},
               {"BITS", a.bits}, {"GS", a.bits ? a.group_size : 0},
               {"NORM", a.norm != nullptr}, {"BIAS", a.bias != nullptr},
               {"RES", a.residual != nullptr}, {"ACT", a.act}, {"EPS_BITS", eps_bits}},
              std::nullopt, false, {})[0];
  auto shape = x.shape();
  shape.back() = nout;
  return mx::reshape(y, shape);
}

}  // namespace mlxcy
