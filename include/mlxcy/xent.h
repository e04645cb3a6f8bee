// Next-token cross-entropy over a large vocabulary with a hand-written VJP.
//
// Written with plain ops, the loss over bf16 logits [N, V] keeps a float32
// copy of the logits for the backward pass and builds the gradient from
// several [N, V] temporaries (exp, subtract, the scattered one-hot, their
// sum, the cast back): for N = 2048 tokens and V = 49,152 each is 200-400 MB,
// several times the memory of the logits themselves.  Here
//  - the forward pass takes the log-sum-exp in float32 over row chunks of at
//    most ~64 MB, so no full float32 copy ever exists, and the target logit
//    straight from the logits (bf16 -> f32 is exact);
//  - the backward pass is one compiled elementwise kernel that reads the
//    logits once and writes their gradient once, in the logits' dtype:
//        d logits = (exp(f32(l) - lse) - onehot(t)) * g.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <mlx/compile.h>
#include <mlx/fast.h>
#include <mlx/mlx.h>
#include <mlx/transforms.h>

#include "mlxcy/fused.h"   // cuda_default_device()
#include "mlxcy/nn.h"      // rows()

namespace mlxcy {
namespace mx = mlx::core;

// inputs: logits [N, V], lse f32 [N, 1], targets int32 [N, 1], g f32 [N, 1],
// column ids int32 [1, V]  ->  d logits [N, V] in the logits' dtype.
inline std::vector<mx::array> xent_grad_impl(const std::vector<mx::array>& x) {
  auto lf = mx::astype(x[0], mx::float32);
  auto p = mx::exp(mx::subtract(lf, x[1]));
  auto hot = mx::astype(mx::equal(x[4], x[2]), mx::float32);
  return {mx::astype(mx::multiply(mx::subtract(p, hot), x[3]), x[0].dtype())};
}

// Rows per float32 chunk of the forward log-sum-exp (~64 MB).
inline int xent_chunk_rows(int V) { return std::max(1, (16 << 20) / std::max(V, 1)); }

// On a CUDA GPU the float32 chunks above are no use: buffers are released
// when their command batch completes, so every chunk's float32 copy is alive
// at once (the whole float32 logits again).  There the log-sum-exp is one
// kernel that reads the logits in their own dtype and accumulates in float32
// (a running max and rescaled sum per thread, then over the block).  It sits
// in the forward pass of a custom VJP, so it never needs a gradient.
inline const char* xent_lse_source() {
  return R"(
  const int row = blockIdx.x;
  const T* x = logits + (size_t)row * V;
  float m = -INFINITY, s = 0.0f;
  for (int j = threadIdx.x; j < V; j += blockDim.x) {
    float v = static_cast<float>(x[j]);
    if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }
    else if (m != -INFINITY) { s += expf(v - m); }
  }
  __shared__ float pm[32], ps[32];
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    float mm = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.0f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
    m = mm;
  }
  if ((threadIdx.x & 31) == 0) { pm[threadIdx.x >> 5] = m; ps[threadIdx.x >> 5] = s; }
  __syncthreads();
  if (threadIdx.x < 32) {
    bool live = threadIdx.x < (blockDim.x >> 5);
    m = live ? pm[threadIdx.x] : -INFINITY;
    s = live ? ps[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
      float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      float mm = fmaxf(m, m2);
      s = (m == -INFINITY ? 0.0f : s * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mm));
      m = mm;
    }
    if (threadIdx.x == 0) lse[row] = m + logf(s);
  }
)";
}

inline mx::array xent_lse(const mx::array& logits) {
  int N = logits.shape(0), V = logits.shape(1);
  if (logits.dtype() == mx::float32) return mx::logsumexp(logits, -1, true);
  if (cuda_default_device() && N > 0 && V > 0) {   // (a launch of zero blocks is an error)
    static auto fn = mx::fast::cuda_kernel("mlxcy_xent_lse", {"logits"}, {"lse"},
                                           xent_lse_source());
    constexpr int threads = 256;
    return fn({logits}, {mx::Shape{N, 1}}, {mx::float32}, {N * threads, 1, 1},
              {threads, 1, 1}, {{"T", logits.dtype()}, {"V", V}}, std::nullopt, false, {})[0];
  }
  int chunk = xent_chunk_rows(V);
  if (chunk >= N) return mx::logsumexp(mx::astype(logits, mx::float32), -1, true);
  std::vector<mx::array> parts;
  for (int r = 0; r < N; r += chunk) {
    auto part = rows(logits, r, std::min(N, r + chunk));
    parts.push_back(mx::logsumexp(mx::astype(part, mx::float32), -1, true));
  }
  return mx::concatenate(parts, 0);
}

// primals: logits [N, V], targets int32 [N]  ->  [lse - logit[target]] f32 [N]
inline std::vector<mx::array> xent_forward(const std::vector<mx::array>& in) {
  const auto& logits = in[0];
  auto t = mx::expand_dims(in[1], -1);
  auto tgt = mx::astype(mx::take_along_axis(logits, t, -1), mx::float32);
  auto lse = xent_lse(logits);
  // The log-sum-exp rides along as a second output so the backward pass
  // does not recompute it.
  return {mx::squeeze(mx::subtract(lse, tgt), -1), mx::stop_gradient(lse)};
}

inline std::vector<mx::array> xent_backward(const std::vector<mx::array>& primals,
                                            const std::vector<mx::array>& cotan,
                                            const std::vector<mx::array>& outputs) {
  static auto grad = mx::compile(xent_grad_impl);
  const auto& logits = primals[0];
  int V = logits.shape(1);
  auto cols = mx::reshape(mx::arange(V, mx::int32), mx::Shape{1, V});
  auto t = mx::expand_dims(mx::astype(primals[1], mx::int32), -1);
  auto g = mx::expand_dims(mx::astype(cotan[0], mx::float32), -1);
  auto d = grad({logits, outputs[1], t, g, cols})[0];
  return {d, mx::zeros_like(primals[1])};
}

// Per-token cross-entropy (float32 [N]) of logits [N, V] against targets [N].
inline mx::array token_xent(const mx::array& logits, const mx::array& targets) {
  if (logits.ndim() != 2 || targets.ndim() != 1 || targets.shape(0) != logits.shape(0))
    throw std::invalid_argument("token_xent: logits must be [N, V] and targets [N]");
  static auto fn = mx::custom_vjp(xent_forward, xent_backward);
  return fn({logits, mx::astype(targets, mx::int32)})[0];
}

}  // namespace mlxcy
