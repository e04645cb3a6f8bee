// A whole one-token decode step of a standard pre-norm decoder (Llama,
// Mistral, Qwen2, Qwen3) or of Gemma 3 as ONE CUDA kernel launch: embedding,
// every block (RMSNorm, q/k/v products + bias, per-head q/k RMSNorm, RoPE, the
// KV-cache write, attention over the cache, o_proj + residual, RMSNorm,
// gate/up + SiLU, down + residual), the final norm and the output head.
// Gemma (GEMMA): the embedding times sqrt(D), GELU-tanh, and the sandwich
// norms -- o_proj's and down's outputs are normalized before they join the
// residual, which the next phase's activation load does (load_sandwich); its
// sliding layers run here while every position is inside their window (the
// host checks), so they attend like the global ones, with their own RoPE.
//
// Why one launch: MLX's CUDA backend spends ~6 us of host time encoding each
// kernel and a layer is ~13 of them, so the GPU idled two thirds of a step
// (docs/benchmarks.md).  Here the host builds one op per token; the blocks of
// the kernel step through the model's phases, meeting at a grid-wide barrier
// between phases (a phase needs all of the previous one's output).  The grid
// is one block per SM, all resident at once, so the barrier cannot wait on a
// block that has not started -- as long as no other such kernel runs at the
// same time: launches are chained (step_previous) and made from one thread.
//
// Layout of the work:
//   products  rows strided over all warps of the grid, a warp taking several
//             rows at once (Pass: up to 16 16-byte chunks in flight a lane,
//             12 for Gemma; gate and up rows in pairs); each lane streams
//             16-byte chunks (8 bf16 / 32 4-bit / 16 8-bit values) against the
//             activations in shared memory (float, padded 4 floats every 32 so
//             the lanes' 16-byte reads hit distinct banks), the first chunks
//             requested before the activations are loaded and normalized;
//   attention a block per (query head, chunk of 8 tiles of TP positions: 32,
//             fewer for heads of more than 128 bytes: tile_positions), a
//             warp per tile: it normalizes and rotates the head's q (and, on
//             the last tile, the new k/v, which the group's first head writes
//             into the cache at `pos`), scores a position per lane (per 32 /
//             TP lanes), and sums the values with lanes over (position group,
//             16-byte chunk of a value row); one warp merges the chunk's
//             tiles' (sum, max, weighted values) in shared memory, into the
//             head's output when the head is one chunk (up to 8 TP
//             positions), else into the chunk's partial, which the block
//             finishing a head's last chunk merges with the others through L2.
//   phases    5 per layer, a grid-wide barrier after each (4 when the MLP is
//             split over slices of its hidden rows: step_slice); before
//             waiting, each warp asks L2 for its first rows of the next phase.
// Inter-block data (the residual stream, q/k/v, attention output, MLP hidden
// state) lives in a float32 scratch output holding values already rounded to
// the model's dtype, read with ld.global.cg (L2, not the SM's stale L1).
// Every op rounds to the model's dtype where MLX's op-by-op path rounds
// (mlxcy/models/base.pyx), so the logits agree with it within the dtype's
// rounding (tests/models/test_gpu_step.py).
//
// The weights are reached through a table of device pointers (uint64) checked
// by the host each step against the model's current arrays (so a weight
// replaced or moved is never read stale); the KV buffers are the op's inputs
// (MLX orders the kernel after whatever wrote them) and are written in place
// at `pos`, as MLX's slice_update writes a donated buffer.  The barrier
// counters and the position live in a persistent device array (StepState).
//
// Nothing here is compiled by the host compiler except the launch code; the
// device source is compiled by NVRTC through mx::fast::cuda_kernel on first
// use (tools/check_gpu_kernels.py compiles it with nvcc without a GPU).
#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <mlx/fast.h>
#include <mlx/mlx.h>

