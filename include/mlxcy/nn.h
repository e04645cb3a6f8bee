// Helpers for mlxcy's layers, caches and models (mlxcy/nn.pyx, cache.pyx,
// models/*.pyx): pointer-based shims for ops with optional arguments, and
// `own`, which turns a heap result of a `cdef ... except NULL` method back
// into a value so Cython code can keep it in a local.
#pragma once

#include <cmath>
#include <optional>
#include <vector>

#include <mlx/mlx.h>

namespace mlxcy {
namespace mx = mlx::core;

// Take ownership of a heap array (from heap()), returning it by value.
inline mx::array own(mx::array* p) {
  mx::array a = std::move(*p);
  delete p;
  return a;
}

inline std::optional<mx::array> nn_opt(const mx::array* a) {
  return a ? std::optional<mx::array>(*a) : std::nullopt;
}

// x @ w.T (+ bias) for a float weight [out, in].
inline mx::array linear(const mx::array& x, const mx::array& w, const mx::array* bias) {
  if (bias) return mx::addmm(*bias, x, mx::transpose(w));
  return mx::matmul(x, mx::transpose(w));
}

// x @ dequantize(w).T (+ bias): MLX's affine quantized layout.
inline mx::array qlinear(const mx::array& x, const mx::array& w, const mx::array& scales,
                         const mx::array* biases, int group_size, int bits,
                         const mx::array* bias) {
  mx::array y = mx::quantized_matmul(x, w, scales, nn_opt(biases), true, group_size, bits,
                                     "affine");
  if (bias) return mx::add(y, *bias);
  return y;
}

inline mx::array dequantize(const mx::array& w, const mx::array& scales,
                            const mx::array* biases, int group_size, int bits) {
  return mx::dequantize(w, scales, nn_opt(biases), group_size, bits, "affine");
}

// quantize(w) -> [wq, scales, biases]
inline std::vector<mx::array> quantize(const mx::array& w, int group_size, int bits) {
  return mx::quantize(w, group_size, bits, "affine");
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

inline size_t active_memory() { return mx::get_active_memory(); }
inline void clear_memory_cache() { mx::clear_cache(); }

}  // namespace mlxcy
