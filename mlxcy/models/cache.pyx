# cython: language_level=3, cpp_locals=True
"""KV caches: KVCache (grows in steps, written in place with slice_update),
QuantizedKVCache (the same, holding MLX's affine quantization of the keys and
values), and RotatingKVCache (keeps the last `window` positions, for
sliding-window layers), plus Cache, the per-model list of layer caches."""
from libcpp.vector cimport vector

from mlxcy.native cimport array as na
from mlxcy.native cimport nn as nnn
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap, shape4 as _shape4
from mlxcy.core cimport Array, wrap, handle
from mlxcy.tuning cimport Tuning, current


# Every cache buffer holds `cache_pad` positions more than it needs (8 by
# default; mlxcy.tuning says why: MLX's CUDA backend then attends one-token
# queries with its vector kernel instead of cuDNN's).  With the default step of
# 256 a buffer's length stays 8 past a multiple of 256.
cdef Tuning* _tuning = current()


cdef inline void _set(na.array** slot, na.array* p) noexcept:
    if slot[0] != NULL:
        del slot[0]
    slot[0] = p


cdef int _check(na.array* buf, const na.array& k, const na.array& v) except -1:
    if k.ndim() != 4 or v.ndim() != 4:
        raise ValueError("KV cache: keys and values must be [B, heads, T, head_dim]")
    if buf != NULL and (buf.shape(0) != k.shape(0) or buf.shape(1) != k.shape(1)
                        or buf.shape(3) != k.shape(3)):
        raise ValueError(
            f"KV cache: new keys of shape B={k.shape(0)}, heads={k.shape(1)}, "
            f"head_dim={k.shape(3)} do not match the cached B={buf.shape(0)}, "
            f"heads={buf.shape(1)}, head_dim={buf.shape(3)}")
    return 0


cdef class LayerCache:
    """Base of the layer caches (not used directly)."""

    def __dealloc__(self):
        _set(&self.keys, NULL)
        _set(&self.values, NULL)
        _set(&self.out_k, NULL)
        _set(&self.out_v, NULL)

    cpdef free(self):
        """Drop every held array; the cache is empty afterwards (offset 0)."""
        _set(&self.keys, NULL)
        _set(&self.values, NULL)
        _set(&self.out_k, NULL)
        _set(&self.out_v, NULL)
        self.offset = 0

    cdef int update(self, const na.array& k, const na.array& v, bint ordered) except -1:
        raise NotImplementedError

    cpdef trim(self, int n):
        raise NotImplementedError

    cpdef long long nbytes(self):
        cdef long long n = 0
        if self.keys != NULL:
            n += self.keys.nbytes()
        if self.values != NULL:
            n += self.values.nbytes()
        return n

    def state(self):
        """The layer's buffers and counters, for saving: {"keys": Array or
        None, "values": ..., "offset": int, "filled": int, "idx": int}."""
        out = {"offset": self.offset, "filled": 0, "idx": 0, "keys": None, "values": None}
        if self.keys != NULL:
            out["keys"] = wrap(new na.array(self.keys[0]))
            out["values"] = wrap(new na.array(self.values[0]))
        if isinstance(self, RotatingKVCache):
            out["filled"] = (<RotatingKVCache>self).filled
            out["idx"] = (<RotatingKVCache>self).idx
        return out

    def set_state(self, keys, values, int offset, int filled=0, int idx=0):
        """Restore what state() returned (keys/values as Arrays, or None)."""
        self.free()
        if keys is not None:
            _set(&self.keys, new na.array(handle(<Array?>keys)[0]))
            _set(&self.values, new na.array(handle(<Array?>values)[0]))
            if self.keys.ndim() != 4 or self.values.ndim() != 4:
                self.free()
                raise ValueError("set_state: keys and values must be [B, heads, T, head_dim]")
        self.offset = offset
        if isinstance(self, RotatingKVCache):
            (<RotatingKVCache>self).filled = filled
            (<RotatingKVCache>self).idx = idx

    def update_and_fetch(self, keys, values, bint ordered=True):
        """Append L new positions (keys and values: Arrays [B, heads, L,
        head_dim], already rotated) and return (keys, values) to attend over,
        as a model's attention does: every held position, oldest first.  A full
        RotatingKVCache given one position with ordered=False returns its ring
        as stored (any order does for attention over the whole window)."""
        cdef Array k = <Array?>keys, v = <Array?>values
        if k.shape != v.shape:
            raise ValueError(f"update_and_fetch: keys {k.shape} and values {v.shape} differ "
                             f"in shape")
        self.update(handle(k)[0], handle(v)[0], ordered)
        out = (wrap(new na.array(self.out_k[0])), wrap(new na.array(self.out_v[0])))
        self.drop_outputs()
        return out

    cdef void drop_outputs(self) noexcept:
        """Drop the keys/values handed to attention by the last update (so
        the next slice_update may write the buffer in place)."""
        _set(&self.out_k, NULL)
        _set(&self.out_v, NULL)