namespace mlxcy {
namespace mx = mlx::core;

// ---- device code ------------------------------------------------------------
inline const char* step_device_source() {
  return R"CUDA(
namespace mlxcy_step {

#ifndef STEP_CHECK   // an index's bound: asserted where tools/emulate_gpu_step.h runs the code
#define STEP_CHECK(cond)
#endif

// A block's threads.  The kernels use up to ~250 registers a thread; 384
// threads (their budget capped at 168 by __launch_bounds__) spilled and made
// Llama-3.2-1B bf16's step 8-11% longer on an H100, 4-bit's no shorter (git
// show this line's commit).
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int PL = 33;       // table entries per layer (the host's kStepPerLayer; the
                             // last three are values: the layer's cache capacity, its
                             // ring's window (0: none) and rotation)

template <typename T>
__device__ __forceinline__ float rt(float v) {   // round to the model's dtype
  return static_cast<float>(static_cast<T>(v));
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ int xp(int k) { return k + ((k >> 5) << 2); }   // padded index

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Positions of a key/value tile (a warp's share of attention): 32 where a
// head's row is at most 128 bytes, fewer for larger heads, whose rows LPP =
// 32 / TP lanes score together, so that a lane loads at most 8 16-byte
// chunks of keys and the tile's values take one batch of loads, whatever the
// head size (at head size 256 a lane's 32 key loads were ~8 round trips: ptxas
// keeps ~4 in flight).  32 where the row does not split into whole chunks.
template <typename T, int HD>
__host__ __device__ constexpr int tile_positions() {
  const int rb = HD * static_cast<int>(sizeof(T));
  int tp = 32;
  while (tp > 1 && rb * tp > 32 * 128) tp /= 2;
  return rb % (16 * (32 / tp)) == 0 ? tp : 32;
}

// Weight values in a 16-byte chunk: 8 bf16 / 32 4-bit / 16 8-bit.
template <typename T, int BITS>
__host__ __device__ constexpr int chunk_vals() {
  return BITS ? 128 / BITS : 16 / static_cast<int>(sizeof(T));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.0f;
#pragma unroll
  for (int i = 0; i < WARPS; ++i) t += red[i];
  return t;
}

__device__ __forceinline__ unsigned long long load_acquire64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// The grid-wide barrier: a 64-bit arrival counter that only grows (it never
// wraps).  Every barrier adds gridDim.x, so barrier i of a step completes when
// the counter reaches base + i * gridDim.x; the block's thread 0 adds its
// arrival and spins until then.  The last block's arrival is what releases
// everyone: nothing else (a reset, a second word to bump) lies between it and
// the waiters, each of which would add an L2 round trip to every phase.
struct Barrier {
  unsigned long long* count;
  unsigned long long target;   // what the counter reaches at the next barrier
  unsigned* tm;                // MLXCY_STEP_TIMING: the blocks' clock readings, else null
  int phase;                   // barriers passed in this launch
  int nb;                      // barriers in a launch (where the timing's mid rows start)
};

__device__ __forceinline__ unsigned clock_ns() {   // the GPU's global clock, low word
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<unsigned>(t);
}

// Timing rows (MLXCY_STEP_TIMING; a row holds one reading per block): row 0 the
// block's start, rows 1 + 2p / 2 + 2p its arrival at / release from barrier p,
// row 1 + 2nb its end, row 2 + 2nb + p a reading inside phase p (the phase
// that ends at barrier p: when its activations were loaded, or when
// attention's merge began; the phase's start when nothing marked it)
// (benchmarks/gpu_step_profile.py --phases reads them).
__device__ __forceinline__ void clock_mark(unsigned* tm, int row) {
  if (tm != nullptr && threadIdx.x == 0) tm[row * gridDim.x + blockIdx.x] = clock_ns();
}

// The counter at the start of a step: every earlier step ended with it at a
// multiple of gridDim.x, and no block can pass the first barrier before this
// one arrives, so the value read here lies in [base, base + gridDim.x - 1].
__device__ __forceinline__ Barrier barrier_start(unsigned long long* count, unsigned* tm,
                                                 int nb) {
  clock_mark(tm, 0);
  clock_mark(tm, 2 + 2 * nb);   // (phase 0's mid reading until one is made)
  __shared__ unsigned long long base;
  if (threadIdx.x == 0) {
    const unsigned long long v = load_acquire64(count);
    base = v - v % gridDim.x;
  }
  __syncthreads();
  return Barrier{count, base, tm, 0, nb};
}

// The reading inside the current phase (timing row 2 + 2nb + phase), by the
// calling thread.
__device__ __forceinline__ void clock_mid(const Barrier& b) {
  if (b.tm != nullptr && b.phase < b.nb)
    b.tm[(2 + 2 * b.nb + b.phase) * gridDim.x + blockIdx.x] = clock_ns();
}

// All blocks of the grid meet here; writes before it are visible after it.
// (A phase is short, so the waiting thread spins without sleeping: the time
// from the last arrival to everyone's start is what a step pays per phase.)
__device__ __forceinline__ void grid_sync(Barrier& b) {
  b.target += gridDim.x;
  __syncthreads();
  if (threadIdx.x == 0) {
    // a release add (the block's writes, ordered before it by the
    // __syncthreads above, become visible with the arrival) and acquire
    // loads (what the other blocks wrote is visible after): no full fences
    clock_mark(b.tm, 1 + 2 * b.phase);
    asm volatile("red.release.gpu.global.add.u64 [%0], 1;" : : "l"(b.count) : "memory");
    while (load_acquire64(b.count) < b.target) {
    }
    clock_mark(b.tm, 2 + 2 * b.phase);
    if (b.phase + 1 < b.nb) clock_mark(b.tm, 3 + 2 * b.nb + b.phase);   // (the next mid's default)
  }
  ++b.phase;
  __syncthreads();
}

// Ask L2 for this warp's first rows of the next phase's weight (rows first,
// first + nw, ...; at most 2) while the grid waits at the barrier: the weights
// do not depend on the phase before, and a short phase's time is mostly the
// latency of its first loads.
template <typename T, int BITS>
__device__ __forceinline__ void prefetch_rows(const void* w, int K, int first, int N, int nw) {
  constexpr int VALS = chunk_vals<T, BITS>();
  const size_t rowb = (size_t)(K / VALS) * 16;
  const int lane = threadIdx.x & 31;
  for (int r = first, i = 0; r < N && i < 2; r += nw, ++i) {
    const char* p = static_cast<const char*>(w) + (size_t)r * rowb;
    for (size_t o = (size_t)lane * 128; o < rowb; o += 32 * 128)
      asm volatile("prefetch.global.L2 [%0];" : : "l"(p + o));
  }
}

// A linear layer's operands: the weight rows (already offset to the layer's
// first row), MLX affine scales and biases (quantized), an additive bias.
template <typename T>
struct Lin {
  const void* w;
  const T* s;
  const T* b;
};

// Row r of the q/k/v rows (q, then k, then v) is row r - qkv_first(p) of part
// p = qkv_part(r).
template <int NQ, int NKV, int HD>
__device__ __forceinline__ int qkv_part(int r) {
  return r < NQ * HD ? 0 : (r < (NQ + NKV) * HD ? 1 : 2);
}

template <int NQ, int NKV, int HD>
__device__ __forceinline__ int qkv_first(int p) {
  return p == 0 ? 0 : (p == 1 ? NQ * HD : (NQ + NKV) * HD);
}

template <typename T>
__device__ __forceinline__ Lin<T> lin(const unsigned long long* t) {
  return Lin<T>{reinterpret_cast<const void*>(t[0]), reinterpret_cast<const T*>(t[1]),
                reinterpret_cast<const T*>(t[2])};
}

template <typename T>
__device__ __forceinline__ const T* ptr(unsigned long long v) {
  return reinterpret_cast<const T*>(v);
}

// A quantized weight q (B bits at bit sh of word wd) as the float OFF + q,
// exactly: q's bits moved into a float's mantissa where their unit is 1
// (128.0f's bit 16 for 4 bits, 256.0f's bit 15 for 8) -- a shift and one
// lop3, where a shift, a mask and an int-to-float conversion (I2FP) were
// three instructions of the SM's integer units.  The sums take the offset
// back out: qdot_affine.
template <int B>
struct QFloat {
  static constexpr int AT = B == 4 ? 16 : 15;                  // q's lowest bit
  static constexpr float OFF = static_cast<float>(1u << (23 - AT));   // where bit AT is worth 1
  static constexpr unsigned BASE = (127u + 23 - AT) << 23;     // OFF's bits
};

template <int B>
__device__ __forceinline__ float q_float(unsigned wd, int sh) {
  constexpr int AT = QFloat<B>::AT;
  constexpr unsigned MASK = ((1u << B) - 1u) << AT;
  const unsigned v = sh <= AT ? wd << (AT - sh) : wd >> (sh - AT);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // (v & MASK) | BASE as one instruction: written plainly, ptxas takes two,
  // one immediate operand each
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(MASK), "r"(QFloat<B>::BASE));
  return __int_as_float(r);
#else
  return __int_as_float((v & MASK) | QFloat<B>::BASE);
#endif
}

// scale * sum(q x) + bias * sum(x) from d = sum((OFF + q) x) and sx = sum(x).
template <int BITS>
__device__ __forceinline__ float qdot_affine(float scale, float bias, float d, float sx) {
  return scale * (d - QFloat<BITS>::OFF * sx) + bias * sx;
}

// dot(chunk c of a weight row, xs) for one lane; a quantized chunk's dot is
// of OFF + q (qdot_affine takes it back out with chunk_xsum's sum).
template <typename T, int BITS>
__device__ __forceinline__ float chunk_dot(const uint4& wq, int c, const float* xs) {
  constexpr int VALS = chunk_vals<T, BITS>();
  const float* xc = xs + xp(c * VALS);     // VALS <= 32: the chunk is in one padded run
  float d = 0.0f;
  if (BITS == 0) {
    const T* t = reinterpret_cast<const T*>(&wq);
#pragma unroll
    for (int i = 0; i < VALS; i += 4) {
      float4 x4 = *reinterpret_cast<const float4*>(xc + i);
      d = fmaf(static_cast<float>(t[i]), x4.x, d);
      d = fmaf(static_cast<float>(t[i + 1]), x4.y, d);
      d = fmaf(static_cast<float>(t[i + 2]), x4.z, d);
      d = fmaf(static_cast<float>(t[i + 3]), x4.w, d);
    }
  } else {
    const unsigned* words = reinterpret_cast<const unsigned*>(&wq);
    constexpr int B = BITS ? BITS : 8;        // (B: BITS, defined when BITS is 0)
    constexpr int PER = 32 / B;               // values per word
#pragma unroll
    for (int i = 0; i < VALS; i += 4) {
      float4 x4 = *reinterpret_cast<const float4*>(xc + i);
      const unsigned wd = words[i / PER];
      const int sh = (i % PER) * B;
      d = fmaf(q_float<B>(wd, sh), x4.x, d);
      d = fmaf(q_float<B>(wd, sh + B), x4.y, d);
      d = fmaf(q_float<B>(wd, sh + 2 * B), x4.z, d);
      d = fmaf(q_float<B>(wd, sh + 3 * B), x4.w, d);
    }
  }
  return d;
}

// The sum of chunk c's x (qdot_affine's sx).  It is the same for every row
// that meets the chunk, and per row it would be a quarter of a quantized
// product's instructions: rows_use sums it once a pass.
template <typename T, int BITS>
__device__ __forceinline__ float chunk_xsum(int c, const float* xs) {
  constexpr int VALS = chunk_vals<T, BITS>();
  const float* xc = xs + xp(c * VALS);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < VALS; i += 4) {
    float4 x4 = *reinterpret_cast<const float4*>(xc + i);
    s += (x4.x + x4.y) + (x4.z + x4.w);
  }
  return s;
}

// How a warp walks a product of width K: U 16-byte chunks of a row per lane
// per pass and NR rows at once, at most F chunks in flight per lane -- a
// short row (a 4-bit row of 2048 is 2 chunks a lane) leaves a warp waiting
// on memory for little unless several rows' loads are in flight together.
template <typename T, int BITS, int K, int F>
struct Pass {
  static constexpr int VALS = chunk_vals<T, BITS>();
  static constexpr int PER_LANE = (K / VALS + 31) / 32;
  static constexpr int U = PER_LANE < F ? PER_LANE : F;
  static constexpr int MAXR = BITS ? 4 : 8;       // (quantized rows carry scales: registers)
  static constexpr int NR = F / U < MAXR ? (F / U > 0 ? F / U : 1) : MAXR;
};

// NR rows (row[n] < 0: none) of L[n]: this lane's chunks c0, c0 + 32, ...
// (U of them) into wq -- loads only, so they can be in flight while the
// activations are still being loaded.
template <typename T, int BITS, int K, int NR, int U>
__device__ __forceinline__ void rows_load(const Lin<T> (&L)[NR], const int (&row)[NR], int c0,
                                          uint4 (&wq)[NR][U]) {
  constexpr int CH = K / chunk_vals<T, BITS>();
#pragma unroll
  for (int n = 0; n < NR; ++n)
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (row[n] >= 0 && c0 + 32 * u < CH)
        wq[n][u] = __ldg(reinterpret_cast<const uint4*>(L[n].w) + (size_t)row[n] * CH + c0 + 32 * u);
}

// acc[n] += the loaded chunks of row n dotted with xs.
template <typename T, int BITS, int GS, int K, int NR, int U>
__device__ __forceinline__ void rows_use(const Lin<T> (&L)[NR], const int (&row)[NR], int c0,
                                         const uint4 (&wq)[NR][U], const float* xs,
                                         float (&acc)[NR]) {
  constexpr int VALS = chunk_vals<T, BITS>();
  constexpr int CH = K / VALS;
  // chunk u's x sum: summed along with row 0's dot (the two chains
  // interleave; summed ahead of the rows it made SmolLM2's step ~2% longer)
  // and kept for the other rows.  Rows come in order (product,
  // product_pair): row 0 is there whenever any row is.
  float sx[U];
#pragma unroll
  for (int n = 0; n < NR; ++n)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (row[n] >= 0 && c < CH) {
        const float d = chunk_dot<T, BITS>(wq[n][u], c, xs);
        if (BITS) {
          if (n == 0) sx[u] = chunk_xsum<T, BITS>(c, xs);
          constexpr int G = GS ? GS : 1;
          const size_t g = (size_t)row[n] * (K / G) + (c * VALS) / G;
          acc[n] += qdot_affine<BITS>(static_cast<float>(L[n].s[g]),
                                      static_cast<float>(L[n].b[g]), d, sx[u]);
        } else {
          acc[n] += d;
        }
      }
    }
}

// NR rows of L[n] dotted with xs by one warp, every row's loads of a pass
// issued before any is used; every lane gets the sums.  ready() runs once,
// in every thread, after the first pass's loads are issued and before xs is
// read: the activations' load and norm overlap the weights' latency.
template <typename T, int BITS, int GS, int K, int NR, int U, class Ready>
__device__ __forceinline__ void rows_dot(const Lin<T> (&L)[NR], const int (&row)[NR],
                                         const float* xs, float (&out)[NR], Ready& ready) {
  constexpr int CH = K / chunk_vals<T, BITS>();
  const int lane = threadIdx.x & 31;
  float acc[NR];
#pragma unroll
  for (int n = 0; n < NR; ++n) acc[n] = 0.0f;
  for (int c0 = lane, first = 1; c0 < CH || first; c0 += 32 * U, first = 0) {
    uint4 wq[NR][U];
    if (c0 < CH) rows_load<T, BITS, K, NR, U>(L, row, c0, wq);
    if (first) ready();
    if (c0 < CH) rows_use<T, BITS, GS, K, NR, U>(L, row, c0, wq, xs, acc);
  }
#pragma unroll
  for (int n = 0; n < NR; ++n) out[n] = warp_sum(acc[n]);
}

// Runs its function once (the first call), in the threads that call it.
template <class F>
struct Once {
  F f;
  bool done = false;
  __device__ __forceinline__ void operator()() {
    if (!done) {
      done = true;
      f();
    }
  }
};

// rows 0..N-1 of a product of width K, a warp taking rows gw, gw + nw, ...,
// Pass::NR of them per pass; emit(row, sum) in every lane.  lin_of(r, &L)
// gives row r's operands and its index in them (q/k/v: three weights, one row
// range).  ready(): what must happen before xs is read (rows_dot), run by
// every thread, once, even by warps with no rows.
template <typename T, int BITS, int GS, int K, int F, class LinOf, class Ready, class Emit>
__device__ __forceinline__ void product(int N, int gw, int nw, const float* xs, LinOf lin_of,
                                        Ready ready_fn, Emit emit) {
  using P = Pass<T, BITS, K, F>;
  Once<Ready> ready{ready_fn};
  for (int r0 = gw; r0 < N || !ready.done; r0 += P::NR * nw) {
    Lin<T> L[P::NR];
    int row[P::NR], at[P::NR];
    float v[P::NR];
#pragma unroll
    for (int n = 0; n < P::NR; ++n) {
      at[n] = r0 + n * nw;
      row[n] = at[n] < N ? lin_of(at[n], &L[n]) : -1;
    }
    rows_dot<T, BITS, GS, K, P::NR, P::U>(L, row, xs, v, ready);
#pragma unroll
    for (int n = 0; n < P::NR; ++n)
      if (row[n] >= 0) emit(at[n], v[n]);
  }
}

// gate and up rows 0..FF-1 in pairs (both rows' loads in flight together);
// emit(row, gate sum, up sum).  ready() as in product.
template <typename T, int BITS, int GS, int K, int F, class Ready, class Emit>
__device__ __forceinline__ void product_pair(const Lin<T>& g, const Lin<T>& u, int N, int gw,
                                             int nw, const float* xs, Ready ready_fn, Emit emit) {
  using P = Pass<T, BITS, K, F>;
  constexpr int H = P::NR / 2 > 0 ? P::NR / 2 : 1;     // rows per pass
  Once<Ready> ready{ready_fn};
  for (int r0 = gw; r0 < N || !ready.done; r0 += H * nw) {
    Lin<T> L[2 * H];
    int row[2 * H];
    float v[2 * H];
#pragma unroll
    for (int n = 0; n < H; ++n) {
      const int r = r0 + n * nw;
      L[2 * n] = g;
      L[2 * n + 1] = u;
      row[2 * n] = row[2 * n + 1] = r < N ? r : -1;
    }
    rows_dot<T, BITS, GS, K, 2 * H, P::U>(L, row, xs, v, ready);
#pragma unroll
    for (int n = 0; n < H; ++n)
      if (row[2 * n] >= 0) emit(row[2 * n], v[2 * n], v[2 * n + 1]);
  }
}

// xs (padded) <- src[0:K] (float scratch, read through L2), normalized by
// RMSNorm with weight nw when nw is given, as MLX rounds: T(w * T(x * inv)).
// With y (the split MLP's down sums): the residual T(src + T(y)) instead,
// which block 0 also stores into `store` when given.  Loads are issued 8 a
// thread before any is used (with the norm weights when that is all of
// them): a phase's products wait for xs, and one value at a time would be a
// round trip to L2 each, queued behind the weights' streaming.
template <typename T, int K>
__device__ __forceinline__ void load_x(const float* src, const T* nw, float eps, float* xs,
                                       float* red, const float* y = nullptr,
                                       float* store = nullptr) {
  constexpr int PT = (K + THREADS - 1) / THREADS, B = PT < 8 ? PT : 8;   // values a thread
  constexpr bool ONE = PT == B;              // one batch: the norm weights load with it
  float ss = 0.0f, wv[B];
#pragma unroll 1
  for (int i0 = 0; i0 < PT; i0 += B) {
    float v[B], yv[B];
#pragma unroll
    for (int i = 0; i < B; ++i) {
      const int k = threadIdx.x + (i0 + i) * THREADS;
      if (k < K) {
        v[i] = __ldcg(src + k);
        if (y != nullptr) yv[i] = __ldcg(y + k);
        if (ONE && nw != nullptr) wv[i] = static_cast<float>(nw[k]);
      }
    }
#pragma unroll
    for (int i = 0; i < B; ++i) {
      const int k = threadIdx.x + (i0 + i) * THREADS;
      if (k < K) {
        if (y != nullptr) {
          v[i] = rt<T>(v[i] + rt<T>(yv[i]));
          if (store != nullptr && blockIdx.x == 0) store[k] = v[i];
        }
        xs[xp(k)] = v[i];
        ss += v[i] * v[i];
      }
    }
  }
  if (nw != nullptr) {
    const float inv = rsqrtf(block_sum(ss, red) / K + eps);
#pragma unroll
    for (int i = 0; i < PT; ++i) {
      const int k = threadIdx.x + i * THREADS;
      if (k < K) {
        float w;
        if constexpr (ONE) w = wv[i];
        else w = static_cast<float>(nw[k]);
        xs[xp(k)] = rt<T>(w * rt<T>(xs[xp(k)] * inv));
      }
    }
  }
  __syncthreads();
}

// A 16-byte asynchronous copy global -> shared through L2 (.cg: not the
// SM's L1, which may hold a stale line of what other blocks wrote since).
// (sm_80 on; before it x_issue issues nothing.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
constexpr bool kAsyncCopy = false;
#define MLXCY_CP_ASYNC(...)
#else
constexpr bool kAsyncCopy = true;
#define MLXCY_CP_ASYNC(...) asm volatile(__VA_ARGS__)
#endif
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  MLXCY_CP_ASYNC("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}

// load_x in two halves around a product's first weight loads.  x_issue,
// before them: asynchronous copies of src[0:K] into xs (padded), of y into ys
// and of the norm weights into ws, so they are ahead of the weights in the
// SM's queue (loaded after them, they wait for the weights' round trip);
// false, and nothing issued, where an operand is not whole aligned 16-byte
// chunks.  x_finish, when the products need xs: wait for the copies, then
// what load_x does, from shared memory (or load_x itself).
template <typename T, int K>
__device__ __forceinline__ bool x_issue(const float* src, const T* nw, const float* y, float* xs,
                                        float* ys, T* ws) {
  if constexpr (!kAsyncCopy || K % 4 != 0 || (K * sizeof(T)) % 16 != 0) {
    return false;
  } else {
    const uintptr_t a = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(nw) |
                        reinterpret_cast<uintptr_t>(y);
    if (a & 15u) return false;                 // (the same pointers in every block)
    for (int c = threadIdx.x; c < K / 4; c += THREADS) {
      cp_async16(xs + xp(4 * c), src + 4 * c);  // (4 floats never straddle a pad)
      if (y != nullptr) cp_async16(ys + 4 * c, y + 4 * c);
    }
    if (nw != nullptr)
      for (int c = threadIdx.x; c < K * (int)sizeof(T) / 16; c += THREADS)
        cp_async16(reinterpret_cast<char*>(ws) + 16 * c, reinterpret_cast<const char*>(nw) + 16 * c);
    MLXCY_CP_ASYNC("cp.async.commit_group;" ::: "memory");
    return true;
  }
}

template <typename T, int K>
__device__ __forceinline__ void x_finish(bool issued, const float* src, const T* nw, float eps,
                                         float* xs, float* red, const float* y, float* store,
                                         const float* ys, const T* ws) {
  if (!issued) {
    load_x<T, K>(src, nw, eps, xs, red, y, store);
    return;
  }
  MLXCY_CP_ASYNC("cp.async.wait_all;" ::: "memory");
  __syncthreads();                               // (a thread's values came by others' copies)
  if (y == nullptr && nw == nullptr) return;
  float ss = 0.0f;
  for (int k = threadIdx.x; k < K; k += THREADS) {
    float v = xs[xp(k)];
    if (y != nullptr) {
      v = rt<T>(v + rt<T>(ys[k]));
      if (store != nullptr && blockIdx.x == 0) store[k] = v;
      xs[xp(k)] = v;
    }
    ss += v * v;
  }
  if (nw != nullptr) {
    const float inv = rsqrtf(block_sum(ss, red) / K + eps);
    for (int k = threadIdx.x; k < K; k += THREADS)
      xs[xp(k)] = rt<T>(static_cast<float>(ws[k]) * rt<T>(xs[xp(k)] * inv));
  }
  __syncthreads();
}

// Gemma's sandwich: xs (padded) <- RMSNorm(h, n2) where h = T(src + T(n1 *
// T(y' * inv))), y' = T(y) (a product's output: o_proj's, or down's sums) and
// inv its RMSNorm scale -- y joins the residual only once normalized, so a
// phase's load does it, each block alike; block 0 stores h (the residual
// after it) into `store` when given.  (Plain loads: two reductions in a row.)
template <typename T, int K>
__device__ __forceinline__ void load_sandwich(const float* src, const float* y, const T* n1,
                                              const T* n2, float eps, float* xs, float* red,
                                              float* store) {
  float ss = 0.0f;
  for (int k = threadIdx.x; k < K; k += THREADS) {
    const float v = rt<T>(__ldcg(y + k));
    xs[xp(k)] = v;
    ss += v * v;
  }
  const float inv1 = rsqrtf(block_sum(ss, red) / K + eps);
  float hh = 0.0f;
  for (int k = threadIdx.x; k < K; k += THREADS) {
    const float n = rt<T>(static_cast<float>(n1[k]) * rt<T>(xs[xp(k)] * inv1));
    const float h = rt<T>(__ldcg(src + k) + n);
    if (store != nullptr && blockIdx.x == 0) store[k] = h;
    xs[xp(k)] = h;
    hh += h * h;
  }
  const float inv2 = rsqrtf(block_sum(hh, red) / K + eps);
  for (int k = threadIdx.x; k < K; k += THREADS)
    xs[xp(k)] = rt<T>(static_cast<float>(n2[k]) * rt<T>(xs[xp(k)] * inv2));
  __syncthreads();
}

// The MLP's act(gate) * up from gate and up already in T, each op rounded to
// T as MLX's compiled activations do: silu, or (GELU) gelu_tanh,
// 0.5 g (1 + tanh(c (g + k g^3))) with c and k in T.
template <typename T, bool GELU>
__device__ __forceinline__ float mlp_act(float g, float u) {
  if constexpr (GELU) {
    const float c = rt<T>(0.7978845608028654f), k = rt<T>(0.044715f);
    const float inner = rt<T>(c * rt<T>(g + rt<T>(k * rt<T>(g * rt<T>(g * g)))));
    return rt<T>(rt<T>(rt<T>(0.5f * g) * rt<T>(1.0f + rt<T>(tanhf(inner)))) * u);
  } else {
    const float sg = rt<T>(1.0f / (1.0f + __expf(-g)));
    return rt<T>(rt<T>(g * sg) * u);
  }
}

// Value k of token `tok`'s embedding row (D values; BITS: MLX's affine
// layout, as the model's dequantize rounds it to T).
template <typename T, int BITS, int GS>
__device__ __forceinline__ float embed_value(const Lin<T>& E, int tok, int k, int D) {
  if (BITS) {
    constexpr int B = BITS ? BITS : 8, G = GS ? GS : 1;
    const unsigned* w = reinterpret_cast<const unsigned*>(E.w) + (size_t)tok * (D * B / 32);
    const unsigned q = (w[k / (32 / B)] >> ((k % (32 / B)) * B)) & ((1u << B) - 1u);
    const size_t g = (size_t)tok * (D / G) + k / G;
    return rt<T>(static_cast<float>(E.s[g]) * q + static_cast<float>(E.b[g]));
  }
  return static_cast<float>(reinterpret_cast<const T*>(E.w)[(size_t)tok * D + k]);
}

// The embedding row of token `tok` (times es, already in T, unless es is 0:
// Gemma's sqrt(D)) into the residual stream x (every block writes the same
// values) and, normalized, into xs.
template <typename T, int BITS, int GS>
__device__ __forceinline__ void embed(const Lin<T>& E, int tok, int D, float* x, const T* nw,
                                      float eps, float* xs, float* red, float es = 0.0f) {
  float ss = 0.0f;
  for (int k = threadIdx.x; k < D; k += THREADS) {
    float v = embed_value<T, BITS, GS>(E, tok, k, D);
    if (es != 0.0f) v = rt<T>(v * es);
    x[k] = v;
    xs[xp(k)] = v;
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, red) / D + eps);
  for (int k = threadIdx.x; k < D; k += THREADS)
    xs[xp(k)] = rt<T>(static_cast<float>(nw[k]) * rt<T>(xs[xp(k)] * inv));
  __syncthreads();
}

// Per-head RMSNorm (weight w) of v[0:HD] in shared memory, by warp `wp`.
template <typename T, int HD>
__device__ __forceinline__ void head_norm(float* v, const T* w, float eps) {
  const int lane = threadIdx.x & 31;
  float ss = 0.0f;
  for (int d = lane; d < HD; d += 32) ss += v[d] * v[d];
  const float inv = rsqrtf(warp_sum(ss) / HD + eps);
  __syncwarp();
  for (int d = lane; d < HD; d += 32)
    v[d] = rt<T>(rt<T>(v[d] * inv) * static_cast<float>(w[d]));
  __syncwarp();
}

// Rotate v[0:HD] (non-traditional RoPE: pairs d, d + HD/2) at position pos.
template <typename T, int HD>
__device__ __forceinline__ void rope(float* v, const float* inv_freq, int pos) {
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < HD / 2; i += 32) {
    float s, c;
    sincosf(static_cast<float>(pos) * inv_freq[i], &s, &c);
    const float a = v[i], b = v[i + HD / 2];
    v[i] = rt<T>(a * c - b * s);
    v[i + HD / 2] = rt<T>(b * c + a * s);
  }
  __syncwarp();
}

// n partials (acc[HD], max, sum; [HD + 2] floats each) of one head merged by
// one warp: the head's output into out (normalized, in T's rounding) when
// given, else one partial of them all into part.  L2: the partials are in
// global memory, written by other blocks (read through L2, not the SM's L1);
// else in shared memory.
template <typename T, int HD, bool L2>
__device__ __forceinline__ void merge_partials(const float* ph, int n, float* out, float* part) {
  constexpr int DPL = (HD + 31) / 32;
  const int lane = threadIdx.x & 31;
  auto ld = [](const float* p) { return L2 ? __ldcg(p) : *p; };
  float M = neg_inf();
  for (int tl = lane; tl < n; tl += 32) M = fmaxf(M, ld(ph + tl * (HD + 2) + HD));
  M = warp_max(M);
  float den = 0.0f, num[DPL];
#pragma unroll
  for (int c = 0; c < DPL; ++c) num[c] = 0.0f;
#pragma unroll 4
  for (int tl = 0; tl < n; ++tl) {
    const float* pt = ph + tl * (HD + 2);
    const float f = __expf(ld(pt + HD) - M);
    den = fmaf(ld(pt + HD + 1), f, den);
#pragma unroll
    for (int c = 0; c < DPL; ++c)
      if (lane + 32 * c < HD) num[c] = fmaf(ld(pt + lane + 32 * c), f, num[c]);
  }
#pragma unroll
  for (int c = 0; c < DPL; ++c)
    if (lane + 32 * c < HD) {
      if (out != nullptr) out[lane + 32 * c] = rt<T>(num[c] / den);
      else part[lane + 32 * c] = num[c];
    }
  if (out == nullptr && lane == 0) {
    part[HD] = M;
    part[HD + 1] = den;
  }
}

// After a tile's (or a chunk's) partial is written: count it; the warp that
// counts the head's last one merges the partials into out and resets the
// counter.
template <typename T, int HD>
__device__ __forceinline__ void tile_done(float* ph, int ntile, unsigned* count, float* out) {
  const int lane = threadIdx.x & 31;
  __threadfence();
  __syncwarp();
  unsigned done = 0;
  if (lane == 0) done = atomicAdd(count, 1u);
  done = __shfl_sync(0xffffffffu, done, 0);
  if (done == (unsigned)ntile - 1) {
    __threadfence();
    merge_partials<T, HD, true>(ph, ntile, out, nullptr);
    if (lane == 0) *count = 0u;
  }
  __syncwarp();
}

// A warp's partial for one tile of a head's keys (acc[DPL]: its lanes' share
// of the weighted values, the tile's max and sum) into ph[tile]; the warp
// that finishes the head's last tile merges its ntile partials into out and
// resets the head's counter for the next layer (after barriers).
template <typename T, int HD>
__device__ __forceinline__ void finish_tile(const float* acc, float mx, float sum, float* ph,
                                            int tile, int ntile, unsigned* count, float* out) {
  constexpr int DPL = (HD + 31) / 32;
  const int lane = threadIdx.x & 31;
  float* pt = ph + (size_t)tile * (HD + 2);
#pragma unroll
  for (int c = 0; c < DPL; ++c)
    if (lane + 32 * c < HD) pt[lane + 32 * c] = acc[c];
  if (lane == 0) {
    pt[HD] = mx;
    pt[HD + 1] = sum;
  }
  tile_done<T, HD>(ph, ntile, count, out);
}


// q[0:HD] (shared memory) dotted with one cached key row; CG: read it through
// L2 (keys written earlier in the same launch), else the read-only path.
template <typename T, int HD, bool CG>
__device__ __forceinline__ float key_dot(const float* q, const T* krow) {
  constexpr int KV = 16 / sizeof(T);
  const uint4* k4 = reinterpret_cast<const uint4*>(krow);
  float a = 0.0f;
#pragma unroll
  for (int c = 0; c < HD / KV; ++c) {
    const uint4 u = CG ? __ldcg(k4 + c) : __ldg(k4 + c);
    const T* kv = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < KV; ++i) a = fmaf(q[c * KV + i], static_cast<float>(kv[i]), a);
  }
  return a;
}

