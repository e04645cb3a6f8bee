"""Decode and prefill speed and peak memory: mlxcy vs mlx-lm, same weights,
same process.  Greedy, end-of-sequence ignored, a fixed random prompt.

    python benchmarks/bench_decode.py --models smollm2-135m --quant bf16,4bit
    python benchmarks/bench_decode.py --gguf            # the real SmolLM2 GGUF (CPU target)
    python benchmarks/bench_decode.py --models llama-3.2-1b --quant bf16 --torch-graph

Models are random-weight Hugging Face directories of real shapes (speed does
not depend on the values), written once under $MLXCY_CACHE/bench; 4-bit ones
are converted with mlxcy.models.convert.convert_hf_to_mlx (mlx-lm's layout), so
both engines read byte-identical files.

Each engine's model is loaded once and warmed up (one untimed run of the same
length); then the engines take turns
for --rounds runs and the medians are reported (turns, so that load from
other processes on the machine hits both alike).  mlxcy runs with
TextModel's defaults for the device (q/k/v and gate/up fused on a GPU, not on
the CPU: mlxcy.generation.inference.default_fuse) unless --fuse says otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the working tree's mlxcy

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
    from mlxcy.models.convert import convert_hf_to_mlx
    dst = src.parent / f"{src.name}-{bits}bit"
    if not (dst / "config.json").exists():
        convert_hf_to_mlx(src, dst, bits=bits, group_size=group_size)
    return dst


def variant_dir(src: Path, quant: str) -> Path:
    """The checkpoint for a --quant entry: "bf16" is src itself, "4bit" (or
    "8bit") its MLX-quantized copy."""
    return src if quant == "bf16" else quantized_dir(src, bits=int(quant.rstrip("bit")))


class MlxcyEngine:
    def __init__(self, path, fuse=None):
        from mlxcy.generation.inference import default_fuse
        from mlxcy.models.load import load_model
        from mlxcy.generation.sample import Sampler
        self.model = load_model(path)
        if default_fuse() if fuse is None else fuse:
            self.model.fuse()
        self.sampler = Sampler(temperature=0.0)
        self.weight_bytes = self.model.nbytes()

    def once(self, prompt, n):
        from mlxcy.generation.engine import generate_ids
        t0 = time.perf_counter()
        it = generate_ids(self.model, prompt, sampler=self.sampler, max_tokens=n)
        first = next(it).token
        t1 = time.perf_counter()
        tokens = [first] + [ev.token for ev in it]
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    def close(self):
        self.model.close()


class MlxcyOpsEngine(MlxcyEngine):
    """mlxcy with the one-kernel GPU decode step off (every step op by op):
    the A/B for include/mlxcy/gpu_step.h."""

    def once(self, prompt, n):
        from mlxcy.models.base import set_gpu_decode_step
        old = set_gpu_decode_step(False)
        try:
            return super().once(prompt, n)
        finally:
            set_gpu_decode_step(old)


class MlxLmEngine:
    def __init__(self, path):
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_lm.utils import load_model
        self.model, _ = load_model(Path(path))
        self.weight_bytes = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        self.mx = mx

    def once(self, prompt, n):
        from mlx_lm.generate import generate_step
        mx = self.mx
        t0 = time.perf_counter()
        gen = generate_step(mx.array(prompt), self.model, max_tokens=n,
                            sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
        first = int(next(gen)[0])
        t1 = time.perf_counter()
        tokens = [first] + [int(t) for t, _ in gen]
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    def close(self):
        del self.model
        self.mx.clear_cache()


class TorchGraphEngine:
    """The PyTorch loop that issue 19 measures against: transformers' model in
    bf16 with a static KV cache, its one-token step compiled by torch.compile
    with mode="reduce-overhead" (replayed as a CUDA graph).  bf16 only."""

    def __init__(self, path, max_len):
        import torch
        from transformers import AutoModelForCausalLM, StaticCache
        self.torch, self.dev = torch, "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16).to(self.dev).eval()
        try:
            self.cache = StaticCache(config=self.model.config, max_cache_len=max_len)
        except TypeError:   # transformers < 4.56
            self.cache = StaticCache(config=self.model.config, max_batch_size=1,
                                     max_cache_len=max_len, device=self.dev,
                                     dtype=torch.bfloat16)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.step = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True)

    def _forward(self, ids, pos):
        out = self.model(ids, cache_position=pos, past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1:].argmax(-1)

    def once(self, prompt, n):
        torch = self.torch
        with torch.inference_mode():
            self.cache.reset()
            t0 = time.perf_counter()
            tok = self._forward(torch.tensor([prompt], device=self.dev),
                                torch.arange(len(prompt), device=self.dev))
            first = int(tok)
            t1 = time.perf_counter()
            pos = torch.tensor([len(prompt)], device=self.dev)
            out = []
            for _ in range(n - 1):
                tok = self.step(tok, pos).clone()   # a graph's output is overwritten by the next replay
                pos += 1
                out.append(tok)
            tokens = [first] + [int(t) for t in out]
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    def reset_peak(self):
        if self.dev == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self):
        return self.torch.cuda.max_memory_allocated() if self.dev == "cuda" else 0

    def close(self):
        del self.model, self.cache, self.step


def measure(engine, prompt, n):
    """One timed run; peak memory = the run's working set above what was
    already allocated, plus the engine's own weights (the other engine's
    weights, resident in the same process, are not counted)."""
    from mlxcy import memory
    memory.clear_cache()
    before = memory.get_active_memory()
    memory.reset_peak_memory()
    own = hasattr(engine, "peak_bytes")        # torch counts its own memory
    if own:
        engine.reset_peak()
    tp, td, tokens = engine.once(prompt, n)
    peak = engine.peak_bytes() if own else memory.get_peak_memory() - before + engine.weight_bytes
    return {"prefill_tok_s": len(prompt) / tp, "decode_tok_s": (len(tokens) - 1) / td,
            "peak_mb": peak / 2**20}, tokens


def compare(label, path, vocab, prompt_len, n, rounds=1, fuse=None, torch_graph=False,
            ops=False):
    from mlxcy.models.base import gpu_decode_steps
    prompt = np.random.default_rng(0).integers(100, vocab - 1, prompt_len).tolist()
    engines = {"mlxcy": MlxcyEngine(path, fuse), "mlx_lm": MlxLmEngine(path)}
    if ops:
        engines["mlxcy_ops"] = MlxcyOpsEngine(path, fuse)
    steps0 = gpu_decode_steps()
    if torch_graph:
        engines["torch"] = TorchGraphEngine(path, prompt_len + n + 16)
    try:
        # warm-up as long as a timed run, so that every kind of step a run
        # takes is built before timing, the step that grows the KV cache past
        # the prompt's buffer (the prompt rounded up to 256 positions, plus 8;
        # the op path) among them
        for e in engines.values():
            e.once(prompt, n)
        runs = {k: [] for k in engines}
        tokens = {}
        for r in range(rounds):
            for k, e in engines.items():
                row, tokens[k] = measure(e, prompt, n)
                runs[k].append(row)
                print(f"# {label} round {r + 1}/{rounds} {k}: " + ", ".join(
                    f"{m} {v:.2f}" for m, v in row.items()), file=sys.stderr, flush=True)
    finally:
        for e in engines.values():
            e.close()
    kernel_steps = gpu_decode_steps() - steps0
    med = {k: {m: statistics.median(row[m] for row in rs) for m in rs[0]}
           for k, rs in runs.items()}
    ours, theirs = med["mlxcy"], med["mlx_lm"]
    return {"model": label, **{f"mlxcy_{k}": round(v, 2) for k, v in ours.items()},
            **{f"mlx_lm_{k}": round(v, 2) for k, v in theirs.items()},
            "decode_ratio": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 3),
            "prefill_ratio": round(ours["prefill_tok_s"] / theirs["prefill_tok_s"], 3),
            "memory_ratio": round(ours["peak_mb"] / max(theirs["peak_mb"], 1e-9), 3),
            "rounds": rounds,
            "decode_ratios": [round(a["decode_tok_s"] / b["decode_tok_s"], 3)
                              for a, b in zip(runs["mlxcy"], runs["mlx_lm"])],
            "prefill_ratios": [round(a["prefill_tok_s"] / b["prefill_tok_s"], 3)
                               for a, b in zip(runs["mlxcy"], runs["mlx_lm"])],
            "same_tokens": tokens["mlxcy"] == tokens["mlx_lm"],
            "one_kernel_steps": kernel_steps,
            **({"ops_decode_tok_s": round(med["mlxcy_ops"]["decode_tok_s"], 2),
                "step_vs_ops": round(ours["decode_tok_s"] / med["mlxcy_ops"]["decode_tok_s"], 3),
                "same_tokens_ops": tokens["mlxcy"] == tokens["mlxcy_ops"]} if ops else {}),
            **({f"torch_{k}": round(v, 2) for k, v in med["torch"].items()} if torch_graph else {}),
            **({"torch_ratio": round(ours["decode_tok_s"] / med["torch"]["decode_tok_s"], 3)}
               if torch_graph else {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--quant", default="bf16,4bit")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1,
                    help="timed runs per engine, taken in turns; medians are reported")
    ap.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                    help="mlxcy's q/k/v and gate/up fusion (auto: TextModel's device default)")
    ap.add_argument("--gguf", action="store_true",
                    help="SmolLM2-135M from its real GGUF instead of random weights: "
                    "dequantized to a bf16 HF directory, and that converted to MLX 4-bit "
                    "(group 64) by convert_hf_to_mlx; --quant picks the rows")
    ap.add_argument("--torch-graph", action="store_true",
                    help="bf16 rows also run the PyTorch loop (static cache, torch.compile "
                    "reduce-overhead: CUDA graphs); torch_ratio = mlxcy / it")
    ap.add_argument("--ops", action="store_true",
                    help="also run mlxcy with the one-kernel GPU step off (step_vs_ops)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = ap.parse_args()
    from mlxcy.assets import cache_dir
    root = cache_dir() / "bench"
    fuse = {"auto": None, "on": True, "off": False}[args.fuse]
    quants = [q for q in args.quant.split(",") if q]
    rows = []
    if args.gguf:
        hf = gguf_dir(root)
        for q in quants:
            path = variant_dir(hf, q)
            rows.append(compare(f"SmolLM2-135M (GGUF) {q}", path, 49152, args.prompt, args.gen,
                                args.rounds, fuse, ops=args.ops))
            print(json.dumps(rows[-1]), flush=True)
    else:
        for name in [m for m in args.models.split(",") if m]:
            src = random_hf_dir(name, root)
            vocab = SHAPES[name]["vocab_size"]
            for q in quants:
                path = variant_dir(src, q)
                rows.append(compare(f"{name} {q}", path, vocab, args.prompt, args.gen,
                                    args.rounds, fuse, args.torch_graph and q == "bf16",
                                    args.ops))
                print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


def gguf_dir(root):
    """SmolLM2-135M's real GGUF, dequantized once to a bf16 HF directory."""
    from mlxcy.assets import smollm2_gguf
    from mlxcy.models.convert import convert_gguf_to_hf
    hf = root / "smollm2-gguf-bf16"
    if not (hf / "config.json").exists():
        convert_gguf_to_hf(smollm2_gguf(), hf, dtype="bfloat16", tokenizer=False)
    return hf


def print_table(rows):
    cols = ["model", "mlxcy_decode_tok_s", "mlx_lm_decode_tok_s", "decode_ratio",
            "mlxcy_prefill_tok_s", "mlx_lm_prefill_tok_s", "prefill_ratio", "mlxcy_peak_mb",
            "mlx_lm_peak_mb", "memory_ratio"]
    if any("torch_ratio" in r for r in rows):
        cols += ["torch_decode_tok_s", "torch_ratio"]
    if any("step_vs_ops" in r for r in rows):
        cols += ["ops_decode_tok_s", "step_vs_ops", "one_kernel_steps"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
