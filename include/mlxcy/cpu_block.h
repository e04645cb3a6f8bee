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

#include "mlxcy/cpu_act.h"
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
  float eps = 0, qk_eps = 0;
  int H = 0, Hkv = 0, D = 0;
  int rope_dims = 0;
  float rope_base = 0, rope_scale = 1;
  bool has_freqs = false, has_qk_norm = false;
  bool has_offsets = false;   // rows at their own positions (a batch): offsets [B] int32
  int offset = 0;
  int nparts = 1;           // 1: one fused q/k/v layer; 3: q, k and v layers
  LinearDesc part[3];
  mx::Dtype norm_dtype = mx::float32;
  mx::Dtype out_dtype[3] = {mx::float32, mx::float32, mx::float32};   // q, k, v
  bool operator==(const QKVParams& o) const {
    bool same = eps == o.eps && qk_eps == o.qk_eps && H == o.H && Hkv == o.Hkv && D == o.D &&
                rope_dims == o.rope_dims && rope_base == o.rope_base &&
                rope_scale == o.rope_scale && has_freqs == o.has_freqs &&
                has_qk_norm == o.has_qk_norm && has_offsets == o.has_offsets &&
                offset == o.offset && nparts == o.nparts &&
                norm_dtype == o.norm_dtype;
    for (int i = 0; i < 3; ++i)
      same = same && part[i] == o.part[i] && out_dtype[i] == o.out_dtype[i];
    return same;
  }
};

// inputs: x [B, L, hidden] (L new positions from p.offset, or from
// offsets[b] for sequence b: one, or a speculative step's proposals), norm
// weight, the q/k/v layers' operands (one fused layer or three), [freqs],
// [q_norm, k_norm weights [D]], [offsets [B] int32]; outputs: q, k, v
// ([B, heads, L, D]).
inline void block_qkv_eval(const std::vector<mx::array>& in, std::vector<mx::array>& out,
                           const QKVParams& p) {
  const mx::array& x = in[0];
  const int L = x.shape(1), B = x.shape(0) * L, hidden = x.shape(-1);   // B: rows
  const int D = p.D, nh = p.H + 2 * p.Hkv, N = nh * D;
  size_t i = 2;
  WeightKeep keep[3];
  Weight W[3];
  for (int j = 0; j < p.nparts; ++j)
    W[j] = bind_weight(in, i, p.part[j].gs, p.part[j].bits, p.part[j].has_bias, keep[j]);
  std::vector<float> fb, qnb, knb;
  const float* freqs = p.has_freqs ? as_f32(in[i++], fb) : nullptr;
  const float* qn = nullptr;
  const float* kn = nullptr;
  if (p.has_qk_norm) {
    qn = as_f32(in[i++], qnb);
    kn = as_f32(in[i++], knb);
  }
  const mx::array* offs = p.has_offsets ? &in[i++] : nullptr;
  std::vector<float> xb;
  const float* xf = as_f32(x, xb);
  std::vector<float> xn(size_t(B) * hidden), y(size_t(B) * N);
  rms_norm_rows(xf, B, hidden, in[1], p.eps, xn.data());
  round_to(xn.data(), xn.size(), elt_of(p.norm_dtype));
  // head ranges of q, k, v in y's rows
  const int first[3] = {0, p.H, p.H + p.Hkv};
  const int heads[3] = {p.H, p.Hkv, p.Hkv};
  if (p.nparts == 1) {
    linear_step(W[0], xn.data(), B, y.data(), N);
  } else {
    for (int j = 0; j < 3; ++j) linear_step(W[j], xn.data(), B, y.data() + first[j] * D, N);
  }
  Elt ot[3];
  for (int j = 0; j < 3; ++j) ot[j] = elt_of(p.out_dtype[j]);
  for (int b = 0; b < B; ++b) {
    float* yb = y.data() + int64_t(b) * N;
    for (int j = 0; j < 3; ++j) round_to(yb + first[j] * D, size_t(heads[j]) * D, ot[j]);
    if (p.has_qk_norm) {   // per-head RMSNorm of the q and k heads
      for (int h = 0; h < p.H + p.Hkv; ++h) {
        float* r = yb + int64_t(h) * D;
        const float* w = h < p.H ? qn : kn;
        float acc = 0;
        for (int d = 0; d < D; ++d) acc += r[d] * r[d];
        const float inv = 1.0f / std::sqrt(acc / float(D) + p.qk_eps);
        for (int d = 0; d < D; ++d) r[d] = w[d] * (r[d] * inv);
        round_to(r, D, ot[h < p.H ? 0 : 1]);
      }
    }
    const int seq = offs && offs->shape(0) > 1 ? b / L : 0;   // offsets [1]: every sequence's
    const int pos = (offs ? offs->data<int32_t>()[elem_loc(seq, *offs)] : p.offset) + b % L;
    rope_heads(yb, p.H, D, p.rope_dims, p.rope_base, p.rope_scale, freqs, pos);
    rope_heads(yb + p.H * D, p.Hkv, D, p.rope_dims, p.rope_base, p.rope_scale, freqs, pos);
    round_to(yb, size_t(p.H) * D, ot[0]);
    round_to(yb + p.H * D, size_t(p.Hkv) * D, ot[1]);
  }
  for (int j = 0; j < 3; ++j) {   // row b = (sequence b / L, position b % L) -> [seq, head, pos]
    void* dst = out[j].data<void>();
    for (int b = 0; b < B; ++b) {
      const float* src = y.data() + int64_t(b) * N + first[j] * D;
      const int64_t seq = b / L, l = b % L;
      for (int h = 0; h < heads[j]; ++h)
        for (int d = 0; d < D; ++d)
          store_elt(dst, ot[j], ((seq * heads[j] + h) * L + l) * D + d, src[h * D + d]);
    }
  }
}