// L's rows from r0 on (a product of width K).
template <typename T, int BITS, int GS, int K>
__device__ __forceinline__ Lin<T> rows_from(const Lin<T>& L, int r0) {
  constexpr int VALS = chunk_vals<T, BITS>();
  Lin<T> o = L;
  o.w = reinterpret_cast<const uint4*>(L.w) + (size_t)r0 * (K / VALS);
  if (BITS) {
    constexpr int G = GS ? GS : 1;
    o.s = L.s + (size_t)r0 * (K / G);
    o.b = L.b + (size_t)r0 * (K / G);
  }
  return o;
}

template <typename T, int BITS, int GS, int EBITS, int EGS, int D, int NQ, int NKV, int HD, int FF,
          int V, int NL, bool QKV_BIAS, bool QK_NORM, int SLICE, bool GEMMA>
__device__ void decode_step(const int* tok_p, const int* meta, const unsigned long long* table,
                            const float* inv_freq, T* const* kc, T* const* vc, float eps,
                            float qk_eps, float scale, float escale, float* scratch, T* logits,
                            unsigned* bar, unsigned* tm) {
  constexpr int NQKV = (NQ + 2 * NKV) * HD;
  constexpr bool SPLIT = SLICE > 0;                   // the MLP split over slices
  // Chunks in flight a lane in the products (Pass): Gemma's norms and GELU
  // hold more registers, and at 16 its bf16 kernels spilled (12: 1.08-1.16x
  // faster steps on an H100; for the others 12 is no faster or spills).
  constexpr int F = GEMMA ? 12 : 16;
  constexpr int XW = SPLIT ? D : (D > FF ? D : FF);   // the widest product input in xs
  constexpr int XMAX = XW > NQ * HD ? XW : NQ * HD;
  constexpr int DPL = (HD + 31) / 32;          // head dims per lane (values)
  constexpr int GROUP = NQ / NKV;
  constexpr int XS = XMAX + XMAX / 8 + 8;       // padded activations (xp)
  constexpr int AS = 3 * WARPS * HD + WARPS * (HD + 2);   // attention: per warp q, new k,
                                                         // new v; then its tile's partial
  __shared__ __align__(16) float xs[XS > AS ? XS : AS];
  __shared__ float red[WARPS];
  __shared__ __align__(16) float ys[SPLIT ? D : 4];           // x_issue's copy of the down sums
  __shared__ __align__(16) unsigned char wsb[D * sizeof(T)];  // ... and of the norm weights
  T* ws = reinterpret_cast<T*>(wsb);

  float* x = scratch;                          // residual stream [D]
  float* qkv = x + D;                          // [NQKV]
  float* att = qkv + NQKV;                     // [NQ * HD]
  float* hid = att + NQ * HD;                  // [FF]
  const int pos = meta[2], cap = meta[3];     // (the state, or a resync: see StepState)
  const int maxt = (cap + 31) / 32;
  float* part = hid + FF;                      // attention partials [NQ, maxt, HD + 2]
  unsigned* count = bar + 64;                  // per head: tiles done (StepState)
  // The MLP split over slices of S hidden rows (SLICE 16-byte chunks of each
  // down row: 2, 4 or 8), when there are enough of them (the host's
  // step_slice): a block computes a slice's gate/up rows, then that slice's
  // share of every down row, added to a float sum with atomics -- one
  // grid-wide barrier fewer per layer.
  constexpr int S = SLICE * chunk_vals<T, BITS>();   // (0: not split)
  static_assert(!SPLIT || FF % S == 0, "the MLP split needs whole slices");
  float* ysum = part + ((size_t)NQ * maxt * (HD + 2) + 3) / 4 * 4;   // SPLIT: down's sums [D]
                                               // (16-byte aligned for x_issue)
  float* xalt = ysum + D;                      // SPLIT: odd layers' residual stream [D]
  // GEMMA: a layer's input is x, its residual after attention x2 (block 0
  // writes each in the phase after the one whose output joins it: the norms
  // need that output whole); ob: o_proj's output, yo: down's (not SPLIT)
  float* x2 = xalt + D;
  float* ob = x2 + D;
  float* yo = ob + D;
  __shared__ __align__(16) float hs[SPLIT ? S + S / 8 + 8 : 1];   // a slice's MLP state
  Barrier sync = barrier_start(reinterpret_cast<unsigned long long*>(bar + 4), tm,
                               (SPLIT ? 4 : 5) * NL);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
  const unsigned long long* top = table + NL * PL;

  for (int l = 0; l < NL; ++l) {
    const unsigned long long* t = table + l * PL;
    // SPLIT: the residual alternates between two buffers, layer l's A adding
    // down's sums of layer l - 1 to the other one (which others still read)
    float* xr = !GEMMA && SPLIT && (l & 1) ? xalt : x;
    // -- A: RMSNorm -> q, k, v (+ bias)
    const float* asrc = SPLIT && !(l & 1) ? xalt : x;   // (SPLIT: the other buffer's + ysum)
    const bool ea = !GEMMA && l > 0 &&
                    x_issue<T, D>(asrc, ptr<T>(t[0]), SPLIT ? ysum : nullptr, xs, ys, ws);
    auto ldx_a = [&] {
      if (l == 0)
        embed<T, EBITS, EGS>(lin<T>(top), tok_p[0], D, x, ptr<T>(t[0]), eps, xs, red,
                             GEMMA ? escale : 0.0f);
      else if (GEMMA)   // the previous layer's down output, post-norm, joins x2 into x
        load_sandwich<T, D>(x2, SPLIT ? ysum : yo, ptr<T>(t[29 - PL]), ptr<T>(t[0]), eps, xs,
                            red, x);
      else
        x_finish<T, D>(ea, asrc, ptr<T>(t[0]), eps, xs, red, SPLIT ? ysum : nullptr,
                       SPLIT ? xr : nullptr, ys, ws);
      if (threadIdx.x == 0) clock_mid(sync);
    };
    {
      const Lin<T> parts[3] = {lin<T>(t + 1), lin<T>(t + 4), lin<T>(t + 7)};
      auto part_of = [&](int r, Lin<T>* L) {
        const int p = qkv_part<NQ, NKV, HD>(r);
        // a conditional, not parts[p]: an indexed local array goes through
        // local memory (SmolLM2's q/k/v phase 0.3 us faster, H200 2026-12-05)
        *L = p == 0 ? parts[0] : (p == 1 ? parts[1] : parts[2]);
        return r - qkv_first<NQ, NKV, HD>(p);
      };
      product<T, BITS, GS, D, F>(NQKV, gw, nw, xs, part_of, ldx_a, [&](int r, float s) {
        float v = rt<T>(s);
        if (QKV_BIAS) {
          const int p = qkv_part<NQ, NKV, HD>(r);
          v = rt<T>(v + static_cast<float>(ptr<T>(t[10 + p])[r - qkv_first<NQ, NKV, HD>(p)]));
        }
        if (lane == 0) qkv[r] = v;
      });
    }
    grid_sync(sync);
    // -- B: attention, a block per (query head, chunk of WARPS tiles of TP
    // positions), a warp per tile: its softmax-weighted sum of values with
    // the tile's max and sum (a partial) into shared memory; one warp merges
    // the chunk's partials there -- into the head's output when the head is
    // one chunk, else into the chunk's partial, merged with the head's other
    // chunks through L2 by the block that finishes last
    // the cache slots attended over, [0, nslot), and the new key's, wslot:
    // positions 0 .. pos in their own slots, but in a Gemma sliding layer's
    // full ring (the table's window, and rotation: slot (p - rot) mod W),
    // whose W slots hold the window once the new key replaces the oldest
    int nslot = pos + 1, wslot = pos;
    if constexpr (GEMMA) {
      const int wl = static_cast<int>(t[PL - 2]);
      if (wl > 0 && pos >= wl) {
        nslot = wl;
        wslot = (pos - static_cast<int>(t[PL - 1])) % wl;
      }
    }
    auto is_old = [&](int p) { return p < nslot && p != wslot; };   // a cached key/value
    auto is_new = [&](int p) { return p == wslot; };
    constexpr int TP = tile_positions<T, HD>(), LPP = 32 / TP;
    static_assert(WARPS * TP >= 32, "a head has no more chunks than the scratch has partials: maxt");
    const int ntile = (nslot - 1) / TP + 1, nch = (ntile + WARPS - 1) / WARPS;
    {
      float* qw = xs + warp * 3 * HD;          // this warp's q, new k, new v
      float* sp = xs + 3 * WARPS * HD;         // the chunk's partials [WARPS][HD + 2]
      float* pt = sp + warp * (HD + 2);
      for (int it = blockIdx.x; it < NQ * nch; it += gridDim.x) {
        const int h = it / nch, ch = it % nch, tile = ch * WARPS + warp, j = h / GROUP;
        const int ntl = min(WARPS, ntile - ch * WARPS);   // tiles in this chunk
        const bool last = tile == wslot / TP;   // holds the new k/v
        if (warp < ntl) {
          for (int d = lane; d < HD; d += 32) {
            qw[d] = __ldcg(qkv + h * HD + d);
            if (last) {
              qw[HD + d] = __ldcg(qkv + (NQ + j) * HD + d);
              qw[2 * HD + d] = __ldcg(qkv + (NQ + NKV + j) * HD + d);
            }
          }
          __syncwarp();
          if (QK_NORM) {
            head_norm<T, HD>(qw, ptr<T>(t[13]), qk_eps);
            if (last) head_norm<T, HD>(qw + HD, ptr<T>(t[14]), qk_eps);
          }
          // (Gemma: each layer's own frequencies; the others' rows are all alike,
          // and an index per layer costs the kernel registers)
          const float* fl = GEMMA ? inv_freq + l * (HD / 2) : inv_freq;
          rope<T, HD>(qw, fl, pos);
          if (last) rope<T, HD>(qw + HD, fl, pos);
          // this layer's cache capacity (Gemma: its sliding layers' rings
          // differ from the global layers' buffers; the others' are alike)
          const size_t capl = GEMMA ? t[PL - 3] : cap;
          T* kl = kc[l] + j * capl * HD;
          T* vl = vc[l] + j * capl * HD;
          if (last && h % GROUP == 0)
            for (int d = lane; d < HD; d += 32) {
              kl[(size_t)wslot * HD + d] = static_cast<T>(qw[HD + d]);
              vl[(size_t)wslot * HD + d] = static_cast<T>(qw[2 * HD + d]);
            }
          // the tile's first values issued before its keys (they do not
          // depend on the scores), so their round trip overlaps the keys'
          constexpr int KV = 16 / sizeof(T), CPR = HD / KV;   // 16-byte chunks of a value row
          constexpr bool VBATCH = CPR <= 32 && 32 % CPR == 0;
          constexpr int PPI = VBATCH ? 32 / CPR : 1, PER = TP / PPI, BATCH = PER < 8 ? PER : 8;
          static_assert(!VBATCH || TP % PPI == 0, "a tile's positions in whole load rounds");
          const int c = lane % CPR, pg = lane / CPR;
          uint4 v0[BATCH];
          if constexpr (VBATCH) {
#pragma unroll
            for (int j = 0; j < BATCH; ++j) {
              const int pp = tile * TP + pg + j * PPI;
              if (is_old(pp)) v0[j] = __ldg(reinterpret_cast<const uint4*>(vl + (size_t)pp * HD) + c);
            }
          }
          // scores: lanes i * LPP .. i * LPP + LPP - 1 score position tile *
          // TP + i, each over its HP of the head's dims, summed across them
          constexpr int HP = HD / LPP;
          const int part = lane % LPP, p = tile * TP + lane / LPP;
          float s = 0.0f;
          if (is_old(p)) {
            s = key_dot<T, HP, false>(qw + part * HP, kl + (size_t)p * HD + part * HP);
          } else if (is_new(p)) {
            for (int d = part * HP; d < part * HP + HP; ++d) s = fmaf(qw[d], qw[HD + d], s);
          }
#pragma unroll
          for (int o = 1; o < LPP; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          s = p < nslot ? s * scale : neg_inf();
          const float m = warp_max(s);
          const float e = p < nslot ? __expf(s - m) : 0.0f;
          const float sum = warp_sum(part == 0 ? e : 0.0f);   // (each position once)
          if constexpr (VBATCH) {
            // lanes over (position group, chunk): every value load of the tile
            // in flight at once, then a sum over the position groups
            // (at most 8 loads in flight a lane: 16 would spill at HD 128)
            float a[KV];
#pragma unroll
            for (int k = 0; k < KV; ++k) a[k] = 0.0f;
#pragma unroll
            for (int j0 = 0; j0 < PER; j0 += BATCH) {
              uint4 vq[BATCH];
#pragma unroll
              for (int j = 0; j < BATCH; ++j) {
                const int pp = tile * TP + pg + (j0 + j) * PPI;
                if (j0 == 0)
                  vq[j] = v0[j];
                else if (is_old(pp))
                  vq[j] = __ldg(reinterpret_cast<const uint4*>(vl + (size_t)pp * HD) + c);
              }
#pragma unroll
              for (int j = 0; j < BATCH; ++j) {
                const int i = pg + (j0 + j) * PPI, pp = tile * TP + i;
                const float ei = __shfl_sync(0xffffffffu, e, i * LPP);
                const T* vv = reinterpret_cast<const T*>(&vq[j]);
#pragma unroll
                for (int k = 0; k < KV; ++k) {
                  const float val = is_old(pp) ? static_cast<float>(vv[k])
                                               : (is_new(pp) ? qw[2 * HD + c * KV + k] : 0.0f);
                  a[k] = fmaf(ei, val, a[k]);
                }
              }
            }
#pragma unroll
            for (int o = CPR; o < 32; o <<= 1)
#pragma unroll
              for (int k = 0; k < KV; ++k) a[k] += __shfl_xor_sync(0xffffffffu, a[k], o);
            if (lane < CPR)
#pragma unroll
              for (int k = 0; k < KV; ++k) pt[c * KV + k] = a[k];
          } else {   // (value rows of more than 32, or not a power of two, 16-byte chunks)
            const int n = min(TP, nslot - tile * TP);
            float acc[DPL];
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[i] = 0.0f;
#pragma unroll 8
            for (int i = 0; i < n; ++i) {
              const float ei = __shfl_sync(0xffffffffu, e, i * LPP);
              const int pp = tile * TP + i;
#pragma unroll
              for (int c = 0; c < DPL; ++c) {
                const int d = lane + 32 * c;
                if (d < HD) {
                  const float vv = is_new(pp) ? qw[2 * HD + d] : static_cast<float>(vl[(size_t)pp * HD + d]);
                  acc[c] = fmaf(ei, vv, acc[c]);
                }
              }
            }
#pragma unroll
            for (int c = 0; c < DPL; ++c)
              if (lane + 32 * c < HD) pt[lane + 32 * c] = acc[c];
          }
          if (lane == 0) {
            pt[HD] = m;
            pt[HD + 1] = sum;
          }
        }
        __syncthreads();
        if (warp == 0) {
          if (lane == 0) clock_mid(sync);      // the chunk's merge starts
          if (nch == 1) {
            merge_partials<T, HD, false>(sp, ntl, att + h * HD, nullptr);
          } else {
            float* ph = part + (size_t)h * maxt * (HD + 2);
            merge_partials<T, HD, false>(sp, ntl, nullptr, ph + (size_t)ch * (HD + 2));
            tile_done<T, HD>(ph, nch, count + h, att + h * HD);
          }
        }
        __syncthreads();                       // (sp and qw are the next item's)
      }
    }
    // (o_proj's rows only: attention's idle blocks also asking L2 for 16 MB of
    // gate/up made the steps up to 2.6x longer on an H100; git show this
    // line's commit)
    prefetch_rows<T, BITS>(lin<T>(t + 15).w, NQ * HD, gw, D, nw);
    grid_sync(sync);
    // -- C: o_proj + residual
    const bool ec = x_issue<T, NQ * HD>(att, nullptr, nullptr, xs, ys, ws);
    auto ldx_c = [&] {
      x_finish<T, NQ * HD>(ec, att, nullptr, 0.0f, xs, red, nullptr, nullptr, ys, ws);
      if (threadIdx.x == 0) clock_mid(sync);
    };
    {
      const Lin<T> o = lin<T>(t + 15);
      product<T, BITS, GS, NQ * HD, F>(D, gw, nw, xs, [&](int r, Lin<T>* L) { *L = o; return r; },
                                    ldx_c, [&](int r, float s) {
                                      if (lane != 0) return;
                                      if (GEMMA) ob[r] = rt<T>(s);
                                      else xr[r] = rt<T>(__ldcg(xr + r) + rt<T>(s));
                                    });
      if (SPLIT && blockIdx.x == gridDim.x - 1)   // (read last by this layer's A)
        for (int k = threadIdx.x; k < D; k += THREADS) ysum[k] = 0.0f;
    }
    if constexpr (SPLIT) {
      const int r0 = blockIdx.x * S;
      prefetch_rows<T, BITS>(rows_from<T, BITS, GS, D>(lin<T>(t + 19), r0).w, D, warp, S, WARPS);
      prefetch_rows<T, BITS>(rows_from<T, BITS, GS, D>(lin<T>(t + 22), r0).w, D, warp, S, WARPS);
      grid_sync(sync);
      // -- D+E: RMSNorm -> gate, up -> silu(gate) * up -> down, a block per
      // slice of S hidden rows; its share of down goes to ysum (atomics)
      bool loaded = false;
      const bool ed = !GEMMA && x_issue<T, D>(xr, ptr<T>(t[18]), nullptr, xs, ys, ws);
      auto ldx_de = [&] {
        if (!loaded) {
          loaded = true;
          if (GEMMA)   // o_proj's output, post-norm, joins x into x2
            load_sandwich<T, D>(x, ob, ptr<T>(t[28]), ptr<T>(t[18]), eps, xs, red, x2);
          else
            x_finish<T, D>(ed, xr, ptr<T>(t[18]), eps, xs, red, nullptr, nullptr, ys, ws);
          if (threadIdx.x == 0) clock_mid(sync);
        }
      };
      const Lin<T> g = lin<T>(t + 19), u = lin<T>(t + 22), dn = lin<T>(t + 25);
      constexpr int VALS = chunk_vals<T, BITS>();
      for (int it = blockIdx.x; it < FF / S; it += gridDim.x) {
        const int s0 = it * S;
        product_pair<T, BITS, GS, D, F>(rows_from<T, BITS, GS, D>(g, s0),
                                     rows_from<T, BITS, GS, D>(u, s0), S, warp, WARPS, xs,
                                     ldx_de, [&](int r, float gs, float us) {
          // (GEMMA apart, the order of the kernel before it: otherwise ptxas
          // spills 20 bytes in Llama-3.2-1B's bf16 kernel)
          if constexpr (GEMMA) {
            const float h = mlp_act<T, true>(rt<T>(gs), rt<T>(us));
            if (lane == 0) hs[xp(r)] = h;
          } else {
            const float gv = rt<T>(gs), uv = rt<T>(us);
            const float sg = rt<T>(1.0f / (1.0f + __expf(-gv)));
            if (lane == 0) hs[xp(r)] = rt<T>(rt<T>(gv * sg) * uv);
          }
        });
        __syncthreads();
        // the slice's share of every down row, a row a lane at a time: more
        // of a lane's rows in flight, or their prefetch into L2, costs the
        // step more than it hides (the figures: git show 1b36189)
        for (int d = threadIdx.x; d < D; d += THREADS) {
          const uint4* w4 = reinterpret_cast<const uint4*>(dn.w) + (size_t)d * (FF / VALS) + s0 / VALS;
          float acc = 0.0f;
#pragma unroll
          for (int c = 0; c < S / VALS; ++c) {
            const float dd = chunk_dot<T, BITS>(__ldg(w4 + c), c, hs);
            if (BITS) {
              constexpr int G = GS ? GS : 1;
              const size_t gi = (size_t)d * (FF / G) + (s0 + c * VALS) / G;
              acc += qdot_affine<BITS>(static_cast<float>(dn.s[gi]),
                                       static_cast<float>(dn.b[gi]), dd,
                                       chunk_xsum<T, BITS>(c, hs));
            } else {
              acc += dd;
            }
          }
          atomicAdd(ysum + d, acc);
        }
        __syncthreads();
      }
      if (ed && !loaded) MLXCY_CP_ASYNC("cp.async.wait_all;" ::: "memory");   // (a block with no slice)
    } else {
      prefetch_rows<T, BITS>(lin<T>(t + 19).w, D, gw, FF, nw);
      prefetch_rows<T, BITS>(lin<T>(t + 22).w, D, gw, FF, nw);
      grid_sync(sync);
      // -- D: RMSNorm -> gate, up -> silu(gate) * up
      const bool ed = !GEMMA && x_issue<T, D>(x, ptr<T>(t[18]), nullptr, xs, ys, ws);
      auto ldx_d = [&] {
        if (GEMMA)
          load_sandwich<T, D>(x, ob, ptr<T>(t[28]), ptr<T>(t[18]), eps, xs, red, x2);
        else
          x_finish<T, D>(ed, x, ptr<T>(t[18]), eps, xs, red, nullptr, nullptr, ys, ws);
        if (threadIdx.x == 0) clock_mid(sync);
      };
      {
        const Lin<T> g = lin<T>(t + 19), u = lin<T>(t + 22);
        product_pair<T, BITS, GS, D, F>(g, u, FF, gw, nw, xs, ldx_d,
                                        [&](int r, float gs, float us) {
          const float h = mlp_act<T, GEMMA>(rt<T>(gs), rt<T>(us));
          if (lane == 0) hid[r] = h;
        });
      }
      prefetch_rows<T, BITS>(lin<T>(t + 25).w, FF, gw, D, nw);
      grid_sync(sync);
      // -- E: down + residual
      auto ldx_e = [&] {
        load_x<T, FF>(hid, nullptr, 0.0f, xs, red);
        if (threadIdx.x == 0) clock_mid(sync);
      };
      {
        const Lin<T> dn = lin<T>(t + 25);
        product<T, BITS, GS, FF, F>(D, gw, nw, xs, [&](int r, Lin<T>* L) { *L = dn; return r; },
                                 ldx_e, [&](int r, float s) {
                                   if (lane != 0) return;
                                   if (GEMMA) yo[r] = rt<T>(s);
                                   else x[r] = rt<T>(__ldcg(x + r) + rt<T>(s));
                                 });
      }
    }
    if (l + 1 < NL) {   // the next layer's q/k/v rows this warp takes, and its norm
      for (int r = gw, i = 0; r < NQKV && i < 2; r += nw, ++i) {
        const int p = qkv_part<NQ, NKV, HD>(r), rp = r - qkv_first<NQ, NKV, HD>(p);
        prefetch_rows<T, BITS>(lin<T>(t + PL + 1 + 3 * p).w, D, rp, rp + 1, nw);
      }
      const char* nwp = reinterpret_cast<const char*>(t[PL]);
      for (int o = (gw * 32 + lane) * 128; o < D * (int)sizeof(T); o += nw * 32 * 128)
        asm volatile("prefetch.global.L2 [%0];" : : "l"(nwp + o));
    } else {
      prefetch_rows<T, EBITS>(lin<T>(top + 4).w, D, gw, V, nw);
    }
    grid_sync(sync);
  }
  // -- the final norm and the output head
  const float* hsrc = SPLIT && ((NL - 1) & 1) ? xalt : x;
  const bool eh = !GEMMA &&
                  x_issue<T, D>(hsrc, ptr<T>(top[3]), SPLIT ? ysum : nullptr, xs, ys, ws);
  auto ldx_h = [&] {
    if (GEMMA)   // the last layer's down output, post-norm, joins x2
      load_sandwich<T, D>(x2, SPLIT ? ysum : yo, ptr<T>(top[29 - PL]), ptr<T>(top[3]), eps, xs,
                          red, nullptr);
    else
      x_finish<T, D>(eh, hsrc, ptr<T>(top[3]), eps, xs, red, SPLIT ? ysum : nullptr, nullptr,
                     ys, ws);
  };
  const Lin<T> head = lin<T>(top + 4);
  product<T, EBITS, EGS, D, F>(V, gw, nw, xs, [&](int r, Lin<T>* L) { *L = head; return r; },
                            ldx_h, [&](int r, float s) {
                              if (lane == 0) logits[r] = static_cast<T>(s);
                            });
  // every block read meta before the last barrier: the next step's position
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    bar[2] = pos + 1;
    bar[3] = cap;
  }
  __syncthreads();
  clock_mark(tm, 1 + 2 * sync.phase);
}


