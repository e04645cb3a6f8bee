"""mlxcy.train.data: mlx-lm's JSONL formats, prompt masking (compared with
the tokenization of the prompt alone), errors with line numbers, truncation,
length bucketing and seeded shuffling."""
import json

import numpy as np
import pytest

from mlxcy.train.data import (DataError, Dataset, load_jsonl, load_datasets,
                              iterate_batches, pad_batch)
from mlxcy.train.lora import make_batch_arrays


class Tok:
    """Whitespace tokenizer over 'tN' words (ids N); eos 1, bos 2 prepended."""
    eos_id, bos_id, add_bos = 1, 2, True

    def encode(self, text, add_special_tokens=True):
        ids = [int(w[1:]) for w in text.split()]
        return ([2] if add_special_tokens else []) + ids


def _write(p, rows):
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_text_format_appends_eos(tmp_path):
    ds = Dataset(load_jsonl(_write(tmp_path / "t.jsonl", [{"text": "t5 t6"}, {"text": "t7 t1"}])),
                 Tok())
    assert ds.kind == "text"
    assert ds[0] == ([2, 5, 6, 1], 0) and ds[1] == ([2, 7, 1], 0)


def test_completions_mask_prompt(tmp_path):
    rows = load_jsonl(_write(tmp_path / "c.jsonl", [{"prompt": "t5 t6", "completion": "t7 t8"}]))
    toks, off = Dataset(rows, Tok(), mask_prompt=True)[0]
    assert toks == [2, 5, 6, 7, 8, 1] and off == 3
    assert Dataset(rows, Tok())[0][1] == 0
    # the mask trains exactly the completion (and eos): targets 7 8 1
    ids, o, ln = pad_batch([(toks, off)], pad_to=8)
    x, y, m = make_batch_arrays(ids, o, ln)
    assert list(y[0][m[0] > 0]) == [7, 8, 1]


def test_chat_with_real_template_masks_all_but_last_message():
    from mlxcy.assets import smollm2_gguf
    from mlxcy.tokenizer import Tokenizer
    from mlxcy.chat import ChatTemplate
    path = smollm2_gguf()     # a missing asset skips (tests/conftest.py)
    tok = Tokenizer.load(path)
    tmpl = ChatTemplate(tok.chat_template, bos_token=tok.id_to_token(tok.bos_id),
                        eos_token=tok.id_to_token(tok.eos_id))
    msgs = [{"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."}]
    toks, off = Dataset([(1, {"messages": msgs})], tok, tmpl, mask_prompt=True)[0]
    prompt = tok.encode(tmpl.render(msgs[:1], add_generation_prompt=True),
                        add_special_tokens=False)
    assert toks[:len(prompt)] == prompt and off == len(prompt)
    assert "Four." in tok.decode(toks[off:])
    assert "two plus two" not in tok.decode(toks[off:])


def test_errors_name_file_and_line(tmp_path):
    p = _write(tmp_path / "bad.jsonl", [{"text": "t3"}, "{not json", {"text": "t4"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_jsonl(p)
    p = _write(tmp_path / "arr.jsonl", [{"text": "t3"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"arr.jsonl:2: expected a JSON object"):
        load_jsonl(p)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(tmp_path / "empty.jsonl")
    rows = load_jsonl(_write(tmp_path / "k.jsonl", [{"text": "t3 t4"}, {"foo": 1}]))
    with pytest.raises(DataError, match=r":2: unknown format"):
        Dataset(rows, Tok(), source="k.jsonl")
    rows = load_jsonl(_write(tmp_path / "m.jsonl", [{"text": "t3 t4"},
                                                    {"prompt": "t3", "completion": "t4"}]))
    with pytest.raises(DataError, match="mixed formats"):
        Dataset(rows, Tok())
    rows = load_jsonl(_write(tmp_path / "c.jsonl", [{"messages": [{"role": "user",
                                                                   "content": "t3"}]}]))
    with pytest.raises(DataError, match=r":1: chat data needs a chat template"):
        Dataset(rows, Tok())
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_datasets(tmp_path, Tok())


def test_overlong_truncated_with_warning_or_error(tmp_path):
    rows = load_jsonl(_write(tmp_path / "l.jsonl", [{"text": " ".join(["t5"] * 20)}]))
    with pytest.warns(UserWarning, match="truncated"):
        ds = Dataset(rows, Tok(), max_seq_length=8)
    assert len(ds[0][0]) == 8
    with pytest.raises(DataError, match=r":1: 22 tokens exceed max_seq_length 8"):
        Dataset(rows, Tok(), max_seq_length=8, on_overflow="error")


def test_bucketing_and_seeded_shuffle(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(i + 1, {"text": " ".join(["t9"] * int(n))}) for i, n in
            enumerate(rng.integers(1, 40, 23))]
    ds = Dataset(rows, Tok())
    batches = list(iterate_batches(ds, 4, shuffle=True, seed=3))
    assert sum(b[0].shape[0] for b in batches) == 23
    lens = sorted(len(t) for t, _ in ds.items)
    # each batch is a run of consecutive lengths in sorted order (bucketed)
    for ids, off, ln in batches:
        assert ids.shape[1] % 8 == 0 and ids.shape[1] >= ln.max()
    groups = sorted((sorted(b[2].tolist()) for b in batches), key=lambda g: (g[0], g[-1]))
    assert [n for g in groups for n in g] == lens
    again = list(iterate_batches(ds, 4, shuffle=True, seed=3))
    other = list(iterate_batches(ds, 4, shuffle=True, seed=4))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(batches, other))
    # looping: later epochs use new permutations, full batches only
    it = iterate_batches(ds, 4, shuffle=True, seed=3, loop=True)
    loop = [next(it) for _ in range(15)]
    assert all(b[0].shape[0] == 4 for b in loop)
    with pytest.raises(DataError, match="fewer than the batch size"):
        next(iterate_batches(ds, 50, loop=True))


def test_load_datasets_dir(tmp_path):
    _write(tmp_path / "train.jsonl", [{"text": "t3 t4"}] * 3)
    _write(tmp_path / "valid.jsonl", [{"text": "t5 t6 t7"}])
    ds = load_datasets(tmp_path, Tok(), splits=("train", "valid", "test"))
    assert len(ds["train"]) == 3 and len(ds["valid"]) == 1 and ds["test"] is None
