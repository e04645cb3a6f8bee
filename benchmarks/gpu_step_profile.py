"""Where a GPU decode step's time goes, with the one-kernel step on and off.

For each model (random weights of the real shapes, bench_decode's checkpoints)
the generation engine decodes 128 tokens after a 512-token prompt; printed per
step: wall time, the host's graph building (build), its wait for the device
(wait), and, under torch.profiler (which records every CUDA kernel of the
process), the device time of the kernels a step launches: the one-kernel
step's kernel alone and all kernels together.

    python benchmarks/gpu_step_profile.py --models smollm2-135m,llama-3.2-1b --quant bf16
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import random_hf_dir, variant_dir


def run(model, prompt, n, on):
    from mlxcy.generation.engine import Engine
    from mlxcy.generation.sample import Sampler
    from mlxcy.models.base import set_gpu_decode_step
    old = set_gpu_decode_step(on)
    try:
        eng = Engine(model, max_batch=1)
        eng.add(prompt, sampler=Sampler(temperature=0.0), max_tokens=n)
        while eng.has_work():
            eng.step()
        return dict(eng.stats)
    finally:
        set_gpu_decode_step(old)


def profile(model, prompt, n, on):
    """Median device us per step of the step kernel and of all kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        run(model, prompt, n, on)
    times = collections.defaultdict(list)
    for ev in prof.events():
        if "CUDA" in str(getattr(ev, "device_type", "")):
            times[ev.name].append(getattr(ev, "device_time_total", 0.0))
    step = [t for k, v in times.items() if "decode_step" in k for t in v]
    total = sum(sum(v) for v in times.values())
    return (statistics.median(step) if step else 0.0), total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-3.2-1b")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--gen", type=int, default=128)
    a = ap.parse_args()
    import numpy as np

    from mlxcy.assets import cache_dir
    from mlxcy.models.load import load_model
    print("| model | step | tok/s | build us/step | wait us/step | kernel us | all kernels us/step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in a.models.split(","):
        for q in a.quant.split(","):
            m = load_model(variant_dir(random_hf_dir(name, cache_dir() / "bench"), q))
            m.fuse()
            prompt = np.random.default_rng(0).integers(100, 30000, 512).tolist()
            for on in (True, False):
                run(m, prompt, 8, on)                      # warm-up: kernels compiled
                st = run(m, prompt, a.gen, on)
                steps = max(st["decode_steps"], 1)
                kern, total = profile(m, prompt, a.gen, on)
                print(f"| {name} {q} | {'one kernel' if on else 'ops'} | "
                      f"{st['decode_tokens'] / st['decode_seconds']:.1f} | "
                      f"{st['build_seconds'] / steps * 1e6:.0f} | "
                      f"{st['wait_seconds'] / steps * 1e6:.0f} | {kern:.0f} | "
                      f"{total / (a.gen + 1):.0f} |", flush=True)
            m.close()


if __name__ == "__main__":
    main()
