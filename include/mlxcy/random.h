// Pointer-based shims over mlx/random.h. MLX's random functions take
// `const std::optional<array>& key`, which Cython cannot build easily: here a
// null key pointer means "use (and advance) the thread's global key sequence".
#pragma once

#include <cstdint>
#include <optional>

#include <mlx/mlx.h>

#include "mlxcy/core.h"  // opt

namespace mlxcy::rnd {
namespace mx = mlx::core;
namespace mr = mlx::core::random;

inline mx::array key(uint64_t seed) { return mr::key(seed); }
inline void seed(uint64_t seed) { mr::seed(seed); }

inline mx::array split(const mx::array& key, int num) { return mr::split(key, num); }

inline mx::array bits(const mx::Shape& shape, int width, const mx::array* key) {
  return mr::bits(shape, width, opt(key));
}

inline mx::array uniform(const mx::array& low, const mx::array& high, const mx::Shape& shape,
                         mx::Dtype dtype, const mx::array* key) {
  return mr::uniform(low, high, shape, dtype, opt(key));
}

// loc / scale: null means the standard values (0 and 1), skipping the extra ops.
inline mx::array normal(const mx::Shape& shape, mx::Dtype dtype, const mx::array* loc,
                        const mx::array* scale, const mx::array* key) {
  return mr::normal(shape, dtype, opt(loc), opt(scale), opt(key));
}

inline mx::array randint(const mx::array& low, const mx::array& high, const mx::Shape& shape,
                         mx::Dtype dtype, const mx::array* key) {
  return mr::randint(low, high, shape, dtype, opt(key));
}

// shape null: the result takes p's shape.
inline mx::array bernoulli(const mx::array& p, const mx::Shape* shape, const mx::array* key) {
  return shape ? mr::bernoulli(p, *shape, opt(key)) : mr::bernoulli(p, opt(key));
}

// shape null: lower and upper broadcast together give the shape.
inline mx::array truncated_normal(const mx::array& lower, const mx::array& upper,
                                  const mx::Shape* shape, mx::Dtype dtype,
                                  const mx::array* key) {
  return shape ? mr::truncated_normal(lower, upper, *shape, dtype, opt(key))
               : mr::truncated_normal(lower, upper, dtype, opt(key));
}

inline mx::array gumbel(const mx::Shape& shape, mx::Dtype dtype, const mx::array* key) {
  return mr::gumbel(shape, dtype, opt(key));
}

inline mx::array laplace(const mx::Shape& shape, mx::Dtype dtype, float loc, float scale,
                         const mx::array* key) {
  return mr::laplace(shape, dtype, loc, scale, opt(key));
}

// The three forms of categorical: one draw per distribution, a given output
// shape, or num_samples draws per distribution.
inline mx::array categorical(const mx::array& logits, int axis, const mx::array* key) {
  return mr::categorical(logits, axis, opt(key));
}
inline mx::array categorical_shape(const mx::array& logits, int axis, const mx::Shape& shape,
                                   const mx::array* key) {
  return mr::categorical(logits, axis, shape, opt(key));
}
inline mx::array categorical_n(const mx::array& logits, int axis, int num_samples,
                               const mx::array* key) {
  return mr::categorical(logits, axis, num_samples, opt(key));
}

inline mx::array permutation(const mx::array& x, int axis, const mx::array* key) {
  return mr::permutation(x, axis, opt(key));
}
inline mx::array permutation_n(int n, const mx::array* key) {
  return mr::permutation(n, opt(key));
}

}  // namespace mlxcy::rnd
