# cython: language_level=3, cpp_locals=True, boundscheck=False, wraparound=False
"""Native floors for the binding-overhead benchmark (benchmarks/overhead.py).

Each timer builds the same lazy MLX graph as one case of that benchmark, by
calling the MLX C++ ops from a Cython loop with no Python object made per
iteration, and returns the seconds per iteration.  What a binding adds on top
of this floor is its overhead.  Like a C++ caller, each iteration builds the
op's arguments (Shapes, scalar arrays) and lets the result go out of scope; no
result is moved to the heap (a heap copy is part of a binding's cost, not of
MLX's).  Built by benchmarks/build_native_timers.py; not part of the package.
"""
from libc.stdint cimport int64_t

from mlxcy.core cimport Array, handle
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops

from time import perf_counter

# The cases of benchmarks/overhead.py, in its order.
CASES = ("add", "matmul", "reshape", "slice", "chain")


def time_add(Array a, Array b, int64_t n):
    """Seconds per `mlx::core::add(a, b)`."""
    cdef na.array* pa = handle(a)
    cdef na.array* pb = handle(b)
    cdef int64_t i
    cdef na.array r = pa[0]
    t0 = perf_counter()
    for i in range(n):
        r = nops.add(pa[0], pb[0])
    return (perf_counter() - t0) / n


def time_matmul(Array a, Array b, int64_t n):
    """Seconds per `mlx::core::matmul(a, b)`."""
    cdef na.array* pa = handle(a)
    cdef na.array* pb = handle(b)
    cdef int64_t i
    cdef na.array r = pa[0]
    t0 = perf_counter()
    for i in range(n):
        r = nops.matmul(pa[0], pb[0])
    return (perf_counter() - t0) / n


def time_reshape(Array a, int64_t n):
    """Seconds per `mlx::core::reshape(a, {256})` (a has 256 elements)."""
    cdef na.array* pa = handle(a)
    cdef int64_t i
    cdef na.array r = pa[0]
    t0 = perf_counter()
    for i in range(n):
        r = nops.reshape(pa[0], na.shape1(256))
    return (perf_counter() - t0) / n


def time_slice(Array a, int64_t n):
    """Seconds per `mlx::core::slice(a, {2, 0}, {10, 15}, {1, 2})`: a[2:10, ::2]
    of a 16x16 array (rows 2..9, every other column)."""
    cdef na.array* pa = handle(a)
    cdef int64_t i
    cdef na.array r = pa[0]
    if pa.ndim() != 2 or pa.shape(0) != 16 or pa.shape(1) != 16:
        raise ValueError("time_slice: expected a 16x16 array")
    t0 = perf_counter()
    for i in range(n):
        r = nops.slice(pa[0], na.shape2(2, 0), na.shape2(10, 15), na.shape2(1, 2))
    return (perf_counter() - t0) / n


def time_chain(Array a, Array b, int64_t n):
    """Seconds per 10-op chain, the `chain` of benchmarks/overhead.py:
    y = a + b; y = y * a; y = y - b; y = y @ a; y = y + 1.0; y = y * 0.5;
    y = -y; y = y.T; y = y / b; y + a.  Python float scalars become float32
    scalar arrays, built in the loop as a C++ caller writing `y + 1.0f` would."""
    cdef na.array* p = handle(a)
    cdef na.array* q = handle(b)
    cdef int64_t i
    cdef na.array r = p[0]
    t0 = perf_counter()
    for i in range(n):
        r = nops.add(
            nops.divide(
                nops.transpose(
                    nops.negative(
                        nops.multiply(
                            nops.add(
                                nops.matmul(
                                    nops.subtract(nops.multiply(nops.add(p[0], q[0]), p[0]), q[0]),
                                    p[0]),
                                na.array(<double>1.0, na.float32)),
                            na.array(<double>0.5, na.float32)))),
                q[0]),
            p[0])
    return (perf_counter() - t0) / n