class BlockQKV : public mx::Primitive {
 public:
  BlockQKV(mx::Stream s, QKVParams p) : mx::Primitive(s), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    cpu_dispatch(stream(), inputs, outputs,
                 [p = p_](auto& in, auto& out) { block_qkv_eval(in, out, p); });
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
    const int L = inputs[0].shape(1);
    return {{B, p_.H, L, p_.D}, {B, p_.Hkv, L, p_.D}, {B, p_.Hkv, L, p_.D}};
  }

 private:
  QKVParams p_;
};

inline bool norm_weight_ok(const mx::array* w, int n) {
  return w && w->ndim() == 1 && w->shape(0) == n && is_float(w->dtype());
}

// Can BlockQKV run this step?  x [B, L, hidden] float, a float norm weight
// [hidden], the q/k/v layers (parts: 1 fused [(H + 2 Hkv) D, hidden] or 3),
// rope_dims even <= D, optional per-head q/k norm weights [D] (both or none),
// optional per-sequence positions offsets [B] (or [1]) int32.
inline bool block_qkv_supported(const mx::array& x, const mx::array& norm_w,
                                const std::vector<LinearArg>& parts, int H, int Hkv, int D,
                                int rope_dims, const mx::array* freqs, const mx::array* q_norm,
                                const mx::array* k_norm, const mx::array* offsets = nullptr) {
  if (x.ndim() != 3 || x.shape(1) < 1 || !is_float(x.dtype())) return false;
  if (offsets && (offsets->dtype() != mx::int32 || offsets->ndim() != 1 ||
                  (offsets->shape(0) != x.shape(0) && offsets->shape(0) != 1)))
    return false;
  const int hidden = x.shape(2);
  if (!norm_weight_ok(&norm_w, hidden)) return false;
  if (H <= 0 || Hkv <= 0 || H % Hkv || D <= 0 || rope_dims <= 0 || rope_dims > D ||
      rope_dims % 2)
    return false;
  if (freqs && !norm_weight_ok(freqs, rope_dims / 2)) return false;
  if ((q_norm != nullptr) != (k_norm != nullptr)) return false;
  if (q_norm && !(norm_weight_ok(q_norm, D) && norm_weight_ok(k_norm, D))) return false;
  if (parts.size() == 1) return linear_arg_ok(parts[0], hidden, (H + 2 * Hkv) * D);
  return parts.size() == 3 && linear_arg_ok(parts[0], hidden, H * D) &&
         linear_arg_ok(parts[1], hidden, Hkv * D) && linear_arg_ok(parts[2], hidden, Hkv * D);
}

