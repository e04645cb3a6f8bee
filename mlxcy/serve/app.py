"""The HTTP side of `mlxcy serve`: a Starlette app over a Worker.

Endpoints: /v1/chat/completions, /v1/completions, /v1/models, /health,
/metrics, /tokenize, /detokenize, and the chat page at /.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from importlib import resources
from json.encoder import encode_basestring as _json_str   # what _dumps writes for a str

from anyio import to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import schemas, tools as toolmod
from .errors import APIError, bad_request, error_body
from .grammar import tool_call_schema
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .worker import Submission, merged_batches

__all__ = ["create_app", "ServerState"]

log = logging.getLogger("mlxcy.serve")

MAX_BODY = 8 << 20          # bytes of one request body
FINGERPRINT = "fp_mlxcy"


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ServerState:
    """What the handlers share: the worker, the tokenizer and its views."""

    def __init__(self, worker, model_id=None, api_key=None, metrics=None, max_body=MAX_BODY):
        tm = worker.text_model
        self.worker = worker
        self.tokenizer = tm.tokenizer
        self.model = tm.model
        info = tm.model.config
        self.model_id = model_id or _default_id(worker.model_path)
        self.context = int(info.max_position_embeddings)
        self.vocab_size = int(info.vocab_size)
        self.model_type = info.model_type
        self.stop_ids = frozenset(i for i in self.tokenizer.eos_ids if i < self.vocab_size)
        self.api_key = api_key
        # build the tokenizer's native core now: handlers encode on worker threads
        # (the encoder holds the GIL; only its lazy construction could race)
        self.tokenizer.encode("warm up", add_special_tokens=False)
        self.metrics = metrics or worker.metrics or Metrics()
        self.max_body = max_body
        self.created = int(time.time())
        try:
            self.template = tm.chat_template()
        except Exception as e:  # noqa: BLE001 - a model with no template serves completions
            log.warning("no chat template (%s): /v1/chat/completions is off", e)
            self.template = None
        self.tool_style = toolmod.style_for(self.template.source if self.template else None,
                                            self.model_type)
        from .grammar import Grammars
        self.grammars = Grammars(self.tokenizer, self.vocab_size, self.stop_ids)
        self._token_bytes = None

    def token_bytes(self):
        if self._token_bytes is None:
            from .vocab import token_bytes
            tb = token_bytes(self.tokenizer)
            self._token_bytes = tb + [b""] * max(0, self.vocab_size - len(tb))
        return self._token_bytes

    def chat_ids(self, messages, tools=None, add_generation_prompt=True, suffix=""):
        if self.template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           param="messages", code="no_chat_template")
        from mlxcy.errors import ChatTemplateError
        try:
            text = self.template.render(messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools)
        except (ChatTemplateError, ValueError, TypeError) as e:
            raise bad_request("messages", f"the chat template refused these messages: {e}") \
                from None
        text += suffix
        tok = self.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id] + ids
        return ids

    def text_ids(self, prompt):
        if isinstance(prompt, list):
            return list(prompt)
        ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        if not ids:
            bos = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else \
                self.tokenizer.eos_id
            ids = [bos]
        return ids

    def check_context(self, n_prompt, max_tokens, param):
        """max_tokens to use (default: what fits); a 400 when the prompt does not fit."""
        room = self.context - n_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; "
                                f"the prompt ({param}) has {n_prompt} tokens.", param=param,
                           code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. "
                                f"However, you requested {n_prompt + max_tokens} tokens "
                                f"({n_prompt} in the prompt, {max_tokens} in max_tokens).",
                           param="max_tokens", code="context_length_exceeded")
        return max_tokens


def _default_id(path) -> str:
    from pathlib import Path
    p = Path(str(path))
    return p.stem if p.suffix == ".gguf" else p.name


# ----------------------------------------------------------------- plumbing --

async def read_json(request: Request, limit: int):
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise APIError(400, "invalid Content-Length header") from None
        if n > limit:
            raise APIError(413, f"request body of {n} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection mid-request") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


class ClientGone(Exception):
    """The client closed the connection before a non-streamed reply was ready."""


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def endpoint(name, auth=True):
    """Wrap a handler: API key check, APIError -> OpenAI error body, metrics."""
    def deco(fn):
        async def handler(request: Request):
            st: ServerState = request.app.state.server
            try:
                if auth and st.api_key is not None:
                    _check_key(request, st.api_key)
                resp = await fn(request, st)
            except APIError as e:
                resp = _error_response(e)
            except ClientGone:
                # nobody reads this reply: no traceback in the log, counted as
                # 499 (nginx's "client closed request") in /metrics
                resp = Response(status_code=499)
            except Exception as e:  # noqa: BLE001 - answer, log, keep serving
                log.exception("%s failed", name)
                resp = JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                               "server_error"), status_code=500)
            st.metrics.requests.labels(name, str(resp.status_code)).inc()
            return resp
        handler.__name__ = fn.__name__
        return handler
    return deco


def _check_key(request, key):
    h = request.headers.get("authorization", "")
    scheme, _, token = h.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                              key.encode()):
        raise APIError(401, "Incorrect API key provided." if h else
                       "Missing API key: send 'Authorization: Bearer <key>'.",
                       "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _check_model(st, model):
    if model != st.model_id:
        raise APIError(404, f"The model '{model}' does not exist; this server serves "
                            f"'{st.model_id}'.", param="model", code="model_not_found")


async def _wait_all(request, subs, worker):
    """Every submission's (submission, items, text, finish reason), in order;
    the first error one of them met is raised.  Cancels them all if the
    client goes away."""
    results = {id(s): [] for s in subs}

    async def collect():
        async for batch in merged_batches(subs):
            for sub, it in batch:
                results[id(sub)].append(it)
    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()
                break
            if await request.is_disconnected():
                raise ClientGone
    except BaseException:
        task.cancel()
        for s in subs:
            if not s.finished:
                worker.cancel(s)
        raise
    out = []
    for sub in subs:
        items = results[id(sub)]
        err = next((it.error for it in items if it.kind == "err"), None)
        if err is not None:
            raise err
        out.append((sub, items, "".join(it.text for it in items if it.kind == "tok"),
                    next(it.finish_reason for it in items if it.kind == "end")))
    return out


def _sampling_dict(req, i):
    s = req.sampling
    seed = s.seed
    if seed is not None and i:
        seed = (seed + i) % 2 ** 64
    return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "min_p": s.min_p,
            "repetition_penalty": s.repetition_penalty if s.repetition_penalty != 1.0 else None,
            "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
            "logit_bias": s.logit_bias or None, "seed": seed}


def _usage(n_prompt, completion, cached):
    return {"prompt_tokens": n_prompt, "completion_tokens": completion,
            "total_tokens": n_prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token_entry(st, tok, lp):
    b = st.token_bytes()[tok] if 0 <= tok < st.vocab_size else b""
    return {"token": b.decode("utf-8", "replace"), "logprob": float(lp), "bytes": list(b)}


def _chat_logprobs(st, items, want_top):
    out = []
    for it in items:
        if it.kind != "tok" or it.token < 0 or it.logprob is None or it.token in st.stop_ids:
            continue
        e = _token_entry(st, it.token, it.logprob)
        e["top_logprobs"] = [_token_entry(st, t, l) for t, l in (it.top or [])[:want_top]] \
            if want_top else []
        out.append(e)
    return out


def _completion_logprobs(st, items, want_top, offset0=0):
    toks, lps, tops, offs = [], [], [], []
    off = offset0
    for it in items:
        if it.kind != "tok" or it.token < 0 or it.logprob is None or it.token in st.stop_ids:
            continue
        e = _token_entry(st, it.token, it.logprob)
        toks.append(e["token"])
        lps.append(e["logprob"])
        offs.append(off)
        off += len(it.text)
        if want_top:
            top = {}
            for t, l in (it.top or [])[:want_top]:
                top[_token_entry(st, t, l)["token"]] = float(l)
            tops.append(top)
        else:
            tops.append(None)
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


# ---------------------------------------------------------------- handlers --

def _prepare_chat(st: ServerState, req):
    """(prompt ids, mask factory, tool settings): template rendering,
    tokenization and grammar compilation, run off the event loop."""
    tools = req.tools if req.tool_choice != "none" else None
    forced = isinstance(req.tool_choice, dict) or req.tool_choice == "required"
    style = st.tool_style if tools else None
    if tools and style is None:
        raise bad_request("tools", "this model's chat template does not support tools")
    suffix = toolmod.forced_prefix(style) if forced else ""
    ids = st.chat_ids(req.messages, tools=tools, suffix=suffix)
    mask = None
    if forced:
        chosen = [t for t in tools if isinstance(req.tool_choice, str)
                  or t["function"]["name"] == req.tool_choice["name"]]
        schema = tool_call_schema(chosen, toolmod.args_key(style))
        mask = st.grammars.compile_json(schema, "tools")
    elif req.response_format is not None:
        mask = st.grammars.compile_json(req.response_format["schema"],
                                        "response_format.json_schema.schema")
    names = [t["function"]["name"] for t in tools] if tools else None
    return ids, mask, (style, names, forced)


@endpoint("chat")
async def chat_completions(request: Request, st: ServerState):
    body = await read_json(request, st.max_body)
    req = schemas.parse_chat(body, st.vocab_size, st.context)
    _check_model(st, req.model)
    ids, mask, tooling = await to_thread.run_sync(_prepare_chat, st, req)
    max_tokens = st.check_context(len(ids), req.max_tokens, "messages")
    subs = _submit(st, req, [ids], max_tokens, mask)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        return _sse(_chat_stream(request, st, req, subs, cid, tooling))
    choices = []
    style, names, forced = tooling
    for sub, items, text, reason in await _wait_all(request, subs, st.worker):
        msg = {"role": "assistant", "content": text}
        if style is not None:
            full = (toolmod.forced_prefix(style) + text) if forced else text
            content, calls = toolmod.parse_tool_calls(full, style, names)
            if calls:
                msg = {"role": "assistant", "content": content, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
        choice = {"index": sub.index, "message": msg, "logprobs": None, "finish_reason": reason}
        if req.logprobs:
            choice["logprobs"] = {"content": _chat_logprobs(st, items, req.top_logprobs)}
        choices.append(choice)
    return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()),
                         "model": st.model_id, "system_fingerprint": FINGERPRINT,
                         "choices": choices,
                         "usage": _usage(subs[0].prompt_tokens,
                                         sum(s.completion_tokens for s in subs),
                                         subs[0].cached_tokens)})


def _submit(st, req, prompts, max_tokens, mask, per_prompt_max=None):
    subs = []
    q = asyncio.Queue()
    k = 0
    for p, ids in enumerate(prompts):
        for j in range(req.n):
            subs.append(Submission(ids, max_tokens=per_prompt_max[p] if per_prompt_max
                                   else max_tokens,
                                   sampling=_sampling_dict(req, j), stop=req.stop,
                                   stop_ids=st.stop_ids, logprobs=req.logprobs,
                                   top_logprobs=req.top_logprobs, mask_factory=mask,
                                   index=k, queue=q))
            k += 1
    st.worker.submit(subs)
    return subs


def _sse(gen):
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Chunks:
    """The `data:` events of one streamed response.  Every chunk repeats the
    response's id, object, created, model and fingerprint (and "usage": null
    when the usage chunk was asked for): they are encoded once, a chunk adds
    its choice.  `piece` writes a choice's next text, the bulk of a stream,
    without json.dumps; open/close is what wraps that text in the choice
    ('"delta":{"content":' and '}' for chat, '"text":' and '' for completions)."""

    def __init__(self, cid, obj, created, model, usage, open_, close):
        self.head = (f'data: {{"id":{_json_str(cid)},"object":"{obj}","created":{created},'
                     f'"model":{_json_str(model)},"system_fingerprint":"{FINGERPRINT}",'
                     f'"choices":[')
        self.tail = '],"usage":null}\n\n' if usage else ']}\n\n'
        self.open, self.close = open_, close

    def choice(self, choice: dict) -> str:
        return self.head + _dumps(choice) + self.tail

    def piece(self, index: int, text: str) -> str:
        return (f'{self.head}{{"index":{index},{self.open}{_json_str(text)}{self.close},'
                f'"logprobs":null,"finish_reason":null}}{self.tail}')

    def usage(self, usage: dict) -> str:
        return self.head + '],"usage":' + _dumps(usage) + "}\n\n"


def _runs(batch):
    """[(submission, [Item, ...])]: `batch` cut into runs of one submission's
    consecutive items, so that a stream that fell behind sends the text of
    several tokens as one chunk."""
    runs = []
    for sub, it in batch:
        if runs and runs[-1][0] is sub:
            runs[-1][1].append(it)
        else:
            runs.append((sub, [it]))
    return runs


async def _chat_stream(request, st, req, subs, cid, tooling):
    style, names, forced = tooling
    streams = {id(s): toolmod.ToolStream(style, names, forced) for s in subs}
    ch = _Chunks(cid, "chat.completion.chunk", int(time.time()), st.model_id,
                 req.include_usage, '"delta":{"content":', "}")

    def choice(index, delta, finish=None, logprobs=None):
        return ch.choice({"index": index, "delta": delta, "logprobs": logprobs,
                          "finish_reason": finish})

    def events(sub, items):
        """The chunks of one run of sub's items."""
        ts, out = streams[id(sub)], []
        toks = [it for it in items if it.kind == "tok"]
        if toks:
            text = "".join(ts.feed(it.text) for it in toks)
            lp = _chat_logprobs(st, toks, req.top_logprobs) if req.logprobs else None
            if lp:
                out.append(choice(sub.index, {"content": text}, logprobs={"content": lp}))
            elif text:
                out.append(ch.piece(sub.index, text))
        for it in items:
            if it.kind == "end":
                rest, calls = ts.finish()
                reason = it.finish_reason
                if rest:
                    out.append(ch.piece(sub.index, rest))
                if calls:
                    out.append(choice(sub.index, {"tool_calls": [
                        dict(c, index=k) for k, c in enumerate(calls)]}))
                    if reason == "stop":
                        reason = "tool_calls"
                out.append(choice(sub.index, {}, finish=reason))
            elif it.kind == "err":
                out.append("data: " + _dumps(it.error.body()) + "\n\n")
        return out
    try:
        yield "".join(choice(s.index, {"role": "assistant", "content": ""}) for s in subs)
        async for batch in merged_batches(subs):
            # one write per batch: everything delivered since the last one
            out = [c for sub, items in _runs(batch) for c in events(sub, items)]
            if all(s.finished for s in subs):
                if req.include_usage:
                    out.append(ch.usage(_usage(subs[0].prompt_tokens,
                                               sum(s.completion_tokens for s in subs),
                                               subs[0].cached_tokens)))
                out.append("data: [DONE]\n\n")
            if out:
                yield "".join(out)
    finally:
        for s in subs:
            if not s.finished:
                st.worker.cancel(s)


