# cython: language_level=3, cpp_locals=True
"""A native function differentiated and compiled through mlxcy.transforms'
Cython API: no Python object is made inside the function or per op."""
from libcpp.pair cimport pair
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap
from mlxcy.transforms cimport (NativeCompiled, compile_native, grad_native,
                               value_and_grad_native, vjp_native)


cdef struct Ctx:
    double scale


cdef vector[na.array] loss(const vector[na.array]& xs, void* ctx) except *:
    """scale * sum(exp(x) * w): a scalar from inputs (x, w)."""
    cdef double scale = (<Ctx*>ctx).scale
    cdef vector[int] axes = vector[int]()
    axes.push_back(0)
    cdef vector[na.array] out = vector[na.array]()
    out.push_back(nops.multiply(nops.sum(nops.multiply(nops.exp(xs[0]), xs[1]), axes, False),
                                na.array(scale, na.float32)))
    return out


cdef vector[na.array] failing(const vector[na.array]& xs, void* ctx) except *:
    raise KeyError("raised inside a native function")


cdef list _arrays(const vector[na.array]& v):
    cdef size_t i
    return [wrap(heap(v[i])) for i in range(v.size())]


cdef vector[na.array] _inputs(list xs) except *:
    cdef vector[na.array] v = vector[na.array]()
    for x in xs:
        v.push_back(handle(<Array>x)[0])
    return v


def grad_loss(Array x, Array w, double scale, argnums):
    cdef Ctx ctx
    ctx.scale = scale
    cdef vector[int] nums = vector[int]()
    for n in argnums:
        nums.push_back(n)
    return _arrays(grad_native(loss, &ctx, _inputs([x, w]), nums))


def value_and_grad_loss(Array x, Array w, double scale):
    cdef Ctx ctx
    ctx.scale = scale
    cdef vector[int] nums = vector[int]()
    nums.push_back(0)
    cdef pair[vector[na.array], vector[na.array]] r = value_and_grad_native(
        loss, &ctx, _inputs([x, w]), nums)
    return _arrays(r.first)[0], _arrays(r.second)


def vjp_loss(Array x, Array w, double scale, Array cotangent):
    cdef Ctx ctx
    ctx.scale = scale
    cdef pair[vector[na.array], vector[na.array]] r = vjp_native(
        loss, &ctx, _inputs([x, w]), _inputs([cotangent]))
    return _arrays(r.first), _arrays(r.second)


cdef class Holder:
    """Owns the context of a compiled native function."""
    cdef Ctx ctx


def compiled_loss(double scale):
    cdef Holder h = Holder()
    h.ctx.scale = scale
    return compile_native(loss, &h.ctx, False, h)


def call_compiled(NativeCompiled c, Array x, Array w):
    return _arrays(c.call(_inputs([x, w])))[0]


def grad_failing(Array x):
    cdef vector[int] nums = vector[int]()
    nums.push_back(0)
    return _arrays(grad_native(failing, NULL, _inputs([x]), nums))
