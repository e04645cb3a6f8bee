# cython: language_level=3, cpp_locals=True
"""The generation engine: one scheduler under every way of generating text.

    from mlxcy.engine import Engine
    eng = Engine(model, max_batch=32)
    sid = eng.add(prompt_ids, sampler=Sampler(temperature=0.7), max_tokens=64, stop_ids={eos})
    while eng.has_work():
        for ev in eng.step():          # Event(seq_id, token, logprob, top_logprobs, finish_reason, cache)
            ...

The engine holds a set of sequences and advances them together, one step at
a time.  A step runs one chunk of the prompt group being prefilled (new
sequences are admitted in groups, up to `max_batch` rows in all) and one
decode step of the running batch, so long prompts never stall running
sequences for more than a chunk.

Rows at different positions share one batched cache: the rows are aligned at
their last position and left-padded, and every forward gets a mask that hides
each row's padding and per-row RoPE offsets (so a row's token at real
position p is rotated as p).  A group that finishes its prefill joins the
running batch by left-padding whichever side is shorter; rows that finish are
gathered out of the batch at the next step.  With one row and no padding the
forward runs with no mask at all: single-prompt generation is the batch of one.

Decode is pipelined: a step queues the next token's graph (async evaluation)
before it reads the current tokens back, so the device never waits on the
host.  A sequence with a token mask (constrained decoding) needs its token
before the next mask can be computed, so while one runs the decode step reads
first and queues after.

Ownership: the engine owns every native array it creates (pending tokens,
log-probs, penalty history, padding) and the batched caches; a cache handed
to `add(cache=...)` becomes the engine's, and one handed back in an Event
(`keep_cache=True`) becomes the caller's.  The model belongs to the caller.
"""
from libc.math cimport INFINITY
from libc.stdint cimport int32_t, int64_t
from libcpp.vector cimport vector
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from mlxcy.core cimport Array, wrap, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native cimport nn as nnn
from mlxcy.native cimport rows
from mlxcy.native.array cimport heap
from mlxcy.native.array cimport shape1 as _shape1, shape2 as _shape2
from mlxcy.native.transforms cimport eval as neval, async_eval as nasync_eval
from mlxcy.models.base cimport Model
from mlxcy.cache cimport Cache, LayerCache, RotatingKVCache
from mlxcy.cache import empty_like, kv_quantization, quantized_cache, check_kv_options
from mlxcy.sample cimport Sampler

import time
from collections import deque

import numpy as np

__all__ = ["Engine", "Event", "generate_ids", "check_ids", "default_prefill_chunk",
           "set_prefill_split"]


# ---------------------------------------------------------------- settings --

# Prefill on the CPU.  MLX's CPU kernels are compute-bound there (not launch-
# bound as on a GPU), so the prefill is shaped to do less arithmetic:
#  - split: chunks before the last evaluate only the cache (the last layer's
#    attention output, MLP and head are never computed for them), and the
#    final part is the last token alone;
#  - chunks of 128 tokens: MLX's CPU attention computes the full [L, K] score
#    matrix and masks it, so smaller chunks skip most of the masked upper
#    triangle, and their activations stay in cache.
# On a GPU the extra one-token pass costs a whole step of kernel launches and
# the arithmetic is cheap, so the GPU evaluates chunks of 512 by their output.
cdef int PREFILL_SPLIT = -1      # -1: automatic (split on the CPU); 0: never; 1: always
CPU_PREFILL_CHUNK = 128
GPU_PREFILL_CHUNK = 512


def set_prefill_split(mode):
    """None: automatic; True/False: force split or chunked prefill (A/B runs)."""
    global PREFILL_SPLIT
    PREFILL_SPLIT = -1 if mode is None else (1 if mode else 0)


def default_prefill_chunk():
    """Prompt tokens per row per prefill step when the caller does not say:
    128 on the CPU, 512 on a GPU (see above)."""
    return CPU_PREFILL_CHUNK if _on_cpu() else GPU_PREFILL_CHUNK


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef inline bint _on_cpu() noexcept:
    return na.default_device().type == na.cpu


cdef bint _split_prefill() noexcept:
    if PREFILL_SPLIT >= 0:
        return PREFILL_SPLIT == 1
    return _on_cpu()


# ------------------------------------------------------------ native helpers --

cdef inline void _set(na.array** slot, na.array* p) noexcept:
    if slot[0] != NULL:
        del slot[0]
    slot[0] = p


cdef na.Shape _shape4(int a, int b, int c, int d):
    cdef na.Shape s = na.Shape()
    s.push_back(a)
    s.push_back(b)
    s.push_back(c)
    s.push_back(d)
    return s


cdef vector[int] _axis(int a):
    cdef vector[int] v = vector[int]()
    v.push_back(a)
    return v


