# cython: language_level=3, cpp_locals=True
"""Batch inference: many prompts through one model together.

    from mlxcy.generation.batch import classify, batch_generate
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

batch_generate() hands every prompt to the generation engine
(mlxcy.generation.engine): up to `batch_size` rows decode together, rows that finish
(EOS / stop id, stop string, their own max_tokens) leave the batch, and
waiting prompts join as rows free up.

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
from mlxcy.native.array cimport shape4 as _shape4
from mlxcy.native.transforms cimport eval as neval, async_eval as nasync_eval
from mlxcy.models.base cimport Model
from mlxcy.models.cache cimport Cache, LayerCache, RotatingKVCache
from mlxcy.models.cache import empty_like
from mlxcy.generation.engine cimport padded_forward, log_softmax, _cache_arrays
from mlxcy.generation.engine import _min_window
from mlxcy.native cimport nn as nnn

import time
from collections import namedtuple

import numpy as np

__all__ = ["classify", "batch_generate", "ClassifyResult", "BatchGeneration", "BatchMetrics"]


# ------------------------------------------------------------ native helpers --

cdef inline void _drop(na.array** slot) noexcept:
    if slot[0] != NULL:
        del slot[0]
        slot[0] = NULL


cdef vector[int] _axis(int a):
    cdef vector[int] v = vector[int]()
    v.push_back(a)
    return v


cdef void _eval1(const na.array& x) except *:
    cdef vector[na.array] v = vector[na.array]()
    v.push_back(x)
    with nogil:
        neval(v)


cdef object _to_numpy(na.array* p):
    """Evaluate p, hand it to numpy (takes ownership of p)."""
    return wrap(p).numpy()


# ------------------------------------------------------------ classification --

# A batch's prompts that start with the same tokens (an instruction, a chat
# template's system turn, few-shot examples) share that prefix's keys and
# values: it runs once and each row computes only the rest.  Below this many
# tokens the extra forward and the cache copies save too little.
SHARED_PREFIX_MIN = 8
NO_WINDOW = 1 << 30       # engine._min_window of a model without sliding windows


def _shared_prefix(seqs, int window=NO_WINDOW):
    """How many tokens every sequence starts with (each keeping its last one
    to compute), or 0 below SHARED_PREFIX_MIN, for a single sequence, or
    where the model's shortest sliding window (engine._min_window) would drop
    a position of the longest sequence."""
    if max(len(s) for s in seqs) > window:
        return 0
    n = min(len(s) for s in seqs) - 1
    if len(seqs) < 2 or n < SHARED_PREFIX_MIN:
        return 0
    a = np.stack([np.asarray(s[:n]) for s in seqs])
    same = (a == a[0]).all(0)
    P = n if same.all() else int(np.argmin(same))
    return P if P >= SHARED_PREFIX_MIN else 0


cdef Cache _prefix_cache(Model model, object prefix, int B):
    """A B-row cache holding the keys and values of `prefix` (one forward of
    one row, its rows repeated)."""
    cdef int P = len(prefix)
    cdef Cache one = model.make_cache(), rows = model.make_cache()
    cdef LayerCache lc
    try:
        _prefill(model, one, prefix)
        for c, r in zip(one.layers, rows.layers):
            lc = <LayerCache>c
            k = wrap(heap(nops.repeat(nnn.slice_t(lc.keys[0], 0, P), B, 0)))
            v = wrap(heap(nops.repeat(nnn.slice_t(lc.values[0], 0, P), B, 0)))
            if type(c) is RotatingKVCache:
                r.set_state(k, v, P, P, P % lc.window)
            else:
                r.set_state(k, v, P)
    finally:
        one.free()
    return rows


cdef na.array* _prefix_mask(const na.array& pads, int P, int off, int L) except NULL:
    """Bool [B, 1, L, off + L] for queries at slots off .. off + L - 1 of
    left-padded rows after a shared prefix of P slots: every query sees the
    prefix and its row's own tokens, not the row's padding (slots P .. P +
    pad - 1); the attention adds the causal part."""
    cdef int B = pads.shape(0)
    cdef na.array kpos = nops.reshape(nops.arange(0, off + L, 1, na.int32),
                                      _shape4(1, 1, 1, off + L))
    cdef na.array own = nops.greater_equal(
        kpos, nops.add(nops.reshape(pads, _shape4(B, 1, 1, 1)), na.array(<int64_t>P, na.int32)))
    return heap(nops.broadcast_to(nops.logical_or(nops.less(kpos, na.array(<int64_t>P, na.int32)),
                                                  own), _shape4(B, 1, L, off + L)))


cdef na.array* _chunk_forward(Model model, const na.array& ids, Cache cache,
                              const na.array& pads, int P, int off, bint last_only) except NULL:
    """model.forward over a chunk of left-padded rows whose first column sits
    at slot `off` of a cache whose first P slots hold a prefix every row
    shares (P = 0: none; padded_forward)."""
    if P == 0:
        return padded_forward(model, ids, cache, &pads, off, last_only)
    cdef na.array* mask = NULL
    cdef na.array* offs = NULL
    try:
        mask = _prefix_mask(pads, P, off, ids.shape(1))
        # a row's token at slot t sits at position t - pad (its first at P)
        offs = heap(nops.subtract(na.array(<int64_t>off, na.int32), pads))
        return model.forward(ids, cache, mask, offs, last_only)
    finally:
        if mask != NULL:
            del mask
        if offs != NULL:
            del offs


cdef object _classify_batch(Model model, object ids, object pads, int top_k, object label_ids,
                            bint want_logits, object prefix=None):
    """One prefill forward over a left-padded batch (after `prefix`, the
    tokens every row starts with, when given); returns numpy pieces:
    (top ids [B, k], top log-probs [B, k], label first-token log-probs [B, n],
    raw logits [B, V]) -- each None when not asked for."""
    cdef Array a = to_array(ids)
    cdef Array p = to_array(pads)
    cdef int B = ids.shape[0]
    cdef int P = 0 if prefix is None else len(prefix)
    cdef Cache cache = None if P == 0 else _prefix_cache(model, prefix, B)
    cdef na.array* out = _chunk_forward(model, a.ptr[0], cache, p.ptr[0], P, P, True)
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
        lp = log_softmax(logits[0])
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


cdef object _teacher_forced(Model model, object ids, object pads, object targets, int m,
                            object prefix=None):
    """Sum of log p(target) at the last m positions of a left-padded batch
    (targets int32 [B, m], -1 = not scored), after `prefix` (the tokens every
    row starts with, computed once) when given.  The output head runs on
    those m positions only: a first forward fills a cache with the rest."""
    cdef int B = ids.shape[0], T = ids.shape[1]
    cdef int P = 0 if prefix is None else len(prefix)
    cdef Cache cache = model.make_cache() if P == 0 else _prefix_cache(model, prefix, B)
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
            out = _chunk_forward(model, a.ptr[0], cache, p.ptr[0], P, P, True)
            del out
            out = NULL
        a = to_array(ids[:, T - m:])
        out = _chunk_forward(model, a.ptr[0], cache, p.ptr[0], P, P + T - m, False)
        lp = log_softmax(out[0])                                  # [B, m, V]
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
                 "tokens_per_second", "decode_tokens_per_second", "peak_memory",
                 "acceptance_rate", "tokens_per_step")   # the last two: speculative decoding

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


# On a CPU a batch ends where its padding would pass this share of its
# padded positions: each costs a real token's multiply-adds there, while a
# GPU takes large padded batches nearly free.  SmolLM2 Q4_1, 64 prompts of
# 8-32 tokens, batch_size 64 (2026-12-06): 3.9 s in one batch, 2.97-3.11 s
# with a share of 0.25, 2.50-2.54 with 0.1, 2.74 with 0.05.
CPU_PAD_SHARE = 0.1


def _buckets(lengths, batch_size, pad_share=1.0):
    """Indices grouped into batches of at most batch_size prompts of similar
    length (longest first); a batch also ends where the next prompt would
    bring its padding past pad_share of its padded positions."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out, cur, real = [], [], 0
    for i in order:
        n = len(cur) + 1
        if cur and (n > batch_size or
                    lengths[cur[0]] * n * (1.0 - pad_share) > real + lengths[i]):
            out.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    if cur:
        out.append(cur)
    return out


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
    length to limit padding (on a CPU, a batch ends early rather than pad
    more than CPU_PAD_SHARE of its positions).  The tokens a batch's
    prompts all start with (a template, an instruction, few-shot examples:
    SHARED_PREFIX_MIN or more) are computed once for the batch, and so is
    each prompt for its labels of several tokens.
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
    window = _min_window(model)
    cpu = na.default_device().type == na.cpu
    for group in _buckets([len(s) for s in seqs], batch_size, CPU_PAD_SHARE if cpu else 1.0):
        rows = [seqs[i] for i in group]
        P = _shared_prefix(rows, window)
        ids, pads = _left_pad([s[P:] for s in rows])
        r_ids, r_lp, r_lab, r_raw = _classify_batch(model, ids, pads, top_k, first,
                                                    bool(return_logits),
                                                    rows[0][:P] if P else None)
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
    """Add log p(label[1:] | prompt + label[:t]) to lab_lp for multi-token
    labels.  A batch holds one prompt's labels, then the next prompt's (the
    prompts longest first, as _buckets orders them), so its rows share the
    prompt (or the prompts' common start), computed once; the scored
    positions, past each prompt, stay out of the shared part."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    pairs = [(i, j) for i in order for j in multi]
    window = _min_window(model)
    for k in range(0, len(pairs), batch_size):
        group = range(k, min(k + batch_size, len(pairs)))
        rows = [seqs[pairs[g][0]] + label_toks[pairs[g][1]][:-1] for g in group]
        P = min(_shared_prefix(rows, window), min(len(seqs[pairs[g][0]]) for g in group))
        if P < SHARED_PREFIX_MIN:
            P = 0
        ids, pads = _left_pad([r[P:] for r in rows])
        m = max(len(label_toks[pairs[g][1]]) - 1 for g in group)
        targets = np.full((len(group), m), -1, dtype=np.int32)
        for r, g in enumerate(group):
            rest = label_toks[pairs[g][1]][1:]
            targets[r, m - len(rest):] = rest
        got = _teacher_forced(model, ids, pads, targets, m, rows[0][:P] if P else None)
        for r, g in enumerate(group):
            i, j = pairs[g]
            lab_lp[i][j] += float(got[r])


# ------------------------------------------------------------ batch generate --

_SAMPLER_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "repetition_context_size", "presence_penalty", "frequency_penalty",
                 "logit_bias", "seed")


def batch_generate(text_model, prompts, *, options=None, batch_size=None, **opts):
    """Generate a continuation for every prompt, decoding them together.

    opts: GenerationOptions fields shared by every prompt (max_tokens,
    temperature, top_p, ..., stop, stop_ids, logprobs, prefill_chunk,
    max_context, cancel).  options: an optional list of one dict per prompt
    overriding those for that prompt (stops, max_tokens, sampling settings);
    logprobs, prefill_chunk and cancel are batch-wide.  batch_size: at most
    this many prompts decode together (default: all); prompts are then
    grouped by length.  The tokens the prompts all start with (a chat
    template's system turn, an instruction: SHARED_PREFIX_MIN or more) are
    prefilled once, except with a draft model, kv_bits or sliding windows.
    Greedy decoding (temperature 0) gives the same tokens as generating each
    prompt alone, up to float rounding (a batch's padded attention and its
    products add in another order: a near-tie of logits can go the other
    way); seeded sampling of a batch draws one
    key per step for the whole batch, so it does not reproduce single-prompt
    draws; per-prompt sampling settings (`options`) give each row its own
    sampler, which samples that row as a prompt alone would, so seeded rows
    reproduce single-prompt generation.  Returns a BatchGeneration (input
    order).
    """
    from mlxcy import memory
    from mlxcy.generation.api import GenerationOptions
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
            for k in ("logprobs", "prefill_chunk", "kv_bits", "kv_group_size", "cancel"):
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
    t0 = time.perf_counter()
    token_ids, lps, reasons, texts, st = _run(model, tok, seqs, per, base, batch_size,
                                              getattr(text_model, "draft_model", None),
                                              getattr(text_model, "num_draft", 4))
    prefill = st["prefill_seconds"]
    met.acceptance_rate = st["acceptance_rate"]
    met.tokens_per_step = st["tokens_per_step"]
    met.total_time = time.perf_counter() - t0
    met.prefill_time = prefill
    met.generated_tokens = sum(len(t) for t in token_ids)
    met.prompts_per_second = n / max(met.total_time, 1e-9)
    met.prefill_tokens_per_second = met.prompt_tokens / max(prefill, 1e-9)
    met.tokens_per_second = met.generated_tokens / max(met.total_time, 1e-9)
    met.decode_tokens_per_second = met.generated_tokens / max(met.total_time - prefill, 1e-9)
    met.peak_memory = memory.get_peak_memory()
    return BatchGeneration(texts, token_ids, reasons, lps, met)


def _run(Model model, tok, seqs, per, base, batch_size, draft=None, num_draft=4):
    """Every prompt through one engine: (token_ids, logprobs, stop reasons,
    texts, engine stats), in input order."""
    from mlxcy.generation.engine import Engine
    from mlxcy.generation.api import sampler_for
    from mlxcy.generation.text_stream import TextStream
    n = len(seqs)
    token_ids = [[] for _ in range(n)]
    lps = [[] for _ in range(n)] if base.logprobs else None
    reasons = ["length"] * n
    texts = [None] * n
    todo = [i for i in range(n) if per[i].max_tokens > 0]
    if base.cancelled():
        for i in todo:
            reasons[i] = "cancelled"
        todo = []
    # Rows of one sampler share one draw per step (see the docstring); rows
    # with their own settings get their own sampler.
    keys = [tuple(repr(getattr(per[i], k)) for k in _SAMPLER_KEYS) for i in todo]
    shared = sampler_for(per[todo[0]]) if todo and all(k == keys[0] for k in keys) else None
    eos = set(tok.eos_ids)
    # Prompts of similar length are admitted together (less padding).
    order = sorted(todo, key=lambda i: -len(seqs[i])) if batch_size else todo
    eng = Engine(model, max_batch=batch_size or max(1, len(todo)),
                 prefill_chunk=base.prefill_chunk or 512, kv_bits=base.kv_bits,
                 kv_group_size=base.kv_group_size, draft_model=draft, num_draft=num_draft)
    streams = {}
    row_of = {}
    nvocab = _tok_vocab(tok)
    cdef Cache prefix = None
    prefix_seconds = 0.0
    try:
        # the prompts' common start (a chat template's system turn, an
        # instruction) prefilled once; each sequence brings it as its prefix
        # cache, and the engine stacks those (not with a draft model or
        # sliding windows, where a prefix cache makes a group of one row)
        if (draft is None and base.kv_bits is None and _min_window(model) == NO_WINDOW
                and len(todo) > 1):
            P = _shared_prefix([seqs[i] for i in todo])
            if P:
                t = time.perf_counter()
                prefix = _prefill(model, eng.make_cache(), seqs[todo[0]][:P])
                prefix_seconds = time.perf_counter() - t
        for i in order:
            o = per[i]
            sid = eng.add(seqs[i], sampler=shared or sampler_for(o), max_tokens=o.max_tokens,
                          stop_ids=eos | set(o.stop_ids), logprobs=base.logprobs,
                          prompt_lookup=o.prompt_lookup,
                          cache=None if prefix is None else _share(prefix))
            row_of[sid] = i
            if [s for s in o.stop if s]:
                streams[sid] = (TextStream(tok, o.stop), [])
        active = set(row_of)
        while eng.has_work():
            if base.cancel is not None and base.cancelled():
                for sid in active:
                    reasons[row_of[sid]] = "cancelled"
                    eng.cancel(sid)
                break
            for ev in eng.step():
                i = row_of[ev.seq_id]
                done = ev.finish_reason
                if done == "stop":
                    done = "eos"
                else:
                    token_ids[i].append(ev.token)
                    if lps is not None:
                        lps[i].append(ev.logprob)
                    st = streams.get(ev.seq_id)
                    if st is not None and ev.token < nvocab:
                        piece, hit = st[0].push(ev.token)
                        st[1].append(piece)
                        if hit:
                            done = "stop"
                            eng.finish(ev.seq_id, "stop")
                if done is not None:
                    reasons[i] = done
                    active.discard(ev.seq_id)
        for sid, (st, parts) in streams.items():
            parts.append(st.finish())
            texts[row_of[sid]] = "".join(parts)
        for i in range(n):
            if texts[i] is None:
                texts[i] = tok.decode([t for t in token_ids[i] if t < nvocab],
                                      skip_special_tokens=True)
        st = dict(eng.stats)
        st["prefill_seconds"] += prefix_seconds
        return token_ids, lps, reasons, texts, st
    finally:
        if prefix is not None:
            prefix.free()
        eng.close()


cdef Cache _prefill(Model model, Cache cache, object ids):
    """cache after a forward over ids (one row), its buffers evaluated."""
    cdef Array a = to_array(np.asarray(ids, dtype=np.int32).reshape(1, len(ids)))
    cdef na.array* last = model.forward(a.ptr[0], cache, NULL, NULL, True)
    del last        # (what it leaves in the cache is what counts)
    cdef vector[na.array] bufs = vector[na.array]()
    _cache_arrays(cache, bufs)
    with nogil:
        neval(bufs)
    return cache


def _share(Cache cache):
    """A cache of the same layers holding the same (immutable) arrays."""
    out = empty_like(cache)
    for c, d in zip(cache.layers, out.layers):
        st = c.state()
        d.set_state(st["keys"], st["values"], st["offset"], st["filled"], st["idx"])
    return out
