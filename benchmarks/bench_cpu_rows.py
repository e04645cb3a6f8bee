"""mlxcy's CPU int16 products of several rows of x (a speculative step's
verification, a small batch: include/mlxcy/cpu_quant_rows.h) against one row:
milliseconds per product and the cost of each row after the first, under
AVX2 and (where the CPU has it) AVX-512 VNNI.

    python benchmarks/bench_cpu_rows.py [--shape 65536x2048] [--bits 4] [--reps 25]

The default shape holds 84 MB of 4-bit weights (more than the caches), so one
row of x reads the weights from memory; SmolLM2-135M's layers are 576 wide.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the working tree's mlxcy

ROWS = (1, 2, 3, 4, 5, 8, 9, 12, 16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="65536x2048", help="N x K of the weight")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 5, 8))
    ap.add_argument("--reps", type=int, default=25)
    a = ap.parse_args()
    import mlxcy
    from mlxcy import cpu_kernels as ck, nn
    from mlxcy.transforms import eval as mxeval
    N, K = (int(v) for v in a.shape.split("x"))
    rng = np.random.default_rng(0)
    w = mlxcy.array(rng.standard_normal((N, K)).astype(np.float32) * 0.05)
    wq, s, b = nn.quantize(w, 32, a.bits)
    s, b = s.astype(mlxcy.float16), b.astype(mlxcy.float16)     # as GGUF files load them
    mxeval(wq, s, b)
    xs = {m: mlxcy.array(rng.standard_normal((m, K)).astype(np.float32)) for m in ROWS}
    isas = ["avx2"] + (["avx512vnni"] if ck.has_vnni() else [])
    print(f"# {a.bits}-bit {N} x {K}, group 32, float16 scales, {ck.num_threads()} threads, "
          f"medians of {a.reps}; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| isa | " + " | ".join(f"{m} rows ms" for m in ROWS) + " | each row after the first |")
    print("|---|" + "---:|" * (len(ROWS) + 1))
    for isa in isas:
        ck.set_isa(isa)
        ms = {}
        for m in ROWS:
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                mxeval(ck.linear(xs[m], wq, s, b, 32, a.bits))
                ts.append(time.perf_counter() - t)
            ms[m] = statistics.median(ts) * 1e3
        extra = (ms[8] - ms[1]) / 7 / ms[1]
        print(f"| {ck.isa()} | " + " | ".join(f"{ms[m]:.2f}" for m in ROWS) +
              f" | {extra:.2f} of one row |")
    ck.set_isa("avx512vnni")


if __name__ == "__main__":
    main()
