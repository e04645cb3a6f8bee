# cython: language_level=3, cpp_locals=True
"""The generation engine: one scheduler under every way of generating text.

    from mlxcy.generation.engine import Engine
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

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native cimport nn as nnn
from mlxcy.native cimport rows
from mlxcy.native cimport random as nrand
from mlxcy.native cimport sample as nsm
from mlxcy.native.array cimport heap
from mlxcy.native.array cimport shape1 as _shape1, shape2 as _shape2, shape3 as _shape3, \
    shape4 as _shape4
from mlxcy.native.transforms cimport eval as neval, async_eval as nasync_eval
from mlxcy.models.base cimport Model, gpu_rows_step
from mlxcy.models.base import gpu_rows_kernel, gpu_verify_positions
from mlxcy.models.cache cimport Cache, LayerCache, RotatingKVCache
from mlxcy.models.cache import empty_like, kv_quantization, quantized_cache, check_kv_options
from mlxcy.generation.sample cimport Sampler, top_k_filter, top_p_filter, min_p_filter
from mlxcy.tuning cimport Tuning, current

import time
from collections import deque

import numpy as np

__all__ = ["Engine", "Event", "generate_ids", "check_ids", "default_prefill_chunk",
           "lookup_proposals", "take_cache_rows", "merge_cache_rows"]


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
# The split and the chunk sizes are mlxcy.tuning's prefill_split,
# prefill_chunk_cpu and prefill_chunk_gpu.
cdef Tuning* _tuning = current()


def default_prefill_chunk():
    """Prompt tokens per row per prefill step when the caller does not say:
    tuning's prefill_chunk_cpu (128) on the CPU, prefill_chunk_gpu (512) on a
    GPU (see above)."""
    return _tuning.prefill_chunk_cpu if _on_cpu() else _tuning.prefill_chunk_gpu


cdef inline double _now() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec + t.tv_nsec * 1e-9


cdef inline bint _on_cpu() noexcept:
    return na.default_device().type == na.cpu


cdef bint _split_prefill() noexcept:
    if _tuning.prefill_split >= 0:
        return _tuning.prefill_split == 1
    return _on_cpu()


# ------------------------------------------------------------ native helpers --

cdef inline void _set(na.array** slot, na.array* p) noexcept:
    if slot[0] != NULL:
        del slot[0]
    slot[0] = p


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
    cdef na.array* m = NULL
    cdef na.array* o = heap(nops.subtract(na.array(<int64_t>off, na.int32), pads[0]))
    cdef na.array* out = NULL
    try:
        if ids.shape(1) == 1 and gpu_rows_step(model, ids, cache, o, &out):
            return out
        m = _pad_mask(pads[0], off, ids.shape(1))
        return model.forward(ids, cache, m, o, last_only)
    finally:
        if m != NULL:
            del m
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


cdef void stack_prefixes(Cache out, list caches, list used, int c) except *:
    """out := one row per cache of `caches` (batch-1 caches without sliding
    windows), row r holding the first used[r] positions of its cache
    right-aligned at column c, zeros before them."""
    cdef LayerCache lo, lr
    cdef vector[na.array] ks = vector[na.array](), vs = vector[na.array]()
    cdef int i, r
    for i in range(len(out.layers)):
        lo = <LayerCache>out.layers[i]
        ks.clear()
        vs.clear()
        for r in range(len(caches)):
            lr = <LayerCache>(<Cache>caches[r]).layers[i]
            ks.push_back(rows.left_pad_t(nnn.slice_t(lr.keys[0], 0, used[r]), c - used[r]))
            vs.push_back(rows.left_pad_t(nnn.slice_t(lr.values[0], 0, used[r]), c - used[r]))
        _install(lo, nops.concatenate(ks, 0), nops.concatenate(vs, 0), c)


cdef void take_rows(Cache cache, const na.array& idx) except *:
    """Keep the batch rows idx (int32 [n]) of every layer."""
    cdef LayerCache lc
    for c in cache.layers:
        lc = <LayerCache>c
        if lc.keys != NULL:
            _set(&lc.keys, heap(nops.take(lc.keys[0], idx, 0)))
            _set(&lc.values, heap(nops.take(lc.values[0], idx, 0)))


cdef Cache row_cache(Model model, Cache cache, int row, int pad):
    """A batch-1 cache holding row `row`'s real positions (from its pad on).
    Layers without a sliding window get views of the batch's buffers (no
    copy: the caller, e.g. a prefix tree, copies what it keeps; the next
    write grows the layer into a buffer of its own)."""
    cdef Cache out = empty_like(cache)
    cdef LayerCache src, dst
    cdef na.array k, v
    cdef int n, i, B
    for i in range(len(cache.layers)):
        src = <LayerCache>cache.layers[i]
        dst = <LayerCache>out.layers[i]
        if src.keys == NULL:
            continue
        if src.window == 0:
            k, v = src.keys[0], src.values[0]
            _set(&dst.keys, heap(nops.slice(k, _shape4(row, 0, pad, 0), _shape4(
                row + 1, k.shape(1), src.offset, k.shape(3)))))
            _set(&dst.values, heap(nops.slice(v, _shape4(row, 0, pad, 0), _shape4(
                row + 1, v.shape(1), src.offset, v.shape(3)))))
            dst.offset = src.offset - pad
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


cdef void _set_offsets(Cache cache, int n) except *:
    """Every layer of a cache without sliding windows ends at n."""
    for c in cache.layers:
        (<LayerCache>c).offset = n


cdef bint _can_trim(Cache cache):
    for c in cache.layers:
        if (<LayerCache>c).window:
            return False
    return True


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


def _check_layers(Cache a, Cache b, str fn):
    if len(a.layers) != len(b.layers):
        raise ValueError(f"{fn}: the caches have {len(a.layers)} and {len(b.layers)} layers")
    cdef LayerCache la, lb
    for i in range(len(a.layers)):
        la, lb = <LayerCache>a.layers[i], <LayerCache>b.layers[i]
        if type(la) is not type(lb) or la.window != lb.window:
            raise ValueError(f"{fn}: layer {i} is a {la!r} in one cache and a {lb!r} in the other")
        if la.keys == NULL or lb.keys == NULL:
            raise ValueError(f"{fn}: layer {i} of a cache holds no positions")
        if (la.keys.shape(1) != lb.keys.shape(1) or la.keys.shape(3) != lb.keys.shape(3)
                or not nnn.same_dtype(la.keys[0], lb.keys[0])):
            raise ValueError(f"{fn}: layer {i}'s heads, head_dim or dtype differ")


def take_cache_rows(Cache cache, rows):
    """Keep the batch rows `rows` (a sequence of ints, in the order given) of
    every layer of `cache`, as the engine does when sequences leave a batch."""
    idx = np.asarray(rows, dtype=np.int64).reshape(-1)
    cdef LayerCache lc
    for i, c in enumerate(cache.layers):
        lc = <LayerCache>c
        if lc.keys != NULL and idx.size and (idx.min() < 0 or idx.max() >= lc.keys.shape(0)):
            raise IndexError(f"take_cache_rows: rows {idx.tolist()} out of range for layer {i}'s "
                             f"{lc.keys.shape(0)} rows")
    cdef Array a = to_array(idx.astype(np.int32))
    take_rows(cache, handle(a)[0])


def merge_cache_rows(Cache a, Cache b, int pad_a=0, int pad_b=0):
    """Stack b's batch rows under a's, as the engine does when a group joins
    the running batch: a's rows are left-padded by pad_a positions and b's by
    pad_b (zeros), so that both end at the same padded position
    (a.offset + pad_a == b.offset + pad_b), which becomes a's offset.
    Sliding-window layers keep the last `window` positions.  b is left empty."""
    if pad_a < 0 or pad_b < 0:
        raise ValueError(f"merge_cache_rows: pads must be >= 0, got {pad_a}, {pad_b}")
    _check_layers(a, b, "merge_cache_rows")
    if a.offset + pad_a != b.offset + pad_b:
        raise ValueError(f"merge_cache_rows: a.offset + pad_a ({a.offset} + {pad_a}) must equal "
                         f"b.offset + pad_b ({b.offset} + {pad_b})")
    merge_caches(a, b, pad_a, pad_b)


# ----------------------------------------------------------- the sequences --

class Event:
    """What one step produced for one sequence.

    token: the sampled id, or -1 when the event only ends the sequence;
    logprob: its log-probability (with logprobs=True); top_logprobs: a list
    of (id, logprob), best first (with top_logprobs=k); finish_reason: None
    while the sequence runs, else "stop" (a stop id), "length" (max_tokens),
    "cancelled"; cache: on the final event of a sequence added with
    keep_cache=True, its batch-1 Cache (prompt + the generated tokens fed
    back, `cache.offset` of them), now the caller's (a row of a larger batch
    comes as views of the batch's buffers, for layers without a sliding
    window: they keep those buffers alive until the cache's next write grows
    it into buffers of its own, so a caller that holds many should copy
    them); cached_tokens: on a
    sequence's first token, how many prompt tokens came from the cache given
    to add() (the engine may prefill part of a cached prefix again to batch
    prompts together), else None."""
    __slots__ = ("seq_id", "token", "logprob", "top_logprobs", "finish_reason", "cache",
                 "cached_tokens")

    def __init__(self, seq_id, token, logprob=None, top_logprobs=None, finish_reason=None,
                 cache=None, cached_tokens=None):
        self.seq_id, self.token, self.logprob = seq_id, token, logprob
        self.top_logprobs, self.finish_reason, self.cache = top_logprobs, finish_reason, cache
        self.cached_tokens = cached_tokens

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
    cdef int cached               # prompt tokens taken from its cache (the rest prefilled)
    # speculative decoding (see "speculative decoding" below)
    cdef bint can_spec            # no penalties, no token mask: verification is exact
    cdef int lookup_k             # prompt lookup: most tokens proposed per step (0: off)
    cdef int cur_k                # its current proposal length (adapts)
    cdef int cool                 # steps left without proposing (after misses)
    cdef int misses               # consecutive verifications that accepted nothing
    cdef int kept                 # consecutive verifications that accepted everything
    cdef int min_match            # the fewest ids a match must agree on to be proposed
    cdef list hist                # prompt + generated ids (prompt lookup)
    cdef dict ngrams              # n-gram -> where its latest continuation starts in hist
    cdef object full_prompt       # the whole prompt (a draft model prefills it all)


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

cdef class _Flight:
    """A greedy verification of a batch's one row, queued before the host
    knows whether the verification before it kept all its proposals (see
    "Chaining" in the notes at the end of the module)."""
    cdef na.array* cand           # int32 [1, K + 1]: the argmax after each position
    cdef object props             # numpy int32 [1, K]: the proposals (K may be 0)
    cdef int K
    cdef int T                    # the cache offset it starts at
    cdef int guess                # the token its proposals assumed it starts from

    def __dealloc__(self):
        _set(&self.cand, NULL)


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
    cdef Cache dcache             # the draft model's cache (same rows, pads, offset), or None
    cdef object pending_host      # numpy int32 [B]: `pending` as read back, or None
    cdef _Flight flight           # a chained verification already queued, or None
    # prefill state (a group not yet decoding)
    cdef object ids               # int32 numpy [B, T] left-padded prompts, or None
    cdef int start                # prompt columns already prefilled

    def __dealloc__(self):
        self.release()

    cdef void release(self) noexcept:
        self.flight = None
        _set(&self.pads, NULL)
        _set(&self.pending, NULL)
        _set(&self.pending_lp, NULL)
        _set(&self.pending_top, NULL)
        _set(&self.pending_top_lp, NULL)
        _set(&self.history, NULL)

    cdef int rows(self):
        return len(self.seqs)

    cdef void drop_flight(self) except *:
        """Forget the chained verification: the cache ends where it starts."""
        if self.flight is not None:
            _set_offsets(self.cache, self.flight.T)
            self.flight = None

    cdef void keep(self, list rows) except *:
        """Keep the given rows (indices, in order): cache and per-row arrays."""
        cdef Array ia = to_array(np.asarray(rows, dtype=np.int32))
        cdef na.array* idx = ia.ptr
        cdef int m
        take_rows(self.cache, idx[0])
        if self.dcache is not None:
            take_rows(self.dcache, idx[0])
        if self.pending_host is not None:
            self.pending_host = self.pending_host[np.asarray(rows, dtype=np.int64)]
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
        if m > 0 and _can_trim(self.cache) and (self.dcache is None or _can_trim(self.dcache)):
            trim_left(self.cache, m)
            if self.dcache is not None:
                trim_left(self.dcache, m)
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
        if self.dcache is not None:
            merge_caches(self.dcache, other.dcache, t - ta, t - tb)
        if self.pending_host is not None:
            self.pending_host = None
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

    Engine(model, max_batch=32, prefill_chunk=None, draft_model=None, num_draft=4,
           kv_bits=None, kv_group_size=64)
    max_batch: most rows decoding at once (waiting sequences join as rows
    free up); prefill_chunk: prompt tokens per row per step (None: the
    device's default, see default_prefill_chunk); draft_model: a second model
    with the same vocabulary that proposes num_draft tokens per step for
    speculative decoding; kv_bits: quantize the KV caches the engine makes
    (mlxcy.models.cache.QuantizedKVCache; caches given to add() must be of the same
    kind)."""
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
    cdef Model draft              # draft model (speculative decoding), or None
    cdef readonly int num_draft   # tokens it drafts per step
    cdef int spec_cap             # most tokens verified per step (sliding windows and the
                                  # GPU kernel's positions bound it)
    cdef bint rows_kernel         # a batch's plain steps run as the GPU kernel (_row_k)
    cdef bint gpu_verifies        # the GPU kernel verifies its positions (_adapts)
    cdef readonly object kv_bits, kv_group_size
    cdef object kv_kind               # kv_quantization() of the caches it makes

    def __init__(self, Model model, int max_batch=32, prefill_chunk=None, Model draft_model=None,
                 int num_draft=4, kv_bits=None, int kv_group_size=64):
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
        # step_seconds: whole steps (prefill + decode + retiring and admitting rows)
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "step_seconds": 0.0, "prefill_seconds": 0.0, "decode_seconds": 0.0,
                      "build_seconds": 0.0, "queue_seconds": 0.0, "wait_seconds": 0.0,
                      # (of wait_seconds: verifications' evaluation, which encodes,
                      # runs and reads their kernels in one synchronous call)
                      "verify_eval_seconds": 0.0,
                      # speculative decoding: forwards of the running batch, rows they
                      # advanced, verification steps, tokens proposed / accepted
                      "decode_steps": 0, "row_steps": 0, "spec_steps": 0,
                      "proposed_tokens": 0, "accepted_tokens": 0,
                      "acceptance_rate": 0.0, "tokens_per_step": 0.0,
                      # verifications queued ahead (chaining), and those read back:
                      # the others were computed for nothing
                      "chained_steps": 0, "chained_used": 0}
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self.num_draft = num_draft
        # a verification of k proposals is k + 1 positions: at most 17, within
        # a sliding window, and within the GPU kernel's limit where it runs
        self.spec_cap = min(16, _min_window(model) - 1)
        gpu_most = gpu_verify_positions(model)
        if gpu_most:
            self.spec_cap = min(self.spec_cap, gpu_most - 1)
        self.gpu_verifies = gpu_most > 0
        self.rows_kernel = gpu_rows_kernel(model)
        if draft_model is not None:
            if draft_model is model:
                raise ValueError("draft_model must be a second model, not the target itself")
            if draft_model.config.vocab_size != self.vocab:
                raise ValueError(f"draft_model's vocabulary ({draft_model.config.vocab_size} "
                                 f"tokens) differs from the model's ({self.vocab}): a draft "
                                 f"model must share the target's tokenizer")
            self.draft = draft_model
            self.spec_cap = min(self.spec_cap, _min_window(draft_model) - 1)
        if self.spec_cap < 1:
            self.spec_cap = 0

    def make_cache(self):
        """An empty cache of the kind this engine uses (see kv_bits)."""
        return quantized_cache(self.model.make_cache(), self.kv_bits, self.kv_group_size)

    # -- admission -----------------------------------------------------------
    def add(self, prompt_ids, Sampler sampler=None, int max_tokens=256, stop_ids=(),
            bint logprobs=False, int top_logprobs=0, history_ids=None, Cache cache=None,
            bint keep_cache=False, token_mask=None, prompt_lookup=None):
        """Queue a sequence; returns its id.  See ENGINE docs in the module.

        prompt_lookup: None/False (off), True (up to DEFAULT_LOOKUP = 15
        tokens) or an int k: propose up to k tokens per step by matching the
        last 3 (or 2) generated tokens against the prompt and the generated
        history, and verify them in one forward (see "speculative decoding"
        below).
        Greedy output is unchanged; sampled output keeps its distribution.
        Sequences with penalties or a token_mask are never speculated."""
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
        s.can_spec = s.history_size == 0 and token_mask is None
        if prompt_lookup is None or prompt_lookup is False:
            s.lookup_k = 0
        elif prompt_lookup is True:
            s.lookup_k = DEFAULT_LOOKUP
        elif isinstance(prompt_lookup, (int, np.integer)) and prompt_lookup >= 0:
            s.lookup_k = int(prompt_lookup)
        else:
            raise ValueError(f"prompt_lookup must be None, a bool or an int >= 0, "
                             f"got {prompt_lookup!r}")
        if not s.can_spec or self.draft is not None:
            s.lookup_k = 0      # a draft model proposes instead
        s.lookup_k = min(s.lookup_k, self.spec_cap)
        # where lengths adapt the first proposals are short: a miss then costs
        # a few positions of verification, and full acceptances double the
        # length (_adapt)
        s.cur_k = min(s.lookup_k, 2) if self._adapts() else s.lookup_k
        # a sampled row keeps a proposed token with the target's probability of
        # it, low after a short match in text that copies nothing; where lengths
        # do not adapt (the GPU kernel), a verification costs ~3 plain steps,
        # so such a row proposes only for a copy under way (LONG_MATCH ids)
        s.min_match = (LONG_MATCH if s.sampler.temperature != 0.0 and not self._adapts()
                       else 0)
        if s.lookup_k:
            _start_history(s, ids.tolist())
        s.full_prompt = ids
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
        if self.running is not None and s in self.running.seqs:
            self.running.drop_flight()
            if s.keep_cache:
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
                if (<_Batch>b).dcache is not None:
                    (<_Batch>b).dcache.free()
        self.group = self.running = None

    def __dealloc__(self):
        if self.waiting is not None:
            self.close()

    # -- one step --------------------------------------------------------------
    def step(self):
        """Advance every sequence by one step; returns the list of Events."""
        cdef list events = []
        cdef double t0 = _now()
        self.stats["steps"] += 1
        try:
            self._retire()
            if self.group is None:
                self._start_group()
            if self.running is not None:
                self._decode(events)
            if self.group is not None:
                self._prefill_chunk(events)
        finally:
            self.stats["step_seconds"] += _now() - t0
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
            if b.dcache is not None:
                b.dcache.free()
            self.running = None
        elif len(keep) < b.rows():
            b.keep(keep)

    cdef void _start_group(self) except *:
        """Admit waiting sequences (as many as free rows allow) as a prefill
        group.  Sequences that bring a prefix cache form groups of their own
        (see _stack_prefixes; a row without one would make them prefill their
        prefixes again), the others theirs; the queue's head decides which
        kind goes first.  A draft model or a sliding-window layer needs a
        prefix cache whole: such a sequence is a group alone."""
        cdef int free = self.max_batch - (0 if self.running is None else self.running.rows())
        cdef _Seq s
        if free <= 0 or not self.waiting:
            return
        s = <_Seq>self.waiting[0]
        cached = s.cache is not None
        if cached and not self._stackable(s.cache):
            take = [self.waiting.popleft()]
        else:
            take, rest = [], deque()
            while self.waiting and len(take) < free:
                s = <_Seq>self.waiting.popleft()
                if (s.cache is not None) == cached and (not cached or self._stackable(s.cache)):
                    take.append(s)
                else:
                    rest.append(s)
            rest.extend(self.waiting)
            self.waiting = rest
        cdef _Batch g = _Batch()
        g.seqs = take
        s = <_Seq>take[0]
        if len(take) == 1 and s.cache is not None:
            g.cache, s.cache = s.cache, None
            s.pad, s.cached = 0, g.cache.offset
        elif s.cache is not None:       # a group's rows all bring caches, or none does
            g.cache = self._stack_prefixes(take)
        else:
            g.cache = self.make_cache()
            for x in take:
                (<_Seq>x).pad = 0
        if self.draft is not None:
            g.dcache = self.draft.make_cache()
            if g.cache.offset:      # the target brought a prefix cache: the draft prefills it
                self._draft_prefix(g.dcache, s.full_prompt[:g.cache.offset])
        # rows' prompts right-aligned; `pad` counts the padding of the
        # cache's positions too (set above)
        T = max(len((<_Seq>x).prompt) for x in take)
        ids = np.zeros((len(take), T), dtype=np.int32)
        for r, x in enumerate(take):
            ids[r, T - len((<_Seq>x).prompt):] = (<_Seq>x).prompt
            (<_Seq>x).pad += T - len((<_Seq>x).prompt)
        g.ids = ids
        g.start = 0
        g._set_pads()
        self.group = g

    cdef bint _stackable(self, Cache cache):
        """Whether a prefix cache can share a group with other rows: not with
        a draft model (whose own cache would need the same prefix) nor with
        sliding-window layers (a ring cannot be cut at a position)."""
        return self.draft is None and _can_trim(cache)

    cdef Cache _stack_prefixes(self, list take):
        """One cache for a group whose rows all bring prefix caches, of
        different lengths, so that they prefill together instead of one group
        each.  Row r's whole prompt (L_r tokens) is right-aligned in L =
        max L_r columns, pad_r = L - L_r; the group's cache holds columns
        [0, c) with c = min_r (pad_r + cached_r): every row's prefix up to
        column c, zeros before pad_r.  Positions a row cached past c are
        prefilled again (same tokens, same keys and values); the used counts
        are what `cached_tokens` reports."""
        cdef _Seq s
        cdef int L = max(len((<_Seq>x).full_prompt) for x in take)
        cdef int c = min(L - len((<_Seq>x).full_prompt) + (<_Seq>x).cache.offset for x in take)
        cdef Cache out = self.make_cache()
        caches, used = [], []
        for x in take:
            s = <_Seq>x
            s.cached = max(0, c - (L - len(s.full_prompt)))
            s.prompt = s.full_prompt[s.cached:]
            s.pad = c - s.cached        # the cache's columns this row leaves empty
            caches.append(s.cache)
            used.append(s.cached)
            s.cache = None
        if c > 0:
            stack_prefixes(out, caches, used, c)
        for x in caches:
            (<Cache>x).free()
        return out

    cdef void _draft_fill(self, _Batch g, Array part, int off, vector[na.array]& outs) except *:
        """The draft model's cache takes the same prompt chunk (its output is
        not needed: only its cache arrays join `outs`)."""
        cdef na.array* out
        if g.dcache is not None:
            out = padded_forward(self.draft, part.ptr[0], g.dcache, g.pads, off, True)
            del out
            _cache_arrays(g.dcache, outs)

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
            self._draft_fill(g, part, off, outs)
            _eval(outs)
            g.start = stop
        else:
            part = to_array(g.ids[:, g.start:])
            off = g.cache.offset
            out = padded_forward(self.model, part.ptr[0], g.cache, g.pads, off, True)
            g.start = T
            self._sample(g, out, True)
            outs.push_back(g.pending[0])
            self._draft_fill(g, part, off, outs)
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
        cdef bint spec = (b.flight is not None or self.draft is not None
                          or self._want_lookup(b))
        b.pending = b.pending_lp = b.pending_top = b.pending_top_lp = NULL
        b.pending_host = None
        self.stats["decode_steps"] += 1
        self.stats["row_steps"] += sum(1 for x in b.seqs if (<_Seq>x).finish is None)
        try:
            if spec:
                if b.flight is not None:    # the pending token's position is the flight's first
                    _set_offsets(b.cache, b.flight.T)
                self._emit(b, cur, cur_lp, cur_top, cur_top_lp, events)
                if b.flight is not None:
                    self._resume(b, events)
                else:
                    self._speculate(b, cur, events)
            else:
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
        _rates(self.stats)

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
            events.append(self._token_event(
                b, r, s, int(toks[r]), lps[r] if lps is not None else None,
                tops[r] if tops is not None else None,
                top_lps[r] if top_lps is not None else None, 0))

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

    # -- speculative decoding (see the notes at the end of the module) ----------
    cdef int _row_k(self, int B):
        """The most tokens prompt lookup proposes for a row of a batch of B
        rows: a verification pads every row to the longest proposal, and it
        takes no more rows (B times its positions) than one sequence's
        (spec_cap + 1).  Each row costs its multiply-adds on a CPU (a batch
        of 2 with up to 16 positions a row ran slower than with 8,
        docs/benchmarks.md), so larger batches propose less, past 8 rows
        nothing.  Where the GPU kernel runs a batch's plain steps, nothing:
        a batch's verification runs op by op there (a batch of 2 decoded at
        0.84x plain on an H100, docs/benchmarks.md)."""
        if B > 1 and self.rows_kernel:
            return 0
        return (self.spec_cap + 1) // B - 1

    cdef bint _adapts(self) noexcept:
        """Does a row's proposal length adapt to its acceptances (tuning's
        lookup_adapt; automatically, not where the GPU kernel verifies, whose
        positions cost nearly nothing)?"""
        if _tuning.lookup_adapt >= 0:
            return _tuning.lookup_adapt == 1
        return not self.gpu_verifies

    cdef bint _want_lookup(self, _Batch b) except -1:
        """Does a row of the batch have a prompt-lookup proposal?  Looked up
        on what the host knows (the pending token too, when it was read)."""
        cdef _Seq s
        cdef int r
        if self._row_k(b.rows()) < 1:
            return False
        for r in range(b.rows()):
            s = <_Seq>b.seqs[r]
            if (s.lookup_k and s.finish is None and s.produced + 2 < s.max_tokens
                    and _proposes(s, _lookup(s, 1, [] if b.pending_host is None
                                             else [int(b.pending_host[r])]))):
                return True
        return False

    cdef void _draft_prefix(self, Cache dcache, object ids) except *:
        """Prefill the draft's cache with the prefix the target's cache holds."""
        cdef Array part
        cdef na.array* out = NULL
        cdef vector[na.array] outs
        for i in range(0, len(ids), self.chunk):
            part = to_array(np.ascontiguousarray(ids[i:i + self.chunk]).reshape(1, -1))
            _set(&out, self.draft.forward(part.ptr[0], dcache, NULL, NULL, True))
            _set(&out, NULL)
            outs = vector[na.array]()
            _cache_arrays(dcache, outs)
            _eval(outs)

    cdef na.array* _draft_round(self, _Batch b, const na.array& cur2, int K,
                                list qlp) except NULL:
        """Draft K tokens per row (lazily, on the device) from the pending
        tokens cur2 [B, 1]; feeds the K-th too, so the draft's cache ends at
        the same offset as the target's after verification.  Sampled rows
        get their draft log-probs [K, V] in qlp[r]."""
        cdef int B = b.rows(), V = self.vocab, T = b.dcache.offset, j, r
        cdef _Seq s
        cdef na.array x, xr, d
        cdef na.array* t1
        cdef vector[na.array] cols = vector[na.array]()
        cdef vector[na.array] toks
        cdef list rows_lq = [[] for _ in range(B)]
        cdef na.array* dl = padded_forward(self.draft, cur2, b.dcache, b.pads, T, True)
        try:
            for j in range(K):
                x = nops.reshape(dl[0], _shape2(B, V))
                toks = vector[na.array]()
                for r in range(B):
                    s = <_Seq>b.seqs[r]
                    t1 = s.sampler.process(nnn.own(_row_p(x, r)), NULL)
                    xr = nnn.own(t1)
                    if s.sampler.temperature == 0.0:
                        d = nops.astype(nops.argmax(xr, 0, True), na.int32)
                    else:
                        t1 = _dist(s.sampler, xr)
                        rows_lq[r].append(wrap(t1))
                        d = nops.astype(nrand.categorical(nops.reshape(t1[0], _shape2(1, V)), -1,
                                                        &s.sampler.key[0]), na.int32)
                        _set(&s.sampler.key, heap(nops.take(nrand.split(s.sampler.key[0], 2), 1, 0)))
                    toks.push_back(nops.reshape(d, _shape1(1)))
                d = nops.reshape(nops.concatenate(toks, 0), _shape2(B, 1))
                cols.push_back(d)
                _set(&dl, padded_forward(self.draft, d, b.dcache, b.pads, T + 1 + j, True))
        finally:
            _set(&dl, NULL)
        cdef vector[na.array] parts
        for r in range(B):
            if rows_lq[r]:
                parts = vector[na.array]()
                for a in rows_lq[r]:
                    parts.push_back(nops.reshape((<Array>a).ptr[0], _shape2(1, V)))
                qlp[r] = wrap(heap(nops.concatenate(parts, 0)))
        return heap(nops.concatenate(cols, 1))

    cdef void _speculate(self, _Batch b, na.array* cur, list events) except *:
        """One verification step of the running batch, after its pending
        tokens `cur` were emitted (see the notes at the end of the module)."""
        cdef int B = b.rows(), V = self.vocab, K = 0, T, r, j, amax, base, k
        cdef _Seq s
        cdef Array pa, ka
        cdef na.array cur2 = nops.reshape(cur[0], _shape2(B, 1))
        cdef na.array pdev, ids, logits, x, hrow, cand, acc, lp, lqd, q, p, res, u, kr_dev
        cdef na.array* t1 = NULL
        cdef vector[na.array] accs = vector[na.array]()
        cdef vector[na.array] cands = vector[na.array]()
        cdef vector[na.array] outs = vector[na.array]()
        cdef vector[na.array] two
        cdef Array ma
        caps = np.full(B, -1, dtype=np.int64)
        for r in range(B):
            s = <_Seq>b.seqs[r]
            if s.finish is None and s.produced < s.max_tokens:
                caps[r] = s.max_tokens - s.produced - 1
        if caps.max() < 0:
            return
        kr = np.zeros(B, dtype=np.int32)
        props = None
        if self.draft is None:
            found = []
            row_k = self._row_k(B)
            for r in range(B):
                s = <_Seq>b.seqs[r]
                p_ = []
                if caps[r] > 0 and s.lookup_k:
                    p_ = _proposals(s, min(int(caps[r]), row_k))
                found.append(p_)
                kr[r] = len(p_)
            K = int(kr.max())
            if K == 0:
                self._queue_next(b, cur)
                return
            props = np.zeros((B, K), dtype=np.int32)
            for r in range(B):
                props[r, :kr[r]] = found[r]
        else:
            if any(caps[r] > 0 and (<_Seq>b.seqs[r]).can_spec for r in range(B)):
                K = min(self.num_draft, self.spec_cap)
            for r in range(B):
                if caps[r] > 0 and (<_Seq>b.seqs[r]).can_spec:
                    kr[r] = min(K, int(caps[r]))
        T = b.cache.offset
        tsnap = _snapshot(b.cache) if K else None
        dsnap = _snapshot(b.dcache) if K and b.dcache is not None else None
        qlp = [None] * B
        if self.draft is not None:
            if K:
                pdev = nnn.own(self._draft_round(b, cur2, K, qlp))
            else:   # keep the draft's cache in step
                _set(&t1, padded_forward(self.draft, cur2, b.dcache, b.pads, T, True))
                _set(&t1, NULL)
        else:
            pa = to_array(props)
            pdev = pa.ptr[0]
        ids = rows.cat_axis(cur2, pdev, 1) if K else cur2
        logits = nnn.own(padded_forward(self.model, ids, b.cache, b.pads, T, False))
        masks = self._masks(b, V)
        if masks is not None:
            ma = to_array(masks)
            logits = nops.add(logits, nops.reshape(ma.ptr[0], _shape3(B, 1, V)))
        k = max((<_Seq>x_).top_logprobs for x_ in b.seqs)
        want_lp = any((<_Seq>x_).logprobs for x_ in b.seqs)
        # every row greedy, no log-probs: the device computes the candidates
        # only, and the host compares them with the proposals (a handful of
        # integers), instead of a dozen more ops in the graph
        cdef bint host = not want_lp and all((<_Seq>x_).sampler.temperature == 0.0
                                             for x_ in b.seqs)
        for r in range(B):
            s = <_Seq>b.seqs[r]
            x = nnn.own(_row_p(logits, r))                                   # [K + 1, V]
            if b.history != NULL and s.history_size:
                hrow = nnn.own(_row_p(b.history[0], r))
                x = nnn.own(s.sampler.process(x, &hrow))
            else:
                x = nnn.own(s.sampler.process(x, NULL))
            if K and not host:
                prow = nnn.own(_row_p(pdev, r))                              # [K]
            if s.sampler.temperature == 0.0:
                cand = nops.astype(nops.argmax(x, 1, False), na.int32)
                if K and not host:
                    accs.push_back(nops.equal(prow, nops.slice(cand, _shape1(0), _shape1(K))))
            else:
                lp = nnn.own(_dist(s.sampler, x))                  # [K + 1, V]
                p = nops.exp(lp)
                res = p
                if K:
                    lqd = nops.reshape(nops.take_along_axis(
                        nops.slice(lp, _shape2(0, 0), _shape2(K, V)),
                        nops.reshape(prow, _shape2(K, 1)), 1), _shape1(K))
                    if qlp[r] is None:      # prompt lookup: q is a point mass
                        q = nops.astype(nops.equal(nops.reshape(nops.arange(0, V, 1, na.int32),
                                                                _shape2(1, V)),
                                                   nops.reshape(prow, _shape2(K, 1))), na.float32)
                    else:
                        q = nops.exp((<Array>qlp[r]).ptr[0])
                        lqd = nops.subtract(lqd, nops.reshape(nops.take_along_axis(
                            (<Array>qlp[r]).ptr[0], nops.reshape(prow, _shape2(K, 1)), 1),
                            _shape1(K)))
                    u = nrand.uniform(na.array(0.0, na.float32), na.array(1.0, na.float32),
                                      _shape1(K), na.float32, s.sampler.key)
                    _set(&s.sampler.key, heap(nops.take(nrand.split(s.sampler.key[0], 2), 1, 0)))
                    accs.push_back(nops.less(nops.log(u), lqd))    # u < p(d) / q(d)
                    if kr[r] < K:       # positions past the row's own proposals: q = 0
                        ka = to_array((np.arange(K) < kr[r]).astype(np.float32).reshape(K, 1))
                        q = nops.multiply(q, ka.ptr[0])
                    two = vector[na.array]()
                    two.push_back(q)
                    two.push_back(nops.zeros(_shape2(1, V), na.float32))
                    res = nops.maximum(nops.subtract(p, nops.concatenate(two, 0)),
                                       na.array(0.0, na.float32))
                    res = nops.where(nops.greater(nops.sum(res, _axis(-1), True),
                                                  na.array(0.0, na.float32)), res, p)
                cand = nnn.own(_inverse_cdf(res, s.sampler.key))
                _set(&s.sampler.key, heap(nops.take(nrand.split(s.sampler.key[0], 2), 1, 0)))
            cands.push_back(nops.reshape(cand, _shape2(1, K + 1)))
        cdef na.array cand_all = nops.concatenate(cands, 0)               # [B, K + 1]
        cdef na.array emit = cand_all, a_dev
        if host:
            outs.push_back(cand_all)
            if K and self.draft is not None:
                outs.push_back(pdev)
        elif K:
            for r in range(B):
                accs[r] = nops.reshape(accs[r], _shape2(1, K))
            acc = nops.concatenate(accs, 0)
            ka = to_array(kr.reshape(B, 1))
            acc = nops.logical_and(acc, nops.less(nops.reshape(nops.arange(0, K, 1, na.int32),
                                                               _shape2(1, K)), ka.ptr[0]))
            prefix = nops.cumprod(nops.astype(acc, na.int32), 1, False, True)
            a_dev = nops.sum(prefix, _axis(1), False)
            zcol = nops.zeros(_shape2(B, 1), na.int32)
            emit = nops.where(nops.greater(rows.cat_axis(prefix, zcol, 1), zcol),
                              rows.cat_axis(pdev, zcol, 1), cand_all)
        else:
            a_dev = nops.zeros(_shape1(B), na.int32)
        if not host:
            outs.push_back(emit)
            outs.push_back(a_dev)
        cdef na.array lps, top_i, top_v, lsm
        if want_lp:
            lsm = nnn.own(log_softmax(logits))                            # [B, K + 1, V]
            lps = nops.reshape(nops.take_along_axis(lsm, nops.reshape(emit, _shape3(B, K + 1, 1)), 2),
                               _shape2(B, K + 1))
            outs.push_back(lps)
            if k > 0:
                k = min(k, V)
                top_i = nops.astype(nops.slice(nops.argpartition(nops.negative(lsm), k - 1, 2),
                                               _shape3(0, 0, 0), _shape3(B, K + 1, k)),
                                    na.int32)
                top_v = nops.take_along_axis(lsm, top_i, 2)
                outs.push_back(top_i)
                outs.push_back(top_v)
        if b.dcache is not None:
            _cache_arrays(b.dcache, outs)
        cdef _Flight nxt = None
        if host and self._chains(b):
            nasync_eval(outs)       # the device starts while the host builds the next step
            nxt = self._chain(b, cand_all, props, K)
        t0 = _now()
        _eval(outs)
        t0 = _now() - t0
        self.stats["wait_seconds"] += t0
        self.stats["verify_eval_seconds"] += t0
        if host:   # an accepted proposal equals its candidate: the row emits its candidates
            emit_h = _numpy(cand_all)
            a_h = _accepted_greedy(
                emit_h, props if self.draft is None or not K else _numpy(pdev), kr)
        else:
            emit_h = _numpy(emit)
            a_h = _numpy(a_dev).astype(np.int64)
        lp_h = _numpy(lps) if want_lp else None
        ti_h = _numpy(top_i) if want_lp and k > 0 else None
        tv_h = _numpy(top_v) if want_lp and k > 0 else None
        self._settle(b, K, T, kr, caps, emit_h, a_h, lp_h, ti_h, tv_h, tsnap, dsnap, want_lp,
                     k, nxt, events)

    cdef void _settle(self, _Batch b, int K, int T, object kr, object caps, object emit_h,
                      object a_h, object lp_h, object ti_h, object tv_h, list tsnap,
                      list dsnap, bint want_lp, int k, _Flight nxt, list events) except *:
        """After a verification of K proposals at offset T was read back: the
        caches re-aligned, each row's accepted tokens emitted, the token after
        them pending; `nxt`, the verification chained after it, stays queued
        when the row kept every proposal and goes on."""
        cdef int B = b.rows(), amax, base, r, j
        cdef _Seq s
        cdef Array pa
        # re-align the rows at their new ends (see the notes)
        amax = int(a_h.max())
        d = (amax - a_h).astype(np.int64)
        base = 0
        if K:
            self.stats["spec_steps"] += 1
            if d.any() and _can_trim(b.cache) and (b.dcache is None or _can_trim(b.dcache)):
                base = int(min((<_Seq>b.seqs[r]).pad + d[r] for r in range(B)))
            _realign(b.cache, tsnap, T, K + 1, amax, d, base)
            if b.dcache is not None:
                _realign(b.dcache, dsnap, T, K + 1, amax, d, base)
            if d.any() or base:
                for r in range(B):
                    (<_Seq>b.seqs[r]).pad += int(d[r]) - base
                b._set_pads()
        # the accepted proposals are this step's tokens too
        for r in range(B):
            s = <_Seq>b.seqs[r]
            if s.finish is not None or caps[r] < 0:
                continue
            if kr[r]:
                self.stats["proposed_tokens"] += int(kr[r])
                self.stats["accepted_tokens"] += int(a_h[r])
                if s.lookup_k:
                    _adapt(s, int(kr[r]), int(a_h[r]), self._adapts())
            for j in range(a_h[r]):
                self._spec_event(b, r, s, int(emit_h[r, j]), lp_h, ti_h, tv_h, j,
                                 int(a_h[r]) - j - 1, events)
                if s.finish is not None:
                    break
        # each row's next token is pending, as after a plain step
        sel = np.arange(B)
        nt = np.ascontiguousarray(emit_h[sel, a_h], dtype=np.int32)
        pa = to_array(nt)
        _set(&b.pending, new na.array(pa.ptr[0]))
        b.pending_host = nt
        if want_lp:
            pa = to_array(np.ascontiguousarray(lp_h[sel, a_h], dtype=np.float32))
            _set(&b.pending_lp, new na.array(pa.ptr[0]))
            if k > 0:
                pa = to_array(np.ascontiguousarray(ti_h[sel, a_h], dtype=np.int32))
                _set(&b.pending_top, new na.array(pa.ptr[0]))
                pa = to_array(np.ascontiguousarray(tv_h[sel, a_h], dtype=np.float32))
                _set(&b.pending_top_lp, new na.array(pa.ptr[0]))
        if b.history != NULL:
            self._push_history(b)
        if nxt is not None and a_h[0] == K and (<_Seq>b.seqs[0]).finish is None:
            _set_offsets(b.cache, nxt.T + nxt.K + 1)
            b.flight = nxt

    # -- chaining (see the notes at the end of the module) ---------------------
    cdef bint _chains(self, _Batch b) except -1:
        """May a verification of this batch queue the next one before it is
        read?  One greedy row on a cache without sliding windows, nothing
        else waiting to join the batch, and the tuning says so."""
        cdef _Seq s
        if not _tuning.lookup_chain:
            return False
        if (self.draft is not None or self.group is not None or self.waiting
                or b.rows() != 1 or b.pads != NULL or b.history != NULL
                or not _can_trim(b.cache)):
            return False
        s = <_Seq>b.seqs[0]
        return (s.finish is None and s.lookup_k > 0 and s.sampler.temperature == 0.0
                and not s.logprobs and s.token_mask is None)

    cdef _Flight _chain(self, _Batch b, const na.array& cand, object props, int K):
        """Queue the verification that follows one of K proposals whose
        candidates [1, K + 1] are `cand`, as if it kept them all: its first
        id is that verification's last candidate (still on the device), its
        proposals continue the lookup after `props`; None when the sequence
        would end first or, after a plain forward, nothing is proposed."""
        cdef _Seq s = <_Seq>b.seqs[0]
        cdef int done = s.produced + K + 1          # tokens out once the bonus token is
        if done >= s.max_tokens or (K and not s.kept):   # chain on a run of full acceptances
            return None
        cdef int k2 = min(s.lookup_k, max(s.cur_k, 2 * K)) if K else s.cur_k   # as _adapt sets it
        k2 = min(k2, s.max_tokens - done - 1)
        cdef list q = []
        if k2 > 0 and s.cool <= K + 1:
            q = _lookup(s, k2 + 1, [] if props is None else props[0].tolist())[0]
        cdef int guess = q.pop(0) if q else -1       # the lookup's guess of the bonus token
        if not K and not q:
            return None
        cdef na.array ids = nops.slice(cand, _shape2(0, K), _shape2(1, K + 1))
        cdef Array qa
        if q:
            qa = to_array(np.asarray(q, dtype=np.int32).reshape(1, -1))
            ids = rows.cat_axis(ids, qa.ptr[0], 1)
        cdef _Flight f = _Flight()
        f.K, f.T, f.guess = len(q), b.cache.offset, guess
        f.props = np.asarray(q, dtype=np.int32).reshape(1, f.K)
        cdef na.array logits = nnn.own(padded_forward(self.model, ids, b.cache, NULL, f.T, False))
        cdef na.array x = nnn.own(s.sampler.process(nnn.own(_row_p(logits, 0)), NULL))
        f.cand = heap(nops.reshape(nops.astype(nops.argmax(x, 1, False), na.int32),
                                   _shape2(1, f.K + 1)))
        cdef vector[na.array] outs = vector[na.array]()
        outs.push_back(f.cand[0])
        nasync_eval(outs)
        self.stats["chained_steps"] += 1
        return f

    cdef void _resume(self, _Batch b, list events) except *:
        """Read back the chained verification in flight (its pending token was
        just emitted), after queueing the one chained to it."""
        cdef _Flight f = b.flight
        cdef _Seq s = <_Seq>b.seqs[0]
        b.flight = None
        if s.finish is not None:        # the pending token ended it: the cache ends at f.T
            return
        _set_offsets(b.cache, f.T + f.K + 1)
        self.stats["chained_used"] += 1
        # proposals that followed a wrong guess of the token before them are
        # void: the step counts as a plain forward (no miss for _adapt) and
        # nothing is chained to it
        cdef bint void = f.K > 0 and s.generated[-1] != f.guess
        cdef _Flight nxt = (self._chain(b, f.cand[0], f.props, f.K)
                            if not void and self._chains(b) else None)
        kr = np.full(1, 0 if void else f.K, dtype=np.int32)
        caps = np.full(1, s.max_tokens - s.produced - 1, dtype=np.int64)
        t0 = _now()
        cand_h = _numpy(f.cand[0])
        self.stats["wait_seconds"] += _now() - t0
        self._settle(b, f.K, f.T, kr, caps, cand_h, _accepted_greedy(cand_h, f.props, kr),
                     None, None, None, None, None, False, 0, nxt, events)

    cdef void _spec_event(self, _Batch b, int r, _Seq s, int t, object lp_h, object ti_h,
                          object tv_h, int j, int unfed, list events) except *:
        """The Event of an accepted proposal (row r, verify position j);
        `unfed`: cache positions past it (trimmed from a returned cache)."""
        events.append(self._token_event(
            b, r, s, t, lp_h[r, j] if lp_h is not None else None,
            ti_h[r, j] if ti_h is not None else None,
            tv_h[r, j] if tv_h is not None else None, unfed))

    cdef object _token_event(self, _Batch b, int r, _Seq s, int t, object lp, object top_ids,
                             object top_lps, int unfed):
        """Record token t for row r's sequence and return its Event (log-prob,
        top log-probs, finish reason; the cache handed back when it ends, less
        `unfed` positions computed past t)."""
        s.produced += 1
        s.generated.append(t)
        if s.lookup_k:
            _record(s, t)
        self.stats["decode_tokens"] += 1
        ev = Event(s.id, t, cached_tokens=s.cached if s.produced == 1 else None)
        if s.logprobs and lp is not None:
            ev.logprob = float(lp)
        if s.top_logprobs and top_ids is not None:
            order = np.argsort(-top_lps, kind="stable")[:s.top_logprobs]
            ev.top_logprobs = [(int(top_ids[i]), float(top_lps[i])) for i in order]
        if t in s.stop_ids:
            ev.finish_reason = "stop"
        elif s.produced >= s.max_tokens:
            ev.finish_reason = "length"
        if ev.finish_reason is not None:
            s.finish = ev.finish_reason
            self.seqs.pop(s.id, None)
            if s.keep_cache:
                ev.cache = self._take_cache(b, r, s)
                if unfed:
                    try:
                        ev.cache.trim(unfed)
                    except ValueError:
                        pass    # a sliding window dropped positions: keep them fed
        return ev


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


