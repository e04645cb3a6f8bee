// A decode step of a pre-norm decoder block (Llama, Qwen2, Mistral, SmolLM2)
// on the CPU in two MLX primitives instead of ~25 ops.
//
// The unfused step runs, per block: RMSNorm, the fused q/k/v product, a
// reshape, a transpose, four slices, RoPE, the cache's two writes and two
// views, attention, a transpose, a reshape, o_proj, an add, RMSNorm, the fused
// gate/up product, two slices, SwiGLU, down_proj and an add.  On MLX's CPU
// backend every op costs graph building, scheduling, an allocation and a
// dispatch to the stream thread (perf on SmolLM2-135M: libmlx + malloc + the
// kernel's futex wake-ups took ~40% of a decode step).  Here:
//
//   BlockQKV      x -> RMSNorm -> x @ Wqkv.T (+ bias) -> RoPE on the q and k
//                 heads -> q [B, H, 1, D], k [B, Hkv, 1, D], v [B, Hkv, 1, D]
//   (the cache's writes and views stay MLX ops: the cache owns its buffers)
//   BlockAttnMLP  attention of q over the cache views -> o_proj -> + x ->
//                 RMSNorm -> gate/up product -> act(gate) * up -> down_proj
//                 -> + h: the block's output [B, 1, hidden]
//
// Every intermediate is rounded to the dtype the unfused ops would give it
// (float32 models: no rounding), so bf16 models follow the unfused path's
// numerics.  Inference only: the primitives have no vjp (training runs the
// unfused ops: these are used for one-token steps over a cache).
#pragma once

#include <cmath>
#include <vector>

#include "mlxcy/cpu_attention.h"
#include "mlxcy/cpu_quant.h"

