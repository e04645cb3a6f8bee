# cython: language_level=3, cpp_locals=True
"""The token loop: chunked prefill, then pipelined decode.

Decode builds and queues the next step's graph (async evaluation) before it
reads the current token back, so the device never waits on Python.  Every
per-step intermediate is a heap array owned by this loop and deleted as soon
as the step that needed it is queued; the only Python object made per token is
the int handed to the caller.
"""
from libc.stdint cimport int32_t
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap
from mlxcy.native.array cimport shape1 as _shape1, shape2 as _shape2
from mlxcy.native.transforms cimport eval as neval, async_eval as nasync_eval
from mlxcy.models.base cimport Model
from mlxcy.cache cimport Cache, LayerCache
from mlxcy.sample cimport Sampler

import numpy as np

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef extern from "mlx/ops.h" namespace "mlx::core" nogil:
    na.array logsumexp(const na.array&, int, bint) except +
    na.array take_along_axis(const na.array&, const na.array&, int) except +


cdef inline void _drop(na.array** slot) noexcept:
    if slot[0] != NULL:
        del slot[0]
        slot[0] = NULL


cdef class TokenLoop:
    """Iterates (token_id, logprob or None) for one prompt on one cache.

    The cache may already hold a prefix (a chat session's earlier turns): only
    `prompt_ids` are prefilled.  The loop owns nothing but its step arrays;
    the model and cache belong to the caller.
    """
    cdef Model model
    cdef Cache cache
    cdef Sampler sampler
    cdef na.array* pending        # next token, queued, shape [1]
    cdef na.array* pending_lp     # its log-probability, or NULL
    cdef na.array* history        # int32 [T] recent tokens, for penalties; or NULL
    cdef int history_size
    cdef bint want_logprobs
    cdef readonly int produced
    cdef readonly int max_tokens
    cdef readonly double prefill_seconds
    # Host time of the decode steps, split three ways (seconds, summed over the
    # steps queued so far): building each step's graph (forward + sampler),
    # handing it to MLX (async_eval, which encodes the kernels on a GPU), and
    # waiting for the previous token.  benchmarks/decode_profile.py reads them.
    cdef readonly double build_seconds
    cdef readonly double queue_seconds
    cdef readonly double wait_seconds

    def __init__(self, Model model, Cache cache, Sampler sampler, prompt_ids, int max_tokens,
                 prefill_chunk=None, bint logprobs=False, history_ids=None):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk()
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        ids = np.asarray(prompt_ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("the prompt has no tokens")
        self.model, self.cache, self.sampler = model, cache, sampler
        self.max_tokens = max_tokens
        self.want_logprobs = logprobs
        self.history_size = _history_size(sampler)
        if self.history_size > 0:
            hist = ids if history_ids is None else np.asarray(history_ids, np.int32).reshape(-1)
            hist = hist[-self.history_size:]
            h = to_array(hist.reshape(-1))      # [T], like the [V] logits; kept alive while copied
            self.history = heap((<Array>h).ptr[0])
        import time
        t0 = time.perf_counter()
        self._prefill(ids, prefill_chunk)
        self.prefill_seconds = time.perf_counter() - t0
        self.queue_seconds = 0.0      # the decode steps' only, not the prompt's

    def __dealloc__(self):
        _drop(&self.pending)
        _drop(&self.pending_lp)
        _drop(&self.history)

    def close(self):
        """Drop the queued step (the cache keeps what was computed)."""
        _drop(&self.pending)
        _drop(&self.pending_lp)
        _drop(&self.history)

    cdef void _prefill(self, object ids, int chunk) except *:
        cdef int n = ids.shape[0], start = 0, stop
        cdef Array part
        cdef na.array* out
        cdef vector[na.array] outs = vector[na.array]()
        cdef bint split = _split_prefill()
        # The tokens before the final part only fill the cache.  Split mode
        # (the CPU's default) evaluates every layer's keys/values for all
        # tokens but the last, never the last layer's attention output, MLP
        # and head, then runs the last token alone; otherwise every chunk's
        # output is evaluated (its last position only) and the final chunk
        # holds the last tokens.
        cdef int body = n - 1 if split else n
        while (split and start < body) or (not split and n - start > chunk):
            stop = min(body, start + chunk)
            part = to_array(ids[start:stop].reshape(1, -1))
            out = self.model.forward(part.ptr[0], self.cache, NULL, NULL, True)
            outs.clear()
            if split:
                del out
                _cache_arrays(self.cache, outs)
            else:
                outs.push_back(out[0])
                del out
            with nogil:
                neval(outs)
            start = stop
        part = to_array(ids[start:].reshape(1, -1))
        out = self.model.forward(part.ptr[0], self.cache, NULL, NULL, True)
        self._queue(out)          # takes ownership of out
        # Wait for the prompt to finish, so prefill time is measured honestly.
        outs.clear()
        outs.push_back(self.pending[0])
        with nogil:
            neval(outs)

    cdef void _queue(self, na.array* logits3) except *:
        """Sample from logits [1, 1, V] and queue the result; frees logits3."""
        cdef na.array* logits = heap(nops.reshape(logits3[0], _shape1(-1)))
        del logits3
        cdef na.array* tok
        cdef vector[na.array] outs = vector[na.array]()
        cdef double t0
        try:
            tok = self.sampler.sample(logits[0], self.history)
            self.pending = tok
            outs.push_back(tok[0])
            if self.want_logprobs:
                self.pending_lp = _logprob_of(logits[0], tok[0])
                outs.push_back(self.pending_lp[0])
            if self.history != NULL:
                self._push_history(tok[0])
        finally:
            del logits
        with nogil:
            t0 = _now()
            nasync_eval(outs)
            self.queue_seconds += _now() - t0

    cdef void _push_history(self, const na.array& tok) except *:
        """Append the queued token to the [T] history, keeping the last
        history_size tokens."""
        cdef na.array* h = self.history
        cdef vector[na.array] parts = vector[na.array]()
        parts.push_back(h[0])
        parts.push_back(nops.reshape(nops.astype(tok, h.dtype()), _shape1(1)))
        cdef na.array* joined = heap(nops.concatenate(parts, 0))
        cdef int T = joined.shape(0)
        del h
        if T > self.history_size:
            self.history = heap(nops.slice(joined[0], _shape1(T - self.history_size), _shape1(T)))
            del joined
        else:
            self.history = joined

    def __iter__(self):
        return self

    def __next__(self):
        cdef na.array* cur
        cdef na.array* cur_lp
        cdef na.array* out
        cdef int32_t tokv
        cdef float lpv
        cdef double t0, t1
        if self.pending == NULL or self.produced >= self.max_tokens:
            self.close()
            raise StopIteration
        cur, cur_lp = self.pending, self.pending_lp
        self.pending = NULL
        self.pending_lp = NULL
        try:
            self.produced += 1
            if self.produced < self.max_tokens:
                # Queue step n+1 before reading token n back.
                t0 = _now()
                out = self.model.forward(nops.reshape(cur[0], _shape2(1, 1)), self.cache,
                                         NULL, NULL, True)
                t1 = self.queue_seconds
                self._queue(out)
                # _queue timed its async_eval; the rest of the time built the graph
                self.build_seconds += _now() - t0 - (self.queue_seconds - t1)
            with nogil:
                t0 = _now()
                tokv = cur.item[int32_t]()
                self.wait_seconds += _now() - t0
            lp = None
            if cur_lp != NULL:
                with nogil:
                    lpv = cur_lp.item[float]()
                lp = lpv
        finally:
            del cur
            if cur_lp != NULL:
                del cur_lp
        return tokv, lp


# Prefill on the CPU.  MLX's CPU kernels are compute-bound there (not launch-
# bound as on a GPU), so the prefill is shaped to do less arithmetic:
#  - split: the last layer's attention output, MLP and head are skipped for all
#    tokens but the last (as mlx-lm's generate_step does), at the price of one
#    extra one-token pass;
#  - chunks of 128 tokens: MLX's CPU attention computes the full [L, K] score
#    matrix and masks it, so smaller chunks skip most of the masked upper
#    triangle, and their activations stay in cache.
# SmolLM2-135M bf16, 512-token prompt, 2-core development VM: split took the
# prefill from 0.96x to 1.00x mlx-lm's, and chunks of 256 and 128 from there
# to 1.04x and 1.07x (64 and 32: within 2% of 128; docs/benchmarks.md).  On a GPU the
# extra pass costs a whole step of kernel launches and the arithmetic is cheap,
# so the GPU keeps chunks of 512 whose output is evaluated.
cdef int PREFILL_SPLIT = -1      # -1: automatic (split on the CPU); 0: never; 1: always
CPU_PREFILL_CHUNK = 128
GPU_PREFILL_CHUNK = 512


def set_prefill_split(mode):
    """None: automatic; True/False: force split or chunked prefill (A/B runs)."""
    global PREFILL_SPLIT
    PREFILL_SPLIT = -1 if mode is None else (1 if mode else 0)


def default_prefill_chunk():
    """Prompt tokens per prefill step when the caller does not say: 128 on
    the CPU, 512 on a GPU (see above)."""
    return CPU_PREFILL_CHUNK if _on_cpu() else GPU_PREFILL_CHUNK


cdef inline bint _on_cpu() noexcept:
    return na.default_device().type == na.cpu


cdef bint _split_prefill() noexcept:
    if PREFILL_SPLIT >= 0:
        return PREFILL_SPLIT == 1
    return _on_cpu()


cdef void _cache_arrays(Cache cache, vector[na.array]& out) except *:
    """Every layer's key/value buffers, to evaluate after a cache-only chunk."""
    cdef LayerCache lc
    for c in cache.layers:
        lc = <LayerCache>c
        if lc.keys != NULL:
            out.push_back(lc.keys[0])
        if lc.values != NULL:
            out.push_back(lc.values[0])


cdef int _history_size(Sampler s):
    """How many recent tokens the sampler's penalties look at (0: none)."""
    cdef int n = 0
    if s.repetition_penalty != 1.0:
        n = max(n, s.repetition_context_size)
    if s.presence_penalty != 0.0:
        n = max(n, s.presence_context_size)
    if s.frequency_penalty != 0.0:
        n = max(n, s.frequency_context_size)
    return n


cdef na.array* _logprob_of(const na.array& logits, const na.array& tok) except NULL:
    """log softmax(logits)[tok] for logits [V] and tok [1]."""
    cdef na.array lse = logsumexp(nops.astype(logits, na.float32), 0, True)
    cdef na.array picked = take_along_axis(nops.astype(logits, na.float32),
                                           nops.reshape(nops.astype(tok, na.int32), _shape1(1)), 0)
    return heap(nops.subtract(picked, lse))