# ------------------------------------------------------ speculative decoding --
#
# A decode step costs about the same for one token as for a few, so a step may
# verify k proposed tokens per row in ONE forward over [B, k+1] ids: the
# pending token followed by the proposals.  The target's distributions at the
# k+1 positions decide, row by row, how many proposals to keep (a_r) and one
# more token (the correction at the first rejection, or a bonus token when all
# were kept), which becomes the row's pending token.
#
#  - greedy rows keep proposals while they equal the target's argmax, so the
#    output is exactly plain greedy decoding's.  When every row is greedy and
#    none asks for log-probs, the graph ends at the argmaxes and the host
#    compares them with the proposals (_accepted_greedy): on a GPU each op of
#    the comparison would be a kernel launch of its own in a step that
#    nothing overlaps;
#  - sampled rows use speculative sampling: proposal d_j (drafted from q_j) is
#    kept with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection
#    the token is drawn from the normalized residual max(0, p_j - q_j), after
#    k acceptances from p_k.  Each emitted token is then distributed exactly
#    as the target's sampler would draw it (p is the sampler's distribution:
#    logit bias, top-p, top-k, min-p, temperature).  Prompt lookup's q is a
#    point mass on the proposal.
#
# Proposers: prompt lookup (per sequence: the continuation of the latest
# earlier occurrence of the last 3, else 2, tokens in prompt + generated ids)
# or a draft model (per engine: k tokens drafted one at a time on a cache of
# its own that mirrors the target's rows, padding and offset).
#
# Rows accept different numbers of tokens, but the batch keeps ONE padded
# offset.  After a verification at offset T every row holds T + k + 1
# positions of which its first T + a_r + 1 are real.  The batch keeps
# E = T + max(a) + 1 positions and re-aligns each row by shifting it right by
# d_r = max(a) - a_r positions, adding d_r to its left padding: its rejected
# positions fall off the end and zeros come in as padding.  RoPE stays right
# because a row's real position is (padded position - pad) and both move by
# d_r; the per-row masks then hide the new padding.  Padding every row shares
# is dropped (caches without sliding windows), so it does not accumulate.
# With one row (or rows that agree) nothing moves: a standard cache just sets
# its offset back.  A rotating (sliding-window) cache cannot hand rejected
# positions back (the verify step let older ones leave the ring), so before
# the verification the engine keeps a lazy view of what it held, and rebuilds
# the ring from that view + the new positions, shifted the same way.  The
# verification width k + 1 never exceeds a window, so those two cover every
# position a row's window needs.  The draft cache is re-aligned like the
# target's.
#
# Pipelining: a plain step queues the next token before reading the current
# one; a verification needs the current token on the host (the proposals
# follow it) and the acceptance counts before the next forward, so it runs
# read-first.  Prompt lookup therefore only switches to verification when a
# row has a match, and a row whose proposals were all rejected stops
# proposing for 4, 16, 64 tokens unless a match of LONG_MATCH tokens or more
# turns up (a copy under way): text that copies nothing decodes with plain
# pipelined steps.  Where proposals do not adapt (the GPU kernel verifies), a
# sampled row proposes only on such a long match (_Seq.min_match).
#
# Chaining (tuning's lookup_chain, off by default: docs/benchmarks.md has its
# measurements).  A read-first verification leaves the device idle while the
# host reads it back, compares, emits and looks up the next proposals; on a
# GPU that host time is as long as the verification itself.  For one greedy
# row (host acceptance, a cache without sliding windows, no other sequence
# waiting) the engine therefore queues the NEXT verification before it reads
# the current one, as if all of the current proposals will be kept: its first
# id is the current verification's last candidate, still on the device, and
# its proposals continue the lookup after the current proposals (the lookup's
# first token only guesses that candidate, so a wrong guess just gets the
# next proposals rejected: the chained step is still a correct forward from
# the real token).  When the current verification keeps every proposal, the
# chained one is already running (`_Batch.flight`); when it rejects one, or
# the sequence ends, the chained step was computed for nothing and the
# cache's offset is set back (only the offset: its positions lie past it).  A
# row chains only while its verifications keep all their proposals (the
# previous one did: a run of copying is under way), and a chained step whose
# guess was wrong counts as a plain forward, not as a miss of the lookup.
# Greedy output is unchanged either way.  On the CPU a chained step computed
# for nothing costs a verification's forward, more than the host time
# chaining saves.

