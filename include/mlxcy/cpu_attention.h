// Attention over a KV cache on the CPU, as one MLX primitive.
//
// A decode step's attention (q [B, H, 1, D] against the cache's keys and
// values [B, Hkv, T, D], grouped-query heads) and a prompt's (q [B, H, L, D],
// causal) ran as MLX's CPU scaled_dot_product_attention: two reference-BLAS
// GEMMs (~5 GFLOP/s), a softmax and their per-op overhead: ~200 us per layer
// for SmolLM2 decoding at T = 200 on the 2-core VM, and 27% of a 128-token
// prefill (perf: MLX's sgemm_).  Here one task computes a head's scores,
// softmax and weighted sum of values for a block of queries in float32,
// reading the cache views in place (any strides with a contiguous last axis).
// The vjp differentiates the same math written with MLX ops.
#pragma once

#include <cfloat>
#include <cmath>
#include <optional>
#include <vector>

#include <mlx/mlx.h>
#include <mlx/primitives.h>
#include <mlx/allocator.h>
#include <mlx/backend/cpu/encoder.h>

#include "mlxcy/cpu_act.h"     // exp8
#include "mlxcy/cpu_quant.h"   // Elt, load_elt, store_elt, use_avx2, hsum8

namespace mlxcy::cpu {

inline float dot_scalar(const void* a, Elt ta, int64_t sa, const float* b, int D) {
  float s = 0;
  for (int i = 0; i < D; ++i) s += load_elt(a, ta, i * sa) * b[i];
  return s;
}

inline void axpy_scalar(float p, const void* v, Elt tv, int64_t sv, float* acc, int D) {
  for (int i = 0; i < D; ++i) acc[i] += p * load_elt(v, tv, i * sv);
}

#if MLXCY_X86
// The kernels below take the cache's element type as a template argument:
// with it a run-time argument, GCC (-O2) tested it at every load and kept the
// weighted sum's accumulators on the stack.
template <Elt T>
MLXCY_AVX2 inline float dot_avx2(const char* a, const float* b, int D) {
  __m256 s = _mm256_setzero_ps();
  for (int i = 0; i < D; i += 8) s = _mm256_fmadd_ps(load8_t<T>(a, i), _mm256_loadu_ps(b + i), s);
  return hsum8(s);
}

// The scores of 8 keys (rows kt bytes apart) against q, as one vector: eight
// accumulators, then one transposing reduction instead of eight.
template <Elt T>
MLXCY_AVX2 inline __m256 dot8_avx2(const char* k, int64_t kt, const float* q, int D) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(load8_t<T>(k + i * kt, d), qv, a[i]);
  }
  const __m256 lo = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 hi = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// p[t] = dot(key t, q) for t < n, eight keys at a time.
template <Elt T>
MLXCY_AVX2 inline void scores_avx2(const char* k0, int64_t kt, const float* q, int D, int n,
                                   float* p) {
  int t = 0;
  for (; t + 8 <= n; t += 8) _mm256_storeu_ps(p + t, dot8_avx2<T>(k0 + t * kt, kt, q, D));
  for (; t < n; ++t) p[t] = dot_avx2<T>(k0 + t * kt, q, D);
}

// The largest of p[0 .. n).
MLXCY_AVX2 inline float max_avx2(const float* p, int n) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int t = 0;
  for (; t + 8 <= n; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + t));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float r = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  for (; t < n; ++t) r = p[t] > r ? p[t] : r;
  return r;
}

// p[t] = e^(p[t] - m) for t < n, eight at a time (exp8); returns their sum.
// A hidden key's p[t] - m lies below exp8's range and becomes exactly 0, as
// std::exp makes it, so weighted_sum_avx2 skips its value.
MLXCY_AVX2 inline float exp_sum_avx2(float* p, int n, float m) {
  const __m256 vm = _mm256_set1_ps(m), lo = _mm256_set1_ps(-87.3f);
  __m256 s = _mm256_setzero_ps();
  int t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(p + t), vm);
    const __m256 e = _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, lo, _CMP_GE_OQ));
    _mm256_storeu_ps(p + t, e);
    s = _mm256_add_ps(s, e);
  }
  float den = hsum8(s);
  for (; t < n; ++t) {
    p[t] = std::exp(p[t] - m);
    den += p[t];
  }
  return den;
}