cdef class KVCache(LayerCache):
    """Keys/values of every position, preallocated `step` positions at a time."""

    def __init__(self, int step=256):
        if step <= 0:
            raise ValueError("KVCache: step must be positive")
        self.step = step
        self.window = 0

    def __repr__(self):
        return f"KVCache(offset={self.offset})"

    cdef int update(self, const na.array& k, const na.array& v, bint ordered) except -1:
        _check(self.keys, k, v)
        cdef int L = k.shape(2), prev = self.offset
        cdef int cap = 0 if self.keys == NULL else self.keys.shape(2)
        cdef int need
        if self.keys != NULL and not nnn.same_dtype(self.keys[0], k):
            raise ValueError("KVCache: new keys' dtype differs from the cached keys'")
        if prev + L > cap:
            need = ((prev + L - cap + self.step - 1) // self.step) * self.step
            if self.keys == NULL:
                need += _tuning.cache_pad     # later growth adds whole steps
                _set(&self.keys, heap(nnn.zeros4(k.shape(0), k.shape(1), need, k.shape(3), k.dtype())))
                _set(&self.values, heap(nnn.zeros4(v.shape(0), v.shape(1), need, v.shape(3), v.dtype())))
            else:
                _set(&self.keys, heap(nnn.grow_t(self.keys[0], prev, cap - prev + need)))
                _set(&self.values, heap(nnn.grow_t(self.values[0], prev, cap - prev + need)))
        _set(&self.keys, heap(nnn.write_t(self.keys[0], k, prev)))
        _set(&self.values, heap(nnn.write_t(self.values[0], v, prev)))
        self.offset = prev + L
        _set(&self.out_k, heap(nnn.slice_t(self.keys[0], 0, self.offset)))
        _set(&self.out_v, heap(nnn.slice_t(self.values[0], 0, self.offset)))
        self.out_start = 0
        return 0

    cpdef trim(self, int n):
        """Forget the last n positions (at most offset); returns how many."""
        if n < 0:
            raise ValueError("trim: n must be >= 0")
        n = min(n, self.offset)
        self.offset -= n
        return n


KV_BITS = (2, 3, 4, 5, 6, 8)          # MLX's affine quantization
KV_GROUP_SIZES = (32, 64, 128)


def check_kv_options(kv_bits, kv_group_size=64):
    """Raise ValueError naming the option unless (kv_bits, kv_group_size) is
    None/anything or a width and group size MLX's quantization supports."""
    if kv_bits is None:
        return
    if isinstance(kv_bits, bool) or kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (or None), "
                         f"got {kv_bits!r}")
    if isinstance(kv_group_size, bool) or kv_group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of "
                         f"{', '.join(map(str, KV_GROUP_SIZES))}, got {kv_group_size!r}")


