# cython: language_level=3, cpp_locals=True
"""Batch inference: many prompts through one model together.

    from mlxcy.batch import classify, batch_generate
    res = classify(tm, ["The movie was great.", "Awful!"], labels=[" good", " bad"])
    res[0].label, res[0].scores                  # best label, label -> log-likelihood
    out = batch_generate(tm, ["Hello", "Once upon a time"], max_tokens=32)
    out.texts, out.token_ids, out.stop_reasons, out.metrics

`tm` is an MlxTextModel (anything with `.model`, an mlxcy Model, and
`.tokenizer`).  Prompts are strings (encoded with the tokenizer's special
tokens, as `TextModel.stream` does) or lists of token ids.

How a batch runs: prompts are left-padded to a common length; every forward
gets a boolean mask over absolute key positions that hides each row's padding
(a padding query sees only itself, so no attention row is empty) and per-row
RoPE offsets, so a row's first real token sits at position 0 exactly as when
the prompt runs alone.  Sliding-window layers measure their window in the
padded coordinates, where distances between real tokens are unchanged.

classify() buckets prompts by length (batches of `batch_size` prompts of
similar length), runs one prefill forward per batch with `last_only=True`
(no output head for any other position) and returns the last position's
distribution.  Label scores are log-likelihoods of the whole label: a label of
one token is scored from the first pass alone (its token's log-prob); labels of
several tokens get a second, teacher-forced pass over prompt + label[:-1],
whose output head runs only on the label's positions.

batch_generate() prefills the batch (in `prefill_chunk` pieces), then decodes
all rows together on one cache of batch B.  Each step's graph is queued
before the previous step's tokens are read back (as in mlxcy.generate); rows
that finish (EOS / stop id, stop string, their own max_tokens) are removed
from the batch -- the cache, pending tokens, padding and penalty history are
gathered down to the live rows -- so the others never wait.

Empty prompts: an empty string becomes the tokenizer's BOS token alone when
the tokenizer adds one; otherwise (and for an empty id list) ValueError
naming the prompt's index.
"""
from libc.stdint cimport int32_t, int64_t
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap
from mlxcy.native.array cimport shape1 as _shape1, shape2 as _shape2, shape3 as _shape3
from mlxcy.native.transforms cimport eval as neval, async_eval as nasync_eval
from mlxcy.models.base cimport Model
from mlxcy.cache cimport Cache, LayerCache
from mlxcy.sample cimport Sampler

import time
from collections import namedtuple

import numpy as np

__all__ = ["classify", "batch_generate", "ClassifyResult", "BatchGeneration", "BatchMetrics",
           "BatchLoop"]


# ------------------------------------------------------------ native helpers --

cdef inline void _drop(na.array** slot) noexcept:
    if slot[0] != NULL:
        del slot[0]
        slot[0] = NULL


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


cdef na.array* _rope_offsets(const na.array& pads, int off) except NULL:
    """int32 [B]: the RoPE position of each row's token at padded position off."""
    return heap(nops.subtract(na.array(<int64_t>off, na.int32), pads))


cdef na.array* _forward(Model model, const na.array& ids, Cache cache, const na.array& pads,
                        int off, bint last_only) except NULL:
    """model.forward over a left-padded chunk whose first column is padded position off."""
    cdef na.array* m = _pad_mask(pads, off, ids.shape(1))
    cdef na.array* o = NULL
    try:
        o = _rope_offsets(pads, off)
        return model.forward(ids, cache, m, o, last_only)
    finally:
        del m
        if o != NULL:
            del o


cdef na.array* _log_softmax(const na.array& x) except NULL:
    """float32 log-softmax over the last axis."""
    cdef na.array xf = nops.astype(x, na.float32)
    return heap(nops.subtract(xf, nops.logsumexp(xf, _axis(-1), True)))


cdef void _eval1(const na.array& x) except *:
    cdef vector[na.array] v = vector[na.array]()
    v.push_back(x)
    with nogil:
        neval(v)


cdef object _to_numpy(na.array* p):
    """Evaluate p, hand it to numpy (takes ownership of p)."""
    return wrap(p).numpy()


# ------------------------------------------------------------------ the loop --