// ---- several positions in one launch (verification, a batch's rows) ---------
// The same model math for M rows of activations: M consecutive positions
// pos .. pos + M - 1 of one sequence (a speculative step's proposals), or
// (ROWS) one new position in each of the M rows of a batch, every
// row's token in cache slot pos of its own row of the batched cache ([B, NKV,
// cap, HD]), rotated at its own position rpos[r] and attending over slots
// pos - rpos[r] (its left padding's end) .. pos.  Every weight row is read
// once and dotted with the M activation rows, so a step costs about one
// one-token step while the weights dominate.  The activations are kept in
// the model's dtype in dynamic shared memory ([M][K], the values are already
// rounded to it); six phases per layer, the one-token kernel's five plus one
// that normalizes and rotates the new q/k rows and writes k/v into the cache,
// so that attention reads every key, old or new, from the cache.

// ss[m] (each thread's share of row m's sum of squares) <- row m's RMSNorm
// scale, in every thread alike; red: WARPS * M floats, free again on return.
template <int M>
__device__ __forceinline__ void row_scales(float (&ss)[M], float* red, int K, float eps) {
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float t = warp_sum(ss[m]);
    if ((threadIdx.x & 31) == 0) red[warp * M + m] = t;
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float t = 0.0f;
    for (int w = 0; w < WARPS; ++w) t += red[w * M + m];
    ss[m] = rsqrtf(t / K + eps);
  }
  __syncthreads();
}