cdef class QuantizedKVCache(KVCache):
    """A KVCache whose buffers hold MLX's affine quantization of the keys and
    values (`bits` per element, a float32 scale and bias per `group_size`
    elements of head_dim); attention gets them dequantized to the model's dtype.

    Each position's row of a buffer is one uint32 vector: the packed values
    (head_dim * bits / 32 words), then the scales and the biases (float32,
    bit-cast: head_dim / group_size words each).  Being a single array along
    the time axis, the buffers are grown, written, sliced, padded, joined and
    row-selected exactly as a float KVCache's (the engine's batch merging and
    cache saving need nothing else).  SmolLM2's head_dim 64, 8-bit, group 64:
    18 words (72 bytes) a position and head against 128 in bfloat16."""
    cdef readonly int bits, group_size
    cdef int head_dim, dtype_code

    def __init__(self, int bits=8, int group_size=64, int step=256):
        check_kv_options(bits, group_size)
        KVCache.__init__(self, step)
        self.bits, self.group_size = bits, group_size
        self.head_dim = 0
        self.dtype_code = -1

    def __repr__(self):
        return f"QuantizedKVCache(bits={self.bits}, offset={self.offset})"

    cdef na.array* _pack(self, const na.array& x) except NULL:
        cdef vector[na.array] q = nops.quantize_(x, self.group_size, self.bits, b"affine")
        cdef vector[na.array] parts = vector[na.array]()
        parts.push_back(q[0])
        parts.push_back(nops.view(nnn.astype(q[1], na.float32), na.uint32))
        parts.push_back(nops.view(nnn.astype(q[2], na.float32), na.uint32))
        return heap(nnn.concatenate(parts, 3))

    cdef na.array* _unpack(self, const na.array& buf) except NULL:
        cdef int D = self.head_dim, nw = D * self.bits // 32, ng = D // self.group_size
        cdef int B = buf.shape(0), H = buf.shape(1), T = buf.shape(2)
        cdef na.array w = nops.slice(buf, _shape4(0, 0, 0, 0), _shape4(B, H, T, nw))
        cdef na.array sc = nops.view(nops.slice(buf, _shape4(0, 0, 0, nw),
                                                _shape4(B, H, T, nw + ng)), na.float32)
        cdef na.array bi = nops.view(nops.slice(buf, _shape4(0, 0, 0, nw + ng),
                                                _shape4(B, H, T, nw + 2 * ng)), na.float32)
        return heap(nnn.astype(nops.dequantize_(w, sc, &bi, self.group_size, self.bits, b"affine", -1),
                               na.dtype_from_code(self.dtype_code)))

    cdef int update(self, const na.array& k, const na.array& v, bint ordered) except -1:
        if k.ndim() != 4 or v.ndim() != 4:
            raise ValueError("KV cache: keys and values must be [B, heads, T, head_dim]")
        cdef int D = k.shape(3)
        if self.head_dim == 0:
            if D % self.group_size or D * self.bits % 32:
                raise ValueError(f"kv_group_size {self.group_size}: the head dimension {D} "
                                 f"must be a multiple of it (and of 32 / kv_bits) to "
                                 f"quantize the KV cache")
            self.head_dim = D
            self.dtype_code = na.dtype_code(k.dtype())
        elif D != self.head_dim:
            raise ValueError(f"QuantizedKVCache: head_dim {D} differs from the cached "
                             f"{self.head_dim}")
        cdef na.array pk = nnn.own(self._pack(k))
        cdef na.array pv = nnn.own(self._pack(v))
        KVCache.update(self, pk, pv, ordered)
        _set(&self.out_k, self._unpack(self.out_k[0]))
        _set(&self.out_v, self._unpack(self.out_v[0]))
        return 0

    def dequantized(self):
        """(keys, values) of the held positions, dequantized: [B, H, offset, D]."""
        if self.keys == NULL or self.offset == 0:
            return None
        if self.head_dim == 0:      # restored by set_state(): the dtype is known after an update
            raise ValueError("QuantizedKVCache.dequantized: no update since set_state(); the "
                             "keys' dtype is set by the next update")
        return (wrap(self._unpack(nnn.slice_t(self.keys[0], 0, self.offset))),
                wrap(self._unpack(nnn.slice_t(self.values[0], 0, self.offset))))


