# Declarations mirroring mlx/transforms.h, mlx/transforms_impl.h and mlx/compile.h,
# plus the closures of include/mlxcy/closure.h that let those transformations
# call Python or native Cython functions.
#
# Anything that may call back into Python is declared `except +raise_py_error`:
# a Python exception raised in the callback comes out unchanged, and MLX's own
# C++ exceptions map as with a plain `except +`.
from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t, uintptr_t
from libcpp cimport bool
from libcpp.pair cimport pair
from libcpp.vector cimport vector

from mlxcy.native.array cimport array
from mlxcy.native.ops cimport stop_gradient


cdef extern from "mlxcy/closure.h" namespace "mlxcy":
    cdef void raise_py_error()

    ctypedef int (*PyTrampoline)(PyObject*, const vector[array]&, vector[array]&) except -1
    ctypedef vector[array] (*NativeFn)(const vector[array]&, void*) except *

    cdef cppclass ArrayFn:
        pass

    cdef cppclass Compiled:
        Compiled(const ArrayFn&, uintptr_t, bool) except +
        vector[array] call(const vector[array]&, uint64_t) except +raise_py_error

    ArrayFn* py_closure(PyObject*, PyTrampoline) except +
    ArrayFn* native_closure(NativeFn, void*, PyObject*) except +
    vector[array] call(const ArrayFn&, const vector[array]&) except +raise_py_error
    pair[vector[array], vector[array]] value_and_grad(
        const ArrayFn&, const vector[array]&, const vector[int]&) except +raise_py_error
    ArrayFn* checkpoint(const ArrayFn&) except +raise_py_error


cdef extern from "mlx/transforms.h" namespace "mlx::core":
    void eval(vector[array]) except + nogil
    void async_eval(vector[array]) except + nogil
    pair[vector[array], vector[array]] vjp(
        const ArrayFn&, const vector[array]&, const vector[array]&) except +raise_py_error
    pair[vector[array], vector[array]] jvp(
        const ArrayFn&, const vector[array]&, const vector[array]&) except +raise_py_error


cdef extern from "mlx/transforms_impl.h" namespace "mlx::core::detail":
    pair[vector[array], vector[array]] vmap_trace(
        const ArrayFn&, const vector[array]&, const vector[int]&) except +raise_py_error
    vector[array] vmap_replace(
        const vector[array]&, const vector[array]&, const vector[array]&,
        const vector[int]&, const vector[int]&) except +


cdef extern from "mlx/compile.h" namespace "mlx::core":
    void disable_compile() except +
    void enable_compile() except +