// acc[:8 NC] = sum_t p[t] * inv * v[t][:8 NC] over keys with p[t] != 0 (a
// hidden key's value may be anything, NaN included), the sums in registers.
template <Elt T, int NC>
MLXCY_AVX2 inline void weighted_lanes(const char* v0, int64_t vt, const float* p, float inv,
                                      int n, float* acc) {
  __m256 r[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) r[c] = _mm256_setzero_ps();
  for (int t = 0; t < n; ++t) {
    if (p[t] == 0.f) continue;
    const __m256 w = _mm256_set1_ps(p[t] * inv);
    const char* vr = v0 + t * vt;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) r[c] = _mm256_fmadd_ps(w, load8_t<T>(vr, 8 * c), r[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) _mm256_storeu_ps(acc + 8 * c, r[c]);
}

// acc[:D] = sum_t p[t] * inv * v[t] (D a multiple of 8), 64 lanes at a time.
template <Elt T>
MLXCY_AVX2 inline void weighted_sum_avx2(const char* v0, int64_t vt, const float* p, float inv,
                                         int n, float* acc, int D) {
  const int64_t isz = T == Elt::F32 ? 4 : 2;
  int d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weighted_lanes<T, 8>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
  switch ((D - d0) / 8) {
    case 1: return weighted_lanes<T, 1>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
    case 2: return weighted_lanes<T, 2>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
    case 3: return weighted_lanes<T, 3>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
    case 4: return weighted_lanes<T, 4>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
    case 5: return weighted_lanes<T, 5>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
    case 6: return weighted_lanes<T, 6>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
    case 7: return weighted_lanes<T, 7>(v0 + d0 * isz, vt, p, inv, n, acc + d0);
    default: return;
  }
}

// scores_avx2 and weighted_sum_avx2 for the cache's element types.
MLXCY_AVX2 inline void scores_avx2(const char* k0, int64_t kt, Elt tk, const float* q, int D,
                                   int n, float* p) {
  if (tk == Elt::F32) return scores_avx2<Elt::F32>(k0, kt, q, D, n, p);
  if (tk == Elt::BF16) return scores_avx2<Elt::BF16>(k0, kt, q, D, n, p);
  scores_avx2<Elt::F16>(k0, kt, q, D, n, p);
}

MLXCY_AVX2 inline void weighted_sum_avx2(const char* v0, int64_t vt, Elt tv, const float* p,
                                         float inv, int n, float* acc, int D) {
  if (tv == Elt::F32) return weighted_sum_avx2<Elt::F32>(v0, vt, p, inv, n, acc, D);
  if (tv == Elt::BF16) return weighted_sum_avx2<Elt::BF16>(v0, vt, p, inv, n, acc, D);
  weighted_sum_avx2<Elt::F16>(v0, vt, p, inv, n, acc, D);
}
#endif

// A mask broadcast to [B, H, L, T]: boolean (false hides a key) or added to
// the scaled scores (float32/bf16/fp16), read in place through its strides.
struct Mask {
  const char* p = nullptr;
  bool is_bool = false;
  Elt t = Elt::F32;
  size_t item = 0;
  int64_t st[4] = {0, 0, 0, 0};   // element strides over B, H, L, T (0: broadcast)
};

inline Mask mask_view(const mx::array* m) {
  Mask v;
  if (m == nullptr) return v;
  v.p = m->data<char>();
  v.is_bool = m->dtype() == mx::bool_;
  if (!v.is_bool) v.t = elt_of(m->dtype());
  v.item = m->itemsize();
  for (int d = 0; d < m->ndim(); ++d) {
    const int a = 4 - m->ndim() + d;
    v.st[a] = m->shape(d) == 1 ? 0 : m->strides()[d];
  }
  return v;
}

// Whether mask m broadcasts to [B, H, L, T] and has a type the kernel reads.
inline bool mask_supported(const mx::array& m, int B, int H, int L, int T) {
  if (m.ndim() > 4 || (m.dtype() != mx::bool_ && !is_float(m.dtype()))) return false;
  const int full[4] = {B, H, L, T};
  for (int d = 0; d < m.ndim(); ++d) {
    const int n = m.shape(d), want = full[4 - m.ndim() + d];
    if (n != 1 && n != want) return false;
  }
  return true;
}

// dst [B, H, L, D] (float32) = softmax(scale * q k^T (+ mask)) v per head, head h
// reading kv head h / (H / Hkv).  Causal: the L queries are the cache's last L
// positions, so query i sees keys 0 .. T - L + i (MLX's "causal" mask).
// Tasks are (head, block of queries): with a prompt (L > 1) the heads alone are
// too few to balance two threads.  Results do not depend on the thread count.
inline void attention_f32(const mx::array& q, const mx::array& k, const mx::array& v,
                          float scale, bool causal, float* dst,
                          const mx::array* mask = nullptr) {
  const int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3);
  const int Hkv = k.shape(1), T = k.shape(2);
  const int rep = H / Hkv;
  const Elt tq = elt_of(q.dtype()), tk = elt_of(k.dtype()), tv = elt_of(v.dtype());
  const size_t ik = k.itemsize(), iv = v.itemsize();
  const char* kp = k.data<char>();
  const char* vp = v.data<char>();
  const void* qp = q.data<void>();
  const int64_t sk = k.strides()[3], sv = v.strides()[3];
  bool vec = false;
#if MLXCY_X86
  vec = use_avx2() && D % 8 == 0 && sk == 1 && sv == 1;
#endif
  const Mask mk = mask_view(mask);
  constexpr int QB = 16;                       // queries per task
  const int nqb = (L + QB - 1) / QB;
  auto query = [&](int b, int h, int i, float* qf, float* p) {
    const int kh = h / rep, n = causal ? T - L + i + 1 : T;
    float* acc = dst + ((int64_t(b) * H + h) * L + i) * D;
    const int64_t qo = b * q.strides()[0] + h * q.strides()[1] + i * q.strides()[2];
    for (int d = 0; d < D; ++d) qf[d] = load_elt(qp, tq, qo + d * q.strides()[3]) * scale;
    const char* k0 = kp + (b * k.strides()[0] + kh * k.strides()[1]) * ik;
    const char* v0 = vp + (b * v.strides()[0] + kh * v.strides()[1]) * iv;
    const int64_t kt = k.strides()[2] * ik, vt = v.strides()[2] * iv;
    const char* mrow = mk.p ? mk.p + (b * mk.st[0] + h * mk.st[1] + i * mk.st[2]) * mk.item
                            : nullptr;
    int t = 0;
#if MLXCY_X86
    if (vec) scores_avx2(k0, kt, tk, qf, D, n, p);
    else
#endif
      for (; t < n; ++t) p[t] = dot_scalar(k0 + t * kt, tk, sk, qf, D);
    if (mrow)
      for (t = 0; t < n; ++t) {
        const char* e = mrow + t * mk.st[3] * mk.item;
        // a hidden key scores the lowest finite float, as in MLX: a query that
        // sees no key (a padding row) averages the values instead of making NaN
        p[t] = mk.is_bool ? (*e ? p[t] : -FLT_MAX) : p[t] + load_elt(e, mk.t, 0);
      }
#if MLXCY_X86
    // the softmax eight scores at a time (std::exp one score at a time took a
    // third of the attention's time)
    if (vec)
      return weighted_sum_avx2(v0, vt, tv, p, 1.f / exp_sum_avx2(p, n, max_avx2(p, n)), n,
                               acc, D);
#endif
    float mx_ = -INFINITY;
    for (t = 0; t < n; ++t) mx_ = p[t] > mx_ ? p[t] : mx_;
    float den = 0;
    for (t = 0; t < n; ++t) {
      p[t] = std::exp(p[t] - mx_);
      den += p[t];
    }
    const float inv = 1.f / den;
    std::fill(acc, acc + D, 0.f);
    for (t = 0; t < n; ++t) {
      if (p[t] == 0.f) continue;   // a hidden key: its value may be anything, NaN included
      axpy_scalar(p[t] * inv, v0 + t * vt, tv, sv, acc, D);
    }
  };
  auto tasks = [&](int j0, int j1) {
    float* qf = scratch_f(4, size_t(D) + T);
    for (int j = j0; j < j1; ++j) {
      const int bh = j / nqb, i0 = (j % nqb) * QB;
      for (int i = i0; i < std::min(L, i0 + QB); ++i) query(bh / H, bh % H, i, qf, qf + D);
    }
  };
  const int n = B * H * nqb;
  // Small caches: one task (a pool round trip costs more than the work).
  if (double(B) * H * L * T * D < 6e4) return tasks(0, n);
  parallel_rows(n, 1, tasks, L > 1 ? 8 : 1);
}

