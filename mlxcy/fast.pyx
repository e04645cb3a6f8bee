# cython: language_level=3, cpp_locals=True
"""Fused kernels (mirrors mlx.core.fast): normalisations, rotary position
embeddings and scaled dot-product attention.

Each function builds one MLX op; MLX validates shapes and dtypes and its
messages surface as ValueError.
"""
from operator import index as _index

from libcpp.string cimport string

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport fast as nf
from mlxcy.native.array cimport heap


cdef Array _arr(object x, str name):
    """x as an Array: Arrays pass through (checked not freed), else converted;
    a failed conversion names the argument `name`."""
    if type(x) is Array:
        handle(<Array>x)
        return <Array>x
    try:
        return to_array(x)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None


cdef inline Array _opt(object x, str name):
    """Like _arr, but None stays None (an absent optional argument)."""
    return None if x is None else _arr(x, name)


cdef inline na.array* _ptr(Array a):
    """Native pointer of an Array from _opt, NULL when absent.  The caller
    keeps `a` alive while the pointer is in use."""
    if a is None:
        return NULL
    return a.ptr


def rms_norm(x, weight, eps=1e-5):
    """x / sqrt(mean(x**2, axis=-1) + eps) * weight, over the last axis.

    weight (shape (x.shape[-1],)) may be None for no scaling."""
    cdef Array a = _arr(x, "x")
    cdef Array w = _opt(weight, "weight")
    return wrap(heap(nf.rms_norm(a.ptr[0], _ptr(w), <float>eps)))


def layer_norm(x, weight, bias, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis; weight
    and bias may each be None."""
    cdef Array a = _arr(x, "x")
    cdef Array w = _opt(weight, "weight")
    cdef Array b = _opt(bias, "bias")
    return wrap(heap(nf.layer_norm(a.ptr[0], _ptr(w), _ptr(b), <float>eps)))


cdef bint _is_int(object x):
    if isinstance(x, bool):
        return False
    try:
        _index(x)
    except TypeError:
        return False
    return not hasattr(x, "shape") or x.shape == ()


def rope(x, int dims, *, bint traditional, base, float scale, offset, freqs=None):
    """Rotary position embedding of the first `dims` features of x's last axis;
    positions run along the second-to-last axis starting at `offset`.

    traditional=True rotates interleaved pairs (x[2i], x[2i+1]); False rotates
    the two halves (x[i], x[i + dims/2]).  The angle of pair i at position p is
    (offset + p) * scale / f_i with f_i = base ** (2i/dims), or freqs[i] when
    `freqs` (shape (dims/2,)) is given, in which case base must be None.
    offset is an int or an integer array of shape () or (x.shape[0],) (one
    offset per batch entry)."""
    if (base is None) == (freqs is None):
        raise ValueError("rope: give exactly one of base and freqs")
    if base is not None and not base > 0:
        raise ValueError(f"rope: base must be positive, got {base!r}")
    cdef float b = 0.0 if base is None else base      # 0: "use freqs" in the shim
    cdef Array a = _arr(x, "x")
    cdef Array f = _opt(freqs, "freqs")
    cdef Array off
    if _is_int(offset):
        o = _index(offset)
        if not -2147483648 <= o <= 2147483647:
            raise ValueError(f"rope: offset {o} does not fit in int32")
        return wrap(heap(nf.rope(a.ptr[0], dims, traditional, b, scale, <int>o, _ptr(f))))
    if offset is None or isinstance(offset, bool):
        raise TypeError(f"rope: offset must be an int or an integer array, got {offset!r}")
    off = _arr(offset, "offset")
    return wrap(heap(nf.rope_offsets(a.ptr[0], dims, traditional, b, scale, off.ptr[0],
                                     _ptr(f))))


def scaled_dot_product_attention(q, k, v, *, float scale, mask=None, sinks=None):
    """softmax(q @ k^T * scale + mask) @ v.

    q: (B, Hq, Lq, D); k: (B, Hkv, Lk, D); v: (B, Hkv, Lk, Dv), with Hq a
    multiple of Hkv (grouped-query attention).  mask is None, "causal" (query i
    sees keys up to i + Lk - Lq, so queries are the last positions), an
    additive array or a boolean array (True = attend), broadcasting to
    (B, Hq, Lq, Lk).  sinks (shape (Hq,)) are per-head logits of an extra key
    that takes part in the softmax but contributes no value."""
    cdef Array qa = _arr(q, "q"), ka = _arr(k, "k"), va = _arr(v, "v")
    cdef Array m = None
    cdef Array s = _opt(sinks, "sinks")
    cdef string mode = b""
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"scaled_dot_product_attention: mask must be None, "
                             f"'causal' or an array, got {mask!r}")
        mode = b"causal"
    elif mask is not None:
        m = _arr(mask, "mask")
    return wrap(heap(nf.sdpa(qa.ptr[0], ka.ptr[0], va.ptr[0], scale, mode, _ptr(m),
                             _ptr(s))))