inline std::vector<mx::array> block_qkv(const mx::array& x, const mx::array& norm_w, float eps,
                                        const std::vector<LinearArg>& parts, int H, int Hkv,
                                        int D, int rope_dims, float rope_base, float rope_scale,
                                        const mx::array* freqs, const mx::array* q_norm,
                                        const mx::array* k_norm, float qk_eps, int offset,
                                        const mx::array* offsets = nullptr) {
  if (!block_qkv_supported(x, norm_w, parts, H, Hkv, D, rope_dims, freqs, q_norm, k_norm,
                           offsets))
    throw std::invalid_argument("mlxcy block q/k/v: unsupported shapes or dtypes");
  QKVParams p;
  p.eps = eps;
  p.qk_eps = qk_eps;
  p.H = H;
  p.Hkv = Hkv;
  p.D = D;
  p.rope_dims = rope_dims;
  p.rope_base = rope_base;
  p.rope_scale = rope_scale;
  p.has_freqs = freqs != nullptr;
  p.has_qk_norm = q_norm != nullptr;
  p.offset = offset;
  p.has_offsets = offsets != nullptr;
  p.nparts = int(parts.size());
  p.norm_dtype = mx::promote_types(x.dtype(), norm_w.dtype());
  std::vector<mx::array> in = {x, norm_w};
  for (int j = 0; j < p.nparts; ++j) {
    p.part[j] = desc_of(parts[j]);
    push_linear(in, parts[j]);
  }
  for (int j = 0; j < 3; ++j) {
    mx::Dtype d = linear_dtype(p.norm_dtype, parts[p.nparts == 1 ? 0 : j]);
    if (q_norm && j < 2) d = mx::promote_types(d, (j == 0 ? q_norm : k_norm)->dtype());
    p.out_dtype[j] = d;
  }
  if (freqs) in.push_back(*freqs);
  if (q_norm) {
    in.push_back(*q_norm);
    in.push_back(*k_norm);
  }
  if (offsets) in.push_back(*offsets);
  const int B = x.shape(0), L = x.shape(1);
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  return mx::array::make_arrays({{B, H, L, D}, {B, Hkv, L, D}, {B, Hkv, L, D}},
                                {p.out_dtype[0], p.out_dtype[1], p.out_dtype[2]},
                                std::make_shared<BlockQKV>(s, p), std::move(in));
}

// ---------------------------------------------------------- BlockAttnMLP ---

struct AttnMLPParams {
  float attn_scale = 1;
  float eps_o = 0, eps_mid = 0, eps_mlp = 0;
  bool norm_o = false, norm_mlp = false;   // Gemma's norms after o_proj and after the MLP
  int act = 0;                              // 0: SiLU (SwiGLU), 1: GELU (tanh approximation)
  int gu_parts = 1;                         // 1: one fused gate/up layer; 2: gate and up
  bool has_mask = false;                    // a batch's padding mask (attention_f32's)
  LinearDesc o, gate, up, down;
  mx::Dtype attn_dtype = mx::float32, o_dtype = mx::float32, on_dtype = mx::float32,
            h_dtype = mx::float32, mid_dtype = mx::float32, g_dtype = mx::float32,
            u_dtype = mx::float32, a_dtype = mx::float32, down_dtype = mx::float32,
            mn_dtype = mx::float32, out_dtype = mx::float32;
  bool operator==(const AttnMLPParams& p) const {
    return attn_scale == p.attn_scale && eps_o == p.eps_o && eps_mid == p.eps_mid &&
           eps_mlp == p.eps_mlp && norm_o == p.norm_o && norm_mlp == p.norm_mlp &&
           act == p.act && gu_parts == p.gu_parts && has_mask == p.has_mask && o == p.o &&
           gate == p.gate && up == p.up &&
           down == p.down && attn_dtype == p.attn_dtype && o_dtype == p.o_dtype &&
           on_dtype == p.on_dtype && h_dtype == p.h_dtype && mid_dtype == p.mid_dtype &&
           g_dtype == p.g_dtype && u_dtype == p.u_dtype && a_dtype == p.a_dtype &&
           down_dtype == p.down_dtype && mn_dtype == p.mn_dtype && out_dtype == p.out_dtype;
  }
};