// out [B, H, L, D] = softmax(scale * q k^T) v per head.
inline void attention_eval(const mx::array& q, const mx::array& k, const mx::array& v,
                           const mx::array* mask, mx::array& out, float scale, bool causal) {
  std::vector<float> o(size_t(q.size()));
  attention_f32(q, k, v, scale, causal, o.data(), mask);
  store_f32(o.data(), out);
}

// The same math with MLX ops (for the vjp).
inline mx::array attention_ops(const mx::array& q, const mx::array& k, const mx::array& v,
                               const mx::array* mask, float scale, bool causal, mx::Stream s) {
  const int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3);
  const int Hkv = k.shape(1), T = k.shape(2);
  mx::array qg = mx::reshape(mx::multiply(q, mx::array(scale, q.dtype()), s),
                             {B, Hkv, H / Hkv, L, D}, s);
  mx::array kf = mx::expand_dims(mx::astype(k, mx::float32, s), 2, s);
  mx::array sc = mx::matmul(mx::astype(qg, mx::float32, s), mx::swapaxes(kf, -1, -2, s), s);
  if (causal) {   // key t is seen by query i when t <= T - L + i
    mx::array seen = mx::less_equal(
        mx::reshape(mx::arange(T, mx::int32, s), {1, T}, s),
        mx::reshape(mx::arange(T - L, T, mx::int32, s), {L, 1}, s), s);
    sc = mx::where(seen, sc, mx::array(-INFINITY, mx::float32), s);
  }
  if (mask) {   // [B, H, L, T] -> [B, Hkv, H / Hkv, L, T], as the scores are grouped
    mx::array m = mx::broadcast_to(*mask, {B, H, L, T}, s);
    m = mx::reshape(m, {B, Hkv, H / Hkv, L, T}, s);
    sc = mask->dtype() == mx::bool_
             ? mx::where(m, sc, mx::array(-FLT_MAX, mx::float32), s)
             : mx::add(sc, mx::astype(m, mx::float32, s), s);
  }
  mx::array pr = mx::softmax(sc, std::vector<int>{-1}, false, s);
  mx::array o = mx::matmul(pr, mx::expand_dims(mx::astype(v, mx::float32, s), 2, s), s);
  return mx::astype(mx::reshape(o, {B, H, L, D}, s), q.dtype(), s);
}

