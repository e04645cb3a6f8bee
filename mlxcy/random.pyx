# cython: language_level=3, cpp_locals=True
"""Random number generation (mirrors mlx.core.random).

Every sampler takes an optional `key` (a uint32 array of shape (2,), from
`key()` or `split()`).  With a key the result depends on the key alone; without
one, MLX's global key sequence is advanced (reseed it with `seed()`).
"""
from operator import index as _index

from libc.stdint cimport uint64_t

from mlxcy.core cimport Array, wrap, handle, to_array, as_dtype, Dtype
from mlxcy.native cimport array as na
from mlxcy.native cimport random as nr
from mlxcy.native.array cimport heap

cdef uint64_t _U64_MAX = 0xFFFFFFFFFFFFFFFF


# ------------------------------------------------------------ helpers -------

cdef uint64_t _seed_value(object s, str fn) except? 0:
    """A Python integer in [0, 2**64) as uint64, with an error naming `seed`."""
    try:
        v = _index(s)
    except TypeError:
        raise TypeError(f"{fn}: seed must be an integer, got {type(s).__name__}") from None
    if v < 0 or v > _U64_MAX:
        raise ValueError(f"{fn}: seed must be in [0, 2**64), got {v}")
    return <uint64_t>v


cdef na.Shape _shape(object shape, str fn) except *:
    """An int or a sequence of non-negative ints as an MLX Shape."""
    cdef na.Shape s = na.Shape()
    dims = (shape,) if not hasattr(shape, "__iter__") else shape
    for d in dims:
        try:
            n = _index(d)
        except TypeError:
            raise TypeError(f"{fn}: shape must be a sequence of integers, "
                            f"got {shape!r}") from None
        if n < 0 or n > 2147483647:
            raise ValueError(f"{fn}: shape dimensions must be in [0, 2**31), got {shape!r}")
        s.push_back(n)
    return s


cdef inline int _dtype_code(object dtype):
    return (<Dtype>as_dtype(dtype)).code


cdef Array _arr(object x, str name, object dtype=None):
    """x as an Array: Arrays pass through, anything else is converted; a failed
    conversion names the argument `name`."""
    if type(x) is Array:
        handle(<Array>x)
        return <Array>x
    try:
        return to_array(x, dtype)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


cdef inline Array _num(object x, str name, object dtype):
    """A Python number becomes an array of `dtype`; arrays pass through
    (MLX casts or checks them itself)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return to_array(x, dtype)
    return _arr(x, name)


cdef inline Array _key_or_none(object key):
    """The key as an Array, or None for the global key sequence."""
    if key is None:
        return None
    return _arr(key, "key")


cdef inline na.array* _kp(Array k):
    """Native pointer for a key from _key_or_none (NULL when absent).  The
    caller keeps `k` alive for as long as the pointer is used."""
    if k is None:
        return NULL
    return k.ptr


# ------------------------------------------------------------ keys ----------

def seed(s):
    """Seed MLX's global key sequence (used when no `key` is passed)."""
    nr.seed(_seed_value(s, "seed"))


def key(s):
    """A PRNG key (uint32 array of shape (2,)) derived from the integer seed `s`."""
    return wrap(heap(nr.key(_seed_value(s, "key"))))


def split(key, num=2):
    """Split `key` into `num` new keys: a uint32 array of shape (num, 2)."""
    n = _index(num)
    if n < 0 or n > 2147483647:
        raise ValueError(f"split: num must be a non-negative int32, got {num}")
    cdef Array k = _arr(key, "key")
    return wrap(heap(nr.split(k.ptr[0], <int>n)))


# ------------------------------------------------------------ samplers ------

def bits(shape=(), width=4, key=None):
    """Random bits: unsigned integers of `width` bytes (1, 2 or 4)."""
    if width not in (1, 2, 4):
        raise ValueError(f"bits: width must be 1, 2 or 4 bytes, got {width!r}")
    cdef na.Shape s = _shape(shape, "bits")
    cdef Array k = _key_or_none(key)
    return wrap(heap(nr.bits(s, <int>width, _kp(k))))


def uniform(low=0.0, high=1.0, shape=(), dtype="float32", key=None):
    """Uniform samples in [low, high); low and high broadcast against `shape`."""
    cdef int code = _dtype_code(dtype)
    cdef Array lo = _arr(low, "low"), hi = _arr(high, "high")
    cdef na.Shape s = _shape(shape, "uniform")
    cdef Array k = _key_or_none(key)
    return wrap(heap(nr.uniform(lo.ptr[0], hi.ptr[0], s, na.dtype_from_code(code), _kp(k))))