DEFAULT_LOOKUP = 15     # up to 16 positions a verification: a GPU kernel's most
cdef tuple NGRAMS = (3, 2)
# A match whose text agrees over LONG_MATCH tokens or more (the n-gram and the
# tokens before it) is a copy under way: it proposes even while a row's misses
# keep it from proposing, and at least that many tokens (up to the row's k).
# Counted up to MATCH_CAP tokens back.
cdef int LONG_MATCH = 4
cdef int MATCH_CAP = 16


cdef inline void _record(_Seq s, int t) except *:
    """Append t to the lookup history and index the n-grams that end just
    before it (their continuation starts at t)."""
    cdef list h = s.hist
    h.append(t)
    cdef int m = len(h) - 1
    for n in NGRAMS:
        if m >= n:
            s.ngrams[tuple(h[m - n:m])] = m
    if s.cool > 0:
        s.cool -= 1


cdef void _start_history(_Seq s, list ids) except *:
    """A row's lookup history: its prompt's ids, their n-grams indexed."""
    s.hist, s.ngrams = [], {}
    for t in ids:
        _record(s, t)


cdef tuple _lookup(_Seq s, int k, list extra):
    """(up to k tokens continuing the latest earlier occurrence of the last
    3, else 2, ids of hist + extra; how many ids before them agree, up to
    MATCH_CAP).  A continuation that runs into the end of the history repeats
    its period (the text since the occurrence), as a looping reply goes on."""
    cdef list h = s.hist + extra if extra else s.hist
    cdef int n = len(h), L, g, j, t
    if k <= 0:
        return [], 0
    for g in NGRAMS:
        if n < g:
            continue
        o = s.ngrams.get(tuple(h[n - g:]))
        if o is None:
            continue
        j = o
        L = g
        while L < MATCH_CAP and j - 1 - L >= 0 and h[j - 1 - L] == h[n - 1 - L]:
            L += 1
        out = h[j:j + k]
        for t in range(len(out), k):        # out[t] = h[j + t], past n: out[t - (n - j)]
            out.append(out[t - (n - j)])
        return out, L
    return [], 0


