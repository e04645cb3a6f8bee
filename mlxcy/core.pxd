# cython: language_level=3
# The Cython-level API of mlxcy's core: the Array extension type owning one
# native mlx::core::array, and the helpers other Cython modules use to move
# between Array objects and native arrays with no Python overhead.
#
#     from mlxcy.core cimport Array, wrap, handle
#     from mlxcy.native cimport ops as nops
#     cdef Array c = wrap(heap(nops.add(handle(a)[0], handle(b)[0])))
from mlxcy.native cimport array as na


cdef class Dtype:
    cdef readonly int code
    cdef readonly str name
    cdef readonly int size


cdef class Array:
    cdef na.array* ptr
    cdef int exports          # live buffer-protocol views; free() waits for them
    cdef void _replace(self, na.array* p) noexcept


cdef Dtype dtype_from_native(na.Dtype d)
cdef Dtype as_dtype(object obj)
cdef Array to_array(object obj, object dtype=*)
cdef Array scalar_like(object obj, na.array* like)
cdef Array operand(object obj, na.array* like)
cdef na.array* freed_error() except NULL
cdef Array wrap_new(na.array a)


cdef inline Array wrap(na.array* p):
    """Give ownership of a heap-allocated native array to a new Array."""
    cdef Array r = Array.__new__(Array)
    r.ptr = p
    return r


cdef inline na.array* handle(Array a) except NULL:
    """The live native array behind `a`; raises if `a` was freed."""
    if a.ptr == NULL:
        return freed_error()
    return a.ptr

