# cython: language_level=3, cpp_locals=True, boundscheck=False, wraparound=False
"""Array: the extension type owning one native MLX array, and dtypes.

An Array is a lazy node of MLX's graph.  Its native handle is released by
`free()`, on leaving a `with` block, or when the object is collected; any use
after `free()` raises ValueError instead of touching freed memory.
"""
cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES, PyBUF_WRITABLE
from cpython.exc cimport PyErr_Occurred
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.slice cimport PySlice_AdjustIndices
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, int8_t, int16_t
from libc.string cimport memcpy
from libcpp.utility cimport move
from libcpp.vector cimport vector

from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap

import os

import numpy as np

try:
    import ml_dtypes
    _np_bfloat16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _np_bfloat16 = None

# ---------------------------------------------------------------- dtypes ----

# Codes follow mlx::core::Dtype::Val.
_DTYPE_INFO = (
    # name,        size, numpy dtype, buffer format
    ("bool_",      1, np.dtype(np.bool_), b"?"),
    ("uint8",      1, np.dtype(np.uint8), b"B"),
    ("uint16",     2, np.dtype(np.uint16), b"H"),
    ("uint32",     4, np.dtype(np.uint32), b"I"),
    ("uint64",     8, np.dtype(np.uint64), b"Q"),
    ("int8",       1, np.dtype(np.int8), b"b"),
    ("int16",      2, np.dtype(np.int16), b"h"),
    ("int32",      4, np.dtype(np.int32), b"i"),
    ("int64",      8, np.dtype(np.int64), b"q"),
    ("float16",    2, np.dtype(np.float16), b"e"),
    ("float32",    4, np.dtype(np.float32), b"f"),
    ("float64",    8, np.dtype(np.float64), b"d"),
    ("bfloat16",   2, _np_bfloat16, None),
    ("complex64",  8, np.dtype(np.complex64), b"Zf"),
)
_FLOATING = frozenset((9, 10, 11, 12))
_INTEGER = frozenset((1, 2, 3, 4, 5, 6, 7, 8))


@cython.final
cdef class Dtype:
    """An MLX element type (mlxcy.float32, mlxcy.bfloat16, ...)."""

    def __repr__(self):
        return "mlxcy." + self.name

    def __eq__(self, other):
        if isinstance(other, Dtype):
            return self.code == (<Dtype>other).code
        try:
            return self.code == as_dtype(other).code
        except (TypeError, ValueError):
            return NotImplemented

    def __hash__(self):
        return hash(("mlxcy.Dtype", self.code))

    def __reduce__(self):
        return (as_dtype, (self.name,))

    @property
    def itemsize(self):
        """Bytes per element."""
        return self.size

    @property
    def numpy(self):
        """The matching numpy dtype (ml_dtypes.bfloat16 for bfloat16)."""
        return _DTYPE_INFO[self.code][2]

    @property
    def is_floating(self):
        return self.code in _FLOATING

    @property
    def is_integer(self):
        return self.code in _INTEGER


cdef list _DTYPES = []
for _code, _info in enumerate(_DTYPE_INFO):
    _d = Dtype.__new__(Dtype)
    (<Dtype>_d).code = _code
    (<Dtype>_d).name = _info[0]
    (<Dtype>_d).size = _info[1]
    _DTYPES.append(_d)

bool_, uint8, uint16, uint32, uint64, int8, int16, int32, int64, \
    float16, float32, float64, bfloat16, complex64 = _DTYPES

_BY_NAME = {d.name: d for d in _DTYPES}
_BY_NAME.update({"bool": bool_, "half": float16, "float": float32, "double": float64})
_BY_NUMPY = {info[2]: d for d, info in zip(_DTYPES, _DTYPE_INFO) if info[2] is not None}


cdef Dtype dtype_from_native(na.Dtype d):
    return <Dtype>_DTYPES[na.dtype_code(d)]


cdef Dtype as_dtype(object obj):
    """Accept a Dtype, a name ('bfloat16'), or anything numpy calls a dtype."""
    if isinstance(obj, Dtype):
        return <Dtype>obj
    if isinstance(obj, str) and obj in _BY_NAME:
        return <Dtype>_BY_NAME[obj]
    try:
        npd = np.dtype(obj)
    except TypeError:
        raise TypeError(f"dtype: {obj!r} is not a dtype") from None
    found = _BY_NUMPY.get(npd)
    if found is None:
        raise ValueError(f"dtype: MLX has no type matching numpy's {npd}")
    return <Dtype>found


def dtype(obj):
    """Return the mlxcy Dtype for a Dtype, name or numpy dtype."""
    return as_dtype(obj)


# ------------------------------------------------------------ conversion ----

cdef na.array* freed_error() except NULL:
    raise ValueError("mlxcy: this array has been freed (free() or a closed "
                     "`with` block); it can no longer be used")