def lookup_proposals(ids, int k):
    """What prompt lookup proposes after `ids` (a prompt and the tokens
    generated so far, a sequence of ints) when it may propose up to k tokens:
    (the proposed ids, how many ids of `ids` the match agrees on, up to 16).
    The engine proposes them on a match outside a row's cool-down, or
    during it for a match of 4 ids or more; a row's own proposal length
    adapts below k (see _adapt)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    cdef _Seq s = _Seq()
    _start_history(s, [int(t) for t in ids])
    return _lookup(s, k, [])


cdef inline bint _proposes(_Seq s, tuple found):
    """Does the lookup's result let the row propose: a match as long as the
    row asks for (min_match), outside the row's cool-down or long enough to
    override it."""
    return bool(found[0]) and found[1] >= s.min_match and (s.cool == 0 or
                                                            found[1] >= LONG_MATCH)


cdef list _proposals(_Seq s, int cap):
    """The row's proposals for this step (cap: the most its max_tokens and
    its batch leave): cur_k tokens, or as many as a long match agrees on."""
    cdef int most = min(s.lookup_k, cap)
    found = _lookup(s, most, [])
    if not _proposes(s, found):
        return []
    cdef int L = found[1]
    return found[0][:max(s.cur_k, L) if L >= LONG_MATCH else s.cur_k]


def _min_window(Model model):
    """The smallest sliding window of the model's layers (a large number if none)."""
    w = [(<LayerCache>c).window for c in model.make_cache().layers if (<LayerCache>c).window]
    return min(w) if w else 1 << 30


