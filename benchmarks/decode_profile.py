"""Where a decode step's time goes: mlxcy vs mlx-lm, same weights.

For each engine, after a prompt, N greedy decode steps are timed and each
step's host time is split three ways:
  build  -- building the step's lazy graph (forward over the KV cache + argmax)
  queue  -- mx.async_eval of it: on a GPU, MLX encodes every kernel of the step
            into CUDA graphs on the calling thread here
  wait   -- reading the previous token back (the host idle, the device busy)
If build + queue fill the step, decode is bound by the host; if wait does, by
the device.  mlxcy's split comes from its own token loop (the engine's
build/queue/wait_seconds); mlx-lm's from a loop written like its
generate_step (same stream use, the next step queued before the token is read).

With torch and a CUDA device (--kernels), each engine's steps are also run
under torch.profiler: the CUDA kernels per step (count and device time), and
the most frequent kernels by name.

    python benchmarks/decode_profile.py [--models smollm2-135m,qwen3-0.6b] [--quant bf16,4bit]
        [--prompt 512] [--steps 128] [--kernels]
"""
import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_decode as B  # noqa: E402


def mlxcy_split(engine, prompt, steps):
    from mlxcy.generation.engine import Engine
    eng = Engine(engine.model, max_batch=1)
    eng.add(prompt, sampler=engine.sampler, max_tokens=steps + 1)
    while not eng.stats["decode_tokens"] and eng.has_work():
        eng.step()                 # prefill, up to the first token
    st0 = dict(eng.stats)
    t0 = time.perf_counter()     # the prompt is evaluated: the steps from here
    while eng.has_work():
        eng.step()
    wall = time.perf_counter() - t0
    n = eng.stats["decode_tokens"] - st0["decode_tokens"]
    out = {"wall": wall / n}
    for k in ("build", "queue", "wait"):
        out[k] = (eng.stats[k + "_seconds"] - st0[k + "_seconds"]) / n
    eng.close()
    return out


class MlxLmLoop:
    """mlx-lm's model stepped like its generate_step, with host timers."""

    def __init__(self, engine):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache
        self.mx, self.model = mx, engine.model
        self.stream = mx.new_stream(mx.default_device())
        self.make_cache = make_prompt_cache

    def run(self, prompt, steps):
        mx = self.mx
        cache = self.make_cache(self.model)
        build = queue = wait = 0.0

        def step(y):
            with mx.stream(self.stream):
                logits = self.model(y[None], cache=cache)[:, -1, :]
                return mx.argmax(logits, axis=-1)

        y = step(mx.array(prompt))
        mx.eval(y)
        y = step(y)
        mx.async_eval(y)
        t_start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            nxt = step(y)
            t1 = time.perf_counter()
            mx.async_eval(nxt)
            t2 = time.perf_counter()
            y.item()
            t3 = time.perf_counter()
            build += t1 - t0
            queue += t2 - t1
            wait += t3 - t2
            y = nxt
        wall = time.perf_counter() - t_start
        y.item()
        return {"wall": wall / steps, "build": build / steps, "queue": queue / steps,
                "wait": wait / steps}


def _kernels(run):
    """CUDA kernels (name counts) and their device time under torch.profiler,
    which records every kernel in the process, MLX's included."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
    names = collections.Counter()
    device_us = 0.0
    for ev in prof.events():
        if "CUDA" in str(getattr(ev, "device_type", "")):
            names[ev.name] += 1
            device_us += getattr(ev, "device_time_total", 0.0)
    return names, device_us


def kernel_profile(run, steps):
    """CUDA kernels per decode step: run(n) decodes n tokens after the prompt;
    profiling run(steps) and run(2 * steps) and taking the difference leaves
    the prompt out.  Returns (kernels/step, device us/step, Counter/step)."""
    n1, d1 = _kernels(lambda: run(steps))
    n2, d2 = _kernels(lambda: run(2 * steps))
    per = collections.Counter({k: (n2[k] - n1[k]) / steps for k in n2})
    return sum(per.values()), (d2 - d1) / steps, per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,qwen3-0.6b")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernels", action="store_true", help="torch.profiler kernel counts")
    a = ap.parse_args()
    from mlxcy.assets import cache_dir
    root = cache_dir() / "bench"
    rows = []
    for name in a.models.split(","):
        src = B.random_hf_dir(name, root)
        for q in a.quant.split(","):
            path = B.variant_dir(src, q)
            vocab = B.SHAPES[name]["vocab_size"]
            prompt = np.random.default_rng(0).integers(100, vocab - 1, a.prompt).tolist()
            ours, theirs = B.MlxcyEngine(path), B.MlxLmEngine(path)
            lm = MlxLmLoop(theirs)
            mlxcy_split(ours, prompt, 8)          # warm-up: kernels built
            lm.run(prompt, 8)
            res = {"mlxcy": [], "mlx-lm": []}
            for _ in range(a.rounds):              # take turns
                res["mlxcy"].append(mlxcy_split(ours, prompt, a.steps))
                res["mlx-lm"].append(lm.run(prompt, a.steps))
            for eng, rs in res.items():
                med = {k: statistics.median(r[k] for r in rs) * 1e6 for k in rs[0]}
                row = {"model": f"{name} {q}", "engine": eng, **med}
                if a.kernels:
                    if eng == "mlxcy":
                        kc = kernel_profile(lambda n: mlxcy_split(ours, prompt, n), 32)
                    else:
                        kc = kernel_profile(lambda n: lm.run(prompt, n), 32)
                    row["kernels"], row["device_us"], row["names"] = kc
                rows.append(row)
                print(f"# {row['model']} {eng}: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in med.items()), file=sys.stderr, flush=True)
            ours.close()
            theirs.close()
    print("| model | engine | us/token | build | queue (encode) | wait | kernels/token "
          "| device us/token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        k = f"{r['kernels']:.0f} | {r['device_us']:.0f}" if "kernels" in r else "– | –"
        print(f"| {r['model']} | {r['engine']} | {r['wall']:.0f} | {r['build']:.0f} | "
              f"{r['queue']:.0f} | {r['wait']:.0f} | {k} |")
    if a.kernels:
        for r in rows:
            print(f"\n{r['model']} {r['engine']}: kernels per decode step, by name")
            for nm, c in r["names"].most_common(16):
                print(f"  {c:7.1f}  {nm[:110]}")


if __name__ == "__main__":
    main()
