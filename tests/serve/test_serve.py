"""`mlxcy serve` against the official `openai` client and raw HTTP, on a live
uvicorn server (127.0.0.1, a free port) serving a tiny random-weight Qwen3 with
the real Qwen3 tokenizer.  References: transformers (greedy tokens, log-probs,
chat template), `tokenizers` (token ids), jsonschema (structured output)."""
import asyncio
import json
import re
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")

import serve_helpers as H  # noqa: E402
from mlxcy.models import base  # noqa: E402

MODEL = "tiny"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_qwen3")
    model = H.make_tiny_qwen3(d)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    return d, model, hf_tok


@pytest.fixture(scope="module")
def srv(tiny):
    worker, live = H.start(tiny[0], max_batch=16, max_queue=128, kv_budget=64 << 20)
    yield worker, live
    live.stop()
    worker.close()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv[1].url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def chat_ids(hf_tok, messages):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def random_ids(seed, n=12):
    return np.random.default_rng(seed).integers(0, 150000, n).tolist()


def until_stop(ids, stop_ids):
    for k, t in enumerate(ids):
        if t in stop_ids:
            return ids[:k]
    return ids


MSGS = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour and a number."}]


# ---------------------------------------------------------------- basics --

def test_models(client, tiny):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra["context_length"] == 2048
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_greedy_matches_transformers(client, tiny):
    _, model, hf_tok = tiny
    ids = chat_ids(hf_tok, MSGS)
    want = until_stop(hf_greedy(model, ids, 20), {151645, 151643})
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=20,
                                       temperature=0)
    assert r.choices[0].message.content == hf_tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 20 if len(want) == 20 else r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(want) == 20 else "stop")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_completion_token_prompt_matches_transformers(client, tiny):
    _, model, hf_tok = tiny
    for seed in (1, 2):
        ids = random_ids(seed)
        want = hf_greedy(model, ids, 16)
        r = client.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0)
        assert r.choices[0].text == hf_tok.decode(until_stop(want, {151645, 151643}),
                                                  skip_special_tokens=True)
        assert r.usage.prompt_tokens == len(ids)


def test_chat_stream_format(srv, client, tiny):
    port = srv[1].port
    body = {"model": MODEL, "messages": MSGS, "max_tokens": 12, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    ev = H.sse_events(port, "/v1/chat/completions", body)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    assert all(c["usage"] is None for c in chunks[:-1])
    content = [c for c in chunks[:-1]]
    finals = [c for c in content if c["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1 and finals[0] is content[-1]
    assert finals[0]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12,
                                       temperature=0)
    assert text == r.choices[0].message.content
    # the openai client reads the same stream
    parts, last = [], None
    for ch in client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12,
                                             temperature=0, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        last = ch
    assert "".join(parts) == text and last.choices[0].finish_reason == "length"


def test_stop_strings(client, tiny):
    ids = random_ids(3)
    full = client.completions.create(model=MODEL, prompt=ids, max_tokens=24,
                                     temperature=0).choices[0].text
    assert len(full) > 6
    stop = full[len(full) // 2: len(full) // 2 + 3]
    k = full.find(stop)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0,
                                  stop=[stop, "\x00never"])
    assert r.choices[0].text == full[:k]
    assert r.choices[0].finish_reason == "stop"
    # streamed: the same text, and no part of the stop string leaks
    parts = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=ids, max_tokens=24, temperature=0, stop=stop, stream=True)
        if c.choices]
    assert "".join(parts) == full[:k]


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=10, temperature=1.0, n=3)
    a = client.chat.completions.create(seed=11, **kw)
    b = client.chat.completions.create(seed=11, **kw)
    c = client.chat.completions.create(seed=12, **kw)
    ta = [ch.message.content for ch in sorted(a.choices, key=lambda x: x.index)]
    tb = [ch.message.content for ch in sorted(b.choices, key=lambda x: x.index)]
    tc = [ch.message.content for ch in sorted(c.choices, key=lambda x: x.index)]
    assert [ch.index for ch in sorted(a.choices, key=lambda x: x.index)] == [0, 1, 2]
    assert ta == tb
    assert len(set(ta)) > 1          # the n choices are sampled independently
    assert ta != tc
    assert a.usage.completion_tokens == 30


