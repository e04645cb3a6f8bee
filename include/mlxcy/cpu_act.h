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
#include <mlx/allocator.h>
#include <mlx/backend/cpu/encoder.h>

#include "mlxcy/cpu_pool.h"
#include "mlxcy/cpu_quant.h"   // Elt, load_elt, store_elt, use_avx2, MLXCY_AVX2
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

// An evaluated array as rows of its last axis: contiguous within a row and
// `stride` elements between rows (a product's output or a column slice of one).
struct RowView {
  int64_t rows = 0, stride = 0;
};

inline bool row_view(const mx::array& a, RowView* v) {
  const int nd = a.ndim();
  if (nd < 1 || a.strides().back() != 1) return false;
  const int64_t I = a.shape(-1);
  int64_t rows = 1, stride = nd >= 2 ? a.strides()[nd - 2] : I;
  for (int d = nd - 2; d >= 0; --d) {   // the leading axes must flatten to one stride
    if (a.shape(d) != 1 && a.strides()[d] != stride * rows) return false;
    rows *= a.shape(d);
  }
  if (stride < I && rows > 1) return false;
  v->rows = rows;
  v->stride = stride;
  return true;
}

// Row r of a as float32 in buf (any strides).
inline void load_row(const mx::array& a, int64_t r, int I, float* buf) {
  const Elt t = elt_of(a.dtype());
  const void* p = a.data<void>();
  for (int e = 0; e < I; ++e) buf[e] = load_elt(p, t, elem_loc(r * I + e, a));
}

inline void act_eval(const mx::array& g, const mx::array& u, mx::array& out, int act) {
  RowView vg, vu;
  const bool rows_g = row_view(g, &vg), rows_u = row_view(u, &vu);
  const int I = g.shape(-1);
  const int64_t R = int64_t(g.size() / I);
  const Elt tg = elt_of(g.dtype()), to = elt_of(out.dtype());
  const bool f32 = tg == Elt::F32 && rows_g && rows_u;
  const char* gp = g.data<char>();
  const char* up = u.data<char>();
  char* op = out.data<char>();
  const size_t isz = g.itemsize();
  auto rows = [&](int r0, int r1) {
    thread_local std::vector<float> buf;
    buf.resize(size_t(3) * I);
    float *gf = buf.data(), *uf = gf + I, *of = uf + I;
    for (int r = r0; r < r1; ++r) {
      const void* gr = gp + r * vg.stride * isz;
      const void* ur = up + r * vu.stride * isz;
      void* orow = op + int64_t(r) * I * isz;
      if (f32) {
        act_row(static_cast<const float*>(gr), static_cast<const float*>(ur),
                static_cast<float*>(orow), I, act);
        continue;
      }
      if (rows_g) for (int e = 0; e < I; ++e) gf[e] = load_elt(gr, tg, e);
      else load_row(g, r, I, gf);
      if (rows_u) for (int e = 0; e < I; ++e) uf[e] = load_elt(ur, tg, e);
      else load_row(u, r, I, uf);
      act_row(gf, uf, of, I, act);
      for (int e = 0; e < I; ++e) store_elt(orow, to, e, of[e]);
    }
  };
  if (R * I < 32768) return rows(0, int(R));   // a pool round trip costs more
  parallel_rows(int(R), 1, rows, 2);
}

class Activation : public mx::UnaryPrimitive {
 public:
  Activation(mx::Stream s, int act) : mx::UnaryPrimitive(s), act_(act) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(inputs[0]);
    enc.set_input_array(inputs[1]);
    enc.set_output_array(out);
    enc.dispatch([g = mx::array::unsafe_weak_copy(inputs[0]),
                  u = mx::array::unsafe_weak_copy(inputs[1]),
                  out = mx::array::unsafe_weak_copy(out), act = act_]() mutable {
      act_eval(g, u, out, act);
    });
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
