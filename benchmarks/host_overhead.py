"""Host time to build one decode step's graph: mlxcy vs mlx-lm, same weights.

On a GPU, decode of small models is bound by host work (building the graph,
then encoding its kernels); this measures the first part alone, which does not
depend on the device: each step's graph (forward over the KV cache + greedy
argmax) is built and timed, then evaluated untimed.  mlxcy runs through its
Python-level Model.__call__ (one Python call and an id conversion more than its
token loop), with q/k/v and gate/up fused as on a GPU.

On the CPU, MLX's fast ops (rms_norm, rope, sdpa) have no CPU kernel and are
built as their fallback compositions of elementwise ops, which a GPU does not
do; so on the CPU this measures a larger graph than a GPU builds, for both
engines alike.

    python benchmarks/host_overhead.py [--models smollm2-135m,qwen3-0.6b] [--steps 40]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_decode as B  # noqa: E402


def mlxcy_build_times(path, prompt, steps):
    import numpy as np
    from mlxcy import ops
    from mlxcy.models.load import load_model
    from mlxcy.transforms import eval as ev
    model = load_model(path).fuse()
    cache = model.make_cache()
    logits = model(np.array([prompt], np.int32), cache)
    tok = ops.argmax(logits[0, -1], axis=-1)
    ev(tok)
    times = []
    for _ in range(steps):
        ids = np.array([[int(tok.item())]], np.int32)
        t0 = time.perf_counter()
        logits = model(ids, cache)
        tok = ops.argmax(logits[0, -1], axis=-1)
        times.append(time.perf_counter() - t0)
        ev(tok)
    cache.free()
    model.close()
    return times


def mlx_lm_build_times(path, prompt, steps):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model
    model, _ = load_model(Path(path))
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt]), cache=cache)
    tok = mx.argmax(logits[0, -1], axis=-1)
    mx.eval(tok)
    times = []
    for _ in range(steps):
        ids = mx.array([[tok.item()]])
        t0 = time.perf_counter()
        logits = model(ids, cache=cache)
        tok = mx.argmax(logits[0, -1], axis=-1)
        times.append(time.perf_counter() - t0)
        mx.eval(tok)
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen3-0.6b")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt", type=int, default=32)
    a = ap.parse_args()
    import numpy as np
    from mlxcy.assets import cache_dir
    root = cache_dir() / "bench"
    print("| model | layers | mlxcy build us/step | mlx-lm build us/step | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in a.models.split(","):
        src = B.random_hf_dir(name, root)
        for q in a.quant.split(","):
            path = B.variant_dir(src, q)
            prompt = np.random.default_rng(0).integers(100, 1000, a.prompt).tolist()
            ours = statistics.median(mlxcy_build_times(path, prompt, a.steps)[5:]) * 1e6
            theirs = statistics.median(mlx_lm_build_times(path, prompt, a.steps)[5:]) * 1e6
            print(f"| {name} {q} | {B.SHAPES[name]['num_hidden_layers']} | {ours:.0f} | "
                  f"{theirs:.0f} | {ours / theirs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