cdef class BatchLoop:
    """Decodes B left-padded prompts together on one cache.

    BatchLoop(model, cache, ids [B, T] int32 left-padded, pads [B], samplers,
              prefill_chunk=None, logprobs=False, history=None)

    samplers: one Sampler for every row, or a list of B Samplers.  history:
    int32 [B, H] recent ids per row (-1 pads), for penalties.  `step(more)`
    returns (tokens int32 [rows], logprobs float32 [rows] or None) for the
    live rows, after queueing the following step when `more` is true;
    `keep(rows)` keeps only those live rows (indices into the current rows).
    The model and cache belong to the caller.
    """
    cdef Model model
    cdef Cache cache
    cdef Sampler shared            # one sampler for all rows, or None
    cdef list samplers             # per-row samplers (live rows), or None
    cdef na.array* pads            # int32 [rows]
    cdef na.array* pending         # int32 [rows], queued
    cdef na.array* pending_lp      # float32 [rows] or NULL
    cdef na.array* history         # int32 [rows, H] or NULL
    cdef int history_size
    cdef bint want_lp
    cdef readonly int rows
    cdef readonly double prefill_seconds

    def __init__(self, Model model, Cache cache, ids, pads, samplers, prefill_chunk=None,
                 bint logprobs=False, history=None):
        # None (GenerationOptions' default): 512 positions per row.  The
        # single-sequence CPU default (mlxcy.generate.default_prefill_chunk)
        # is tuned for one row; a batch's chunk is already rows times wider.
        if prefill_chunk is None:
            prefill_chunk = 512
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        pads = np.ascontiguousarray(pads, dtype=np.int32).reshape(-1)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"ids must be a non-empty [B, T] array, got shape {ids.shape}")
        if pads.shape[0] != ids.shape[0] or (pads < 0).any() or (pads >= ids.shape[1]).any():
            raise ValueError("pads: one padding count in [0, T) per row expected")
        if cache is None or cache.offset != 0:
            raise ValueError("BatchLoop needs a fresh cache from model.make_cache()")
        self.model, self.cache = model, cache
        self.rows = ids.shape[0]
        if isinstance(samplers, Sampler):
            self.shared = samplers
        else:
            samplers = list(samplers)
            if len(samplers) != self.rows or not all(isinstance(s, Sampler) for s in samplers):
                raise TypeError("samplers: a Sampler, or one Sampler per row")
            self.samplers = samplers
        self.want_lp = logprobs
        cdef Array a = to_array(pads)
        self.pads = new na.array(a.ptr[0])
        if history is not None:
            h = np.ascontiguousarray(history, dtype=np.int32)
            if h.ndim != 2 or h.shape[0] != self.rows:
                raise ValueError("history must be int32 [B, H]")
            self.history_size = h.shape[1]
            if self.history_size > 0:
                a = to_array(h)
                self.history = new na.array(a.ptr[0])
        t0 = time.perf_counter()
        self._prefill(ids, prefill_chunk)
        self.prefill_seconds = time.perf_counter() - t0

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        _drop(&self.pads)
        _drop(&self.pending)
        _drop(&self.pending_lp)
        _drop(&self.history)

    def close(self):
        """Drop the queued step and every per-row array (the cache stays)."""
        self._release()
        self.rows = 0

    cdef void _prefill(self, object ids, int chunk) except *:
        cdef int T = ids.shape[1], start = 0
        cdef Array part
        cdef na.array* out
        while T - start > chunk:
            part = to_array(ids[:, start:start + chunk])
            out = _forward(self.model, part.ptr[0], self.cache, self.pads[0], start, True)
            try:
                _eval1(out[0])        # bounds the graph; fills the cache
            finally:
                del out
            start += chunk
        part = to_array(ids[:, start:])
        out = _forward(self.model, part.ptr[0], self.cache, self.pads[0], start, True)
        self._queue(out)
        _eval1(self.pending[0])       # prefill time measured honestly

    cdef void _queue(self, na.array* logits3) except *:
        """Sample from logits [rows, 1, V]; queue the tokens. Frees logits3."""
        cdef int B = logits3.shape(0), V = logits3.shape(2), i
        cdef na.array* logits = NULL
        cdef na.array* tok = NULL
        cdef na.array* t1
        cdef Sampler s
        cdef vector[na.array] parts = vector[na.array]()
        cdef vector[na.array] outs = vector[na.array]()
        cdef na.array row = logits3[0]
        cdef na.array hrow = logits3[0]
        try:
            logits = heap(nops.reshape(logits3[0], _shape2(B, V)))
            if self.shared is not None:
                tok = self.shared.sample(logits[0], self.history)
            else:
                for i in range(B):
                    s = <Sampler>self.samplers[i]
                    # A row is sampled as a [V] vector, as a prompt alone is
                    # (mlxcy.generate), so seeded draws reproduce it.
                    row = nops.reshape(nops.slice(logits[0], _shape2(i, 0), _shape2(i + 1, V)),
                                       _shape1(V))
                    if self.history != NULL:
                        hrow = nops.reshape(nops.slice(self.history[0], _shape2(i, 0),
                                                       _shape2(i + 1, self.history.shape(1))),
                                            _shape1(self.history.shape(1)))
                        t1 = s.sample(row, &hrow)
                    else:
                        t1 = s.sample(row, NULL)
                    parts.push_back(nops.reshape(t1[0], _shape1(1)))
                    del t1
                tok = heap(nops.concatenate(parts, 0))
            _set(&self.pending, heap(nops.astype(tok[0], na.int32)))
            outs.push_back(self.pending[0])
            if self.want_lp:
                self._logprob_of(logits[0], self.pending[0])
            if self.history != NULL:
                self._push_history(self.pending[0])
        finally:
            del logits3
            if logits != NULL:
                del logits
            if tok != NULL:
                del tok
        if self.want_lp:
            outs.push_back(self.pending_lp[0])
        with nogil:
            nasync_eval(outs)

    cdef int _logprob_of(self, const na.array& logits, const na.array& tok) except -1:
        cdef int B = tok.shape(0)
        cdef na.array* lp = _log_softmax(logits)
        try:
            _set(&self.pending_lp, heap(nops.reshape(
                nops.take_along_axis(lp[0], nops.reshape(tok, _shape2(B, 1)), 1), _shape1(B))))
        finally:
            del lp
        return 0

    cdef void _push_history(self, const na.array& tok) except *:
        cdef int B = tok.shape(0)
        cdef vector[na.array] parts = vector[na.array]()
        parts.push_back(self.history[0])
        parts.push_back(nops.reshape(tok, _shape2(B, 1)))
        cdef na.array joined = nops.concatenate(parts, 1)
        cdef int T = joined.shape(1)
        if T > self.history_size:
            _set(&self.history, heap(nops.slice(joined, _shape2(0, T - self.history_size),
                                                _shape2(B, T))))
        else:
            _set(&self.history, heap(joined))

    def step(self, bint more=True):
        """(tokens, logprobs or None) of the live rows; with `more`, the next
        step is queued (on every live row) before these are read back."""
        cdef na.array* cur = self.pending
        cdef na.array* cur_lp = self.pending_lp
        cdef na.array* out
        cdef na.array* ids
        cdef int B = self.rows
        if cur == NULL:
            raise RuntimeError("BatchLoop: no step queued (closed, or stepped without `more`)")
        self.pending = NULL
        self.pending_lp = NULL
        try:
            if more:
                ids = heap(nops.reshape(cur[0], _shape2(B, 1)))
                try:
                    out = _forward(self.model, ids[0], self.cache, self.pads[0],
                                   self.cache.layers[0].offset, True)
                finally:
                    del ids
                self._queue(out)
            toks = _to_numpy(cur)
            cur = NULL
            lps = None
            if cur_lp != NULL:
                lps = _to_numpy(cur_lp)
                cur_lp = NULL
        finally:
            if cur != NULL:
                del cur
            if cur_lp != NULL:
                del cur_lp
        return toks, lps

    def keep(self, rows):
        """Keep only the given live rows (indices into the current rows, in
        the order given): the cache, queued tokens, padding and history."""
        idx_np = np.ascontiguousarray(rows, dtype=np.int32).reshape(-1)
        if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= self.rows):
            raise IndexError(f"keep: row index out of range for {self.rows} rows")
        if idx_np.size == 0:
            self.close()
            return
        cdef Array ia = to_array(idx_np)
        cdef na.array* idx = ia.ptr
        cdef LayerCache lc
        for layer in self.cache.layers:
            lc = <LayerCache>layer
            if lc.keys != NULL:
                _set(&lc.keys, heap(nops.take(lc.keys[0], idx[0], 0)))
                _set(&lc.values, heap(nops.take(lc.values[0], idx[0], 0)))
        _set(&self.pads, heap(nops.take(self.pads[0], idx[0], 0)))
        if self.pending != NULL:
            _set(&self.pending, heap(nops.take(self.pending[0], idx[0], 0)))
        if self.pending_lp != NULL:
            _set(&self.pending_lp, heap(nops.take(self.pending_lp[0], idx[0], 0)))
        if self.history != NULL:
            _set(&self.history, heap(nops.take(self.history[0], idx[0], 0)))
        if self.samplers is not None:
            self.samplers = [self.samplers[i] for i in idx_np.tolist()]
        self.rows = idx_np.size


