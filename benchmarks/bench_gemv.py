"""mlxcy's decode GEMV kernel (mlxcy.fast.gemv, include/mlxcy/gpu_gemv.h) next to
MLX's own product (matmul / quantized_matmul, what the unfused decode step runs),
on the weight shapes of real models.  CUDA GPU only.

    python benchmarks/bench_gemv.py [--rows 1,8,16] [--reps 200]

Per shape, dtype and row count it prints:
- device us: the kernel's median device time under torch.profiler (which records
  every kernel of the process, MLX's included);
- GB/s: bytes the kernel must move (weight, scales and biases, x and y) / that time,
  and its share of the H200's 4.8 TB/s;
- host us: wall time to build and encode one op (reps ops queued with
  async_eval, divided by reps; the device runs behind).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the working tree's mlxcy

PEAK = 4.8e12
SHAPES = {   # name: (N, K)  -- out, in features
    "llama1b qkv": (3072, 2048), "llama1b o": (2048, 2048),
    "llama1b gate_up": (16384, 2048), "llama1b down": (2048, 8192),
    "qwen3-0.6b qkv": (4096, 1024), "qwen3-0.6b down": (1024, 3072),
    "smollm2 qkv": (960, 576), "smollm2 gate_up": (3072, 576),
    "llama1b head": (128256, 2048),
}


def make(name, kind, rows, mx, ops):
    n, k = SHAPES[name]
    rng = np.random.default_rng(0)
    w = mx.array((rng.standard_normal((n, k)) * 0.02).astype(np.float32)).astype(mx.bfloat16)
    x = mx.array(rng.standard_normal((rows, 1, k)).astype(np.float32)).astype(mx.bfloat16)
    if kind == "bf16":
        lay = dict(w=w)
        nbytes = n * k * 2
    else:
        bits = 4 if kind == "q4" else 8
        q, s, b = ops.quantize(w, group_size=64, bits=bits)
        lay = dict(w=q, scales=s, biases=b, bits=bits, group_size=64)
        nbytes = n * k * bits // 8 + 2 * n * (k // 64) * 2
    mx.eval(*[v for v in lay.values() if not isinstance(v, int)], x)
    nbytes += rows * (k + n) * 2
    return x, lay, nbytes


def ours(x, lay, fast):
    kw = {a: lay[a] for a in ("scales", "biases", "bits", "group_size") if a in lay}
    return fast.gemv(x, lay["w"], **kw)


def theirs(x, lay, ops):
    if "bits" in lay:
        return ops.quantized_matmul(x, lay["w"], lay["scales"], lay["biases"], transpose=True,
                                    group_size=lay["group_size"], bits=lay["bits"])
    return ops.matmul(x, ops.transpose(lay["w"]))


def device_us(fn, reps, mx):
    """Median device time (us) of the kernels fn() launches, by kernel name."""
    from torch.profiler import ProfilerActivity, profile
    mx.eval(fn())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            mx.eval(fn())
    times = collections.defaultdict(list)
    for ev in prof.events():
        if "CUDA" in str(getattr(ev, "device_type", "")):
            times[ev.name].append(getattr(ev, "device_time_total", 0.0))
    # the product's kernels: those launched once per rep (copies etc. included)
    total = sum(statistics.median(v) for k, v in times.items() if len(v) >= reps)
    names = [k for k, v in times.items() if len(v) >= reps]
    return total, names


def host_us(fn, reps, mx):
    mx.eval(fn())
    t0 = time.perf_counter()
    outs = [fn() for _ in range(reps)]
    t1 = time.perf_counter()
    mx.async_eval(*outs)
    t2 = time.perf_counter()
    mx.eval(*outs)
    return (t1 - t0) / reps * 1e6, (t2 - t1) / reps * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--kinds", default="bf16,q4,q8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=100)
    a = ap.parse_args()
    import mlxcy as mx
    from mlxcy import fast, ops
    print("| shape | weights | rows | ours device us | GB/s | % of 4.8 TB/s | MLX device us "
          "| MLX GB/s | ours host build+encode us | MLX host build+encode us |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in a.shapes.split(","):
        for kind in a.kinds.split(","):
            for rows in map(int, a.rows.split(",")):
                x, lay, nbytes = make(name, kind, rows, mx, ops)
                d_o, _ = device_us(lambda: ours(x, lay, fast), a.reps, mx)
                d_m, mnames = device_us(lambda: theirs(x, lay, ops), a.reps, mx)
                hb_o, he_o = host_us(lambda: ours(x, lay, fast), a.reps, mx)
                hb_m, he_m = host_us(lambda: theirs(x, lay, ops), a.reps, mx)
                bw_o, bw_m = nbytes / (d_o * 1e-6), nbytes / (d_m * 1e-6)
                print(f"| {name} | {kind} | {rows} | {d_o:.1f} | {bw_o / 1e9:.0f} | "
                      f"{100 * bw_o / PEAK:.0f}% | {d_m:.1f} | {bw_m / 1e9:.0f} | "
                      f"{hb_o:.1f}+{he_o:.1f} | {hb_m:.1f}+{he_m:.1f} |", flush=True)


if __name__ == "__main__":
    main()