cdef na.array* _pad_mask(const na.array& pads, int off, int L) except NULL:
    """Bool [B, 1, L, off + L] over absolute key positions for queries at
    off .. off+L-1 of left-padded rows (pads: int32 [B]): key k is visible iff
    k >= min(pad, q) -- real queries skip the padding, a padding query sees
    itself (the causal part is added by the attention)."""
    cdef int B = pads.shape(0)
    cdef na.array p4 = nops.reshape(pads, _shape4(B, 1, 1, 1))
    cdef na.array kpos = nops.reshape(nops.arange(0, off + L, 1, na.int32),
                                      _shape4(1, 1, 1, off + L))
    if L == 1:
        return heap(nops.greater_equal(kpos, p4))
    cdef na.array qpos = nops.reshape(nops.arange(off, off + L, 1, na.int32),
                                      _shape4(1, 1, L, 1))
    return heap(nops.greater_equal(kpos, nops.minimum(p4, qpos)))


cdef na.array* padded_forward(Model model, const na.array& ids, Cache cache, const na.array* pads,
                              int off, bint last_only) except NULL:
    """model.forward over a chunk of left-padded rows whose first column sits
    at padded position `off`; pads NULL means no row is padded (then no mask:
    the model's causal fast path)."""
    if pads == NULL:
        return model.forward(ids, cache, NULL, NULL, last_only)
    cdef na.array* m = _pad_mask(pads[0], off, ids.shape(1))
    cdef na.array* o = NULL
    try:
        o = heap(nops.subtract(na.array(<int64_t>off, na.int32), pads[0]))
        return model.forward(ids, cache, m, o, last_only)
    finally:
        del m
        if o != NULL:
            del o


cdef na.array* log_softmax(const na.array& x) except NULL:
    """float32 log-softmax over the last axis."""
    cdef na.array xf = nops.astype(x, na.float32)
    return heap(nops.subtract(xf, nops.logsumexp(xf, _axis(-1), True)))


cdef void _eval(vector[na.array]& outs) except *:
    with nogil:
        neval(outs)


cdef object _numpy(const na.array& x):
    """Evaluate a copy of x and hand it to numpy."""
    return wrap(new na.array(x)).numpy()


# ----------------------------------------------------------- cache surgery --

cdef void _cache_arrays(Cache cache, vector[na.array]& out) except *:
    """Every layer's key/value buffers, to evaluate after a cache-only chunk."""
    cdef LayerCache lc
    for c in cache.layers:
        lc = <LayerCache>c
        if lc.keys != NULL:
            out.push_back(lc.keys[0])
            out.push_back(lc.values[0])


cdef na.array* _ordered(LayerCache lc, na.array* buf) except NULL:
    """The positions a layer holds, oldest first, [B, H, n, D]: [offset - n, offset)."""
    cdef RotatingKVCache rc
    if lc.window == 0:
        return heap(nnn.slice_t(buf[0], 0, lc.offset))
    rc = <RotatingKVCache>lc
    if rc.filled < rc.window:
        return heap(nnn.slice_t(buf[0], 0, rc.filled))
    return heap(nnn.unroll_t(nnn.slice_t(buf[0], 0, rc.window), rc.idx))


cdef int _held(LayerCache lc):
    return lc.offset if lc.window == 0 else (<RotatingKVCache>lc).filled


cdef void _install(LayerCache lc, const na.array& k, const na.array& v, int offset) except *:
    """Make lc hold ordered k/v ([B, H, n, D], positions [offset - n, offset)),
    with spare room so the next writes go in place."""
    cdef int n = k.shape(2), extra
    cdef RotatingKVCache rc
    if lc.window == 0:
        extra = lc.step - n % lc.step + 8
    else:
        extra = 8 if n >= lc.window else min(lc.window - n, lc.step) + 8
    _set(&lc.keys, heap(nnn.grow_t(k, n, extra)))
    _set(&lc.values, heap(nnn.grow_t(v, n, extra)))
    lc.offset = offset
    if lc.window:
        rc = <RotatingKVCache>lc
        rc.filled = n
        rc.idx = 0 if n >= rc.window else n


cdef void merge_caches(Cache a, Cache b, int da, int db) except *:
    """a := rows of a (left-padded by da positions) over rows of b (left-padded
    by db), both ending at the same padded position.  b is left empty."""
    cdef LayerCache la, lb
    cdef na.array ka, va, kb, vb
    cdef int n, i, off
    for i in range(len(a.layers)):
        la = <LayerCache>a.layers[i]
        lb = <LayerCache>b.layers[i]
        off = la.offset + da
        n = max(_held(la) + da, _held(lb) + db)
        if la.window:
            n = min(n, la.window)
        ka = nnn.own(_ordered(la, la.keys))
        va = nnn.own(_ordered(la, la.values))
        kb = nnn.own(_ordered(lb, lb.keys))
        vb = nnn.own(_ordered(lb, lb.values))
        ka = rows.left_pad_t(ka, n - ka.shape(2))
        va = rows.left_pad_t(va, n - va.shape(2))
        kb = rows.left_pad_t(kb, n - kb.shape(2))
        vb = rows.left_pad_t(vb, n - vb.shape(2))
        _install(la, rows.cat_axis(ka, kb, 0), rows.cat_axis(va, vb, 0), off)
        lb.free()