cdef void _rates(dict st) except *:
    st["acceptance_rate"] = st["accepted_tokens"] / st["proposed_tokens"] \
        if st["proposed_tokens"] else 0.0
    st["tokens_per_step"] = st["decode_tokens"] / st["row_steps"] if st["row_steps"] else 0.0


cdef class _Snap:
    """A rotating layer's positions before a verification, oldest first (lazy views)."""
    cdef na.array* k
    cdef na.array* v
    cdef int n

    def __dealloc__(self):
        _set(&self.k, NULL)
        _set(&self.v, NULL)


cdef list _snapshot(Cache cache):
    cdef list out = []
    cdef LayerCache lc
    cdef _Snap sn
    for c in cache.layers:
        lc = <LayerCache>c
        if lc.window == 0:
            out.append(None)
            continue
        sn = _Snap()
        if lc.keys != NULL:
            sn.k = _ordered(lc, lc.keys)
            sn.v = _ordered(lc, lc.values)
            sn.n = _held(lc)
        out.append(sn)
    return out


cdef na.array* _gather_t(const na.array& x, object idx) except NULL:
    """x [B, H, n, D] gathered along time with per-row indices idx (numpy [B, m])."""
    cdef Array ia = to_array(np.ascontiguousarray(idx, dtype=np.int32))
    cdef int B = x.shape(0), H = x.shape(1), m = idx.shape[1], D = x.shape(3)
    cdef na.array i4 = nops.broadcast_to(nops.reshape(ia.ptr[0], _shape4(B, 1, m, 1)),
                                         _shape4(B, H, m, D))
    return heap(nops.take_along_axis(x, i4, 2))