// inputs: q [B, H, L, D] (L new positions: one, or a speculative step's
// proposals, attending causally), k, v [B, Hkv, T, D] (cache views, the new
// positions last), x [B, L, hidden] (the block's input), o_proj's operands,
// [the norm after o_proj], the norm before the MLP, gate/up's operands (one
// fused layer or two), down's, [the norm after the MLP], [the attention mask,
// broadcast to [B, H, L, T]]; output [B, L, hidden].
inline void block_attn_mlp_eval(const std::vector<mx::array>& in, mx::array& out,
                                const AttnMLPParams& p) {
  const mx::array &q = in[0], &k = in[1], &v = in[2], &x = in[3];
  const int L = q.shape(2), B = q.shape(0) * L, H = q.shape(1), D = q.shape(3);   // B: rows
  const int hidden = x.shape(-1);
  size_t i = 4;
  WeightKeep ko, kg, ku, kd;
  Weight Wo = bind_weight(in, i, p.o.gs, p.o.bits, p.o.has_bias, ko);
  const mx::array* norm_o = p.norm_o ? &in[i++] : nullptr;
  const mx::array& norm_mid = in[i++];
  Weight Wg = bind_weight(in, i, p.gate.gs, p.gate.bits, p.gate.has_bias, kg);
  Weight Wu;
  if (p.gu_parts == 2) Wu = bind_weight(in, i, p.up.gs, p.up.bits, p.up.has_bias, ku);
  Weight Wd = bind_weight(in, i, p.down.gs, p.down.bits, p.down.has_bias, kd);
  const mx::array* norm_mlp = p.norm_mlp ? &in[i++] : nullptr;
  const mx::array* mask = p.has_mask ? &in[i++] : nullptr;
  const int I = Wd.K;
  std::vector<float> att(size_t(B) * H * D), h(size_t(B) * hidden), t(size_t(B) * hidden);
  std::vector<float> gu(size_t(B) * 2 * I), a(size_t(B) * I);
  attention_f32(q, k, v, p.attn_scale, L > 1, att.data(), mask);   // [seq, H, L, D]
  if (L > 1) {   // to rows [seq * L + l][H * D], o_proj's input
    std::vector<float> rows(att.size());
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        std::copy_n(att.data() + ((int64_t(b / L) * H + h) * L + b % L) * D, D,
                    rows.data() + (int64_t(b) * H + h) * D);
    att.swap(rows);
  }
  round_to(att.data(), att.size(), elt_of(p.attn_dtype));
  linear_step(Wo, att.data(), B, t.data(), hidden);
  round_to(t.data(), t.size(), elt_of(p.o_dtype));
  if (norm_o) {
    rms_norm_rows(t.data(), B, hidden, *norm_o, p.eps_o, t.data());
    round_to(t.data(), t.size(), elt_of(p.on_dtype));
  }
  std::vector<float> xb;
  const float* xf = as_f32(x, xb);
  for (size_t e = 0; e < h.size(); ++e) h[e] = xf[e] + t[e];
  round_to(h.data(), h.size(), elt_of(p.h_dtype));
  rms_norm_rows(h.data(), B, hidden, norm_mid, p.eps_mid, t.data());
  round_to(t.data(), t.size(), elt_of(p.mid_dtype));
  // gate into columns [0, I) and up into [I, 2I) of each row of gu
  if (p.gu_parts == 1) {
    linear_step(Wg, t.data(), B, gu.data(), 2 * I);
  } else {
    linear_step(Wg, t.data(), B, gu.data(), 2 * I);
    linear_step(Wu, t.data(), B, gu.data() + I, 2 * I);
  }
  for (int b = 0; b < B; ++b) {
    float* g = gu.data() + int64_t(b) * 2 * I;
    float* u = g + I;
    round_to(g, I, elt_of(p.g_dtype));
    round_to(u, I, elt_of(p.u_dtype));
    act_row(g, u, a.data() + int64_t(b) * I, I, p.act);
  }
  round_to(a.data(), a.size(), elt_of(p.a_dtype));
  linear_step(Wd, a.data(), B, t.data(), hidden);
  round_to(t.data(), t.size(), elt_of(p.down_dtype));
  if (norm_mlp) {
    rms_norm_rows(t.data(), B, hidden, *norm_mlp, p.eps_mlp, t.data());
    round_to(t.data(), t.size(), elt_of(p.mn_dtype));
  }
  for (size_t e = 0; e < h.size(); ++e) h[e] += t[e];
  store_f32(h.data(), out);
}