cdef void take_rows(Cache cache, const na.array& idx) except *:
    """Keep the batch rows idx (int32 [n]) of every layer."""
    cdef LayerCache lc
    for c in cache.layers:
        lc = <LayerCache>c
        if lc.keys != NULL:
            _set(&lc.keys, heap(nops.take(lc.keys[0], idx, 0)))
            _set(&lc.values, heap(nops.take(lc.values[0], idx, 0)))


cdef Cache row_cache(Model model, Cache cache, int row, int pad):
    """A batch-1 cache holding row `row`'s real positions (from its pad on)."""
    cdef Cache out = empty_like(cache)
    cdef LayerCache src, dst
    cdef na.array k, v
    cdef int n, i, B
    for i in range(len(cache.layers)):
        src = <LayerCache>cache.layers[i]
        dst = <LayerCache>out.layers[i]
        if src.keys == NULL:
            continue
        k = nnn.own(_ordered(src, src.keys))
        v = nnn.own(_ordered(src, src.values))
        n = min(k.shape(2), src.offset - pad)
        B = k.shape(0)
        k = nops.slice(k, _shape4(row, 0, k.shape(2) - n, 0),
                       _shape4(row + 1, k.shape(1), k.shape(2), k.shape(3)))
        v = nops.slice(v, _shape4(row, 0, v.shape(2) - n, 0),
                       _shape4(row + 1, v.shape(1), v.shape(2), v.shape(3)))
        _install(dst, k, v, src.offset - pad)
    return out


cdef int trim_left(Cache cache, int n) except -1:
    """Drop the first n (padding) positions of every layer of a cache whose
    layers all hold every position (no sliding window); returns n or 0."""
    cdef LayerCache lc
    for c in cache.layers:
        if (<LayerCache>c).window:
            return 0
    for c in cache.layers:
        lc = <LayerCache>c
        if lc.keys != NULL:
            _install(lc, nnn.slice_t(lc.keys[0], n, lc.offset),
                     nnn.slice_t(lc.values[0], n, lc.offset), lc.offset - n)
    return n


# ----------------------------------------------------------- the sequences --

class Event:
    """What one step produced for one sequence.

    token: the sampled id, or -1 when the event only ends the sequence;
    logprob: its log-probability (with logprobs=True); top_logprobs: a list
    of (id, logprob), best first (with top_logprobs=k); finish_reason: None
    while the sequence runs, else "stop" (a stop id), "length" (max_tokens),
    "cancelled"; cache: on the final event of a sequence added with
    keep_cache=True, its batch-1 Cache (prompt + the generated tokens fed
    back, `cache.offset` of them), now the caller's."""
    __slots__ = ("seq_id", "token", "logprob", "top_logprobs", "finish_reason", "cache")

    def __init__(self, seq_id, token, logprob=None, top_logprobs=None, finish_reason=None,
                 cache=None):
        self.seq_id, self.token, self.logprob = seq_id, token, logprob
        self.top_logprobs, self.finish_reason, self.cache = top_logprobs, finish_reason, cache

    def __repr__(self):
        return (f"Event(seq_id={self.seq_id}, token={self.token}, logprob={self.logprob}, "
                f"finish_reason={self.finish_reason!r})")


cdef class _Seq:
    cdef int id
    cdef object prompt            # int32 numpy [T], what is left to prefill
    cdef Sampler sampler
    cdef int max_tokens
    cdef int produced
    cdef object stop_ids          # frozenset
    cdef bint logprobs
    cdef int top_logprobs
    cdef object history           # int32 numpy: the ids the penalties look back on
    cdef int history_size
    cdef Cache cache              # a prefix cache handed in, until its group starts
    cdef bint keep_cache
    cdef object token_mask
    cdef list generated
    cdef object finish            # None, or the finish reason
    cdef int pad                  # left padding in the batch it is in


cdef int history_size(Sampler s):
    """How many recent tokens the sampler's penalties look at (0: none)."""
    cdef int n = 0
    if s.repetition_penalty != 1.0:
        n = max(n, s.repetition_context_size)
    if s.presence_penalty != 0.0:
        n = max(n, s.presence_context_size)
    if s.frequency_penalty != 0.0:
        n = max(n, s.frequency_context_size)
    return n


cdef Sampler _GREEDY = Sampler()


# ----------------------------------------------------------------- batches --

