"""The "mlx_lm" backend honours every generation option it is given: the
same token ids, stops, penalties and log-probs as mlxcy's own backend on a
tiny fp32 Qwen3 (two independent engines over the same weights)."""
import numpy as np
import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("torch")

import mlxcy
from mlxcy import assets

VOCAB = 151936


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random Qwen3 with the real Qwen3 tokenizer (both backends read it)."""
    import shutil
    import torch
    import transformers
    d = tmp_path_factory.mktemp("qwen3")
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():        # wide logits: no greedy near-ties between engines
        hf.model.embed_tokens.weight.mul_(8.0)
    hf.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.qwen3_tokenizer_dir() / f, d / f)
    ours = mlxcy.load(d, dtype="float32")
    theirs = mlxcy.load(d, backend="mlx_lm")
    yield ours, theirs
    ours.close()
    theirs.close()


IDS = np.random.default_rng(4).integers(100, 30000, 9).tolist()


def _ids(tm, **o):
    return [t.id for t in tm.stream_ids(IDS, **o) if t.id >= 0]


@pytest.mark.parametrize("opts", [
    dict(max_tokens=10),
    dict(max_tokens=10, repetition_penalty=1.5),
    dict(max_tokens=10, presence_penalty=2.0),
    dict(max_tokens=10, frequency_penalty=2.0),
    dict(max_tokens=10, logit_bias={5: 100.0}),
])
def test_same_tokens_as_mlxcy(pair, opts):
    ours, theirs = pair
    assert _ids(theirs, **opts) == _ids(ours, **opts)


def test_penalties_are_not_ignored(pair):
    _, theirs = pair
    plain = _ids(theirs, max_tokens=12)
    assert _ids(theirs, max_tokens=12, presence_penalty=5.0) != plain
    assert _ids(theirs, max_tokens=12, frequency_penalty=5.0) != plain


def test_stop_ids_and_stop_strings(pair):
    ours, theirs = pair
    ref = _ids(ours, max_tokens=10)
    got = _ids(theirs, max_tokens=10, stop_ids=[ref[4]])
    assert got == ref[:ref.index(ref[4])] and theirs.metrics().stop_reason == "eos"
    full = "".join(t.text for t in theirs.stream_ids(IDS, max_tokens=10))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = "".join(t.text for t in theirs.stream_ids(IDS, max_tokens=10, stop=[stop]))
    assert cut == full[:full.index(stop)] and theirs.metrics().stop_reason == "stop"


def test_logprobs(pair):
    ours, theirs = pair
    a = [t.logprob for t in ours.stream_ids(IDS, max_tokens=6, logprobs=True)]
    b = [t.logprob for t in theirs.stream_ids(IDS, max_tokens=6, logprobs=True)]
    assert None not in b and np.allclose(a, b, atol=1e-4)


def test_max_context_and_bad_options(pair):
    _, theirs = pair
    with pytest.raises(ValueError, match="max_context"):
        list(theirs.stream_ids(IDS, max_tokens=10, max_context=12))
    with pytest.raises(TypeError, match="unknown generation option"):
        list(theirs.stream_ids(IDS, max_tokenz=3))