// xm[m][k] <- T(w[k] * T(xm[m][k] * inv[m])) for every row: RMSNorm's last
// step, the rows' scales already taken.
template <typename T, int K, int M, int XS>
__device__ __forceinline__ void scale_rows(T* xm, const T* w, const float (&inv)[M]) {
  for (int k = threadIdx.x; k < K; k += THREADS) {
    const float wk = static_cast<float>(w[k]);
#pragma unroll
    for (int m = 0; m < M; ++m)
      xm[m * XS + k] = static_cast<T>(rt<T>(wk * rt<T>(static_cast<float>(xm[m * XS + k]) * inv[m])));
  }
}

// xm[m][0:K] <- src[m][0:K] (float scratch, through L2) for m < M, each row
// normalized by RMSNorm with weight nw when nw is given (T(w * T(x * inv)));
// xm's rows XS values apart.
template <typename T, int K, int M, int XS = K>
__device__ __forceinline__ void load_xm(const float* src, const T* nw, float eps, T* xm,
                                        float* red) {
  float ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) ss[m] = 0.0f;
  for (int k = threadIdx.x; k < K; k += THREADS)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = __ldcg(src + m * K + k);
      xm[m * XS + k] = static_cast<T>(v);
      ss[m] += v * v;
    }
  if (nw != nullptr) {
    row_scales<M>(ss, red, K, eps);
    scale_rows<T, K, M, XS>(xm, nw, ss);
  }
  __syncthreads();
}

// load_sandwich (Gemma) for M rows: xm[m] <- RMSNorm(h, n2) where h = T(src[m]
// + T(n1 * T(y[m] * inv))), block 0 storing h into store[m] when given.
template <typename T, int K, int M, int XS = K>
__device__ __forceinline__ void load_xm_sandwich(const float* src, const float* y, const T* n1,
                                                 const T* n2, float eps, T* xm, float* red,
                                                 float* store) {
  float ss[M];
#pragma unroll
  for (int m = 0; m < M; ++m) ss[m] = 0.0f;
  for (int k = threadIdx.x; k < K; k += THREADS)
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = rt<T>(__ldcg(y + m * K + k));
      xm[m * XS + k] = static_cast<T>(v);
      ss[m] += v * v;
    }
  row_scales<M>(ss, red, K, eps);
  float hh[M];
#pragma unroll
  for (int m = 0; m < M; ++m) hh[m] = 0.0f;
  for (int k = threadIdx.x; k < K; k += THREADS) {
    const float w = static_cast<float>(n1[k]);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float n = rt<T>(w * rt<T>(static_cast<float>(xm[m * XS + k]) * ss[m]));
      const float h = rt<T>(__ldcg(src + m * K + k) + n);
      if (store != nullptr && blockIdx.x == 0) store[m * K + k] = h;
      xm[m * XS + k] = static_cast<T>(h);
      hh[m] += h * h;
    }
  }
  row_scales<M>(hh, red, K, eps);
  scale_rows<T, K, M, XS>(xm, n2, hh);
  __syncthreads();
}

// The VALS weights of chunk wq as floats (affine values before scale/bias).
template <typename T, int BITS>
__device__ __forceinline__ void unpack_chunk(const uint4& wq, float* w) {
  constexpr int VALS = chunk_vals<T, BITS>();
  if (BITS == 0) {
    const T* t = reinterpret_cast<const T*>(&wq);
#pragma unroll
    for (int i = 0; i < VALS; ++i) w[i] = static_cast<float>(t[i]);
  } else {
    constexpr int B = BITS ? BITS : 8, PER = 32 / B;
    constexpr unsigned MASK = (1u << B) - 1u;
    const unsigned* words = reinterpret_cast<const unsigned*>(&wq);
#pragma unroll
    for (int i = 0; i < VALS; ++i) w[i] = static_cast<float>((words[i / PER] >> ((i % PER) * B)) & MASK);
  }
}

// One weight row (K inputs) dotted with the M rows of xm by one warp; every
// lane gets the M sums.
template <typename T, int BITS, int GS, int K, int M>
__device__ __forceinline__ void row_dot_m(const Lin<T>& L, int row, const T* xm, float (&out)[M]) {
  constexpr int VALS = chunk_vals<T, BITS>();
  constexpr int XV = 16 / sizeof(T);           // x values per 16-byte read
  constexpr int U = M > 4 ? 4 : 8;             // chunks in flight (registers: M sums too)
  constexpr int CH = K / VALS;
  const int lane = threadIdx.x & 31;
  const uint4* w4 = reinterpret_cast<const uint4*>(L.w) + (size_t)row * CH;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.0f;
  for (int c0 = lane; c0 < CH; c0 += 32 * U) {
    uint4 wq[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (c0 + 32 * u < CH) wq[u] = __ldg(w4 + c0 + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + 32 * u;
      if (c < CH) {
        float w[VALS];
        unpack_chunk<T, BITS>(wq[u], w);
        float sc = 1.0f, bi = 0.0f;
        if (BITS) {
          constexpr int G = GS ? GS : 1;
          const size_t g = (size_t)row * (K / G) + (c * VALS) / G;
          sc = static_cast<float>(L.s[g]);
          bi = static_cast<float>(L.b[g]);
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const T* xc = xm + m * K + c * VALS;
          float d = 0.0f, s = 0.0f;
#pragma unroll
          for (int i = 0; i < VALS; i += XV) {
            const uint4 u4 = *reinterpret_cast<const uint4*>(xc + i);
            const T* xv = reinterpret_cast<const T*>(&u4);
#pragma unroll
            for (int j = 0; j < XV; ++j) {
              const float xf = static_cast<float>(xv[j]);
              d = fmaf(w[i + j], xf, d);
              s += xf;
            }
          }
          acc[m] += BITS ? sc * d + bi * s : d;
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) out[m] = warp_sum(acc[m]);
}

// ---- tensor-core products (verify_step, 2-byte dtypes) ----------------------
// A block takes a tile of weight rows (NT n-tiles of 8) at a time; its warps
// split the product's width into units (32 values, or a quantization group)
// and run m16n8k16 tensor-core products (f32 sums) with the activation rows as
// the 16-row operand (MT m-tiles of 16 rows) and 8 weight rows as the other;
// the warps' partial sums meet in shared memory.  Within a unit the 16 values
// of a product step are any 16 of the unit's -- lane (g, t) feeds the values
// [t * UK/4, (t+1) * UK/4) of its rows as the step's columns 2t, 2t+1, 2t+8,
// 2t+9, four at a time -- so each lane reads whole contiguous pieces of a row.
// Quantized units: the integers (as T, plus an offset that makes the
// conversion a bit pattern) and the rows' sums of x (a product with ones) are
// summed per unit, then scaled: scale * dot + (bias - offset * scale) * sum.
template <typename T>
struct IsBf16 {
  static constexpr bool value = false;
};
template <>
struct IsBf16<__nv_bfloat16> {
  static constexpr bool value = true;
};

// d += a (16 x 16, rows) * b (16 x 8, columns): one warp's tensor-core product.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4],
                                         const unsigned (&b)[2]) {
  if constexpr (IsBf16<T>::value)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ __forceinline__ unsigned short bits16(T v) {
  return *reinterpret_cast<const unsigned short*>(&v);
}

// Can the tensor-core product run a product of width K (BITS, GS)?
template <typename T, int BITS, int GS, int K>
__host__ __device__ constexpr bool mma_ok() {
  return sizeof(T) == 2 && (BITS == 0 ? K % 32 == 0 : GS % 32 == 0 && K % GS == 0);
}

// float32 models with 4- or 8-bit weights: a product on the tensor cores in
// bfloat16, each activation x taken as SPLIT parts (hi = bf16(x), then
// bf16(x - hi): 16 of its 24 bits), the operand's rows part by part (row
// p * M + m: row m's part p); the weights' integers are exact in bfloat16,
// every sum is float32 and a row's parts' sums are added at the end.  (The
// host's kStepSplit.)
constexpr int SPLIT = 2;
template <typename T, int BITS, int GS, int K>
__host__ __device__ constexpr bool mma_split() {
  return sizeof(T) == 4 && BITS != 0 && mma_ok<__nv_bfloat16, BITS, GS, K>();
}

// n-tiles of 8 weight rows a block holds in partial sums at once (the shared
// partials' size: WARPS * mma_tiles * 128 floats) for an operand of MA rows.
__host__ __device__ constexpr int mma_tiles(int MA) { return MA > 32 ? 8 : 4; }

// Unit u's pair p (values 2p, 2p+1 of this lane's piece) of weight row `row`,
// as two T in one register; OFF: the offset the values carry (quantized).
template <typename T, int BITS, int GS, int K>
struct MmaUnit {
  static constexpr int UK = BITS ? GS : 32;           // values of a unit
  static constexpr int PV = UK / 4;                   // of a lane's piece
  static constexpr int WORDS = BITS ? PV * BITS / 32 : PV / 2;   // 32-bit words of a piece
  static constexpr float OFF = BITS == 4 ? (IsBf16<T>::value ? 128.0f : 1024.0f) : 0.0f;
  unsigned w[WORDS];
  template <typename W>   // (the weights' Lin: the model's dtype, T or float in parts)
  __device__ __forceinline__ void load(const Lin<W>& L, int row, int u, int t) {
    constexpr int B = BITS ? BITS : 16;                 // bits a value
    const unsigned* p = reinterpret_cast<const unsigned*>(L.w) + (size_t)row * (K * B / 32) +
                        (size_t)u * (UK * B / 32) + t * WORDS;
#pragma unroll
    for (int i = 0; i < WORDS; ++i) w[i] = __ldg(p + i);
  }
  __device__ __forceinline__ unsigned pair(int p) const {
    if constexpr (BITS == 0) {
      return w[p];
    } else if constexpr (BITS == 4) {   // (0x4300 | q) is bf16 128 + q, (0x6400 | q) f16 1024 + q
      constexpr unsigned MAGIC = IsBf16<T>::value ? 0x43004300u : 0x64006400u;
      const unsigned v = w[p / 4] >> (8 * (p % 4));
      return (v & 0xFu) | ((v & 0xF0u) << 12) | MAGIC;
    } else {
      const unsigned v = w[p / 2] >> (16 * (p % 2));
      return bits16(static_cast<T>(static_cast<float>(v & 0xFFu))) |
             (static_cast<unsigned>(bits16(static_cast<T>(static_cast<float>((v >> 8) & 0xFFu)))) << 16);
    }
  }
};

// xm's row stride (values) for the tensor-core product of width K: the four
// lanes of a row read 16-byte pieces 2 * PV bytes apart, two rows a quarter
// warp, so a row is padded to start 64 (PV = 8) or 16 bytes past the previous
// row's banks (GS = 128 reads still meet two lanes a bank).
template <typename T, int BITS, int GS, int K>
__host__ __device__ constexpr int mma_stride() {
  if constexpr (!mma_ok<T, BITS, GS, K>()) {
    return K;
  } else {
    constexpr int PV = (BITS ? GS : 32) / 4;
    return PV == 8 ? K + ((64 - (2 * K) % 128 + 128) % 128) / 2 : K + 8;
  }
}

// xm's row stride for a product (SP: in SPLIT bfloat16 parts).
template <typename T, bool SP, int BITS, int GS, int K>
__host__ __device__ constexpr int x_stride() {
  return SP ? mma_stride<__nv_bfloat16, BITS, GS, K>() : mma_stride<T, BITS, GS, K>();
}

// load_xm for a product in SPLIT bfloat16 parts (mma_split): row p * M + m of
// xm (rows XS values apart) <- part p of row m's values, normalized as
// load_xm normalizes them in float32.
template <int K, int M, int XS>
__device__ __forceinline__ void load_xm_split(const float* src, const float* nw, float eps,
                                              __nv_bfloat16* xm, float* red) {
  float ss[M];   // (the rows' scales: only where nw is given)
#pragma unroll
  for (int m = 0; m < M; ++m) ss[m] = 0.0f;
  if (nw != nullptr) {
    for (int k = threadIdx.x; k < K; k += THREADS)
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float v = __ldcg(src + m * K + k);
        ss[m] += v * v;
      }
    row_scales<M>(ss, red, K, eps);
  }
  for (int k = threadIdx.x; k < K; k += THREADS) {
    const float wk = nw != nullptr ? nw[k] : 1.0f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = __ldcg(src + m * K + k);
      if (nw != nullptr) v = wk * (v * ss[m]);
#pragma unroll
      for (int p = 0; p < SPLIT; ++p) {
        const __nv_bfloat16 h = static_cast<__nv_bfloat16>(v);
        xm[(p * M + m) * XS + k] = h;
        v -= static_cast<float>(h);
      }
    }
  }
  __syncthreads();
}

// The activations for a product (SP: in SPLIT parts, load_xm_split).
template <typename T, bool SP, int K, int M, int XS>
__device__ __forceinline__ void load_for(const float* src, const T* nw, float eps, T* xm,
                                         float* red) {
  if constexpr (SP)
    load_xm_split<K, M, XS>(src, reinterpret_cast<const float*>(nw), eps,
                            reinterpret_cast<__nv_bfloat16*>(xm), red);
  else
    load_xm<T, K, M, XS>(src, nw, eps, xm, red);
}

// Rows [r0, r0 + 8 NT) of a product of width K (PAIR: rows [r0, r0 + 8) of two
// products, n-tile 0 and 1) with the M rows of xm (row stride XS), by the
// whole block; row_of(j, r, L, row): the weight of n-tile j and r's row in it;
// emit(r, m, v0, v1) for every sum (v1: the second product's, PAIR).  part:
// WARPS * MT * NT * 128 floats of shared memory.
// X: the activations' type (T, or bfloat16 in P = SPLIT parts: mma_split).
template <typename T, typename X, int P, int BITS, int GS, int K, int XS, int M, int NT, bool PAIR,
          class RowOf, class Emit>
__device__ __forceinline__ void mma_tile(int r0, int N, const X* xm, float* part, RowOf row_of,
                                         Emit emit) {
  using U = MmaUnit<X, BITS, GS, K>;
  constexpr int MT = (P * M + 15) / 16, NU = K / U::UK, STEPS = U::UK / 16;
  constexpr unsigned ONES = IsBf16<X>::value ? 0x3F803F80u : 0x3C003C00u;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  constexpr int RB = PAIR ? 8 : 8 * NT;                // rows of a tile
  auto base = [&](int j) { return r0 + (PAIR ? 0 : 8 * j); };
  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  Lin<T> L[NT];
  int wr[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) row_of(j, min(base(j) + g, N - 1), L[j], wr[j]);
  // ask L2 for the block's next tile (its rows are contiguous in each weight)
  if (r0 + (int)gridDim.x * RB < N) {
    constexpr int ROWB = K * (BITS ? BITS : 16) / 8;   // bytes of a weight row
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      Lin<T> Ln;
      int rn;
      row_of(j, min(base(j) + (int)gridDim.x * RB, N - 1), Ln, rn);
      const char* p = static_cast<const char*>(Ln.w) + (size_t)rn * ROWB;
      for (int o = threadIdx.x * 128; o < 8 * ROWB && rn + o / ROWB < N; o += THREADS * 128)
        asm volatile("prefetch.global.L2 [%0];" : : "l"(p + o));
    }
  }
  // the lane's activation rows (clamped: rows past P * M only feed sums not used)
  const X* x0[MT];
  const X* x1[MT];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    x0[i] = xm + (size_t)min(16 * i + g, P * M - 1) * XS + t * U::PV;
    x1[i] = xm + (size_t)min(16 * i + g + 8, P * M - 1) * XS + t * U::PV;
  }
  // units u0, u0 + WARPS, ... (UG of them): their weights requested together,
  // so a warp waits for memory once per group, not once per unit
  constexpr int UG = NU / WARPS >= 4 ? 4 : (NU / WARPS >= 2 ? 2 : 1);
  for (int u0 = warp; u0 < NU; u0 += WARPS * UG) {
    U wu[UG][NT];
#pragma unroll
    for (int k = 0; k < UG; ++k)
#pragma unroll
      for (int j = 0; j < NT; ++j)
        if (u0 + k * WARPS < NU) wu[k][j].load(L[j], wr[j], u0 + k * WARPS, t);
#pragma unroll
    for (int k = 0; k < UG; ++k) {
      const int u = u0 + k * WARPS;
      if (u >= NU) break;
      float q[MT][NT][4], s[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[i][e] = 0.0f;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) q[i][j][e] = 0.0f;
      }
#pragma unroll
      for (int st = 0; st < STEPS; st += 2) {   // two steps per 16-byte read of x
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const uint4 a0 = *reinterpret_cast<const uint4*>(x0[i] + u * U::UK + 4 * st);
          const uint4 a1 = *reinterpret_cast<const uint4*>(x1[i] + u * U::UK + 4 * st);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const unsigned a[4] = {h ? a0.z : a0.x, h ? a1.z : a1.x, h ? a0.w : a0.y,
                                   h ? a1.w : a1.y};
#pragma unroll
            for (int j = 0; j < NT; ++j) {
              const unsigned b[2] = {wu[k][j].pair(2 * (st + h)), wu[k][j].pair(2 * (st + h) + 1)};
              if (BITS)
                mma16816<X>(q[i][j], a, b);
              else
                mma16816<X>(acc[i][j], a, b);
            }
            if (BITS) {
              const unsigned ones[2] = {ONES, ONES};
              mma16816<X>(s[i], a, ones);
            }
          }
        }
      }
      if (BITS) {   // the unit's scales: rows 2t, 2t + 1 of each n-tile
        constexpr int G = GS ? GS : 1;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          float sc[2], bi[2];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            Lin<T> Lh;
            int rh;
            row_of(j, min(base(j) + 2 * t + h, N - 1), Lh, rh);
            const size_t gi = (size_t)rh * (K / G) + u * U::UK / G;
            sc[h] = static_cast<float>(Lh.s[gi]);
            bi[h] = static_cast<float>(Lh.b[gi]) - U::OFF * sc[h];
          }