# ------------------------------------------------------------ classification --

cdef object _classify_batch(Model model, object ids, object pads, int top_k, object label_ids,
                            bint want_logits):
    """One prefill forward over a left-padded batch; returns numpy pieces:
    (top ids [B, k], top log-probs [B, k], label first-token log-probs [B, n],
    raw logits [B, V]) -- each None when not asked for."""
    cdef Array a = to_array(ids)
    cdef Array p = to_array(pads)
    cdef int B = ids.shape[0]
    cdef na.array* out = _forward(model, a.ptr[0], None, p.ptr[0], 0, True)
    cdef na.array* logits = NULL
    cdef na.array* lp = NULL
    cdef int V
    cdef Array la
    cdef vector[na.array] outs = vector[na.array]()
    cdef na.array* r_ids = NULL
    cdef na.array* r_lp = NULL
    cdef na.array* r_lab = NULL
    cdef na.array* r_raw = NULL
    try:
        V = out.shape(2)
        logits = heap(nops.reshape(out[0], _shape2(B, V)))
        lp = _log_softmax(logits[0])
        if top_k > 0:
            r_ids = heap(nops.slice(nops.argpartition(nops.negative(lp[0]), top_k - 1, 1),
                                    _shape2(0, 0), _shape2(B, top_k)))
            r_lp = heap(nops.take_along_axis(lp[0], r_ids[0], 1))
            outs.push_back(r_ids[0])
            outs.push_back(r_lp[0])
        if label_ids is not None:
            la = to_array(np.asarray(label_ids, dtype=np.int32))
            r_lab = heap(nops.take(lp[0], la.ptr[0], 1))
            outs.push_back(r_lab[0])
        if want_logits:
            r_raw = heap(nops.astype(logits[0], na.float32))
            outs.push_back(r_raw[0])
        with nogil:
            neval(outs)
    except BaseException:
        _drop(&r_ids)
        _drop(&r_lp)
        _drop(&r_lab)
        _drop(&r_raw)
        raise
    finally:
        del out
        _drop(&logits)
        _drop(&lp)
    res_ids = _to_numpy(r_ids) if r_ids != NULL else None
    res_lp = _to_numpy(r_lp) if r_lp != NULL else None
    res_lab = _to_numpy(r_lab) if r_lab != NULL else None
    res_raw = _to_numpy(r_raw) if r_raw != NULL else None
    return res_ids, res_lp, res_lab, res_raw


