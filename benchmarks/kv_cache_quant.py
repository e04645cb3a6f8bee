"""The quantized KV cache (kv_bits) on SmolLM2-135M: the cache's memory after
a prefill, decode speed, and the quality cost as perplexity, against the
float cache.

    python benchmarks/kv_cache_quant.py [--context 2048] [--gen 32] [--dtype bfloat16]
        [--data FILE] [--sequence-length 512] [--ppl-tokens N]

Memory: Cache.nbytes after prefilling --context tokens (every layer's
buffers, grown in steps of 256 positions as generation would leave them).
Perplexity: mlxcy.train.perplexity over --data (default: CPython's LICENSE.txt),
each batch run through a fresh cache of the kind measured, so every attention
read goes through the quantization.  Prints one table row per setting.
"""
from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (GGUF)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--data", default=str(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"))
    ap.add_argument("--sequence-length", type=int, default=512)
    ap.add_argument("--ppl-tokens", type=int, default=None,
                    help="score only the data's first N tokens (default: all)")
    a = ap.parse_args()

    from mlxcy import memory
    from mlxcy.assets import smollm2_gguf
    from mlxcy.models.cache import quantized_cache
    from mlxcy.generation.engine import Engine
    from mlxcy.models.load import load_model
    from mlxcy.train.perplexity import data_tokens, perplexity
    from mlxcy.tokenizer import Tokenizer

    path = a.model or smollm2_gguf()
    model = load_model(path, a.dtype)
    tok = Tokenizer.load(path)
    text_ids = data_tokens(a.data, tok)
    ppl_ids = text_ids[:a.ppl_tokens] if a.ppl_tokens else text_ids
    reps = -(-a.context // len(text_ids))
    prompt = (text_ids * reps)[:a.context]
    print(f"model {Path(path).name} dtype {model.dtype}, context {a.context} tokens, "
          f"perplexity on {Path(a.data).name} ({len(ppl_ids)} tokens, sequences of "
          f"{a.sequence_length})")
    print("| KV cache | cache MB after prefill | vs float | decode tok/s | perplexity |")
    print("|---|---|---|---|---|")
    base = None
    for bits in (None, 8, 4):
        cache = quantized_cache(model.make_cache(), bits, a.group_size)
        np.array(model(np.asarray([prompt], np.int32), cache=cache, last_only=True))
        nbytes = cache.nbytes
        cache.free()
        base = base or nbytes
        eng = Engine(model, max_batch=1, kv_bits=bits, kv_group_size=a.group_size)
        eng.add(prompt, max_tokens=a.gen)
        memory.reset_peak_memory()
        while eng.has_work():
            eng.step()
        tps = eng.stats["decode_tokens"] / max(eng.stats["decode_seconds"], 1e-9)
        t0 = time.perf_counter()
        r = perplexity(model, ppl_ids, sequence_length=a.sequence_length, batch_size=1,
                       tokenizer=tok, progress=False, kv_bits=bits,
                       kv_group_size=a.group_size)
        name = "float" if bits is None else f"{bits}-bit (group {a.group_size})"
        print(f"| {name} | {nbytes / 2**20:.1f} | {nbytes / base:.2f}x | {tps:.1f} | "
              f"{r.perplexity:.3f} ± {r.perplexity_stderr:.3f} "
              f"({time.perf_counter() - t0:.0f} s) |", flush=True)
    model.close()


if __name__ == "__main__":
    main()
