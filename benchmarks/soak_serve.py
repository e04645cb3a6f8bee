"""Soak `mlxcy serve`: concurrent sessions for minutes, with streams cancelled
mid-way, connections dropped before the reply, bad requests, multi-turn chats
(prefix-cache hits), n > 1, log-probs, JSON schemas and stop strings.

    python benchmarks/soak_serve.py --minutes 10 --sessions 24     # its own server, SmolLM2
    python benchmarks/soak_serve.py --model DIR --minutes 3 --kv-budget 0
    python benchmarks/soak_serve.py --url http://127.0.0.1:8080 --model-id NAME --minutes 10

Each session (a thread, its own connections) draws actions at random (seeded):

    chat        a streamed chat turn; the session's conversation grows (and is
                cut back to its first turn when it gets long)
    complete    a non-streamed completion with n=2, seed and logprobs
    json        a non-streamed chat reply under a json_schema response_format
    stop        a streamed completion with stop strings
    cancel      a streamed request closed after 1-4 events
    drop        a non-streamed request whose connection closes before the reply
    bad         a request the server must refuse (malformed JSON, wrong types,
                unknown model, too long, a body over the size limit ...)
    info        /health, /v1/models, /metrics, /tokenize

It checks, and exits with status 1 when any check fails:
  - every request is answered: 200 with a well-formed body or a complete
    stream (one id, the role first, a finish_reason per choice, `[DONE]`), or a
    4xx/429 with OpenAI's error body; none waits past --timeout (a hang);
  - after the load the server goes idle (no running, waiting or live sequence);
  - MLX active memory, less what the prefix cache holds, is back at its level
    before the load (within --tolerance-mb): cancelled and dropped sequences
    leak nothing.
It prints process RSS and MLX memory sampled every --sample-every seconds,
the growth after warm-up, less the prefix cache's, of the RSS and of the RSS
right after the server's heap trims (what it keeps; medians of the second and
last quarters' samples), and the RSS once idle after the load.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from bench_serve import sse_events  # benchmarks/, beside this script

WORDS = ("river mountain lantern copper violet harbor meadow thunder orchard glacier canyon "
         "ember falcon willow marble compass quartz tundra").split()

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer"}},
          "required": ["name", "count"], "additionalProperties": False}


def _rss_growth(samples, seconds, key):
    """Growth of samples[key] after warm-up, less what the prefix cache took
    meanwhile (it fills to its budget by design): the median of the last
    quarter's samples minus the median of the second quarter's (medians,
    as RSS is a saw-tooth: the server gives freed heap pages back every 10 s,
    mlxcy.memory.trim_heap, and they fault in again as the load goes on)."""
    def med(lo, hi):
        xs = sorted(s[key] - s["prefix_mb"] for s in samples
                    if lo * seconds <= s["t"] < hi * seconds and s[key] > 0)
        return xs[len(xs) // 2] if xs else None
    a, b = med(0.25, 0.5), med(0.75, 1.01)
    return None if a is None or b is None else round(b - a, 1)


def _bad_requests(model):
    """(path, raw body, expected status) of requests the server must refuse."""
    msgs = [{"role": "user", "content": "hi"}]

    def j(x):
        return json.dumps(x).encode()
    return [
        ("/v1/chat/completions", b"{not json", 400),
        ("/v1/chat/completions", b"", 400),
        ("/v1/chat/completions", b"[1, 2]", 400),
        ("/v1/chat/completions", j({"messages": msgs}), 400),
        ("/v1/chat/completions", j({"model": "no-such-model", "messages": msgs}), 404),
        ("/v1/chat/completions", j({"model": model, "messages": "hi"}), 400),
        ("/v1/chat/completions", j({"model": model, "messages": msgs, "temperature": "hot"}), 400),
        ("/v1/chat/completions", j({"model": model, "messages": msgs, "max_tokens": -3}), 400),
        ("/v1/chat/completions", j({"model": model, "messages": msgs, "n": 10 ** 6}), 400),
        ("/v1/chat/completions", j({"model": model, "messages": msgs,
                                    "logit_bias": {"x": 1}}), 400),
        ("/v1/chat/completions", j({"model": model, "messages": msgs,
                                    "response_format": {"type": "xml"}}), 400),
        ("/v1/chat/completions", j({"model": model, "messages": [
            {"role": "user", "content": "word " * 40000}]}), 400),
        ("/v1/completions", j({"model": model, "prompt": [1, -5]}), 400),
        ("/v1/completions", j({"model": model, "prompt": "x", "max_tokens": 10 ** 9}), 400),
        ("/v1/completions", b'{"model": "' + model.encode() + b'", "prompt": "' +
         b"a" * (9 << 20) + b'"}', 413),
        ("/detokenize", j({"tokens": [-1]}), 400),
        ("/no/such/route", j({}), 404),
    ]


class Failure(Exception):
    pass


class Session:
    def __init__(self, soak, k):
        self.soak, self.k = soak, k
        self.rng = random.Random(soak.seed * 1000 + k)
        self.history = []

    # -- HTTP -----------------------------------------------------------------
    def _conn(self):
        return http.client.HTTPConnection(self.soak.host, self.soak.port, timeout=self.soak.timeout)

    def _headers(self):
        h = {"Content-Type": "application/json"}
        if self.soak.api_key:
            h["Authorization"] = f"Bearer {self.soak.api_key}"
        return h

    def _call(self, method, path, body=None, raw=None):
        c = self._conn()
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            c.request(method, path, body=data, headers=self._headers())
            r = c.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            c.close()

    def _stream(self, path, body, stop_after=None):
        """The parsed events of a stream ("[DONE]" last), or the first
        `stop_after` events after which the connection is cut."""
        c = self._conn()
        try:
            c.request("POST", path, body=json.dumps(body).encode(), headers=self._headers())
            r = c.getresponse()
            if r.status != 200:
                return r.status, _json(r.read())
            events = []
            for ev in sse_events(r):
                events.append(ev)
                if ev == "[DONE]":
                    break
                if stop_after is not None and len(events) >= stop_after:
                    c.sock.shutdown(socket.SHUT_RDWR)
                    return 200, events
            return 200, events
        finally:
            c.close()

    # -- checks ---------------------------------------------------------------
    def _error_or_raise(self, status, body, what):
        """A refusal must be a 4xx or 429 with OpenAI's error body."""
        if not (400 <= status < 500):
            raise Failure(f"{what}: HTTP {status}: {str(body)[:200]}")
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
            raise Failure(f"{what}: HTTP {status} without an error body: {str(body)[:200]}")
        return "refused" if status != 429 else "busy"

    def _check_stream(self, events, n_choices, what, obj):
        if not events or events[-1] != "[DONE]":
            raise Failure(f"{what}: the stream did not end with [DONE]")
        chunks = [e for e in events[:-1] if "error" not in e]
        if len(chunks) != len(events) - 1:
            raise Failure(f"{what}: an error event inside the stream: {events}")
        if len({c["id"] for c in chunks}) != 1 or any(c["object"] != obj for c in chunks):
            raise Failure(f"{what}: chunks with several ids or a wrong object")
        finished = {}
        text = {}
        for c in chunks:
            for ch in c["choices"]:
                i = ch["index"]
                if i in finished:
                    raise Failure(f"{what}: choice {i} sent a chunk after its finish_reason")
                piece = ch.get("delta", {}).get("content") if "delta" in ch else ch.get("text")
                text[i] = text.get(i, "") + (piece or "")
                if ch.get("finish_reason") is not None:
                    finished[i] = ch["finish_reason"]
        if sorted(finished) != list(range(n_choices)):
            raise Failure(f"{what}: finish reasons {finished} for {n_choices} choices")
        if obj == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"].get("role") \
                != "assistant":
            raise Failure(f"{what}: the first delta does not carry the role")
        return text, finished

    # -- actions --------------------------------------------------------------
    def _words(self, n):
        return " ".join(self.rng.choice(WORDS) for _ in range(n))

    def chat(self):
        if not self.history or len(self.history) > 6:
            self.history = [{"role": "user", "content": f"Tell me about {self._words(4)}."}]
        else:
            self.history.append({"role": "user", "content": f"And {self._words(2)}?"})
        body = {"model": self.soak.model_id, "messages": self.history, "stream": True,
                "max_tokens": self.rng.randint(4, self.soak.max_tokens), "temperature": 0.7,
                "stream_options": {"include_usage": True}}
        st, events = self._stream("/v1/chat/completions", body)
        if st != 200:
            return self._error_or_raise(st, events, "chat")
        text, _ = self._check_stream(events, 1, "chat", "chat.completion.chunk")
        usage = events[-2].get("usage") if len(events) > 1 else None
        if not usage or usage["completion_tokens"] < 1:
            raise Failure(f"chat: no usage chunk: {events[-2:]}")
        self.soak.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        self.history.append({"role": "assistant", "content": text[0]})
        return "ok"

    def complete(self):
        body = {"model": self.soak.model_id, "prompt": f"The {self._words(3)}",
                "max_tokens": self.rng.randint(2, self.soak.max_tokens), "n": 2,
                "seed": self.rng.randint(0, 1000), "temperature": 0.8, "logprobs": 2}
        st, _, raw = self._call("POST", "/v1/completions", body)
        r = _json(raw)
        if st != 200:
            return self._error_or_raise(st, r, "complete")
        if [c["index"] for c in r["choices"]] != [0, 1] or \
                r["usage"]["completion_tokens"] < 2:
            raise Failure(f"complete: a malformed reply: {str(r)[:300]}")
        for c in r["choices"]:
            if len(c["logprobs"]["tokens"]) != len(c["logprobs"]["token_logprobs"]):
                raise Failure("complete: log-probs do not match the tokens")
        return "ok"

    def json(self):
        body = {"model": self.soak.model_id, "max_tokens": 48, "temperature": 0.5,
                "messages": [{"role": "user", "content": f"A {self._words(1)} as JSON."}],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "thing", "schema": SCHEMA}}}
        st, _, raw = self._call("POST", "/v1/chat/completions", body)
        r = _json(raw)
        if st != 200:
            return self._error_or_raise(st, r, "json")
        ch = r["choices"][0]
        if ch["finish_reason"] == "stop":
            obj = json.loads(ch["message"]["content"])
            if set(obj) != {"name", "count"} or not isinstance(obj["count"], int):
                raise Failure(f"json: the reply breaks the schema: {obj}")
        return "ok"

    def stop(self):
        body = {"model": self.soak.model_id, "prompt": f"{self._words(5)}", "stream": True,
                "max_tokens": self.soak.max_tokens, "stop": [" the", "\n", "e"],
                "temperature": 0.9, "seed": self.rng.randint(0, 99)}
        st, events = self._stream("/v1/completions", body)
        if st != 200:
            return self._error_or_raise(st, events, "stop")
        text, fin = self._check_stream(events, 1, "stop", "text_completion")
        if fin[0] == "stop" and any(s in text[0] for s in body["stop"]):
            raise Failure(f"stop: a stop string in the text: {text[0]!r}")
        return "ok"

    def cancel(self):
        path, body = ("/v1/chat/completions", {"messages": [
            {"role": "user", "content": f"Write at length about {self._words(3)}."}]}) \
            if self.rng.random() < 0.5 else ("/v1/completions", {"prompt": self._words(6)})
        body.update(model=self.soak.model_id, stream=True, max_tokens=400, temperature=0.5)
        st, events = self._stream(path, body, stop_after=self.rng.randint(1, 4))
        if st != 200:
            return self._error_or_raise(st, events, "cancel")
        return "cancelled"

    def drop(self):
        body = json.dumps({"model": self.soak.model_id, "prompt": self._words(6),
                           "max_tokens": 400, "temperature": 0.5}).encode()
        s = socket.create_connection((self.soak.host, self.soak.port), timeout=self.soak.timeout)
        try:
            auth = f"Authorization: Bearer {self.soak.api_key}\r\n" if self.soak.api_key else ""
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\n" + auth.encode() +
                      b"Content-Type: application/json\r\nContent-Length: " +
                      str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(self.rng.uniform(0.0, 0.5))
        finally:
            s.close()
        return "dropped"

    def bad(self):
        path, raw, want = self.rng.choice(self.soak.bad)
        st, _, body = self._call("POST", path, raw=raw)
        if st != want:
            raise Failure(f"bad {path} {raw[:60]!r}: HTTP {st}, expected {want}: {body[:200]!r}")
        self._error_or_raise(st, _json(body), f"bad {path}")
        return "refused"

    def info(self):
        what = self.rng.choice(("/health", "/v1/models", "/metrics", "/tokenize"))
        if what == "/tokenize":
            st, _, raw = self._call("POST", what, {"prompt": self._words(5)})
            ok = st == 200 and len(_json(raw)["tokens"]) > 0
        else:
            st, _, raw = self._call("GET", what)
            ok = st == 200 and raw
        if not ok:
            raise Failure(f"info {what}: HTTP {st}: {raw[:200]!r}")
        return "ok"

    ACTIONS = (("chat", 5), ("complete", 2), ("json", 1), ("stop", 2), ("cancel", 3),
               ("drop", 2), ("bad", 3), ("info", 1))

    def run(self, deadline, count):
        names = [a for a, _ in self.ACTIONS]
        weights = [w for _, w in self.ACTIONS]
        done = 0
        while (count is None or done < count) and (deadline is None or time.time() < deadline):
            name = self.rng.choices(names, weights)[0]
            t0 = time.perf_counter()
            try:
                outcome = getattr(self, name)()
            except (TimeoutError, socket.timeout):
                outcome = "hang"
                self.soak.failures.append(f"{name}: no answer within {self.soak.timeout} s")
            except Failure as e:
                outcome = "failed"
                self.soak.failures.append(str(e))
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                outcome = "failed"
                self.soak.failures.append(f"{name}: {type(e).__name__}: {e}")
            self.soak.record(name, outcome, time.perf_counter() - t0)
            done += 1