@endpoint("completions")
async def completions(request: Request, st: ServerState):
    body = await read_json(request, st.max_body)
    req = schemas.parse_completion(body, st.vocab_size, st.context)
    _check_model(st, req.model)
    prompts = await to_thread.run_sync(lambda: [st.text_ids(p) for p in req.prompts])
    maxes = [st.check_context(len(ids), req.max_tokens, "prompt") for ids in prompts]
    mask = None
    if req.response_format is not None:
        mask = await to_thread.run_sync(st.grammars.compile_json, req.response_format["schema"],
                                        "response_format.json_schema.schema")
    subs = _submit(st, req, prompts, None, mask, per_prompt_max=maxes)
    cid = f"cmpl-{uuid.uuid4().hex}"
    n_prompt = sum(len(p) for p in prompts)
    if req.stream:
        return _sse(_completion_stream(st, req, subs, cid, n_prompt))
    choices = []
    for sub, items, text, reason in await _wait_all(request, subs, st.worker):
        prefix = ""
        if req.echo:
            p = req.prompts[sub.index // req.n]
            prefix = p if isinstance(p, str) else st.tokenizer.decode(p)
        choice = {"index": sub.index, "text": prefix + text, "logprobs": None,
                  "finish_reason": reason}
        if req.logprobs:
            choice["logprobs"] = _completion_logprobs(st, items, req.top_logprobs, len(prefix))
        choices.append(choice)
    cached = sum(s.cached_tokens for s in subs[::req.n])
    return JSONResponse({"id": cid, "object": "text_completion", "created": int(time.time()),
                         "model": st.model_id, "system_fingerprint": FINGERPRINT,
                         "choices": choices,
                         "usage": _usage(n_prompt, sum(s.completion_tokens for s in subs), cached)})


async def _completion_stream(st, req, subs, cid, n_prompt):
    ch = _Chunks(cid, "text_completion", int(time.time()), st.model_id, req.include_usage,
                 '"text":', "")
    offsets = {id(s): 0 for s in subs}

    def events(sub, items):
        """The chunks of one run of sub's items."""
        out = []
        toks = [it for it in items if it.kind == "tok"]
        if toks:
            text = "".join(it.text for it in toks)
            lp = None
            if req.logprobs:
                lp = _completion_logprobs(st, toks, req.top_logprobs, offsets[id(sub)])
                lp = lp if lp["tokens"] else None
            offsets[id(sub)] += len(text)
            if lp:
                out.append(ch.choice({"index": sub.index, "text": text, "logprobs": lp,
                                      "finish_reason": None}))
            elif text:
                out.append(ch.piece(sub.index, text))
        for it in items:
            if it.kind == "end":
                out.append(ch.choice({"index": sub.index, "text": "", "logprobs": None,
                                      "finish_reason": it.finish_reason}))
            elif it.kind == "err":
                out.append("data: " + _dumps(it.error.body()) + "\n\n")
        return out
    try:
        async for batch in merged_batches(subs):
            # one write per batch: everything delivered since the last one
            out = [c for sub, items in _runs(batch) for c in events(sub, items)]
            if all(s.finished for s in subs):
                if req.include_usage:
                    out.append(ch.usage(_usage(n_prompt, sum(s.completion_tokens for s in subs),
                                               sum(s.cached_tokens for s in subs[::req.n]))))
                out.append("data: [DONE]\n\n")
            if out:
                yield "".join(out)
    finally:
        for s in subs:
            if not s.finished:
                st.worker.cancel(s)


def _model_card(st):
    return {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "mlxcy",
            "context_length": st.context, "max_model_len": st.context}


@endpoint("models")
async def list_models(request: Request, st: ServerState):
    return JSONResponse({"object": "list", "data": [_model_card(st)]})


@endpoint("model")
async def get_model(request: Request, st: ServerState):
    _check_model(st, request.path_params["model"])
    return JSONResponse(_model_card(st))


@endpoint("health", auth=False)
async def health(request: Request, st: ServerState):
    w = st.worker
    body = {"status": "ok" if w.alive else "unavailable", "model": st.model_id,
            "running": w.num_running, "waiting": w.num_waiting, "live": w.live}
    return JSONResponse(body, status_code=200 if w.alive else 503)


@endpoint("metrics")
async def metrics(request: Request, st: ServerState):
    from mlxcy import memory
    st.metrics.mlx_active.set(memory.get_active_memory())      # now, not at the last step
    st.metrics.mlx_cache.set(memory.get_cache_memory())
    return Response(st.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@endpoint("tokenize")
async def tokenize(request: Request, st: ServerState):
    body = await read_json(request, st.max_body)
    t = schemas.parse_tokenize(body)
    if body.get("model") is not None:
        _check_model(st, body["model"])
    if "prompt" in t:
        ids = await to_thread.run_sync(
            lambda: st.tokenizer.encode(t["prompt"], add_special_tokens=t["add_special_tokens"]))
    else:
        ids = await to_thread.run_sync(
            lambda: st.chat_ids(t["messages"], add_generation_prompt=t["add_generation_prompt"]))
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": st.context})


@endpoint("detokenize")
async def detokenize(request: Request, st: ServerState):
    body = await read_json(request, st.max_body)
    toks = schemas.parse_detokenize(body, st.vocab_size)
    if body.get("model") is not None:
        _check_model(st, body["model"])
    try:
        text = st.tokenizer.decode(toks)
    except ValueError as e:
        raise bad_request("tokens", str(e)) from None
    return JSONResponse({"prompt": text})


_PAGE = None


async def page(request: Request):
    global _PAGE
    if _PAGE is None:
        _PAGE = resources.files("mlxcy.serve").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(_PAGE)


async def _http_error(request, exc: HTTPException):
    status = exc.status_code
    if status == 404:
        msg = f"no route {request.method} {request.url.path}"
        code = "not_found"
    elif status == 405:
        msg = f"method {request.method} is not allowed on {request.url.path}"
        code = "method_not_allowed"
    else:
        msg, code = str(exc.detail), None
    st = getattr(request.app.state, "server", None)
    if st is not None:
        st.metrics.requests.labels("other", str(status)).inc()
    return JSONResponse(error_body(msg, "invalid_request_error", None, code), status_code=status,
                        headers=getattr(exc, "headers", None))


async def _any_error(request, exc):
    log.exception("unhandled error")
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                        status_code=500)


def create_app(worker, *, model_id=None, api_key=None, max_body=MAX_BODY) -> Starlette:
    """A Starlette app serving `worker` (a started mlxcy.serve.worker.Worker)."""
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error,
                                                       Exception: _any_error})
    app.state.server = ServerState(worker, model_id=model_id, api_key=api_key, max_body=max_body)
    return app
