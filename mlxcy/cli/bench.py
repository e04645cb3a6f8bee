"""`mlxcy bench`: prefill and decode speed and memory, optionally side by
side with mlx-lm on the same weights in the same process."""
from __future__ import annotations

import numpy as np


def _one(model, prompt_ids, gen_tokens, repeats, bar=None):
    best = None
    for _ in range(repeats):
        list(model.stream_ids(prompt_ids, max_tokens=gen_tokens, stop_ids=[]))
        m = model.metrics()
        row = {"prefill_tok_s": round(m.prefill_tokens_per_second, 1),
               "decode_tok_s": round(m.decode_tokens_per_second, 1),
               "generated": m.generated_tokens,
               "peak_memory_mb": round(m.peak_memory / 2**20, 1)}
        if best is None or row["decode_tok_s"] > best["decode_tok_s"]:
            best = row
        if bar is not None:
            bar.update(1)
    return best


def run_bench(path, prompt_tokens=512, gen_tokens=128, vs_mlx_lm=False, dtype=None, repeats=1):
    """Returns one row per backend: prefill/decode tok/s, peak memory.
    Generation ignores end-of-sequence ids so every run makes gen_tokens.
    Both backends get the same prompt: random ids below the model's vocabulary."""
    from mlxcy import _progress
    from mlxcy.errors import OptionError
    from mlxcy.generation.inference import load
    for name, v in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens),
                    ("repeats", repeats)):
        if not isinstance(v, int) or v < 1:
            raise OptionError(f"bench: {name} must be an int >= 1, got {v!r}")
    rows = []
    backends = ["mlx"] + (["mlx_lm"] if vs_mlx_lm else [])
    ids = None
    bar = _progress.bar(total=len(backends) * (repeats + 1), desc="bench", unit="run")
    for backend in backends:
        bar.set_description(f"bench {backend}")
        m = load(path, backend=backend, dtype=dtype)
        if ids is None:
            vocab = int(m.info().get("vocab_size", 1000))
            lo = min(100, vocab // 2)
            ids = np.random.default_rng(0).integers(lo, min(vocab, 30000), prompt_tokens).tolist()
        _ignore_eos(m)
        _one(m, ids[:16], 4, 1)                      # warm-up
        bar.update(1)
        row = {"backend": backend, "model": str(path), "prompt_tokens": prompt_tokens}
        row.update(_one(m, ids, gen_tokens, repeats, bar))
        rows.append(row)
        m.close()
    bar.close()
    if len(rows) == 2:
        rows.append({"ratio_decode": round(rows[0]["decode_tok_s"] / max(rows[1]["decode_tok_s"], 1e-9), 3),
                     "ratio_prefill": round(rows[0]["prefill_tok_s"] / max(rows[1]["prefill_tok_s"], 1e-9), 3)})
    return rows


def _ignore_eos(m):
    """Benchmarks generate a fixed number of tokens."""
    tok = getattr(m, "tokenizer", None)
    if m.backend == "mlx" and tok is not None:
        tok.eos_ids = frozenset()
    elif tok is not None and hasattr(tok, "_eos_token_ids"):
        tok._eos_token_ids = set()