namespace mlxcy::cpu {

// A linear layer's operands as the model holds them (pointers into the
// layer; bits 0: float weight).
struct LinearArg {
  const mx::array* w = nullptr;
  const mx::array* scales = nullptr;
  const mx::array* biases = nullptr;
  const mx::array* bias = nullptr;
  int gs = 0;
  int bits = 0;
};

struct LinearDesc {
  int gs = 0, bits = 0;
  bool has_bias = false;
  bool operator==(const LinearDesc& o) const {
    return gs == o.gs && bits == o.bits && has_bias == o.has_bias;
  }
};

inline LinearDesc desc_of(const LinearArg& a) {
  return LinearDesc{a.scales ? a.gs : 0, a.scales ? a.bits : 0, a.bias != nullptr};
}

inline void push_linear(std::vector<mx::array>& in, const LinearArg& a) {
  in.push_back(*a.w);
  if (a.scales) {
    in.push_back(*a.scales);
    in.push_back(*a.biases);
  }
  if (a.bias) in.push_back(*a.bias);
}

// The dtype of the unfused layer's output for an input of dtype t.
inline mx::Dtype linear_dtype(mx::Dtype t, const LinearArg& a) {
  mx::Dtype d = mx::promote_types(t, a.scales ? a.scales->dtype() : a.w->dtype());
  return a.bias ? mx::promote_types(d, a.bias->dtype()) : d;
}

inline bool linear_arg_ok(const LinearArg& a, int in_features, int out_features) {
  if (!a.w || a.w->ndim() != 2 || a.w->shape(0) != out_features) return false;
  if (a.scales && !a.biases) return false;
  int k = a.scales ? int(int64_t(a.w->shape(1)) * 32 / a.bits) : a.w->shape(1);
  if (k != in_features) return false;
  if (a.scales) {
    if (!supported_bits(a.bits) || (a.gs != 32 && a.gs != 64 && a.gs != 128)) return false;
    if (a.w->dtype() != mx::uint32 || !is_float(a.scales->dtype())) return false;
    if (a.biases->dtype() != a.scales->dtype()) return false;
  } else if (!is_float(a.w->dtype())) {
    return false;
  }
  if (a.bias && (a.bias->ndim() != 1 || a.bias->shape(0) != out_features ||
                 !is_float(a.bias->dtype())))
    return false;
  return true;
}

// v[0..n) rounded to dtype t, as storing to and reloading from an array of t.
inline void round_to(float* v, size_t n, Elt t) {
  if (t == Elt::F32) return;
  for (size_t i = 0; i < n; ++i) {
    if (t == Elt::BF16) v[i] = bf16_to_f(f_to_bf16(v[i]));
    else v[i] = static_cast<float>(static_cast<mx::float16_t>(v[i]));
  }
}

// y = x / sqrt(mean(x^2) + eps) * w for each of M rows of length D.
inline void rms_norm_rows(const float* x, int M, int D, const mx::array& w, float eps,
                          float* y) {
  std::vector<float> wb;
  const float* wf = as_f32(w, wb);
  for (int m = 0; m < M; ++m) {
    const float* xr = x + int64_t(m) * D;
    float* yr = y + int64_t(m) * D;
    float acc = 0;
    for (int i = 0; i < D; ++i) acc += xr[i] * xr[i];
    const float r = 1.0f / std::sqrt(acc / float(D) + eps);
    for (int i = 0; i < D; ++i) yr[i] = wf[i] * (xr[i] * r);
  }
}

// RoPE (non-traditional: the rotated pairs are i and i + dims/2) at one
// position, in place on `heads` heads of D values: MLX's RoPE formula
// (inverse frequencies exp(-j log(base) / (dims/2)), or 1 / freqs[j]).
inline void rope_heads(float* x, int heads, int D, int dims, float base, float scale,
                       const float* freqs, int position) {
  const int half = dims / 2;
  std::vector<float> c(half), s(half);
  const float pos = float(position) * scale;
  const float lb = std::log(base);
  for (int j = 0; j < half; ++j) {
    const float inv = freqs ? 1.0f / freqs[j] : std::exp(float(-j) * lb / float(half));
    const float th = pos * inv;
    c[j] = std::cos(th);
    s[j] = std::sin(th);
  }
  for (int h = 0; h < heads; ++h) {
    float* r = x + int64_t(h) * D;
    for (int j = 0; j < half; ++j) {
      const float x1 = r[j], x2 = r[j + half];
      r[j] = x1 * c[j] - x2 * s[j];
      r[j + half] = x1 * s[j] + x2 * c[j];
    }
  }
}

// -------------------------------------------------------------- BlockQKV ---

struct QKVParams {
  float eps;
  int H, Hkv, D;
  int rope_dims;
  float rope_base, rope_scale;
  bool has_freqs;
  int offset;
  LinearDesc qkv;
  mx::Dtype norm_dtype = mx::float32, out_dtype = mx::float32;
  bool operator==(const QKVParams& o) const {
    return eps == o.eps && H == o.H && Hkv == o.Hkv && D == o.D && rope_dims == o.rope_dims &&
           rope_base == o.rope_base && rope_scale == o.rope_scale &&
           has_freqs == o.has_freqs && offset == o.offset && qkv == o.qkv &&
           norm_dtype == o.norm_dtype && out_dtype == o.out_dtype;
  }
};

// inputs: x [B, 1, hidden], norm weight, the qkv layer's operands, [freqs];
// outputs: q, k, v ([B, heads, 1, D], out_dtype).
inline void block_qkv_eval(const std::vector<mx::array>& in, std::vector<mx::array>& out,
                           const QKVParams& p) {
  const mx::array& x = in[0];
  const int B = x.shape(0), hidden = x.shape(-1);
  size_t i = 2;
  WeightKeep keep;
  Weight W = bind_weight(in, i, p.qkv.gs, p.qkv.bits, p.qkv.has_bias, keep);
  std::vector<float> fb;
  const float* freqs = p.has_freqs ? as_f32(in[i], fb) : nullptr;
  std::vector<float> xb;
  const float* xf = as_f32(x, xb);
  std::vector<float> xn(size_t(B) * hidden), y(size_t(B) * W.N);
  rms_norm_rows(xf, B, hidden, in[1], p.eps, xn.data());
  round_to(xn.data(), xn.size(), elt_of(p.norm_dtype));
  linear_f32(W, xn.data(), B, y.data(), W.N);
  const Elt ot = elt_of(p.out_dtype);
  round_to(y.data(), y.size(), ot);
  const int D = p.D, nh = p.H + 2 * p.Hkv;
  for (int b = 0; b < B; ++b) {
    float* yb = y.data() + int64_t(b) * nh * D;
    rope_heads(yb, p.H + p.Hkv, D, p.rope_dims, p.rope_base, p.rope_scale, freqs, p.offset);
    round_to(yb, size_t(p.H + p.Hkv) * D, ot);
  }
  const int heads[3] = {p.H, p.Hkv, p.Hkv};
  const int first[3] = {0, p.H, p.H + p.Hkv};
  for (int o = 0; o < 3; ++o) {
    void* dst = out[o].data<void>();
    const int n = heads[o] * D;
    for (int b = 0; b < B; ++b) {
      const float* src = y.data() + (int64_t(b) * nh + first[o]) * D;
      for (int e = 0; e < n; ++e) store_elt(dst, ot, int64_t(b) * n + e, src[e]);
    }
  }
}

class BlockQKV : public mx::Primitive {
 public:
  BlockQKV(mx::Stream s, QKVParams p) : mx::Primitive(s), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    std::vector<mx::array> ins, outs;
    for (auto& a : inputs) {
      enc.set_input_array(a);
      ins.push_back(mx::array::unsafe_weak_copy(a));
    }
    for (auto& o : outputs) {
      o.set_data(mx::allocator::malloc(o.nbytes()));
      enc.set_output_array(o);
      outs.push_back(mx::array::unsafe_weak_copy(o));
    }
    enc.dispatch([ins = std::move(ins), outs = std::move(outs), p = p_]() mutable {
      block_qkv_eval(ins, outs, p);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlxcy block q/k/v: this primitive runs on the CPU only");
  }

  const char* name() const override { return "MlxcyBlockQKV"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const BlockQKV*>(&other);
    return o && o->p_ == p_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    int B = inputs[0].shape(0);
    return {{B, p_.H, 1, p_.D}, {B, p_.Hkv, 1, p_.D}, {B, p_.Hkv, 1, p_.D}};
  }

 private:
  QKVParams p_;
};

// Can BlockQKV run this step?  x [B, 1, hidden] float, a float norm weight
// [hidden], the qkv layer [(H + 2 Hkv) D, hidden], rope_dims even <= D.
inline bool block_qkv_supported(const mx::array& x, const mx::array& norm_w,
                                const LinearArg& qkv, int H, int Hkv, int D, int rope_dims,
                                const mx::array* freqs) {
  if (x.ndim() != 3 || x.shape(1) != 1 || !is_float(x.dtype())) return false;
  const int hidden = x.shape(2);
  if (norm_w.ndim() != 1 || norm_w.shape(0) != hidden || !is_float(norm_w.dtype())) return false;
  if (H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || rope_dims <= 0 || rope_dims > D ||
      rope_dims % 2)
    return false;
  if (freqs && (freqs->ndim() != 1 || freqs->shape(0) != rope_dims / 2 ||
                !is_float(freqs->dtype())))
    return false;
  return linear_arg_ok(qkv, hidden, (H + 2 * Hkv) * D);
}

inline std::vector<mx::array> block_qkv(const mx::array& x, const mx::array& norm_w, float eps,
                                        const LinearArg& qkv, int H, int Hkv, int D,
                                        int rope_dims, float rope_base, float rope_scale,
                                        const mx::array* freqs, int offset) {
  if (!block_qkv_supported(x, norm_w, qkv, H, Hkv, D, rope_dims, freqs))
    throw std::invalid_argument("mlxcy block q/k/v: unsupported shapes or dtypes");
  QKVParams p{eps, H, Hkv, D, rope_dims, rope_base, rope_scale, freqs != nullptr, offset,
              desc_of(qkv), mx::promote_types(x.dtype(), norm_w.dtype()), mx::float32};
  p.out_dtype = linear_dtype(p.norm_dtype, qkv);
  std::vector<mx::array> in = {x, norm_w};
  push_linear(in, qkv);
  if (freqs) in.push_back(*freqs);
  const int B = x.shape(0);
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays({{B, H, 1, D}, {B, Hkv, 1, D}, {B, Hkv, 1, D}},
                                {p.out_dtype, p.out_dtype, p.out_dtype},
                                std::make_shared<BlockQKV>(s, p), std::move(in));
}

// ---------------------------------------------------------- BlockAttnMLP ---

struct AttnMLPParams {
  float attn_scale, eps;
  int act;   // 0: SiLU (SwiGLU), 1: GELU with the tanh approximation
  LinearDesc o, gate_up, down;
  mx::Dtype attn_dtype = mx::float32, o_dtype = mx::float32, h_dtype = mx::float32,
            norm_dtype = mx::float32, gu_dtype = mx::float32, down_dtype = mx::float32,
            out_dtype = mx::float32;
  bool operator==(const AttnMLPParams& p) const {
    return attn_scale == p.attn_scale && eps == p.eps && act == p.act && o == p.o &&
           gate_up == p.gate_up && down == p.down && attn_dtype == p.attn_dtype &&
           o_dtype == p.o_dtype && h_dtype == p.h_dtype && norm_dtype == p.norm_dtype &&
           gu_dtype == p.gu_dtype && down_dtype == p.down_dtype && out_dtype == p.out_dtype;
  }
};

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

inline float gelu_tanh(float g) {
  const float c = 0.7978845608028654f;   // sqrt(2 / pi)
  return 0.5f * g * (1.0f + std::tanh(c * (g + 0.044715f * g * g * g)));
}

// inputs: q [B, H, 1, D], k, v [B, Hkv, T, D] (cache views), x [B, 1, hidden]
// (the block's input), o_proj's operands, the post-attention norm weight,
// gate_up's, down's; output [B, 1, hidden].
inline void block_attn_mlp_eval(const std::vector<mx::array>& in, mx::array& out,
                                const AttnMLPParams& p) {
  const mx::array &q = in[0], &k = in[1], &v = in[2], &x = in[3];
  const int B = q.shape(0), H = q.shape(1), D = q.shape(3), hidden = x.shape(-1);
  size_t i = 4;
  WeightKeep ko, kg, kd;
  Weight Wo = bind_weight(in, i, p.o.gs, p.o.bits, p.o.has_bias, ko);
  const mx::array& norm_w = in[i++];
  Weight Wg = bind_weight(in, i, p.gate_up.gs, p.gate_up.bits, p.gate_up.has_bias, kg);
  Weight Wd = bind_weight(in, i, p.down.gs, p.down.bits, p.down.has_bias, kd);
  const int I = Wd.K;
  std::vector<float> att(size_t(B) * H * D), h(size_t(B) * hidden), t(size_t(B) * hidden);
  std::vector<float> gu(size_t(B) * 2 * I), a(size_t(B) * I);
  decode_attention_f32(q, k, v, p.attn_scale, att.data());
  round_to(att.data(), att.size(), elt_of(p.attn_dtype));
  linear_f32(Wo, att.data(), B, t.data(), hidden);
  round_to(t.data(), t.size(), elt_of(p.o_dtype));
  std::vector<float> xb;
  const float* xf = as_f32(x, xb);
  for (size_t e = 0; e < h.size(); ++e) h[e] = xf[e] + t[e];
  round_to(h.data(), h.size(), elt_of(p.h_dtype));
  rms_norm_rows(h.data(), B, hidden, norm_w, p.eps, t.data());
  round_to(t.data(), t.size(), elt_of(p.norm_dtype));
  linear_f32(Wg, t.data(), B, gu.data(), 2 * I);
  const Elt gt = elt_of(p.gu_dtype);
  round_to(gu.data(), gu.size(), gt);
  for (int b = 0; b < B; ++b) {
    const float* g = gu.data() + int64_t(b) * 2 * I;
    const float* u = g + I;
    float* ab = a.data() + int64_t(b) * I;
    if (p.act == 0)
      for (int e = 0; e < I; ++e) ab[e] = silu(g[e]) * u[e];
    else
      for (int e = 0; e < I; ++e) ab[e] = gelu_tanh(g[e]) * u[e];
  }
  round_to(a.data(), a.size(), gt);
  linear_f32(Wd, a.data(), B, t.data(), hidden);
  round_to(t.data(), t.size(), elt_of(p.down_dtype));
  for (size_t e = 0; e < h.size(); ++e) h[e] += t[e];
  store_f32(h.data(), out);
}

class BlockAttnMLP : public mx::UnaryPrimitive {
 public:
  BlockAttnMLP(mx::Stream s, AttnMLPParams p) : mx::UnaryPrimitive(s), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    std::vector<mx::array> ins;
    for (auto& a : inputs) {
      enc.set_input_array(a);
      ins.push_back(mx::array::unsafe_weak_copy(a));
    }
    enc.set_output_array(out);
    enc.dispatch([ins = std::move(ins), out = mx::array::unsafe_weak_copy(out),
                  p = p_]() mutable { block_attn_mlp_eval(ins, out, p); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlxcy block attention + MLP: this primitive runs on the CPU only");
  }

  const char* name() const override { return "MlxcyBlockAttnMLP"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const BlockAttnMLP*>(&other);
    return o && o->p_ == p_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[3].shape()};
  }

