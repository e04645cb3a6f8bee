"""Batch inference (mlxcy.generation.batch): classify and batch_generate on tiny fp32
random-weight models (Qwen3, and Gemma3 with a 6-token sliding window)
saved as Hugging Face directories with the real Qwen3 tokenizer.  Every
result is compared with an independent reference: the same prompt run alone
(mlxcy's single-sequence forward / token loop) and transformers."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlxcy
from mlxcy import assets
from mlxcy.generation.batch import batch_generate, classify
from mlxcy.generation.engine import Engine
from mlxcy.generation.inference import load

WINDOW = 6
PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over the lazy dog and then runs into the forest",
    "A",
    "One two three four five six",
    "Batch inference pads on the left, so that every prompt ends together.",
]


def _make(kind, d, window=WINDOW):
    common = dict(vocab_size=151936, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(rope_theta=10000.0, **common)
    else:
        cfg = transformers.Gemma3TextConfig(
            query_pre_attn_scalar=16, sliding_window=window,
            layer_types=["sliding_attention", "full_attention"], sliding_window_pattern=2,
            hidden_activation="gelu_pytorch_tanh", **common)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():   # wide logits (few greedy near-ties), non-trivial norms
        m.model.embed_tokens.weight.mul_(8.0 if kind == "qwen3" else 4.0)
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if kind == "gemma3" else 1.0))
    m.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(assets.qwen3_tokenizer_dir() / f, d / f)
    return m


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def tiny(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = _make(request.param, d)
    tm = load(d, dtype="float32")
    yield SimpleNamespace(kind=request.param, dir=d, hf=hf, tm=tm)
    tm.close()


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _alone_logprobs(tm, ids):
    """Last-position log-probs of one prompt run alone through the same model."""
    return _log_softmax(np.array(tm.model([ids]))[0, -1])


def _hf_logprobs(hf, ids):
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()


# ------------------------------------------------------------------ classify --

@pytest.mark.parametrize("batch_size", [None, 2])
def test_classify_matches_single_prompts(tiny, batch_size):
    tm = tiny.tm
    res = classify(tm, PROMPTS, top_k=4, return_logits=True, batch_size=batch_size)
    assert len(res) == len(PROMPTS)
    for p, r in zip(PROMPTS, res):
        ids = tm.tokenizer.encode(p)
        ref = _alone_logprobs(tm, ids)
        got = _log_softmax(r.logits)
        assert r.logits.shape == (151936,)
        assert np.abs(got - ref).max() <= 1e-4
        want = np.argsort(-ref, kind="stable")[:4]
        assert r.top_ids.tolist() == want.tolist()
        np.testing.assert_allclose(np.log(r.top_probs), ref[want], atol=1e-4)
        # transformers agrees too (looser: a different implementation)
        hf = _hf_logprobs(tiny.hf, ids)[-1]
        assert np.abs(got - hf).max() <= 2e-3
    if tiny.kind == "gemma3":   # the long prompts really exceed the window
        assert max(len(tm.tokenizer.encode(p)) for p in PROMPTS) > 2 * WINDOW


TEMPLATE = "Classify the sentiment of the review as positive or negative.\nReview: {}\nSentiment:"
REVIEWS = ["great", "I did not enjoy a single minute of it, the plot dragged on and on", "ok",
           "Fine.", "A wonderful film with a moving story and excellent music"]


@pytest.fixture(scope="module")
def wide_gemma(tmp_path_factory):
    """Gemma 3 with a 48-token window: the template's prompts fit in it."""
    d = tmp_path_factory.mktemp("gemma3_wide")
    hf = _make("gemma3", d, window=48)
    tm = load(d, dtype="float32")
    yield SimpleNamespace(kind="gemma3_wide", dir=d, hf=hf, tm=tm)
    tm.close()


def test_buckets_limit_padding_where_asked():
    """classify's batches: longest first, at most batch_size prompts, and (a
    CPU's CPU_PAD_SHARE) a batch ends where the next prompt would pad more
    than that share of its positions."""
    from mlxcy.generation.batch import CPU_PAD_SHARE, _buckets
    lengths = [10, 32, 8, 20, 9, 30]
    assert _buckets(lengths, 16) == [[1, 5, 3, 0, 4, 2]]
    assert _buckets(lengths, 2) == [[1, 5], [3, 0], [4, 2]]
    # 32, 30, 20 pad 14 of 96 positions; adding 10 would pad 36 of 128
    assert _buckets(lengths, 16, 0.25) == [[1, 5, 3], [0, 4, 2]]
    assert _buckets(lengths, 16, 0.0) == [[1], [5], [3], [0], [4], [2]]
    assert _buckets([7] * 5, 16, 0.0) == [[0, 1, 2, 3, 4]]
    assert CPU_PAD_SHARE == 0.1


