# cython: language_level=3
# The Cython-level API of mlxcy.transforms: differentiate and compile *native*
# functions -- cdef functions over std::vector<mlx::core::array> -- with no
# Python object made per op or per call.
#
# A native function has the signature
#
#     cdef vector[na.array] f(const vector[na.array]& inputs, void* ctx) except *
#
# It is called with the GIL held (MLX may call it while tracing, and again when
# a checkpoint recomputes); `ctx` is any state it needs. It reports failure by
# raising (any MLX op declared `except +` already does), and that exception
# comes out of grad_native & co. unchanged.  If `ctx` points into a Python
# object, pass that object as `owner`: it is kept alive as long as MLX holds a
# copy of the function (the compile cache, a checkpoint in a graph).
#
#     from mlxcy.transforms cimport grad_native
#     cdef vector[na.array] g = grad_native(f, NULL, inputs, argnums)
from libc.stdint cimport uintptr_t
from libcpp.pair cimport pair
from libcpp.vector cimport vector

from mlxcy.native cimport array as na
from mlxcy.native.transforms cimport NativeFn, Compiled

ctypedef vector[na.array] (*native_fn)(const vector[na.array]&, void*) except *


cdef class NativeCompiled:
    """A compiled native function; call it from Cython with .call(inputs)."""
    cdef Compiled* impl
    cdef object owner
    cdef vector[na.array] call(self, const vector[na.array]& inputs) except *


# Gradients of the first output (a scalar) with respect to inputs[argnums],
# in increasing argnum order (MLX sorts and de-duplicates argnums).
cdef vector[na.array] grad_native(NativeFn fn, void* ctx, const vector[na.array]& inputs,
                                  const vector[int]& argnums, object owner=*) except *
# (outputs, gradients) as above.
cdef pair[vector[na.array], vector[na.array]] value_and_grad_native(
    NativeFn fn, void* ctx, const vector[na.array]& inputs, const vector[int]& argnums,
    object owner=*) except *
# (outputs, vector-Jacobian products w.r.t. every primal).
cdef pair[vector[na.array], vector[na.array]] vjp_native(
    NativeFn fn, void* ctx, const vector[na.array]& primals,
    const vector[na.array]& cotangents, object owner=*) except *
# (outputs, Jacobian-vector products).
cdef pair[vector[na.array], vector[na.array]] jvp_native(
    NativeFn fn, void* ctx, const vector[na.array]& primals,
    const vector[na.array]& tangents, object owner=*) except *
cdef NativeCompiled compile_native(NativeFn fn, void* ctx, bint shapeless=*, object owner=*)
