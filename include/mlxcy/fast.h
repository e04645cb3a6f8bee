// Pointer-based shims over mlx/fast.h: Cython cannot easily build
// std::optional<array> arguments, so a null pointer means "absent".
#pragma once

#include <optional>
#include <string>

#include <mlx/mlx.h>

#include "mlxcy/core.h"  // opt

namespace mlxcy {
namespace mx = mlx::core;

inline mx::array rms_norm(const mx::array& x, const mx::array* w, float eps) {
  return mx::fast::rms_norm(x, opt(w), eps);
}

inline mx::array layer_norm(const mx::array& x, const mx::array* w, const mx::array* b,
                            float eps) {
  return mx::fast::layer_norm(x, opt(w), opt(b), eps);
}

// base <= 0 means "use freqs" (which must then be given).
inline mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale,
                      int offset, const mx::array* freqs) {
  std::optional<float> b = base > 0 ? std::optional<float>(base) : std::nullopt;
  return mx::fast::rope(x, dims, traditional, b, scale, offset, opt(freqs));
}

inline mx::array rope_offsets(const mx::array& x, int dims, bool traditional, float base,
                              float scale, const mx::array& offset, const mx::array* freqs) {
  std::optional<float> b = base > 0 ? std::optional<float>(base) : std::nullopt;
  return mx::fast::rope(x, dims, traditional, b, scale, offset, opt(freqs));
}

// mask_mode: "" (none or an array mask), "causal"; mask may be additive or boolean.
inline mx::array sdpa(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                      const std::string& mask_mode, const mx::array* mask,
                      const mx::array* sinks) {
  return mx::fast::scaled_dot_product_attention(q, k, v, scale, mask_mode, opt(mask),
                                                opt(sinks));
}

}  // namespace mlxcy
