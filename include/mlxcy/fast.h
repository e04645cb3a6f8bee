// Pointer-based shims over mlx/fast.h: Cython cannot easily build
// std::optional<array> arguments, so a null pointer means "absent".
#pragma once

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include <mlx/mlx.h>

#include "mlxcy/core.h"   // opt
#include "mlxcy/fused.h"  // cuda_default_device

namespace mlxcy {
namespace mx = mlx::core;

inline mx::array rms_norm(const mx::array& x, const mx::array* w, float eps) {
  return mx::fast::rms_norm(x, opt(w), eps);
}

inline mx::array layer_norm(const mx::array& x, const mx::array* w, const mx::array* b,
                            float eps) {
  return mx::fast::layer_norm(x, opt(w), opt(b), eps);
}

// MLX 0.32.4's CUDA rope fails to launch ("invalid argument") on one position
// (a decode step) with a head dimension of 16: contiguous inputs from a batch
// of 128 rows at any head count and from batch x heads >= 512 below that, the
// fused q/k views at 128 rows (H200; head dimensions 64 and 128 launch at every
// size tried, up to 256 rows x 32 heads; 32 was not tried and is split too).
// Such inputs go through in launches of at most 64 rows and 256 rows x heads.
inline int rope_batch_chunk(const mx::array& x) {
  if (x.ndim() < 3 || x.shape(-2) != 1 || x.shape(-1) > 32 || !cuda_default_device()) return 0;
  int heads = int(x.size() / (size_t(x.shape(0)) * x.shape(-1)));
  int chunk = std::max(1, std::min(64, 256 / std::max(1, heads)));
  return chunk < x.shape(0) ? chunk : 0;
}

// The concatenation of f(rows [r, e) of x, r, e) over chunks of `chunk` rows.
template <typename F>
mx::array rope_in_chunks(const mx::array& x, int chunk, F f) {
  std::vector<mx::array> parts;
  for (int r = 0; r < x.shape(0); r += chunk) {
    int e = std::min(r + chunk, x.shape(0));
    mx::Shape lo(x.ndim(), 0), hi = x.shape();
    lo[0] = r;
    hi[0] = e;
    parts.push_back(f(mx::slice(x, lo, hi), r, e));
  }
  return mx::concatenate(parts, 0);
}

// offset: a scalar or one position per batch row; base <= 0 means "use
// freqs" (which must then be given).
inline mx::array rope_offsets(const mx::array& x, int dims, bool traditional, float base,
                              float scale, const mx::array& offset, const mx::array* freqs) {
  std::optional<float> b = base > 0 ? std::optional<float>(base) : std::nullopt;
  int chunk = rope_batch_chunk(x);
  if (!chunk) return mx::fast::rope(x, dims, traditional, b, scale, offset, opt(freqs));
  bool per_row = offset.ndim() == 1 && offset.shape(0) > 1;
  return rope_in_chunks(x, chunk, [&](const mx::array& xs, int r, int e) {
    auto o = per_row ? mx::slice(offset, {r}, {e}) : offset;
    return mx::fast::rope(xs, dims, traditional, b, scale, o, opt(freqs));
  });
}

// One position for every row.
inline mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale,
                      int offset, const mx::array* freqs) {
  return rope_offsets(x, dims, traditional, base, scale, mx::array(offset, mx::int32), freqs);
}

// mask_mode: "" (none or an array mask), "causal"; mask may be additive or boolean.
inline mx::array sdpa(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                      const std::string& mask_mode, const mx::array* mask,
                      const mx::array* sinks) {
  return mx::fast::scaled_dot_product_attention(q, k, v, scale, mask_mode, opt(mask),
                                                opt(sinks));
}

}  // namespace mlxcy
