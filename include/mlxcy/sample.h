// Pointer-based shims used by mlxcy/sample.pyx (samplers and logit
// processors): MLX functions whose optional arguments Cython cannot build.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include <mlx/mlx.h>

namespace mlxcy::smp {
namespace mx = mlx::core;
namespace mr = mlx::core::random;

// Cumulative sum along `axis` in the input's dtype.
inline mx::array cumsum(const mx::array& a, int axis, bool reverse, bool inclusive) {
  return mx::cumsum(a, axis, reverse, inclusive);
}

// One draw per distribution along `axis`; a null key uses (and advances)
// the thread's global key sequence.
inline mx::array categorical(const mx::array& logits, int axis, const mx::array* key) {
  return mr::categorical(logits, axis,
                         key ? std::optional<mx::array>(*key) : std::nullopt);
}

// Gumbel-max draw with an explicit key and 1/temperature, compiled once so
// MLX fuses the noise and scaling element-wise ops (as mlx-lm compiles its
// categorical_sampling).
inline std::vector<mx::array> categorical_fn(const std::vector<mx::array>& in) {
  return {mr::categorical(mx::multiply(in[0], in[2]), -1, in[1])};
}

// A draw that advances a sampler's own key: *key is split in two, *key
// becomes the first half (for later steps) and the second half drives this
// draw over the last axis of logits * inv_temp.
inline mx::array categorical_step(const mx::array& logits, double inv_temp, mx::array* key) {
  // Never destroyed: no teardown ordering against MLX's compile cache at exit.
  static auto* compiled = new std::function<std::vector<mx::array>(
      const std::vector<mx::array>&)>(mx::compile(categorical_fn));
  auto parts = mr::split(*key);
  *key = std::move(parts.first);
  return (*compiled)({logits, parts.second, mx::array(inv_temp, logits.dtype())})[0];
}

// A fresh key drawn from (and advancing) the thread's global key sequence.
inline mx::array key_from_global() { return mr::bits({2}, 4); }

inline mx::array key(uint64_t seed) { return mr::key(seed); }

// Split *key in two: *key becomes the first half (the key for later steps),
// the second half is returned for this step's draw.
inline mx::array next_key(mx::array* key) {
  auto parts = mr::split(*key);
  *key = std::move(parts.first);
  return std::move(parts.second);
}

}  // namespace mlxcy::smp