class BlockAttnMLP : public mx::UnaryPrimitive {
 public:
  BlockAttnMLP(mx::Stream s, AttnMLPParams p) : mx::UnaryPrimitive(s), p_(p) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    cpu_dispatch(stream(), inputs, out,
                 [p = p_](auto& in, mx::array& y) { block_attn_mlp_eval(in, y, p); });
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

// The weights' part of BlockAttnMLP's checks (before a step touches the
// cache): x [B, L, hidden], attention output width HD = H * D; gate_up: one
// fused layer [2 I, hidden] or gate and up [I, hidden] each.
inline bool block_mlp_supported(const mx::array& x, int HD, const LinearArg& o,
                                const mx::array* norm_o, const mx::array& norm_mid,
                                const std::vector<LinearArg>& gate_up, const LinearArg& down,
                                const mx::array* norm_mlp) {
  if (x.ndim() != 3 || x.shape(1) < 1 || !is_float(x.dtype())) return false;
  const int hidden = x.shape(2);
  if (!norm_weight_ok(&norm_mid, hidden)) return false;
  if (norm_o && !norm_weight_ok(norm_o, hidden)) return false;
  if (norm_mlp && !norm_weight_ok(norm_mlp, hidden)) return false;
  if (!down.w || down.w->ndim() != 2 || (down.scales && !supported_bits(down.bits))) return false;
  const int I = down.scales ? int(int64_t(down.w->shape(1)) * 32 / down.bits) : down.w->shape(1);
  if (!linear_arg_ok(o, HD, hidden) || !linear_arg_ok(down, I, hidden)) return false;
  if (gate_up.size() == 1) return linear_arg_ok(gate_up[0], hidden, 2 * I);
  return gate_up.size() == 2 && linear_arg_ok(gate_up[0], hidden, I) &&
         linear_arg_ok(gate_up[1], hidden, I);
}

inline bool block_attn_mlp_supported(const mx::array& q, const mx::array& k,
                                     const mx::array& v, const mx::array& x,
                                     const LinearArg& o, const mx::array* norm_o,
                                     const mx::array& norm_mid,
                                     const std::vector<LinearArg>& gate_up,
                                     const LinearArg& down, const mx::array* norm_mlp,
                                     const mx::array* mask = nullptr) {
  if (!attention_supported(q, k, v) || q.shape(2) > k.shape(2)) return false;
  if (mask && !mask_supported(*mask, q.shape(0), q.shape(1), q.shape(2), k.shape(2)))
    return false;
  if (x.ndim() != 3 || x.shape(0) != q.shape(0) || x.shape(1) != q.shape(2)) return false;
  return block_mlp_supported(x, q.shape(1) * q.shape(3), o, norm_o, norm_mid, gate_up, down,
                             norm_mlp);
}

inline mx::array block_attn_mlp(const mx::array& q, const mx::array& k, const mx::array& v,
                                const mx::array& x, float attn_scale, const LinearArg& o,
                                const mx::array* norm_o, float eps_o, const mx::array& norm_mid,
                                float eps_mid, const std::vector<LinearArg>& gate_up,
                                const LinearArg& down, const mx::array* norm_mlp, float eps_mlp,
                                int act, const mx::array* mask = nullptr) {
  if (!block_attn_mlp_supported(q, k, v, x, o, norm_o, norm_mid, gate_up, down, norm_mlp, mask))
    throw std::invalid_argument("mlxcy block attention + MLP: unsupported shapes or dtypes");
  if (act != 0 && act != 1)
    throw std::invalid_argument("mlxcy block attention + MLP: act must be 0 (SiLU) or 1 (GELU)");
  AttnMLPParams p;
  p.attn_scale = attn_scale;
  p.eps_o = eps_o;
  p.eps_mid = eps_mid;
  p.eps_mlp = eps_mlp;
  p.norm_o = norm_o != nullptr;
  p.norm_mlp = norm_mlp != nullptr;
  p.act = act;
  p.gu_parts = int(gate_up.size());
  p.has_mask = mask != nullptr;
  p.o = desc_of(o);
  p.gate = desc_of(gate_up[0]);
  if (p.gu_parts == 2) p.up = desc_of(gate_up[1]);
  p.down = desc_of(down);
  // the dtypes the unfused ops give each intermediate
  p.attn_dtype = q.dtype();
  p.o_dtype = linear_dtype(p.attn_dtype, o);
  p.on_dtype = norm_o ? mx::promote_types(p.o_dtype, norm_o->dtype()) : p.o_dtype;
  p.h_dtype = mx::promote_types(x.dtype(), p.on_dtype);
  p.mid_dtype = mx::promote_types(p.h_dtype, norm_mid.dtype());
  p.g_dtype = linear_dtype(p.mid_dtype, gate_up[0]);
  p.u_dtype = linear_dtype(p.mid_dtype, gate_up[p.gu_parts - 1]);
  p.a_dtype = mx::promote_types(p.g_dtype, p.u_dtype);
  p.down_dtype = linear_dtype(p.a_dtype, down);
  p.mn_dtype = norm_mlp ? mx::promote_types(p.down_dtype, norm_mlp->dtype()) : p.down_dtype;
  p.out_dtype = mx::promote_types(p.h_dtype, p.mn_dtype);
  std::vector<mx::array> in = {q, k, v, x};
  push_linear(in, o);
  if (norm_o) in.push_back(*norm_o);
  in.push_back(norm_mid);
  for (auto& g : gate_up) push_linear(in, g);
  push_linear(in, down);
  if (norm_mlp) in.push_back(*norm_mlp);
  if (mask) in.push_back(*mask);
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  return mx::array(x.shape(), p.out_dtype, std::make_shared<BlockAttnMLP>(s, p), std::move(in));
}

}  // namespace mlxcy::cpu