def normal(shape=(), dtype="float32", loc=None, scale=None, key=None):
    """Normal samples with mean `loc` (default 0) and standard deviation
    `scale` (default 1); loc and scale may be arrays broadcasting to `shape`."""
    cdef int code = _dtype_code(dtype)
    cdef na.Shape s = _shape(shape, "normal")
    # The standard values are left out so MLX skips the affine transform.
    cdef Array lo = None if _is_num(loc, 0) else _num(loc, "loc", dtype)
    cdef Array sc = None if _is_num(scale, 1) else _num(scale, "scale", dtype)
    cdef Array k = _key_or_none(key)
    return wrap(heap(nr.normal(s, na.dtype_from_code(code), _kp(lo), _kp(sc), _kp(k))))


cdef inline bint _is_num(object x, double value):
    """x is None or the Python number `value`."""
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)
                         and x == value)


def randint(low, high, shape=(), dtype="int32", key=None):
    """Integers drawn uniformly from [low, high)."""
    cdef int code = _dtype_code(dtype)
    cdef Array lo = _arr(low, "low"), hi = _arr(high, "high")
    cdef na.Shape s = _shape(shape, "randint")
    cdef Array k = _key_or_none(key)
    return wrap(heap(nr.randint(lo.ptr[0], hi.ptr[0], s, na.dtype_from_code(code), _kp(k))))


def bernoulli(p=0.5, shape=None, key=None):
    """Booleans that are True with probability `p` (shape defaults to p's)."""
    cdef Array pa = _num(p, "p", "float32")
    cdef Array k = _key_or_none(key)
    cdef na.Shape s = na.Shape()
    if shape is None:
        return wrap(heap(nr.bernoulli(pa.ptr[0], NULL, _kp(k))))
    s = _shape(shape, "bernoulli")
    return wrap(heap(nr.bernoulli(pa.ptr[0], &s, _kp(k))))


def truncated_normal(lower, upper, shape=None, dtype="float32", key=None):
    """Standard normal samples truncated to [lower, upper] (shape defaults to
    the broadcast shape of lower and upper)."""
    cdef int code = _dtype_code(dtype)
    cdef Array lo = _num(lower, "lower", dtype), hi = _num(upper, "upper", dtype)
    cdef Array k = _key_or_none(key)
    cdef na.Shape s = na.Shape()
    if shape is None:
        return wrap(heap(nr.truncated_normal(lo.ptr[0], hi.ptr[0], NULL,
                                             na.dtype_from_code(code), _kp(k))))
    s = _shape(shape, "truncated_normal")
    return wrap(heap(nr.truncated_normal(lo.ptr[0], hi.ptr[0], &s,
                                         na.dtype_from_code(code), _kp(k))))


def gumbel(shape=(), dtype="float32", key=None):
    """Samples from the standard Gumbel distribution (mean = Euler's gamma)."""
    cdef int code = _dtype_code(dtype)
    cdef na.Shape s = _shape(shape, "gumbel")
    cdef Array k = _key_or_none(key)
    return wrap(heap(nr.gumbel(s, na.dtype_from_code(code), _kp(k))))


def laplace(shape=(), dtype="float32", loc=0.0, scale=1.0, key=None):
    """Samples from the Laplace distribution with the given loc and scale."""
    cdef int code = _dtype_code(dtype)
    cdef na.Shape s = _shape(shape, "laplace")
    cdef Array k = _key_or_none(key)
    return wrap(heap(nr.laplace(s, na.dtype_from_code(code), <float>loc, <float>scale, _kp(k))))


def categorical(logits, axis=-1, shape=None, num_samples=None, key=None):
    """Sample class indices from the unnormalised log-probabilities `logits`
    along `axis`.  Give at most one of `shape` (the output shape, which must
    broadcast with logits' shape less `axis`) and `num_samples` (draws per
    distribution, appended as the last axis)."""
    if shape is not None and num_samples is not None:
        raise ValueError("categorical: give at most one of shape and num_samples")
    cdef Array lg = _arr(logits, "logits")
    cdef Array k = _key_or_none(key)
    cdef int ax = _index(axis)
    cdef na.Shape s = na.Shape()
    if num_samples is not None:
        n = _index(num_samples)
        if n < 0 or n > 2147483647:
            raise ValueError(f"categorical: num_samples must be a non-negative int32, "
                             f"got {num_samples}")
        return wrap(heap(nr.categorical_n(lg.ptr[0], ax, <int>n, _kp(k))))
    if shape is not None:
        s = _shape(shape, "categorical")
        return wrap(heap(nr.categorical_shape(lg.ptr[0], ax, s, _kp(k))))
    return wrap(heap(nr.categorical(lg.ptr[0], ax, _kp(k))))


def permutation(x, axis=0, key=None):
    """A random permutation of arange(x) for an int x, else of x's entries
    along `axis`."""
    cdef Array k = _key_or_none(key)
    cdef Array a
    if isinstance(x, int) and not isinstance(x, bool):
        if x < 0 or x > 2147483647:
            raise ValueError(f"permutation: x must be a non-negative int32, got {x}")
        return wrap(heap(nr.permutation_n(<int>x, _kp(k))))
    a = _arr(x, "x")
    return wrap(heap(nr.permutation(a.ptr[0], <int>_index(axis), _kp(k))))
