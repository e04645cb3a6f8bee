"""Encode throughput (MB/s, one thread) of mlxcy.tokenizer next to Hugging
Face `tokenizers` in the same run, on a deterministic 10 MB corpus.

    python benchmarks/bench_tokenizer.py [--mb 10] [--only qwen3,gemma3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"          # tokenizers: one thread
os.environ["TOKENIZERS_PARALLELISM"] = "false"
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from corpus import corpus  # noqa: E402
import tokenizer_refs as refs  # noqa: E402
from mlxcy import assets  # noqa: E402
from mlxcy.tokenizer import Tokenizer  # noqa: E402

MODELS = {
    "qwen3": (lambda: Tokenizer.from_dir(assets.qwen3_tokenizer_dir()),
              lambda: refs.hf_from_json(assets.qwen3_tokenizer_dir())),
    "llama32": (lambda: Tokenizer.from_dir(assets.llama32_tokenizer_dir()),
                lambda: refs.hf_from_json(assets.llama32_tokenizer_dir())),
    "smollm2": (lambda: Tokenizer.from_gguf(assets.smollm2_gguf()),
                lambda: refs.hf_from_gguf(assets.smollm2_gguf())),
    "qwen25": (lambda: Tokenizer.from_gguf(assets.qwen25_gguf()),
               lambda: refs.hf_from_gguf(assets.qwen25_gguf())),
    "gemma3": (lambda: Tokenizer.from_gguf(assets.gemma3_gguf()),
               lambda: refs.hf_from_gguf(assets.gemma3_gguf())),
}


def timed(fn, docs) -> float:
    t = time.perf_counter()
    for d in docs:
        fn(d)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=10)
    ap.add_argument("--only", default=",".join(MODELS))
    args = ap.parse_args()
    docs = corpus(int(args.mb * (1 << 20)), seed=42)
    mb = sum(len(d.encode()) for d in docs) / (1 << 20)
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB; one thread each")
    print(f"{'tokenizer':10} {'load s':>7} {'mlxcy MB/s':>11} {'tokenizers MB/s':>16} {'ratio':>6}")
    for name in args.only.split(","):
        make_ours, make_ref = MODELS[name]
        t = time.perf_counter()
        ours = make_ours()
        ours.encode("warm up")   # builds the native tables
        load = time.perf_counter() - t
        ref = make_ref()
        ours._core.clear_cache()  # no cache carried over from the warm-up beyond one word
        t_ours = timed(ours.encode, docs)
        t_ref = timed(ref.encode, docs)
        print(f"{name:10} {load:7.2f} {mb / t_ours:11.2f} {mb / t_ref:16.2f} "
              f"{t_ref / t_ours:5.2f}x")


if __name__ == "__main__":
    main()
