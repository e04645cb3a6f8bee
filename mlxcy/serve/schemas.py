"""Request validation for the OpenAI endpoints.

Every check raises an APIError 400 whose `param` names the field ("stop",
"messages[2].content", "logit_bias.50000", ...).  Fields the server does not
know are ignored, as OpenAI's SDKs send optional ones (store, metadata,
parallel_tool_calls) that change nothing here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .errors import bad_request

__all__ = ["Sampling", "GenRequest", "parse_chat", "parse_completion", "parse_tokenize",
           "parse_detokenize", "MAX_N", "MAX_STOP", "MAX_TOP_LOGPROBS"]

MAX_N = 16                 # choices per request
MAX_STOP = 4               # stop strings (OpenAI's limit)
MAX_STOP_LEN = 256         # characters per stop string
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 64           # prompts in one /v1/completions request
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)
    seed: int | None = None


@dataclass
class GenRequest:
    kind: str                                  # "chat" or "completion"
    model: str
    messages: list | None = None               # chat: normalised messages
    prompts: list | None = None                # completion: str or list[int] each
    max_tokens: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    response_format: dict | None = None        # {"type": "json_object"} or {"type": "json_schema", "schema": {...}}
    tools: list | None = None                  # [{"type": "function", "function": {...}}]
    tool_choice: object = None                 # "none" | "auto" | "required" | {"name": ...}
    user: str | None = None
    sampling: Sampling = field(default_factory=Sampling)


# ------------------------------------------------------------------ helpers --

def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def get_int(body, key, lo, hi, default=None, param=None):
    v = body.get(key)
    p = param or key
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        v = int(v)
    if not _is_int(v):
        raise bad_request(p, f"expected an integer, got {_type_name(v)}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(p, f"must be {rng}, got {v}")
    return v


def get_float(body, key, lo, hi, default, lo_open=False, param=None):
    v = body.get(key)
    p = param or key
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(p, f"expected a number, got {_type_name(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise bad_request(p, f"must be a finite number, got {v}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise bad_request(p, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v:g}")
    return v


def get_bool(body, key, default=False):
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(key, f"expected a boolean, got {_type_name(v)}")
    return v


def get_str(body, key, required=False, param=None):
    v = body.get(key)
    p = param or key
    if v is None:
        if required:
            raise bad_request(p, "is required")
        return None
    if not isinstance(v, str):
        raise bad_request(p, f"expected a string, got {_type_name(v)}")
    return v


# ------------------------------------------------------------------ common --

def _model(body) -> str:
    m = get_str(body, "model", required=True)
    if not m:
        raise bad_request("model", "must not be empty")
    return m


def _sampling(body, vocab_size: int) -> Sampling:
    s = Sampling()
    s.temperature = get_float(body, "temperature", 0.0, 2.0, 1.0)
    s.top_p = get_float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    s.top_k = get_int(body, "top_k", 0, None, 0)
    if s.top_k == -1:
        s.top_k = 0
    s.min_p = get_float(body, "min_p", 0.0, 1.0, 0.0)
    s.repetition_penalty = get_float(body, "repetition_penalty", 0.0, 10.0, 1.0, lo_open=True)
    s.presence_penalty = get_float(body, "presence_penalty", -2.0, 2.0, 0.0)
    s.frequency_penalty = get_float(body, "frequency_penalty", -2.0, 2.0, 0.0)
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise bad_request("seed", f"expected an integer, got {_type_name(seed)}")
        if not (-2 ** 63 <= seed < 2 ** 64):
            raise bad_request("seed", f"must be in [-2**63, 2**64), got {seed}")
        s.seed = seed % 2 ** 64
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad_request("logit_bias", f"expected an object mapping token ids to biases, "
                                            f"got {_type_name(lb)}")
        if len(lb) > 1024:
            raise bad_request("logit_bias", f"at most 1024 entries, got {len(lb)}")
        for k, v in lb.items():
            p = f"logit_bias.{k}"
            try:
                tid = int(k)
            except (TypeError, ValueError):
                raise bad_request(p, "keys must be token ids (integers as strings)") from None
            if not (0 <= tid < vocab_size):
                raise bad_request(p, f"token id out of range [0, {vocab_size})")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad_request(p, f"expected a number, got {_type_name(v)}")
            if not (-100 <= v <= 100):
                raise bad_request(p, f"bias must be in [-100, 100], got {v:g}")
            s.logit_bias[tid] = float(v)
    return s


def _stop(body) -> list:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise bad_request("stop", f"expected a string or an array of strings, got {_type_name(v)}")
    if len(v) > MAX_STOP:
        raise bad_request("stop", f"at most {MAX_STOP} stop sequences, got {len(v)}")
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise bad_request(f"stop[{i}]", f"expected a string, got {_type_name(s)}")
        if not s:
            raise bad_request(f"stop[{i}]", "must not be empty")
        if len(s) > MAX_STOP_LEN:
            raise bad_request(f"stop[{i}]", f"at most {MAX_STOP_LEN} characters")
    return list(v)


def _stream(body, req: GenRequest) -> None:
    req.stream = get_bool(body, "stream")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request("stream_options", f"expected an object, got {_type_name(so)}")
        if not req.stream:
            raise bad_request("stream_options", "is only allowed when stream is true")
        iu = so.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise bad_request("stream_options.include_usage",
                              f"expected a boolean, got {_type_name(iu)}")
        req.include_usage = bool(iu)


def _max_tokens(body, context: int) -> int | None:
    mt = get_int(body, "max_completion_tokens", 1, None, None)
    if mt is None:
        mt = get_int(body, "max_tokens", 1, None, None)
        name = "max_tokens"
    else:
        name = "max_completion_tokens"
    if mt is not None and mt > context:
        raise bad_request(name, f"must be at most the model's context length ({context}), "
                                f"got {mt}")
    return mt


# --------------------------------------------------------------------- chat --

def _content(v, p):
    """A message's content: a string, or text parts joined; None allowed."""
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list):
        raise bad_request(p, f"expected a string or an array of content parts, got {_type_name(v)}")
    texts = []
    for i, part in enumerate(v):
        pp = f"{p}[{i}]"
        if not isinstance(part, dict):
            raise bad_request(pp, f"expected a content part object, got {_type_name(part)}")
        t = part.get("type")
        if t != "text":
            raise bad_request(f"{pp}.type", f"only 'text' content parts are supported, got {t!r}")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{pp}.text", f"expected a string, got {_type_name(text)}")
        texts.append(text)
    return "".join(texts)