 private:
  AttnMLPParams p_;
};

// The weights' part of BlockAttnMLP's checks (before the step touches the
// cache): x [B, 1, hidden], attention output width HD = H * D.
inline bool block_mlp_supported(const mx::array& x, int HD, const LinearArg& o,
                                const mx::array& norm_w, const LinearArg& gate_up,
                                const LinearArg& down) {
  if (x.ndim() != 3 || x.shape(1) != 1 || !is_float(x.dtype())) return false;
  const int hidden = x.shape(2);
  if (norm_w.ndim() != 1 || norm_w.shape(0) != hidden || !is_float(norm_w.dtype())) return false;
  if (!down.w || down.w->ndim() != 2) return false;
  const int I = down.scales ? int(int64_t(down.w->shape(1)) * 32 / down.bits) : down.w->shape(1);
  return linear_arg_ok(o, HD, hidden) && linear_arg_ok(gate_up, hidden, 2 * I) &&
         linear_arg_ok(down, I, hidden);
}

inline bool block_attn_mlp_supported(const mx::array& q, const mx::array& k,
                                     const mx::array& v, const mx::array& x,
                                     const LinearArg& o, const mx::array& norm_w,
                                     const LinearArg& gate_up, const LinearArg& down) {
  if (!attention_supported(q, k, v) || x.ndim() != 3 || x.shape(0) != q.shape(0)) return false;
  return block_mlp_supported(x, q.shape(1) * q.shape(3), o, norm_w, gate_up, down);
}

inline mx::array block_attn_mlp(const mx::array& q, const mx::array& k, const mx::array& v,
                                const mx::array& x, float attn_scale, const LinearArg& o,
                                const mx::array& norm_w, float eps, const LinearArg& gate_up,
                                const LinearArg& down, int act) {
  if (!block_attn_mlp_supported(q, k, v, x, o, norm_w, gate_up, down))
    throw std::invalid_argument("mlxcy block attention + MLP: unsupported shapes or dtypes");
  if (act != 0 && act != 1)
    throw std::invalid_argument("mlxcy block attention + MLP: act must be 0 (SiLU) or 1 (GELU)");
  AttnMLPParams p{attn_scale, eps, act, desc_of(o), desc_of(gate_up), desc_of(down)};
  p.attn_dtype = q.dtype();
  p.o_dtype = linear_dtype(p.attn_dtype, o);
  p.h_dtype = mx::promote_types(x.dtype(), p.o_dtype);
  p.norm_dtype = mx::promote_types(p.h_dtype, norm_w.dtype());
  p.gu_dtype = linear_dtype(p.norm_dtype, gate_up);
  p.down_dtype = linear_dtype(p.gu_dtype, down);
  p.out_dtype = mx::promote_types(p.h_dtype, p.down_dtype);
  std::vector<mx::array> in = {q, k, v, x};
  push_linear(in, o);
  in.push_back(norm_w);
  push_linear(in, gate_up);
  push_linear(in, down);
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), p.out_dtype, std::make_shared<BlockAttnMLP>(s, p), std::move(in));
}

}  // namespace mlxcy::cpu
