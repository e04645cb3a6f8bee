"""The engine's thread: one dedicated thread owns the model, the generation
engine and the prefix cache (MLX streams are thread-local), and runs
`engine.step()` in a loop.

Request handlers (on the asyncio loop) hand it Submissions, one per sequence,
through a command list; the thread admits them between steps, so a request
that arrives while others decode joins the running batch at the next step.
After each step the thread turns every sequence's events into text
(incremental detokenization and stop strings) and delivers them to the
sequences' asyncio queues with one `loop.call_soon_threadsafe` per step.
The work per token and stream is kept small: at 32-64 streams it is what
bounds a step on a fast device (the thread shares the GIL with the loop).
A cancelled submission (a client that went away) is cancelled in the engine
at the next step, which frees its rows.
"""
from __future__ import annotations

import asyncio
import codecs
import logging
import threading
import time
import traceback
from collections import defaultdict

from mlxcy.memory import trim_heap

from .errors import APIError

__all__ = ["Worker", "Submission", "Item", "merged_batches"]

log = logging.getLogger("mlxcy.serve")

# Seconds between returns of the C heap's free pages to the system while
# sequences run (and once whenever the batch drains): without them the RSS of
# a server under changing load grows in steps (mlxcy.memory.trim_heap).  A
# trim takes ~20 ms of the engine thread; the pages it returns fault in again
# as the load goes on (~250 MB per 10 s in docs/serve.md's soak), and trimming
# every 2 s narrowed that only to ~200 MB for 1% of the thread's time.
TRIM_EVERY = 10.0


class Item:
    """What a sequence's queue receives: a token ("tok"), its end ("end") or
    a failure ("err")."""
    __slots__ = ("kind", "text", "token", "logprob", "top", "finish_reason", "error")

    def __init__(self, kind, text="", token=-1, logprob=None, top=None, finish_reason=None,
                 error=None):
        self.kind, self.text, self.token = kind, text, token
        self.logprob, self.top = logprob, top
        self.finish_reason, self.error = finish_reason, error


class Submission:
    """One sequence to generate.  Made on the event loop; the worker fills
    `prompt_tokens`, `cached_tokens`, `completion_tokens` as it goes."""

    def __init__(self, prompt_ids, *, max_tokens, sampling=None, stop=(), stop_ids=(),
                 logprobs=False, top_logprobs=0, mask_factory=None, index=0, queue=None):
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = int(max_tokens)
        self.sampling = dict(sampling or {})
        self.stop = list(stop)
        self.stop_ids = tuple(stop_ids)
        self.logprobs = bool(logprobs)
        self.top_logprobs = int(top_logprobs)
        self.mask_factory = mask_factory
        self.index = index
        # the queue receives (submission, [Item, ...]) once per engine step;
        # the n choices of one request share one queue
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.t_arrival = time.perf_counter()
        self.prompt_tokens = len(self.prompt_ids)
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finished = False          # set on the loop when "end"/"err" is read
        self.cancelled = False



async def merged_batches(subs):
    """Yield lists of (submission, Item) for submissions sharing one queue,
    until every one has ended (its "end" or "err" item included).  A list
    holds everything delivered since the last one: a reader that fell behind
    by several engine steps gets them together (and writes them at once)."""
    left = len(subs)
    q = subs[0].queue
    while left:
        delivered = [await q.get()]
        while not q.empty():
            delivered.append(q.get_nowait())
        batch = []
        for sub, items in delivered:
            for it in items:
                batch.append((sub, it))
                if it.kind in ("end", "err"):
                    sub.finished = True
                    left -= 1
        yield batch


class _Seq:
    """The worker's state of one running submission."""
    __slots__ = ("sub", "sid", "text", "generated", "t_last", "mask", "ended")

    def __init__(self, sub, sid, text, mask):
        self.sub, self.sid, self.text, self.mask = sub, sid, text, mask
        self.generated = []
        self.t_last = None
        self.ended = False