def empty_like(Cache cache):
    """An empty cache with the same kind of layer caches as `cache`."""
    out = []
    for c in cache.layers:
        if isinstance(c, QuantizedKVCache):
            out.append(QuantizedKVCache((<QuantizedKVCache>c).bits,
                                        (<QuantizedKVCache>c).group_size, (<LayerCache>c).step))
        elif isinstance(c, RotatingKVCache):
            out.append(RotatingKVCache((<LayerCache>c).window, (<LayerCache>c).step))
        else:
            out.append(KVCache((<LayerCache>c).step))
    return Cache(out)


def kv_quantization(Cache cache):
    """(bits, group_size) of the cache's quantized layers, or None."""
    for c in cache.layers:
        if isinstance(c, QuantizedKVCache):
            return ((<QuantizedKVCache>c).bits, (<QuantizedKVCache>c).group_size)
    return None


def quantized_cache(Cache cache, kv_bits, int kv_group_size=64):
    """`cache` (empty, from model.make_cache()) with its unbounded layers made
    QuantizedKVCache(kv_bits, kv_group_size); sliding-window (rotating) layers
    stay float.  kv_bits None: `cache` unchanged."""
    check_kv_options(kv_bits, kv_group_size)
    if kv_bits is None:
        return cache
    if cache.offset:
        raise ValueError("quantized_cache: the cache already holds positions")
    return Cache([QuantizedKVCache(kv_bits, kv_group_size, (<LayerCache>c).step)
                  if (<LayerCache>c).window == 0 else c for c in cache.layers])


