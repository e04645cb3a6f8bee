// Compiled elementwise pieces of the decoder.  On a GPU each elementwise op is
// a kernel launch (~7 us on an H100): compiling the MLP's activation-times-up
// product turns several launches into one.  The functions are compiled once,
// shapeless, on first use.
#pragma once

#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <mlx/backend/cuda/cuda.h>
#include <mlx/fast.h>
#include <mlx/mlx.h>

namespace mlxcy {
namespace mx = mlx::core;

inline std::vector<mx::array> swiglu_impl(const std::vector<mx::array>& x) {
  const auto& g = x[0];
  return {mx::multiply(mx::multiply(g, mx::sigmoid(g)), x[1])};
}

inline std::vector<mx::array> geglu_tanh_impl(const std::vector<mx::array>& x) {
  const auto& g = x[0];
  auto dt = g.dtype();
  mx::array c(std::sqrt(2.0 / M_PI), dt), k(0.044715, dt), half(0.5, dt), one(1.0, dt);
  auto inner = mx::multiply(c, mx::add(g, mx::multiply(k, mx::multiply(g, mx::square(g)))));
  auto act = mx::multiply(mx::multiply(half, g), mx::add(one, mx::tanh(inner)));
  return {mx::multiply(act, x[1])};
}

// silu(g) * u
inline mx::array swiglu(const mx::array& g, const mx::array& u) {
  static auto fn = mx::compile(swiglu_impl, /*shapeless=*/true);
  return fn({g, u})[0];
}

// gelu_tanh(g) * u  (Gemma's MLP)
inline mx::array geglu_tanh(const mx::array& g, const mx::array& u) {
  static auto fn = mx::compile(geglu_tanh_impl, /*shapeless=*/true);
  return fn({g, u})[0];
}

// Columns [start, stop) of the last axis of a [B, L, D] array.
inline mx::array last_axis_slice(const mx::array& x, int start, int stop) {
  return mx::slice(x, mx::Shape{0, 0, start}, mx::Shape{x.shape(0), x.shape(1), stop});
}

// ---- residual add + RMSNorm in one kernel (CUDA) -------------------------
//
// A decoder block adds each branch's output to the residual stream and
// normalizes the sum for the next branch: two kernels, an add and an
// RMSNorm, each ~7 us of dispatch on a GPU for a few KB of work.  This
// kernel does both: h = x + r (rounded to x's dtype, as the add would),
// y = w * T(h * rsqrt(mean(h^2) + eps)) (MLX's RMSNorm formula, float32
// accumulation).  One block of 256 threads per row.

inline const char* add_rms_norm_source() {
  return R"(
  const int row = blockIdx.x;
  const T* xr = x + (size_t)row * D;
  const T* rr = r + (size_t)row * D;
  T* hr = h + (size_t)row * D;
  T* yr = y + (size_t)row * D;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    T hv = xr[j] + rr[j];
    hr[j] = hv;
    float t = static_cast<float>(hv);
    ss += t * t;
  }
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) part[0] = v;
  }
  __syncthreads();
  const float inv = rsqrtf(part[0] / D + __int_as_float(EPS_BITS));
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    float t = static_cast<float>(hr[j]) * inv;
    yr[j] = w[j] * static_cast<T>(t);
  }
)";
}

// Whether the default device is a CUDA GPU: where mlxcy's own CUDA kernels
// (add_rms_norm here, the log-sum-exp in xent.h) run instead of MLX ops.
inline bool cuda_default_device() {
  static bool cuda = mx::cu::is_available();
  return cuda && mx::default_device() == mx::Device::gpu;
}

// Whether add_rms_norm runs its own kernel here.
inline bool add_rms_norm_native() { return cuda_default_device(); }

// {x + r, rms_norm(x + r) * w}.  One CUDA kernel on a CUDA GPU when the three
// share a floating dtype and w is given; otherwise the add and MLX's RMSNorm
// (the same values).  Inference only: the kernel has no VJP.
inline std::vector<mx::array> add_rms_norm(const mx::array& x, const mx::array& r,
                                           const mx::array* w, float eps) {
  if (x.shape() != r.shape())
    throw std::invalid_argument("add_rms_norm: x and r must have the same shape");
  int D = x.ndim() ? x.shape(-1) : 0;
  // (x.size() > 0: a launch of zero blocks is an error)
  bool kernel = add_rms_norm_native() && w != nullptr && D > 0 && x.size() > 0 &&
                x.dtype() == r.dtype() && x.dtype() == w->dtype() && w->ndim() == 1 &&
                w->shape(0) == D && mx::issubdtype(x.dtype(), mx::floating);
  if (!kernel) {
    auto h = mx::add(x, r);
    std::optional<mx::array> wo;
    if (w != nullptr) wo = *w;
    return {h, mx::fast::rms_norm(h, wo, eps)};
  }
  static auto fn = mx::fast::cuda_kernel("mlxcy_add_rms_norm", {"x", "r", "w"}, {"h", "y"},
                                         add_rms_norm_source());
  int bits;
  std::memcpy(&bits, &eps, sizeof(bits));
  int rows = static_cast<int>(x.size() / D);
  constexpr int threads = 256;
  return fn({x, r, *w}, {x.shape(), x.shape()}, {x.dtype(), x.dtype()},
            {rows * threads, 1, 1}, {threads, 1, 1},
            {{"T", x.dtype()}, {"D", D}, {"EPS_BITS", bits}}, std::nullopt, false, {});
}

}  // namespace mlxcy