#pragma unroll
          for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              acc[i][j][e] += sc[e & 1] * q[i][j][e] + bi[e & 1] * s[i][e & 2];
        }
      }
    }
  }
  // the warps' partials -> part, then each sum by one thread: operand row a's
  // sums sit in m-tile a / 16 at lane 4 (a % 8) + (column pair), element
  // 2 (a % 16 / 8) + (column in the pair)
  float4* pw = reinterpret_cast<float4*>(part) + (size_t)warp * MT * NT * 32;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
      pw[(i * NT + j) * 32 + lane] =
          make_float4(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3]);
  __syncthreads();
  constexpr int MO = (M + 15) / 16;                 // m-tiles of the output rows
  constexpr int OUT = (PAIR ? 1 : NT) * MO * 128;   // (PAIR: n-tile 1 read beside 0)
  for (int o = threadIdx.x; o < OUT; o += THREADS) {
    const int e = o & 3, ln = (o >> 2) & 31, i = (o >> 7) / (PAIR ? 1 : NT);
    const int j = PAIR ? 0 : (o >> 7) % NT, idx = ((i * NT + j) << 7) | (o & 127);
    const int m = 16 * i + (ln >> 2) + (e & 2 ? 8 : 0), r = base(j) + 2 * (ln & 3) + (e & 1);
    float v0 = 0.0f, v1 = 0.0f;
#pragma unroll
    for (int p = 0; p < P; ++p) {   // (part 0 at idx; rows past M clamped: not emitted)
      const int a = p * M + min(m, M - 1);
      const int at = p == 0 ? idx : (((a >> 4) * NT + j) << 7) | ((a & 7) << 4) |
                                        ((ln & 3) << 2) | (a & 8 ? 2 : 0) | (e & 1);
      STEP_CHECK(at + (PAIR ? 128 : 0) < MT * NT * 128);
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        v0 += part[w * MT * NT * 128 + at];
        if (PAIR) v1 += part[w * MT * NT * 128 + at + 128];
      }
    }
    if (m < M && r < N) emit(r, m, v0, v1);
  }
  __syncthreads();
}

// A whole product (N rows; PAIR: two of N rows each) on the tensor cores,
// tiles strided over the grid's blocks: several n-tiles a tile for wide
// products (fewer, longer tiles), one for narrow ones (every block busy).
template <typename T, typename X, int P, int BITS, int GS, int K, int M, int N, bool PAIR,
          class RowOf, class Emit>
__device__ __forceinline__ void mma_product(const X* xm, float* part, RowOf row_of, Emit emit) {
  constexpr int MT = (P * M + 15) / 16;
  constexpr int WIDE = mma_tiles(P * M) / MT > 4 ? 4 : mma_tiles(P * M) / MT;
  constexpr int NT = PAIR ? 2 : (N >= 4096 ? WIDE : 1);
  constexpr int RB = PAIR ? 8 : 8 * NT;
  for (int r0 = blockIdx.x * RB; r0 < N; r0 += gridDim.x * RB)
    mma_tile<T, X, P, BITS, GS, K, mma_stride<X, BITS, GS, K>(), M, NT, PAIR>(r0, N, xm, part,
                                                                              row_of, emit);
}

// A product of N rows (PAIR: of two products) with the M rows of xm, by the
// grid: on the tensor cores where mma_ok, or in SPLIT bfloat16 parts (SP:
// mma_split, xm as load_xm_split left it), else a warp a row (row_dot_m,
// xm's rows K apart); row_of and emit as mma_tile's.
template <typename T, int BITS, int GS, int K, int M, int N, bool PAIR, bool SP, class RowOf,
          class Emit>
__device__ __forceinline__ void product_m(const T* xm, float* part, RowOf row_of, Emit emit) {
  if constexpr (mma_ok<T, BITS, GS, K>()) {
    mma_product<T, T, 1, BITS, GS, K, M, N, PAIR>(xm, part, row_of, emit);
  } else if constexpr (SP) {
    mma_product<T, __nv_bfloat16, SPLIT, BITS, GS, K, M, N, PAIR>(
        reinterpret_cast<const __nv_bfloat16*>(xm), part, row_of, emit);
  } else {
    const int nw = gridDim.x * WARPS;
    for (int r = blockIdx.x * WARPS + (threadIdx.x >> 5); r < N; r += nw) {
      float v0[M], v1[M];
      Lin<T> L;
      int row;
      row_of(0, r, L, row);
      row_dot_m<T, BITS, GS, K, M>(L, row, xm, v0);
      if (PAIR) {
        row_of(1, r, L, row);
        row_dot_m<T, BITS, GS, K, M>(L, row, xm, v1);
      }
      if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int m = 0; m < M; ++m) emit(r, m, v0[m], PAIR ? v1[m] : 0.0f);
    }
  }
}

template <typename T, int BITS, int GS, int EBITS, int EGS, int D, int NQ, int NKV, int HD, int FF,
          int V, int NL, bool QKV_BIAS, bool QK_NORM, int M, bool ROWS = false,
          bool GEMMA = false>