class Worker:
    """Owns model + engine + prefix cache on one thread.

    Worker(model_path, max_batch=32, max_queue=256, kv_budget=1 GiB, metrics=None,
           dtype=None, prefill_chunk=None, prompt_lookup=None, draft_model=None,
           num_draft=4, kv_bits=None, kv_group_size=64, engine_factory=None)
    prompt_lookup (None, True or K) is handed to every sequence; draft_model
    (a path) makes the engine verify num_draft drafted tokens per step; kv_bits
    quantizes the KV cache (the prefix cache keeps it quantized).
    start() loads the model on the thread and returns once it is ready (or
    raises what loading raised)."""

    def __init__(self, model_path, *, max_batch=32, max_queue=256, kv_budget=1 << 30,
                 metrics=None, dtype=None, prefill_chunk=None, prompt_lookup=None,
                 draft_model=None, num_draft=4, kv_bits=None, kv_group_size=64,
                 engine_factory=None, load_options=None, prefix_min_tokens=None):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        if kv_budget < 0:
            raise ValueError(f"kv_budget: must be >= 0, got {kv_budget}")
        if prefix_min_tokens is not None and prefix_min_tokens < 1:
            raise ValueError(f"prefix_min_tokens: must be >= 1, got {prefix_min_tokens}")
        self.prefix_min_tokens = prefix_min_tokens
        self.model_path = model_path
        self.max_batch, self.max_queue, self.kv_budget = max_batch, max_queue, kv_budget
        self.metrics = metrics
        self.dtype = dtype
        self.prefill_chunk = prefill_chunk
        self.engine_factory = engine_factory
        self.prompt_lookup = prompt_lookup
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.load_options = dict(load_options or {})
        if draft_model is not None:
            self.load_options.update(draft_model=draft_model, num_draft=num_draft)
        self._engine_seen = {}              # engine stats already added to the metrics
        self._samplers = {}                 # unseeded settings -> their shared Sampler
        self._byte_level = None             # token id -> bytes, for ByteLevel decoders
        self._cond = threading.Condition()
        self._inbox = []
        self._live = 0                      # submissions accepted and not ended
        self._stop = False
        self._ready = threading.Event()
        self._load_error = None
        self._thread = None
        self.text_model = None
        self.engine = None
        self.prefix = None
        self.num_running = 0
        self.num_waiting = 0
        self.steps = 0
        self.alive = False

    # ------------------------------------------------------------ loop side --
    def start(self, timeout=None):
        self._thread = threading.Thread(target=self._main, name="mlxcy-engine", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._load_error is not None:
            raise self._load_error
        return self

    @property
    def live(self) -> int:
        return self._live

    def capacity(self) -> int:
        return self.max_batch + self.max_queue

    def submit(self, subs) -> None:
        """Queue submissions (all or none); a 429 with Retry-After when the
        running batch and the queue are full, a 503 when the engine is down."""
        if not self.alive:
            raise APIError(503, "the generation engine is not running", "server_error",
                           code="engine_unavailable", headers={"Retry-After": "5"})
        with self._cond:
            if self._live + len(subs) > self.capacity():
                raise APIError(429, f"the server is busy: {self._live} sequences are running or "
                                    f"queued (limit {self.capacity()}); retry later",
                               "rate_limit_exceeded", code="queue_full",
                               headers={"Retry-After": "1"})
            self._live += len(subs)
            self._inbox.extend(("add", s) for s in subs)
            self._cond.notify()

    def cancel(self, sub) -> None:
        """Stop a submission (client gone); harmless if it already ended."""
        if sub.cancelled:
            return
        sub.cancelled = True
        with self._cond:
            self._inbox.append(("cancel", sub))
            self._cond.notify()

    def call(self, fn, timeout=30.0):
        """Run fn() on the engine thread; returns its result (blocking)."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["v"] = fn()
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box["e"] = e
            done.set()
        with self._cond:
            self._inbox.append(("call", run))
            self._cond.notify()
        if not done.wait(timeout):
            raise TimeoutError("the engine thread did not answer")
        if "e" in box:
            raise box["e"]
        return box.get("v")

    def close(self, timeout=10.0):
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---------------------------------------------------------- thread side --
    def _load(self):
        from mlxcy.generation.inference import load
        opts = dict(self.load_options)
        if self.dtype:
            opts["dtype"] = self.dtype
        self.text_model = load(self.model_path, backend="mlx", **opts)
        hd = self.text_model.model.config.head_dim
        if self.kv_bits is not None and hd % self.kv_group_size:
            self.text_model.close()
            raise ValueError(f"kv_group_size {self.kv_group_size}: the model's head dimension "
                             f"{hd} is not a multiple of it; pick one that divides {hd}")
        self._make_engine()
        if _plain_byte_level(self.text_model.tokenizer):
            self._byte_level = _TokenBytes(self.text_model.tokenizer)
        from .prefix_cache import PrefixCache
        self.prefix = PrefixCache(self.engine.make_cache, self.kv_budget,
                                  self.prefix_min_tokens or default_prefix_min_tokens()) \
            if self.kv_budget > 0 else None

    def _make_engine(self):
        factory = self.engine_factory
        if factory is None:
            from mlxcy.generation.engine import Engine as factory
        tm = self.text_model
        self.engine = factory(tm.model, max_batch=self.max_batch,
                              prefill_chunk=self.prefill_chunk,
                              draft_model=getattr(tm, "draft_model", None),
                              num_draft=getattr(tm, "num_draft", 4), kv_bits=self.kv_bits,
                              kv_group_size=self.kv_group_size)
        self._engine_seen = {}

    def _main(self):
        try:
            self._load()
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._load_error = e
            self._ready.set()
            return
        self.alive = True
        self._ready.set()
        self.seqs = {}                  # engine sid -> _Seq
        self.by_sub = {}                # id(submission) -> _Seq
        busy = False
        trimmed = time.perf_counter()
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stop or busy or self.engine.has_work()):
                        self._cond.wait(1.0)
                    if self._stop:
                        break
                    cmds, self._inbox = self._inbox, []
                t0, self._in_step = time.perf_counter(), 0.0
                out = defaultdict(list)         # submission -> its items of this step
                for kind, arg in cmds:
                    if kind == "add":
                        self._admit(arg, out)
                    elif kind == "cancel":
                        self._cancel(arg, out)
                    else:
                        arg()
                if self.engine.has_work():
                    self._step(out)
                    busy = True
                elif busy:
                    # the last sequences ended (or were cancelled): one more step
                    # retires their rows, so an idle server holds no batch
                    self._step(out)
                    busy = False
                    trimmed = float("-inf")     # and give its memory back now
                if self.prefix is not None:
                    self.prefix.flush()     # the copies this step's finished sequences made
                self._gauges()
                self._deliver(out)
                if time.perf_counter() - trimmed > TRIM_EVERY:
                    trim_heap()
                    trimmed = time.perf_counter()
                    if self.metrics is not None:
                        self.metrics.heap_trimmed()
                if self.metrics is not None:
                    self.metrics.worker_seconds.inc(time.perf_counter() - t0 - self._in_step)
        except BaseException:  # noqa: BLE001 - the thread must say why it died
            log.error("engine thread failed:\n%s", traceback.format_exc())
        finally:
            self.alive = False
            self._shutdown()

    def _gauges(self):
        self.num_running = self.engine.num_running
        self.num_waiting = self.engine.num_waiting
        m = self.metrics
        if m is not None:
            m.running.set(self.num_running)
            m.queue_depth.set(self.num_waiting)
            if self.prefix is not None:
                m.cache_bytes.set(self.prefix.bytes)
            self._engine_seen = m.add_engine_stats(getattr(self.engine, "stats", {}),
                                                   self._engine_seen)

    def _sampler(self, s):
        """The Sampler for sampling settings `s`.  Unseeded submissions with
        equal settings share one: the engine samples a batch whose rows share
        a sampler with one call, and rows of different samplers one at a time
        (graph nodes and kernels per row and step).  A seeded submission gets
        its own, so that its draws do not depend on the batch."""
        from mlxcy.generation.sample import Sampler
        kw = {"temperature": s.get("temperature", 0.0), "top_k": s.get("top_k", 0),
              "top_p": s.get("top_p", 1.0), "min_p": s.get("min_p", 0.0),
              "repetition_penalty": s.get("repetition_penalty") or None,
              "presence_penalty": s.get("presence_penalty") or None,
              "frequency_penalty": s.get("frequency_penalty") or None,
              "logit_bias": s.get("logit_bias") or None}
        if s.get("seed") is not None:
            return Sampler(**kw, seed=s["seed"])
        key = tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                    for k, v in kw.items())
        sampler = self._samplers.get(key)
        if sampler is None:
            if len(self._samplers) >= 64:       # many distinct settings: start over
                self._samplers.clear()
            sampler = self._samplers[key] = Sampler(**kw)
        return sampler

    def _text_stream(self, stops):
        if self._byte_level is not None:
            return _ByteLevelStream(self._byte_level, stops)
        from mlxcy.generation.text_stream import TextStream
        return TextStream(self.text_model.tokenizer, stops)

    def _admit(self, sub, out):
        if sub.cancelled:
            self._end(None, sub, "cancelled", out)
            return
        try:
            sampler = self._sampler(sub.sampling)
            mask = sub.mask_factory() if sub.mask_factory is not None else None
            cache, n = (None, 0)
            if self.prefix is not None:
                cache, n = self.prefix.lookup(sub.prompt_ids)
                m = self.metrics
                if m is not None:
                    (m.cache_hits if cache is not None else m.cache_misses).inc()
            sub.cached_tokens = n
            sid = self.engine.add(sub.prompt_ids, sampler=sampler, max_tokens=sub.max_tokens,
                                  stop_ids=sub.stop_ids, logprobs=sub.logprobs,
                                  top_logprobs=sub.top_logprobs, cache=cache,
                                  keep_cache=self.prefix is not None, token_mask=mask,
                                  prompt_lookup=self.prompt_lookup)
        except Exception as e:  # noqa: BLE001 - a bad request must not stop the thread
            self._fail(sub, e, out)
            return
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(sub.prompt_ids))
        seq = _Seq(sub, sid, self._text_stream(sub.stop), mask)
        self.seqs[sid] = seq
        self.by_sub[id(sub)] = seq

    def _cancel(self, sub, out):
        """The engine drops the sequence (its rows are freed at the next
        step); it is over for the client now."""
        seq = self.by_sub.get(id(sub))
        if seq is not None and not seq.ended:
            try:
                self.engine.cancel(seq.sid)
            except Exception:  # noqa: BLE001 - it may have ended in the same step
                pass
            self._end(seq, sub, "cancelled", out)

    def _step(self, out):
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the running sequences, keep serving
            log.error("engine.step failed:\n%s", traceback.format_exc())
            for seq in list(self.seqs.values()):
                self._fail(seq.sub, e, out, seq)
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001
                pass
            self._make_engine()
            return
        self.steps += 1
        now = time.perf_counter()
        self._in_step += now - t0
        for ev in events:
            seq = self.seqs.get(ev.seq_id)
            if seq is None:              # cancelled here already
                self._keep(ev.cache, None)
                continue
            try:
                self._event(seq, ev, now, out)
            except Exception as e:  # noqa: BLE001 - one sequence fails, the others go on
                log.error("sequence %d failed:\n%s", ev.seq_id, traceback.format_exc())
                if ev.cache is not None:
                    ev.cache.free()
                self.engine.cancel(seq.sid)
                self._fail(seq.sub, APIError(500, f"generation failed: {type(e).__name__}: "
                                                  f"{e}", "server_error"), out, seq)

    def _event(self, seq, ev, now, out):
        """Turn one engine Event of `seq` into its client's items."""
        sub = seq.sub
        m = self.metrics
        if ev.cached_tokens is not None:      # what the engine used of the prefix
            sub.cached_tokens = ev.cached_tokens
            if m is not None and ev.cached_tokens:
                m.cached_tokens.inc(ev.cached_tokens)
        if ev.token is not None and ev.token >= 0:
            tok = int(ev.token)
            seq.generated.append(tok)
            sub.completion_tokens += 1
            if m is not None:
                m.generation_tokens.inc()
                if seq.t_last is None:
                    m.ttft.observe(now - sub.t_arrival)
                else:
                    m.itl.observe(now - seq.t_last)
            seq.t_last = now
            if (tok in sub.stop_ids and ev.finish_reason == "stop") or \
                    self.text_model.tokenizer.id_to_token(tok) is None:
                text, hit = "", False      # an end token, or a padding id with no text
            else:
                text, hit = seq.text.push(tok)
            out[sub].append(Item("tok", text, tok, ev.logprob, ev.top_logprobs))
            if hit:          # a stop string: end here, whatever the engine said
                cache = ev.cache
                if ev.finish_reason is None:     # finish() hands back the cache
                    cache = self.engine.finish(seq.sid, "stop")
                self._keep(cache, seq)
                self._end(seq, sub, "stop", out)
                return
        if ev.finish_reason is not None:
            if not seq.ended and ev.finish_reason != "cancelled":
                tail = seq.text.finish()
                if tail:
                    out[sub].append(Item("tok", tail))
            self._keep(ev.cache, seq)
            self._end(seq, sub, ev.finish_reason, out)

    def _keep(self, cache, seq):
        """Store a finished sequence's cache in the prefix cache."""
        if cache is None:
            return
        if self.prefix is None or seq is None:
            cache.free()
            return
        ids = (seq.sub.prompt_ids + seq.generated)[:cache.offset]
        self.prefix.insert(ids, cache)

    def _end(self, seq, sub, reason, out):
        if seq is not None:
            if seq.ended:
                return
            seq.ended = True
            self.seqs.pop(seq.sid, None)
            self.by_sub.pop(id(sub), None)
        if self.metrics is not None:
            self.metrics.sequences.labels(reason).inc()
        with self._cond:
            self._live -= 1
        out[sub].append(Item("end", finish_reason=reason))

    def _fail(self, sub, exc, out, seq=None):
        if seq is not None:
            seq.ended = True
            self.seqs.pop(seq.sid, None)
            self.by_sub.pop(id(sub), None)
        with self._cond:
            self._live -= 1
        if isinstance(exc, APIError):
            err = exc
        elif isinstance(exc, (ValueError, TypeError)):
            err = APIError(400, str(exc), "invalid_request_error")
        else:
            err = APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
        out[sub].append(Item("err", error=err))

    @staticmethod
    def _deliver(out):
        """Hand every submission its items: one call_soon_threadsafe per loop."""
        by_loop = defaultdict(list)
        for sub, items in out.items():
            by_loop[sub.loop].append((sub, items))
        for loop, groups in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, groups)
            except RuntimeError:       # the loop is closed: nobody is listening
                pass

    def _shutdown(self):
        out = defaultdict(list)
        for seq in list(getattr(self, "seqs", {}).values()):
            self._fail(seq.sub, APIError(503, "the server is shutting down", "server_error"),
                       out, seq)
        for kind, arg in self._inbox:
            if kind == "add":
                self._fail(arg, APIError(503, "the server is shutting down", "server_error"),
                           out)
        self._inbox = []
        self._deliver(out)
        try:
            if self.prefix is not None:
                self.prefix.clear()
            if self.engine is not None:
                self.engine.close()
            if self.text_model is not None:
                self.text_model.close()
        except Exception:  # noqa: BLE001
            log.error("shutdown: %s", traceback.format_exc())


