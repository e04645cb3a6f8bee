# cython: language_level=3, cpp_locals=True
"""Function transformations: eval, grad, vjp, jvp, vmap, checkpoint, compile.

Transformed Python functions take Arrays -- or lists, tuples and dicts of
Arrays (the "tree" of an argument) -- plus any other Python values, which are
passed through unchanged; they return an Array or a tree of Arrays.  MLX calls
the function while tracing it; an exception raised inside comes out of the
transformation as that same exception object.

Arrays the function captures from outside (instead of receiving them as
arguments) are constants to MLX: they get no gradient, and a compiled
function keeps the values they had when it was traced.
"""
cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t, uintptr_t
from libcpp.pair cimport pair
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, handle, to_array
from mlxcy.native cimport array as na
from mlxcy.native cimport memory as nmem
from mlxcy.native cimport transforms as ntr
from mlxcy.native.array cimport heap
from mlxcy.native.transforms cimport ArrayFn, NativeFn

import functools

from mlxcy.core import physical_memory

__all__ = ["eval", "async_eval", "grad", "value_and_grad", "vjp", "jvp", "vmap",
           "checkpoint", "compile", "stop_gradient", "disable_compile",
           "enable_compile", "CompiledFunction"]


# ------------------------------------------------------------------ trees ----
# A tree's structure ("spec") is a hashable tuple; its Arrays travel apart as
# a flat list of leaves.  Non-Array leaves are kept in the spec as constants
# together with their type (so 1, 1.0 and True are different constants).

cdef object _LEAF = "<leaf>"
cdef object _CONST = "<const>"


cdef object _flatten(object tree, list leaves):
    """Append the Arrays of `tree` to `leaves`; return its structure."""
    t = type(tree)
    if t is Array:
        leaves.append(tree)
        return _LEAF
    if t is tuple or t is list:
        return (t, tuple([_flatten(x, leaves) for x in tree]))
    if t is dict:
        keys = tuple(tree)
        return (dict, keys, tuple([_flatten(tree[k], leaves) for k in keys]))
    return (_CONST, t, tree)


cdef object _unflatten(object spec, object leaves):
    """Rebuild a tree from its structure and an iterator over its leaves."""
    if spec is _LEAF:
        return next(leaves)
    kind = spec[0]
    if kind is _CONST:
        return spec[2]
    if kind is dict:
        return {k: _unflatten(s, leaves) for k, s in zip(spec[1], spec[2])}
    items = [_unflatten(s, leaves) for s in spec[1]]
    return tuple(items) if kind is tuple else items


cdef Py_ssize_t _count_leaves(object spec):
    if spec is _LEAF:
        return 1
    if spec[0] is _CONST:
        return 0
    cdef Py_ssize_t n = 0
    for s in spec[-1]:
        n += _count_leaves(s)
    return n


cdef object _flatten_args(tuple args, dict kwargs, list leaves, list bounds):
    """Structure of a call (positional args, keyword args); `bounds` gets
    each positional argument's (first, end) range in `leaves`."""
    specs = []
    for a in args:
        start = len(leaves)
        specs.append(_flatten(a, leaves))
        bounds.append((start, len(leaves)))
    return ((tuple, tuple(specs)), _flatten(kwargs, leaves))


cdef vector[na.array] _to_vector(list arrays) except *:
    cdef vector[na.array] v = vector[na.array]()
    for a in arrays:
        v.push_back(handle(<Array>a)[0])
    return v


cdef list _to_list(const vector[na.array]& v):
    cdef size_t i
    return [wrap(new na.array(v[i])) for i in range(v.size())]


cdef vector[na.array] _array_args(object seq, str fn, str what) except *:
    """A flat list/tuple of Arrays (as vjp/jvp take them)."""
    if not isinstance(seq, (list, tuple)):
        raise TypeError(f"{fn}: {what} must be a list or tuple of Arrays, "
                        f"not {type(seq).__name__}")
    for i, a in enumerate(seq):
        if type(a) is not Array:
            raise TypeError(f"{fn}: {what}[{i}] must be an Array, not {type(a).__name__}")
    return _to_vector(list(seq))


# -------------------------------------------------------- Python closures ----

