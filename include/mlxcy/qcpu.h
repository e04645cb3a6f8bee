// Quantized matmul for MLX's CPU backend (used by mlxcy/nn.pyx on the CPU).
//
// MLX's CPU quantized_matmul (0.32) is a scalar loop that unpacks every weight
// again for every row of x and accumulates in the activation dtype: on a
// 2-core EPYC it ran a [1, 576] x [3072, 576]^T 4-bit product in 11.8 ms and a
// 512-row one in 6.0 s, where dequantizing the weight (3.4 ms) and running
// MLX's float GEMM took 4.7 ms and 326 ms.  So on the CPU the weight is
// dequantized in its scales' dtype right before the product and dropped after
// it (it stays 4-bit in memory); the float GEMM accumulates in float32, which
// is also closer to the exact product than the quantized kernel.
//
// MLX's CPU backend allocates each op's output when the host encodes it, ahead
// of the worker thread that computes it, so the dequantized weights of every
// layer the host has encoded are alive at once.  Inference therefore
// evaluates as it goes (eval_now, from Model.forward and the head's blocks
// below).
#pragma once

#include <optional>
#include <vector>

#include <mlx/mlx.h>

#include "mlxcy/nn.h"   // rows()

namespace mlxcy {
namespace mx = mlx::core;

// Evaluate `a` now, unless it is traced (compile, grad): there an eval is
// either refused or pointless.
inline void eval_now(const mx::array& a) {
  if (!a.is_tracer()) mx::eval(a);
}

// x @ dequantize(w).T (+ bias) for MLX's affine layout (w [out, in*bits/32]).
// Large weights (a vocabulary head) are dequantized `block` rows at a time:
// one 56 MB temporary costs more in page faults than the blocks' products
// (143 ms vs 80 ms for a 49152-row head in blocks of 1024).  With eval_blocks
// each block's product is evaluated before the next block is built, so one
// block's dequantized rows are alive at a time rather than all of them.
inline mx::array qlinear_dequant(const mx::array& x, const mx::array& w,
                                 const mx::array& scales, const mx::array* biases,
                                 int group_size, int bits, const mx::array* bias, int block,
                                 bool eval_blocks = false) {
  int n = w.shape(0);
  // float16 scales/biases (GGUF loads for the CPU keep them) with float32
  // activations: dequantize in float32, as MLX would round w to float16
  const bool widen = x.dtype() == mx::float32 && scales.dtype() != mx::float32;
  auto part = [&](int start, int stop) {
    bool whole = start == 0 && stop == n;
    std::optional<mx::array> qb = std::nullopt;
    if (biases) qb = whole ? *biases : rows(*biases, start, stop);
    mx::array sc = whole ? scales : rows(scales, start, stop);
    if (widen) {
      sc = mx::astype(sc, mx::float32);
      if (qb) qb = mx::astype(*qb, mx::float32);
    }
    mx::array wd = mx::dequantize(whole ? w : rows(w, start, stop), sc, qb,
                                  group_size, bits, "affine");
    return mx::matmul(x, mx::transpose(wd));
  };
  mx::array y = [&] {
    if (block <= 0 || n <= block) return part(0, n);
    std::vector<mx::array> parts;
    for (int s = 0; s < n; s += block) {
      parts.push_back(part(s, std::min(n, s + block)));
      if (eval_blocks) eval_now(parts.back());
    }
    return mx::concatenate(parts, -1);
  }();
  if (bias) return mx::add(y, *bias);
  return y;
}

}  // namespace mlxcy