cdef object _teacher_forced(Model model, object ids, object pads, object targets, int m):
    """Sum of log p(target) at the last m positions of a left-padded batch
    (targets int32 [B, m], -1 = not scored).  The output head runs on those
    m positions only: a first forward fills a cache with the rest."""
    cdef int B = ids.shape[0], T = ids.shape[1]
    cdef Cache cache = model.make_cache()
    cdef Array p = to_array(pads)
    cdef Array a
    cdef Array tg = to_array(np.maximum(targets, 0).astype(np.int32))
    cdef Array valid = to_array(targets >= 0)
    cdef na.array* out = NULL
    cdef na.array* lp = NULL
    cdef na.array* res = NULL
    try:
        if T > m:
            a = to_array(ids[:, :T - m])
            out = _forward(model, a.ptr[0], cache, p.ptr[0], 0, True)
            del out
            out = NULL
        a = to_array(ids[:, T - m:])
        out = _forward(model, a.ptr[0], cache, p.ptr[0], T - m, False)
        lp = _log_softmax(out[0])                                  # [B, m, V]
        res = heap(nops.sum(
            nops.where(valid.ptr[0],
                       nops.reshape(nops.take_along_axis(
                           lp[0], nops.reshape(tg.ptr[0], _shape3(B, m, 1)), 2),
                           _shape2(B, m)),
                       na.array(<double>0.0, na.float32)),
            _axis(1), False))
        _eval1(res[0])
        return _to_numpy(res)
    except BaseException:
        _drop(&res)
        raise
    finally:
        if out != NULL:
            del out
        _drop(&lp)
        cache.free()