cdef class _Batch:
    """Rows decoding (or prefilling) together on one cache, left-padded to a
    common padded position `cache.offset`."""
    cdef list seqs
    cdef Cache cache
    cdef na.array* pads           # int32 [B], or NULL: no row is padded
    cdef na.array* pending        # int32 [B]: queued, not yet read
    cdef na.array* pending_lp     # float32 [B] or NULL
    cdef na.array* pending_top    # int32 [B, k] or NULL
    cdef na.array* pending_top_lp # float32 [B, k] or NULL
    cdef na.array* history        # int32 [B, H] (-1: none) or NULL
    # prefill state (a group not yet decoding)
    cdef object ids               # int32 numpy [B, T] left-padded prompts, or None
    cdef int start                # prompt columns already prefilled

    def __dealloc__(self):
        self.release()

    cdef void release(self) noexcept:
        _set(&self.pads, NULL)
        _set(&self.pending, NULL)
        _set(&self.pending_lp, NULL)
        _set(&self.pending_top, NULL)
        _set(&self.pending_top_lp, NULL)
        _set(&self.history, NULL)

    cdef int rows(self):
        return len(self.seqs)

    cdef void keep(self, list rows) except *:
        """Keep the given rows (indices, in order): cache and per-row arrays."""
        cdef Array ia = to_array(np.asarray(rows, dtype=np.int32))
        cdef na.array* idx = ia.ptr
        cdef int m
        take_rows(self.cache, idx[0])
        if self.pads != NULL:
            _set(&self.pads, heap(nops.take(self.pads[0], idx[0], 0)))
        if self.pending != NULL:
            _set(&self.pending, heap(nops.take(self.pending[0], idx[0], 0)))
        if self.pending_lp != NULL:
            _set(&self.pending_lp, heap(nops.take(self.pending_lp[0], idx[0], 0)))
        if self.pending_top != NULL:
            _set(&self.pending_top, heap(nops.take(self.pending_top[0], idx[0], 0)))
            _set(&self.pending_top_lp, heap(nops.take(self.pending_top_lp[0], idx[0], 0)))
        if self.history != NULL:
            _set(&self.history, heap(nops.take(self.history[0], idx[0], 0)))
        self.seqs = [self.seqs[i] for i in rows]
        # Padding every remaining row shares is dropped (caches without
        # sliding windows), so memory follows the live rows.
        m = min((<_Seq>s).pad for s in self.seqs)
        if m > 0 and trim_left(self.cache, m):
            for s in self.seqs:
                (<_Seq>s).pad -= m
            self._set_pads()

    cdef void _set_pads(self) except *:
        pads = [(<_Seq>s).pad for s in self.seqs]
        cdef Array a
        if max(pads) == 0:
            _set(&self.pads, NULL)
        else:
            a = to_array(np.asarray(pads, dtype=np.int32))
            _set(&self.pads, new na.array(a.ptr[0]))

    cdef void absorb(self, _Batch other) except *:
        """Append other's rows (a group whose prefill is done) to this batch."""
        cdef int ta = self.cache.offset, tb = other.cache.offset
        cdef int t = max(ta, tb)
        merge_caches(self.cache, other.cache, t - ta, t - tb)
        for s in self.seqs:
            (<_Seq>s).pad += t - ta
        for s in other.seqs:
            (<_Seq>s).pad += t - tb
        self.seqs = self.seqs + other.seqs
        self._set_pads()
        cdef int nb = other.rows(), na_ = self.rows() - nb
        _cat_rows(&self.pending, &other.pending, na_, nb, na.int32, 0)
        _cat_rows(&self.pending_lp, &other.pending_lp, na_, nb, na.float32, 0)
        _cat_rows(&self.pending_top, &other.pending_top, na_, nb, na.int32, 0)
        _cat_rows(&self.pending_top_lp, &other.pending_top_lp, na_, nb, na.float32, -INFINITY)
        _cat_history(&self.history, &other.history, na_, nb)
        other.release()
        other.seqs = []


cdef void _cat_rows(na.array** a, na.array** b, int na_rows, int nb_rows, na.Dtype dt,
                    double fill) except *:
    """a := rows of a over rows of b along axis 0 (b is dropped).  A side that
    is NULL (nothing computed for its rows) or narrower (fewer top-k columns)
    is filled with `fill`: those entries are never read."""
    if a[0] == NULL and b[0] == NULL:
        return
    cdef int w = max(0 if a[0] == NULL or a[0].ndim() < 2 else a[0].shape(1),
                     0 if b[0] == NULL or b[0].ndim() < 2 else b[0].shape(1))
    cdef bint two_d = (a[0] != NULL and a[0].ndim() == 2) or (b[0] != NULL and b[0].ndim() == 2)
    _set(a, heap(rows.cat_axis(rows.fill_rows(a[0], na_rows, w, two_d, dt, fill),
                               rows.fill_rows(b[0], nb_rows, w, two_d, dt, fill), 0)))
    _set(b, NULL)


cdef void _cat_history(na.array** a, na.array** b, int na_rows, int nb_rows) except *:
    """Penalty histories [B, H] of two row sets, the narrower left-padded with -1."""
    cdef int ha, hb, h
    if a[0] == NULL and b[0] == NULL:
        return
    ha = 0 if a[0] == NULL else a[0].shape(1)
    hb = 0 if b[0] == NULL else b[0].shape(1)
    h = max(ha, hb)
    _set(a, heap(rows.cat_axis(rows.widen_history(a[0], na_rows, h),
                               rows.widen_history(b[0], nb_rows, h), 0)))
    _set(b, NULL)


# ------------------------------------------------------------------ engine --

