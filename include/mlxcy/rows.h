// Helpers of the generation engine (mlxcy/generation/engine.pyx) for arrays with one
// row per sequence: joining row sets whose widths differ, left padding.
#pragma once
#include <mlx/mlx.h>

namespace mlxcy {
namespace mx = mlx::core;

// a and b joined along `axis`
inline mx::array cat_axis(const mx::array& a, const mx::array& b, int axis) {
  return mx::concatenate({a, b}, axis);
}

// n zero positions before the time axis (2) of [B, H, T, D]
inline mx::array left_pad_t(const mx::array& x, int n) {
  if (n == 0) return x;
  auto z = mx::zeros({x.shape(0), x.shape(1), n, x.shape(3)}, x.dtype());
  return mx::concatenate({z, x}, 2);
}

// x ([rows] or [rows, w'] with w' <= w), or `fill` where x is null, widened
// on the right with `fill` to [rows, w] (two_d) or [rows]
inline mx::array fill_rows(const mx::array* x, int rows, int w, bool two_d, mx::Dtype dt,
                           double fill) {
  auto f = mx::array(fill, dt);
  if (x == nullptr) {
    return two_d ? mx::full({rows, w}, f, dt) : mx::full({rows}, f, dt);
  }
  if (two_d && x->shape(1) < w) {
    return mx::concatenate({*x, mx::full({rows, w - x->shape(1)}, f, dt)}, 1);
  }
  return *x;
}

// history [rows, w'] (or none) left-padded with -1 to [rows, width]
inline mx::array widen_history(const mx::array* h, int rows, int width) {
  auto fill = mx::array(-1, mx::int32);
  if (h == nullptr) return mx::full({rows, width}, fill, mx::int32);
  if (h->shape(1) == width) return *h;
  return mx::concatenate({mx::full({rows, width - h->shape(1)}, fill, mx::int32), *h}, 1);
}

}  // namespace mlxcy