@cython.final
cdef class _Fun:
    """What a PyClosure calls: the user's function and the structure of the
    call being traced; records the structure of what the function returned."""
    cdef object fn
    cdef object in_spec
    cdef object out_spec
    cdef str scalar_for      # name of the transformation needing a scalar output
    cdef bint ran

    def __cinit__(self, fn, in_spec, scalar_for=None):
        if not callable(fn):
            raise TypeError(f"expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.in_spec = in_spec
        self.scalar_for = scalar_for

    cdef int run(self, const vector[na.array]& inputs, vector[na.array]& outputs) except -1:
        it = iter(_to_list(inputs))
        args = _unflatten(self.in_spec[0], it)
        kwargs = _unflatten(self.in_spec[1], it)
        out = self.fn(*args, **kwargs)
        if self.scalar_for is not None:
            _check_scalar(out, self.scalar_for)
        leaves = []
        self.out_spec = _flatten(out, leaves)
        self.ran = True
        for a in leaves:
            outputs.push_back(handle(<Array>a)[0])
        return 0


cdef int _trampoline(PyObject* self, const vector[na.array]& inputs,
                     vector[na.array]& outputs) except -1:
    return (<_Fun>self).run(inputs, outputs)


cdef _check_scalar(object out, str fn):
    first = out[0] if type(out) in (tuple, list) and len(out) else out
    if type(first) is not Array:
        raise TypeError(f"{fn}: the function must return a scalar Array, or a tuple or "
                        f"list whose first item is one; it returned {type(first).__name__}")
    if (<Array>first).ndim != 0:
        raise ValueError(f"{fn}: the function must return a scalar (0-d) Array to "
                         f"differentiate; it returned shape {(<Array>first).shape}")


cdef class _FnBox:
    """Owns one heap ArrayFn for the duration of a transformation."""
    cdef ArrayFn* fn

    def __dealloc__(self):
        if self.fn != NULL:
            del self.fn


cdef _FnBox _box(_Fun f):
    cdef _FnBox b = _FnBox.__new__(_FnBox)
    b.fn = ntr.py_closure(<PyObject*>f, _trampoline)
    return b


# --------------------------------------------------------------- evaluation --

cdef size_t _PHYS = physical_memory()


cdef int _check_fits(const vector[na.array]& v) except -1:
    """MLX 0.32's CPU allocator does not check for failed allocations: an
    output larger than the machine's memory crashes its worker thread.  Refuse
    such outputs up front (intermediates cannot be checked this way)."""
    cdef size_t i
    if _PHYS == 0:
        return 0
    for i in range(v.size()):
        if not v[i].is_available() and v[i].nbytes() > _PHYS:
            raise MemoryError(f"eval: an output of {v[i].nbytes()} bytes exceeds this "
                              f"machine's {_PHYS} bytes of memory")
    return 0


cdef list _collect(tuple trees):
    leaves = []
    for t in trees:
        _flatten(t, leaves)
    return leaves


def eval(*arrays):
    """Evaluate Arrays (or lists, tuples, dicts of them) now, releasing the GIL
    while MLX computes.  Other values are ignored."""
    cdef vector[na.array] v = _to_vector(_collect(arrays))
    _check_fits(v)
    with nogil:
        ntr.eval(v)


def async_eval(*arrays):
    """Start evaluating Arrays (or trees of them) and return at once; a later
    eval(), .item() or .numpy() waits for the result."""
    cdef vector[na.array] v = _to_vector(_collect(arrays))
    _check_fits(v)
    with nogil:
        ntr.async_eval(v)


def stop_gradient(x):
    """x, but with no gradient flowing through it."""
    cdef Array a = x if type(x) is Array else to_array(x)
    return wrap(heap(ntr.stop_gradient(handle(a)[0])))


# ---------------------------------------------------------------- gradients --

cdef tuple _argnums(object argnums):
    """(tuple of ints, whether a single int was given)."""
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return (argnums,), True
    if isinstance(argnums, (tuple, list)) and argnums and all(
            isinstance(n, int) and not isinstance(n, bool) for n in argnums):
        return tuple(argnums), False
    raise TypeError(f"argnums must be an int or a non-empty tuple of ints, not {argnums!r}")


cdef tuple _value_and_grad(object fun, tuple nums, bint single, tuple args, dict kwargs,
                           str name):
    leaves, bounds = [], []
    in_spec = _flatten_args(args, kwargs, leaves, bounds)
    cdef Py_ssize_t nargs = len(args)
    norm = []
    for n in nums:
        if n >= nargs or n < -nargs:
            raise ValueError(f"{name}: argnums {n} is out of range for a call with "
                             f"{nargs} positional argument(s)")
        n = n % nargs
        if bounds[n][0] == bounds[n][1]:
            raise ValueError(f"{name}: argument {n} holds no Array to differentiate")
        norm.append(n)
    # MLX sorts and de-duplicates the leaves it differentiates.
    wanted = sorted({i for n in norm for i in range(*bounds[n])})
    cdef vector[int] leaf_nums = vector[int]()
    for i in wanted:
        leaf_nums.push_back(i)
    cdef _Fun f = _Fun(fun, in_spec, name)
    cdef _FnBox box = _box(f)
    cdef vector[na.array] inputs = _to_vector(leaves)
    cdef pair[vector[na.array], vector[na.array]] res = ntr.value_and_grad(
        box.fn[0], inputs, leaf_nums)
    value = _unflatten(f.out_spec, iter(_to_list(res.first)))
    by_leaf = dict(zip(wanted, _to_list(res.second)))
    arg_specs = in_spec[0][1]
    grads = tuple([_unflatten(arg_specs[n], iter([by_leaf[i] for i in range(*bounds[n])]))
                   for n in norm])
    return value, (grads[0] if single else grads)


def value_and_grad(fun, argnums=0):
    """Return a function computing (fun(*args), gradient of fun w.r.t. args[argnums]).

    fun must return a scalar Array, or a tuple/list whose first item is the
    scalar to differentiate (the other items are returned, without gradient).
    With an int argnums the gradient has the structure of that argument (an
    Array, or a list/tuple/dict of Arrays); with a tuple it is a tuple of those.
    """
    nums, single = _argnums(argnums)

    def value_and_grad_fn(*args, **kwargs):
        return _value_and_grad(fun, nums, single, args, kwargs, "value_and_grad")
    return _named(value_and_grad_fn, fun)


def grad(fun, argnums=0):
    """Return a function computing the gradient of scalar-valued fun w.r.t.
    args[argnums] (see value_and_grad)."""
    nums, single = _argnums(argnums)

    def grad_fn(*args, **kwargs):
        return _value_and_grad(fun, nums, single, args, kwargs, "grad")[1]
    return _named(grad_fn, fun)


cdef object _named(object wrapper, object fun):
    try:
        functools.update_wrapper(wrapper, fun)
    except (AttributeError, TypeError):
        pass
    return wrapper


cdef tuple _linearize(object fun, object primals, object others, bint forward):
    name = "jvp" if forward else "vjp"
    cdef vector[na.array] p = _array_args(primals, name, "primals")
    cdef vector[na.array] c = _array_args(others, name, "tangents" if forward else "cotangents")
    leaves, bounds = [], []
    cdef _Fun f = _Fun(fun, _flatten_args(tuple(primals), {}, leaves, bounds))
    cdef _FnBox box = _box(f)
    cdef pair[vector[na.array], vector[na.array]] res
    if forward:
        res = ntr.jvp(box.fn[0], p, c)
    else:
        res = ntr.vjp(box.fn[0], p, c)
    return _to_list(res.first), _to_list(res.second)


def vjp(fun, primals, cotangents):
    """Vector-Jacobian product: (outputs, vjps), both lists.

    fun takes len(primals) Arrays and returns an Array or a list/tuple of
    them; cotangents has one Array per output; vjps one per primal."""
    return _linearize(fun, primals, cotangents, False)


def jvp(fun, primals, tangents):
    """Jacobian-vector product: (outputs, jvps), both lists.

    fun takes len(primals) Arrays; tangents has one Array per primal; jvps
    one per output."""
    return _linearize(fun, primals, tangents, True)


# --------------------------------------------------------------------- vmap --

cdef list _per_item(object axes, Py_ssize_t n, str what):
    if axes is None or isinstance(axes, int):
        return [axes] * n
    if isinstance(axes, (tuple, list)) and len(axes) == n:
        return list(axes)
    raise ValueError(f"vmap: {what} must be an int, None, or a tuple with one entry "
                     f"per {'argument' if what == 'in_axes' else 'output'} ({n}); got {axes!r}")


cdef int _norm_axis(object ax, int ndim, str what) except -2:
    """MLX writes "not mapped" as -1, so negative axes are made positive here."""
    if ax is None:
        return -1
    if not isinstance(ax, int) or ax < -ndim or ax >= ndim:
        raise ValueError(f"vmap: {what} {ax!r} is invalid for an array with {ndim - 1} "
                         f"dimension(s) per item" if what == "out_axes" else
                         f"vmap: {what} {ax!r} is out of range for an input with "
                         f"{ndim} dimension(s)")
    return ax + ndim if ax < 0 else ax


cdef object _vmap_call(object fun, object in_axes, object out_axes, tuple args):
    leaves, bounds = [], []
    in_spec = _flatten_args(args, {}, leaves, bounds)
    cdef vector[int] ia = vector[int]()
    for (lo, hi), ax in zip(bounds, _per_item(in_axes, len(args), "in_axes")):
        for i in range(lo, hi):
            ia.push_back(_norm_axis(ax, (<Array>leaves[i]).ndim, "in_axes"))
    cdef vector[na.array] inputs = _to_vector(leaves)
    cdef _Fun f = _Fun(fun, in_spec)
    cdef _FnBox box = _box(f)
    cdef pair[vector[na.array], vector[na.array]] tr = ntr.vmap_trace(box.fn[0], inputs, ia)
    # One out axis per top-level output, spread over that output's leaves.
    spec = f.out_spec
    tops = list(spec[1]) if spec is not _LEAF and spec[0] in (tuple, list) else [spec]
    cdef vector[int] oa = vector[int]()
    cdef size_t k = 0
    for sub, ax in zip(tops, _per_item(out_axes, len(tops), "out_axes")):
        for _ in range(_count_leaves(sub)):
            if ax is None:
                raise ValueError("vmap: out_axes cannot be None")
            oa.push_back(_norm_axis(ax, tr.second[k].ndim() + 1, "out_axes"))
            k += 1
    cdef vector[na.array] outs = ntr.vmap_replace(inputs, tr.first, tr.second, ia, oa)
    return _unflatten(spec, iter(_to_list(outs)))


def vmap(fun, in_axes=0, out_axes=0):
    """Vectorize fun over an axis of its inputs.

    in_axes: an int (every argument), or a tuple with an int or None (not
    mapped) per positional argument.  out_axes: an int, or a tuple with one
    per returned item.  Negative axes count from the end."""
    def vmapped(*args):
        return _vmap_call(fun, in_axes, out_axes, args)
    return _named(vmapped, fun)


# --------------------------------------------------------------- checkpoint --

cdef object _checkpoint_call(object fun, tuple args, dict kwargs):
    leaves = []
    cdef _Fun f = _Fun(fun, _flatten_args(args, kwargs, leaves, []))
    cdef _FnBox box = _box(f)
    cdef _FnBox ck = _FnBox.__new__(_FnBox)
    ck.fn = ntr.checkpoint(box.fn[0])
    cdef vector[na.array] outs = ntr.call(ck.fn[0], _to_vector(leaves))
    return _unflatten(f.out_spec, iter(_to_list(outs)))


def checkpoint(fun):
    """Return fun wrapped so that, under grad, its intermediates are not kept
    but recomputed (by calling fun again) when the gradient needs them."""
    def checkpointed(*args, **kwargs):
        return _checkpoint_call(fun, args, kwargs)
    return _named(checkpointed, fun)


# ------------------------------------------------------------------ compile --

@cython.final
cdef class CompiledFunction:
    """A function compiled by mlxcy.compile().  Calls with the same argument
    structure, Python constants and (unless shapeless) input shapes and dtypes
    reuse one traced and optimized graph."""
    cdef ntr.Compiled* impl
    cdef _Fun fun
    cdef dict out_specs
    cdef readonly bint shapeless
    cdef object __weakref__

    def __init__(self, *args, **kwargs):
        raise TypeError("use mlxcy.compile(fun) to make a CompiledFunction")

    def __dealloc__(self):
        # Erases this function's entries in MLX's compile cache.
        if self.impl != NULL:
            del self.impl
            self.impl = NULL

    @property
    def __wrapped__(self):
        return self.fun.fn

    def __repr__(self):
        return f"<mlxcy.CompiledFunction of {self.fun.fn!r}>"

    def __call__(self, *args, **kwargs):
        leaves = []
        in_spec = _flatten_args(args, kwargs, leaves, [])
        try:
            key = <uint64_t>(hash(in_spec) & 0xFFFFFFFFFFFFFFFF)
        except TypeError:
            raise TypeError("compile: the non-Array arguments of a compiled function must "
                            "be hashable (they are part of the compiled graph's key)") from None
        cdef vector[na.array] inputs = _to_vector(leaves)
        self.fun.in_spec = in_spec
        self.fun.ran = False
        cdef vector[na.array] outs = self.impl.call(inputs, key)
        if self.fun.ran:
            self.out_specs[in_spec] = self.fun.out_spec
        return _unflatten(self.out_specs[in_spec], iter(_to_list(outs)))


def compile(fun, shapeless=False):
    """Compile fun: the first call traces it into a graph that MLX simplifies
    and fuses; later calls with matching inputs run that graph without calling
    fun.  shapeless=True reuses the graph when only input shapes change (fun
    must then not depend on shapes).  fun should be pure: side effects happen
    only while tracing."""
    cdef CompiledFunction c = CompiledFunction.__new__(CompiledFunction)
    c.fun = _Fun(fun, None)
    c.out_specs = {}
    c.shapeless = shapeless
    cdef _FnBox box = _box(c.fun)
    # The compile cache is keyed by this object's address: unique while it
    # lives, and its entries are erased when it dies.
    c.impl = new ntr.Compiled(box.fn[0], <uintptr_t><PyObject*>c, shapeless)
    return c


def disable_compile():
    """Make compile() a no-op wrapper (functions run uncompiled)."""
    ntr.disable_compile()


def enable_compile():
    """Undo disable_compile() (and the MLX_DISABLE_COMPILE environment variable)."""
    ntr.enable_compile()


# ------------------------------------------------------- native functions ----

cdef class NativeCompiled:
    """A native function compiled by compile_native() (see transforms.pxd)."""

    def __dealloc__(self):
        if self.impl != NULL:
            del self.impl
            self.impl = NULL

    cdef vector[na.array] call(self, const vector[na.array]& inputs) except *:
        return self.impl.call(inputs, 0)

    def __call__(self, *arrays):
        """Call from Python with Arrays; returns a list of Arrays."""
        cdef vector[na.array] outs = self.call(_to_vector(list(arrays)))
        return _to_list(outs)


cdef _FnBox _native_box(NativeFn fn, void* ctx, object owner):
    cdef _FnBox b = _FnBox.__new__(_FnBox)
    cdef PyObject* o = NULL
    if owner is not None:
        o = <PyObject*>owner
    b.fn = ntr.native_closure(fn, ctx, o)
    return b


cdef pair[vector[na.array], vector[na.array]] value_and_grad_native(
        NativeFn fn, void* ctx, const vector[na.array]& inputs, const vector[int]& argnums,
        object owner=None) except *:
    cdef _FnBox box = _native_box(fn, ctx, owner)
    return ntr.value_and_grad(box.fn[0], inputs, argnums)


cdef vector[na.array] grad_native(NativeFn fn, void* ctx, const vector[na.array]& inputs,
                                  const vector[int]& argnums, object owner=None) except *:
    return value_and_grad_native(fn, ctx, inputs, argnums, owner).second


cdef pair[vector[na.array], vector[na.array]] vjp_native(
        NativeFn fn, void* ctx, const vector[na.array]& primals,
        const vector[na.array]& cotangents, object owner=None) except *:
    cdef _FnBox box = _native_box(fn, ctx, owner)
    return ntr.vjp(box.fn[0], primals, cotangents)


cdef pair[vector[na.array], vector[na.array]] jvp_native(
        NativeFn fn, void* ctx, const vector[na.array]& primals,
        const vector[na.array]& tangents, object owner=None) except *:
    cdef _FnBox box = _native_box(fn, ctx, owner)
    return ntr.jvp(box.fn[0], primals, tangents)


cdef NativeCompiled compile_native(NativeFn fn, void* ctx, bint shapeless=False,
                                   object owner=None):
    cdef NativeCompiled c = NativeCompiled.__new__(NativeCompiled)
    c.owner = owner
    cdef _FnBox box = _native_box(fn, ctx, owner)
    c.impl = new ntr.Compiled(box.fn[0], <uintptr_t><PyObject*>c, shapeless)
    return c
