# cython: language_level=3, cpp_locals=True
"""Token samplers and logit processors (mlx-lm's semantics, native hot path).

    s = Sampler(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=0)
    tokens = s(logits, history)          # logits [B, V] -> int32 [B], lazy

Order of operations, as in mlx-lm: logit bias, repetition penalty, presence
penalty, frequency penalty (each over the last *_context_size tokens of the
history); then greedy argmax when temperature == 0, else top-p, min-p, top-k
and a categorical draw from softmax(logits / temperature).

The filters return logits with removed entries set to -inf.  They are
invariant to a per-row constant, so log-probabilities and raw logits give the
same result:
  * top-k keeps the k largest entries (entries tied with the k-th are kept);
  * top-p keeps the smallest set of most likely tokens whose probability
    mass is >= p (ties with the last kept token are kept);
  * min-p keeps tokens with probability >= min_p * (max probability), and at
    least `min_tokens_to_keep` tokens.
Penalties (mlx-lm / CTRL / OpenAI): a token in the recent context has its
logit divided by `repetition_penalty` when positive, multiplied when negative;
`presence_penalty` is subtracted once from every such token, and
`frequency_penalty` once per occurrence.  History entries outside [0, V) are
ignored, so -1 may pad the rows of a batched history.
"""
from libc.math cimport INFINITY, log, isfinite, isnan
from libc.stdint cimport int32_t

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport sample as nsm
from mlxcy.native.array cimport heap
from mlxcy.native.array cimport shape2 as _shape2

import numpy as np

from mlxcy.errors import OptionError, OptionTypeError

__all__ = ["Sampler", "apply_top_k", "apply_top_p", "apply_min_p", "apply_penalties"]


# ------------------------------------------------------------- helpers -----

cdef inline int _last(const na.array& x):
    return x.shape(<int>x.ndim() - 1)


cdef na.Shape _cols_start(const na.array& x, int lo):
    """Start index of the column range [lo, ...) along the last axis."""
    cdef na.Shape s = na.Shape()
    cdef size_t i
    for i in range(x.ndim() - 1):
        s.push_back(0)
    s.push_back(lo)
    return s


cdef na.Shape _cols_stop(const na.array& x, int hi):
    cdef na.Shape s = na.Shape()
    cdef size_t i
    for i in range(x.ndim() - 1):
        s.push_back(x.shape(<int>i))
    s.push_back(hi)
    return s


cdef inline bint _is_floating(const na.array& x):
    cdef int c = na.dtype_code(x.dtype())
    return c == 9 or c == 10 or c == 11 or c == 12


cdef inline bint _is_integer(const na.array& x):
    cdef int c = na.dtype_code(x.dtype())
    return 1 <= c <= 8


cdef int _check_logits(const na.array& x, str name) except -1:
    if x.ndim() == 0:
        raise ValueError(f"{name}: expected an array with a vocabulary axis "
                         f"([V] or [B, V]), got a scalar")
    if not _is_floating(x):
        raise TypeError(f"{name}: expected a floating-point array, got "
                        f"dtype code {na.dtype_code(x.dtype())} (use .astype(float32))")
    if _last(x) == 0:
        raise ValueError(f"{name}: the vocabulary axis is empty")
    return 0


# -------------------------------------------------------------- filters ----

cdef na.array* top_k_filter(const na.array& x, int k) except NULL:
    cdef int V = _last(x)
    if k <= 0 or k >= V:
        return new na.array(x)
    cdef na.array part = nsm.partition(x, V - k, -1)
    cdef na.array thr = nsm.slice(part, _cols_start(x, V - k), _cols_stop(x, V - k + 1))
    cdef na.array ninf = na.array(<double>-INFINITY, x.dtype())
    return heap(nsm.where(nsm.less(x, thr), ninf, x))


cdef na.array* top_p_filter(const na.array& x, double p) except NULL:
    if p >= 1.0 or _last(x) == 1:
        return new na.array(x)
    return _top_p(x, p, NULL)