cdef class RotatingKVCache(LayerCache):
    """Keeps the last `window` positions in a ring written in place."""

    def __init__(self, int window, int step=256):
        if window <= 0:
            raise ValueError("RotatingKVCache: window must be positive")
        self.window = window
        self.step = step

    def __repr__(self):
        return f"RotatingKVCache(window={self.window}, offset={self.offset})"

    cpdef free(self):
        LayerCache.free(self)
        self.filled = 0
        self.idx = 0

    cdef void _store_ordered(self, const na.array& k, const na.array& v, int keep) except *:
        """Keep the last `keep` positions of temporally ordered k/v."""
        cdef int T = k.shape(2), pad = _tuning.cache_pad
        if pad > 0:     # the copy with the spare positions
            _set(&self.keys, heap(nnn.grow_t(nnn.slice_t(k, T - keep, T), keep, pad)))
            _set(&self.values, heap(nnn.grow_t(nnn.slice_t(v, T - keep, T), keep, pad)))
        else:
            _set(&self.keys, heap(nnn.contiguous(nnn.slice_t(k, T - keep, T), False)))
            _set(&self.values, heap(nnn.contiguous(nnn.slice_t(v, T - keep, T), False)))
        self.filled = keep
        self.idx = 0 if keep == self.window else keep

    cdef int update(self, const na.array& k, const na.array& v, bint ordered) except -1:
        _check(self.keys, k, v)
        cdef int L = k.shape(2), W = self.window, cap, extra, nprev
        if self.keys != NULL and not nnn.same_dtype(self.keys[0], k):
            raise ValueError("RotatingKVCache: new keys' dtype differs from the cached keys'")
        if L == 1:
            cap = 0 if self.keys == NULL else self.keys.shape(2)   # pad slots included: the ring uses [0, W)
            if self.filled < W and self.filled == cap:
                extra = min(W - cap, self.step) + _tuning.cache_pad
                if self.keys == NULL:
                    _set(&self.keys, heap(nnn.zeros4(k.shape(0), k.shape(1), extra, k.shape(3), k.dtype())))
                    _set(&self.values, heap(nnn.zeros4(v.shape(0), v.shape(1), extra, v.shape(3), v.dtype())))
                else:
                    _set(&self.keys, heap(nnn.grow_t(self.keys[0], cap, extra)))
                    _set(&self.values, heap(nnn.grow_t(self.values[0], cap, extra)))
            _set(&self.keys, heap(nnn.write_t(self.keys[0], k, self.idx)))
            _set(&self.values, heap(nnn.write_t(self.values[0], v, self.idx)))
            self.offset += 1
            if self.filled < W:
                self.filled += 1
            self.idx = (self.idx + 1) % W
            if self.filled < W:
                _set(&self.out_k, heap(nnn.slice_t(self.keys[0], 0, self.filled)))
                _set(&self.out_v, heap(nnn.slice_t(self.values[0], 0, self.filled)))
                self.out_start = self.offset - self.filled
            elif self.idx == 0 or not ordered:
                _set(&self.out_k, heap(nnn.slice_t(self.keys[0], 0, W)))
                _set(&self.out_v, heap(nnn.slice_t(self.values[0], 0, W)))
                self.out_start = self.offset - W if self.idx == 0 else -1
            else:
                _set(&self.out_k, heap(nnn.unroll_t(nnn.slice_t(self.keys[0], 0, W), self.idx)))
                _set(&self.out_v, heap(nnn.unroll_t(nnn.slice_t(self.values[0], 0, W), self.idx)))
                self.out_start = self.offset - W
            return 0
        # Several positions: attend over (held, in temporal order) + new.
        nprev = self.filled
        if self.keys == NULL or nprev == 0:
            _set(&self.out_k, new na.array(k))
            _set(&self.out_v, new na.array(v))
        else:
            if self.filled < W:
                _set(&self.out_k, heap(nnn.cat_t(nnn.slice_t(self.keys[0], 0, nprev), k)))
                _set(&self.out_v, heap(nnn.cat_t(nnn.slice_t(self.values[0], 0, nprev), v)))
            else:
                _set(&self.out_k, heap(nnn.cat_t(nnn.unroll_t(nnn.slice_t(self.keys[0], 0, W),
                                                              self.idx), k)))
                _set(&self.out_v, heap(nnn.cat_t(nnn.unroll_t(nnn.slice_t(self.values[0], 0, W),
                                                              self.idx), v)))
        self.out_start = self.offset - nprev
        self.offset += L
        self._store_ordered(self.out_k[0], self.out_v[0], min(W, nprev + L))
        return 0

    cpdef trim(self, int n):
        """Forget the last n positions; only before the ring dropped any."""
        if n < 0:
            raise ValueError("trim: n must be >= 0")
        n = min(n, self.offset)
        if n == 0:
            return 0
        if self.filled != self.offset:
            raise ValueError("RotatingKVCache: cannot trim after positions left the window")
        self.offset -= n
        self.filled -= n
        self.idx = self.filled % self.window
        return n


cdef class Cache:
    """The KV caches of one model, one per layer (model.make_cache())."""

    def __init__(self, layers):
        self.layers = list(layers)
        for c in self.layers:
            if not isinstance(c, LayerCache):
                raise TypeError("Cache: every layer cache must be a KVCache or RotatingKVCache")

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        return f"Cache(layers={len(self.layers)}, offset={self.offset})"

    @property
    def offset(self):
        return (<LayerCache>self.layers[0]).offset if self.layers else 0

    def trim(self, int n):
        """Forget the last n positions of every layer; returns how many."""
        for c in self.layers:
            if (<LayerCache>c).window and (<LayerCache>c).offset > (<LayerCache>c).window:
                if (<RotatingKVCache>c).filled != (<LayerCache>c).offset and n:
                    raise ValueError("Cache.trim: a sliding-window layer already "
                                     "dropped positions; cannot trim")
        done = 0
        for c in self.layers:
            done = (<LayerCache>c).trim(n)
        return done

    @property
    def nbytes(self):
        return sum((<LayerCache>c).nbytes() for c in self.layers)

    cpdef free(self):
        for c in self.layers:
            (<LayerCache>c).free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()
        return False
