// CUDA's built-ins as plain C++, for tools/emulate_gpu_step.py: the device
// code of include/mlxcy/gpu_step.h compiled by g++ and run as ONE block of
// 256 OS threads (a function's __shared__ arrays become its statics, which
// one block shares).  Warp operations meet at a per-warp barrier.
#pragma once
#define __CUDA_ARCH__ 700   // (gpu_step.h then issues no cp.async)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline

using std::max;
using std::min;

struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim3 threadIdx;
inline const Dim3 blockIdx{0, 0, 0};
inline const Dim3 gridDim{1, 1, 1};
inline const Dim3 blockDim{256, 1, 1};

// A reusable barrier of n threads (256 for the block, 32 for a warp).
struct EmuBarrier {
  std::mutex m;
  std::condition_variable cv;
  int n, waiting = 0;
  unsigned long gen = 0;
  explicit EmuBarrier(int n_) : n(n_) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m);
    const unsigned long g = gen;
    if (++waiting == n) {
      waiting = 0;
      ++gen;
      cv.notify_all();
    } else {
      cv.wait(lk, [&] { return gen != g; });
    }
  }
};

inline EmuBarrier& emu_block() {
  static EmuBarrier b(256);
  return b;
}

inline EmuBarrier& emu_warp() {
  static EmuBarrier* w = [] {
    auto* a = static_cast<EmuBarrier*>(::operator new(8 * sizeof(EmuBarrier)));
    for (int i = 0; i < 8; ++i) new (a + i) EmuBarrier(32);
    return a;
  }();
  return w[threadIdx.x / 32];
}

inline void __syncthreads() { emu_block().wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp().wait(); }

// A warp's lanes exchange through one slot each (two barriers: written, read).
inline unsigned long long emu_slots[8][32];

template <typename T>
inline T emu_shuffle(T v, int src) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  unsigned long long u = 0;
  std::memcpy(&u, &v, sizeof v);
  emu_slots[w][l] = u;
  __syncwarp();
  const unsigned long long r = emu_slots[w][src & 31];
  __syncwarp();
  T out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

template <typename T>
inline T __shfl_sync(unsigned, T v, int src) { return emu_shuffle(v, src); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
  return emu_shuffle(v, static_cast<int>(threadIdx.x % 32) ^ o);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T __ldcg(const T* p) { return *p; }

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned long long emu_load_acquire(const unsigned long long* p) {
  return std::atomic_ref<unsigned long long>(*const_cast<unsigned long long*>(p))
      .load(std::memory_order_acquire);
}
inline void emu_add_release(unsigned long long* p) {
  std::atomic_ref<unsigned long long>(*p).fetch_add(1, std::memory_order_release);
}

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline float __int_as_float(unsigned i) { return __int_as_float(static_cast<int>(i)); }
inline unsigned __cvta_generic_to_shared(const void*) { return 0; }

// bfloat16 as the kernel uses it: from float rounded to nearest even, to float exactly.
struct emu_bf16 {
  uint16_t b;
  emu_bf16() = default;
  emu_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    b = std::isnan(f) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const {
    const uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