def _objects(v, p):
    """(param, item) for each item of an array of objects at `p`."""
    if not isinstance(v, list):
        raise bad_request(p, f"expected an array, got {_type_name(v)}")
    for i, item in enumerate(v):
        pp = f"{p}[{i}]"
        if not isinstance(item, dict):
            raise bad_request(pp, f"expected an object, got {_type_name(item)}")
        yield pp, item


def _function(item, pp, expected):
    """(function object, name) of a tool or a tool call at `pp`."""
    fn = item.get("function")
    if not isinstance(fn, dict):
        raise bad_request(f"{pp}.function", expected)
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request(f"{pp}.function.name", "expected a non-empty string")
    return fn, name


def _tool_calls(v, p):
    out = []
    for i, (pp, tc) in enumerate(_objects(v, p)):
        fn, name = _function(tc, pp, "expected an object with name and arguments")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise bad_request(f"{pp}.function.arguments", "is not valid JSON") from None
        if not isinstance(args, dict):
            raise bad_request(f"{pp}.function.arguments", "must encode a JSON object")
        out.append({"id": tc.get("id") if isinstance(tc.get("id"), str) else f"call_{i}",
                    "type": "function", "function": {"name": name, "arguments": args}})
    return out


def _messages(body) -> list:
    msgs = body.get("messages")
    if msgs is None:
        raise bad_request("messages", "is required")
    if msgs == []:
        raise bad_request("messages", "must hold at least one message")
    out = []
    for p, m in _objects(msgs, "messages"):
        role = m.get("role")
        if role not in ROLES:
            raise bad_request(f"{p}.role", f"must be one of {', '.join(ROLES)}; got {role!r}")
        content = _content(m.get("content"), f"{p}.content")
        msg = {"role": "system" if role == "developer" else role}
        if role == "assistant" and m.get("tool_calls") is not None:
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{p}.tool_calls")
        elif content is None:
            raise bad_request(f"{p}.content", "is required")
        msg["content"] = content if content is not None else ""
        if role == "tool":
            tid = m.get("tool_call_id")
            if tid is not None and not isinstance(tid, str):
                raise bad_request(f"{p}.tool_call_id", "expected a string")
            if tid is not None:
                msg["tool_call_id"] = tid
        name = m.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise bad_request(f"{p}.name", "expected a string")
            msg["name"] = name
        out.append(msg)
    return out


def _tools(body):
    tools = body.get("tools")
    if tools is None:
        return None
    out = []
    for pp, t in _objects(tools, "tools"):
        if t.get("type") != "function":
            raise bad_request(f"{pp}.type", f"must be 'function', got {t.get('type')!r}")
        fn, name = _function(t, pp, "expected an object")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise bad_request(f"{pp}.function.parameters", "expected a JSON schema object")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise bad_request(f"{pp}.function.description", "expected a string")
        f = {"name": name, "parameters": params}
        if desc is not None:
            f["description"] = desc
        out.append({"type": "function", "function": f})
    return out or None


def _tool_choice(body, tools):
    tc = body.get("tool_choice")
    if tc is None:
        return "auto" if tools else "none"
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise bad_request("tool_choice", f"must be none, auto, required or a function "
                                             f"choice, got {tc!r}")
        if tc == "required" and not tools:
            raise bad_request("tool_choice", "'required' needs tools")
        return tc
    if not isinstance(tc, dict):
        raise bad_request("tool_choice", f"expected a string or an object, got {_type_name(tc)}")
    fn = tc.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if tc.get("type") != "function" or not isinstance(name, str):
        raise bad_request("tool_choice", "expected {\"type\": \"function\", \"function\": "
                                         "{\"name\": ...}}")
    if not tools or name not in [t["function"]["name"] for t in tools]:
        raise bad_request("tool_choice.function.name", f"no tool named {name!r} in tools")
    return {"name": name}