# ----------------------------------------------------------- Python front ---

ClassifyResult = namedtuple("ClassifyResult", ["top_ids", "top_probs", "label", "scores",
                                               "logits"])
ClassifyResult.__doc__ = """The last-position distribution of one prompt.

top_ids / top_probs: the top_k token ids and their probabilities, best first
(empty when top_k=0).  label / scores: with labels, the best label and a dict
label -> log-likelihood of the label's tokens after the prompt (else None).
logits: the raw float32 logits [V] (numpy) with return_logits=True, else None."""


class BatchMetrics:
    """Figures of one batch_generate call."""
    __slots__ = ("prompts", "prompt_tokens", "generated_tokens", "prefill_time",
                 "total_time", "prompts_per_second", "prefill_tokens_per_second",
                 "tokens_per_second", "decode_tokens_per_second", "peak_memory")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}

    def format(self):
        return (f"{self.prompts} prompts ({self.prompt_tokens} tok), prefill "
                f"{self.prefill_tokens_per_second:.1f} tok/s | generated {self.generated_tokens} "
                f"tok, {self.tokens_per_second:.1f} tok/s overall, "
                f"{self.decode_tokens_per_second:.1f} tok/s decode | "
                f"{self.prompts_per_second:.2f} prompts/s | total {self.total_time:.2f} s | "
                f"peak {self.peak_memory / (1 << 20):.1f} MB")

    def __repr__(self):
        return f"BatchMetrics({self.as_dict()})"


class BatchGeneration:
    """Results of batch_generate, in the prompts' order: texts (stop strings
    cut, special tokens skipped), token_ids (generated ids; a final EOS/stop id
    is not included, as TextModel.stream does not yield it; ids beyond the
    tokenizer's vocabulary -- a padded model vocabulary -- add no text), stop_reasons
    ("eos", "stop", "length", "cancelled"), logprobs (per token, with
    logprobs=True, else None) and metrics (BatchMetrics)."""
    __slots__ = ("texts", "token_ids", "stop_reasons", "logprobs", "metrics")

    def __init__(self, texts, token_ids, stop_reasons, logprobs, metrics):
        self.texts, self.token_ids, self.stop_reasons = texts, token_ids, stop_reasons
        self.logprobs, self.metrics = logprobs, metrics

    def __len__(self):
        return len(self.texts)

    def __repr__(self):
        return f"<BatchGeneration of {len(self.texts)} prompts: {self.metrics.format()}>"


def _parts(text_model):
    model = getattr(text_model, "model", None)
    tok = getattr(text_model, "tokenizer", None)
    if not isinstance(model, Model) or tok is None:
        raise TypeError("expected an mlxcy TextModel (backend 'mlx'): an object with an mlxcy "
                        f"Model as .model and a .tokenizer, got {type(text_model).__name__}")
    if getattr(text_model, "_closed", False) or model.closed:
        raise ValueError("this model has been closed")
    return model, tok


def _tok_vocab(tok):
    """Ids at or above this have no text (a model's vocabulary is often
    padded beyond its tokenizer's); they are kept in token_ids, not decoded."""
    v = getattr(tok, "vocab_size", None)
    return int(v) if isinstance(v, int) else 1 << 62


def _context_limit(text_model, model, max_context=None):
    return int(max_context or getattr(text_model, "max_context", None)
               or model.config.max_position_embeddings or 0)


