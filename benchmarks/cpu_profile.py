"""Where a CPU decode step's time goes, with and without mlxcy's CPU kernels.

For the real SmolLM2-135M Q4_1 GGUF (or --gguf PATH): the model decodes
--tokens tokens after a --prompt-token prompt (median of --rounds runs), once
with MLX's own ops for the linear layers (`mlx`: mlxcy.cpu_kernels.set_enabled(False),
dequantize + MLX's GEMM, the path before the kernels), with the kernels for
the products and attention but the rest of each block as MLX ops (`kernels`:
set_block_fusion(False)), and with the block primitives (`blocks`: a block's
one-token step as two primitives, the default).  A decode step is then split by timing each linear layer of block 0
at one position (x [1, 1, in]; the number of blocks of such products built
as one graph and evaluated once, median of many), and the output head (same shape
and bits as the model's, random values); the rest of the step is everything
else (norms, RoPE, attention over the cache, residual adds, the host's graph
building and MLX's per-op overhead).

    python benchmarks/cpu_profile.py [--gguf PATH] [--prompt 128] [--tokens 64]
        [--threads N] [--modes mlx,kernels,blocks]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def time_op(fn, reps):
    """Median seconds to build and evaluate fn()'s list of arrays as one graph."""
    from mlxcy import transforms
    transforms.eval(*fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        transforms.eval(*fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _linear(rows, cols, quant, dtype, seed):
    import mlxcy
    from mlxcy import nn
    w = mlxcy.array(np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32))
    if quant:
        wq, s, b = nn.quantize(w, quant["group_size"], quant["bits"])
        return nn.Linear(wq, scales=s.astype(dtype), biases=b.astype(dtype),
                         group_size=quant["group_size"], bits=quant["bits"])
    return nn.Linear(w.astype(dtype))


def layer_split(tm, reps):
    """Seconds per token of the linear layers, by group, at one position: layers
    of the model's shapes, bits and group size (random values)."""
    import mlxcy
    model = tm.model
    c = model.config
    info = model.info()
    q = info["quantization"]
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    attn = [(c.num_attention_heads * D, H), (c.num_key_value_heads * D, H),
            (c.num_key_value_heads * D, H), (H, c.num_attention_heads * D)]
    mlp = [(I, H), (I, H), (H, I)]
    groups = {}
    for name, shapes in (("attention projections", attn), ("MLP projections", mlp)):
        t = 0.0
        for i, (rows, cols) in enumerate(shapes):
            layer = _linear(rows, cols, q, model.dtype, i)
            x = mlxcy.array(np.ones((1, 1, cols), np.float32)).astype(model.dtype)
            # the model's L products of this shape in one graph, as in a step:
            # one eval per product would add a host round trip to each
            t += time_op(lambda: [layer(x) for _ in range(c.num_hidden_layers)], reps)
            layer.free()
        groups[name] = t
    # the SmolLM2 GGUF's tied head is Q8_0 (8 bits, groups of 32)
    head = _linear(c.vocab_size, H, {"bits": 8, "group_size": 32} if q else None, model.dtype, 9)
    x = mlxcy.array(np.ones((1, 1, H), np.float32)).astype(model.dtype)
    groups["output head"] = time_op(lambda: [head(x)], max(3, reps // 10))
    head.free()
    return groups


def engine_speed(tm, prompt, tokens, rounds):
    pre, dec = [], []
    for _ in range(rounds):
        for _t in tm.stream_ids(prompt, max_tokens=tokens):
            pass
        m = tm.metrics()
        pre.append(m.prefill_tokens_per_second)
        dec.append(m.decode_tokens_per_second)
    return statistics.median(pre), statistics.median(dec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default="mlx,kernels,blocks")
    ap.add_argument("--fuse", action="store_true", help="fuse q/k/v and gate/up")
    a = ap.parse_args()

    import mlxcy
    from mlxcy import assets, cpu_kernels
    from mlxcy.generation.inference import MlxTextModel
    mlxcy.set_default_device(mlxcy.cpu)
    if a.threads:
        cpu_kernels.set_num_threads(a.threads)
    path = a.gguf or str(assets.smollm2_gguf())
    tm = MlxTextModel(path, fuse=a.fuse or None)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, tm.model.config.vocab_size - 100, a.prompt)]
    cols = {}
    for mode in a.modes.split(","):
        cpu_kernels.set_enabled(mode != "mlx")
        cpu_kernels.set_block_fusion(mode == "blocks")
        tokens = a.tokens if mode != "mlx" else min(a.tokens, 16)
        pre, dec = engine_speed(tm, prompt, tokens, a.rounds)
        g = layer_split(tm, a.reps if mode != "mlx" else 5)
        step = 1.0 / dec
        g["everything else (norms, RoPE, attention, adds, host)"] = step - sum(g.values())
        g["decode step"] = step
        cols[mode] = (g, pre, dec)
    print(f"# {Path(path).name}: prompt {a.prompt}, decode {a.tokens} tokens, "
          f"{cpu_kernels.num_threads()} threads, isa {cpu_kernels.isa()}, "
          f"fuse {'on' if a.fuse else 'the default (on with the kernels enabled at load)'}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")
    names = list(next(iter(cols.values()))[0])
    print("| part of a decode step | " + " | ".join(f"{m} (ms)" for m in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for n in names:
        print(f"| {n} | " + " | ".join(f"{cols[m][0][n] * 1e3:.2f}" for m in cols) + " |")
    print("| decode tok/s | " + " | ".join(f"{cols[m][2]:.1f}" for m in cols) + " |")
    print("| prefill tok/s | " + " | ".join(f"{cols[m][1]:.1f}" for m in cols) + " |")
    tm.close()


if __name__ == "__main__":
    main()
