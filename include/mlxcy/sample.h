// Helpers of mlxcy/generation/sample.pyx (samplers): the compiled categorical draw
// with a sampler's own key, and a key drawn from the global sequence.
#pragma once

#include <functional>
#include <utility>
#include <vector>

#include <mlx/mlx.h>

namespace mlxcy::smp {
namespace mx = mlx::core;
namespace mr = mlx::core::random;

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

}  // namespace mlxcy::smp