class Attention : public mx::UnaryPrimitive {
 public:
  Attention(mx::Stream s, float scale, bool causal)
      : mx::UnaryPrimitive(s), scale_(scale), causal_(causal) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    cpu_dispatch(stream(), inputs, out,
                 [scale = scale_, causal = causal_](auto& in, mx::array& y) {
                   attention_eval(in[0], in[1], in[2], in.size() == 4 ? &in[3] : nullptr, y,
                                  scale, causal);
                 });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("mlxcy attention: this primitive runs on the CPU only");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    float scale = scale_;
    bool causal = causal_;
    mx::Stream s = stream();
    // the mask is a constant: differentiate with respect to q, k, v only
    std::optional<mx::array> mask;
    if (primals.size() == 4) mask = primals[3];
    auto f = [scale, causal, s, mask](const std::vector<mx::array>& p) {
      return std::vector<mx::array>{
          attention_ops(p[0], p[1], p[2], mask ? &*mask : nullptr, scale, causal, s)};
    };
    auto grads = mx::vjp(f, {primals[0], primals[1], primals[2]}, cotangents).second;
    std::vector<mx::array> out;
    for (int a : argnums) out.push_back(a < 3 ? grads[a] : mx::zeros_like(primals[a]));
    return out;
  }

  const char* name() const override { return "MlxcyAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Attention*>(&other);
    return o && o->scale_ == scale_ && o->causal_ == causal_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float scale_;
  bool causal_;
};

// q [B, H, L, D] against k, v [B, Hkv, T, D] (L <= T), float, H a multiple of Hkv.
inline bool attention_supported(const mx::array& q, const mx::array& k, const mx::array& v) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) return false;
  if (!is_float(q.dtype()) || !is_float(k.dtype()) || !is_float(v.dtype())) return false;
  if (q.shape(2) < 1 || q.shape(2) > k.shape(2) || k.shape() != v.shape()) return false;
  if (q.shape(0) != k.shape(0) || q.shape(3) != k.shape(3)) return false;
  return k.shape(1) > 0 && q.shape(1) % k.shape(1) == 0;
}

// softmax(scale * q k^T (+ the causal mask) (+ mask)) v per head, as one primitive.
inline mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v,
                           float scale, bool causal, const mx::array* mask = nullptr) {
  if (!attention_supported(q, k, v))
    throw std::invalid_argument(
        "mlxcy attention: need q [B, H, L, D], k and v [B, Hkv, T, D] float, L <= T, "
        "H a multiple of Hkv");
  if (mask && !mask_supported(*mask, q.shape(0), q.shape(1), q.shape(2), k.shape(2)))
    throw std::invalid_argument(
        "mlxcy attention: the mask must be boolean or float and broadcast to [B, H, L, T]");
  mx::Stream s = mx::default_stream(mx::Device::cpu);
  std::vector<mx::array> in{q, k, v};
  if (mask) in.push_back(*mask);
  return mx::array(q.shape(), q.dtype(), std::make_shared<Attention>(s, scale, causal),
                   std::move(in));
}

}  // namespace mlxcy::cpu