def test_logprobs_match_transformers(client, tiny):
    _, model, hf_tok = tiny
    ids = chat_ids(hf_tok, MSGS)
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    gen = until_stop(hf_greedy(model, ids, 6), {151645, 151643})
    assert len(content) == len(gen)
    with torch.no_grad():
        logits = model(torch.tensor([ids + gen])).logits[0].double()
    lsm = torch.log_softmax(logits, -1)
    for k, e in enumerate(content):
        pos = len(ids) - 1 + k
        assert e.logprob == pytest.approx(lsm[pos, gen[k]].item(), abs=2e-3)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
        assert len(e.top_logprobs) == 3
        top = torch.topk(lsm[pos], 3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                    abs=2e-3)
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
    # completions: the legacy shape
    rc = client.completions.create(model=MODEL, prompt=random_ids(4), max_tokens=4,
                                   temperature=0, logprobs=2)
    lp = rc.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == rc.choices[0].text
    assert lp.text_offset[0] == 0


def test_completions_batch_and_echo(client):
    r = client.completions.create(model=MODEL, prompt=["one two", "three four"], max_tokens=5,
                                  temperature=0, echo=True, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("one two") and r.choices[2].text.startswith("three four")
    assert r.choices[0].text == r.choices[1].text          # greedy: both choices agree
    single = client.completions.create(model=MODEL, prompt="three four", max_tokens=5,
                                       temperature=0)
    assert r.choices[2].text == "three four" + single.choices[0].text


# ------------------------------------------------------ structured output --

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "pet": {"enum": ["cat", "dog", "none"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                  "maxItems": 3}},
          "required": ["name", "age", "pet", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(client, seed):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON."}],
        max_tokens=200, temperature=1.0, seed=seed,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    obj = json.loads(r.choices[0].message.content)
    jsonschema.validate(obj, PERSON)


def test_json_object_and_unconstrained_differ(client):
    msgs = [{"role": "user", "content": "JSON please"}]
    free = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=30,
                                          temperature=0).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)              # the random model does not write JSON by itself
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=300,
                                       temperature=0.7, seed=3,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:                             # cut by max_tokens: still a JSON object's prefix
        assert r.choices[0].message.content.startswith("{")


def test_json_schema_streamed(srv):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 200,
            "temperature": 1.0, "seed": 5, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                       "schema": PERSON}}}
    ev = H.sse_events(srv[1].port, "/v1/chat/completions", body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in ev[:-1]
                   if c["choices"])
    jsonschema.validate(json.loads(text), PERSON)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                   "required": ["zone"], "additionalProperties": False}}}


def test_tools_named_choice(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=120, temperature=0.8, seed=1)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls"
    assert ch.message.content is None
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_tools_required_streamed_and_round_trip(srv, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Weather?"}],
            "tools": [WEATHER, TIME], "tool_choice": "required", "max_tokens": 120,
            "temperature": 0.8, "seed": 2, "stream": True}
    ev = H.sse_events(srv[1].port, "/v1/chat/completions", body)
    calls = [tc for c in ev[:-1] for tc in (c["choices"][0]["delta"].get("tool_calls") or [])]
    assert len(calls) == 1 and ev[-2]["choices"][0]["finish_reason"] == "tool_calls"
    fn = calls[0]["function"]
    spec = {"get_weather": WEATHER, "get_time": TIME}[fn["name"]]
    jsonschema.validate(json.loads(fn["arguments"]), spec["function"]["parameters"])
    # the call and a tool result go back through the chat template
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": calls[0]["id"], "type": "function", "function": fn}]},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "{\"temp\": 3}"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, TIME],
                                       max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    tk = H.request(srv[1].port, "POST", "/tokenize", {"model": MODEL, "messages": msgs})[2]
    assert tk["count"] > 20


# ------------------------------------------------------ tokenize / caches --

