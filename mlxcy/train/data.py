"""Training data: mlx-lm's JSONL formats, tokenized, length-bucketed batches.

A data directory holds train.jsonl, valid.jsonl (and optionally test.jsonl);
each line is one JSON object in one of mlx-lm's formats:

    {"text": "..."}                                   plain text (all tokens trained)
    {"prompt": "...", "completion": "..."}            prompt tokens masked (mask_prompt)
    {"messages": [{"role": ..., "content": ...}, ...]}  rendered with the chat template;
                                                      with mask_prompt only the last
                                                      message's tokens are trained

A dataset item is (tokens, offset): `offset` leading tokens are not trained.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

__all__ = ["DataError", "Dataset", "load_jsonl", "load_datasets", "iterate_batches",
           "pad_batch", "load_for_training"]


from mlxcy.errors import DataError  # noqa: E402,F401  (re-exported)


def load_for_training(model_path, dtype=None):
    """(model, tokenizer, chat template or None) for a directory or GGUF file.
    Models for training are always built unfused."""
    from mlxcy.chat import model_template
    from mlxcy.models.load import load_model
    from mlxcy.tokenizer import Tokenizer
    model = load_model(model_path, dtype)
    tok = Tokenizer.load(model_path)
    try:
        template = model_template(tok, model.config.model_type)
    except (ValueError, KeyError):
        template = None
    return model, tok, template


def load_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start}: "
                                f"{raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON: {e.msg}") from None
            except RecursionError:
                raise DataError(f"{path}:{n}: invalid JSON: nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def _kind(row):
    if "messages" in row:
        return "chat"
    if "prompt" in row and "completion" in row:
        return "completions"
    if "text" in row:
        return "text"
    return None


class Dataset:
    """Tokenized examples [(tokens, offset)] from JSONL rows.

    tokenizer: an mlxcy Tokenizer (encode, eos_id, bos_id); template: a
    mlxcy.chat.ChatTemplate (needed for chat rows, used for prompt/completion
    rows when given, as mlx-lm does). max_seq_length: longer examples are
    truncated with a warning (on_overflow="truncate") or rejected ("error").
    """

    def __init__(self, rows, tokenizer, template=None, mask_prompt=False,
                 max_seq_length=2048, on_overflow="truncate", source="<data>"):
        if on_overflow not in ("truncate", "error"):
            raise ValueError(f"on_overflow must be 'truncate' or 'error', got {on_overflow!r}")
        self.source = source
        self.items: list[tuple[list[int], int]] = []
        kinds = set()
        truncated = 0
        for n, row in rows:
            kind = _kind(row)
            if kind is None:
                raise DataError(f"{source}:{n}: unknown format: expected 'text', "
                                f"'prompt'+'completion' or 'messages', got keys {sorted(row)}")
            kinds.add(kind)
            try:
                toks, off = self._encode(kind, row, tokenizer, template, mask_prompt)
            except DataError as e:
                raise DataError(f"{source}:{n}: {e}") from None
            if len(toks) < 2:
                raise DataError(f"{source}:{n}: fewer than 2 tokens after tokenization")
            if len(toks) > max_seq_length:
                if on_overflow == "error":
                    raise DataError(f"{source}:{n}: {len(toks)} tokens exceed max_seq_length "
                                    f"{max_seq_length}")
                toks = toks[:max_seq_length]
                truncated += 1
            if off >= len(toks):
                warnings.warn(f"{source}:{n}: the prompt fills the whole sequence; "
                              f"no token of this example is trained")
            self.items.append((toks, off))
        if len(kinds) > 1:
            raise DataError(f"{source}: mixed formats {sorted(kinds)} in one file")
        if truncated:
            warnings.warn(f"{source}: {truncated} example(s) longer than {max_seq_length} "
                          f"tokens were truncated")
        self.kind = kinds.pop() if kinds else None

    @staticmethod
    def _encode(kind, row, tok, template, mask_prompt):
        eos = tok.eos_id
        if kind == "text":
            text = row["text"]
            if not isinstance(text, str):
                raise DataError("'text' must be a string")
            ids = tok.encode(text, add_special_tokens=True)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            return ids, 0
        if kind == "completions":
            p, c = row["prompt"], row["completion"]
            if not isinstance(p, str) or not isinstance(c, str):
                raise DataError("'prompt' and 'completion' must be strings")
            if template is not None:
                msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                return Dataset._chat(msgs, tok, template, mask_prompt)
            pids = tok.encode(p, add_special_tokens=True)
            ids = pids + tok.encode(c, add_special_tokens=False)
            if eos is not None and ids[-1] != eos:
                ids.append(eos)
            return ids, (len(pids) if mask_prompt else 0)
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and "role" in m for m in msgs):
            raise DataError("'messages' must be a non-empty list of {role, content} objects")
        if template is None:
            raise DataError("chat data needs a chat template (the tokenizer has none)")
        return Dataset._chat(msgs, tok, template, mask_prompt)

    @staticmethod
    def _chat(msgs, tok, template, mask_prompt):
        from mlxcy.chat import ChatTemplateError
        try:
            full = template.render(msgs, add_generation_prompt=False)
            prompt = template.render(msgs[:-1], add_generation_prompt=True) if mask_prompt else ""
        except ChatTemplateError as e:
            raise DataError(f"chat template: {e}") from None
        ids = _encode_rendered(tok, full)
        off = len(_encode_rendered(tok, prompt)) if mask_prompt else 0
        return ids, off

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def ntokens(self):
        return sum(len(t) for t, _ in self.items)


def _encode_rendered(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    bos = tok.bos_id
    if getattr(tok, "add_bos", False) and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def load_datasets(data, tokenizer, template=None, mask_prompt=False, max_seq_length=2048,
                  on_overflow="truncate", splits=("train", "valid")):
    """{split: Dataset} from a directory of <split>.jsonl files (a missing
    valid/test split is None; a missing train split is an error)."""
    d = Path(data)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: data directory not found (expected train.jsonl, "
                                f"valid.jsonl)")
    out = {}
    for s in splits:
        p = d / f"{s}.jsonl"
        if not p.exists():
            if s == "train":
                raise FileNotFoundError(f"{p}: training data not found")
            out[s] = None
            continue
        out[s] = Dataset(load_jsonl(p), tokenizer, template, mask_prompt, max_seq_length,
                         on_overflow, source=str(p))
    return out


def pad_batch(items, pad_to=8, max_len=None, pad_id=0):
    """(ids int32 [B, T], offsets [B], lengths [B]) right-padded to a multiple
    of pad_to (at most max_len)."""
    lengths = [len(t) for t, _ in items]
    T = max(lengths)
    T = pad_to * ((T + pad_to - 1) // pad_to)
    if max_len is not None:
        T = min(T, max_len)
    ids = np.full((len(items), T), pad_id, np.int32)
    for i, (t, _) in enumerate(items):
        ids[i, :len(t)] = t[:T]
    return (ids, np.array([o for _, o in items], np.int32),
            np.array([min(n, T) for n in lengths], np.int32))


def iterate_batches(dataset, batch_size, shuffle=True, seed=0, loop=False, pad_to=8,
                    max_len=None, drop_last=None):
    """Length-bucketed batches: examples sorted by length are cut into groups
    of batch_size (so a batch pads little); with shuffle the order of the
    groups is permuted every epoch by a generator seeded with (seed, epoch).
    Yields pad_batch() tuples. loop=True repeats forever."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{getattr(dataset, 'source', 'dataset')}: the dataset is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if loop and n < batch_size:
        raise DataError(f"{getattr(dataset, 'source', 'dataset')}: {n} examples, fewer than "
                        f"the batch size {batch_size}")
    order = sorted(range(n), key=lambda i: len(dataset[i][0]))
    groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last is None:
        drop_last = loop
    if drop_last and len(groups[-1]) < batch_size and len(groups) > 1:
        groups = groups[:-1]
    epoch = 0
    while True:
        idx = range(len(groups))
        if shuffle:
            idx = np.random.default_rng([seed, epoch]).permutation(len(groups))
        for g in idx:
            yield pad_batch([dataset[i] for i in groups[g]], pad_to, max_len)
        epoch += 1
        if not loop:
            return
