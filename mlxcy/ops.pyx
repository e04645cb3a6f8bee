# cython: language_level=3, cpp_locals=True
"""Array operations (mirrors mlx/ops.h).  Arguments may be Arrays, Python
scalars, lists or numpy arrays; results are new lazy Arrays."""
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, to_array, operand, as_dtype, Dtype
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap


cdef inline Array _arr(object x):
    """x as an Array (converted if it is not one)."""
    if type(x) is Array:
        handle(<Array>x)
        return <Array>x
    return to_array(x)


cdef na.Shape _shape(object dims) except *:
    cdef na.Shape s = na.Shape()
    if isinstance(dims, int):
        s.push_back(dims)
        return s
    for d in dims:
        s.push_back(d)
    return s


cdef vector[int] _ints(object xs) except *:
    cdef vector[int] v = vector[int]()
    if isinstance(xs, int):
        v.push_back(xs)
        return v
    for x in xs:
        v.push_back(x)
    return v


cdef vector[na.array] _arrays(object xs) except *:
    cdef vector[na.array] v = vector[na.array]()
    for x in xs:
        v.push_back(handle(_arr(x))[0])
    return v


# ---- binary ops: the first Array operand fixes the type of Python scalars ----

cdef inline tuple _pair(object a, object b):
    if type(a) is Array:
        return a, operand(b, handle(<Array>a))
    if type(b) is Array:
        return operand(a, handle(<Array>b)), b
    return to_array(a), to_array(b)


def add(a, b):
    x, y = _pair(a, b)
    return wrap(heap(nops.add((<Array>x).ptr[0], (<Array>y).ptr[0])))


def where(cond, x, y):
    """Elements of x where cond is true, else of y."""
    cdef Array c = _arr(cond)
    xx, yy = _pair(x, y)
    return wrap(heap(nops.where(c.ptr[0], (<Array>xx).ptr[0], (<Array>yy).ptr[0])))


# ---- shape ----

def reshape(a, shape):
    return wrap(heap(nops.reshape(handle(_arr(a))[0], _shape(shape))))


def transpose(a, axes=None):
    if axes is None:
        return wrap(heap(nops.transpose(handle(_arr(a))[0])))
    return wrap(heap(nops.transpose(handle(_arr(a))[0], _ints(axes))))


def broadcast_to(a, shape):
    return wrap(heap(nops.broadcast_to(handle(_arr(a))[0], _shape(shape))))


def broadcast_arrays(*arrays):
    import numpy as np
    shape = np.broadcast_shapes(*[tuple(_arr(a).shape) for a in arrays])
    return [broadcast_to(a, shape) for a in arrays]


def astype(a, dtype):
    cdef Dtype d = as_dtype(dtype)
    return wrap(heap(nops.astype(handle(_arr(a))[0], na.dtype_from_code(d.code))))


def take(a, indices, axis=None):
    cdef Array x = _arr(a)
    if isinstance(indices, int):
        if axis is None:
            return wrap(heap(nops.take(x.ptr[0], <int>indices, 0)))  # flat index
        return wrap(heap(nops.take(x.ptr[0], <int>indices, <int>axis)))
    cdef Array i = _arr(indices)
    if axis is None:
        return wrap(heap(nops.take(x.ptr[0], i.ptr[0])))
    return wrap(heap(nops.take(x.ptr[0], i.ptr[0], <int>axis)))


def stack(arrays, axis=0):
    arrs = [expand_dims(a, axis) for a in arrays]
    return concatenate(arrs, axis)


def expand_dims(a, axis):
    if isinstance(axis, int):
        return wrap(heap(nops.expand_dims(handle(_arr(a))[0], <int>axis)))
    return wrap(heap(nops.expand_dims(handle(_arr(a))[0], _ints(axis))))


def concatenate(arrays, axis=0):
    cdef vector[na.array] v = _arrays(arrays)
    return wrap(heap(nops.concatenate(v, <int>axis)))