__device__ void verify_step(const int* tok_p, const int* meta, const unsigned long long* table,
                            const float* inv_freq, T* const* kc, T* const* vc, float eps,
                            float qk_eps, float scale, float* scratch, T* logits, unsigned* bar,
                            const int* rpos = nullptr, float escale = 0.0f) {
  constexpr int NQKV = (NQ + 2 * NKV) * HD;
  constexpr int DPL = (HD + 31) / 32;
  constexpr int GROUP = NQ / NKV;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  T* xm = reinterpret_cast<T*>(dyn_smem);      // [M][K], K up to the widest product
  __shared__ float red[WARPS * M];
  __shared__ __align__(16) float hv[WARPS][HD];   // a warp's head vector (phase B1)

  float* x = scratch;                          // residual stream [M][D]
  float* qkv = x + M * D;                      // [M][NQKV]
  float* att = qkv + M * NQKV;                 // [M][NQ * HD]
  float* hid = att + M * NQ * HD;              // [M][FF]
  const int pos = meta[2], cap = meta[3];
  // activation row m's rotary position, its cache row (a launch of a batch's
  // rows r0 .. r0 + M - 1: meta[0] = r0), and the first slot it attends to
  auto at_pos = [&](int m) { return ROWS ? rpos[m] : pos + m; };
  auto kv_row = [&](int m) { return ROWS ? (int)meta[0] + m : 0; };
  auto first_slot = [&](int m) { return ROWS ? min(max(pos - rpos[m], 0), pos) : 0; };
  const int maxt = (cap + 31) / 32;
  float* part = hid + M * FF;                  // partials [NQ * M][maxt][HD + 2]
  // GEMMA (as decode_step's): a layer's input x, its residual after attention
  // x2, o_proj's output ob, down's yo, each [M][D]
  float* x2 = part + (size_t)NQ * M * maxt * (HD + 2);
  float* ob = x2 + M * D;
  float* yo = ob + M * D;
  unsigned* count = bar + 64;                  // per (head, position): tiles done
  Barrier sync = barrier_start(reinterpret_cast<unsigned long long*>(bar + 4), nullptr, 0);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gw = blockIdx.x * WARPS + warp, nw = gridDim.x * WARPS;
  const unsigned long long* top = table + NL * PL;
  // the products in SPLIT parts (float32 models; Gemma's sandwich loads keep
  // float32 rows), xm's row strides for the products (product_m: on the
  // tensor cores where the dtype and widths allow), their partials past xm
  constexpr bool SQ = !GEMMA && mma_split<T, BITS, GS, D>(),
                 SO = !GEMMA && mma_split<T, BITS, GS, NQ * HD>(),
                 SF = !GEMMA && mma_split<T, BITS, GS, FF>(),
                 SH = !GEMMA && mma_split<T, EBITS, EGS, D>();
  constexpr int XQ = x_stride<T, SQ, BITS, GS, D>(), XO = x_stride<T, SO, BITS, GS, NQ * HD>(),
                XF = x_stride<T, SF, BITS, GS, FF>(), XH = x_stride<T, SH, EBITS, EGS, D>();
  auto xbytes = [](bool sp, int xs) { return sp ? SPLIT * M * xs * 2 : M * xs * (int)sizeof(T); };
  const int XB = cmax(cmax(xbytes(SQ, XQ), xbytes(SO, XO)), cmax(xbytes(SF, XF), xbytes(SH, XH)));
  float* mpart = reinterpret_cast<float*>(dyn_smem + ((size_t)XB + 15) / 16 * 16);

  // the embedding rows into x (every block writes the same values)
  {
    const Lin<T> E = lin<T>(top);
    for (int i = threadIdx.x; i < M * D; i += THREADS) {
      const float v = embed_value<T, EBITS, EGS>(E, tok_p[i / D], i % D, D);
      x[i] = GEMMA ? rt<T>(v * escale) : v;
    }
    __threadfence();
    __syncthreads();
  }

  for (int l = 0; l < NL; ++l) {
    const unsigned long long* t = table + l * PL;
    // -- A: RMSNorm -> q, k, v (+ bias) for every position (Gemma: the
    // previous layer's down output, post-norm, joins x2 into x first)
    if (GEMMA && l > 0)
      load_xm_sandwich<T, D, M, XQ>(x2, yo, ptr<T>(t[29 - PL]), ptr<T>(t[0]), eps, xm, red, x);
    else
      load_for<T, SQ, D, M, XQ>(x, ptr<T>(t[0]), eps, xm, red);
    {
      const Lin<T> parts[3] = {lin<T>(t + 1), lin<T>(t + 4), lin<T>(t + 7)};
      auto part_row = [&](int, int r, Lin<T>& L, int& row) {
        const int p = qkv_part<NQ, NKV, HD>(r);
        L = parts[p];
        row = r - qkv_first<NQ, NKV, HD>(p);
      };
      auto out = [&](int r, int m, float v, float) {
        const int p = qkv_part<NQ, NKV, HD>(r);
        float o = rt<T>(v);
        if (QKV_BIAS) o = rt<T>(o + static_cast<float>(ptr<T>(t[10 + p])[r - qkv_first<NQ, NKV, HD>(p)]));
        qkv[m * NQKV + r] = o;
      };
      product_m<T, BITS, GS, D, M, NQKV, false, SQ>(xm, mpart, part_row, out);
    }
    grid_sync(sync);
    // -- B1: q/k norm and RoPE of the new rows; k, v into the cache at pos + m
    for (int it = gw; it < (NQ + NKV) * M; it += nw) {
      const int hh = it / M, m = it % M;
      float* v = hv[warp];
      float* src = qkv + m * NQKV + hh * HD;
      for (int d = lane; d < HD; d += 32) v[d] = __ldcg(src + d);
      __syncwarp();
      if (QK_NORM) head_norm<T, HD>(v, ptr<T>(t[hh < NQ ? 13 : 14]), qk_eps);
      rope<T, HD>(v, GEMMA ? inv_freq + l * (HD / 2) : inv_freq, at_pos(m));
      if (hh < NQ) {
        for (int d = lane; d < HD; d += 32) src[d] = v[d];
      } else {
        const int j = hh - NQ;
        const size_t at = (((size_t)kv_row(m) * NKV + j) * t[PL - 3] + (ROWS ? pos : pos + m)) * HD;
        const float* vs = qkv + m * NQKV + (NQ + NKV + j) * HD;
        for (int d = lane; d < HD; d += 32) {
          kc[l][at + d] = static_cast<T>(v[d]);
          vc[l][at + d] = static_cast<T>(__ldcg(vs + d));
        }
      }
      __syncwarp();
    }
    grid_sync(sync);
    // -- B2: attention, a warp per (query head, row, tile of 32 keys): the
    // row's slots first .. last, in tiles t0 .. t0 + ntile - 1
    {
      const int ntmax = (pos + M - 1) / 32 + 1;
      for (int it = gw; it < NQ * M * ntmax; it += nw) {
        const int h = it / (M * ntmax), m = (it / ntmax) % M, tile = it % ntmax;
        const int last = ROWS ? pos : pos + m;  // the query's own slot
        const int first = first_slot(m), t0 = first / 32;
        const int ntile = last / 32 + 1 - t0;
        if (tile < t0 || tile >= t0 + ntile) continue;
        const int j = h / GROUP;
        float* qv = hv[warp];                   // the rotated q (phase B1)
        for (int d = lane; d < HD; d += 32) qv[d] = __ldcg(qkv + m * NQKV + h * HD + d);
        __syncwarp();
        const T* kl = kc[l] + ((size_t)kv_row(m) * NKV + j) * t[PL - 3] * HD;
        const T* vl = vc[l] + ((size_t)kv_row(m) * NKV + j) * t[PL - 3] * HD;
        const int p = tile * 32 + lane;
        const bool seen = p >= first && p <= last;
        float s = neg_inf();
        if (seen) s = key_dot<T, HD, true>(qv, kl + (size_t)p * HD) * scale;
        const float mx = warp_max(s);           // (finite: a tile holds a seen slot)
        const float e = seen ? __expf(s - mx) : 0.0f;
        const float sum = warp_sum(e);
        const int n = min(32, last + 1 - tile * 32);
        float acc[DPL];
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[i] = 0.0f;
        // (from the first seen slot: a padding slot's value is never read)
#pragma unroll 8
        for (int i = max(first - tile * 32, 0); i < n; ++i) {
          const float ei = __shfl_sync(0xffffffffu, e, i);
          const size_t pp = (size_t)(tile * 32 + i) * HD;
#pragma unroll
          for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < HD) acc[c] = fmaf(ei, static_cast<float>(__ldcg(vl + pp + d)), acc[c]);
          }
        }
        const int hm = h * M + m;
        finish_tile<T, HD>(acc, mx, sum, part + (size_t)hm * maxt * (HD + 2), tile - t0, ntile,
                           count + hm, att + m * NQ * HD + h * HD);
      }
    }
    grid_sync(sync);
    // -- C: o_proj + residual
    load_for<T, SO, NQ * HD, M, XO>(att, nullptr, 0.0f, xm, red);
    {
      const Lin<T> o = lin<T>(t + 15);
      auto out = [&](int r, int m, float v, float) {
        if (GEMMA) ob[m * D + r] = rt<T>(v);
        else x[m * D + r] = rt<T>(__ldcg(x + m * D + r) + rt<T>(v));
      };
      product_m<T, BITS, GS, NQ * HD, M, D, false, SO>(
          xm, mpart, [&](int, int r, Lin<T>& L, int& row) { L = o; row = r; }, out);
    }
    grid_sync(sync);
    // -- D: RMSNorm -> gate, up -> act(gate) * up (Gemma: o_proj's output,
    // post-norm, joins x into x2 first)
    if (GEMMA)
      load_xm_sandwich<T, D, M, XQ>(x, ob, ptr<T>(t[28]), ptr<T>(t[18]), eps, xm, red, x2);
    else
      load_for<T, SQ, D, M, XQ>(x, ptr<T>(t[18]), eps, xm, red);
    {
      const Lin<T> g = lin<T>(t + 19), u = lin<T>(t + 22);
      auto out = [&](int r, int m, float gv, float uv) {
        hid[m * FF + r] = mlp_act<T, GEMMA>(rt<T>(gv), rt<T>(uv));
      };
      product_m<T, BITS, GS, D, M, FF, true, SQ>(
          xm, mpart, [&](int j, int r, Lin<T>& L, int& row) { L = j ? u : g; row = r; }, out);
    }
    grid_sync(sync);
    // -- E: down + residual
    load_for<T, SF, FF, M, XF>(hid, nullptr, 0.0f, xm, red);
    {
      const Lin<T> dn = lin<T>(t + 25);
      auto out = [&](int r, int m, float v, float) {
        if (GEMMA) yo[m * D + r] = rt<T>(v);
        else x[m * D + r] = rt<T>(__ldcg(x + m * D + r) + rt<T>(v));
      };
      product_m<T, BITS, GS, FF, M, D, false, SF>(
          xm, mpart, [&](int, int r, Lin<T>& L, int& row) { L = dn; row = r; }, out);
    }
    grid_sync(sync);
  }
  // -- the final norm and the output head (Gemma: the last layer's down
  // output, post-norm, joins x2 first)
  if (GEMMA)
    load_xm_sandwich<T, D, M, XH>(x2, yo, ptr<T>(top[29 - PL]), ptr<T>(top[3]), eps, xm, red,
                                  nullptr);
  else
    load_for<T, SH, D, M, XH>(x, ptr<T>(top[3]), eps, xm, red);
  const Lin<T> head = lin<T>(top + 4);
  auto out = [&](int r, int m, float v, float) { logits[(size_t)m * V + r] = static_cast<T>(v); };
  product_m<T, EBITS, EGS, D, M, V, false, SH>(
      xm, mpart, [&](int, int r, Lin<T>& L, int& row) { L = head; row = r; }, out);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    bar[2] = ROWS ? pos + 1 : pos + M;
    bar[3] = cap;
  }
}

}  // namespace mlxcy_step
)CUDA";
}

// ---- host side --------------------------------------------------------------

// Entries of the pointer table per layer (the device code's PL) and at its end.
constexpr int kStepPerLayer = 33;
constexpr int kStepGlobal = 7;

// One entry of the table: the address of row `row0` of an array (a fused
// weight's later parts start past row 0), or `value` when a is null (0: an
// absent weight).
struct StepPtr {
  const mx::array* a = nullptr;
  int row0 = 0;
  long long value = 0;             // the entry when a is null (a count, not an address)
};

// A model's shapes for the kernel (one compiled kernel per distinct config).
struct StepConfig {
  mx::Dtype dtype = mx::bfloat16;
  int bits = 0, group_size = 0;
  int ebits = 0, egs = 0;          // the embedding's (and the head's) own format
  int D = 0, NQ = 0, NKV = 0, HD = 0, FF = 0, V = 0, L = 0;
  bool qkv_bias = false, qk_norm = false;
  bool gemma = false;              // Gemma 3's block (decode_step's GEMMA)
  float eps = 1e-5f, qk_eps = 1e-6f, scale = 1.0f;
  float embed_scale = 0.0f;        // the embedding's factor in the model's dtype (0: none)
};

// Weight values in a 16-byte chunk (the device code's chunk_vals).
inline int step_chunk_vals(const StepConfig& c) {
  return c.bits ? 128 / c.bits : 16 / static_cast<int>(mx::size_of(c.dtype));
}

// The most 16-byte chunks of each down row a slice of the split MLP takes
// (step_slice).
constexpr int kStepSliceMax = 8;

// Bytes of decode_step's static shared memory (its __shared__ arrays: xs,
// red, the split MLP's hs, x_issue's ys and ws, and a little more), for the
// larger of its forms (the MLP split or not).
inline long step_static_smem(const StepConfig& c) {
  const long size = static_cast<long>(mx::size_of(c.dtype));
  const long S = kStepSliceMax * step_chunk_vals(c);        // the longest slice's rows
  const long as = 3L * 8 * c.HD + 8L * (c.HD + 2);          // attention's per-warp parts
  auto bytes = [&](bool split) {
    const long xw = split ? c.D : std::max(c.D, c.FF);
    const long xmax = std::max<long>(xw, c.NQ * c.HD);
    const long xs = std::max(xmax + xmax / 8 + 8, as);
    return 4 * (xs + 8 + (split ? S + S / 8 + 8 : 1) + (split ? c.D : 4)) + c.D * size + 64;
  };
  return std::max(bytes(false), bytes(true));
}

// Why cfg cannot run (empty: it can).
inline std::string step_config_problem(const StepConfig& c) {
  if (c.dtype != mx::bfloat16 && c.dtype != mx::float16 && c.dtype != mx::float32)
    return "dtype must be bfloat16, float16 or float32";
  if (c.bits != 0 && c.bits != 4 && c.bits != 8) return "only 4- and 8-bit weights";
  const int vals = step_chunk_vals(c);
  if (c.bits && (c.group_size % vals || c.group_size <= 0)) return "group size";
  for (int k : {c.D, c.NQ * c.HD, c.FF})
    if (k <= 0 || k % vals || (c.bits && k % c.group_size)) return "a product's width";
  if (step_static_smem(c) > 48 * 1024) return "a product too wide for 48 KB of shared memory";
  if (c.NQ > 512) return "more than 512 query heads";     // StepState's per-head counters
  if (c.HD > 256 || c.HD % 2 || (c.HD * mx::size_of(c.dtype)) % 16 || c.NKV <= 0 ||
      c.NQ % c.NKV)
    return "head layout";
  if (c.ebits != 0 && c.ebits != 4 && c.ebits != 8) return "only 4- and 8-bit embeddings";
  if (c.ebits && (c.egs <= 0 || c.egs % (128 / c.ebits) || c.D % c.egs)) return "embedding group size";
  if (c.D % (32 / std::max(c.ebits, 1)) && c.ebits) return "embedding width";
  return "";
}

// The parts of a float32 activation in verify_step's products on the tensor
// cores (the device's SPLIT).
constexpr int kStepSplit = 2;

// Does verify_step take some products of c in kStepSplit bfloat16 parts (the
// device's mma_split: float32 activations, 4- or 8-bit weights, not Gemma)?
inline bool step_split(const StepConfig& c) {
  return c.dtype == mx::float32 && !c.gemma && (c.bits || c.ebits);
}

// Does verify_step run every product of c on the tensor cores (the device's
// mma_ok: a 2-byte dtype, or float32 in parts where every product is
// quantized; widths in whole units of 32 values or groups)?
inline bool step_mma(const StepConfig& c) {
  auto ok = [](int k, int bits, int gs) {
    return bits == 0 ? k % 32 == 0 : gs % 32 == 0 && k % gs == 0;
  };
  const bool widths = ok(c.D, c.bits, c.group_size) && ok(c.NQ * c.HD, c.bits, c.group_size) &&
                      ok(c.FF, c.bits, c.group_size) && ok(c.D, c.ebits, c.egs);
  return widths && (mx::size_of(c.dtype) == 2 || (step_split(c) && c.bits && c.ebits));
}

// Dynamic shared memory of the several-positions kernel: M rows of the widest
// product's input in the model's dtype, or kStepSplit M rows in bfloat16
// (step_split; each row padded by up to 64 bytes: the device's mma_stride),
// and the tensor-core products' partials (8 warps x mma_tiles(the operand's
// rows) x 128 floats) -- at least 64 KB, so that MLX always raises the
// kernel's limit past the default 48 KB (it does so only for requests above
// 48,000 bytes, and the kernel's static arrays come on top).
inline int step_shared_bytes(const StepConfig& c, int M) {
  const bool split = step_split(c);
  const int xmax = std::max(std::max(c.D, c.FF), c.NQ * c.HD);
  int xm = M * (xmax * static_cast<int>(mx::size_of(c.dtype)) + 64);
  if (split) xm = std::max(xm, kStepSplit * M * (xmax * 2 + 64));
  const int rows = split ? kStepSplit * M : M;
  const int part = step_mma(c) || split ? 8 * (rows > 32 ? 8 : 4) * 128 * 4 : 0;
  return std::max(xm + part, 64 * 1024);
}

// Device 0's CUDA attribute `attr` from the driver (fallback when no driver or
// device answers).
inline int step_device_attribute(int attr, int fallback) {
  void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (!h) h = dlopen("libcuda.so.1", RTLD_NOW);
  using Fn = int (*)(int*, int, int);
  Fn f = h ? reinterpret_cast<Fn>(dlsym(h, "cuDeviceGetAttribute")) : nullptr;
  int v = 0;
  return f && f(&v, attr, 0) == 0 && v > 0 ? v : fallback;
}

// What a block may ask of dynamic shared memory: the device's opt-in limit
// (227 KB on an H100 or H200; that when no GPU answers) less 12 KB for
// verify_step's static arrays.
inline int step_smem_limit() {
  static int limit =
      step_device_attribute(97 /* MAX_SHARED_MEMORY_PER_BLOCK_OPTIN */, 232448) - 12 * 1024;
  return limit;
}

// StepState's per-(head, position) attention counters (its words from 64 on).
constexpr int kStepCounters = 4096 - 64;

// The most positions (or rows) of a launch of at most `most`, by shared
// memory and the counters.
inline int step_fit(const StepConfig& c, int most) {
  int m = most;
  while (m > 1 && (step_shared_bytes(c, m) > step_smem_limit() || c.NQ * m > kStepCounters)) --m;
  return m;
}

// The most positions one launch takes (1: only the one-token kernel): up to
// 16 (a speculative step's k + 1 at the engine's default k = 8 fits).
inline int step_max_positions(const StepConfig& c) { return step_fit(c, 16); }

// A lower bound on the rows of a launch than shared memory sets (0: none; set
// by base.set_gpu_launch_rows, for tests and measurements).
inline int& step_launch_rows() {
  static int rows = 0;
  return rows;
}

// The most batch rows one launch takes: up to 64 where the products run on
// the tensor cores, else as positions (each row's products cost CUDA-core
// multiply-adds: past ~8 rows MLX's ops were faster).
inline int step_max_rows(const StepConfig& c) {
  // (the tensor cores' operand: 64 rows at most)
  const int most = step_mma(c) ? step_fit(c, step_split(c) ? 64 / kStepSplit : 64)
                               : step_max_positions(c);
  return step_launch_rows() > 0 ? std::min(most, step_launch_rows()) : most;
}

// The most rows of a batch step: 64 (the server's batch) in launches of up to
// step_max_rows on the tensor cores, else one launch.
inline int step_max_batch(const StepConfig& c) { return step_mma(c) ? 64 : step_max_rows(c); }

// Blocks in the grid: one per SM.  All must be resident at once (the barrier
// waits for every block); a block of 256 threads fits an SM whatever its
// register count (at most 255 x 256 of 64K registers) and shared memory
// (< 48 KB), while two per SM would not at the ~134 registers nvcc gives it.
inline int step_grid_blocks() {
  static int blocks = step_device_attribute(16 /* MULTIPROCESSOR_COUNT */, 16);
  return blocks;
}