cdef void _realign(Cache cache, list snaps, int T, int L, int amax, object d, int base) except *:
    """After a verification of L positions at offset T: keep E = T + amax + 1
    padded positions, row r shifted right by d[r], then drop `base` positions
    of common left padding (see the notes above)."""
    cdef int E = T + amax + 1, n, n2, held, i
    cdef bint shift = bool(d.any()) or base > 0
    cdef LayerCache lc
    cdef _Snap sn
    cdef na.array ck, cv
    dcol = np.asarray(d, dtype=np.int64)[:, None]
    for i in range(len(cache.layers)):
        lc = <LayerCache>cache.layers[i]
        if lc.keys == NULL:
            continue
        if lc.window == 0:
            if not shift:
                lc.offset = E
                continue
            n = E - base
            idx = np.clip(base + np.arange(n)[None, :] - dcol, 0, E - 1)
            ck = nnn.own(_gather_t(nnn.slice_t(lc.keys[0], 0, E), idx))
            cv = nnn.own(_gather_t(nnn.slice_t(lc.values[0], 0, E), idx))
            _install(lc, ck, cv, n)
            continue
        if amax == L - 1 and not shift:
            continue
        sn = <_Snap>snaps[i]
        held = _held(lc)
        ck = nnn.slice_t(nnn.own(_ordered(lc, lc.keys)), held - L, held)
        cv = nnn.slice_t(nnn.own(_ordered(lc, lc.values)), held - L, held)
        if sn.n:
            ck = nnn.cat_t(sn.k[0], ck)
            cv = nnn.cat_t(sn.v[0], cv)
        n2 = min(lc.window, sn.n + amax + 1)
        idx = np.clip((E - n2) + np.arange(n2)[None, :] - dcol - (T - sn.n), 0, sn.n + L - 1)
        _install(lc, nnn.own(_gather_t(ck, idx)), nnn.own(_gather_t(cv, idx)), E)


