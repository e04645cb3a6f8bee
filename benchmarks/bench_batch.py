"""Batch inference timings: mlxcy.generation.batch.classify against a loop of single
prompts, and mlxcy.generation.batch.batch_generate side by side with mlx-lm's
batch_generate on the same random-weight safetensors.

    python benchmarks/bench_batch.py                        # CPU, tiny + small shapes
    python benchmarks/bench_batch.py --device gpu --model-shape gemma3-270m,gemma3-1b,qwen3-0.6b \
        --dtype bfloat16 --classify-batches 1,8,32,64,128 --gen-batches 1,8,32,64

Model shapes (random weights, written once per run to a temp dir as a Hugging
Face directory: config.json + model.safetensors + the Qwen3 tokenizer, so both
libraries load the same files): tiny (Qwen3, hidden 64, 2 layers), small
(Qwen3, hidden 256, 4 layers), and the shapes of Gemma-3-270M, Gemma-3-1B
and Qwen3-0.6B (full vocabularies; gemma's sliding window 512); smollm2-gguf:
the real SmolLM2-135M-Instruct Q4_1 GGUF (mlxcy.assets; mlxcy only, as mlx-lm
cannot read GGUF).

classify: N short sentences (8..32 tokens); "loop" classifies them one at a
time (one forward each); "batch b" classifies them in batches of b (bucketed
by length, left-padded).  Speedup = loop time / batched time.  Median of
--repeats runs after a warm-up.  --template chat asks about each sentence in
the model's chat template (its system turn and the question are a prefix the
prompts share, which a batch computes once); fewshot puts four labelled
examples before each sentence (a longer shared prefix); none (the default):
the bare sentences.

generate: b prompts, --max-tokens new tokens each (greedy; random weights
rarely hit EOS, the generated count is printed).  tok/s = generated tokens /
wall time of the whole call (prefill included); "decode tok/s" excludes the
prefill (mlxcy: its metrics; mlx-lm: its reported generation_tps).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlxcy  # noqa: E402
from mlxcy import assets  # noqa: E402

SHAPES = {
    "tiny": dict(model_type="qwen3", vocab_size=151936, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 rope_theta=10000.0, tie_word_embeddings=True),
    "small": dict(model_type="qwen3", vocab_size=151936, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024,
                       intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                       tie_word_embeddings=True),
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640,
                        intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                        sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0,
                        rope_local_base_freq=10000.0, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh"),
    "gemma3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                      intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0,
                      rope_local_base_freq=10000.0, tie_word_embeddings=True,
                      hidden_activation="gelu_pytorch_tanh"),
}

WORDS = ("the a one small big old new red blue green quick slow happy sad bright dark cat dog "
         "bird fish tree river city house road car train book song story idea question answer "
         "runs walks sees finds makes takes gives loves hates reads writes sings jumps over "
         "under near with without after before because while and but or so very quite rather "
         "today tomorrow yesterday morning evening night always never often sometimes").split()


def make_model_dir(shape: str, path: Path, dtype: str, seed: int = 0) -> Path:
    """Write a random-weight HF directory of the given shape (no torch needed)."""
    from mlxcy.models.load import expected_shapes, save_safetensors
    cfg = dict(SHAPES[shape])
    L = cfg["num_hidden_layers"]
    cfg.update(rms_norm_eps=1e-6, max_position_embeddings=32768, torch_dtype=dtype,
               architectures=["Gemma3ForCausalLM" if cfg["model_type"] == "gemma3_text"
                              else "Qwen3ForCausalLM"],
               bos_token_id=151643, eos_token_id=151645)
    if cfg["model_type"] == "gemma3_text":
        p = cfg["sliding_window_pattern"]
        cfg["layer_types"] = ["sliding_attention" if (i + 1) % p else "full_attention"
                              for i in range(L)]
    rng = np.random.default_rng(seed)
    gemma = cfg["model_type"] == "gemma3_text"
    tensors = {}
    for name, (shp, _) in expected_shapes(cfg).items():
        if "norm" in name:
            w = rng.standard_normal(shp, dtype=np.float32) * 0.05 + (0.0 if gemma else 1.0)
        else:
            w = rng.standard_normal(shp, dtype=np.float32) * 0.05
        tensors[name] = mlxcy.array(w).astype(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.qwen3_tokenizer_dir() / f, path / f)
    return path


def sentences(tok, n: int, seed: int = 0, lo: int = 8, hi: int = 32) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        words = rng.choice(WORDS, size=int(rng.integers(lo - 2, hi - 2))).tolist()
        s = " ".join(words).capitalize() + "."
        if lo <= len(tok.encode(s)) <= hi:
            out.append(s)
    return out


def chat_question(tm, sentence: str) -> str:
    """A sentiment question about `sentence` in the model's chat template,
    ready for the answer."""
    q = f"Is the sentiment of this sentence positive or negative?\n{sentence}"
    return tm.apply_chat_template([{"role": "user", "content": q}])


FEWSHOT = ("Label the sentiment of each sentence as positive or negative.\n\n"
           "Sentence: The food was wonderful and the staff were kind.\nSentiment: positive\n\n"
           "Sentence: I waited an hour and the room was dirty.\nSentiment: negative\n\n"
           "Sentence: What a lovely surprise, thank you so much!\nSentiment: positive\n\n"
           "Sentence: The battery died after two days.\nSentiment: negative\n\n"
           "Sentence: {}\nSentiment:")
TEMPLATES = {"none": lambda tm, s: s, "chat": chat_question,
             "fewshot": lambda tm, s: FEWSHOT.format(s)}


def timed(fn, repeats: int) -> float:
    fn()                                   # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_classify(tm, prompts, batches, repeats):
    from mlxcy.generation.batch import classify
    loop = timed(lambda: [classify(tm, [p], top_k=5) for p in prompts], repeats)
    n = len(prompts)
    print(f"\nclassify: {n} prompts of {min(map(len, map(tm.tokenizer.encode, prompts)))}.."
          f"{max(map(len, map(tm.tokenizer.encode, prompts)))} tokens, top_k=5")
    print(f"  {'mode':<12}{'seconds':>10}{'prompts/s':>12}{'speedup':>10}")
    print(f"  {'loop':<12}{loop:>10.4f}{n / loop:>12.1f}{1.0:>10.2f}")
    rows = [("loop", loop, n / loop, 1.0)]
    for b in batches:
        t = timed(lambda: classify(tm, prompts, top_k=5, batch_size=b), repeats)
        print(f"  {'batch ' + str(b):<12}{t:>10.4f}{n / t:>12.1f}{loop / t:>10.2f}")
        rows.append((f"batch {b}", t, n / t, loop / t))
    return rows


def bench_generate(tm, path, prompts, batches, max_tokens, with_mlx_lm, device, repeats=1):
    from mlxcy.generation.batch import batch_generate
    lm = None
    if with_mlx_lm:
        try:
            import mlx.core as mx
            from mlx_lm import load as lm_load
            from mlx_lm.generate import batch_generate as lm_batch_generate
            mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
            lm_model, lm_tok = lm_load(str(path))
            lm = (mx, lm_model, lm_tok, lm_batch_generate)
        except Exception as e:   # not installed, or cannot load the shape
            print(f"  (mlx-lm skipped: {type(e).__name__}: {e})")
    print(f"\nbatch_generate: greedy, max_tokens={max_tokens}")
    print(f"  {'batch':>5} | {'mlxcy tok/s':>11} {'decode':>8} {'prompts/s':>9} {'peak MB':>8} "
          f"{'gen':>5} | {'mlx-lm tok/s':>12} {'decode':>8} {'peak MB':>8} {'gen':>5} | ratio")
    rows = []
    for b in batches:
        ps = (prompts * ((b + len(prompts) - 1) // len(prompts)))[:b]
        # warm-up on the same prompts: every prefill bucket's and decode
        # batch's kernels are built before the timed runs (median of repeats)
        batch_generate(tm, ps, max_tokens=4)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = batch_generate(tm, ps, max_tokens=max_tokens)
            runs.append((time.perf_counter() - t0, out))
        wall, out = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        m = out.metrics
        ours = m.generated_tokens / wall
        line = (f"  {b:>5} | {ours:>11.1f} {m.decode_tokens_per_second:>8.1f} "
                f"{m.prompts_per_second:>9.2f} {m.peak_memory / 2**20:>8.1f} "
                f"{m.generated_tokens:>5} |")
        row = dict(batch=b, mlxcy_tps=ours, mlxcy_decode_tps=m.decode_tokens_per_second,
                   mlxcy_peak_mb=m.peak_memory / 2**20, mlxcy_generated=m.generated_tokens)
        if lm is not None:
            mx, lm_model, lm_tok, lm_bg = lm
            ids = [tm.tokenizer.encode(p) for p in ps]
            lm_bg(lm_model, lm_tok, ids, max_tokens=4,
                  completion_batch_size=max(b, 1), prefill_batch_size=max(b, 1))
            lruns = []
            for _ in range(repeats):
                mx.reset_peak_memory()
                t0 = time.perf_counter()
                r = lm_bg(lm_model, lm_tok, ids, max_tokens=max_tokens,
                          completion_batch_size=max(b, 1), prefill_batch_size=max(b, 1))
                lruns.append((time.perf_counter() - t0, r))
            lwall, r = sorted(lruns, key=lambda t: t[0])[len(lruns) // 2]
            gen = sum(len(t) for t in r.texts) if not hasattr(r, "stats") else \
                r.stats.generation_tokens
            theirs = gen / lwall
            line += (f" {theirs:>12.1f} {r.stats.generation_tps:>8.1f} "
                     f"{r.stats.peak_memory * 1024:>8.1f} {gen:>5} | {ours / theirs:.2f}")
            row.update(mlx_lm_tps=theirs, mlx_lm_decode_tps=r.stats.generation_tps,
                       mlx_lm_generated=gen)
        print(line)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-shape", default="tiny,small",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--classify-batches", default="1,4,16,64")
    ap.add_argument("--gen-batches", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mlx-lm", action="store_true")
    ap.add_argument("--rows-kernel", choices=("on", "off"), default="on",
                    help="a batch's one-token steps as the one-kernel GPU step (its batch form)")
    ap.add_argument("--template", choices=("none", "chat", "fewshot"), default="none",
                    help="classify: the bare sentences, a question about each in the "
                         "model's chat template, or each after four labelled examples")
    ap.add_argument("--skip-classify", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    from mlxcy import device as dev
    dev.set_default_device(dev.gpu if a.device == "gpu" else dev.cpu)
    from mlxcy.models import base
    base.set_gpu_rows_step(a.rows_kernel == "on")
    from mlxcy.generation.inference import load
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    try:
        for shape in a.model_shape.split(","):
            if shape == "smollm2-gguf":          # the real model, mlxcy only
                from mlxcy.assets import smollm2_gguf
                path, a.no_mlx_lm = None, True
            elif shape not in SHAPES:
                raise SystemExit(f"unknown --model-shape {shape!r}; choose from "
                                 f"{list(SHAPES) + ['smollm2-gguf']}")
            else:
                path = make_model_dir(shape, tmp / shape, a.dtype)
            with load(path or str(smollm2_gguf())) as tm:
                print(f"\n=== {shape} ({tm.model.nparams() / 1e6:.1f}M params, {a.dtype}, "
                      f"{a.device}) ===")
                prompts = sentences(tm.tokenizer, a.n_prompts)
                res = {}
                if not a.skip_classify:
                    asked = [TEMPLATES[a.template](tm, p) for p in prompts]
                    res["classify"] = bench_classify(
                        tm, asked, [int(x) for x in a.classify_batches.split(",")], a.repeats)
                if not a.skip_generate:
                    res["generate"] = bench_generate(
                        tm, path, prompts, [int(x) for x in a.gen_batches.split(",")],
                        a.max_tokens, not a.no_mlx_lm, a.device, a.repeats)
                results[shape] = res
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