@pytest.mark.parametrize("batch_size", [None, 2])
@pytest.mark.parametrize("which", ["tiny", "wide_gemma"])
def test_classify_with_a_shared_prefix_matches_single_prompts(request, tiny, which, batch_size):
    """Prompts that start alike (a template) share the prefix's keys and
    values within a batch (computed once; Gemma's sliding layers too where
    the window holds the prompts); each result equals the prompt run alone,
    and transformers'.  The tiny Gemma's 6-token window is shorter than the
    prompts, so there the batch runs whole."""
    from mlxcy.generation.batch import SHARED_PREFIX_MIN, _min_window, _shared_prefix
    if which == "wide_gemma" and tiny.kind != "qwen3":
        pytest.skip("the wide Gemma runs once, beside the qwen3 fixture")
    m = tiny if which == "tiny" else request.getfixturevalue("wide_gemma")
    tm = m.tm
    prompts = [TEMPLATE.format(r) for r in REVIEWS]
    encoded = [tm.tokenizer.encode(p) for p in prompts]
    shared = _shared_prefix(encoded, _min_window(tm.model))
    assert shared == 0 if m.kind == "gemma3" else shared >= SHARED_PREFIX_MIN
    res = classify(tm, prompts, top_k=4, return_logits=True, batch_size=batch_size)
    for p, r in zip(prompts, res):
        ids = tm.tokenizer.encode(p)
        ref = _alone_logprobs(tm, ids)
        got = _log_softmax(r.logits)
        assert np.abs(got - ref).max() <= 1e-4
        assert r.top_ids.tolist() == np.argsort(-ref, kind="stable")[:4].tolist()
        assert np.abs(got - _hf_logprobs(m.hf, ids)[-1]).max() <= 2e-3


@pytest.mark.parametrize("batch_size", [2, 16])
def test_label_scores_with_a_shared_prefix_match_single_prompts(request, tiny, batch_size):
    """Multi-token labels after prompts from one template: a batch of
    (prompt, label) rows shares the prompts' common start (or a whole
    prompt, between its own labels), computed once; every score equals the
    prompt and label run alone, and transformers'."""
    if tiny.kind != "qwen3":
        pytest.skip("the wide Gemma runs once, beside the qwen3 fixture")
    labels = [" positive", " rather good", " quite bad, really"]
    for m in (tiny, request.getfixturevalue("wide_gemma")):
        tm = m.tm
        toks = [tm.tokenizer.encode(lab, add_special_tokens=False) for lab in labels]
        assert [len(t) > 1 for t in toks][1:] == [True, True]
        prompts = [TEMPLATE.format(r) for r in REVIEWS]
        res = classify(tm, prompts, labels=labels, top_k=0, batch_size=batch_size)
        for p, r in zip(prompts, res):
            ids = tm.tokenizer.encode(p)
            for lab, t in zip(labels, toks):
                full = _log_softmax(np.array(tm.model([ids + t]))[0])
                alone = sum(full[len(ids) - 1 + k, t[k]] for k in range(len(t)))
                assert abs(r.scores[lab] - alone) <= 1e-4
                lp = _hf_logprobs(m.hf, ids + t)
                assert r.scores[lab] == pytest.approx(
                    sum(lp[len(ids) - 1 + k, t[k]] for k in range(len(t))), abs=2e-3)


@pytest.mark.parametrize("seqs, want", [
    ([list(range(12)) + [5], list(range(12)) + [6, 7]], 12),
    ([list(range(9)), list(range(9)) + [1, 2]], 8),         # each keeps its last token
    ([list(range(12)), list(range(6)) + [0] * 6], 0),       # 6 shared: below the minimum
    ([[9] + list(range(12)), list(range(13))], 0),
    ([list(range(20))], 0),                                  # one sequence: nothing to share
])
def test_shared_prefix_exact(seqs, want):
    from mlxcy.generation.batch import SHARED_PREFIX_MIN, _shared_prefix
    assert SHARED_PREFIX_MIN == 8
    assert _shared_prefix(seqs) == want
    # a sliding window shorter than the longest sequence: nothing shared
    longest = max(len(s) for s in seqs)
    assert _shared_prefix(seqs, window=longest) == want
    assert _shared_prefix(seqs, window=longest - 1) == 0