cdef na.array* _top_p(const na.array& x, double p, const na.array* total) except NULL:
    """Top-p along the last axis of x. `total`: the row's probability mass
    relative to the row maximum (sum of exp(logit - max)), when x holds only
    the top entries of a longer row; NULL: x is the whole row."""
    cdef int V = _last(x)
    # Sorted ascending; probabilities relative to the row maximum (no overflow).
    cdef na.array s = nsm.sort(x, -1)
    cdef na.array s32 = nsm.astype(s, na.float32)
    cdef na.array m = nsm.slice(s32, _cols_start(x, V - 1), _cols_stop(x, V))
    cdef na.array pr = nsm.exp(nsm.subtract(s32, m))
    # mass strictly above each sorted position; drop a position while the
    # tokens above it already hold >= p of the mass.
    cdef na.array above = nsm.cumsum(pr, -1, True, False)
    cdef na.array tot
    if total == NULL:
        tot = nsm.add(nsm.slice(above, _cols_start(x, 0), _cols_stop(x, 1)),
                      nsm.slice(pr, _cols_start(x, 0), _cols_stop(x, 1)))
    else:
        tot = total[0]
    cdef na.array target = nsm.multiply(tot, na.array(p, na.float32))
    cdef na.array ndrop = nsm.sum(nsm.greater_equal(above, target), -1, True)
    # ndrop <= V - 1: the top entry's own mass is 1 <= total, and p > 0.
    cdef na.array thr = nsm.take_along_axis(s, ndrop, -1)
    cdef na.array ninf = na.array(<double>-INFINITY, x.dtype())
    return heap(nsm.where(nsm.less(x, thr), ninf, x))


cdef na.array* min_p_filter(const na.array& x, double min_p, int min_keep) except NULL:
    cdef int V = _last(x)
    if min_p <= 0.0 or min_keep >= V:
        return new na.array(x)
    cdef na.array thr = nsm.add(nsm.max(x, -1, True), na.array(log(min_p), x.dtype()))
    cdef na.array part
    if min_keep > 1:
        part = nsm.partition(x, V - min_keep, -1)
        thr = nsm.minimum(thr, nsm.slice(part, _cols_start(x, V - min_keep),
                                         _cols_stop(x, V - min_keep + 1)))
    cdef na.array ninf = na.array(<double>-INFINITY, x.dtype())
    return heap(nsm.where(nsm.less(x, thr), ninf, x))


# ------------------------------------------------------------ penalties ----

cdef na.array* _history_rows(const na.array& h, const na.array& logits, int N) except NULL:
    """The history as int32 [N, T] matching the N rows of `logits`."""
    cdef int hd = h.ndim(), ld = logits.ndim(), i
    if not _is_integer(h):
        raise TypeError("history: expected an integer array of token ids")
    if hd == 0:
        raise ValueError("history: expected token ids of shape [T] or [B, T], got a scalar")
    cdef int T = h.shape(hd - 1)
    cdef na.array h32 = nsm.astype(h, na.int32)
    if hd == 1:
        return heap(nsm.broadcast_to(nsm.reshape(h32, _shape2(1, T)), _shape2(N, T)))
    ok = hd == ld
    if ok:
        for i in range(hd - 1):
            if h.shape(i) != logits.shape(i):
                ok = False
    if not ok:
        hs = tuple([h.shape(i) for i in range(hd)])
        ls = tuple([logits.shape(i) for i in range(ld)])
        raise ValueError(f"history: shape {hs} does not match logits of shape {ls}; "
                         f"expected [T] (shared by all rows) or {ls[:-1] + ('T',)}")
    return heap(nsm.reshape(h32, _shape2(N, T)))


