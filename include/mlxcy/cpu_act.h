// The MLP's activation-times-up product, silu(g) * u or gelu_tanh(g) * u, on
// the CPU as one MLX primitive, in AVX2 with a vectorized exp.
//
// MLX 0.32's CPU backend runs the compiled activation one element at a time
// (simd::exp of width 1 and a scalar fma per op): perf on a SmolLM2-135M
// prompt of 128 tokens put ~16% of the forward in it.  Here each element is
// computed in float32 from g and u and rounded once to the output's dtype, as
// the decode-step primitives do (cpu_block.h uses act_row too).  The vjp
// differentiates the same math written with MLX ops (mlxcy/fused.h).
#pragma once

#include <cmath>
#include <vector>

#include <mlx/mlx.h>
#include <mlx/primitives.h>

#include "mlxcy/cpu_pool.h"
#include "mlxcy/cpu_quant.h"   // as_f32, store_f32, row_stride, cpu_dispatch, use_avx2
#include "mlxcy/fused.h"       // swiglu_impl, geglu_tanh_impl (the vjp's math)

namespace mlxcy::cpu {

enum Act { kSilu = 0, kGeluTanh = 1 };   // cpu_block.h's `act` values

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

inline float gelu_tanh(float g) {
  const float c = 0.7978845608028654f;   // sqrt(2 / pi)
  return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
}

#if MLXCY_X86
// e^x for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for e^r, 2^n put in the exponent; within 2 ulp of std::exp over
// the clamped range, which keeps 2^n finite and normal).
MLXCY_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

MLXCY_AVX2 inline __m256 act8(__m256 g, int act) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if (act == kSilu)   // g / (1 + e^-g)
    return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  // 0.5 g (1 + tanh(z)) = g - g / (1 + e^2z), z = c (g + 0.044715 g^3)
  const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
  const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                 _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
  const __m256 e2z = exp8(_mm256_add_ps(z, z));
  return _mm256_sub_ps(g, _mm256_div_ps(g, _mm256_add_ps(one, e2z)));
}

// out[e] = act(g[e]) * u[e] for e < n (float32 rows).
MLXCY_AVX2 inline void act_row_avx2(const float* g, const float* u, float* out, int n, int act) {
  int e = 0;
  for (; e + 8 <= n; e += 8)
    _mm256_storeu_ps(out + e, _mm256_mul_ps(act8(_mm256_loadu_ps(g + e), act),
                                            _mm256_loadu_ps(u + e)));
  for (; e < n; ++e) out[e] = (act == kSilu ? silu(g[e]) : gelu_tanh(g[e])) * u[e];
}
#endif

inline void act_row(const float* g, const float* u, float* out, int n, int act) {
#if MLXCY_X86
  if (use_avx2()) return act_row_avx2(g, u, out, n, act);
#endif
  for (int e = 0; e < n; ++e) out[e] = (act == kSilu ? silu(g[e]) : gelu_tanh(g[e])) * u[e];
}

inline void act_eval(const mx::array& g, const mx::array& u, mx::array& out, int act) {
  const int I = g.shape(-1);
  const int R = int(g.size() / I);
  int64_t gld = row_stride(g), uld = row_stride(u);
  std::vector<float> gb, ub, ob;
  const float* gp;
  const float* up;
  if (g.dtype() == mx::float32 && gld >= 0 && uld >= 0) {
    gp = g.data<float>();   // read in place: a product's output or a column slice of one
    up = u.data<float>();
  } else {                  // half types, other strides: contiguous float32 copies
    gp = as_f32(g, gb);
    up = as_f32(u, ub);
    gld = uld = I;
  }
  const bool f32 = out.dtype() == mx::float32;
  if (!f32) ob.resize(size_t(R) * I);
  float* op = f32 ? out.data<float>() : ob.data();
  auto rows = [&](int r0, int r1) {
    for (int r = r0; r < r1; ++r)
      act_row(gp + r * gld, up + r * uld, op + int64_t(r) * I, I, act);
  };
  if (int64_t(R) * I < 32768) rows(0, R);   // a pool round trip costs more
  else parallel_rows(R, 1, rows, 2);
  if (!f32) store_f32(ob.data(), out);      // one rounding to the output's dtype
}

class Activation : public mx::UnaryPrimitive {
 public:
  Activation(mx::Stream s, int act) : mx::UnaryPrimitive(s), act_(act) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    cpu_dispatch(stream(), inputs, out,
                 [act = act_](auto& in, mx::array& y) { act_eval(in[0], in[1], y, act); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlxcy activation: this primitive runs on the CPU only");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    auto f = act_ == kSilu ? swiglu_impl : geglu_tanh_impl;
    auto grads = mx::vjp(f, primals, cotangents).second;
    std::vector<mx::array> out;
    for (int a : argnums) out.push_back(grads[a]);
    return out;
  }

  const char* name() const override { return "MlxcyActivation"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Activation*>(&other);
    return o && o->act_ == act_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  int act_;
};

// g and u of one shape and float dtype (any strides).
inline bool act_supported(const mx::array& g, const mx::array& u) {
  return g.shape() == u.shape() && g.dtype() == u.dtype() && is_float(g.dtype()) &&
         g.ndim() >= 1 && g.size() > 0;
}

// act(g) * u (act: kSilu or kGeluTanh), as one primitive.
inline mx::array activation(const mx::array& g, const mx::array& u, int act) {
  if (!act_supported(g, u))
    throw std::invalid_argument(
        "mlxcy activation: need g and u of one shape and float dtype");
  if (act != kSilu && act != kGeluTanh)
    throw std::invalid_argument("mlxcy activation: act must be 0 (SiLU) or 1 (GELU tanh)");
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  return mx::array(g.shape(), g.dtype(), std::make_shared<Activation>(s, act), {g, u});
}

}  // namespace mlxcy::cpu
