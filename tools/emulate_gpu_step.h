// CUDA's built-ins as plain C++, for tools/emulate_gpu_step.py: the device
// code of include/mlxcy/gpu_step.h compiled by g++ and run as ONE block of
// THREADS OS threads (a function's __shared__ arrays become its statics, which
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

// gpu_step.h's bounds, which the GPU build leaves out
#define STEP_CHECK(cond)                                                              \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "emulate_gpu_step: STEP_CHECK(%s) failed, line %d\n", #cond, \
                   __LINE__);                                                         \
      std::abort();                                                                   \
    }                                                                                 \
  } while (0)

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline

using std::max;
using std::min;

struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local Dim3 threadIdx;
inline const Dim3 blockIdx{0, 0, 0};
inline const Dim3 gridDim{1, 1, 1};
// The block's threads: the device code's THREADS (emulate_gpu_step.py passes it).
#ifndef EMU_THREADS
#error "EMU_THREADS: the device code's block size"
#endif
inline const Dim3 blockDim{EMU_THREADS, 1, 1};

// A reusable barrier of n threads (the block's, or a warp's 32).
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
  static EmuBarrier b(EMU_THREADS);
  return b;
}

inline EmuBarrier& emu_warp() {
  static EmuBarrier* w = [] {
    auto* a = static_cast<EmuBarrier*>(::operator new(EMU_THREADS / 32 * sizeof(EmuBarrier)));
    for (int i = 0; i < EMU_THREADS / 32; ++i) new (a + i) EmuBarrier(32);
    return a;
  }();
  return w[threadIdx.x / 32];
}

inline void __syncthreads() { emu_block().wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp().wait(); }

// A warp's lanes exchange through one slot each (two barriers: written, read).
inline unsigned long long emu_slots[EMU_THREADS / 32][32];

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
using __nv_bfloat16 = emu_bf16;

// mma.sync.m16n8k16 (bf16 in, f32 sums) of a warp: each lane publishes its
// fragments, then computes its four sums from everyone's (PTX's fragment
// layout: lane = 4 g + t holds A[g][2t..], A[g+8][2t..], A[g][2t+8..],
// A[g+8][2t+8..], B[2t..][g], B[2t+8..][g], D[g][2t..], D[g+8][2t..]).
inline unsigned emu_frags[8][32][6];

inline float emu_half(unsigned word, int hi) {
  emu_bf16 b;
  b.b = static_cast<uint16_t>(hi ? word >> 16 : word & 0xffffu);
  return static_cast<float>(b);
}

inline void emu_mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  for (int i = 0; i < 4; ++i) emu_frags[w][l][i] = a[i];
  emu_frags[w][l][4] = b[0];
  emu_frags[w][l][5] = b[1];
  __syncwarp();
  auto A = [&](int r, int k) {   // A[r][k]
    const int lane = 4 * (r % 8) + (k % 8) / 2, reg = (r >= 8) + 2 * (k >= 8);
    return emu_half(emu_frags[w][lane][reg], k & 1);
  };
  auto B = [&](int k, int n) {   // B[k][n]
    const int lane = 4 * n + (k % 8) / 2;
    return emu_half(emu_frags[w][lane][4 + (k >= 8)], k & 1);
  };
  const int g = l / 4, t = l % 4;
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
    float s = d[e];
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    d[e] = s;
  }
  __syncwarp();
}
