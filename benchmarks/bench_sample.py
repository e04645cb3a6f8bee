"""Sampler timings over one row of 32,000 logits, evaluation included.

mlxcy.generation.sample.Sampler side by side with mlx-lm's samplers
(mlx_lm.sample_utils.make_sampler / make_logits_processors) in the same
process. Prints a table of microseconds per call (median of N calls).

    python benchmarks/bench_sample.py [--vocab 32000] [--iters 300] [--batch 1]

Columns: mlxcy's Sampler on logits (processors included); mlx-lm's sampler
alone on precomputed log-probabilities (its API: "mlx-lm sampler", with its
logits processors when the row has penalties); and mlx-lm's per-step work as
its generate loop does it ("mlx-lm step": processors, logits - logsumexp,
sampler).
"""
import argparse
import statistics
import time

import numpy as np

import mlxcy
from mlxcy.generation.sample import Sampler

try:
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors, make_sampler
except ImportError:  # mlx-lm not installed: mlxcy column only
    mx = None

CASES = [
    ("greedy", dict(temperature=0.0), {}),
    ("top-k 50", dict(temperature=1.0, top_k=50), {}),
    ("top-p 0.9", dict(temperature=1.0, top_p=0.9), {}),
    ("min-p 0.05", dict(temperature=1.0, min_p=0.05), {}),
    ("all combined (T 0.8, top-k 50, top-p 0.9, min-p 0.05)",
     dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05), {}),
    ("greedy + rep/presence/freq penalties (64-token history)",
     dict(temperature=0.0),
     dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3)),
    ("all combined + penalties",
     dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
     dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.3)),
]


def timeit(fn, iters, warmup=20):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    logits_np = (rng.standard_normal((args.batch, args.vocab)) * 3).astype(np.float32)
    hist_np = rng.integers(0, args.vocab, size=64).astype(np.int32)

    x = mlxcy.array(logits_np).eval()
    h = mlxcy.array(hist_np).eval()
    if mx is not None:
        mx.set_default_device(mx.cpu)
        mx.random.seed(0)
        mx_x = mx.array(logits_np)
        mx_h = mx.array(hist_np)
        mx.eval(mx_x, mx_h)

    rows = []
    for name, cfg, pen in CASES:
        s = Sampler(seed=0, **cfg, **pen)
        hist = h if pen else None

        def run_ours():
            s(x, hist).eval()
        ours = timeit(run_ours, args.iters)

        theirs = step = float("nan")
        if mx is not None:
            sampler = make_sampler(temp=cfg.get("temperature", 0.0),
                                   top_k=cfg.get("top_k", 0),
                                   top_p=cfg.get("top_p", 0.0),
                                   min_p=cfg.get("min_p", 0.0))
            procs = make_logits_processors(**pen) if pen else []
            mx_lp = mx_x - mx.logsumexp(mx_x, axis=-1, keepdims=True)
            mx.eval(mx_lp)

            def run_sampler():
                lp = mx_lp
                for p in procs:
                    lp = p(mx_h, lp)
                mx.eval(sampler(lp))

            def run_step():
                logits = mx_x
                for p in procs:
                    logits = p(mx_h, logits)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                mx.eval(sampler(logprobs))
            theirs = timeit(run_sampler, args.iters)
            step = timeit(run_step, args.iters)
        rows.append((name, ours, theirs, step))

    print(f"vocab {args.vocab}, batch {args.batch}, median of {args.iters} calls, "
          f"eval included (us per call)")
    w = max(len(r[0]) for r in rows)
    print(f"| {'sampler':<{w}} | mlxcy | mlx-lm sampler | mlx-lm step |")
    print(f"|{'-' * (w + 2)}|------:|---------------:|------------:|")
    for name, ours, theirs, step in rows:
        print(f"| {name:<{w}} | {ours:5.0f} | {theirs:14.0f} | {step:11.0f} |")

if __name__ == "__main__":
    main()