cdef class Engine:
    """Advances a set of sequences together over one model (see the module
    docstring).  All calls must come from one thread: MLX's streams are
    thread-local.

    Engine(model, max_batch=32, prefill_chunk=None, kv_bits=None, kv_group_size=64)
    max_batch: most rows decoding at once (waiting sequences join as rows
    free up); prefill_chunk: prompt tokens per row per step (None: the
    device's default, see default_prefill_chunk); kv_bits: quantize the KV
    caches the engine makes (mlxcy.cache.QuantizedKVCache; caches given to
    add() must be of the same kind)."""
    cdef Model model
    cdef readonly int max_batch
    cdef int chunk
    cdef object waiting           # deque of _Seq
    cdef _Batch group             # prompts being prefilled, or None
    cdef _Batch running           # rows decoding, or None
    cdef dict seqs                # id -> _Seq, every sequence not yet finished
    cdef int next_id
    cdef int vocab
    cdef double queue_seconds
    cdef readonly dict stats
    cdef readonly object kv_bits, kv_group_size
    cdef object kv_kind               # kv_quantization() of the caches it makes

    def __init__(self, Model model, int max_batch=32, prefill_chunk=None, kv_bits=None,
                 int kv_group_size=64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk()
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        check_kv_options(kv_bits, kv_group_size)
        self.model = model
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.kv_kind = kv_quantization(self.make_cache())
        self.max_batch = max_batch
        self.chunk = prefill_chunk
        self.waiting = deque()
        self.seqs = {}
        self.vocab = model.config.vocab_size
        # Host time of the decode steps, split three ways: building each step's
        # graph (forward + sampler), handing it to MLX (async_eval, which
        # encodes the kernels on a GPU) and waiting for the tokens to read.
        # benchmarks/decode_profile.py reads them.
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "prefill_seconds": 0.0, "decode_seconds": 0.0,
                      "build_seconds": 0.0, "queue_seconds": 0.0, "wait_seconds": 0.0}

    def make_cache(self):
        """An empty cache of the kind this engine uses (see kv_bits)."""
        return quantized_cache(self.model.make_cache(), self.kv_bits, self.kv_group_size)

    # -- admission -----------------------------------------------------------
    def add(self, prompt_ids, Sampler sampler=None, int max_tokens=256, stop_ids=(),
            bint logprobs=False, int top_logprobs=0, history_ids=None, Cache cache=None,
            bint keep_cache=False, token_mask=None):
        """Queue a sequence; returns its id.  See ENGINE docs in the module."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {top_logprobs}")
        if token_mask is not None and not callable(token_mask):
            raise TypeError("token_mask must be a callable (generated ids -> bool [V]) or None")
        ids = check_ids(prompt_ids, self.vocab, "prompt_ids")
        cdef _Seq s = _Seq()
        s.id = self.next_id
        s.sampler = sampler if sampler is not None else _GREEDY
        s.max_tokens = max_tokens
        s.stop_ids = frozenset(int(t) for t in stop_ids)
        s.logprobs = logprobs or top_logprobs > 0
        s.top_logprobs = top_logprobs
        s.keep_cache = keep_cache
        s.token_mask = token_mask
        s.generated = []
        s.history_size = history_size(s.sampler)
        if s.history_size > 0:
            hist = ids if history_ids is None else check_ids(history_ids, self.vocab,
                                                             "history_ids", empty=True)
            s.history = hist[len(hist) - min(len(hist), s.history_size):]
        if cache is not None:
            if cache.offset >= ids.shape[0]:
                raise ValueError(f"cache holds {cache.offset} positions but the prompt has "
                                 f"{ids.shape[0]} tokens: at least one must be left to prefill")
            if len(cache.layers) != len(self.model.layers):
                raise ValueError("cache does not belong to this model (layer count differs)")
            if kv_quantization(cache) != self.kv_kind:
                raise ValueError(f"cache: its KV quantization {kv_quantization(cache)} differs "
                                 f"from the engine's {self.kv_kind} (kv_bits, kv_group_size)")
            s.cache = cache
            ids = ids[cache.offset:]
        s.prompt = ids
        self.next_id += 1
        self.seqs[s.id] = s
        self.waiting.append(s)
        return s.id

    def cancel(self, int seq_id):
        """End a sequence now (no further events; its rows are freed at the
        next step).  Unknown or finished ids are ignored."""
        self.finish(seq_id, "cancelled")

    def finish(self, int seq_id, reason="stop"):
        """End a sequence now with `reason` (e.g. a stop string the caller
        matched).  Returns its batch-1 cache when it was added with
        keep_cache=True and has started decoding, else None."""
        cdef _Seq s = self.seqs.pop(seq_id, None)
        if s is None:
            return None
        s.finish = reason
        if s in self.waiting:
            self.waiting.remove(s)
            out, s.cache = s.cache, None
            if out is not None and not s.keep_cache:
                out.free()
                out = None
            return out
        if self.running is not None and s in self.running.seqs and s.keep_cache:
            return self._take_cache(self.running, self.running.seqs.index(s), s)
        return None

    cdef Cache _take_cache(self, _Batch b, int r, _Seq s):
        """Row r's batch-1 cache for the caller: the batch's own cache when r
        is its only row and unpadded (no copy), else a copy of the row."""
        cdef Cache out
        if b.rows() == 1 and s.pad == 0:
            out, b.cache = b.cache, self.make_cache()
            return out
        return row_cache(self.model, b.cache, r, s.pad)

    def has_work(self):
        return bool(self.seqs)

    @property
    def num_running(self):
        return (0 if self.running is None else sum(
            1 for s in self.running.seqs if (<_Seq>s).finish is None))

    @property
    def num_waiting(self):
        return len(self.waiting) + (0 if self.group is None else self.group.rows())

    def close(self):
        """Drop every sequence and array (a model's caches are freed)."""
        for s in self.waiting:
            if (<_Seq>s).cache is not None:
                (<_Seq>s).cache.free()
        self.waiting.clear()
        self.seqs.clear()
        for b in (self.group, self.running):
            if b is not None:
                (<_Batch>b).release()
                (<_Batch>b).cache.free()
        self.group = self.running = None

    def __dealloc__(self):
        if self.waiting is not None:
            self.close()

    # -- one step --------------------------------------------------------------
    def step(self):
        """Advance every sequence by one step; returns the list of Events."""
        cdef list events = []
        self.stats["steps"] += 1
        self._retire()
        if self.group is None:
            self._start_group()
        if self.running is not None:
            self._decode(events)
        if self.group is not None:
            self._prefill_chunk(events)
        return events

    cdef void _retire(self) except *:
        """Drop the finished rows of the running batch."""
        cdef _Batch b = self.running
        if b is None:
            return
        keep = [i for i, s in enumerate(b.seqs) if (<_Seq>s).finish is None]
        if not keep:
            b.release()
            b.cache.free()
            self.running = None
        elif len(keep) < b.rows():
            b.keep(keep)

    cdef void _start_group(self) except *:
        """Admit waiting sequences (as many as free rows allow) as a prefill
        group.  A sequence that brings its own cache is a group of its own."""
        cdef int free = self.max_batch - (0 if self.running is None else self.running.rows())
        cdef _Seq s
        if free <= 0 or not self.waiting:
            return
        take = []
        while self.waiting and len(take) < free:
            s = <_Seq>self.waiting[0]
            if s.cache is not None and take:
                break
            take.append(self.waiting.popleft())
            if s.cache is not None:
                break
        cdef _Batch g = _Batch()
        g.seqs = take
        s = <_Seq>take[0]
        if s.cache is not None:
            g.cache, s.cache = s.cache, None
        else:
            g.cache = self.make_cache()
        T = max(len((<_Seq>x).prompt) for x in take)
        ids = np.zeros((len(take), T), dtype=np.int32)
        for r, x in enumerate(take):
            ids[r, T - len((<_Seq>x).prompt):] = (<_Seq>x).prompt
            (<_Seq>x).pad = T - len((<_Seq>x).prompt)
        g.ids = ids
        g.start = 0
        g._set_pads()
        if g.pads != NULL and g.cache.offset:
            raise RuntimeError("engine: a prefix-cached group must be a single row")
        self.group = g

    cdef void _prefill_chunk(self, list events) except *:
        """Run one chunk of the group's prompts; when the last chunk is done,
        sample each row's first token and move the group into the running batch."""
        cdef _Batch g = self.group
        cdef int T = g.ids.shape[1], stop, off
        cdef bint split = _split_prefill()
        cdef Array part
        cdef na.array* out
        cdef vector[na.array] outs = vector[na.array]()
        t0 = time.perf_counter()
        body = T - 1 if split else T
        stop = min(g.start + self.chunk, body)
        if (split and g.start < body) or (not split and T - g.start > self.chunk):
            # A cache-filling chunk: split mode evaluates the caches only, so
            # the last layer's output, MLP and head are never computed here.
            part = to_array(g.ids[:, g.start:stop])
            off = g.cache.offset
            out = padded_forward(self.model, part.ptr[0], g.cache, g.pads, off, True)
            if split:
                del out
                _cache_arrays(g.cache, outs)
            else:
                outs.push_back(out[0])
                del out
            _eval(outs)
            g.start = stop
        else:
            part = to_array(g.ids[:, g.start:])
            off = g.cache.offset
            out = padded_forward(self.model, part.ptr[0], g.cache, g.pads, off, True)
            g.start = T
            self._sample(g, out, True)
            outs.push_back(g.pending[0])
            _eval(outs)
            g.ids = None
            self._retire()      # rows that finished this step leave before the group joins
            if self.running is None:
                self.running = g
            else:
                self.running.absorb(g)
            self.group = None
        self.stats["prefill_tokens"] += part.ptr.shape(0) * part.ptr.shape(1)
        self.stats["prefill_seconds"] += time.perf_counter() - t0

    cdef void _decode(self, list events) except *:
        """Queue the running batch's next token (unless no row needs one),
        then read the current tokens back and turn them into events."""
        cdef _Batch b = self.running
        cdef bint sync = any((<_Seq>s).token_mask is not None for s in b.seqs)
        cdef bint more = any((<_Seq>s).produced + 1 < (<_Seq>s).max_tokens for s in b.seqs)
        cdef na.array* cur = b.pending
        cdef na.array* cur_lp = b.pending_lp
        cdef na.array* cur_top = b.pending_top
        cdef na.array* cur_top_lp = b.pending_top_lp
        if cur == NULL:
            raise RuntimeError("engine: the running batch has no queued step")
        t0 = time.perf_counter()
        b.pending = b.pending_lp = b.pending_top = b.pending_top_lp = NULL
        try:
            if sync:
                self._emit(b, cur, cur_lp, cur_top, cur_top_lp, events)
            if more:
                self._queue_next(b, cur)
            if not sync:
                self._emit(b, cur, cur_lp, cur_top, cur_top_lp, events)
        finally:
            _set(&cur, NULL)
            _set(&cur_lp, NULL)
            _set(&cur_top, NULL)
            _set(&cur_top_lp, NULL)
        self.stats["decode_seconds"] += time.perf_counter() - t0

    cdef void _queue_next(self, _Batch b, na.array* cur) except *:
        cdef int B = b.rows()
        cdef na.array* ids = heap(nops.reshape(cur[0], _shape2(B, 1)))
        cdef na.array* out
        cdef double t0 = _now(), q0 = self.queue_seconds
        try:
            out = padded_forward(self.model, ids[0], b.cache, b.pads, b.cache.offset, True)
        finally:
            del ids
        self._sample(b, out, False)
        # _sample timed its async_eval; the rest of the time built the graph
        self.stats["build_seconds"] += _now() - t0 - (self.queue_seconds - q0)
        self.stats["queue_seconds"] = self.queue_seconds

    cdef void _emit(self, _Batch b, na.array* cur, na.array* cur_lp, na.array* cur_top,
                    na.array* cur_top_lp, list events) except *:
        """Read the current tokens back; one Event per live row."""
        cdef _Seq s
        cdef double t0 = _now()
        toks = _numpy(cur[0])
        self.stats["wait_seconds"] += _now() - t0
        lps = _numpy(cur_lp[0]) if cur_lp != NULL else None
        tops = _numpy(cur_top[0]) if cur_top != NULL else None
        top_lps = _numpy(cur_top_lp[0]) if cur_top_lp != NULL else None
        for r in range(b.rows()):
            s = <_Seq>b.seqs[r]
            if s.finish is not None:
                continue
            t = int(toks[r])
            s.produced += 1
            s.generated.append(t)
            self.stats["decode_tokens"] += 1
            ev = Event(s.id, t)
            if s.logprobs and lps is not None:
                ev.logprob = float(lps[r])
            if s.top_logprobs and tops is not None:
                order = np.argsort(-top_lps[r], kind="stable")[:s.top_logprobs]
                ev.top_logprobs = [(int(tops[r][j]), float(top_lps[r][j])) for j in order]
            if t in s.stop_ids:
                ev.finish_reason = "stop"
            elif s.produced >= s.max_tokens:
                ev.finish_reason = "length"
            if ev.finish_reason is not None:
                s.finish = ev.finish_reason
                self.seqs.pop(s.id, None)
                if s.keep_cache:
                    ev.cache = self._take_cache(b, r, s)
            events.append(ev)

    cdef void _sample(self, _Batch b, na.array* logits3, bint first) except *:
        """Sample every row of logits [B, 1, V] (frees it) and queue the tokens
        as b.pending, with log-probs and the penalty history as asked."""
        cdef int B = logits3.shape(0), V = logits3.shape(2), i, k
        cdef na.array* logits = NULL
        cdef na.array* lp = NULL
        cdef na.array* tok = NULL
        cdef na.array* t1
        cdef na.array row, hrow
        cdef Sampler shared
        cdef _Seq s
        cdef Array ma
        cdef vector[na.array] parts = vector[na.array]()
        cdef vector[na.array] outs = vector[na.array]()
        try:
            logits = heap(nops.reshape(logits3[0], _shape2(B, V)))
            if first:
                self._init_history(b)
            masks = self._masks(b, V)
            if masks is not None:
                ma = to_array(masks)
                _set(&logits, heap(nops.add(logits[0], ma.ptr[0])))
            shared = (<_Seq>b.seqs[0]).sampler
            if B > 1 and all((<_Seq>x).sampler is shared for x in b.seqs):
                tok = shared.sample(logits[0], b.history)
            else:
                for i in range(B):
                    s = <_Seq>b.seqs[i]
                    # A row is sampled as a [V] vector, as a prompt alone is,
                    # so seeded draws do not depend on the batch.
                    row = nops.reshape(nops.slice(logits[0], _shape2(i, 0), _shape2(i + 1, V)),
                                       _shape1(V))
                    if b.history != NULL:
                        hrow = nops.reshape(nops.slice(b.history[0], _shape2(i, 0),
                                                       _shape2(i + 1, b.history.shape(1))),
                                            _shape1(b.history.shape(1)))
                        t1 = s.sampler.sample(row, &hrow)
                    else:
                        t1 = s.sampler.sample(row, NULL)
                    parts.push_back(nops.reshape(t1[0], _shape1(1)))
                    del t1
                tok = heap(parts[0] if B == 1 else nops.concatenate(parts, 0))
            _set(&b.pending, heap(nops.astype(tok[0], na.int32)))
            outs.push_back(b.pending[0])
            if any((<_Seq>x).logprobs for x in b.seqs):
                lp = log_softmax(logits[0])
                _set(&b.pending_lp, heap(nops.reshape(nops.take_along_axis(
                    lp[0], nops.reshape(b.pending[0], _shape2(B, 1)), 1), _shape1(B))))
                outs.push_back(b.pending_lp[0])
                k = max((<_Seq>x).top_logprobs for x in b.seqs)
                if k > 0:
                    k = min(k, V)
                    _set(&b.pending_top, heap(nops.astype(nops.slice(
                        nops.argpartition(nops.negative(lp[0]), k - 1, 1),
                        _shape2(0, 0), _shape2(B, k)), na.int32)))
                    _set(&b.pending_top_lp, heap(nops.take_along_axis(lp[0], b.pending_top[0], 1)))
                    outs.push_back(b.pending_top[0])
                    outs.push_back(b.pending_top_lp[0])
            if b.history != NULL:
                self._push_history(b)
        finally:
            del logits3
            _set(&logits, NULL)
            _set(&lp, NULL)
            _set(&tok, NULL)
        cdef double t0
        with nogil:
            t0 = _now()
            nasync_eval(outs)
            self.queue_seconds += _now() - t0

    cdef object _masks(self, _Batch b, int V):
        """Additive float32 [B, V] masks of the constrained rows, or None."""
        cdef _Seq s
        if all((<_Seq>x).token_mask is None for x in b.seqs):
            return None
        out = np.zeros((b.rows(), V), dtype=np.float32)
        for r, x in enumerate(b.seqs):
            s = <_Seq>x
            if s.token_mask is None or s.finish is not None:
                continue
            allowed = np.asarray(s.token_mask(list(s.generated)), dtype=bool).reshape(-1)
            if allowed.shape[0] > V:
                raise ValueError(f"token_mask returned {allowed.shape[0]} entries for a "
                                 f"vocabulary of {V}")
            if not allowed.any():
                raise ValueError(f"token_mask of sequence {s.id} allows no token")
            row = np.full(V, -np.inf, dtype=np.float32)
            row[:allowed.shape[0]][allowed] = 0.0
            out[r] = row
        return out

    cdef void _init_history(self, _Batch b) except *:
        cdef int H = max((<_Seq>x).history_size for x in b.seqs)
        cdef Array a
        if H == 0:
            return
        h = np.full((b.rows(), H), -1, dtype=np.int32)
        for r, x in enumerate(b.seqs):
            if (<_Seq>x).history is not None and len((<_Seq>x).history):
                hist = (<_Seq>x).history[-H:]
                h[r, H - len(hist):] = hist
        a = to_array(h)
        _set(&b.history, new na.array(a.ptr[0]))

    cdef void _push_history(self, _Batch b) except *:
        """Append the queued tokens to the [B, H] history, keeping H columns."""
        cdef int B = b.rows(), H = b.history.shape(1)
        cdef na.array joined = rows.cat_axis(b.history[0], nops.reshape(b.pending[0], _shape2(B, 1)), 1)
        _set(&b.history, heap(nops.slice(joined, _shape2(0, 1), _shape2(B, H + 1))))


cpdef object check_ids(ids, int vocab, str what, bint empty=False):
    """ids as int32 numpy [T], each in [0, vocab); ValueError naming `what` otherwise."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of token ids, got {type(ids).__name__}")
    try:
        a = np.asarray(ids)
    except Exception as e:
        raise TypeError(f"{what} must be a sequence of token ids: {e}") from None
    if a.size == 0:
        if empty:
            return np.zeros(0, dtype=np.int32)
        raise ValueError(f"{what} is empty: give at least one token id")
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{what} must hold integer token ids, got dtype {a.dtype}")
    a = a.reshape(-1)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab})")
    return a.astype(np.int32)


def generate_ids(Model model, prompt_ids, prefill_chunk=None, **add_kwargs):
    """One sequence on an engine of its own: yields its Events, the last one
    with its finish_reason.  add_kwargs are Engine.add's (sampler,
    max_tokens, stop_ids, logprobs, ...); `stats=<a dict>` receives the
    engine's stats when the generator ends."""
    stats = add_kwargs.pop("stats", None)
    cdef Engine eng = Engine(model, max_batch=1, prefill_chunk=prefill_chunk)
    try:
        eng.add(prompt_ids, **add_kwargs)
        while eng.has_work():
            for ev in eng.step():
                yield ev
    finally:
        if stats is not None:
            stats.update(eng.stats)
        eng.close()
