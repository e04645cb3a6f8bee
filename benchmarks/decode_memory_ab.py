"""Where does mlxcy's decode peak memory go?  A/B of the prefill and fusion
options against mlx-lm on one model, in one process.

    python benchmarks/decode_memory_ab.py [--model smollm2-135m] [--quant bf16]

For each variant: the transient peak (above the memory held before the run)
during the prefill (up to the first token) and over the whole run (512-token
prompt, 128 tokens), and decode tok/s.  Shapes and engines: bench_decode.py.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as B  # noqa: E402

import numpy as np  # noqa: E402


def peaks(engine_once, prompt, n):
    """(prefill peak MB, whole-run peak MB, decode tok/s) above the memory
    held before the run."""
    from mlxcy import memory
    memory.clear_cache()
    before = memory.get_active_memory()
    memory.reset_peak_memory()
    first_peak = []
    t = engine_once(prompt, n, lambda: first_peak.append(memory.get_peak_memory()))
    total = memory.get_peak_memory()
    return ((first_peak[0] - before) / 2**20, (total - before) / 2**20, t)


def mlxcy_once(engine, chunk, split):
    from mlxcy.generation import engine as G
    from mlxcy import tuning

    def once(prompt, n, mark):
        with tuning.override(prefill_split=split):
            it = G.generate_ids(engine.model, prompt, prefill_chunk=chunk,
                                sampler=engine.sampler, max_tokens=n)
            next(it)
            mark()
            t0 = time.perf_counter()
            k = sum(1 for _ in it)
            dt = time.perf_counter() - t0
        return k / dt
    return once


def mlx_lm_once(engine):
    from mlx_lm.generate import generate_step
    mx = engine.mx

    def once(prompt, n, mark):
        gen = generate_step(mx.array(prompt), engine.model, max_tokens=n,
                            sampler=lambda lp: mx.argmax(lp, axis=-1))
        next(gen)
        mark()
        t0 = time.perf_counter()
        k = sum(1 for _ in gen)
        return k / (time.perf_counter() - t0)
    return once


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    a = ap.parse_args()
    from mlxcy.assets import cache_dir
    src = B.random_hf_dir(a.model, cache_dir() / "bench")
    path = B.variant_dir(src, a.quant)
    prompt = np.random.default_rng(0).integers(100, B.SHAPES[a.model]["vocab_size"] - 1,
                                               a.prompt).tolist()
    rows = []
    lm = B.MlxLmEngine(path)
    variants = [("mlx-lm", mlx_lm_once(lm))]
    engines = [lm]
    for fuse in (True, False):
        e = B.MlxcyEngine(path, fuse)
        engines.append(e)
        for chunk in (512, 128):
            for split in (False, True):
                variants.append((f"mlxcy fuse={int(fuse)} chunk={chunk} split={int(split)}",
                                 mlxcy_once(e, chunk, split)))
    for name, once in variants:
        once(prompt, 8, lambda: None)          # warm-up
        rows.append((name, *peaks(once, prompt, a.gen)))
    for e in engines:
        e.close()
    print(f"{a.model} {a.quant}: transient peak above resident weights, MB")
    print(f"{'variant':40} {'prefill':>9} {'run':>9} {'decode tok/s':>13}")
    for name, p1, p2, t in rows:
        print(f"{name:40} {p1:9.1f} {p2:9.1f} {t:13.1f}")


if __name__ == "__main__":
    main()