cdef Array _from_numpy(object arr, object dtype):
    """Copy a numpy array into a new evaluated Array."""
    cdef Dtype dt
    npd = arr.dtype
    if npd.kind == "U" or npd.kind == "S" or npd.kind == "O":
        raise TypeError(f"array: cannot make an MLX array from numpy dtype {npd}")
    want = None if dtype is None else as_dtype(dtype)
    if npd in _BY_NUMPY:
        dt = <Dtype>_BY_NUMPY[npd]
    elif npd.kind == "c":
        arr = arr.astype(np.complex64)
        dt = complex64
    else:
        raise TypeError(f"array: unsupported numpy dtype {npd}")
    # MLX keeps float64 only when asked: like mlx.core, default to float32.
    # Any other target goes through float32 in numpy too, because the GPU
    # backends cannot run a float64 astype.
    if dt.code == 11 and (want is None or want.code != 11):
        arr = arr.astype(np.float32)
        dt = float32
    if want is not None and want.code != dt.code and want.code != 12 and dt.code != 12:
        arr = arr.astype(want.numpy)     # numpy casts exactly for non-bf16 pairs
        dt = <Dtype>want
    if not arr.flags.c_contiguous:  # (ascontiguousarray would make 0-d arrays 1-d)
        arr = arr.copy(order="C")
    if arr.ndim > 32:
        raise ValueError("array: too many dimensions")
    cdef int32_t dims[33]
    cdef int i
    for i in range(arr.ndim):
        if arr.shape[i] > 2147483647:
            raise ValueError(f"array: dimension {i} of size {arr.shape[i]} exceeds int32")
        dims[i] = arr.shape[i]
    cdef const unsigned char[::1] raw = arr.reshape(-1).view(np.uint8) if arr.size else np.zeros(1, np.uint8)
    cdef Array out = na_wrap(na.array_from_host(<const void*>&raw[0], dims, arr.ndim, na.dtype_from_code(dt.code)))
    if want is not None and want.code != dt.code:
        out._replace(heap(nops.astype(out.ptr[0], na.dtype_from_code(want.code))))
    return out


cdef inline Array na_wrap(na.array* p):
    cdef Array r = Array.__new__(Array)
    r.ptr = p
    return r


cdef bint _has_array(object seq):
    for x in seq:
        if type(x) is Array:
            return True
        if isinstance(x, (list, tuple)) and _has_array(x):
            return True
    return False


cdef Array to_array(object obj, object dtype=None):
    """Build a new Array from an Array, scalar, nested list or numpy array."""
    cdef Array a
    cdef Dtype want
    if type(obj) is Array:
        a = na_wrap(new na.array(handle(<Array>obj)[0]))
    elif type(obj) is bool:
        a = na_wrap(na.new_bool(<bint>obj))
    elif type(obj) is int:
        if -2147483648 <= obj <= 2147483647:
            a = na_wrap(new na.array(<int>obj))
        else:
            a = na_wrap(new na.array(<int64_t>obj))
    elif type(obj) is float:
        a = na_wrap(new na.array(<double>obj, na.float32))
    elif isinstance(obj, (list, tuple)):
        if _has_array(obj):
            a = _stack([to_array(x) for x in obj])
        else:
            npa = np.asarray(obj)
            # Python ints become int32 and floats float32, as in mlx.core.
            if npa.dtype.kind == "i" and dtype is None:
                if npa.size and (npa.max() > 2147483647 or npa.min() < -2147483648):
                    npa = npa.astype(np.int64)
                else:
                    npa = npa.astype(np.int32)
            a = _from_numpy(npa, dtype)
            return a
    elif isinstance(obj, (np.ndarray, np.generic)):
        return _from_numpy(np.asarray(obj), dtype)
    elif isinstance(obj, complex):
        return _from_numpy(np.asarray(obj, np.complex64), dtype)
    elif hasattr(obj, "__array__") or hasattr(obj, "__array_interface__"):
        return _from_numpy(np.asarray(obj), dtype)
    else:
        raise TypeError(f"array: cannot convert {type(obj).__name__} to an MLX array")
    if dtype is not None:
        want = as_dtype(dtype)
        if na.dtype_code(a.ptr.dtype()) != want.code:
            a._replace(heap(nops.astype(a.ptr[0], na.dtype_from_code(want.code))))
    return a


cdef Array scalar_like(object obj, na.array* like):
    """A Python scalar typed the way MLX's weak scalars are: an int takes the
    other operand's type unless that is bool; a float takes it when it is
    floating.  Anything else goes through to_array."""
    cdef int code = na.dtype_code(like.dtype())
    t = type(obj)
    cdef bint floating = 9 <= code <= 12      # the codes of _FLOATING
    if t is int and code != 0 and code != 13:
        return na_wrap(new na.array(<double>obj if floating else <int64_t>obj,
                                    like.dtype()))
    if t is float and (floating or code == 13):
        return na_wrap(new na.array(<double>obj, like.dtype()))
    return to_array(obj)


cdef Array operand(object obj, na.array* like):
    if type(obj) is Array:
        handle(<Array>obj)
        return <Array>obj
    return scalar_like(obj, like)


def array(obj, dtype=None):
    """Make an Array from a scalar, (nested) list, numpy array or Array.

    Python ints become int32 (int64 when too large), floats float32; numpy
    arrays keep their dtype except float64, which becomes float32 unless
    dtype=float64 is given.  bfloat16 numpy arrays use ml_dtypes.bfloat16.
    """
    return to_array(obj, dtype)


def asarray(obj, dtype=None):
    """Like array(), but an Array with the right dtype is returned as is."""
    if type(obj) is Array and (dtype is None or
                              as_dtype(dtype).code == na.dtype_code(handle(<Array>obj).dtype())):
        return obj
    return to_array(obj, dtype)


# Storage for the native arrays of operator and indexing results.  An Array
# owns its native array through a heap block of sizeof(array) (heap() in
# include/mlxcy/core.h is `new array(...)`).  Array.__dealloc__ keeps up to 256
# released blocks, and the operators and basic indexing below reuse them, so
# `a @ b` pays no malloc and free per result.  A kept block is an ordinary
# operator-new block: `del ptr` elsewhere stays valid.  Used only with the GIL
# held (tp_dealloc, operator methods).
cdef extern from *:
    """
    #include <new>
    namespace mlxcy_core_pool {
    static void* slots[256];
    static int count = 0;
    static inline mlx::core::array* take(mlx::core::array a) {
      void* p = count ? slots[--count] : ::operator new(sizeof(mlx::core::array));
      return new (p) mlx::core::array(std::move(a));
    }
    static inline void give(mlx::core::array* p) {
      p->~array();
      if (count < 256) slots[count++] = p;
      else ::operator delete(p);
    }
    }  // namespace mlxcy_core_pool
    """
    na.array* _pool_take "mlxcy_core_pool::take"(na.array) except +
    void _pool_give "mlxcy_core_pool::give"(na.array*) noexcept


