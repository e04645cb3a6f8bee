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
from mlxcy.native cimport fused as nfu
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


_ACTS = {None: 0, "silu": 1, "gelu_tanh": 2}


cdef str _gemv_args(nfu.GemvArgs* g, Array x, Array w, Array s, Array qb, int bits,
                    int group_size, Array b, Array n, float eps, Array r, object act):
    if act not in _ACTS:
        raise ValueError(f"gemv: act must be None, 'silu' or 'gelu_tanh', got {act!r}")
    if (s is None) != (bits == 0) or (qb is None) != (bits == 0):
        raise ValueError("gemv: give scales and biases exactly when bits is 4 or 8")
    g.scales, g.qbiases, g.bits, g.group_size = _ptr(s), _ptr(qb), bits, group_size
    g.bias, g.norm, g.eps, g.residual = _ptr(b), _ptr(n), eps, _ptr(r)
    g.act = _ACTS[act]
    cdef string why = string()
    if nfu.gemv_supported(x.ptr[0], w.ptr[0], g[0], &why):
        return None
    return why.decode()


def gemv(x, w, *, scales=None, biases=None, int bits=0, int group_size=64, bias=None,
         norm_weight=None, float eps=1e-5, residual=None, act=None):
    """One decode-time matrix-vector product as mlxcy's own CUDA kernel:

        y = epilogue(prologue(x) @ dequantize(w).T)

    x: [..., K] (at most gemv_max_rows() rows); w: [N, K] in x's dtype, or
    MLX's affine layout (uint32 [N, K*bits/32] with `scales` and `biases`
    [N, K/group_size], bits 4 or 8).  norm_weight: RMSNorm x first (weight
    [K], eps); bias: [N] added to the product; act: 'silu' or 'gelu_tanh' --
    w holds gate rows then up rows and y = act(gate) * up ([..., N/2]);
    residual: added last.  Only where the default device is a CUDA GPU
    (ValueError naming the reason otherwise; gemv_unsupported_reason says
    it without raising)."""
    cdef Array a = _arr(x, "x"), wa = _arr(w, "w")
    cdef Array s = _opt(scales, "scales"), qb = _opt(biases, "biases")
    cdef Array b = _opt(bias, "bias"), n = _opt(norm_weight, "norm_weight")
    cdef Array r = _opt(residual, "residual")
    cdef nfu.GemvArgs g = nfu.GemvArgs()
    why = _gemv_args(&g, a, wa, s, qb, bits, group_size, b, n, eps, r, act)
    if why is not None:
        raise ValueError(f"gemv: {why}")
    return wrap(heap(nfu.gemv(a.ptr[0], wa.ptr[0], g)))


def gemv_unsupported_reason(x, w, *, scales=None, biases=None, int bits=0,
                            int group_size=64, bias=None, norm_weight=None, float eps=1e-5,
                            residual=None, act=None):
    """None when gemv(...) with these arguments runs its CUDA kernel, else why not."""
    cdef Array a = _arr(x, "x"), wa = _arr(w, "w")
    cdef Array s = _opt(scales, "scales"), qb = _opt(biases, "biases")
    cdef Array b = _opt(bias, "bias"), n = _opt(norm_weight, "norm_weight")
    cdef Array r = _opt(residual, "residual")
    cdef nfu.GemvArgs g = nfu.GemvArgs()
    return _gemv_args(&g, a, wa, s, qb, bits, group_size, b, n, eps, r, act)


def set_gemv_max_rows(int rows):
    """Most activation rows the decode kernels take (default 16; more rows
    go to MLX's GEMMs); returns the previous value."""
    if rows < 0:
        raise ValueError(f"set_gemv_max_rows: rows must be >= 0, got {rows}")
    cdef int old = nfu.gemv_max_rows()
    (&nfu.gemv_max_rows())[0] = rows
    return old