def default_prefix_min_tokens() -> int:
    """The shortest cached prefix a request reuses, by device: on the CPU a
    prefilled token costs ~3 ms (SmolLM2) and copying cached ones next to
    nothing; on a GPU, prefilling a few more tokens inside a batch is nearly
    free while the copy costs a few kernel launches per layer (host time)."""
    from mlxcy.device import default_device
    return 16 if default_device().type == "cpu" else 128


def _put_all(groups):
    for sub, items in groups:
        sub.queue.put_nowait((sub, items))


def _plain_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's decoder is the ByteLevel step alone (GPT-2
    style BPE: Qwen, Llama 3, SmolLM2): then a sequence's text is the UTF-8
    of its tokens' bytes joined, which _ByteLevelStream decodes as it goes."""
    from mlxcy.tokenizer.decoders import _byte_level
    return getattr(tokenizer, "_decode_tokens", None) is _byte_level


class _TokenBytes(dict):
    """token id -> the bytes it decodes to (b"" for special tokens, which
    the server skips), filled as ids are first met."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.special = tokenizer.special_ids

    def __missing__(self, tok):
        from mlxcy.tokenizer.decoders import byte_level_bytes
        s = self.tokenizer.id_to_token(tok)
        b = b"" if s is None or tok in self.special else byte_level_bytes(s)
        self[tok] = b
        return b


class _ByteLevelStream:
    """TextStream's push/finish for ByteLevel tokenizers: an incremental UTF-8
    decoder over the tokens' bytes gives the same text as decoding the whole
    sequence (tokenizer.decode with skip_special_tokens), at a dict lookup
    and a few bytes decoded per token instead of three decode() calls.  Text
    before a character still being spelled out in bytes goes out at once
    (TextStream holds it back with the character), so a stop string there is
    seen one token sooner; the text is the same."""

    def __init__(self, table, stops):
        from mlxcy.generation.text_stream import StopMatcher
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.matcher = StopMatcher(stops)
        self.stopped = False

    def push(self, token):
        text, hit = self.matcher.feed(self.utf8.decode(self.table[token]))
        self.stopped = self.stopped or hit
        return text, hit

    def finish(self):
        if self.stopped:
            return ""
        tail, _ = self.matcher.feed(self.utf8.decode(b"", True))
        return tail + self.matcher.flush()