cdef na.array* _dist(Sampler s, const na.array& x) except NULL:
    """Log-probabilities of the distribution s draws from, given processed
    logits x [..., V] (top-p, top-k, min-p, temperature; see Sampler.draw)."""
    cdef na.array y = x
    cdef int V = x.shape(x.ndim() - 1)
    if s.top_p < 1.0:
        y = nnn.own(top_p_filter(y, s.top_p))
    if 0 < s.top_k < V:
        y = nnn.own(top_k_filter(y, s.top_k))
    if s.min_p > 0.0:
        y = nnn.own(min_p_filter(y, s.min_p, s.min_tokens_to_keep))
    y = nops.multiply(nops.astype(y, na.float32), na.array(1.0 / s.temperature, na.float32))
    return log_softmax(y)


cdef na.array* _inverse_cdf(const na.array& w, const na.array* key) except NULL:
    """One index per row of w [n, V] (weights >= 0, not normalized), drawn
    with probability w / sum(w) by inverse transform: the first index whose
    running sum exceeds u * sum(w).  n uniforms, where categorical's Gumbel
    draws take n x V (151,936 per position for Qwen2.5)."""
    cdef int n = w.shape(0), V = w.shape(1)
    cdef na.array c = nops.cumsum(w, 1, False, True)
    cdef na.array tot = nops.slice(c, _shape2(0, V - 1), _shape2(n, V))           # [n, 1]
    cdef na.array u = nrand.uniform(na.array(0.0, na.float32), na.array(1.0, na.float32),
                                    _shape2(n, 1), na.float32, key)
    cdef na.array i = nops.sum(nops.astype(nops.less_equal(c, nops.multiply(u, tot)), na.int32),
                               _axis(1), False)
    return heap(nops.minimum(i, na.array(V - 1, na.int32)))                   # u * tot rounding up