def test_tokenize_detokenize_match_tokenizers(srv, tiny):
    from tokenizers import Tokenizer
    ref = Tokenizer.from_file(str(tiny[0] / "tokenizer.json"))
    text = "Hello, wörld! 12345 <think>ok</think>"
    st, _, body = H.request(srv[1].port, "POST", "/tokenize", {"model": MODEL, "prompt": text})
    assert st == 200 and body["tokens"] == ref.encode(text).ids
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 2048
    st, _, body2 = H.request(srv[1].port, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert st == 200 and body2["prompt"] == ref.decode(body["tokens"], skip_special_tokens=False)
    st, _, body3 = H.request(srv[1].port, "POST", "/tokenize", {"messages": MSGS})
    assert body3["tokens"] == chat_ids(tiny[2], MSGS)


def test_prefix_cache_reuse(srv, client, tiny):
    worker = srv[0]
    msgs = [{"role": "user", "content": "A fairly long first question about rivers, lakes "
                                        "and the sea, to make a prefix worth caching."}]
    r1 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == r1.choices[0].message.content
    assert r2.usage.prompt_tokens_details.cached_tokens == r2.usage.prompt_tokens - 1
    # the next turn extends the conversation: its prompt starts with the first one's
    msgs2 = msgs + [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "And mountains?"}]
    r3 = client.chat.completions.create(model=MODEL, messages=msgs2, max_tokens=8,
                                        temperature=0)
    n1 = len(chat_ids(tiny[2], msgs))
    assert r3.usage.prompt_tokens_details.cached_tokens >= n1 - 1
    ids = chat_ids(tiny[2], msgs2)       # and the output is what an uncached run gives
    want = until_stop(hf_greedy(tiny[1], ids, 8), {151645, 151643})
    assert r3.choices[0].message.content == tiny[2].decode(want, skip_special_tokens=True)
    assert worker.prefix.hits >= 2 and worker.prefix.bytes <= worker.prefix.budget
    text = H.request(srv[1].port, "GET", "/metrics")[2]
    hits = [ln for ln in text.splitlines() if ln.startswith("mlxcy_prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 2


def test_metrics_exposition(srv, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, temperature=0)
    st, h, text = H.request(srv[1].port, "GET", "/metrics")
    assert st == 200 and h["content-type"].startswith("text/plain")
    for name in ("mlxcy_requests_total", "mlxcy_prompt_tokens_total",
                 "mlxcy_generation_tokens_total", "mlxcy_queue_depth",
                 "mlxcy_running_sequences", "mlxcy_time_to_first_token_seconds_bucket",
                 "mlxcy_inter_token_latency_seconds_bucket", "mlxcy_prefix_cache_hits_total"):
        assert name in text, name
    line = next(ln for ln in text.splitlines()
                if ln.startswith('mlxcy_requests_total{endpoint="completions",status="200"}'))
    assert float(line.split()[-1]) >= 1


def test_padding_ids_have_no_text(srv, client):
    """The model's vocabulary (151936) is wider than the tokenizer's (151669):
    a sampled padding id adds no text and fails nothing (it stopped the engine
    thread once, found by the soak)."""
    r = client.completions.create(model=MODEL, prompt="pad", max_tokens=4, temperature=0,
                                  logit_bias={"151800": 100}, logprobs=1)
    assert r.choices[0].text == "" and r.usage.completion_tokens == 4
    assert r.choices[0].logprobs.tokens == [""] * 4
    parts = [ch.choices[0].text for ch in client.completions.create(
        model=MODEL, prompt="pad", max_tokens=3, temperature=0, logit_bias={"151800": 100},
        stream=True) if ch.choices]
    assert "".join(parts) == ""
    assert H.request(srv[1].port, "GET", "/health")[0] == 200 and srv[0].alive


def test_shared_prefix_outputs_equal_uncached(srv, client, tiny):
    """Prompts sharing a long prefix (a system prompt) reuse its KV from the
    prefix tree: cached_tokens counts it, and every reply equals transformers'
    greedy reply for the whole prompt."""
    worker = srv[0]
    _, model, hf_tok = tiny
    system = random_ids(500, n=40)
    nodes0 = len(worker.prefix)
    for i in range(5):
        p = system + random_ids(600 + i, n=3 + i)
        r = client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)
        want = until_stop(hf_greedy(model, p, 8), {151645, 151643})
        assert r.choices[0].text == hf_tok.decode(want, skip_special_tokens=True)
        if i:
            assert r.usage.prompt_tokens_details.cached_tokens >= len(system)
    assert len(worker.prefix) > nodes0
    assert any(len(s) >= len(system) and list(s[:len(system)]) == system
               for s in worker.prefix.sequences())


@pytest.mark.parametrize("how", ["prompt_lookup", "draft_model"])
def test_speculative_serving_and_metrics(client, tiny, how):
    """With --prompt-lookup or --draft-model the greedy replies are the plain
    server's, and /metrics carries the engine's speculative counters."""
    kw = {"prompt_lookup": 8} if how == "prompt_lookup" else \
        {"draft_model": str(tiny[0]), "num_draft": 4}       # the draft is the model itself
    # (a batch's steps op by op: where the GPU kernel runs them, prompt lookup
    # proposes nothing for a batch, Engine._row_k)
    rows_kernel = base.set_gpu_rows_step(False)
    worker, live = H.start(tiny[0], max_batch=8, kv_budget=8 << 20, **kw)
    try:
        spec = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompts = [random_ids(700, n=6) * 4, random_ids(701, n=10) * 3, random_ids(702, n=12)]
        outs = {}

        def run(i, p):
            outs[i] = spec.completions.create(model=MODEL, prompt=p, max_tokens=24,
                                              temperature=0).choices[0].text
        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i, p in enumerate(prompts):
            want = client.completions.create(model=MODEL, prompt=p, max_tokens=24,
                                             temperature=0).choices[0].text
            assert outs[i] == want
        st = worker.engine.stats
        port = live.port
        proposed = H.metric(port, "mlxcy_spec_proposed_tokens_total")
        accepted = H.metric(port, "mlxcy_spec_accepted_tokens_total")
        decoded = H.metric(port, "mlxcy_decode_tokens_total")
        rows = H.metric(port, "mlxcy_decode_row_steps_total")
        assert proposed == st["proposed_tokens"] > 0 and accepted == st["accepted_tokens"]
        assert H.metric(port, "mlxcy_spec_verify_steps_total") == st["spec_steps"] > 0
        assert H.metric(port, "mlxcy_spec_acceptance_rate") == pytest.approx(accepted / proposed)
        assert H.metric(port, "mlxcy_spec_tokens_per_step") == pytest.approx(decoded / rows)
        if how == "draft_model":      # a draft equal to the model: (nearly) all accepted
            assert accepted / proposed > 0.8 and decoded / rows > 2
        assert H.metric(port, "mlxcy_mlx_active_memory_bytes") > 0
        assert H.metric(port, "process_resident_memory_bytes") > 0
    finally:
        live.stop()
        worker.close()
        base.set_gpu_rows_step(rows_kernel)


def test_kv_bits_with_prefix_cache(tiny, tmp_path):
    """--kv-bits: the prefix tree keeps the quantized KV; a cached prompt
    replies as the uncached one did.  A group size that does not divide the
    head dimension is refused at start."""
    from mlxcy.serve.worker import Worker
    with pytest.raises(ValueError, match="kv_group_size 64: the model's head dimension 16"):
        Worker(tiny[0], kv_bits=8, dtype="float32").start()
    H.make_tiny_qwen3(tmp_path, head_dim=32)
    worker, live = H.start(tmp_path, max_batch=4, kv_budget=8 << 20, kv_bits=8,
                           kv_group_size=32)
    try:
        c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
        p = random_ids(800, n=30)
        r1 = c.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0)
        r2 = c.completions.create(model=MODEL, prompt=p + [11, 12], max_tokens=10,
                                  temperature=0)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        assert r2.usage.prompt_tokens_details.cached_tokens == len(p)
        r3 = c.completions.create(model=MODEL, prompt=p, max_tokens=10, temperature=0)
        assert r3.usage.prompt_tokens_details.cached_tokens == len(p) - 1
        assert r3.choices[0].text == r1.choices[0].text
        assert worker.engine.kv_bits == 8 and worker.prefix.bytes > 0
    finally:
        live.stop()
        worker.close()