def _encode_prompts(prompts, tok, vocab, int limit):
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError("prompts must be a list of strings or of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=True)
        elif isinstance(p, (list, tuple, np.ndarray)):
            ids = [int(t) for t in np.asarray(p).reshape(-1).tolist()]
            bad = [t for t in ids if t < 0 or t >= vocab]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {vocab})")
        else:
            raise TypeError(f"prompt {i}: expected a str or a list of token ids, "
                            f"got {type(p).__name__}")
        if not ids:
            raise ValueError(f"prompt {i} is empty (it encodes to no tokens and the tokenizer "
                             "adds no BOS token)")
        if limit and len(ids) > limit:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the context "
                             f"length {limit}")
        out.append(ids)
    return out


def _left_pad(seqs, pad_id=0):
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int32)
    pads = np.empty(len(seqs), dtype=np.int32)
    for r, s in enumerate(seqs):
        ids[r, T - len(s):] = s
        pads[r] = T - len(s)
    return ids, pads


def _buckets(lengths, batch_size):
    """Indices grouped into batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def classify(text_model, prompts, *, labels=None, top_k=5, return_logits=False,
             batch_size=None):
    """The next-token distribution after each prompt, in batches.

    Returns one ClassifyResult per prompt (input order): top_ids/top_probs
    (top_k most likely next tokens), label/scores when `labels` is given
    (each label's log-likelihood as a continuation: log p(first token) for a
    one-token label, the sum over its tokens, teacher-forced, for longer ones;
    labels are encoded as given, without special tokens -- include a leading
    space where the tokenizer expects one), and raw logits with return_logits.
    batch_size: prompts per forward (default 16); prompts are bucketed by
    length to limit padding.
    """
    model, tok = _parts(text_model)
    vocab = model.config.vocab_size
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    top_k = min(top_k, vocab)
    if batch_size is None:
        batch_size = 16
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    seqs = _encode_prompts(prompts, tok, vocab, _context_limit(text_model, model))
    label_toks = None
    first = None
    if labels is not None:
        if isinstance(labels, str) or len(labels) == 0:
            raise ValueError("labels must be a non-empty list of strings")
        label_toks = []
        for lab in labels:
            if not isinstance(lab, str):
                raise TypeError(f"label {lab!r} is not a str")
            t = tok.encode(lab, add_special_tokens=False)
            if not t:
                raise ValueError(f"label {lab!r} encodes to no tokens")
            label_toks.append(t)
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        first = [t[0] for t in label_toks]
    n = len(seqs)
    top_ids = [None] * n
    top_lp = [None] * n
    lab_lp = [None] * n
    raws = [None] * n
    for group in _buckets([len(s) for s in seqs], batch_size):
        ids, pads = _left_pad([seqs[i] for i in group])
        r_ids, r_lp, r_lab, r_raw = _classify_batch(model, ids, pads, top_k, first,
                                                    bool(return_logits))
        for r, i in enumerate(group):
            if r_ids is not None:
                order = np.argsort(-r_lp[r], kind="stable")
                top_ids[i] = r_ids[r][order]
                top_lp[i] = r_lp[r][order]
            if r_lab is not None:
                lab_lp[i] = r_lab[r].astype(np.float64)
            if r_raw is not None:
                raws[i] = r_raw[r]
    if label_toks is not None:
        multi = [j for j, t in enumerate(label_toks) if len(t) > 1]
        if multi:
            _score_multi(model, seqs, label_toks, multi, lab_lp, batch_size)
    results = []
    for i in range(n):
        ti = np.asarray(top_ids[i] if top_ids[i] is not None else [], dtype=np.int64)
        tp = np.exp(np.asarray(top_lp[i] if top_lp[i] is not None else [], dtype=np.float64))
        label = scores = None
        if labels is not None:
            scores = {lab: float(lab_lp[i][j]) for j, lab in enumerate(labels)}
            label = labels[int(np.argmax(lab_lp[i]))]
        results.append(ClassifyResult(ti, tp, label, scores, raws[i]))
    return results


def _score_multi(model, seqs, label_toks, multi, lab_lp, batch_size):
    """Add log p(label[1:] | prompt + label[:t]) to lab_lp for multi-token labels."""
    pairs = [(i, j) for i in range(len(seqs)) for j in multi]
    lengths = [len(seqs[i]) + len(label_toks[j]) - 1 for i, j in pairs]
    for group in _buckets(lengths, batch_size):
        rows = [seqs[pairs[g][0]] + label_toks[pairs[g][1]][:-1] for g in group]
        ids, pads = _left_pad(rows)
        m = max(len(label_toks[pairs[g][1]]) - 1 for g in group)
        targets = np.full((len(group), m), -1, dtype=np.int32)
        for r, g in enumerate(group):
            rest = label_toks[pairs[g][1]][1:]
            targets[r, m - len(rest):] = rest
        got = _teacher_forced(model, ids, pads, targets, m)
        for r, g in enumerate(group):
            i, j = pairs[g]
            lab_lp[i][j] += float(got[r])


# ------------------------------------------------------------ batch generate --

_SAMPLER_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "repetition_context_size", "presence_penalty", "frequency_penalty",
                 "logit_bias", "seed")


def _sampler_for(o):
    return Sampler(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
                   repetition_penalty=o.repetition_penalty,
                   repetition_context_size=o.repetition_context_size,
                   presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
                   logit_bias=o.logit_bias, seed=o.seed)


def _history_size(Sampler s):
    """How many recent tokens the sampler's penalties look at (0: none)."""
    n = 0
    if s.repetition_penalty != 1.0:
        n = max(n, s.repetition_context_size)
    if s.presence_penalty != 0.0:
        n = max(n, s.presence_context_size)
    if s.frequency_penalty != 0.0:
        n = max(n, s.frequency_context_size)
    return n