cdef na.array* _row_p(const na.array& x, int r) except NULL:
    """x[r] of [B, ...] (2-D or 3-D)."""
    cdef int nd = x.ndim()
    if nd == 2:
        return heap(nops.reshape(nops.slice(x, _shape2(r, 0), _shape2(r + 1, x.shape(1))),
                            _shape1(x.shape(1))))
    cdef na.Shape a = na.Shape(), z = na.Shape()
    a.push_back(r)
    a.push_back(0)
    a.push_back(0)
    z.push_back(r + 1)
    z.push_back(x.shape(1))
    z.push_back(x.shape(2))
    return heap(nops.reshape(nops.slice(x, a, z), _shape2(x.shape(1), x.shape(2))))


cdef object _accepted_greedy(const int32_t[:, :] cand, object props, const int32_t[:] kr):
    """Greedy verification on the host: how many proposals each row accepted
    (int64 [B]), from the candidates cand [B, K + 1] (the argmax after each
    verified position), the proposals props [B, K] (None when K = 0) and each
    row's own number of proposals kr [B].  A row accepts its proposals up to
    the first that differs from its candidate (the device path's rule, see
    _speculate).  A loop over a few integers: numpy's ops cost ~25 us here."""
    cdef Py_ssize_t B = cand.shape[0], r, n
    out = np.zeros(B, dtype=np.int64)
    if cand.shape[1] == 1:
        return out
    cdef const int32_t[:, :] p = np.asarray(props, dtype=np.int32)
    cdef int64_t[::1] o = out
    for r in range(B):
        n = 0
        while n < kr[r] and p[r, n] == cand[r, n]:
            n += 1
        o[r] = n
    return out


cdef void _adapt(_Seq s, int proposed, int accepted, bint length) except *:
    """Prompt lookup after a verification: a row whose proposals were all
    rejected stops proposing for 4, 16, 64 tokens (consecutive misses) unless
    a long match turns up (_proposes), so text that copies nothing decodes
    plainly.  With `length` the proposal length follows the acceptance: it
    starts at 2, is doubled after a full acceptance and cut to what was
    accepted + 1 after a partial one; else it stays the row's lookup_k."""
    if accepted == proposed:
        s.cur_k = min(s.lookup_k, max(s.cur_k, 2 * proposed))
        s.misses = s.cool = 0
        s.kept += 1
    elif accepted == 0:
        s.kept = 0
        s.misses += 1
        s.cool = min(1 << (2 * s.misses), 64)
        s.cur_k = max(1, s.cur_k // 2)
    else:
        s.kept = 0
        s.cur_k = max(2, accepted + 1)
        s.misses = s.cool = 0
    if not length:
        s.cur_k = s.lookup_k
