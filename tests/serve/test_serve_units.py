"""Parts of `mlxcy serve` that need no server: tool-call parsing for the Qwen and
Llama 3 styles, streamed hold-back, request validation, the worker's ByteLevel
detokenizer (against decode and TextStream), a lagging stream's coalesced
writes, the prefix tree (on
tiny random-weight models, against brute force and an uncached forward pass), and the
grammar mask (every allowed path parses; against jsonschema)."""
import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("starlette")

from mlxcy.serve import tools as T  # noqa: E402
from mlxcy.serve.errors import APIError  # noqa: E402
from mlxcy.serve import schemas  # noqa: E402


# ------------------------------------------------------------------ tools --

def test_qwen_tool_calls_parsed():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    content, calls = T.parse_tool_calls(text, T.QWEN, ["get_weather", "get_time"])
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


# arguments nested past Python's recursion limit: json.loads raises RecursionError
DEEP = '{"name": "get_weather", "arguments": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"


@pytest.mark.parametrize("text", [
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
    "no call at all",
    "<tool_call>\n" + DEEP + "\n</tool_call>",
])
def test_qwen_malformed_or_unknown_stays_content(text):
    assert T.parse_tool_calls(text, T.QWEN, ["get_weather"]) == (text, [])


def test_llama_nested_too_deep_stays_content():
    assert T.parse_tool_calls(DEEP, T.LLAMA, ["get_weather"]) == (DEEP, [])