// The device address of an evaluated array (MLX's CUDA buffers hold it first).
inline uint64_t step_address(const mx::array& a) {
  char* base = static_cast<char*>(*reinterpret_cast<void* const*>(a.buffer().ptr()));
  return reinterpret_cast<uint64_t>(base + a.offset());
}

// What persists between steps, in device memory: the rotary inverse
// frequencies; `state` (uint32 [4096], 16 KB so that MLX allocates it on the
// device, not in its managed pool for scalars, where atomics would bounce
// pages to the host): [2] the next step's position, [3] the cache capacity
// -- the kernel writes them as it ends, so a step that follows the previous
// one reads its position from the device and the host uploads nothing per
// token --, [4..5] the grid barrier's arrival counter (uint64, only grows),
// and from [64] a counter per query head (attention tiles done; the last
// merges them); and
// the pointer table, copied to the device again only when an address changed.
struct StepState {
  mx::array inv_freq{0.0f}, state{0.0f}, table{0.0f};
  std::vector<uint64_t> host;      // what `table` holds
  int next = -1, cap = -1;         // what state[2], state[3] will hold (-1: unknown)
  mx::array last{0.0f};            // the previous step's logits: if never scheduled,
  bool has_last = false;           // its kernel never ran and state[2..3] are stale
  mx::array timing{0.0f};          // MLXCY_STEP_TIMING: the last one-token step's clock
};                                 // readings (uint32 [2 + 3 * barriers, blocks])

// MLXCY_STEP_TIMING=1 in the environment (read once): the one-token kernel
// records each block's clock at every barrier (benchmarks/gpu_step_profile.py
// --phases); a profiling build of the same kernel, not for production.
// Split the MLP over slices (decode_step's SLICE): -1 where it pays, measured
// on an H100 (docs/benchmarks.md): whole slices and at least one for every
// two blocks of the grid (fewer leave most SMs idle in the MLP); 0 never, 1
// wherever the slices are whole, 2, 4 or 8: slices of that many chunks
// wherever they are whole (tests).  Set by base.set_gpu_step_split.
inline int& step_split_mode() {
  static int mode = -1;
  return mode;
}

// decode_step's SLICE: 0 (no split), or the 16-byte chunks of each down row a
// slice takes.  Of 2, 4 and 8 chunks, the one whose busiest block computes the
// fewest hidden rows, and among equals the most: longer pieces of the down
// rows stream faster (Llama-3.2-1B bf16, H100: its kernel 1,404 us with 2 chunks,
// 1,317 with 4, 1,308 with 8, the same rows a block).
inline int step_slice(const StepConfig& c, int blocks) {
  const int vals = step_chunk_vals(c);
  const int mode = step_split_mode();
  if (mode > 1) return c.FF % (mode * vals) ? 0 : mode;
  if (mode == 0 || c.FF % (2 * vals) || (mode == -1 && c.FF / (2 * vals) < blocks / 2)) return 0;
  int best = 2;
  long rows = 0;
  for (int k = 2; k <= kStepSliceMax; k *= 2) {
    const int s = k * vals;
    if (c.FF % s) continue;
    const long r = static_cast<long>((c.FF / s + blocks - 1) / blocks) * s;   // busiest block
    if (rows == 0 || r <= rows) {
      best = k;
      rows = r;
    }
  }
  return best;
}

inline bool step_timing_on() {
  static const bool on = [] {
    const char* v = std::getenv("MLXCY_STEP_TIMING");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

inline void step_init(StepState& st, const mx::array& inv_freq) {
  st.inv_freq = mx::copy(mx::astype(inv_freq, mx::float32));
  st.state = mx::zeros({kStepCounters + 64}, mx::uint32);
  mx::eval({st.inv_freq, st.state});
  st.host.clear();
  st.next = st.cap = -1;
  st.has_last = false;
}

// Evaluate the model's last step if it was never scheduled, then wait for the
// device (before its weights are freed).
inline void step_finish(StepState& st) {
  if (st.has_last && st.last.status() == mx::array::Status::unscheduled) mx::eval({st.last});
  mx::synchronize();
  st.has_last = false;
}

// The previous step kernel launched by this process (any model): each launch
// takes it as an input, so MLX never runs two of these kernels at once (their
// blocks wait for each other at barriers: two running together could each hold
// SMs the other needs).  Called from one thread only (base.pyx).  Never freed:
// an MLX array must not be destroyed at exit.
inline mx::array*& step_previous() {
  static mx::array* prev = nullptr;
  return prev;
}

// step_decode's launch: M = tok.size() positions, or rows r0 .. r0 + M - 1 of a
// batch (rpos their rotary positions; several: the batch takes more than one
// launch, so the position is uploaded for each), the table already on the
// device.
inline mx::array step_launch(const StepConfig& c, StepState& st, const mx::array& tok,
                             std::vector<mx::array>& kbuf, std::vector<mx::array>& vbuf, int pos,
                             int cap, const mx::array* rpos, int r0, bool several) {
  const int M = static_cast<int>(tok.size());
  const bool rows = rpos != nullptr;
  // by layer count, and for several positions (or rows) by their shared memory
  const int smem = M > 1 || rows ? step_shared_bytes(c, M) : 0;
  const bool timed = smem == 0 && step_timing_on();
  static std::map<std::tuple<int, int, bool>, mx::fast::CustomKernelFunction> kernels;
  auto it = kernels.find({c.L, smem, rows});
  if (it == kernels.end()) {
    std::vector<std::string> names = {"tok", "meta", "table", "inv_freq", "bar", "after"};
    if (rows) names.push_back("rpos");
    std::string kinit = "  T* kc[NL] = {", vinit = "  T* vc[NL] = {";
    for (int l = 0; l < c.L; ++l) {
      names.push_back("k" + std::to_string(l));
      kinit += (l ? ", " : "") + std::string("const_cast<T*>(k") + std::to_string(l) + ")";
    }
    for (int l = 0; l < c.L; ++l) {
      names.push_back("v" + std::to_string(l));
      vinit += (l ? ", " : "") + std::string("const_cast<T*>(v") + std::to_string(l) + ")";
    }
    std::string body = kinit + "};\n" + vinit + "};\n" +
        (smem ? "  mlxcy_step::verify_step<T, BITS, GS, EBITS, EGS, D, NQ, NKV, HD, FF, V, NL, "
                "QKV_BIAS, QK_NORM, M, " + std::string(rows ? "true" : "false") + ", GEMMA>(\n"
              : "  mlxcy_step::decode_step<T, BITS, GS, EBITS, EGS, D, NQ, NKV, HD, FF, V, NL, "
                "QKV_BIAS, QK_NORM, SLICE, GEMMA>(\n") +
        "      tok, reinterpret_cast<const int*>(meta),\n"
        "      reinterpret_cast<const unsigned long long*>(table), inv_freq, kc, vc,\n"
        "      __int_as_float(EPS_BITS), __int_as_float(QK_EPS_BITS), __int_as_float(SCALE_BITS),\n" +
        (smem ? "" : "      __int_as_float(ESCALE_BITS),\n") +
        "      scratch, logits, const_cast<unsigned*>(bar)" +
        (smem ? std::string(rows ? ", rpos" : ", nullptr") + ", __int_as_float(ESCALE_BITS)"
              : timed ? ", timing" : ", nullptr") + ");\n";
    std::string name = (rows ? "mlxcy_rows_step_" : smem ? "mlxcy_verify_step_" : "mlxcy_decode_step_") +
                       std::to_string(c.L) + (timed ? "_timed" : "");
    std::vector<std::string> outs = {"logits", "scratch"};
    if (timed) outs.push_back("timing");
    it = kernels.emplace(std::make_tuple(c.L, smem, rows),
                         mx::fast::cuda_kernel(name, names, outs, body, step_device_source(),
                                               false, smem)).first;
  }
  auto bits_of = [](float f) {
    int b;
    std::memcpy(&b, &f, sizeof(b));
    return b;
  };
  // the position from the device state when the previous kernel left it there
  mx::array meta = st.state;
  bool ran = st.has_last && st.last.status() != mx::array::Status::unscheduled;
  if (several || !ran || pos != st.next || cap != st.cap) {
    uint32_t m[4] = {static_cast<uint32_t>(r0), 0, static_cast<uint32_t>(pos),
                     static_cast<uint32_t>(cap)};
    meta = mx::array(m, {4}, mx::uint32);
  }
  st.next = rows ? pos + 1 : pos + M;
  st.cap = cap;
  mx::array*& prev = step_previous();
  std::vector<mx::array> in = {mx::reshape(tok, {M}), meta, st.table, st.inv_freq, st.state,
                               prev ? *prev : st.state};
  if (rows) in.push_back(*rpos);
  for (auto& k : kbuf) in.push_back(k);
  for (auto& v : vbuf) in.push_back(v);
  int scratch = 5 * c.D + M * (c.D + (c.NQ + 2 * c.NKV) * c.HD + c.NQ * c.HD + c.FF) +
                M * c.NQ * ((cap + 31) / 32) * (c.HD + 2) + 4 +   // (+4: ysum 16-byte aligned)
                (smem && c.gemma ? 3 * M * c.D : 0);              // (verify_step's x2, ob, yo)
  int blocks = step_grid_blocks();
  const int slice = smem == 0 ? step_slice(c, blocks) : 0;
  const bool split = slice > 0;
  std::vector<mx::Shape> shapes = {rows ? mx::Shape{M, 1, c.V} : mx::Shape{1, M, c.V},
                                   mx::Shape{scratch}};
  std::vector<mx::Dtype> types = {c.dtype, mx::float32};
  if (timed) {
    shapes.push_back(mx::Shape{2 + 3 * (split ? 4 : 5) * c.L, blocks});   // barriers per layer
    types.push_back(mx::uint32);
  }
  auto out = it->second(
      in, shapes, types,
      {blocks * 256, 1, 1}, {256, 1, 1},
      {{"T", c.dtype}, {"BITS", c.bits}, {"GS", c.bits ? c.group_size : 0}, {"EBITS", c.ebits},
       {"EGS", c.ebits ? c.egs : 0}, {"D", c.D},
       {"NQ", c.NQ}, {"NKV", c.NKV}, {"HD", c.HD}, {"FF", c.FF}, {"V", c.V}, {"NL", c.L},
       {"QKV_BIAS", c.qkv_bias}, {"QK_NORM", c.qk_norm}, {"EPS_BITS", bits_of(c.eps)},
       {"QK_EPS_BITS", bits_of(c.qk_eps)}, {"SCALE_BITS", bits_of(c.scale)}, {"M", M},
       {"SLICE", slice}, {"GEMMA", c.gemma}, {"ESCALE_BITS", bits_of(c.embed_scale)}},
      std::nullopt, false, {});
  std::vector<mx::array> bufs(kbuf);
  bufs.insert(bufs.end(), vbuf.begin(), vbuf.end());
  bufs = mx::depends(bufs, {out[0]});
  for (size_t l = 0; l < kbuf.size(); ++l) {
    kbuf[l] = bufs[l];
    vbuf[l] = bufs[kbuf.size() + l];
  }
  st.last = out[0];
  st.has_last = true;
  if (timed) st.timing = out[2];
  if (prev)
    *prev = out[0];
  else
    prev = new mx::array(out[0]);
  return out[0];
}

// One decode step: logits [1, 1, V] for token tok (int32, 1 element) at
// position pos; writes k/v of every layer at pos into kbuf/vbuf ([1, NKV,
// cap, HD] each, cap > pos).  tok of M > 1 elements: positions pos .. pos +
// M - 1 of the sequence, logits [1, M, V].  With rpos (int32 [M], each batch
// row's rotary position): tok holds one token for each of the M rows of a
// batch whose caches ([M, NKV, cap, HD]) take them in slot pos, each row
// attending from slot pos - rpos[row] (its left padding's end); logits [M, 1,
// V]; a batch of more rows than one launch takes (step_max_rows) runs as
// launches of consecutive rows.  On return kbuf/vbuf hold the same buffers as arrays that depend on the
// kernel (mx::depends): a cache is written by the kernel, so evaluating the
// cache alone (as a draft model's catch-up does) must run it.  c passed
// step_config_problem when the model was planned (base.pyx), once, not per
// token.
inline mx::array step_decode(const StepConfig& c, const std::vector<StepPtr>& entries,
                             StepState& st, const mx::array& tok, std::vector<mx::array>& kbuf,
                             std::vector<mx::array>& vbuf, int pos,
                             const mx::array* rpos = nullptr) {
  const int M = static_cast<int>(tok.size());   // positions pos .. pos + M - 1, or rows
  const bool rows = rpos != nullptr;
  if (M < 1 || M > (rows ? step_max_batch(c) : step_max_positions(c)) || (rows && M < 2))
    throw std::invalid_argument("decode step kernel: number of positions");
  if (entries.size() != static_cast<size_t>(c.L * kStepPerLayer + kStepGlobal) ||
      kbuf.size() != static_cast<size_t>(c.L) || vbuf.size() != kbuf.size())
    throw std::invalid_argument("decode step kernel: table or cache size");
  if (rows && (static_cast<int>(rpos->size()) != M || rpos->dtype() != mx::int32 ||
               kbuf[0].shape(0) != M))
    throw std::invalid_argument("decode step kernel: batch rows");
  int cap = 0;                                  // the largest layer's (scratch for attention)
  for (auto& k : kbuf) cap = std::max(cap, k.shape(2));
  // weights first evaluated (a no-op once they are)
  std::vector<mx::array> pending;
  for (auto& e : entries)
    if (e.a && e.a->status() == mx::array::Status::unscheduled) pending.push_back(*e.a);
  if (!pending.empty()) mx::eval(pending);
  std::vector<uint64_t> table(entries.size(), 0);
  for (size_t i = 0; i < entries.size(); ++i)
    if (const mx::array* a = entries[i].a) {
      if (!a->flags().row_contiguous)
        throw std::invalid_argument("decode step kernel: a weight is not row-contiguous");
      size_t row = a->ndim() >= 2 ? static_cast<size_t>(a->strides()[0]) : 1;
      table[i] = step_address(*a) + entries[i].row0 * row * a->itemsize();
    } else {
      table[i] = static_cast<uint64_t>(entries[i].value);
    }
  for (int l = 0; l < c.L; ++l)   // each layer's cache capacity (sliding layers' rings differ)
    table[static_cast<size_t>(l + 1) * kStepPerLayer - 3] = kbuf[l].shape(2);
  if (table != st.host) {
    st.table = mx::copy(mx::array(reinterpret_cast<const uint64_t*>(table.data()),
                                  {static_cast<int>(table.size())}, mx::uint64));
    st.host = std::move(table);
  }

  const int launches = rows ? (M + step_max_rows(c) - 1) / step_max_rows(c) : 1;
  if (launches == 1) return step_launch(c, st, tok, kbuf, vbuf, pos, cap, rpos, 0, false);
  const mx::array t = mx::reshape(tok, {M});
  std::vector<mx::array> logits;
  for (int i = 0, r0 = 0; i < launches; ++i) {   // rows shared out evenly
    const int n = (M - r0) / (launches - i);
    const mx::array rp = mx::slice(*rpos, {r0}, {r0 + n});
    logits.push_back(step_launch(c, st, mx::slice(t, {r0}, {r0 + n}), kbuf, vbuf, pos, cap, &rp,
                                 r0, true));
    r0 += n;
  }
  return mx::concatenate(logits, 0);
}

}  // namespace mlxcy
