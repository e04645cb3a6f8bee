// Pointer-based shims used by mlxcy/sample.pyx (samplers and logit
// processors): MLX functions whose optional arguments Cython cannot build.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>

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

// A draw that advances a sampler's own key: *key is split in two, *key
// becomes the first half (for later steps) and the second half drives this
// draw. A null key uses the global key sequence instead.
inline mx::array categorical_step(const mx::array& logits, int axis, mx::array* key) {
  if (key == nullptr) return mr::categorical(logits, axis);
  auto parts = mr::split(*key);
  *key = std::move(parts.first);
  return mr::categorical(logits, axis, parts.second);
}

inline mx::array key(uint64_t seed) { return mr::key(seed); }

// Split *key in two: *key becomes the first half (the key for later steps),
// the second half is returned for this step's draw.
inline mx::array next_key(mx::array* key) {
  auto parts = mr::split(*key);
  *key = std::move(parts.first);
  return std::move(parts.second);
}

}  // namespace mlxcy::smp