# ------------------------------------------------------------ concurrency --

def test_64_concurrent_streams_match_sequential(srv, client):
    worker, live = srv
    prompts = [random_ids(100 + i, n=4 + i % 9) for i in range(64)]
    want = [client.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                      temperature=0).choices[0].text for p in prompts]

    async def one(ac, p):
        parts, finish = [], None
        stream = await ac.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                             temperature=0, stream=True)
        async for ch in stream:
            if ch.choices:
                parts.append(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        ac = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0,
                                timeout=300)
        try:
            return await asyncio.gather(*(one(ac, p) for p in prompts))
        finally:
            await ac.close()
    got = asyncio.run(main())
    assert [g[0] for g in got] == want
    assert all(g[1] in ("length", "stop") for g in got)
    assert len(set(want)) > 32          # distinct outputs: a crossed stream would show
    _wait_idle(worker)


def _wait_idle(worker, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if worker.live == 0 and worker.num_running == 0 and worker.num_waiting == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: live={worker.live} running={worker.num_running} "
                         f"waiting={worker.num_waiting}")


def test_dropped_client_frees_its_rows(srv):
    import http.client
    worker, live = srv
    conns = []
    for i in range(4):
        c = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
        c.request("POST", "/v1/completions", body=json.dumps(
            {"model": MODEL, "prompt": random_ids(200 + i), "max_tokens": 2000,
             "temperature": 0, "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        r.fp.readline()             # the first event has arrived: the sequence runs
        conns.append((c, r))
    assert worker.live == 4
    for c, r in conns:
        r.close()
        c.close()
    _wait_idle(worker)
    st, _, h = H.request(live.port, "GET", "/health")
    assert st == 200 and h["running"] == 0


def test_heap_trimmed_when_the_batch_drains(srv, client, monkeypatch):
    # The RSS of a busy server stays flat only if the C heap's free pages go
    # back to the system (mlxcy.memory.trim_heap, tested there); the worker
    # trims every TRIM_EVERY seconds under load and once when the batch drains.
    import mlxcy.serve.worker as W
    worker, _ = srv
    _wait_idle(worker)
    calls = []
    monkeypatch.setattr(W, "TRIM_EVERY", 1e9)        # only the drain's trim is left
    monkeypatch.setattr(W, "trim_heap", lambda: calls.append(worker.num_running))
    client.completions.create(model=MODEL, prompt=random_ids(300), max_tokens=3)
    _wait_idle(worker)
    deadline = time.time() + 10
    while not calls and time.time() < deadline:
        time.sleep(0.05)
    assert calls and set(calls) == {0}          # (the previous test's drain may be seen too)
    # and /metrics shows the RSS right after it, within the process's RSS now
    _, _, text = H.request(srv[1].port, "GET", "/metrics")
    val = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
           if ln and not ln.startswith("#")}
    kept = val["mlxcy_resident_memory_after_trim_bytes"]
    assert 0.5 < kept / val["process_resident_memory_bytes"] < 1.5


def test_non_streaming_client_gone_is_cancelled(srv):
    import socket
    worker, live = srv
    s = socket.create_connection(("127.0.0.1", live.port))
    body = json.dumps({"model": MODEL, "prompt": random_ids(300), "max_tokens": 2000,
                       "temperature": 0}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    t0 = time.time()
    while worker.live == 0 and time.time() - t0 < 10:
        time.sleep(0.02)
    assert worker.live == 1
    s.close()
    _wait_idle(worker)
    # answered as 499 (client closed request) in /metrics, not a 500
    t0 = time.time()
    while 'status="499"' not in H.request(live.port, "GET", "/metrics")[2] \
            and time.time() - t0 < 10:
        time.sleep(0.05)
    text = H.request(live.port, "GET", "/metrics")[2]
    assert re.search(r'mlxcy_requests_total\{endpoint="completions",status="499"\} [1-9]', text), \
        [ln for ln in text.splitlines() if ln.startswith("mlxcy_requests_total")]


# ---------------------------------------------------------------- errors --

BAD = [
    # (body or raw bytes, status, param, code)
    (b"{not json", 400, None, None),
    (b"", 400, None, None),
    (b"[1, 2]", 400, None, None),
    (b"\xff\xfe\x00", 400, None, None),
    ({"messages": MSGS}, 400, "model", None),
    ({"model": 5, "messages": MSGS}, 400, "model", None),
    ({"model": "gpt-4", "messages": MSGS}, 404, "model", "model_not_found"),
    ({"model": MODEL}, 400, "messages", None),
    ({"model": MODEL, "messages": []}, 400, "messages", None),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", None),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type", None),
    ({"model": MODEL, "messages": MSGS, "temperature": "hot"}, 400, "temperature", None),
    ({"model": MODEL, "messages": MSGS, "temperature": 5}, 400, "temperature", None),
    ({"model": MODEL, "messages": MSGS, "top_p": 0}, 400, "top_p", None),
    ({"model": MODEL, "messages": MSGS, "max_tokens": -1}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": MSGS, "max_tokens": 10 ** 30}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": MSGS, "max_tokens": 1.5}, 400, "max_tokens", None),
    ({"model": MODEL, "messages": MSGS, "max_tokens": 2040}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"model": MODEL, "messages": MSGS, "n": 0}, 400, "n", None),
    ({"model": MODEL, "messages": MSGS, "n": 1000}, 400, "n", None),
    ({"model": MODEL, "messages": MSGS, "stop": 7}, 400, "stop", None),
    ({"model": MODEL, "messages": MSGS, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": MODEL, "messages": MSGS, "logit_bias": {"999999": 1}}, 400,
     "logit_bias.999999", None),
    ({"model": MODEL, "messages": MSGS, "logit_bias": {"5": 500}}, 400, "logit_bias.5", None),
    ({"model": MODEL, "messages": MSGS, "seed": "x"}, 400, "seed", None),
    ({"model": MODEL, "messages": MSGS, "top_logprobs": 3}, 400, "top_logprobs", None),
    ({"model": MODEL, "messages": MSGS, "logprobs": True, "top_logprobs": 99}, 400,
     "top_logprobs", None),
    ({"model": MODEL, "messages": MSGS, "stream": "yes"}, 400, "stream", None),
    ({"model": MODEL, "messages": MSGS, "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ({"model": MODEL, "messages": MSGS, "response_format": {"type": "xml"}}, 400,
     "response_format.type", None),
    ({"model": MODEL, "messages": MSGS, "response_format": {"type": "json_schema",
                                                            "json_schema": {"schema": 3}}},
     400, "response_format.json_schema.schema", None),
    ({"model": MODEL, "messages": MSGS, "tools": [{"type": "function"}]}, 400,
     "tools[0].function", None),
    ({"model": MODEL, "messages": MSGS, "tools": [WEATHER],
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "tool_choice.function.name", None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2100}]}, 400,
     "messages", "context_length_exceeded"),
]