def _response_format(body):
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise bad_request("response_format", f"expected an object, got {_type_name(rf)}")
    t = rf.get("type")
    if t == "text":
        return None
    if t == "json_object":
        return {"type": "json_object", "schema": {"type": "object"}}
    if t == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("response_format.json_schema", "expected an object with a schema")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request("response_format.json_schema.name", "expected a string")
        schema = js.get("schema", {})
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema",
                              f"expected a JSON schema object, got {_type_name(schema)}")
        return {"type": "json_schema", "name": name, "schema": schema}
    raise bad_request("response_format.type",
                      f"must be text, json_object or json_schema, got {t!r}")


def _common(body, req: GenRequest, vocab_size: int, context: int) -> None:
    req.max_tokens = _max_tokens(body, context)
    req.n = get_int(body, "n", 1, MAX_N, 1)
    _stream(body, req)
    req.stop = _stop(body)
    req.user = get_str(body, "user")
    req.sampling = _sampling(body, vocab_size)


def _check_body(body):
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {_type_name(body)}")


def parse_chat(body, vocab_size: int, context: int) -> GenRequest:
    _check_body(body)
    req = GenRequest(kind="chat", model=_model(body))
    req.messages = _messages(body)
    _common(body, req, vocab_size, context)
    req.logprobs = get_bool(body, "logprobs")
    req.top_logprobs = get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs", "needs logprobs set to true")
    req.response_format = _response_format(body)
    req.tools = _tools(body)
    req.tool_choice = _tool_choice(body, req.tools)
    if req.response_format and req.tool_choice not in ("none", "auto"):
        raise bad_request("response_format", "cannot be combined with a forced tool_choice")
    return req


def _prompts(body, vocab_size):
    p = body.get("prompt")
    if p is None:
        raise bad_request("prompt", "is required")
    if isinstance(p, str):
        return [p]
    if not isinstance(p, list) or not p:
        raise bad_request("prompt", "expected a string, an array of strings, an array of token "
                                    "ids or an array of such arrays")
    if all(_is_int(x) for x in p):
        items = [p]
        single = True
    else:
        items = p
        single = False
    if len(items) > MAX_PROMPTS:
        raise bad_request("prompt", f"at most {MAX_PROMPTS} prompts, got {len(items)}")
    out = []
    for i, it in enumerate(items):
        pp = "prompt" if single else f"prompt[{i}]"
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, list) and it and all(_is_int(x) for x in it):
            bad = next((x for x in it if not 0 <= x < vocab_size), None)
            if bad is not None:
                raise bad_request(pp, f"token id {bad} out of range [0, {vocab_size})")
            out.append(list(it))
        else:
            raise bad_request(pp, "expected a string or a non-empty array of token ids")
    return out


def parse_completion(body, vocab_size: int, context: int) -> GenRequest:
    _check_body(body)
    req = GenRequest(kind="completion", model=_model(body))
    req.prompts = _prompts(body, vocab_size)
    _common(body, req, vocab_size, context)
    if req.max_tokens is None:
        req.max_tokens = 16               # OpenAI's default for /v1/completions
    lp = get_int(body, "logprobs", 0, MAX_TOP_LOGPROBS, None)
    req.logprobs = lp is not None
    req.top_logprobs = lp or 0
    req.echo = get_bool(body, "echo")
    req.response_format = _response_format(body)
    if req.echo and req.stream:
        raise bad_request("echo", "is not supported together with stream")
    for key in ("suffix",):
        if body.get(key) is not None:
            raise bad_request(key, "is not supported by this server")
    best_of = get_int(body, "best_of", 1, MAX_N, None)
    if best_of is not None and best_of != req.n:
        raise bad_request("best_of", "only best_of == n is supported")
    return req


def parse_tokenize(body) -> dict:
    _check_body(body)
    if body.get("model") is not None:
        _model(body)
    has_p, has_m = body.get("prompt") is not None, body.get("messages") is not None
    if has_p == has_m:
        raise bad_request("prompt", "give exactly one of prompt or messages")
    add_special = get_bool(body, "add_special_tokens", True)
    if has_p:
        return {"prompt": get_str(body, "prompt"), "add_special_tokens": add_special}
    return {"messages": _messages(body),
            "add_generation_prompt": get_bool(body, "add_generation_prompt", True)}


def parse_detokenize(body, vocab_size: int) -> list:
    _check_body(body)
    if body.get("model") is not None:
        _model(body)
    toks = body.get("tokens")
    if not isinstance(toks, list) or not all(_is_int(x) for x in toks):
        raise bad_request("tokens", "expected an array of token ids")
    bad = next((x for x in toks if not 0 <= x < vocab_size), None)
    if bad is not None:
        raise bad_request("tokens", f"token id {bad} out of range [0, {vocab_size})")
    return toks
