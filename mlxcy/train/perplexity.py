"""Perplexity of a model on a text: `mlxcy perplexity MODEL --data FILE` and

    from mlxcy.train.perplexity import perplexity
    r = perplexity("model_dir_or.gguf", "text.txt", sequence_length=512)
    r.perplexity, r.perplexity_stderr, r.loss, r.tokens

As mlx-lm's `mlx_lm.perplexity` does: the data's tokens are concatenated, cut
into sequences of `sequence_length` tokens (the remainder dropped, unless the
data is shorter than one sequence), and every position but each sequence's
first is scored by the log-probability the model gives it after the tokens
before it in its sequence.  Perplexity is exp(mean negative log-likelihood);
its standard error follows by the delta method from the standard error of the
mean token loss.

With kv_bits, every batch runs over a fresh quantized KV cache
(mlxcy.models.cache.QuantizedKVCache): every attention read, of each position's own
and earlier keys and values, goes through the quantization, the cost that
generation with kv_bits pays over its whole context.

The data: a .jsonl file in mlx-lm's training formats ("text",
"prompt"/"completion", or chat "messages", rendered with the model's chat
template), or any other file read as UTF-8 text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PerplexityResult", "perplexity", "data_tokens", "token_losses"]


@dataclass
class PerplexityResult:
    perplexity: float
    perplexity_stderr: float
    loss: float            # mean negative log-likelihood per token (nats)
    tokens: int            # scored tokens
    sequences: int


def data_tokens(path, tokenizer, template=None) -> list[int]:
    """The token ids of a data file (see the module docstring), concatenated."""
    from mlxcy.errors import DataError
    from mlxcy.train.data import Dataset, load_jsonl
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such data file")
    if p.suffix == ".jsonl":
        ds = Dataset(load_jsonl(p), tokenizer, template, max_seq_length=1 << 62, source=str(p))
        return [t for toks, _ in ds.items for t in toks]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    return tokenizer.encode(text, add_special_tokens=True)


def token_losses(model, ids, kv_bits=None, kv_group_size=64) -> np.ndarray:
    """Negative log-likelihood of ids[:, 1:] given the tokens before them, for
    a batch ids [B, L] (float64 numpy [B, L-1]); kv_bits: through a quantized
    KV cache."""
    from mlxcy import core, ops
    from mlxcy.models.cache import quantized_cache
    x = core.array(np.ascontiguousarray(ids[:, :-1], dtype=np.int32))
    y = core.array(np.ascontiguousarray(ids[:, 1:], dtype=np.int32))
    cache = None if kv_bits is None else quantized_cache(model.make_cache(), kv_bits,
                                                         kv_group_size)
    with model(x, cache=cache) as logits:
        with logits.astype(core.float32) as lg:
            with ops.logsumexp(lg, axis=-1) as lse, \
                    ops.take_along_axis(lg, ops.expand_dims(y, -1), axis=-1) as picked:
                nll = (lse - ops.squeeze(picked, -1)).numpy().astype(np.float64)
    if cache is not None:
        cache.free()
    x.free()
    y.free()
    return nll


def _resolve(model, tokenizer, dtype):
    """(native Model, tokenizer, chat template or None, owned) from a path, a
    TextModel of the mlx backend, or a native Model plus tokenizer."""
    if isinstance(model, (str, Path)):
        from mlxcy.train.data import load_for_training
        m, tok, tpl = load_for_training(model, dtype)
        return m, tok, tpl, True
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "tokenizer"):       # MlxTextModel
        try:
            tpl = model.chat_template()
        except Exception:
            tpl = None
        return inner, tokenizer or model.tokenizer, tpl, False
    if tokenizer is None:
        raise TypeError("perplexity: a native model needs tokenizer=")
    return model, tokenizer, None, False


def perplexity(model, data, sequence_length: int = 512, batch_size: int = 4,
               num_samples: int = -1, dtype=None, tokenizer=None,
               progress: bool = True, kv_bits=None, kv_group_size: int = 64) -> PerplexityResult:
    """Perplexity of `model` (a path, an mlxcy.load() model, or a native Model
    with tokenizer=) on `data` (a file path, or a list of token ids); kv_bits
    (2-8) and kv_group_size: through a quantized KV cache (module docstring)."""
    from mlxcy import _progress
    from mlxcy.models.cache import check_kv_options
    from mlxcy.errors import OptionError
    try:
        check_kv_options(kv_bits, kv_group_size)
    except ValueError as e:
        raise OptionError(f"perplexity: {e}") from None
    for name, v, lo in (("sequence_length", sequence_length, 2), ("batch_size", batch_size, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise OptionError(f"perplexity: {name} must be an int >= {lo}, got {v!r}")
    if not isinstance(num_samples, int) or num_samples == 0 or num_samples < -1:
        raise OptionError(f"perplexity: num_samples must be -1 (all) or >= 1, got {num_samples!r}")
    m, tok, tpl, owned = _resolve(model, tokenizer, dtype)
    try:
        if isinstance(data, (str, Path)):
            ids = data_tokens(data, tok, tpl)
        else:
            ids = [int(i) for i in data]
        vocab = int(m.config.vocab_size)
        if any(i < 0 or i >= vocab for i in ids):
            raise ValueError(f"perplexity: token ids outside the vocabulary [0, {vocab})")
        if len(ids) < 2:
            raise ValueError(f"perplexity: the data has {len(ids)} token(s); at least 2 needed")
        L = min(sequence_length, len(ids))
        n = len(ids) // L
        if num_samples > 0:
            n = min(n, num_samples)
        seqs = np.asarray(ids[: n * L], dtype=np.int32).reshape(n, L)
        losses = []
        bar = _progress.bar(total=n, desc="perplexity", unit="seq", show=progress)
        for i in range(0, n, batch_size):
            losses.append(token_losses(m, seqs[i:i + batch_size], kv_bits,
                                       kv_group_size).ravel())
            bar.update(len(seqs[i:i + batch_size]))
        bar.close()
    finally:
        if owned:
            m.close()
    nll = np.concatenate(losses)
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / math.sqrt(nll.size)) if nll.size > 1 else 0.0
    ppl = math.exp(min(mean, 700.0))
    return PerplexityResult(perplexity=ppl, perplexity_stderr=ppl * se, loss=mean,
                            tokens=int(nll.size), sequences=int(n))