BAD_COMPLETIONS = [
    ({"model": MODEL}, 400, "prompt", None),
    ({"model": MODEL, "prompt": [1, -5]}, 400, "prompt", None),
    ({"model": MODEL, "prompt": [[1, 2], "x", 3]}, 400, "prompt[2]", None),
    ({"model": MODEL, "prompt": "x", "logprobs": 50}, 400, "logprobs", None),
    ({"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix", None),
]


def _check_error(st, h, body, status, param, code):
    assert st == status, (st, body)
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if param:
        assert param.split(".")[0].split("[")[0] in err["message"]


@pytest.mark.parametrize("case", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_chat_requests(srv, case):
    body, status, param, code = case
    raw = body if isinstance(body, bytes) else None
    st, h, resp = H.request(srv[1].port, "POST", "/v1/chat/completions",
                            None if raw is not None else body, raw=raw)
    _check_error(st, h, resp, status, param, code)


@pytest.mark.parametrize("case", BAD_COMPLETIONS, ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests(srv, case):
    body, status, param, code = case
    st, h, resp = H.request(srv[1].port, "POST", "/v1/completions", body)
    _check_error(st, h, resp, status, param, code)


def test_unknown_route_method_and_huge_body(srv, client):
    port = srv[1].port
    st, _, body = H.request(port, "GET", "/v1/nothing")
    assert st == 404 and body["error"]["code"] == "not_found"
    st, _, body = H.request(port, "GET", "/v1/chat/completions")
    assert st == 405 and "error" in body
    huge = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"a" * (9 << 20) \
        + b'"}]}'
    st, _, body = H.request(port, "POST", "/v1/chat/completions", raw=huge)
    assert st == 413 and body["error"]["code"] == "request_too_large"
    deep = b"[" * 100000 + b"]" * 100000
    st, _, body = H.request(port, "POST", "/v1/chat/completions", raw=deep)
    assert st == 400
    # the server is still healthy and serves
    st, _, h = H.request(port, "GET", "/health")
    assert st == 200 and h["status"] == "ok"
    r = client.completions.create(model=MODEL, prompt="still alive", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_bad_requests_do_not_disturb_running_streams(srv, client):
    """A stream runs while bad requests hit the server; its text is unchanged."""
    ids = random_ids(9)
    want = client.completions.create(model=MODEL, prompt=ids, max_tokens=40,
                                     temperature=0).choices[0].text
    out = {}

    def run():
        parts = []
        for ch in client.completions.create(model=MODEL, prompt=ids, max_tokens=40,
                                            temperature=0, stream=True):
            if ch.choices:
                parts.append(ch.choices[0].text)
        out["text"] = "".join(parts)
    t = threading.Thread(target=run)
    t.start()
    for body, status, *_ in BAD[:12]:
        raw = body if isinstance(body, bytes) else None
        st, _, _ = H.request(srv[1].port, "POST", "/v1/chat/completions",
                             None if raw is not None else body, raw=raw)
        assert st == status
    t.join(120)
    assert out["text"] == want


def test_api_key(srv, tiny):
    worker = srv[0]
    live = H.LiveServer(__import__("mlxcy.serve.app", fromlist=["create_app"]).create_app(
        worker, model_id=MODEL, api_key="sekrit"))
    try:
        st, h, body = H.request(live.port, "GET", "/v1/models")
        assert st == 401 and body["error"]["code"] == "invalid_api_key"
        st, h, body = H.request(live.port, "GET", "/v1/models",
                                headers={"Authorization": "Bearer wrong"})
        assert st == 401 and h.get("www-authenticate") == "Bearer"
        bad = openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                       temperature=0).usage.completion_tokens == 2
        assert H.request(live.port, "GET", "/health")[0] == 200
    finally:
        live.stop()


def test_queue_full_gets_429(tiny):
    worker, live = H.start(tiny[0], max_batch=1, max_queue=1, kv_budget=0)
    try:
        import http.client
        conns = []
        for i in range(2):        # one running, one queued
            c = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
            c.request("POST", "/v1/completions", body=json.dumps(
                {"model": MODEL, "prompt": random_ids(i), "max_tokens": 400,
                 "temperature": 0, "stream": True}).encode(),
                headers={"Content-Type": "application/json"})
            conns.append(c)
        t0 = time.time()
        while worker.live < 2 and time.time() - t0 < 10:
            time.sleep(0.02)
        st, h, body = H.request(live.port, "POST", "/v1/completions",
                                {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert st == 429 and h["retry-after"] == "1"
        assert body["error"]["code"] == "queue_full"
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        for c in conns:
            c.close()
        _wait_idle(worker)
        assert client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                         temperature=0).usage.completion_tokens == 2
    finally:
        live.stop()
        worker.close()


def test_page_served(srv):
    st, h, text = H.request(srv[1].port, "GET", "/")
    assert st == 200 and h["content-type"].startswith("text/html")
    assert "<script>" in text and "/v1/chat/completions" in text
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text


def test_cli_serve_subprocess(tiny):
    """`mlxcy serve` as users start it: it comes up, serves, and stops on Ctrl-C."""
    import signal
    import subprocess
    import sys

    import subproc
    port = H.free_port()
    p = subprocess.Popen([sys.executable, "-m", "mlxcy", "serve", "--model", str(tiny[0]),
                          "--port", str(port), "--max-batch", "4", "--kv-budget", "16M",
                          "--api-key", "k", "--log-level", "warning"],
                         env=subproc.env(), cwd=subproc.CWD, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            assert p.poll() is None, p.stdout.read().decode()
            try:
                st, _, body = H.request(port, "GET", "/health", timeout=2)
                if st == 200:
                    break
            except OSError:
                pass
            assert time.time() - t0 < 120, "server did not come up"
            time.sleep(0.25)
        assert body["model"] == tiny[0].name
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = c.completions.create(model=tiny[0].name, prompt="hi", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    assert p.returncode in (0, -signal.SIGINT, 130)
