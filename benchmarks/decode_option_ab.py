"""A/B of one mlxcy tuning option (mlxcy.tuning) against the defaults, with
mlx-lm alongside, in one process, the three taking turns each round: on a
host whose speed drifts between runs, only turns within one run compare fairly.

    python benchmarks/decode_option_ab.py --option cache_pad=0 [--models smollm2-135m,...]
                                          [--quant bf16,4bit] [--rounds 5]

Prints median decode and prefill tok/s and peak MB per variant, and the
ratios to mlx-lm.  Shapes, engines and measurement: bench_decode.py.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as B  # noqa: E402

import numpy as np  # noqa: E402


class WithOptions:
    """An mlxcy engine run under mlxcy.tuning.override(**options)."""

    def __init__(self, engine, options):
        self.engine, self.options = engine, options
        self.weight_bytes = engine.weight_bytes

    def once(self, prompt, n):
        from mlxcy import tuning
        with tuning.override(**self.options):
            return self.engine.once(prompt, n)


def parse_option(text):
    """'cache_pad=0' -> {'cache_pad': 0}; values are Python literals
    (True, False, None, numbers)."""
    import ast
    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--option: expected NAME=VALUE, got {text!r}")
    return {name.strip(): ast.literal_eval(value.strip())}


def run(label, path, vocab, option, prompt_len, n, rounds):
    prompt = np.random.default_rng(0).integers(100, vocab - 1, prompt_len).tolist()
    ours = B.MlxcyEngine(path)
    lm = B.MlxLmEngine(path)
    (name, value), = option.items()
    variants = {f"{name}={value!r}": WithOptions(ours, option),
                "defaults": WithOptions(ours, {}), "mlx-lm": lm}
    try:
        for e in variants.values():
            e.once(prompt, 8)
        runs = {k: [] for k in variants}
        for _ in range(rounds):
            for k, e in variants.items():
                runs[k].append(B.measure(e, prompt, n)[0])
    finally:
        ours.close()
        lm.close()
    med = {k: {m: statistics.median(r[m] for r in rs) for m in rs[0]} for k, rs in runs.items()}
    base = med["mlx-lm"]
    for k, m in med.items():
        print(f"| {label} | {k} | {m['decode_tok_s']:.1f} | "
              f"{m['decode_tok_s'] / base['decode_tok_s']:.3f} | {m['prefill_tok_s']:.0f} | "
              f"{m['prefill_tok_s'] / base['prefill_tok_s']:.3f} | {m['peak_mb']:.1f} | "
              f"{m['peak_mb'] / base['peak_mb']:.3f} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--option", required=True, type=parse_option,
                    help="NAME=VALUE of an mlxcy.tuning option, e.g. cache_pad=0 or cpu_sync=False")
    ap.add_argument("--models", default="smollm2-135m,qwen3-0.6b,llama-3.2-1b")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    from mlxcy.assets import cache_dir
    root = cache_dir() / "bench"
    print("| model | variant | decode tok/s | vs mlx-lm | prefill tok/s | vs mlx-lm | peak MB | "
          "vs mlx-lm |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.models.split(","):
        src = B.random_hf_dir(name, root)
        for q in a.quant.split(","):
            path = B.variant_dir(src, q)
            run(f"{name} {q}", path, B.SHAPES[name]["vocab_size"], a.option, a.prompt, a.gen,
                a.rounds)


if __name__ == "__main__":
    main()
