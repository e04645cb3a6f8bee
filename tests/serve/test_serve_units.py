"""Parts of `mlxcy serve` that need no server: tool-call parsing for the Qwen and
Llama 3 styles, streamed hold-back, request validation, the prefix cache (on
a tiny random-weight model, against an uncached forward pass), and the
grammar mask (every allowed path parses; against jsonschema)."""
import json

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


@pytest.mark.parametrize("text", [
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
    "no call at all",
])
def test_qwen_malformed_or_unknown_stays_content(text):
    assert T.parse_tool_calls(text, T.QWEN, ["get_weather"]) == (text, [])


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


# ----------------------------------------------------------- prefix cache --

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_models import make_tiny
    from mlxcy.models.load import load_model
    d = tmp_path_factory.mktemp("pc_llama")
    make_tiny("llama", d)
    m = load_model(d, dtype="float32")
    yield m
    m.close()


def _prefill(model, ids, cache):
    out = model(np.array([ids], np.int32), cache)
    return np.asarray(out.numpy())[0]


def test_prefix_cache_copy_trim_and_entry_unchanged(tiny_model):
    from mlxcy.serve.prefix_cache import PrefixCache
    m = tiny_model
    rng = np.random.default_rng(0)
    a = rng.integers(0, 96, 20).tolist()
    b = a[:12] + rng.integers(0, 96, 6).tolist()
    pc = PrefixCache(m.make_cache, budget=1 << 30)
    c = m.make_cache()
    _prefill(m, a, c)
    assert pc.insert(a, c)
    assert pc.lookup([1, 2, 3]) == (None, 0) and pc.misses == 1
    for _ in range(2):                       # the entry survives being used
        cache, n = pc.lookup(b)
        assert n == 12 and cache.offset == 12
        got = _prefill(m, b[12:], cache)     # only the rest is prefilled
        want = _prefill(m, b, m.make_cache())[12:]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        cache.free()
    cache, n = pc.lookup(a)                  # a whole cached prompt: one token left
    assert n == len(a) - 1
    np.testing.assert_allclose(_prefill(m, a[-1:], cache), _prefill(m, a, m.make_cache())[-1:],
                               rtol=1e-4, atol=1e-4)
    assert pc.hits == 3


def test_prefix_cache_budget_and_supersede(tiny_model):
    from mlxcy.serve.prefix_cache import PrefixCache
    m = tiny_model
    c = m.make_cache()
    _prefill(m, list(range(10)), c)
    one = c.nbytes
    pc = PrefixCache(m.make_cache, budget=2 * one + 1)
    for k in range(3):
        ids = [k + 1] * 10
        c = m.make_cache()
        _prefill(m, ids, c)
        assert pc.insert(ids, c)
    assert len(pc) == 2 and pc.evictions == 1 and pc.bytes <= pc.budget
    assert pc.lookup([1] * 11) == (None, 0)          # the oldest went first
    assert pc.lookup([3] * 11)[1] == 10
    longer = [3] * 14                                 # supersedes its prefix entry
    c = m.make_cache()
    _prefill(m, longer, c)
    pc.insert(longer, c)
    assert sorted(len(e[0]) for e in pc.entries.values()) == [10, 14]
    c = m.make_cache()
    _prefill(m, [3] * 5, c)
    assert not pc.insert([3] * 5, c)                  # already held by a longer entry
    assert not pc.insert([9], m.make_cache())         # cache does not hold those ids


# ---------------------------------------------------------------- grammar --

def test_grammar_mask_walks_only_valid_json():
    from mlxcy import assets
    from mlxcy.tokenizer import Tokenizer
    from mlxcy.serve.grammar import Grammars
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("llguidance")
    tok = Tokenizer.load(assets.qwen3_tokenizer_dir())
    g = Grammars(tok, 151936, [151645])
    schema = {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5},
        "s": {"type": "string", "maxLength": 5}}, "required": ["ok", "n", "s"],
        "additionalProperties": False}
    make = g.compile_json(schema, "schema")
    rng = np.random.default_rng(0)
    for trial in range(5):
        mask = make()
        out = []
        for _ in range(60):
            allowed = mask(out)
            assert allowed.shape == (151936,) and allowed.dtype == bool
            assert not allowed[151669:].any() or allowed[151645]   # no padding ids
            t = int(rng.choice(np.flatnonzero(allowed)))
            if t == 151645:
                break
            out.append(t)
        else:
            pytest.fail("the grammar never let the sequence end")
        obj = json.loads(tok.decode(out))
        jsonschema.validate(obj, schema)
    with pytest.raises(APIError) as e:
        g.compile_json({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "p")
    assert e.value.status == 400 and e.value.param == "p"