def _json(raw):
    try:
        return json.loads(raw)
    except (ValueError, TypeError):
        return raw


class Soak:
    def __init__(self, url, model_id, *, sessions=16, seed=0, timeout=120.0, max_tokens=24,
                 api_key=None):
        u = urlparse(url)
        self.host, self.port = u.hostname, u.port
        self.model_id, self.sessions, self.seed = model_id, sessions, seed
        self.timeout, self.max_tokens, self.api_key = timeout, max_tokens, api_key
        self.bad = _bad_requests(model_id)
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []
        self.cached_tokens = 0
        self.samples = []

    def record(self, name, outcome, seconds):
        with self.lock:
            key = f"{name}:{outcome}"
            self.counts[key] = self.counts.get(key, 0) + 1

    def metrics(self):
        """{name: value} of the server's unlabelled gauges and counters."""
        c = http.client.HTTPConnection(self.host, self.port, timeout=30)
        h = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        c.request("GET", "/metrics", headers=h)
        text = c.getresponse().read().decode()
        c.close()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def health(self):
        c = http.client.HTTPConnection(self.host, self.port, timeout=30)
        c.request("GET", "/health")
        body = json.loads(c.getresponse().read())
        c.close()
        return body

    def wait_idle(self, timeout=60.0):
        """True once nothing runs, waits or is live (and the gauges say so)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self.health()
            if h["running"] == 0 and h["waiting"] == 0 and h["live"] == 0:
                time.sleep(1.5)          # the engine thread's gauges follow its last step
                return True
            time.sleep(0.2)
        return False

    def memory(self):
        m = self.metrics()
        return {"rss_mb": m.get("process_resident_memory_bytes", 0) / 2 ** 20,
                "mlx_active_mb": m["mlxcy_mlx_active_memory_bytes"] / 2 ** 20,
                "mlx_cache_mb": m.get("mlxcy_mlx_cache_memory_bytes", 0) / 2 ** 20,
                "prefix_mb": m.get("mlxcy_prefix_cache_bytes", 0) / 2 ** 20,
                "rss_trimmed_mb": m.get("mlxcy_resident_memory_after_trim_bytes", 0) / 2 ** 20,
                "running": m.get("mlxcy_running_sequences", 0)}

    def run(self, *, seconds=None, actions=None, sample_every=10.0, tolerance_mb=1.0,
            reset=None):
        """Run the load; returns a report dict with `ok` and the failures.

        reset: a callable emptying the server's prefix cache (when the server
        runs in this process), called before and after the load: then MLX
        active memory itself must come back.  Without it the prefix cache's
        bytes are subtracted, and MLX's allocator rounds small arrays up
        (a tree of short runs holds up to ~1.5x its bytes), so half of the
        prefix cache's growth is allowed on top of tolerance_mb."""
        if not self.wait_idle():
            raise RuntimeError("the server is busy before the soak")
        if reset is not None:
            reset()
        before = self.memory()
        deadline = None if seconds is None else time.time() + seconds
        stop = threading.Event()
        t_start = time.time()

        def sample():
            while not stop.wait(sample_every):
                self.samples.append(dict(self.memory(), t=round(time.time() - t_start)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        threads = [threading.Thread(target=Session(self, k).run, args=(deadline, actions))
                   for k in range(self.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        sampler.join()
        idle = self.wait_idle()
        grown = self.memory()["prefix_mb"] - before["prefix_mb"]
        if reset is not None:
            reset()
        after = self.memory()
        leak = (after["mlx_active_mb"] - after["prefix_mb"]) - \
            (before["mlx_active_mb"] - before["prefix_mb"])
        allowed = tolerance_mb + (0.5 * max(0.0, grown) if reset is None else 0.0)
        failures = list(self.failures)
        if not idle:
            failures.append(f"the server did not go idle: {self.health()}")
        if leak > allowed:
            failures.append(f"MLX active memory outside the prefix cache grew by {leak:.2f} MB "
                            f"(before {before}, after {after})")
        secs = time.time() - t_start
        report = {"seconds": round(secs, 1), "sessions": self.sessions,
                  "requests": sum(self.counts.values()), "counts": dict(sorted(self.counts.items())),
                  "cached_tokens": self.cached_tokens, "before": before, "after": after,
                  "mlx_leak_mb": round(leak, 3), "prefix_growth_mb": round(grown, 3),
                  "rss_growth_after_warmup_mb": _rss_growth(self.samples, secs, "rss_mb"),
                  "rss_after_trim_growth_mb": _rss_growth(self.samples, secs, "rss_trimmed_mb"),
                  "rss_idle_after_mb": round(after["rss_mb"]),
                  "samples": self.samples, "failures": failures[:50], "ok": not failures}
        return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="soak a running server (default: start one)")
    ap.add_argument("--model-id", default=None, help="with --url: the served model's id")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--model", help="model directory for the server it starts (default SmolLM2)")
    ap.add_argument("--shape", help="random weights of a bench_decode shape, e.g. qwen3-0.6b")
    ap.add_argument("--quant", default="bf16", choices=("bf16", "4bit"))
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-queue", type=int, default=64,
                    help="small, so that the load also meets 429s")
    ap.add_argument("--kv-budget", default="256M")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--actions", type=int, default=None,
                    help="actions per session instead of --minutes")
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--tolerance-mb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the report as JSON")
    args = ap.parse_args()
    srv = None
    if args.url:
        url, model_id = args.url, args.model_id
        if not model_id:
            raise SystemExit("--url needs --model-id")
    else:
        import tempfile

        import bench_serve
        args.clients, args.only = "", None
        path = bench_serve.model_dir(args)
        log = open(tempfile.mktemp(suffix=".log", prefix="soak_serve_"), "w")
        print(f"model {path}  (server log: {log.name})", flush=True)
        srv = bench_serve.Server("mlxcy", path, args.max_batch, log,
                                 extra=["--max-queue", str(args.max_queue),
                                        "--kv-budget", args.kv_budget])
        url, model_id = f"http://127.0.0.1:{srv.port}", srv.model
        bench_serve.run_level(srv, 2, 1, 8)                  # warm-up
    try:
        soak = Soak(url, model_id, sessions=args.sessions, seed=args.seed, timeout=args.timeout,
                    max_tokens=args.max_tokens, api_key=args.api_key)
        rep = soak.run(seconds=None if args.actions else args.minutes * 60,
                       actions=args.actions, sample_every=args.sample_every,
                       tolerance_mb=args.tolerance_mb)
    finally:
        if srv is not None:
            srv.stop()
    for s in rep["samples"]:
        print(json.dumps(s))
    short = {k: v for k, v in rep.items() if k != "samples"}
    print(json.dumps(short, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
    print("OK" if rep["ok"] else f"FAILED: {len(rep['failures'])} problems")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