def test_classify_label_scores(tiny):
    tm = tiny.tm
    labels = [" yes", " no", " the lazy dog", " maybe so"]
    toks = [tm.tokenizer.encode(lab, add_special_tokens=False) for lab in labels]
    assert [len(t) for t in toks][:2] == [1, 1] and len(toks[2]) == 3
    res = classify(tm, PROMPTS, labels=labels, top_k=0, batch_size=3)
    for p, r in zip(PROMPTS, res):
        ids = tm.tokenizer.encode(p)
        assert r.top_ids.size == 0 and r.logits is None
        for lab, t in zip(labels, toks):
            lp = _hf_logprobs(tiny.hf, ids + t)
            want = sum(lp[len(ids) - 1 + k, t[k]] for k in range(len(t)))
            assert r.scores[lab] == pytest.approx(want, abs=2e-3)
            # and against mlxcy run alone on prompt + label (tight)
            full = _log_softmax(np.array(tm.model([ids + t]))[0])
            alone = sum(full[len(ids) - 1 + k, t[k]] for k in range(len(t)))
            assert abs(r.scores[lab] - alone) <= 1e-4
        assert r.label == max(labels, key=r.scores.get)


def test_classify_bad_input(tiny):
    tm = tiny.tm
    with pytest.raises(ValueError, match="empty"):
        classify(tm, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        classify(tm, ["ok", ""])            # the Qwen3 tokenizer adds no BOS
    with pytest.raises(ValueError, match="prompt 2 has 300 tokens"):
        classify(tm, ["a", "b", list(range(300))])
    with pytest.raises(ValueError, match="label '' encodes to no tokens"):
        classify(tm, ["a"], labels=[" x", ""])
    with pytest.raises(ValueError, match="distinct"):
        classify(tm, ["a"], labels=[" x", " x"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        classify(tm, [[1, 2, 10 ** 7]])
    with pytest.raises(TypeError, match="prompt 0"):
        classify(tm, [3.5])
    with pytest.raises(TypeError, match="list of strings"):
        classify(tm, "a single string")
    with pytest.raises(ValueError, match="batch_size"):
        classify(tm, ["a"], batch_size=0)
    with pytest.raises(TypeError, match="mlxcy TextModel"):
        classify(object(), ["a"])


def test_token_id_prompts_and_bos_for_empty_string(tiny):
    tm = tiny.tm
    ids = tm.tokenizer.encode(PROMPTS[1])
    a = classify(tm, [ids], return_logits=True)[0]
    b = classify(tm, [PROMPTS[1]], return_logits=True)[0]
    np.testing.assert_array_equal(a.logits, b.logits)
    # A tokenizer that adds a BOS token: an empty string is the BOS alone.
    tok = SimpleNamespace(encode=lambda s, add_special_tokens=True: ([7] if add_special_tokens
                                                                     else []) + (
        tm.tokenizer.encode(s, False) if s else []), eos_ids=frozenset())
    fake = SimpleNamespace(model=tm.model, tokenizer=tok)
    r = classify(fake, ["", "x"], return_logits=True)
    assert np.abs(_log_softmax(r[0].logits) - _alone_logprobs(tm, [7])).max() <= 1e-4


# ------------------------------------------------------------ batch_generate --

def _single(tm, ids, n, **kw):
    return [(t.id, t.logprob) for t in tm.stream_ids(ids, max_tokens=n, logprobs=True, **kw)
            if t.id >= 0]


def test_batch_generate_greedy_matches_single(tiny):
    tm = tiny.tm
    out = batch_generate(tm, PROMPTS, max_tokens=14, logprobs=True)
    assert len(out) == len(PROMPTS)
    for i, p in enumerate(PROMPTS):
        ids = tm.tokenizer.encode(p)
        ref = _single(tm, ids, 14)
        assert out.token_ids[i] == [t for t, _ in ref]
        np.testing.assert_allclose(out.logprobs[i], [lp for _, lp in ref], atol=1e-4)
        assert out.texts[i] == tm.generate(p, max_tokens=14)
        assert out.stop_reasons[i] in ("length", "eos")
    m = out.metrics
    assert m.prompts == 5 and m.generated_tokens == sum(map(len, out.token_ids))
    assert m.prompt_tokens == sum(len(tm.tokenizer.encode(p)) for p in PROMPTS)
    assert m.tokens_per_second > 0 and m.prompts_per_second > 0 and m.peak_memory > 0


@pytest.mark.parametrize("batch_size", [None, 2])
def test_batch_generate_with_a_shared_prefix_matches_single(tiny, batch_size):
    """Prompts from one template: their common start is prefilled once and
    each sequence brings it as a prefix cache (not on the Gemma, whose
    sliding window takes the batch whole); the tokens and log-probs are each
    prompt's generated alone, also when the prompts join in several groups
    (batch_size 2)."""
    tm = tiny.tm
    prompts = [TEMPLATE.format(r) for r in REVIEWS]
    out = batch_generate(tm, prompts, max_tokens=12, logprobs=True, batch_size=batch_size)
    for i, p in enumerate(prompts):
        ref = _single(tm, tm.tokenizer.encode(p), 12)
        assert out.token_ids[i] == [t for t, _ in ref]
        np.testing.assert_allclose(out.logprobs[i], [lp for _, lp in ref], atol=1e-4)
    assert out.metrics.prefill_time > 0


def test_batch_generate_matches_transformers(tiny):
    tm = tiny.tm
    prompts = PROMPTS[:3]
    out = batch_generate(tm, prompts, max_tokens=10)
    for i, p in enumerate(prompts):
        ids = tm.tokenizer.encode(p)
        with torch.no_grad():
            g = tiny.hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 min_new_tokens=10, eos_token_id=None, pad_token_id=0)
        want = g[0, len(ids):].tolist()
        got = out.token_ids[i]
        assert got == want[:len(got)] and (len(got) == 10 or want[len(got)] in tm.tokenizer.eos_ids)


def test_rows_finish_at_different_times(tiny):
    """Per-prompt max_tokens, stop ids and stop strings: finished rows leave
    the batch and the rest continue exactly as alone."""
    tm = tiny.tm
    full = [[t for t, _ in _single(tm, tm.tokenizer.encode(p), 16)] for p in PROMPTS]
    text2 = tm.generate(PROMPTS[2], max_tokens=16)
    stop_str = text2[3:5] if len(text2) >= 5 else None
    options = [{"max_tokens": 3}, {"stop_ids": [full[1][5]]}, {"stop": [stop_str] if stop_str else []},
               {"max_tokens": 1}, {}]
    out = batch_generate(tm, PROMPTS, options=options, max_tokens=16, batch_size=4)
    assert out.token_ids[0] == full[0][:3] and out.stop_reasons[0] == "length"
    k = full[1].index(full[1][5])
    assert out.token_ids[1] == full[1][:k] and out.stop_reasons[1] == "eos"
    if stop_str:
        assert out.texts[2] == tm.generate(PROMPTS[2], max_tokens=16, stop=[stop_str])
        assert out.stop_reasons[2] == "stop"
    assert out.token_ids[3] == full[3][:1]
    assert out.token_ids[4] == full[4][:len(out.token_ids[4])]
    assert len(out.token_ids[4]) == 16 or out.stop_reasons[4] == "eos"
    z = batch_generate(tm, PROMPTS[:2], options=[{"max_tokens": 0}, {}], max_tokens=4)
    assert z.token_ids[0] == [] and z.token_ids[1] == full[1][:4]


def test_per_sequence_sampling(tiny):
    """One row greedy, one seeded at temperature 0.8: each equals that
    prompt generated alone with its own settings."""
    tm = tiny.tm
    samp = {"temperature": 0.8, "seed": 11}
    out = batch_generate(tm, PROMPTS[:3], options=[{}, samp, {"temperature": 0.0}],
                         max_tokens=10)
    for i, kw in enumerate([{}, samp, {}]):
        ids = tm.tokenizer.encode(PROMPTS[i])
        assert out.token_ids[i] == [t for t, _ in _single(tm, ids, 10, **kw)]
    # a shared seeded sampler is reproducible run to run
    a = batch_generate(tm, PROMPTS[:3], max_tokens=8, temperature=1.0, seed=3)
    b = batch_generate(tm, PROMPTS[:3], max_tokens=8, temperature=1.0, seed=3)
    assert a.token_ids == b.token_ids


def _penalized_greedy(tm, ids, n, penalty, ctx):
    """Reference: full recompute per step, numpy repetition penalty, argmax."""
    ids, out = list(ids), []
    for _ in range(n):
        logits = np.array(tm.model([ids]))[0, -1].astype(np.float64)
        seen = sorted(set(ids[-ctx:]))
        v = logits[seen]
        logits[seen] = np.where(v < 0, v * penalty, v / penalty)
        t = int(np.argmax(logits))
        if t in tm.tokenizer.eos_ids:
            break
        out.append(t)
        ids.append(t)
    return out


def test_per_sequence_repetition_penalty(tiny):
    """Penalty history per row (left-padded with -1): one row penalized, one
    not, against a step-by-step numpy reference."""
    tm = tiny.tm
    out = batch_generate(tm, PROMPTS[:2], max_tokens=8,
                         options=[{"repetition_penalty": 1.5, "repetition_context_size": 5}, {}])
    ids0, ids1 = (tm.tokenizer.encode(p) for p in PROMPTS[:2])
    assert out.token_ids[0] == _penalized_greedy(tm, ids0, 8, 1.5, 5)
    assert out.token_ids[1] == _penalized_greedy(tm, ids1, 8, 1.0, 1)
    shared = batch_generate(tm, PROMPTS[:2], max_tokens=8, repetition_penalty=2.0)
    assert shared.token_ids[1] == _penalized_greedy(tm, ids1, 8, 2.0, 20)


def test_cancellation_stops_every_row(tiny):
    tm = tiny.tm
    calls = []
    out = batch_generate(tm, PROMPTS[:3], max_tokens=50,
                         cancel=lambda: calls.append(1) or len(calls) > 6)
    assert out.stop_reasons == ["cancelled"] * 3
    # checked before the run and before every engine step: the rows stop
    # together, after the same number of tokens, each a prefix of its run
    n = len(out.token_ids[0])
    assert 1 <= n < 6 and len(calls) == 7
    for i in range(3):
        full = [t for t, _ in _single(tm, tm.tokenizer.encode(PROMPTS[i]), n)]
        assert out.token_ids[i] == full


def test_batch_generate_bad_input(tiny):
    tm = tiny.tm
    with pytest.raises(ValueError, match="empty"):
        batch_generate(tm, [])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        batch_generate(tm, [""])
    with pytest.raises(ValueError, match="prompt 1 has 300 tokens"):
        batch_generate(tm, ["a", list(range(300))])
    with pytest.raises(ValueError, match="prompt 1: .*max_context"):
        batch_generate(tm, ["a", "b c d e"], max_tokens=5, max_context=8)
    with pytest.raises(TypeError, match="unknown generation option"):
        batch_generate(tm, ["a"], max_tokenz=3)
    with pytest.raises(ValueError, match="one dict per prompt"):
        batch_generate(tm, ["a", "b"], options=[{}])
    with pytest.raises(ValueError, match="batch-wide"):
        batch_generate(tm, ["a"], options=[{"logprobs": True}])


# ------------------------------------------------------------------ quantized --

@pytest.fixture(scope="module")
def quantized(tiny):
    from mlxcy.models import build_model
    from mlxcy.models.load import load_weights
    from mlxcy.tokenizer import Tokenizer
    weights, config, _ = load_weights(tiny.dir)
    q = {"group_size": 32, "bits": 4}
    for name in list(weights):
        if name.endswith("_proj.weight") or name == "model.embed_tokens.weight":
            wq, s, b = mlxcy.ops.quantize(weights[name], 32, 4)
            base = name[:-len(".weight")]
            weights[name], weights[base + ".scales"], weights[base + ".biases"] = wq, s, b
    model = build_model(config, weights, quantization=q)
    yield SimpleNamespace(model=model, tokenizer=Tokenizer.load(tiny.dir))
    model.close()


def test_quantized_model(quantized):
    m, tok = quantized.model, quantized.tokenizer
    assert m.info()["quantization"] == {"bits": 4, "group_size": 32}
    res = classify(quantized, PROMPTS, return_logits=True, top_k=3)
    out = batch_generate(quantized, PROMPTS, max_tokens=10, logprobs=True)
    for i, p in enumerate(PROMPTS):
        ids = tok.encode(p)
        ref = _log_softmax(np.array(m([ids]))[0, -1])
        # 1e-3: on the CPU a prompt of < 4 tokens alone takes the int16
        # one-row products (docs/cpu.md), the batch the exact many-row ones
        assert np.abs(_log_softmax(res[i].logits) - ref).max() <= 1e-3
        eng = Engine(m, max_batch=1)
        eng.add(ids, max_tokens=10, logprobs=True)
        alone = []
        while eng.has_work():
            alone += [ev.token for ev in eng.step()]
        eng.close()
        want = []
        for t in alone:
            if t in tok.eos_ids:
                break
            want.append(t)
        assert out.token_ids[i] == want


def test_text_model_methods_route_to_batch(tiny):
    tm = tiny.tm
    prompts = ["hello there", "a b c"]
    via_method = tm.classify(prompts, top_k=3)
    assert [list(map(int, r.top_ids)) for r in via_method] == \
        [list(map(int, r.top_ids)) for r in classify(tm, prompts, top_k=3)]
    out = tm.batch_generate(prompts, max_tokens=4)
    assert out.token_ids == batch_generate(tm, prompts, max_tokens=4).token_ids