cdef na.array* _counts(const na.array& h, int window, int V, na.Dtype dt) except NULL:
    """[N, V] occurrence counts of the token ids in the last `window` columns
    of h [N, T]; ids outside [0, V) are not counted."""
    cdef int N = h.shape(0), T = h.shape(1)
    cdef na.array hw = h
    if window < T:
        hw = nsm.slice(h, _shape2(0, T - window), _shape2(N, T))
    cdef na.array zero = na.array(<int>0)
    cdef na.array valid = nsm.logical_and(nsm.greater_equal(hw, zero),
                                          nsm.less(hw, na.array(<int>V)))
    cdef na.array idx = nsm.where(valid, hw, zero)
    return heap(nsm.scatter_add_axis(nsm.zeros(_shape2(N, V), dt), idx,
                                     nsm.astype(valid, dt), 1))


# -------------------------------------------------------------- Sampler ----

cdef object _int_arg(object v, str name, long lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise OptionTypeError(f"{name}: expected an integer, got {type(v).__name__}")
    v = int(v)
    if v < lo:
        raise OptionError(f"{name}: must be >= {lo}, got {v}")
    if v > 2147483647:
        raise OptionError(f"{name}: {v} is too large")
    return v


cdef double _float_arg(object v, str name) except? -1.0:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise OptionTypeError(f"{name}: expected a number, got {type(v).__name__}")
    cdef double d = float(v)
    if not isfinite(d):
        raise OptionError(f"{name}: must be finite, got {d}")
    return d


cdef class Sampler:
    """Turns logits into token ids; configured once, called every step.

    Sampler(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
            min_tokens_to_keep=1, repetition_penalty=None,
            repetition_context_size=20, presence_penalty=None,
            presence_context_size=20, frequency_penalty=None,
            frequency_context_size=20, logit_bias=None, seed=None)

    temperature 0 means greedy (argmax).  top_k 0, top_p 1 and min_p 0 turn
    those filters off.  The sampler owns an MLX random key that it splits at
    every draw, so the same seed gives the same tokens; with seed=None the
    key is drawn from MLX's global key sequence when the sampler is made (or
    reset), so mlxcy.random.seed() before construction also reproduces.

    sampler(logits, history=None) -> int32 Array of shape logits.shape[:-1]
    (lazy).  logits: [V] or [B, V] (any leading dims); history: token ids
    [T] shared by all rows, or one row per logits row ([B, T]).
    """

    def __cinit__(self):
        self.key = NULL
        self.bias_idx = NULL
        self.bias_val = NULL
        self.bias_max = -1

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 min_tokens_to_keep=1, repetition_penalty=None,
                 repetition_context_size=20, presence_penalty=None,
                 presence_context_size=20, frequency_penalty=None,
                 frequency_context_size=20, logit_bias=None, seed=None):
        self.temperature = _float_arg(temperature, "temperature")
        if self.temperature < 0:
            raise OptionError(f"temperature: must be >= 0, got {temperature}")
        self.top_k = _int_arg(top_k, "top_k", 0)
        if top_p is None:
            top_p = 1.0
        self.top_p = _float_arg(top_p, "top_p")
        if not (0.0 < self.top_p <= 1.0):
            raise OptionError(f"top_p: must be in (0, 1], got {top_p}")
        if min_p is None:
            min_p = 0.0
        self.min_p = _float_arg(min_p, "min_p")
        if not (0.0 <= self.min_p <= 1.0):
            raise OptionError(f"min_p: must be in [0, 1], got {min_p}")
        self.min_tokens_to_keep = _int_arg(min_tokens_to_keep, "min_tokens_to_keep", 1)
        if repetition_penalty is None:
            repetition_penalty = 1.0
        self.repetition_penalty = _float_arg(repetition_penalty, "repetition_penalty")
        if self.repetition_penalty <= 0:
            raise OptionError(f"repetition_penalty: must be > 0, got {repetition_penalty}")
        self.presence_penalty = _float_arg(presence_penalty or 0.0, "presence_penalty")
        self.frequency_penalty = _float_arg(frequency_penalty or 0.0, "frequency_penalty")
        self.repetition_context_size = _int_arg(repetition_context_size,
                                                "repetition_context_size", 1)
        self.presence_context_size = _int_arg(presence_context_size,
                                              "presence_context_size", 1)
        self.frequency_context_size = _int_arg(frequency_context_size,
                                               "frequency_context_size", 1)
        self._set_bias(logit_bias)
        self.reset(seed)

    def _set_bias(self, logit_bias):
        if logit_bias is None:
            logit_bias = {}
        if not isinstance(logit_bias, dict):
            raise OptionTypeError(f"logit_bias: expected a dict {{token_id: bias}}, "
                            f"got {type(logit_bias).__name__}")
        bias = {}
        for k, v in logit_bias.items():
            tok = _int_arg(k, "logit_bias key", 0)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise OptionTypeError(f"logit_bias[{k}]: expected a number, got {type(v).__name__}")
            if isnan(float(v)):
                raise OptionError(f"logit_bias[{k}]: is NaN")
            bias[tok] = float(v)
        self._bias = bias
        if bias:
            idx = to_array(np.array([list(bias.keys())], np.int32))
            val = to_array(np.array([list(bias.values())], np.float32))
            self.bias_idx = new na.array(handle(idx)[0])
            self.bias_val = new na.array(handle(val)[0])
            self.bias_max = max(bias)

    def reset(self, seed=None):
        """Restart the random stream from `seed` (or from the seed given at
        construction when None).  seed=None at construction and here: a new
        key from MLX's global key sequence."""
        if seed is None:
            seed = self.seed
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
                raise OptionTypeError(f"seed: expected an integer, got {type(seed).__name__}")
            seed = int(seed)
            if not (0 <= seed < 2 ** 64):
                raise OptionError(f"seed: must be in [0, 2**64), got {seed}")
        cdef na.array* k
        if seed is not None:
            k = heap(nsm.key(<unsigned long long>seed))
        else:
            k = heap(nsm.key_from_global())
        if self.key != NULL:
            del self.key
        self.key = k
        self.seed = seed

    def __dealloc__(self):
        if self.key != NULL:
            del self.key
        if self.bias_idx != NULL:
            del self.bias_idx
        if self.bias_val != NULL:
            del self.bias_val

    @property
    def logit_bias(self):
        return dict(self._bias)

    @property
    def greedy(self):
        return self.temperature == 0.0

    def __repr__(self):
        parts = [f"temperature={self.temperature}"]
        if self.top_k: parts.append(f"top_k={self.top_k}")
        if self.top_p < 1: parts.append(f"top_p={self.top_p}")
        if self.min_p > 0: parts.append(f"min_p={self.min_p}")
        if self.repetition_penalty != 1: parts.append(f"repetition_penalty={self.repetition_penalty}")
        if self.presence_penalty: parts.append(f"presence_penalty={self.presence_penalty}")
        if self.frequency_penalty: parts.append(f"frequency_penalty={self.frequency_penalty}")
        if self._bias: parts.append(f"logit_bias={self._bias}")
        if self.seed is not None: parts.append(f"seed={self.seed}")
        return "Sampler(" + ", ".join(parts) + ")"

    # -- native API -------------------------------------------------------------

    cdef na.array* process(self, const na.array& logits, const na.array* history) except NULL:
        _check_logits(logits, "logits")
        cdef int nd = logits.ndim(), V = _last(logits), N = 1, i
        for i in range(nd - 1):
            N *= logits.shape(i)
        cdef bint rep = self.repetition_penalty != 1.0
        cdef bint pres = self.presence_penalty != 0.0
        cdef bint freq = self.frequency_penalty != 0.0
        cdef bint pen = history != NULL and (rep or pres or freq)
        if self.bias_idx == NULL and not pen:
            return new na.array(logits)
        cdef na.Dtype dt = logits.dtype()
        cdef na.array x = nsm.reshape(logits, _shape2(N, V))
        cdef int n
        if self.bias_idx != NULL:
            if self.bias_max >= V:
                raise ValueError(f"logit_bias: token id {self.bias_max} is out of range "
                                 f"for a vocabulary of {V}")
            n = self.bias_idx.shape(1)
            x = nsm.scatter_add_axis(
                x, nsm.broadcast_to(self.bias_idx[0], _shape2(N, n)),
                nsm.astype(nsm.broadcast_to(self.bias_val[0], _shape2(N, n)), dt), 1)
        cdef na.array* p
        cdef na.array h, c_rep, c_pres, c_freq, seen
        if pen:
            p = _history_rows(history[0], logits, N)
            h = p[0]
            del p
            if h.shape(1) > 0:
                if rep:
                    p = _counts(h, self.repetition_context_size, V, dt)
                    c_rep = p[0]
                    del p
                    seen = nsm.greater(c_rep, na.array(0.0, dt))
                    x = nsm.where(seen,
                                  nsm.where(nsm.less(x, na.array(0.0, dt)),
                                            nsm.multiply(x, na.array(self.repetition_penalty, dt)),
                                            nsm.divide(x, na.array(self.repetition_penalty, dt))),
                                  x)
                if pres:
                    if rep and self.presence_context_size == self.repetition_context_size:
                        c_pres = c_rep
                    else:
                        p = _counts(h, self.presence_context_size, V, dt)
                        c_pres = p[0]
                        del p
                    seen = nsm.greater(c_pres, na.array(0.0, dt))
                    x = nsm.where(seen, nsm.subtract(x, na.array(self.presence_penalty, dt)), x)
                if freq:
                    if rep and self.frequency_context_size == self.repetition_context_size:
                        c_freq = c_rep
                    elif pres and self.frequency_context_size == self.presence_context_size:
                        c_freq = c_pres
                    else:
                        p = _counts(h, self.frequency_context_size, V, dt)
                        c_freq = p[0]
                        del p
                    x = nsm.subtract(x, nsm.multiply(c_freq, na.array(self.frequency_penalty, dt)))
        if nd == 2:
            return new na.array(x)
        return heap(nsm.reshape(x, logits.shape()))

    cdef na.array* draw(self, const na.array& logits) except NULL:
        _check_logits(logits, "logits")
        if self.temperature == 0.0:
            return heap(nsm.astype(nsm.argmax(logits, -1, False), na.int32))
        if 0 < self.top_k < _last(logits):
            return self._draw_top_k(logits)
        cdef na.array x = logits
        cdef na.array* p
        if self.top_p < 1.0:
            p = top_p_filter(x, self.top_p)
            x = p[0]
            del p
        if self.min_p > 0.0:
            p = min_p_filter(x, self.min_p, self.min_tokens_to_keep)
            x = p[0]
            del p
        return heap(nsm.astype(nsm.categorical_step(x, 1.0 / self.temperature, self.key),
                               na.int32))

    cdef na.array* _draw_top_k(self, const na.array& logits) except NULL:
        """top-k active: filter and draw over the k best entries only (what
        survives top-k is a subset of them), then map back to token ids.
        Top-p still measures mass against the whole row."""
        cdef int k = self.top_k, nd = logits.ndim(), i
        cdef na.array idx = nsm.slice(nsm.argpartition(nsm.negative(logits), k - 1, -1),
                                      _cols_start(logits, 0), _cols_stop(logits, k))
        cdef na.array vals = nsm.take_along_axis(logits, idx, -1)
        cdef na.array m, total
        cdef na.array* p
        if self.top_p < 1.0:
            m = nsm.astype(nsm.max(vals, -1, True), na.float32)
            total = nsm.sum(nsm.exp(nsm.subtract(nsm.astype(logits, na.float32), m)), -1, True)
            p = _top_p(vals, self.top_p, &total)
            vals = p[0]
            del p
        if self.min_p > 0.0:
            p = min_p_filter(vals, self.min_p, self.min_tokens_to_keep)
            vals = p[0]
            del p
        cdef na.Shape lead = na.Shape(), lead1 = na.Shape()
        for i in range(nd - 1):
            lead.push_back(logits.shape(i))
            lead1.push_back(logits.shape(i))
        lead1.push_back(1)
        cdef na.array pos = nsm.reshape(nsm.astype(nsm.categorical_step(vals, 1.0 / self.temperature, self.key),
                                                   na.int32), lead1)
        return heap(nsm.astype(nsm.reshape(nsm.take_along_axis(idx, pos, -1), lead), na.int32))

    cdef na.array* sample(self, const na.array& logits, const na.array* history) except NULL:
        cdef na.array* p = self.process(logits, history)
        cdef na.array x = p[0]
        del p
        return self.draw(x)

    # -- Python API ---------------------------------------------------------------

    def __call__(self, logits, history=None):
        """Token ids (int32, shape logits.shape[:-1]) for `logits`, lazily."""
        cdef Array l = _as_array(logits, "logits")
        cdef Array h = None if history is None else _as_array(history, "history")
        return wrap(self.sample(l.ptr[0], _ptr_or_null(h)))

    def process_logits(self, logits, history=None):
        """The logits after logit bias and penalties (no filtering or draw)."""
        cdef Array l = _as_array(logits, "logits")
        cdef Array h = None if history is None else _as_array(history, "history")
        return wrap(self.process(l.ptr[0], _ptr_or_null(h)))


