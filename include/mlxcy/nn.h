// Helpers for mlxcy's layers, caches and models (mlxcy/nn.pyx, models/cache.pyx,
// models/*.pyx): pointer-based shims for ops with optional arguments, and
// `own`, which turns a heap result of a `cdef ... except NULL` method back
// into a value so Cython code can keep it in a local.
#pragma once

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <optional>
#include <vector>

#include <mlx/mlx.h>

#include "mlxcy/core.h"  // opt

namespace mlxcy {
namespace mx = mlx::core;

// Take ownership of a heap array (from heap()), returning it by value.
inline mx::array own(mx::array* p) {
  mx::array a = std::move(*p);
  delete p;
  return a;
}

// x @ w.T (+ bias) for a float weight [out, in].
inline mx::array linear(const mx::array& x, const mx::array& w, const mx::array* bias) {
  if (bias) return mx::addmm(*bias, x, mx::transpose(w));
  return mx::matmul(x, mx::transpose(w));
}

// Rows [r0, r1) of the first axis (a view; contiguous for a row-major array).
inline mx::array rows(const mx::array& a, int r0, int r1) {
  mx::Shape start(a.ndim(), 0), stop = a.shape();
  start[0] = r0;
  stop[0] = r1;
  return mx::slice(a, start, stop);
}

// x[:, h0:h1] of [B, H, L, D] (a view)
inline mx::array heads_slice(const mx::array& x, int h0, int h1) {
  return mx::slice(x, mx::Shape{0, h0, 0, 0},
                   mx::Shape{x.shape(0), h1, x.shape(2), x.shape(3)});
}

// x @ dequantize(w).T (+ bias): MLX's affine quantized layout.
inline mx::array qlinear(const mx::array& x, const mx::array& w, const mx::array& scales,
                         const mx::array* biases, int group_size, int bits,
                         const mx::array* bias) {
  mx::array y = mx::quantized_matmul(x, w, scales, opt(biases), true, group_size, bits,
                                     "affine");
  if (bias) return mx::add(y, *bias);
  return y;
}

inline mx::array softmax_last(const mx::array& x, bool precise) {
  return mx::softmax(x, -1, precise);
}

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch's gelu(approximate="tanh").
inline mx::array gelu_tanh(const mx::array& x) {
  auto dt = x.dtype();
  mx::array c(std::sqrt(2.0 / M_PI), dt);
  mx::array k(0.044715, dt);
  mx::array half(0.5, dt);
  mx::array one(1.0, dt);
  auto inner = mx::multiply(c, mx::add(x, mx::multiply(k, mx::multiply(x, mx::square(x)))));
  return mx::multiply(mx::multiply(half, x), mx::add(one, mx::tanh(inner)));
}

inline mx::array silu(const mx::array& x) { return mx::multiply(x, mx::sigmoid(x)); }

// tanh(x / cap) * cap in x's dtype.
inline mx::array softcap(const mx::array& x, float cap) {
  mx::array c(cap, x.dtype());
  return mx::multiply(mx::tanh(mx::divide(x, c)), c);
}

inline mx::array scalar(double v, mx::Dtype dt) { return mx::array(v, dt); }

inline mx::array arange_i(int start, int stop) { return mx::arange(start, stop, 1); }

// Boolean mask [L, K]: query i sits at position qstart + i, key j at kstart + j;
// allowed when the key is not in the future and (window > 0) within the window.
inline mx::array causal_window_mask(int L, int qstart, int K, int kstart, int window) {
  auto q = mx::reshape(mx::arange(qstart, qstart + L, 1), {L, 1});
  auto k = mx::reshape(mx::arange(kstart, kstart + K, 1), {1, K});
  auto m = mx::less_equal(k, q);
  if (window > 0) {
    m = mx::logical_and(m, mx::less(mx::subtract(q, k), mx::array(window)));
  }
  return m;
}

// x[:, :, t0:t1] of a [B, H, T, D] array.
inline mx::array slice_t(const mx::array& x, int t0, int t1) {
  return mx::slice(x, mx::Shape{0, 0, t0, 0}, mx::Shape{x.shape(0), x.shape(1), t1, x.shape(3)});
}

// concatenate along the time axis (2)
inline mx::array cat_t(const mx::array& a, const mx::array& b) {
  return mx::concatenate({a, b}, 2);
}

// buf[:, :, :used] followed by `extra` zero positions.
inline mx::array grow_t(const mx::array& buf, int used, int extra) {
  auto z = mx::zeros({buf.shape(0), buf.shape(1), extra, buf.shape(3)}, buf.dtype());
  if (used == 0) return z;
  return cat_t(slice_t(buf, 0, used), z);
}

// ring[:, :, idx:] ++ ring[:, :, :idx] (temporal order of a full ring)
inline mx::array unroll_t(const mx::array& ring, int idx) {
  if (idx == 0) return ring;
  return cat_t(slice_t(ring, idx, ring.shape(2)), slice_t(ring, 0, idx));
}

// buf[:, :, t0:t0+T] = upd
inline mx::array write_t(const mx::array& buf, const mx::array& upd, int t0) {
  return mx::slice_update(buf, upd, mx::Shape{0, 0, t0, 0},
                          mx::Shape{upd.shape(0), upd.shape(1), t0 + upd.shape(2), upd.shape(3)});
}

inline mx::array zeros4(int a, int b, int c, int d, mx::Dtype dt) {
  return mx::zeros({a, b, c, d}, dt);
}

inline bool same_dtype(const mx::array& a, const mx::array& b) { return a.dtype() == b.dtype(); }

// [B, L, H*D] -> [B, H, L, D]
// One position (a decode step): a plain reshape, the same elements in the same
// order.  The transposed view would carry the position axis's stride (H * D)
// on a size-1 axis, and MLX's CUDA RMSNorm copies any input whose second-to-
// last stride is not the row length: one copy kernel per layer for the q/k
// norms of Qwen 3 and Gemma 3 (benchmarks/decode_profile.py --kernels).
inline mx::array heads_first(const mx::array& x, int H, int D) {
  if (x.shape(1) == 1) return mx::reshape(x, {x.shape(0), H, 1, D});
  return mx::transpose(mx::reshape(x, {x.shape(0), x.shape(1), H, D}), {0, 2, 1, 3});
}

// [B, H, L, D] -> [B, L, H*D]
inline mx::array heads_merge(const mx::array& x) {
  if (x.shape(2) == 1) return mx::reshape(x, {x.shape(0), 1, x.shape(1) * x.shape(3)});
  return mx::reshape(mx::transpose(x, {0, 2, 1, 3}),
                     {x.shape(0), x.shape(2), x.shape(1) * x.shape(3)});
}

// x[:, t:t+1, :] of [B, L, D]
inline mx::array take_position(const mx::array& x, int t) {
  return mx::slice(x, mx::Shape{0, t, 0}, mx::Shape{x.shape(0), t + 1, x.shape(2)});
}

inline mx::array neg_inf_like(mx::Dtype dt) {
  return mx::array(-std::numeric_limits<float>::infinity(), dt);
}

// The mask attention applies, given the structural part and the caller's.
// kind: 0 none, 1 causal, 2 causal within `window`. user: NULL or a mask whose
// last axis covers absolute key positions [0, qstart + L); its [kstart,
// kstart + K) columns are used. Returns false (no mask) or true with *out set;
// `causal_mode` is set when the plain causal mode of the fused kernel suffices.
inline bool build_mask(int kind, int L, int qstart, int K, int kstart, int window,
                       const mx::array* user, mx::Dtype dt, bool allow_causal_mode,
                       bool* causal_mode, mx::array* out) {
  *causal_mode = false;
  if (user == nullptr) {
    if (kind == 0) return false;
    if (kind == 1 && allow_causal_mode) {
      *causal_mode = true;
      return false;
    }
    *out = causal_window_mask(L, qstart, K, kstart, kind == 2 ? window : 0);
    return true;
  }
  if (user->ndim() < 1 || user->shape(-1) != qstart + L) {
    throw std::invalid_argument(
        "[mlxcy] attention mask: its last axis must cover all " +
        std::to_string(qstart + L) + " key positions (cache offset + new tokens), got " +
        std::to_string(user->ndim() ? user->shape(-1) : 0));
  }
  if (user->ndim() >= 2 && user->shape(-2) != L && user->shape(-2) != 1) {
    throw std::invalid_argument("[mlxcy] attention mask: its query axis must be 1 or " +
                                std::to_string(L));
  }
  mx::array u = *user;
  if (kstart != 0 || K != qstart + L) {
    mx::Shape start(u.ndim(), 0), stop(u.shape().begin(), u.shape().end());
    start.back() = kstart;
    stop.back() = kstart + K;
    u = mx::slice(u, start, stop);
  }
  bool is_bool = u.dtype() == mx::bool_;
  if (!is_bool) u = mx::astype(u, dt);
  if (kind == 0) {
    *out = u;
    return true;
  }
  auto st = causal_window_mask(L, qstart, K, kstart, kind == 2 ? window : 0);
  *out = is_bool ? mx::logical_and(u, st) : mx::where(st, u, neg_inf_like(dt));
  return true;
}

// softmax(tanh(q k^T * scale / cap) * cap + mask) v, with grouped kv heads
// (q: [B, H, L, D], k/v: [B, Hkv, K, D]); the mask (bool or additive) broadcasts
// to [B, H, L, K].
inline mx::array attention_softcap(const mx::array& q, const mx::array& k, const mx::array& v,
                                   float scale, float cap, const mx::array* mask) {
  int B = q.shape(0), H = q.shape(1), L = q.shape(2), D = q.shape(3);
  int Hkv = k.shape(1), K = k.shape(2);
  int rep = H / Hkv;
  auto qg = mx::reshape(q, {B, Hkv, rep, L, D});
  auto kg = mx::expand_dims(k, 2);
  auto vg = mx::expand_dims(v, 2);
  auto s = mx::multiply(mx::matmul(qg, mx::swapaxes(kg, -1, -2)), mx::array(scale, q.dtype()));
  if (cap > 0) s = softcap(s, cap);
  if (mask) {
    mx::array m = *mask;
    while (m.ndim() < 4) m = mx::expand_dims(m, 0);
    if (m.shape(1) == 1) {
      m = mx::expand_dims(m, 2);
    } else {
      m = mx::reshape(m, {m.shape(0), Hkv, rep, m.shape(2), m.shape(3)});
    }
    if (m.dtype() == mx::bool_) {
      s = mx::where(m, s, neg_inf_like(s.dtype()));
    } else {
      s = mx::add(s, m);
    }
  }
  auto p = mx::softmax(s, -1, true);
  return mx::reshape(mx::matmul(p, vg), {B, H, L, D});
}

}  // namespace mlxcy