cdef Array wrap_new(na.array a):
    """A new Array owning `a`, its native block taken from the pool above (no
    malloc): for ops in other modules (mlxcy.ops) whose per-call overhead
    counts.  GIL held."""
    return na_wrap(_pool_take(move(a)))


# ------------------------------------------------------------ indexing -----

cdef int _norm_axis(int ax, int ndim) except? -1:
    if ax < -ndim or ax >= ndim:
        raise IndexError(f"axis {ax} is out of bounds for an array of {ndim} dimensions")
    return ax + ndim if ax < 0 else ax


cdef tuple _expand_key(object key, int ndim):
    """Normalize an index to a tuple with Ellipsis expanded to full slices."""
    if not isinstance(key, tuple):
        key = (key,)
    cdef int n_real = 0, n_ell = 0
    for k in key:
        if k is Ellipsis:
            n_ell += 1
        elif k is not None:
            n_real += 1
    if n_ell > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if n_real > ndim:
        raise IndexError(f"too many indices: array is {ndim}-dimensional, "
                         f"but {n_real} were indexed")
    out = []
    for k in key:
        if k is Ellipsis:
            out.extend([slice(None)] * (ndim - n_real))
        else:
            out.append(k)
    if n_ell == 0:
        out.extend([slice(None)] * (ndim - n_real))
    return tuple(out)


cdef object _index_array(object k):
    """An integer/bool array index as an Array, else None."""
    if type(k) is Array:
        return k
    if isinstance(k, (list, np.ndarray)):
        return to_array(k)
    return None


cdef extern from "Python.h":
    # Declared without `except` (unlike cpython.slice / cpython.long): the
    # basic-index fast path below clears the error and falls back instead.
    int _slice_unpack "PySlice_Unpack"(object, Py_ssize_t*, Py_ssize_t*, Py_ssize_t*)
    Py_ssize_t _long_as_ssize "PyLong_AsSsize_t"(object)
    void _clear_error "PyErr_Clear"()


cdef object _getitem_basic(na.array* a, object key):
    """a[key] for the common basic index, built with no Python object but the
    result: an int, a slice with a positive step, or a tuple of at most ndim
    of these.  Returns None for any other key and for anything unusual (an
    out-of-bounds or huge int, a negative or huge step, an invalid slice):
    _getitem's general path then handles it, errors included, so results
    and messages are the same either way."""
    cdef int ndim = a.ndim()
    cdef bint is_tuple = type(key) is tuple
    cdef Py_ssize_t nk, i, dim, lo, hi, st, n
    cdef bint drop = False
    cdef object k
    if is_tuple:
        nk = PyTuple_GET_SIZE(key)
    elif type(key) is slice or type(key) is int:
        nk = 1
    else:
        return None
    if nk > ndim:
        return None
    cdef na.Shape start = na.Shape(), stop = na.Shape(), strides = na.Shape()
    cdef na.Shape shape = na.Shape()   # result shape: int-indexed axes dropped
    for i in range(ndim):
        dim = a.shape(<int>i)
        if i >= nk:
            start.push_back(0); stop.push_back(dim); strides.push_back(1)
            shape.push_back(dim)
            continue
        k = <object>PyTuple_GET_ITEM(key, i) if is_tuple else key
        if type(k) is slice:
            if _slice_unpack(k, &lo, &hi, &st) < 0:
                _clear_error()
                return None
            if st <= 0 or st == PY_SSIZE_T_MAX:     # (a larger step is clamped to the max)
                return None
            n = PySlice_AdjustIndices(dim, &lo, &hi, st)
            if n <= 1:
                st = 1      # the step of 0 or 1 element is moot (and may not fit int32)
            start.push_back(lo); stop.push_back(lo + (n - 1) * st + 1 if n else lo)
            strides.push_back(st)
            shape.push_back(n)
        elif type(k) is int:
            lo = _long_as_ssize(k)
            if lo == -1 and PyErr_Occurred():
                _clear_error()
                return None
            if lo < -dim or lo >= dim:
                return None
            if lo < 0:
                lo += dim
            start.push_back(lo); stop.push_back(lo + 1); strides.push_back(1)
            drop = True
        else:
            return None
    if drop:
        return na_wrap(_pool_take(nops.reshape(nops.slice(a[0], start, stop, strides), shape)))
    return na_wrap(_pool_take(nops.slice(a[0], start, stop, strides)))