cdef inline na.array* _ptr_or_null(Array a) noexcept:
    if a is None:
        return NULL
    return a.ptr


cdef Array _as_array(object x, str name):
    if type(x) is Array:
        handle(<Array>x)
        return <Array>x
    try:
        return to_array(x)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None


# ------------------------------------------------------- pure functions ----

def apply_top_k(logprobs, k):
    """Keep the k largest entries along the last axis (ties with the k-th
    are kept); the rest become -inf.  k == 0 or k >= V: unchanged."""
    cdef Array x = _as_array(logprobs, "logprobs")
    _check_logits(x.ptr[0], "logprobs")
    cdef int kk = _int_arg(k, "k", 0)
    return wrap(top_k_filter(x.ptr[0], kk))


def apply_top_p(logprobs, p):
    """Keep the smallest set of most likely entries whose probability mass
    (softmax along the last axis) is >= p; the rest become -inf."""
    cdef Array x = _as_array(logprobs, "logprobs")
    _check_logits(x.ptr[0], "logprobs")
    cdef double pp = _float_arg(p, "p")
    if not (0.0 < pp <= 1.0):
        raise OptionError(f"p: must be in (0, 1], got {p}")
    return wrap(top_p_filter(x.ptr[0], pp))


def apply_min_p(logprobs, min_p, min_tokens_to_keep=1):
    """Keep entries whose probability is >= min_p times the largest one (and
    at least `min_tokens_to_keep` entries); the rest become -inf."""
    cdef Array x = _as_array(logprobs, "logprobs")
    _check_logits(x.ptr[0], "logprobs")
    cdef double mp = _float_arg(min_p, "min_p")
    if not (0.0 <= mp <= 1.0):
        raise OptionError(f"min_p: must be in [0, 1], got {min_p}")
    cdef int keep = _int_arg(min_tokens_to_keep, "min_tokens_to_keep", 1)
    return wrap(min_p_filter(x.ptr[0], mp, keep))


def apply_penalties(logits, history=None, repetition_penalty=None,
                    repetition_context_size=20, presence_penalty=None,
                    presence_context_size=20, frequency_penalty=None,
                    frequency_context_size=20, logit_bias=None):
    """Logits after logit bias, then repetition, presence and frequency
    penalties over the recent `history` ([T] or one row per logits row)."""
    cdef Sampler s = Sampler(
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size,
        presence_penalty=presence_penalty, presence_context_size=presence_context_size,
        frequency_penalty=frequency_penalty,
        frequency_context_size=frequency_context_size, logit_bias=logit_bias)
    return s.process_logits(logits, history)