def batch_generate(text_model, prompts, *, options=None, batch_size=None, **opts):
    """Generate a continuation for every prompt, decoding them together.

    opts: GenerationOptions fields shared by every prompt (max_tokens,
    temperature, top_p, ..., stop, stop_ids, logprobs, prefill_chunk,
    max_context, cancel).  options: an optional list of one dict per prompt
    overriding those for that prompt (stops, max_tokens, sampling settings);
    logprobs, prefill_chunk and cancel are batch-wide.  batch_size: at most
    this many prompts decode together (default: all); prompts are then
    grouped by length.  Greedy decoding (temperature 0) gives the same tokens
    as generating each prompt alone; seeded sampling of a batch draws one
    key per step for the whole batch, so it does not reproduce single-prompt
    draws; per-prompt sampling settings (`options`) give each row its own
    sampler, which samples that row as a prompt alone would, so seeded rows
    reproduce single-prompt generation.  Returns a BatchGeneration (input
    order).
    """
    from mlxcy import memory
    from mlxcy.inference import GenerationOptions
    model, tok = _parts(text_model)
    base = GenerationOptions.from_kwargs(opts)
    if options is not None:
        if isinstance(options, dict) or len(options) != len(prompts):
            raise ValueError("options must be a list with one dict per prompt")
        per = []
        for i, d in enumerate(options):
            if d is not None and not isinstance(d, dict):
                raise TypeError(f"options[{i}] must be a dict or None")
            merged = dict(opts)
            merged.update(d or {})
            for k in ("logprobs", "prefill_chunk", "cancel"):
                if d and k in d and d[k] != getattr(base, k):
                    raise ValueError(f"options[{i}]: {k} is batch-wide; pass it as a keyword")
            per.append(GenerationOptions.from_kwargs(merged))
    else:
        per = None
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    vocab = model.config.vocab_size
    seqs = _encode_prompts(prompts, tok, vocab, _context_limit(text_model, model,
                                                               base.max_context))
    n = len(seqs)
    per = per or [base] * n
    for i, o in enumerate(per):
        lim = o.max_context or getattr(text_model, "max_context", None)
        if lim and len(seqs[i]) + o.max_tokens > lim:
            raise ValueError(f"prompt {i}: {len(seqs[i])} tokens + max_tokens ({o.max_tokens}) "
                             f"exceeds max_context ({lim})")
    memory.reset_peak_memory()
    met = BatchMetrics()
    met.prompts = n
    met.prompt_tokens = sum(len(s) for s in seqs)
    token_ids = [[] for _ in range(n)]
    lps = [[] for _ in range(n)] if base.logprobs else None
    reasons = ["length"] * n
    texts = [None] * n
    eos = set(tok.eos_ids)
    t0 = time.perf_counter()
    todo = [i for i in range(n) if per[i].max_tokens > 0]
    if base.cancelled():
        for i in todo:
            reasons[i] = "cancelled"
        todo = []
    groups = _buckets([len(seqs[i]) for i in todo], batch_size) if batch_size else [
        list(range(len(todo)))]
    prefill = 0.0
    for g in groups:
        if not g:
            continue
        prefill += _run_group(model, tok, [todo[k] for k in g], seqs, per, base, eos,
                              token_ids, lps, reasons, texts)
    nvocab = _tok_vocab(tok)
    for i in range(n):
        if texts[i] is None:
            texts[i] = tok.decode([t for t in token_ids[i] if t < nvocab],
                                  skip_special_tokens=True)
    met.total_time = time.perf_counter() - t0
    met.prefill_time = prefill
    met.generated_tokens = sum(len(t) for t in token_ids)
    met.prompts_per_second = n / max(met.total_time, 1e-9)
    met.prefill_tokens_per_second = met.prompt_tokens / max(prefill, 1e-9)
    met.tokens_per_second = met.generated_tokens / max(met.total_time, 1e-9)
    met.decode_tokens_per_second = met.generated_tokens / max(met.total_time - prefill, 1e-9)
    met.peak_memory = memory.get_peak_memory()
    return BatchGeneration(texts, token_ids, reasons, lps, met)