def physical_memory():
    """Bytes of the machine's memory (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


cdef size_t _PHYS = physical_memory()


cdef int _check_fits(na.array* a, str fn) except -1:
    """MLX 0.32's CPU allocator does not check for failed allocations: an
    output larger than the machine's memory crashes its worker thread (as
    mlxcy.eval documents).  Refuse such an output up front."""
    if _PHYS and not a.is_available() and a.nbytes() > _PHYS:
        raise MemoryError(f"{fn}: an output of {a.nbytes()} bytes exceeds this machine's "
                          f"{_PHYS} bytes of memory")
    return 0


def _check_index_bounds(idx, Py_ssize_t dim, axis, str fn="index"):
    """Raise numpy's IndexError when an integer index array holds a value
    outside [-dim, dim): MLX's gather and scatter read and write out of
    bounds instead (a crash or a garbage value).  The indices are evaluated."""
    cdef Array ia = idx if type(idx) is Array else to_array(idx)
    cdef int code = na.dtype_code(handle(ia).dtype())
    if not (1 <= code <= 8):
        raise IndexError(f"{fn}: arrays used as indices must be of integer type, not "
                         f"{dtype_from_native(handle(ia).dtype())}")
    if handle(ia).size() == 0:
        return
    vals = ia.numpy()
    lo, hi = int(vals.min()), int(vals.max())
    if lo < -dim or hi >= dim:
        bad = hi if hi >= dim else lo
        where = f"axis {axis} with size {dim}" if axis is not None else f"size {dim}"
        raise IndexError(f"{fn}: index {bad} is out of bounds for {where}")


cdef Array _getitem(Array self, object key):
    cdef na.array* a = handle(self)
    fast = _getitem_basic(a, key)
    if fast is not None:
        return <Array>fast
    cdef int ndim = a.ndim()
    cdef tuple keys = _expand_key(key, ndim)
    cdef na.Shape start = na.Shape(), stop = na.Shape(), strides = na.Shape()
    cdef list final_shape = []      # shape after ints are dropped / None added
    cdef list arr_axes = []          # (axis in sliced array, index Array)
    cdef int axis = 0
    cdef Py_ssize_t dim, lo, hi, st, n
    cdef bint need_reshape = False
    cdef list rev_axes = []
    for k in keys:
        if k is None:
            final_shape.append(1)
            need_reshape = True
            continue
        dim = a.shape(axis)
        if type(k) is int or isinstance(k, (np.integer,)):
            lo = k
            if lo < -dim or lo >= dim:
                raise IndexError(f"index {k} is out of bounds for axis {axis} with size {dim}")
            if lo < 0:
                lo += dim
            start.push_back(lo); stop.push_back(lo + 1); strides.push_back(1)
            need_reshape = True
        elif type(k) is slice:
            lo, hi, st = k.indices(dim)
            if st > 0:
                n = max(0, (hi - lo + st - 1) // st)
                start.push_back(lo); stop.push_back(lo + (n - 1) * st + 1 if n else lo)
                # The step of at most one element is moot; a huge one would
                # not fit MLX's int32 strides.
                strides.push_back(st if n > 1 else 1)
            else:
                # Negative step: take the mirrored positive-step slice, flip later.
                n = max(0, (lo - hi - st - 1) // (-st))
                first = lo + (n - 1) * st if n else 0
                start.push_back(first); stop.push_back(first + (n - 1) * (-st) + 1 if n else first)
                strides.push_back(-st if n > 1 else 1)
                if n > 1:
                    rev_axes.append(axis)
            final_shape.append(n)
        else:
            idx = _index_array(k)
            if idx is None:
                raise IndexError(f"index: unsupported index type {type(k).__name__}")
            if na.dtype_code(handle(<Array>idx).dtype()) == 0:
                raise IndexError("boolean mask indexing has a data-dependent shape, which "
                                 "MLX does not support; use mlxcy.where() instead")
            _check_index_bounds(idx, dim, axis)
            start.push_back(0); stop.push_back(dim); strides.push_back(1)
            arr_axes.append((axis, len(final_shape), idx))
            final_shape.append(None)
        axis += 1
    cdef Array out = na_wrap(heap(nops.slice(a[0], start, stop, strides)))
    if rev_axes:
        for ax in rev_axes:
            n = out.ptr.shape(ax)
            out = _take(out, to_array(np.arange(n - 1, -1, -1, dtype=np.int32)), ax)
    if arr_axes:
        return _advanced(out, arr_axes, final_shape)
    if need_reshape:
        return na_wrap(heap(nops.reshape(out.ptr[0], _shape_of(final_shape))))
    return out


cdef na.Shape _shape_of(object dims) except *:
    cdef na.Shape s = na.Shape()
    for d in dims:
        s.push_back(d)
    return s


# The few ops that indexing needs, on native arrays (mlxcy.ops, above this
# module, has the checked public versions).

cdef Array _take(Array a, Array idx, int axis):
    return wrap_new(nops.take(handle(a)[0], handle(idx)[0], axis))


cdef Array _transpose(Array a, list axes):
    cdef vector[int] v = axes
    return wrap_new(nops.transpose(handle(a)[0], v))


cdef Array _reshape(Array a, list shape):
    return wrap_new(nops.reshape(handle(a)[0], _shape_of(shape)))


cdef Array _broadcast_to(Array a, list shape):
    return wrap_new(nops.broadcast_to(handle(a)[0], _shape_of(shape)))


cdef Array _where(Array cond, Array x, Array y):
    return wrap_new(nops.where(handle(cond)[0], handle(x)[0], handle(y)[0]))


cdef Array _astype_like(Array a, na.array* like):
    return wrap_new(nops.astype(handle(a)[0], like.dtype()))


cdef Array _stack(list arrays):
    cdef vector[na.array] v = vector[na.array]()
    for x in arrays:
        v.push_back(handle(<Array>x)[0])
    return wrap_new(nops.stack(v, 0))


cdef list _broadcast_arrays(list arrays):
    cdef vector[na.array] v = vector[na.array]()
    for x in arrays:
        v.push_back(handle(<Array>x)[0])
    v = nops.broadcast_arrays(v)
    return [wrap_new(v[i]) for i in range(v.size())]


cdef Array _advanced(Array base, list arr_axes, list final_shape):
    """Integer-array indexing over the already sliced array `r`.  Indices are
    broadcast together (numpy rules); the result dims replace the first indexed
    axis when the indexed axes are adjacent, else they go first."""
    idxs = [t[2] for t in arr_axes]
    axes = [t[0] for t in arr_axes]
    if len(idxs) == 1:
        out = _take(base, idxs[0], axes[0])
        pos = arr_axes[0][1]
        idx_shape = list(idxs[0].shape)
        shape = final_shape[:pos] + idx_shape + final_shape[pos + 1:]
    else:
        idxs = _broadcast_arrays(idxs)
        bshape = list(idxs[0].shape)
        # Move the indexed axes to the front, flatten them, and take.
        rest = [i for i in range(base.ndim) if i not in axes]
        moved = _transpose(base, axes + rest)
        sizes = [base.shape[ax] for ax in axes]
        flat = None
        mult = 1
        for ix, size in zip(reversed(idxs), reversed(sizes)):
            ix = _where(ix < 0, ix + size, ix)
            term = ix * mult if mult != 1 else ix
            flat = term if flat is None else flat + term
            mult *= size
        moved = _reshape(moved, [-1] + [base.shape[i] for i in rest])
        out = _take(moved, flat, 0)
        adjacent = axes == list(range(axes[0], axes[0] + len(axes)))
        positions = [t[1] for t in arr_axes]
        others = [d for i, d in enumerate(final_shape) if i not in positions]
        if adjacent:
            p = positions[0]
            shape = [d for d in final_shape[:p] if True] + bshape + [
                d for i, d in enumerate(final_shape) if i > p and i not in positions]
            # out is (bshape..., rest...) - move bshape to position p of `others`
            lead = len([i for i in range(p) if i not in positions])
            nb = len(bshape)
            out_nd = out.ndim
            perm = list(range(nb, nb + lead)) + list(range(nb)) + list(range(nb + lead, out_nd))
            out = _transpose(out, perm)
        else:
            shape = bshape + others
    return _reshape(out, [d for d in shape]) if list(out.shape) != shape else out


cdef void _setitem(Array self, object key, object value) except *:
    cdef na.array* a = handle(self)
    cdef int ndim = a.ndim()
    cdef Array v = operand(value, a)
    if type(key) is Array and na.dtype_code(handle(<Array>key).dtype()) == 0:
        mask = _broadcast_to(key, list(self.shape))
        val = _broadcast_to(_astype_like(v, a), list(self.shape))
        self._replace(heap(nops.where(handle(mask)[0], handle(val)[0], a[0])))
        return
    cdef tuple keys = _expand_key(key, ndim)
    cdef na.Shape start = na.Shape(), stop = na.Shape(), strides = na.Shape()
    cdef list slice_shape = []
    cdef list value_shape = []       # slice_shape without the int-indexed axes
    cdef int axis = 0
    cdef Py_ssize_t dim, lo, hi, st, n
    for k in keys:
        if k is None:
            continue
        dim = a.shape(axis)
        if type(k) is int or isinstance(k, np.integer):
            lo = k
            if lo < -dim or lo >= dim:
                raise IndexError(f"index {k} is out of bounds for axis {axis} with size {dim}")
            if lo < 0:
                lo += dim
            start.push_back(lo); stop.push_back(lo + 1); strides.push_back(1)
            slice_shape.append(1)
            value_shape.append(None)
        elif type(k) is slice:
            lo, hi, st = k.indices(dim)
            if st < 0:
                raise IndexError("slice assignment with a negative step is not supported")
            n = max(0, (hi - lo + st - 1) // st)
            start.push_back(lo); stop.push_back(lo + (n - 1) * st + 1 if n else lo)
            strides.push_back(st if n > 1 else 1)   # (as in indexing: a huge step is moot
            slice_shape.append(n)                   # and overflowed MLX's int32 strides)
            value_shape.append(n)
        else:
            idx = _index_array(k)
            if idx is None:
                raise IndexError(f"index: unsupported index type {type(k).__name__}")
            _setitem_array(self, keys, v)
            return
        axis += 1
    cdef na.array upd = nops.astype(v.ptr[0], a.dtype())
    # Drop leading size-1 dims of the value as numpy does, then broadcast.
    dims = [d for d in value_shape if d is not None]
    while upd.ndim() > len(dims) and upd.shape(0) == 1:
        upd = nops.squeeze(upd, 0)
    upd = nops.broadcast_to(upd, _shape_of(dims))
    upd = nops.reshape(upd, _shape_of(slice_shape))
    self._replace(heap(nops.slice_update(a[0], upd, start, stop, strides)))


cdef void _setitem_array(Array self, tuple keys, Array v) except *:
    """Assignment through integer-array indices: a scatter along those axes."""
    if len(keys) != 1 and not all(isinstance(k, slice) and k == slice(None) for k in keys[1:]):
        raise IndexError("array-index assignment supports one integer index array on "
                         "the first axis (x[idx] = v)")
    idx = to_array(keys[0])
    _check_index_bounds(idx, self.shape[0], 0)
    idx = _where(idx < 0, idx + self.shape[0], idx).reshape(-1)
    upd_shape = [idx.size, 1] + list(self.shape[1:])
    upd = _broadcast_to(_astype_like(v, handle(self)), [idx.size] + list(self.shape[1:]))
    upd = _reshape(upd, upd_shape)
    if upd.size == 0:   # nothing written (MLX's CPU scatter divides by the empty slice's size)
        return
    self._replace((_scatter0(handle(self)[0], handle(idx)[0], handle(upd)[0])))


cdef na.array* _scatter0(const na.array& a, const na.array& idx, const na.array& upd) except NULL:
    cdef vector[na.array] ind = vector[na.array]()
    ind.push_back(idx)
    cdef vector[int] axes = vector[int]()
    axes.push_back(0)
    return heap(nops.scatter(a, ind, upd, axes))


# ----------------------------------------------------------------- Array ----

# Binary op codes used by the operator methods.
cdef enum:
    OP_ADD = 0
    OP_SUB = 1
    OP_MUL = 2
    OP_DIV = 3
    OP_FLOORDIV = 4
    OP_MOD = 5
    OP_POW = 6
    OP_MATMUL = 7
    OP_AND = 8
    OP_OR = 9
    OP_XOR = 10
    OP_LSHIFT = 11
    OP_RSHIFT = 12
    OP_EQ = 13
    OP_NE = 14
    OP_LT = 15
    OP_LE = 16
    OP_GT = 17
    OP_GE = 18


cdef na.array* _binop(const na.array& x, const na.array& y, int op) except NULL:
    if op == OP_ADD: return _pool_take(nops.add(x, y))
    if op == OP_SUB: return _pool_take(nops.subtract(x, y))
    if op == OP_MUL: return _pool_take(nops.multiply(x, y))
    if op == OP_DIV: return _pool_take(nops.divide(x, y))
    if op == OP_FLOORDIV: return _pool_take(nops.floor_divide(x, y))
    if op == OP_MOD: return _pool_take(nops.remainder(x, y))
    if op == OP_POW: return _pool_take(nops.power(x, y))
    if op == OP_MATMUL: return _pool_take(nops.matmul(x, y))
    if op == OP_AND:
        if na.dtype_code(x.dtype()) == 0 and na.dtype_code(y.dtype()) == 0:
            return _pool_take(nops.logical_and(x, y))
        return _pool_take(nops.bitwise_and(x, y))
    if op == OP_OR:
        if na.dtype_code(x.dtype()) == 0 and na.dtype_code(y.dtype()) == 0:
            return _pool_take(nops.logical_or(x, y))
        return _pool_take(nops.bitwise_or(x, y))
    if op == OP_XOR: return _pool_take(nops.bitwise_xor(x, y))
    if op == OP_LSHIFT: return _pool_take(nops.left_shift(x, y))
    if op == OP_RSHIFT: return _pool_take(nops.right_shift(x, y))
    if op == OP_EQ: return _pool_take(nops.equal(x, y))
    if op == OP_NE: return _pool_take(nops.not_equal(x, y))
    if op == OP_LT: return _pool_take(nops.less(x, y))
    if op == OP_LE: return _pool_take(nops.less_equal(x, y))
    if op == OP_GT: return _pool_take(nops.greater(x, y))
    return _pool_take(nops.greater_equal(x, y))


cdef inline object _apply(object a, object b, int op, bint reflected):
    """Operator dispatch: `a` is the Array whose method was called."""
    cdef na.array* px = (<Array>a).ptr
    cdef na.array* py
    cdef Array y
    if px == NULL:
        freed_error()
    if type(b) is Array:          # fast path: no temporary objects
        py = (<Array>b).ptr
        if py == NULL:
            freed_error()
    elif type(b) is float or type(b) is int:
        return _apply_scalar(px, b, op, reflected)
    else:
        try:
            y = scalar_like(b, px)
        except TypeError:
            return NotImplemented
        py = y.ptr
    if reflected:
        return na_wrap(_binop(py[0], px[0], op))
    return na_wrap(_binop(px[0], py[0], op))


cdef object _apply_scalar(na.array* px, object b, int op, bint reflected):
    """`px <op> b` for a Python float or int `b`: the scalar typed exactly as
    scalar_like types it, but held in a C++ local rather than a temporary
    Array (an operator with a scalar is as common as one with an Array)."""
    cdef int code = na.dtype_code(px.dtype())
    cdef bint floating = 9 <= code <= 12      # the codes of _FLOATING
    cdef na.array s
    if type(b) is float and (floating or code == 13):
        s = na.array(<double>b, px.dtype())
    elif type(b) is int and code != 0 and code != 13:
        # As scalar_like converts it: to int64 first unless floating, then
        # through a double (its conditional expression is typed double).
        if floating:
            s = na.array(<double>b, px.dtype())
        else:
            s = na.array(<double><int64_t>b, px.dtype())
    else:
        # Not typed after `px`: to_array's default type, as scalar_like does.
        y = to_array(b)
        s = (<Array>y).ptr[0]
    if reflected:
        return na_wrap(_binop(s, px[0], op))
    return na_wrap(_binop(px[0], s, op))


@cython.freelist(256)
@cython.final
cdef class Array:
    """An MLX array.  Create with mlxcy.array(obj, dtype=None)."""

    # numpy must defer to our reflected operators (x_np + a -> Array).
    __array_ufunc__ = None

    def __init__(self, obj, dtype=None):
        cdef Array src = to_array(obj, dtype)
        self.ptr = src.ptr
        src.ptr = NULL

    def __dealloc__(self):
        if self.ptr != NULL:
            _pool_give(self.ptr)
            self.ptr = NULL

    cdef void _replace(self, na.array* p) noexcept:
        if self.ptr != NULL:
            del self.ptr
        self.ptr = p

    # -- lifetime --------------------------------------------------------------
    def free(self):
        """Release the native array now.  Later use of this Array raises."""
        if self.exports > 0:
            raise BufferError("free(): the array is exported through the buffer "
                              "protocol (a memoryview or numpy view is alive)")
        if self.ptr != NULL:
            del self.ptr
            self.ptr = NULL

    @property
    def freed(self):
        """True once free() released the native handle."""
        return self.ptr == NULL

    def __enter__(self):
        """`with mlxcy.array(...) as a:` frees `a` on leaving the block."""
        handle(self)
        return self

    def __exit__(self, *exc):
        """Free the array (see free())."""
        self.free()
        return False

    # -- metadata --------------------------------------------------------------
    @property
    def shape(self):
        """The dimensions, as a tuple of ints."""
        cdef na.array* a = handle(self)
        cdef size_t i
        return tuple([a.shape(<int>i) for i in range(a.ndim())])

    @property
    def ndim(self):
        """Number of dimensions."""
        return handle(self).ndim()

    @property
    def size(self):
        """Number of elements."""
        return handle(self).size()

    @property
    def nbytes(self):
        """Bytes the elements take."""
        return handle(self).nbytes()

    @property
    def itemsize(self):
        return handle(self).itemsize()

    @property
    def dtype(self):
        """The element type (an mlxcy.Dtype)."""
        return dtype_from_native(handle(self).dtype())

    @property
    def id(self):
        """An identifier of the native array node."""
        return handle(self).id()

    def __len__(self):
        cdef na.array* a = handle(self)
        if a.ndim() == 0:
            raise TypeError("len() of a 0-d array")
        return a.shape(0)

    def __iter__(self):
        cdef na.array* a = handle(self)
        if a.ndim() == 0:
            raise TypeError("iteration over a 0-d array")
        cdef int i
        for i in range(a.shape(0)):
            yield self[i]

    def __repr__(self):
        if self.ptr == NULL:
            return "<mlxcy.Array (freed)>"
        # Formatted from the numpy export rather than MLX's C++ operator<<,
        # which crashed reading a CUDA array's memory (MLX 0.32.4, H200).
        body = np.array2string(self.numpy(), separator=", ", prefix="array(")
        return f"array({body}, dtype={self.dtype.name})"

    def __hash__(self):
        return id(self)

    def __bool__(self):
        cdef na.array* a = handle(self)
        if a.size() != 1:
            raise ValueError("the truth value of an array with more than one element is "
                             "ambiguous; use all() or any()")
        return bool(self.item())

    def __int__(self):
        return int(self.item())

    def __float__(self):
        return float(self.item())

    def __index__(self):
        cdef int code = na.dtype_code(handle(self).dtype())
        if code not in _INTEGER or handle(self).size() != 1:
            raise TypeError("only integer scalar arrays can be used as an index")
        return int(self.item())

    # -- evaluation and host export --------------------------------------------
    def eval(self):
        """Evaluate this array now (the GIL is released meanwhile)."""
        cdef na.array* a = handle(self)
        _check_fits(a, "eval")
        with nogil:
            a.eval()
        return self

    def numpy(self):
        """A numpy copy, correct for any strides (views, broadcasts, slices)."""
        cdef na.array* a = handle(self)
        cdef int code = na.dtype_code(a.dtype())
        npd = _DTYPE_INFO[code][2]
        if npd is None:
            raise TypeError("bfloat16 export needs the ml_dtypes package")
        cdef na.array c = a[0]
        _check_fits(a, "numpy")
        with nogil:
            c.eval()
            if not na.row_contiguous(c):
                c = nops.contiguous(c, False)
                c.eval()
        out = np.empty(self.shape, dtype=npd)
        cdef size_t nbytes = c.nbytes()
        cdef unsigned char[::1] dst
        if nbytes:
            dst = out.reshape(-1).view(np.uint8)
            memcpy(&dst[0], na.host_data(c), nbytes)
        return out

    def __array__(self, dtype=None, copy=None):
        """numpy conversion: np.asarray(a) returns a copy (see numpy())."""
        out = self.numpy()
        return out if dtype is None else out.astype(dtype, copy=False)

    def tolist(self):
        """Nested Python lists (half types as floats)."""
        cdef int code = na.dtype_code(handle(self).dtype())
        out = self.numpy()
        if code == 12 or code == 9:
            out = out.astype(np.float32)
        return out.tolist()

    def item(self):
        """The single element as a Python scalar."""
        cdef na.array* a = handle(self)
        if a.size() != 1:
            raise ValueError(f"item(): can only convert an array of size 1, not {a.size()}")
        return self.tolist() if a.ndim() == 0 else self.numpy().reshape(()).astype(
            np.float32 if na.dtype_code(a.dtype()) in (9, 12) else self.numpy().dtype).item()

    def __getbuffer__(self, Py_buffer* buf, int flags):
        cdef na.array* a = handle(self)
        cdef int code = na.dtype_code(a.dtype())
        fmt = _DTYPE_INFO[code][3]
        if fmt is None:
            raise BufferError("bfloat16 has no buffer format; use a.numpy() "
                              "(ml_dtypes.bfloat16) or a.view(mlxcy.uint16)")
        if flags & PyBUF_WRITABLE:
            raise BufferError("MLX arrays are exported read-only")
        _check_fits(a, "buffer")
        with nogil:
            a.eval()
        cdef int nd = a.ndim()
        # shape and strides live in one Python-owned bytes buffer held by buf.internal
        info = np.empty(2 * max(nd, 1), dtype=np.intp)
        cdef Py_ssize_t[::1] iv = info
        cdef int i
        for i in range(nd):
            iv[i] = a.shape(i)
            iv[nd + i] = a.strides()[i] * a.itemsize()
        buf.buf = <void*>na.host_data(a[0])
        buf.obj = self
        buf.len = a.nbytes()
        buf.itemsize = a.itemsize()
        buf.readonly = 1
        buf.ndim = nd
        # The format bytes live in the module-level _DTYPE_INFO table forever.
        buf.format = NULL
        if flags & PyBUF_FORMAT:
            buf.format = <char*><bytes>fmt
        buf.shape = &iv[0] if nd else NULL
        buf.strides = &iv[nd] if nd else NULL
        buf.suboffsets = NULL
        cpython_incref(info)
        buf.internal = <void*>info
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        cpython_decref(<object>buf.internal)
        self.exports -= 1

    # -- conversions -------------------------------------------------------------
    def astype(self, dtype):
        """A copy converted to `dtype` (lazy)."""
        cdef Dtype d = as_dtype(dtype)
        return na_wrap(heap(nops.astype(handle(self)[0], na.dtype_from_code(d.code))))

    def view(self, dtype):
        """Reinterpret the bytes as `dtype` (e.g. uint16 <-> bfloat16)."""
        cdef Dtype d = as_dtype(dtype)
        return na_wrap(heap(nops.view(handle(self)[0], na.dtype_from_code(d.code))))

    def reshape(self, *shape):
        """A lazy reshape: a.reshape(2, 3) or a.reshape((2, 3))."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        return na_wrap(heap(nops.reshape(handle(self)[0], _shape_of(shape))))

    @property
    def T(self):
        """Transpose (all axes reversed), a lazy view."""
        return na_wrap(_pool_take(nops.transpose(handle(self)[0])))

    def __getattr__(self, name):
        # Methods such as a.sum(axis=0) forward to mlxcy.ops functions.
        fn = None if name.startswith("_") else _METHODS.get(name)
        if fn is None:
            raise AttributeError(f"'mlxcy.Array' object has no attribute {name!r}")
        def method(*args, **kwargs):
            return fn(self, *args, **kwargs)
        return method

    # -- operators ---------------------------------------------------------------
    def __add__(self, other): return _apply(self, other, OP_ADD, False)
    def __radd__(self, other): return _apply(self, other, OP_ADD, True)
    def __sub__(self, other): return _apply(self, other, OP_SUB, False)
    def __rsub__(self, other): return _apply(self, other, OP_SUB, True)
    def __mul__(self, other): return _apply(self, other, OP_MUL, False)
    def __rmul__(self, other): return _apply(self, other, OP_MUL, True)
    def __truediv__(self, other): return _apply(self, other, OP_DIV, False)
    def __rtruediv__(self, other): return _apply(self, other, OP_DIV, True)
    def __floordiv__(self, other): return _apply(self, other, OP_FLOORDIV, False)
    def __rfloordiv__(self, other): return _apply(self, other, OP_FLOORDIV, True)
    def __mod__(self, other): return _apply(self, other, OP_MOD, False)
    def __rmod__(self, other): return _apply(self, other, OP_MOD, True)
    def __pow__(self, other, mod):
        if mod is not None:
            return NotImplemented
        return _apply(self, other, OP_POW, False)
    def __rpow__(self, other, mod):
        if mod is not None:
            return NotImplemented
        return _apply(self, other, OP_POW, True)
    def __matmul__(self, other): return _apply(self, other, OP_MATMUL, False)
    def __rmatmul__(self, other): return _apply(self, other, OP_MATMUL, True)
    def __and__(self, other): return _apply(self, other, OP_AND, False)
    def __rand__(self, other): return _apply(self, other, OP_AND, True)
    def __or__(self, other): return _apply(self, other, OP_OR, False)
    def __ror__(self, other): return _apply(self, other, OP_OR, True)
    def __xor__(self, other): return _apply(self, other, OP_XOR, False)
    def __rxor__(self, other): return _apply(self, other, OP_XOR, True)
    def __lshift__(self, other): return _apply(self, other, OP_LSHIFT, False)
    def __rlshift__(self, other): return _apply(self, other, OP_LSHIFT, True)
    def __rshift__(self, other): return _apply(self, other, OP_RSHIFT, False)
    def __rrshift__(self, other): return _apply(self, other, OP_RSHIFT, True)

    def __iadd__(self, other): return _apply(self, other, OP_ADD, False)
    def __isub__(self, other): return _apply(self, other, OP_SUB, False)
    def __imul__(self, other): return _apply(self, other, OP_MUL, False)
    def __itruediv__(self, other): return _apply(self, other, OP_DIV, False)

    def __richcmp__(self, other, int op):
        # Py_LT=0, Py_LE=1, Py_EQ=2, Py_NE=3, Py_GT=4, Py_GE=5
        cdef int code = (OP_LT, OP_LE, OP_EQ, OP_NE, OP_GT, OP_GE)[op]
        return _apply(self, other, code, False)

    def __neg__(self):
        return na_wrap(_pool_take(nops.negative(handle(self)[0])))

    def __pos__(self):
        handle(self)
        return self

    def __abs__(self):
        return na_wrap(heap(nops.abs(handle(self)[0])))

    def __invert__(self):
        cdef na.array* a = handle(self)
        if na.dtype_code(a.dtype()) == 0:
            return na_wrap(heap(nops.logical_not(a[0])))
        return na_wrap(heap(nops.bitwise_invert(a[0])))

    # -- indexing ----------------------------------------------------------------
    def __getitem__(self, key):
        return _getitem(self, key)

    def __setitem__(self, key, value):
        _setitem(self, key, value)


cdef extern from "Python.h":
    void cpython_incref "Py_INCREF"(object)
    void cpython_decref "Py_DECREF"(object)


# Array methods that are mlxcy.ops functions (a.sum(), a.transpose(1, 0), ...):
# name -> function.  mlxcy.ops, which imports this module (never the other way
# round), registers them when it is imported; `import mlxcy` imports it first.
_METHODS = {}


def _register_methods(dict fns):
    """Called once by mlxcy.ops: these functions become Array methods."""
    _METHODS.update(fns)