def test_llama_tool_calls_parsed():
    text = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}'
    content, calls = T.parse_tool_calls(text, T.LLAMA, ["get_weather"])
    assert content is None and len(calls) == 1
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    two = ('<|python_tag|>{"name": "a", "parameters": {"x": "}{"}}; '
           '{"name": "b", "parameters": {}}')
    _, calls = T.parse_tool_calls(two, T.LLAMA, ["a", "b"])
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": "}{"}
    plain = "The weather is nice."
    assert T.parse_tool_calls(plain, T.LLAMA, ["a"]) == (plain, [])
    assert T.parse_tool_calls('{"name": "a", "parameters": {}} trailing', T.LLAMA, ["a"])[1] == []


def test_style_detection(tmp_path):
    from mlxcy import assets
    from mlxcy.chat import ChatTemplate
    try:
        qwen = json.loads((assets.qwen3_tokenizer_dir() / "tokenizer_config.json").read_text())
    except FileNotFoundError:
        pytest.skip("qwen tokenizer not installed")
    assert T.style_for(qwen["chat_template"], "qwen3") == T.QWEN
    from mlxcy.chat import builtin
    # Llama 3.1+ templates spell the call format out (a fragment of Meta's template)
    llama31 = ('{%- if tools is not none %}Given the following functions, respond with a JSON '
               'for a function call with its proper arguments ... {"name": function name, '
               '"parameters": dictionary of argument name and its value}.{%- endif %}'
               '{{- "<|python_tag|>" + tool_call.arguments }}')
    assert T.style_for(llama31, "llama") == T.LLAMA
    llama = builtin("llama3.2")               # no tools in the builtin fallback
    llama = llama.source if isinstance(llama, ChatTemplate) else llama
    assert T.style_for(llama, "llama") is None
    assert T.style_for("{{ messages }}", "gemma3") is None


def test_tool_stream_holds_back_calls():
    ts = T.ToolStream(T.QWEN, ["f"])
    sent = "".join(ts.feed(p) for p in ["Sure", ", one moment.", "\n<tool", "_call>\n{\"name\"",
                                        ": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"])
    assert sent == "Sure, one moment.\n"
    rest, calls = ts.finish()
    assert rest == "" and calls[0]["function"]["name"] == "f"
    # a "<" that does not start a call is released
    ts = T.ToolStream(T.QWEN, ["f"])
    out = ts.feed("a <") + ts.feed("b")
    assert out + ts.finish()[0] == "a <b"
    ts = T.ToolStream(T.LLAMA, ["f"])
    assert ts.feed(' {"name": "f", ') == "" and ts.feed('"parameters": {}}') == ""
    assert ts.finish()[1][0]["function"]["name"] == "f"
    ts = T.ToolStream(T.LLAMA, ["f"])
    assert ts.feed("Hello") == "Hello" and ts.finish() == ("", [])


# ------------------------------------------------------------- validation --

def test_parse_chat_fields():
    body = {"model": "m", "messages": [{"role": "developer", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "hi"}],
        "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1,
        "presence_penalty": 1, "frequency_penalty": -1, "repetition_penalty": 1.1,
        "logit_bias": {"5": -100}, "seed": -1, "stop": "x", "n": 2, "logprobs": True,
        "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True},
        "user": "u", "parallel_tool_calls": True}
    r = schemas.parse_chat(body, vocab_size=100, context=50)
    assert r.messages[0] == {"role": "system", "content": "ab"}
    assert r.max_tokens == 7 and r.n == 2 and r.stop == ["x"] and r.include_usage
    s = r.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (0.0, 0.5, 3, 0.1)
    assert s.logit_bias == {5: -100.0} and s.seed == 2 ** 64 - 1
    with pytest.raises(APIError) as e:
        schemas.parse_chat(dict(body, max_completion_tokens=51), 100, 50)
    assert e.value.param == "max_completion_tokens"


# ------------------------------------------------------------- streaming --

def test_byte_level_stream_matches_decode():
    """The worker's incremental detokenizer for ByteLevel tokenizers gives the
    text of decode(skip_special_tokens=True), and TextStream's text with stop
    strings, on ids mixing lone bytes (partial UTF-8), any token and specials."""
    from mlxcy import assets
    from mlxcy.generation.text_stream import TextStream
    from mlxcy.serve.worker import _ByteLevelStream, _plain_byte_level, _TokenBytes
    from mlxcy.tokenizer import Tokenizer
    tok = Tokenizer.load(assets.qwen3_tokenizer_dir())
    assert _plain_byte_level(tok)
    table = _TokenBytes(tok)
    special = sorted(tok.special_ids)
    rng = np.random.default_rng(0)

    def text(stream, ids):
        out = []
        for i in ids:
            piece, hit = stream.push(i)
            out.append(piece)
            if hit:
                break
        return "".join(out) + stream.finish()
    for trial in range(300):
        ids = [int(rng.integers(0, 256)) if r < 0.4 else int(rng.choice(special)) if r < 0.45
               else int(rng.integers(0, 151643)) for r in rng.random(30)]
        stops = [(), ("e",), ("the", "\n")][trial % 3]
        got = text(_ByteLevelStream(table, stops), ids)
        assert got == text(TextStream(tok, stops), ids), (ids, stops)
        if not stops:
            assert got == tok.decode(ids, skip_special_tokens=True)


def test_lagging_stream_coalesces_writes():
    """Items of several engine steps waiting in the queue go out as one write,
    one choice's tokens as one chunk; the chunks keep the OpenAI format."""
    from mlxcy.serve.app import _chat_stream
    from mlxcy.serve.worker import Item, Submission

    async def run():
        sub = Submission([1, 2], max_tokens=3)
        for items in ([Item("tok", "Hel", 5)], [Item("tok", "lo", 6)],
                      [Item("tok", " you", 7), Item("end", finish_reason="length")]):
            sub.queue.put_nowait((sub, items))
        sub.completion_tokens = 3
        st = SimpleNamespace(model_id="m", stop_ids=frozenset(),
                             worker=SimpleNamespace(cancel=lambda s: None))
        req = SimpleNamespace(include_usage=True, logprobs=False, top_logprobs=0, n=1)
        return [w async for w in _chat_stream(None, st, req, [sub], "chatcmpl-1", (None, None,
                                                                                  False))]
    writes = asyncio.run(run())
    assert len(writes) == 2                     # the role chunk, then all the rest
    first = json.loads(writes[0].removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    events = [e.removeprefix("data: ") for e in writes[1].split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [first] + [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["delta"] for c in chunks[1:3]] == [{"content": "Hello you"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:3]] == [None, None, "length"]
    assert all(c["usage"] is None for c in chunks[:3])
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------- prefix cache --
# The tree against brute force: the inserted sequences kept in a list, the
# longest common prefix computed by comparing ids, KV compared with an uncached
# prefill, bytes with the count of distinct prefixes (each position stored once).

def _tiny(tmp_path_factory, kind):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny
    from mlxcy.models.load import load_model
    d = tmp_path_factory.mktemp(f"pc_{kind}")
    make_tiny(kind, d)
    return load_model(d, dtype="float32")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    m = _tiny(tmp_path_factory, "llama")
    yield m
    m.close()


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    m = _tiny(tmp_path_factory, "gemma3_text")      # layers: sliding (window 8), full
    yield m
    m.close()


def _prefill(model, ids, cache):
    out = model(np.array([ids], np.int32), cache)
    return np.asarray(out.numpy())[0]


def _cached(model, ids):
    c = model.make_cache()
    _prefill(model, ids, c)
    return c


def _lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _pos_bytes(model):
    """Bytes of one position's keys and values over all layers (float32)."""
    c = _cached(model, [1])
    n = sum(np.asarray(lc.state()["keys"].numpy())[:, :, :1].nbytes * 2 for lc in c.layers)
    c.free()
    return n


def _sequences(rng, n, vocab=96):
    """Sequences that often share prefixes with earlier ones (and repeat some)."""
    out = []
    for i in range(n):
        if out and rng.random() < 0.7:
            base = out[rng.integers(len(out))]
            cut = int(rng.integers(0, len(base) + 1))
            s = base[:cut] + rng.integers(0, vocab, int(rng.integers(0, 8))).tolist()
        else:
            s = rng.integers(0, vocab, int(rng.integers(1, 24))).tolist()
        out.append(s or [int(rng.integers(vocab))])
    return out


def test_prefix_tree_matches_brute_force(tiny_model):
    from mlxcy.serve.prefix_cache import PrefixCache
    m = tiny_model
    rng = np.random.default_rng(0)
    pc = PrefixCache(m.make_cache, budget=1 << 30)
    seqs = _sequences(rng, 40)
    stored = []
    per_pos = _pos_bytes(m)
    for k, s in enumerate(seqs):
        pc.insert(s, _cached(m, s))
        stored.append(s)
        prefixes = {tuple(x[:i]) for x in stored for i in range(1, len(x) + 1)}
        assert pc.bytes == per_pos * len(prefixes)          # each position once
        leaves = {tuple(x) for x in stored if not any(
            len(y) > len(x) and y[:len(x)] == x for y in stored)}
        assert set(pc.sequences()) == leaves
        if k % 8 != 7:
            continue
        for _ in range(10):
            base = stored[rng.integers(len(stored))]
            q = base[:int(rng.integers(0, len(base) + 1))] + \
                rng.integers(0, 96, int(rng.integers(1, 6))).tolist()
            want = min(max(_lcp(q, x) for x in stored), len(q) - 1)
            cache, n = pc.lookup(q)
            assert n == want
            if n == 0:
                assert cache is None
                continue
            ref = _cached(m, q[:n])
            for lc, lr in zip(cache.layers, ref.layers):
                a, b = lc.state(), lr.state()
                assert a["offset"] == b["offset"] == n
                np.testing.assert_allclose(np.asarray(a["keys"].numpy())[:, :, :n],
                                           np.asarray(b["keys"].numpy())[:, :, :n],
                                           rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(np.asarray(a["values"].numpy())[:, :, :n],
                                           np.asarray(b["values"].numpy())[:, :, :n],
                                           rtol=1e-5, atol=1e-6)
            ref.free()
            got = _prefill(m, q[n:], cache)              # only the rest is prefilled
            want_logits = _prefill(m, q, m.make_cache())[n:]
            np.testing.assert_allclose(got, want_logits, rtol=1e-4, atol=1e-4)
            cache.free()
    before = pc.bytes
    assert before > 0 and pc.hits > 0
    cache, n = pc.lookup(seqs[0] + [1])
    cache.free()
    assert pc.bytes == before                        # lookups copy; the tree is unchanged


def test_prefix_tree_lru_eviction(tiny_model):
    """Sequences with distinct first tokens are separate leaves: the tree must
    evict exactly what a brute-force LRU over whole sequences evicts."""
    from collections import OrderedDict
    from mlxcy.serve.prefix_cache import PrefixCache
    m = tiny_model
    per_pos = _pos_bytes(m)
    rng = np.random.default_rng(1)
    budget_pos = 40
    pc = PrefixCache(m.make_cache, budget=budget_pos * per_pos)
    ref = OrderedDict()
    for step in range(60):
        first = int(rng.integers(0, 12))
        if rng.random() < 0.5 and ref:
            keys = list(ref)
            seq = list(keys[rng.integers(len(keys))])
            q = seq + [5]
            cache, n = pc.lookup(q)
            assert n == len(seq)
            cache.free()
            ref.move_to_end(tuple(seq))
            continue
        s = [first] + rng.integers(0, 96, int(rng.integers(3, 16))).tolist()
        if any(k[0] == first for k in ref):          # keep first tokens distinct
            continue
        pc.insert(s, _cached(m, s))
        ref[tuple(s)] = len(s)
        while sum(ref.values()) > budget_pos:
            ref.popitem(last=False)
        assert set(pc.sequences()) == set(ref)
        assert pc.bytes == per_pos * sum(ref.values()) <= pc.budget
    assert pc.evictions > 0
    # a shared prefix stays while a sequence through it is used; leaves go first
    pc.clear()
    p = [90] * 10
    a, b, c = p + [1, 2, 3, 4, 5], p + [6, 7, 8, 9, 10], p + [11, 12, 13, 14, 15]
    pc.budget = 21 * per_pos
    pc.insert(a, _cached(m, a))
    pc.insert(b, _cached(m, b))
    assert pc.bytes == 20 * per_pos
    pc.lookup(a + [0])[0].free()                     # a is newer than b now
    pc.insert(c, _cached(m, c))                      # 25 positions: one leaf must go
    assert set(pc.sequences()) == {tuple(a), tuple(c)} and pc.bytes == 20 * per_pos
    assert not pc.insert(p + [20] * 30, _cached(m, p + [20] * 30)) or pc.bytes <= pc.budget
    assert pc.bytes <= pc.budget


def test_prefix_tree_sliding_window(tiny_gemma):
    """A sliding-window layer keeps its last 8 positions: a prefix is usable
    only where those layers hold the 8 positions before it.  Reference: every
    position a sequence brought (all of it for the full layer, its last 8 for
    the sliding one), and the longest prefix whose needs are all met."""
    from mlxcy.serve.prefix_cache import PrefixCache
    m = tiny_gemma
    W = 8
    rng = np.random.default_rng(2)
    pc = PrefixCache(m.make_cache, budget=1 << 30)
    stored = []
    seqs = _sequences(rng, 24)
    hits = 0
    for k, s in enumerate(seqs):
        pc.insert(s, _cached(m, s))
        stored.append(s)
        held = {tuple(x[:p + 1]) for x in stored for p in range(max(0, len(x) - W), len(x))}
        for _ in range(4):
            base = stored[rng.integers(len(stored))]
            q = base[:int(rng.integers(0, len(base) + 1))] + \
                rng.integers(0, 96, int(rng.integers(1, 4))).tolist()
            top = min(max(_lcp(q, x) for x in stored), len(q) - 1)
            want = next((n for n in range(top, 0, -1)
                         if all(tuple(q[:p + 1]) in held for p in range(n - min(n, W), n))), 0)
            cache, n = pc.lookup(q)
            assert n == want, (q, n, want)
            if n:
                hits += 1
                got = _prefill(m, q[n:], cache)
                np.testing.assert_allclose(got, _prefill(m, q, m.make_cache())[n:],
                                           rtol=1e-4, atol=1e-4)
                cache.free()
    assert hits > 10
    long = list(range(1, 30))                         # the next turn of a long chat
    pc.insert(long, _cached(m, long))
    cache, n = pc.lookup(long + [40, 41])
    assert n == len(long)
    np.testing.assert_allclose(_prefill(m, [40, 41], cache),
                               _prefill(m, long + [40, 41], m.make_cache())[-2:],
                               rtol=1e-4, atol=1e-4)


def test_prefix_tree_frees_mlx_memory(tiny_model):
    """The tree keeps its own copies of the positions: the inserted caches'
    buffers (with their spare room) are freed once the copies are computed
    (flush), and clear() frees the copies."""
    from mlxcy import memory
    from mlxcy.serve.prefix_cache import PrefixCache
    m = tiny_model
    seqs = [[i] + list(range(20)) for i in range(8)]      # 21 positions in buffers of 256+
    base = memory.get_active_memory()
    caches = [_cached(m, s) for s in seqs]
    whole = sum(c.nbytes for c in caches)
    pc = PrefixCache(m.make_cache, budget=1 << 30)
    for s, c in zip(seqs, caches):
        pc.insert(s, c)
    pc.flush()
    assert pc.bytes == _pos_bytes(m) * 21 * 8 < 0.1 * whole
    assert memory.get_active_memory() - base <= pc.bytes + 0.1 * whole
    cache, n = pc.lookup(seqs[3] + [1])
    cache.free()
    pc.clear()
    assert memory.get_active_memory() <= base


def test_prefix_tree_min_tokens_and_flush(tiny_model):
    """A prefix shorter than min_tokens is a miss; inserts copy lazily and one
    flush computes every copy (lookups flush first)."""
    from mlxcy.serve.prefix_cache import PrefixCache
    m = tiny_model
    with pytest.raises(ValueError, match="min_tokens: must be >= 1, got 0"):
        PrefixCache(m.make_cache, budget=1 << 30, min_tokens=0)
    pc = PrefixCache(m.make_cache, budget=1 << 30, min_tokens=5)
    s = list(range(10, 22))
    pc.insert(s, _cached(m, s))
    assert pc._pending and pc.bytes == _pos_bytes(m) * len(s)
    pc.flush()
    assert not pc._pending
    assert pc.lookup(s[:4] + [90, 91]) == (None, 0) and pc.misses == 1
    cache, n = pc.lookup(s[:5] + [90])
    assert n == 5 and cache.offset == 5 and pc.hits == 1
    got = _prefill(m, [90], cache)
    np.testing.assert_allclose(got, _prefill(m, s[:5] + [90], m.make_cache())[5:],
                               rtol=1e-4, atol=1e-4)
    cache.free()


def test_worker_prefix_min_tokens_checked():
    from mlxcy.device import default_device
    from mlxcy.serve.worker import Worker, default_prefix_min_tokens
    with pytest.raises(ValueError, match="prefix_min_tokens: must be >= 1, got 0"):
        Worker("unused", prefix_min_tokens=0)
    assert default_prefix_min_tokens() == (16 if default_device().type == "cpu" else 128)