def _run_group(Model model, tok, group, seqs, per, base, eos, token_ids, lps, reasons, texts):
    """Decode the prompts `group` together; fills the per-prompt outputs.
    Returns the prefill time."""
    from mlxcy.inference import _StopMatcher
    from mlxcy.tokenizer import StreamDecoder
    opts = [per[i] for i in group]
    keys = [tuple(repr(getattr(o, k)) for k in _SAMPLER_KEYS) for o in opts]
    if all(k == keys[0] for k in keys):
        samplers = _sampler_for(opts[0])
        hsize = _history_size(samplers)
    else:
        samplers = [_sampler_for(o) for o in opts]
        hsize = max(_history_size(s) for s in samplers)
    history = None
    if hsize > 0:
        history = np.full((len(group), hsize), -1, dtype=np.int32)
        for r, i in enumerate(group):
            h = seqs[i][-hsize:]
            history[r, hsize - len(h):] = h
    ids, pads = _left_pad([seqs[i] for i in group])
    stop_ids = [eos | set(o.stop_ids) for o in opts]
    budget = [o.max_tokens for o in opts]
    matchers = [(_StopMatcher(o.stop), StreamDecoder(tok, skip_special_tokens=True), [])
                if [s for s in o.stop if s] else None for o in opts]
    nvocab = _tok_vocab(tok)
    cache = model.make_cache()
    loop = None
    try:
        loop = BatchLoop(model, cache, ids, pads, samplers, prefill_chunk=base.prefill_chunk,
                         logprobs=base.logprobs, history=history)
        live = list(range(len(group)))     # live row -> position in group
        produced = [0] * len(group)
        while live:
            more = any(produced[r] + 1 < budget[r] for r in live)
            toks, tlp = loop.step(more)
            cancel = base.cancel is not None and base.cancelled()
            keep = []
            for row, r in enumerate(live):
                i = group[r]
                t = int(toks[row])
                produced[r] += 1
                done = None
                if t in stop_ids[r]:
                    done = "eos"
                else:
                    token_ids[i].append(t)
                    if lps is not None:
                        lps[i].append(float(tlp[row]))
                    mt = matchers[r]
                    if mt is not None and t < nvocab:
                        text, hit = mt[0].feed(mt[1].push(t))
                        mt[2].append(text)
                        if hit:
                            done = "stop"
                if done is None and produced[r] >= budget[r]:
                    done = "length"
                if done is None and cancel:
                    done = "cancelled"
                if done is None:
                    keep.append(row)
                    continue
                reasons[i] = done
                mt = matchers[r]
                if mt is not None:
                    if done != "stop":
                        tail, _ = mt[0].feed(mt[1].finish())
                        mt[2].append(tail + mt[0].flush())
                    texts[i] = "".join(mt[2])
            if not keep:
                break
            if len(keep) < len(live):
                loop.keep(keep)
                live = [live[row] for row in keep]
        return loop.prefill_seconds
    finally:
        if loop is not None:
            loop.close()
        cache.free()
