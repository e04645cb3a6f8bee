// Shims over mlx/ops.h for arguments Cython cannot build easily:
// std::optional<array> is passed as a pointer (null = absent), std::optional<int>
// as an int where a value <= 0 means absent, std::optional<Dtype> as a dtype
// code where -1 means absent.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <mlx/mlx.h>

#include "mlxcy/core.h"  // opt, dtype_from_code

namespace mlxcy {
namespace mx = mlx::core;

namespace ops_detail {
inline std::optional<int> opt_int(int v) {
  return v > 0 ? std::optional<int>(v) : std::nullopt;
}
}  // namespace ops_detail

inline mx::array clip(const mx::array& a, const mx::array* lo, const mx::array* hi) {
  return mx::clip(a, opt(lo), opt(hi));
}

inline mx::array nan_to_num(const mx::array& a, float nan, const float* posinf,
                            const float* neginf) {
  std::optional<float> p = posinf ? std::optional<float>(*posinf) : std::nullopt;
  std::optional<float> n = neginf ? std::optional<float>(*neginf) : std::nullopt;
  return mx::nan_to_num(a, nan, p, n);
}

inline std::vector<mx::array> quantize(const mx::array& w, int group_size, int bits,
                                       const std::string& mode) {
  return mx::quantize(w, ops_detail::opt_int(group_size), ops_detail::opt_int(bits), mode);
}

inline mx::array dequantize(const mx::array& w, const mx::array& scales,
                            const mx::array* biases, int group_size, int bits,
                            const std::string& mode, int dtype_code) {
  std::optional<mx::Dtype> dt =
      dtype_code >= 0 ? std::optional<mx::Dtype>(dtype_from_code(dtype_code)) : std::nullopt;
  return mx::dequantize(w, scales, opt(biases), ops_detail::opt_int(group_size),
                        ops_detail::opt_int(bits), mode, std::nullopt, dt);
}


inline mx::array quantized_matmul(const mx::array& x, const mx::array& w,
                                  const mx::array& scales, const mx::array* biases,
                                  bool transpose, int group_size, int bits,
                                  const std::string& mode) {
  return mx::quantized_matmul(x, w, scales, opt(biases), transpose,
                              ops_detail::opt_int(group_size), ops_detail::opt_int(bits),
                              mode);
}

inline mx::array gather_mm(const mx::array& a, const mx::array& b, const mx::array* lhs,
                           const mx::array* rhs, bool sorted_indices) {
  return mx::gather_mm(a, b, opt(lhs), opt(rhs), sorted_indices);
}

inline mx::array gather_qmm(const mx::array& x, const mx::array& w, const mx::array& scales,
                            const mx::array* biases, const mx::array* lhs,
                            const mx::array* rhs, bool transpose, int group_size, int bits,
                            const std::string& mode, bool sorted_indices) {
  return mx::gather_qmm(x, w, scales, opt(biases), opt(lhs),
                        opt(rhs), transpose, ops_detail::opt_int(group_size),
                        ops_detail::opt_int(bits), mode, std::nullopt, sorted_indices);
}

}  // namespace mlxcy
