"""Decode and prefill speed and peak memory: mlxcy vs mlx-lm, same weights,
same process.  Greedy, end-of-sequence ignored, a fixed random prompt.

    python benchmarks/bench_decode.py --models smollm2-135m --quant bf16,4bit
    python benchmarks/bench_decode.py --gguf            # the real SmolLM2 GGUF (CPU target)

Models are random-weight Hugging Face directories of real shapes (speed does
not depend on the values), written once under $MLXCY_CACHE/bench; 4-bit ones
are converted with mlxcy.convert.convert_hf_to_mlx (mlx-lm's layout), so
both engines read byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=False,
                         rms_norm_eps=1e-6, max_position_embeddings=32768),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, rope_theta=1000000.0,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=40960),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5,
                         max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}),
    "gemma-3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=256, vocab_size=262144, rope_theta=1000000.0,
                         rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
                         sliding_window=512, sliding_window_pattern=6, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "gemma-3-1b": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=256, vocab_size=262144, rope_theta=1000000.0,
                       rope_local_base_freq=10000.0, query_pre_attn_scalar=256,
                       sliding_window=512, sliding_window_pattern=6, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, tie_word_embeddings=True),
}


def random_hf_dir(name: str, root: Path) -> Path:
    """A bf16 random-weight HF directory of the named shape (made once)."""
    import mlx.core as mx
    from mlxcy.models.load import expected_shapes
    d = root / name
    if (d / "model.safetensors").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(SHAPES[name])
    if cfg["model_type"] == "gemma3_text":
        pat = cfg["sliding_window_pattern"]
        cfg["layer_types"] = ["full_attention" if (i + 1) % pat == 0 else "sliding_attention"
                              for i in range(cfg["num_hidden_layers"])]
    mx.random.seed(0)
    weights = {}
    for tname, (shape, _kind) in expected_shapes(cfg).items():
        if "norm" in tname:
            weights[tname] = mx.ones(shape, dtype=mx.bfloat16)
        else:
            weights[tname] = (mx.random.normal(shape) * 0.02).astype(mx.bfloat16)
    mx.save_safetensors(str(d / "model.safetensors"), weights, {"format": "pt"})
    (d / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16",
                                               "architectures": ["X"]}))
    return d


def quantized_dir(src: Path, bits: int = 4, group_size: int = 64) -> Path:
    from mlxcy.convert import convert_hf_to_mlx
    dst = src.parent / f"{src.name}-{bits}bit"
    if not (dst / "config.json").exists():
        convert_hf_to_mlx(src, dst, bits=bits, group_size=group_size)
    return dst


def run_mlxcy(path, prompt, n, fuse=True):
    from mlxcy import memory
    from mlxcy.generate import TokenLoop
    from mlxcy.models.load import load_model
    from mlxcy.sample import Sampler
    model = load_model(path)
    if fuse:
        model.fuse()
    sampler = Sampler(temperature=0.0)

    def once(p, k):
        cache = model.make_cache()
        t0 = time.perf_counter()
        loop = TokenLoop(model, cache, sampler, p, k)
        it = iter(loop)
        next(it)
        t1 = time.perf_counter()
        count = 1 + sum(1 for _ in it)
        t2 = time.perf_counter()
        cache.free()
        return t1 - t0, t2 - t1, count

    once(prompt, 8)             # warm-up at full length: kernels JIT-compiled, compile traced
    memory.clear_cache()
    memory.reset_peak_memory()
    tp, td, count = once(prompt, n)
    row = {"prefill_tok_s": len(prompt) / tp, "decode_tok_s": (count - 1) / td,
           "peak_mb": memory.get_peak_memory() / 2**20}
    model.close()
    return row


def run_mlx_lm(path, prompt, n):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model
    model, _ = load_model(Path(path))

    def greedy(logprobs):
        return mx.argmax(logprobs, axis=-1)

    def once(p, k):
        t0 = time.perf_counter()
        gen = generate_step(mx.array(p), model, max_tokens=k, sampler=greedy)
        next(gen)
        t1 = time.perf_counter()
        count = 1 + sum(1 for _ in gen)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, count

    once(prompt, 8)
    mx.clear_cache()
    mx.reset_peak_memory()
    tp, td, count = once(prompt, n)
    row = {"prefill_tok_s": len(prompt) / tp, "decode_tok_s": (count - 1) / td,
           "peak_mb": mx.get_peak_memory() / 2**20}
    del model
    mx.clear_cache()
    return row


def compare(label, path, vocab, prompt_len, n):
    prompt = np.random.default_rng(0).integers(100, vocab - 1, prompt_len).tolist()
    ours = run_mlxcy(path, prompt, n)
    theirs = run_mlx_lm(path, prompt, n)
    return {"model": label, **{f"mlxcy_{k}": round(v, 1) for k, v in ours.items()},
            **{f"mlx_lm_{k}": round(v, 1) for k, v in theirs.items()},
            "decode_ratio": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 3),
            "prefill_ratio": round(ours["prefill_tok_s"] / theirs["prefill_tok_s"], 3),
            "memory_ratio": round(ours["peak_mb"] / max(theirs["peak_mb"], 1e-9), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--quant", default="bf16,4bit")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--gguf", action="store_true", help="the real SmolLM2 GGUF: its Q4_1 weights "
                    "as MLX 4-bit (group 32) and dequantized bf16, converted for mlx-lm")
    ap.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = ap.parse_args()
    from mlxcy.assets import cache_dir
    root = cache_dir() / "bench"
    rows = []
    if args.gguf:
        rows += gguf_rows(root, args.prompt, args.gen)
    else:
        for name in [m for m in args.models.split(",") if m]:
            src = random_hf_dir(name, root)
            vocab = SHAPES[name]["vocab_size"]
            for q in args.quant.split(","):
                path = src if q == "bf16" else quantized_dir(src, bits=int(q.rstrip("bit")))
                rows.append(compare(f"{name} {q}", path, vocab, args.prompt, args.gen))
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


def gguf_rows(root, prompt_len, n):
    """SmolLM2-135M from its real GGUF: bf16 (dequantized) and MLX 4-bit."""
    from mlxcy.assets import smollm2_gguf
    from mlxcy.convert import convert_gguf_to_hf
    hf = root / "smollm2-gguf-bf16"
    if not (hf / "config.json").exists():
        convert_gguf_to_hf(smollm2_gguf(), hf, dtype="bfloat16", tokenizer=False)
    rows = [compare("SmolLM2-135M (GGUF) bf16", hf, 49152, prompt_len, n)]
    print(json.dumps(rows[-1]), flush=True)
    rows.append(compare("SmolLM2-135M (GGUF) 4bit", quantized_dir(hf, 4, 64), 49152, prompt_len, n))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows):
    cols = ["model", "mlxcy_decode_tok_s", "mlx_lm_decode_tok_s", "decode_ratio",
            "mlxcy_prefill_tok_s", "mlx_lm_prefill_tok_s", "prefill_ratio", "mlxcy_peak_mb",
            "mlx_lm_peak_mb", "memory_ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
