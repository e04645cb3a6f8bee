# cython: language_level=3, cpp_locals=True
"""Array operations (mirrors mlx/ops.h).  Arguments may be Arrays, Python
scalars, lists or numpy arrays; results are new lazy Arrays.

Signatures follow mlx.core's Python API (streams omitted).  When every array
argument is already an Array, an op creates no Python object but its result.
"""
import builtins as _b

from cpython.number cimport PyNumber_Index
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport M_SQRT1_2, M_2_SQRTPI
from libcpp cimport bool
from libcpp.string cimport string
cimport cython
from libc.stdint cimport int32_t, int64_t
from libcpp.utility cimport move
from libcpp.vector cimport vector

from mlxcy.core cimport Array, wrap, wrap_new, handle, to_array, operand, as_dtype, Dtype
from mlxcy.native cimport array as na
from mlxcy.native cimport ops as nops
from mlxcy.native.array cimport heap

from mlxcy.core import _check_index_bounds, _register_methods

# Floating dtype codes (mlx::core::Dtype::Val): float16, float32, float64, bfloat16.
cdef int F16 = 9, F32 = 10, F64 = 11, BF16 = 12


# ------------------------------------------------------------- argument glue

cdef inline Array _arr(object x):
    """x as an Array (converted if it is not one).  Callers must keep the
    result in a local: a temporary Array frees its native array on release."""
    if type(x) is Array:
        handle(<Array>x)
        return <Array>x
    return to_array(x)


cdef int _int(object v, str name) except? -1:
    """A C int from v (anything with __index__, not floats), or a TypeError
    naming the argument."""
    try:
        return v if type(v) is int else PyNumber_Index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None


cdef inline int _tuple_dims(object dims, int32_t* buf) except -2:
    """A tuple of at most 8 exact ints into buf; returns its length, or -1
    when dims is anything else (for the caller's general path).  reshape
    builds its Shape straight from buf: one allocation, no vector returned
    by value and copied (as _shape's result is)."""
    if type(dims) is not tuple:
        return -1
    cdef Py_ssize_t i, n = PyTuple_GET_SIZE(dims)
    if n > 8:
        return -1
    for i in range(n):
        d = <object>PyTuple_GET_ITEM(dims, i)
        if type(d) is not int:
            return -1
        buf[i] = <int>d
    return <int>n


cdef int _check_count(const int32_t* d, int n, str name) except -1:
    """Refuse a shape whose element count overflows int64 (MLX would wrap
    its size_t product and allocate too little); -1 entries are skipped."""
    cdef int i
    cdef int64_t count = 1
    cdef int64_t limit = 0x7FFFFFFFFFFFFFFF
    for i in range(n):
        if d[i] > 0:
            if count > limit // d[i]:
                raise ValueError(f"{name}: {[d[j] for j in range(n)]} has more elements "
                                 f"than fit in a 64-bit count")
            count *= d[i]
    return 0


cdef inline int _tuple_dims_checked(object dims, int32_t* buf, str name) except -2:
    cdef int n
    try:
        n = _tuple_dims(dims, buf)
    except OverflowError:
        raise ValueError(f"{name}: dimensions of {dims!r:.100} must fit in int32 "
                         f"(at most 2**31 - 1)") from None
    if n > 0:
        _check_count(buf, n, name)
    return n


cdef na.Shape _shape(object dims, str name="shape") except *:
    cdef int32_t buf[8]
    # Fast path, the usual case: a short tuple of exact ints, converted with
    # no per-element call.  Anything else is parsed as _ints parses axes.
    # Dimensions must fit in int32 and their product in int64.
    cdef int n = _tuple_dims_checked(dims, buf, name)
    if n >= 0:
        return na.make_shape(buf, n)
    cdef vector[int] v
    try:
        v = _ints(dims, name)
    except OverflowError:
        raise ValueError(f"{name}: dimensions of {dims!r:.100} must fit in int32 "
                         f"(at most 2**31 - 1)") from None
    _check_count(<const int32_t*>v.data(), <int>v.size(), name)
    return na.make_shape(<const int32_t*>v.data(), <int>v.size())


cdef vector[int] _ints(object xs, str name="axes") except *:
    cdef vector[int] v = vector[int]()
    if isinstance(xs, int):
        v.push_back(_int(xs, name))
        return v
    try:
        for x in xs:
            v.push_back(_int(x, name))
    except TypeError:
        raise TypeError(f"{name}: expected an int or a sequence of ints, got {xs!r}") from None
    return v


cdef vector[int] _axes(object axis, int ndim) except *:
    """Reduction axes: None means every axis."""
    cdef vector[int] v = vector[int]()
    cdef int i
    if axis is None:
        for i in range(ndim):
            v.push_back(i)
        return v
    return _ints(axis, "axis")


cdef vector[na.array] _arrays(object xs, str name="arrays") except *:
    cdef vector[na.array] v = vector[na.array]()
    cdef Array x
    if isinstance(xs, (Array, str)) or not hasattr(xs, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of arrays, got {type(xs).__name__}")
    for item in xs:
        x = _arr(item)          # held in a local until its array is copied
        v.push_back(x.ptr[0])
    return v


cdef list _list(const vector[na.array]& v):
    cdef size_t i
    return [wrap_new((v[i])) for i in range(v.size())]


cdef int _code(object dtype, int default=-1) except? -2:
    """The dtype code of dtype, or default when dtype is None."""
    if dtype is None:
        if default < 0:
            raise TypeError("dtype: a dtype is required")
        return default
    return as_dtype(dtype).code


cdef string _str(object s, str name) except *:
    if not isinstance(s, str):
        raise TypeError(f"{name}: expected a str, got {type(s).__name__}")
    return s.encode("utf-8")


cdef inline const na.array* _ptr(Array a):
    """The native array of an optional argument; NULL when it is absent."""
    if a is None:
        return NULL
    return a.ptr


cdef inline bint _is_float(const na.array& a):
    cdef int c = na.dtype_code(a.dtype())
    return c == F16 or c == F32 or c == F64 or c == BF16


cdef Array _floating(object a):
    """a as a floating Array (integers and bools become float32)."""
    cdef Array x = _arr(a)
    if _is_float(x.ptr[0]):
        return x
    return wrap_new((nops.astype(x.ptr[0], na.float32)))


# -------------------------------------------------------------- binary ops

cdef enum:
    B_ADD, B_SUB, B_MUL, B_DIV, B_FLOORDIV, B_MOD, B_POW, B_MAX, B_MIN
    B_EQ, B_NE, B_LT, B_LE, B_GT, B_GE
    B_LAND, B_LOR, B_LXOR, B_AND, B_OR, B_XOR, B_LSHIFT, B_RSHIFT
    B_LOGADDEXP, B_ARCTAN2, B_MATMUL, B_INNER, B_OUTER
    B_ARRAY_EQUAL, B_ALLCLOSE, B_ISCLOSE


cdef na.array* _bin(const na.array& x, const na.array& y, int op,
                    double rtol, double atol, bint equal_nan) except NULL:
    if op == B_ADD: return heap(nops.add(x, y))
    if op == B_SUB: return heap(nops.subtract(x, y))
    if op == B_MUL: return heap(nops.multiply(x, y))
    if op == B_DIV: return heap(nops.divide(x, y))
    if op == B_FLOORDIV: return heap(nops.floor_divide(x, y))
    if op == B_MOD: return heap(nops.remainder(x, y))
    if op == B_POW: return heap(nops.power(x, y))
    if op == B_MAX: return heap(nops.maximum(x, y))
    if op == B_MIN: return heap(nops.minimum(x, y))
    if op == B_EQ: return heap(nops.equal(x, y))
    if op == B_NE: return heap(nops.not_equal(x, y))
    if op == B_LT: return heap(nops.less(x, y))
    if op == B_LE: return heap(nops.less_equal(x, y))
    if op == B_GT: return heap(nops.greater(x, y))
    if op == B_GE: return heap(nops.greater_equal(x, y))
    if op == B_LAND: return heap(nops.logical_and(x, y))
    if op == B_LOR: return heap(nops.logical_or(x, y))
    if op == B_LXOR: return heap(nops.logical_xor(x, y))
    if op == B_AND: return heap(nops.bitwise_and(x, y))
    if op == B_OR: return heap(nops.bitwise_or(x, y))
    if op == B_XOR: return heap(nops.bitwise_xor(x, y))
    if op == B_LSHIFT: return heap(nops.left_shift(x, y))
    if op == B_RSHIFT: return heap(nops.right_shift(x, y))
    if op == B_LOGADDEXP: return heap(nops.logaddexp(x, y))
    if op == B_ARCTAN2: return heap(nops.arctan2(x, y))
    if op == B_MATMUL: return heap(nops.matmul(x, y))
    if op == B_INNER: return heap(nops.inner(x, y))
    if op == B_OUTER: return heap(nops.outer(x, y))
    if op == B_ARRAY_EQUAL: return heap(nops.array_equal(x, y, equal_nan))
    if op == B_ALLCLOSE: return heap(nops.allclose(x, y, rtol, atol, equal_nan))
    return heap(nops.isclose(x, y, rtol, atol, equal_nan))


cdef Array _binary(object a, object b, int op, double rtol=1e-5, double atol=1e-8,
                   bint equal_nan=False):
    """Apply a binary op; a Python scalar takes the Array operand's dtype
    (as core's operand() does).  Two Arrays go straight through."""
    cdef Array x, y
    if type(a) is Array:
        x = <Array>a
        y = operand(b, handle(x))
    elif type(b) is Array:
        y = <Array>b
        x = operand(a, handle(y))
    else:
        x = to_array(a)
        y = to_array(b)
    return wrap(_bin(x.ptr[0], y.ptr[0], op, rtol, atol, equal_nan))


def add(a, b):
    """Elementwise a + b (with broadcasting)."""
    return _binary(a, b, B_ADD)

def subtract(a, b):
    """Elementwise a - b."""
    return _binary(a, b, B_SUB)

def multiply(a, b):
    """Elementwise a * b."""
    return _binary(a, b, B_MUL)

def divide(a, b):
    """Elementwise true division a / b (integers give floats)."""
    return _binary(a, b, B_DIV)

def floor_divide(a, b):
    """Elementwise floor(a / b)."""
    return _binary(a, b, B_FLOORDIV)

def remainder(a, b):
    """Elementwise a % b, with the sign of b (as Python and numpy)."""
    return _binary(a, b, B_MOD)

def power(a, b):
    """Elementwise a ** b."""
    return _binary(a, b, B_POW)

def maximum(a, b):
    """Elementwise maximum (NaN propagates)."""
    return _binary(a, b, B_MAX)

def minimum(a, b):
    """Elementwise minimum (NaN propagates)."""
    return _binary(a, b, B_MIN)

def equal(a, b):
    """Elementwise a == b."""
    return _binary(a, b, B_EQ)

def not_equal(a, b):
    """Elementwise a != b."""
    return _binary(a, b, B_NE)

def less(a, b):
    """Elementwise a < b."""
    return _binary(a, b, B_LT)

def less_equal(a, b):
    """Elementwise a <= b."""
    return _binary(a, b, B_LE)

def greater(a, b):
    """Elementwise a > b."""
    return _binary(a, b, B_GT)

def greater_equal(a, b):
    """Elementwise a >= b."""
    return _binary(a, b, B_GE)

def logical_and(a, b):
    """Elementwise logical and (inputs are read as booleans)."""
    return _binary(a, b, B_LAND)

def logical_or(a, b):
    """Elementwise logical or."""
    return _binary(a, b, B_LOR)

def logical_xor(a, b):
    """Elementwise logical exclusive or."""
    return _binary(a, b, B_LXOR)

def bitwise_and(a, b):
    """Elementwise bitwise and of integer (or bool) arrays."""
    return _binary(a, b, B_AND)

def bitwise_or(a, b):
    """Elementwise bitwise or."""
    return _binary(a, b, B_OR)

def bitwise_xor(a, b):
    """Elementwise bitwise exclusive or."""
    return _binary(a, b, B_XOR)

def left_shift(a, b):
    """Elementwise a << b."""
    return _binary(a, b, B_LSHIFT)

def right_shift(a, b):
    """Elementwise a >> b."""
    return _binary(a, b, B_RSHIFT)

def logaddexp(a, b):
    """Elementwise log(exp(a) + exp(b)), computed stably."""
    return _binary(a, b, B_LOGADDEXP)

def arctan2(a, b):
    """Elementwise arctan(a / b) in the correct quadrant."""
    return _binary(a, b, B_ARCTAN2)

def matmul(a, b):
    """Matrix product with numpy's broadcasting and 1-d rules."""
    return _binary(a, b, B_MATMUL)

def inner(a, b):
    """Inner product over the last axes of a and b."""
    return _binary(a, b, B_INNER)

def outer(a, b):
    """Outer product of a and b (flattened to vectors)."""
    return _binary(a, b, B_OUTER)

def array_equal(a, b, equal_nan=False):
    """A scalar bool: same shape and equal elements (dtypes may differ)."""
    return _binary(a, b, B_ARRAY_EQUAL, 0.0, 0.0, equal_nan)

def allclose(a, b, double rtol=1e-5, double atol=1e-8, equal_nan=False):
    """A scalar bool: all |a - b| <= atol + rtol * |b|."""
    return _binary(a, b, B_ALLCLOSE, rtol, atol, equal_nan)

def isclose(a, b, double rtol=1e-5, double atol=1e-8, equal_nan=False):
    """Elementwise |a - b| <= atol + rtol * |b|."""
    return _binary(a, b, B_ISCLOSE, rtol, atol, equal_nan)


def where(cond, x, y):
    """Elements of x where cond is true, else of y."""
    cdef Array c = _arr(cond), xx, yy
    if type(x) is Array:
        xx = <Array>x
        yy = operand(y, handle(xx))
    elif type(y) is Array:
        yy = <Array>y
        xx = operand(x, handle(yy))
    else:
        xx = to_array(x)
        yy = to_array(y)
    return wrap_new((nops.where(c.ptr[0], xx.ptr[0], yy.ptr[0])))


def clip(a, a_min, a_max):
    """Limit a to [a_min, a_max]; either bound may be None (not both)."""
    cdef Array x = _arr(a), lo = None, hi = None
    if a_min is None and a_max is None:
        raise ValueError("clip: at least one of a_min and a_max must be given")
    if a_min is not None:
        lo = operand(a_min, x.ptr)
    if a_max is not None:
        hi = operand(a_max, x.ptr)
    return wrap_new((nops.clip_(x.ptr[0], _ptr(lo), _ptr(hi))))


# --------------------------------------------------------------- unary ops

cdef enum:
    U_NEG, U_ABS, U_SIGN, U_EXP, U_EXPM1, U_LOG, U_LOG1P, U_LOG2, U_LOG10
    U_SQRT, U_RSQRT, U_SQUARE, U_RECIP, U_SIN, U_COS, U_TAN, U_ASIN, U_ACOS
    U_ATAN, U_SINH, U_COSH, U_TANH, U_ASINH, U_ACOSH, U_ATANH, U_SIGMOID
    U_ERF, U_ERFINV, U_FLOOR, U_CEIL, U_TRUNC, U_LNOT, U_INVERT
    U_ISNAN, U_ISINF, U_ISFINITE, U_STOPGRAD


cdef na.array* _un(const na.array& x, int op) except NULL:
    if op == U_NEG: return heap(nops.negative(x))
    if op == U_ABS: return heap(nops.abs(x))
    if op == U_SIGN: return heap(nops.sign(x))
    if op == U_EXP: return heap(nops.exp(x))
    if op == U_EXPM1: return heap(nops.expm1(x))
    if op == U_LOG: return heap(nops.log(x))
    if op == U_LOG1P: return heap(nops.log1p(x))
    if op == U_LOG2: return heap(nops.log2(x))
    if op == U_LOG10: return heap(nops.log10(x))
    if op == U_SQRT: return heap(nops.sqrt(x))
    if op == U_RSQRT: return heap(nops.rsqrt(x))
    if op == U_SQUARE: return heap(nops.square(x))
    if op == U_RECIP: return heap(nops.reciprocal(x))
    if op == U_SIN: return heap(nops.sin(x))
    if op == U_COS: return heap(nops.cos(x))
    if op == U_TAN: return heap(nops.tan(x))
    if op == U_ASIN: return heap(nops.arcsin(x))
    if op == U_ACOS: return heap(nops.arccos(x))
    if op == U_ATAN: return heap(nops.arctan(x))
    if op == U_SINH: return heap(nops.sinh(x))
    if op == U_COSH: return heap(nops.cosh(x))
    if op == U_TANH: return heap(nops.tanh(x))
    if op == U_ASINH: return heap(nops.arcsinh(x))
    if op == U_ACOSH: return heap(nops.arccosh(x))
    if op == U_ATANH: return heap(nops.arctanh(x))
    if op == U_SIGMOID: return heap(nops.sigmoid(x))
    if op == U_ERF: return heap(nops.erf(x))
    if op == U_ERFINV: return heap(nops.erfinv(x))
    if op == U_FLOOR: return heap(nops.floor(x))
    if op == U_CEIL: return heap(nops.ceil(x))
    if op == U_TRUNC: return heap(nops.trunc(x))
    if op == U_LNOT: return heap(nops.logical_not(x))
    if op == U_INVERT: return heap(nops.bitwise_invert(x))
    if op == U_ISNAN: return heap(nops.isnan(x))
    if op == U_ISINF: return heap(nops.isinf(x))
    if op == U_ISFINITE: return heap(nops.isfinite(x))
    return heap(nops.stop_gradient(x))


cdef Array _unary(object a, int op):
    cdef Array x = _arr(a)
    return wrap(_un(x.ptr[0], op))


def negative(a):
    """Elementwise -a."""
    return _unary(a, U_NEG)

def abs(a):
    """Elementwise absolute value."""
    return _unary(a, U_ABS)

def sign(a):
    """Elementwise sign: -1, 0 or 1."""
    return _unary(a, U_SIGN)

def exp(a):
    """Elementwise e ** a."""
    return _unary(a, U_EXP)

def expm1(a):
    """Elementwise exp(a) - 1, accurate near 0."""
    return _unary(a, U_EXPM1)

def log(a):
    """Elementwise natural logarithm."""
    return _unary(a, U_LOG)

def log1p(a):
    """Elementwise log(1 + a), accurate near 0."""
    return _unary(a, U_LOG1P)

def log2(a):
    """Elementwise base-2 logarithm."""
    return _unary(a, U_LOG2)

def log10(a):
    """Elementwise base-10 logarithm."""
    return _unary(a, U_LOG10)

def sqrt(a):
    """Elementwise square root."""
    return _unary(a, U_SQRT)

def rsqrt(a):
    """Elementwise 1 / sqrt(a)."""
    return _unary(a, U_RSQRT)

def square(a):
    """Elementwise a * a."""
    return _unary(a, U_SQUARE)

def reciprocal(a):
    """Elementwise 1 / a."""
    return _unary(a, U_RECIP)

def sin(a):
    """Elementwise sine."""
    return _unary(a, U_SIN)

def cos(a):
    """Elementwise cosine."""
    return _unary(a, U_COS)

def tan(a):
    """Elementwise tangent."""
    return _unary(a, U_TAN)

def arcsin(a):
    """Elementwise inverse sine."""
    return _unary(a, U_ASIN)

def arccos(a):
    """Elementwise inverse cosine."""
    return _unary(a, U_ACOS)

def arctan(a):
    """Elementwise inverse tangent."""
    return _unary(a, U_ATAN)

def sinh(a):
    """Elementwise hyperbolic sine."""
    return _unary(a, U_SINH)

def cosh(a):
    """Elementwise hyperbolic cosine."""
    return _unary(a, U_COSH)

def tanh(a):
    """Elementwise hyperbolic tangent."""
    return _unary(a, U_TANH)

def arcsinh(a):
    """Elementwise inverse hyperbolic sine."""
    return _unary(a, U_ASINH)

def arccosh(a):
    """Elementwise inverse hyperbolic cosine."""
    return _unary(a, U_ACOSH)

def arctanh(a):
    """Elementwise inverse hyperbolic tangent."""
    return _unary(a, U_ATANH)

def sigmoid(a):
    """Elementwise logistic sigmoid 1 / (1 + exp(-a))."""
    return _unary(a, U_SIGMOID)

def erf(a):
    """Elementwise Gauss error function."""
    return _unary(a, U_ERF)

def erfinv(a):
    """Elementwise inverse of erf."""
    return _unary(a, U_ERFINV)

def floor(a):
    """Elementwise floor."""
    return _unary(a, U_FLOOR)

def ceil(a):
    """Elementwise ceiling."""
    return _unary(a, U_CEIL)

def trunc(a):
    """Elementwise rounding toward zero."""
    return _unary(a, U_TRUNC)

def logical_not(a):
    """Elementwise logical not."""
    return _unary(a, U_LNOT)

def bitwise_invert(a):
    """Elementwise bitwise not of an integer (or bool) array."""
    return _unary(a, U_INVERT)

def isnan(a):
    """Elementwise test for NaN."""
    return _unary(a, U_ISNAN)

def isinf(a):
    """Elementwise test for +inf or -inf."""
    return _unary(a, U_ISINF)

def isfinite(a):
    """Elementwise test for finite values (not inf, not NaN)."""
    return _unary(a, U_ISFINITE)

def stop_gradient(a):
    """a, with gradients stopped from flowing through it."""
    return _unary(a, U_STOPGRAD)


def round(a, decimals=0):
    """Round to the given number of decimals (halves go to even)."""
    cdef Array x = _arr(a)
    return wrap_new((nops.round(x.ptr[0], _int(decimals, "decimals"))))


def nan_to_num(a, float nan=0.0, posinf=None, neginf=None):
    """Replace NaN by `nan` and +-inf by posinf/neginf (default: the dtype's
    largest finite values)."""
    cdef Array x = _arr(a)
    cdef float p = 0.0, n = 0.0
    cdef const float* pp = NULL
    cdef const float* pn = NULL
    if posinf is not None:
        p = posinf
        pp = &p
    if neginf is not None:
        n = neginf
        pn = &n
    return wrap_new((nops.nan_to_num_(x.ptr[0], nan, pp, pn)))


# ------------------------------------------------------------- activations
# Composed from native ops so they fuse into MLX's graph like any other op.

cdef na.array* _gelu_exact(const na.array& x) except NULL:
    # 0.5 * x * (1 + erf(x / sqrt(2)))
    cdef na.Dtype d = x.dtype()
    return heap(nops.multiply(
        nops.multiply(x, na.array(<double>0.5, d)),
        nops.add(na.array(<double>1.0, d),
                 nops.erf(nops.multiply(x, na.array(<double>M_SQRT1_2, d))))))


cdef na.array* _gelu_tanh(const na.array& x) except NULL:
    # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
    cdef na.Dtype d = x.dtype()
    cdef double c = M_SQRT1_2 * M_2_SQRTPI      # sqrt(2 / pi)
    cdef na.array arg = nops.multiply(
        nops.add(x, nops.multiply(na.array(<double>0.044715, d),
                                  nops.multiply(x, nops.square(x)))),
        na.array(c, d))
    return heap(nops.multiply(
        nops.multiply(x, na.array(<double>0.5, d)),
        nops.add(na.array(<double>1.0, d), nops.tanh(arg))))


def relu(x):
    """max(x, 0)."""
    cdef Array a = _arr(x)
    return wrap_new((nops.maximum(a.ptr[0], na.array(<double>0.0, a.ptr.dtype()))))


def silu(x):
    """x * sigmoid(x) (a.k.a. swish); integers are computed in float32."""
    cdef Array a = _floating(x)
    return wrap_new((nops.multiply(a.ptr[0], nops.sigmoid(a.ptr[0]))))


def gelu(x, approximate="none"):
    """Gaussian error linear unit.  approximate="none" is the exact
    erf-based form; "tanh" is the tanh approximation (gelu_approx)."""
    cdef Array a = _floating(x)
    if approximate == "none" or approximate is False:
        return wrap(_gelu_exact(a.ptr[0]))
    if approximate == "tanh" or approximate is True:
        return wrap(_gelu_tanh(a.ptr[0]))
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")


def gelu_approx(x):
    """The tanh approximation of gelu."""
    cdef Array a = _floating(x)
    return wrap(_gelu_tanh(a.ptr[0]))


def softplus(x):
    """log(1 + exp(x)), computed stably as logaddexp(x, 0)."""
    cdef Array a = _floating(x)
    return wrap_new((nops.logaddexp(a.ptr[0], na.array(<double>0.0, a.ptr.dtype()))))


def log_sigmoid(x):
    """log(sigmoid(x)) = -softplus(-x)."""
    cdef Array a = _floating(x)
    return wrap_new((nops.negative(nops.logaddexp(nops.negative(a.ptr[0]),
                                                  na.array(<double>0.0, a.ptr.dtype())))))


def softmax(a, axis=None, precise=False):
    """exp(a) / sum(exp(a)) over axis (None: all axes).  precise=True
    accumulates half-precision inputs in float32."""
    cdef Array x = _arr(a)
    return wrap_new((nops.softmax(x.ptr[0], _axes(axis, x.ptr.ndim()), precise)))


def log_softmax(a, axis=-1):
    """a - logsumexp(a, axis, keepdims=True)."""
    cdef Array x = _arr(a)
    cdef vector[int] ax = _axes(axis, x.ptr.ndim())
    return wrap_new((nops.subtract(x.ptr[0], nops.logsumexp(x.ptr[0], ax, True))))


# ---------------------------------------------------------------- creation

def zeros(shape, dtype=None):
    """An array of zeros (float32 unless dtype is given)."""
    return wrap_new((nops.zeros(_shape(shape), na.dtype_from_code(_code(dtype, F32)))))


def ones(shape, dtype=None):
    """An array of ones (float32 unless dtype is given)."""
    return wrap_new((nops.ones(_shape(shape), na.dtype_from_code(_code(dtype, F32)))))


def full(shape, vals, dtype=None):
    """An array of `shape` filled with vals (broadcast); dtype defaults to
    that of vals."""
    cdef Array v = _arr(vals)
    if dtype is None:
        return wrap_new((nops.full(_shape(shape), v.ptr[0])))
    return wrap_new((nops.full(_shape(shape), v.ptr[0], na.dtype_from_code(_code(dtype)))))


def zeros_like(a):
    """Zeros with the shape and dtype of a."""
    cdef Array x = _arr(a)
    return wrap_new((nops.zeros_like(x.ptr[0])))


def ones_like(a):
    """Ones with the shape and dtype of a."""
    cdef Array x = _arr(a)
    return wrap_new((nops.ones_like(x.ptr[0])))


def full_like(a, vals, dtype=None):
    """vals broadcast to the shape of a, with a's dtype unless dtype is given."""
    cdef Array x = _arr(a)
    cdef Array v = operand(vals, x.ptr)
    if dtype is None:
        return wrap_new((nops.full_like(x.ptr[0], v.ptr[0], x.ptr.dtype())))
    return wrap_new((nops.full_like(x.ptr[0], v.ptr[0], na.dtype_from_code(_code(dtype)))))


def arange(start, stop=None, step=None, dtype=None):
    """Evenly spaced values in [start, stop).  arange(stop) starts at 0.  The
    dtype is int32 when all arguments are ints, else float32."""
    if stop is None:
        start, stop = 0, start
    if step is None:
        step = 1
    for name, v in (("start", start), ("stop", stop), ("step", step)):
        if not isinstance(v, (int, float)):
            raise TypeError(f"arange: {name} must be a number, not {type(v).__name__}")
    if dtype is None:
        dtype = "int32" if (type(start) is int and type(stop) is int and
                            type(step) is int) else "float32"
    return wrap_new((nops.arange(<double>start, <double>stop, <double>step,
                                 na.dtype_from_code(_code(dtype)))))


def linspace(start, stop, num=50, dtype=None, endpoint=True):
    """`num` evenly spaced values from start to stop (stop included unless
    endpoint=False); float32 unless dtype is given."""
    return wrap_new((nops.linspace(<double>start, <double>stop, _int(num, "num"),
                                   endpoint, na.dtype_from_code(_code(dtype, F32)))))


def eye(n, m=None, k=0, dtype=None):
    """An n x m matrix with ones on diagonal k."""
    cdef int rows = _int(n, "n")
    return wrap_new((nops.eye(rows, rows if m is None else _int(m, "m"), _int(k, "k"),
                              na.dtype_from_code(_code(dtype, F32)))))


def identity(n, dtype=None):
    """The n x n identity matrix."""
    return wrap_new((nops.identity(_int(n, "n"), na.dtype_from_code(_code(dtype, F32)))))


def tri(n, m=None, k=0, dtype=None):
    """An n x m matrix with ones at and below diagonal k."""
    cdef int rows = _int(n, "n")
    return wrap_new((nops.tri(rows, rows if m is None else _int(m, "m"), _int(k, "k"),
                              na.dtype_from_code(_code(dtype, F32)))))


def tril(x, k=0):
    """x with elements above diagonal k zeroed."""
    cdef Array a = _arr(x)
    return wrap_new((nops.tril(a.ptr[0], _int(k, "k"))))


def triu(x, k=0):
    """x with elements below diagonal k zeroed."""
    cdef Array a = _arr(x)
    return wrap_new((nops.triu(a.ptr[0], _int(k, "k"))))


def astype(a, dtype):
    """a converted to dtype."""
    cdef Array x = _arr(a)
    return wrap_new((nops.astype(x.ptr[0], na.dtype_from_code(_code(dtype)))))


def view(a, dtype):
    """a's bytes reinterpreted as dtype (the last axis is rescaled when the
    item sizes differ)."""
    cdef Array x = _arr(a)
    return wrap_new((nops.view(x.ptr[0], na.dtype_from_code(_code(dtype)))))


# ------------------------------------------------------------------- shape

@cython.binding(False)
def reshape(a, shape):
    """a with a new shape (one dimension may be -1)."""
    cdef Array x = _arr(a)
    cdef int32_t dims[8]
    cdef int n = _tuple_dims_checked(shape, dims, "shape")
    if n >= 0:
        return wrap_new(nops.reshape(x.ptr[0], na.make_shape(dims, n)))
    return wrap_new(nops.reshape(x.ptr[0], move(_shape(shape))))


def flatten(a, start_axis=0, end_axis=-1):
    """Merge axes start_axis..end_axis (inclusive) into one."""
    cdef Array x = _arr(a)
    return wrap_new((nops.flatten(x.ptr[0], _int(start_axis, "start_axis"),
                                  _int(end_axis, "end_axis"))))


def transpose(a, *args, axes=None):
    """Permute the axes (reverse them when none are given).  Accepts
    transpose(a, (1, 0)), transpose(a, 1, 0) and transpose(a, axes=...)."""
    cdef Array x = _arr(a)
    if args:
        if axes is not None:
            raise TypeError("transpose: axes given both by position and by keyword")
        axes = args[0] if len(args) == 1 else args
    if axes is None:
        return wrap_new((nops.transpose(x.ptr[0])))
    return wrap_new((nops.transpose(x.ptr[0], _ints(axes, "axes"))))


def swapaxes(a, axis1, axis2):
    """a with two axes exchanged."""
    cdef Array x = _arr(a)
    return wrap_new((nops.swapaxes(x.ptr[0], _int(axis1, "axis1"), _int(axis2, "axis2"))))


def moveaxis(a, source, destination):
    """a with axis `source` moved to position `destination`."""
    cdef Array x = _arr(a)
    return wrap_new((nops.moveaxis(x.ptr[0], _int(source, "source"),
                                   _int(destination, "destination"))))


def expand_dims(a, axis):
    """a with new size-1 axes inserted at axis (an int or a sequence)."""
    cdef Array x = _arr(a)
    if isinstance(axis, int):
        return wrap_new((nops.expand_dims(x.ptr[0], <int>axis)))
    return wrap_new((nops.expand_dims(x.ptr[0], _ints(axis, "axis"))))


def squeeze(a, axis=None):
    """a without its size-1 axes (all of them, or those in axis)."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.squeeze(x.ptr[0])))
    return wrap_new((nops.squeeze(x.ptr[0], _ints(axis, "axis"))))


def broadcast_to(a, shape):
    """a broadcast to shape (numpy rules)."""
    cdef Array x = _arr(a)
    return wrap_new((nops.broadcast_to(x.ptr[0], _shape(shape))))


def broadcast_arrays(*arrays):
    """The arrays broadcast against one another, as a list."""
    cdef vector[na.array] v = _arrays(arrays)
    return _list(nops.broadcast_arrays(v))


def concatenate(arrays, axis=0):
    """Join arrays along an existing axis (axis=None: flatten them first)."""
    cdef vector[na.array] v
    if axis is None:
        v = _arrays([reshape(x, -1) for x in arrays])
        return wrap_new((nops.concatenate(v, 0)))
    v = _arrays(arrays)
    return wrap_new((nops.concatenate(v, _int(axis, "axis"))))


def stack(arrays, axis=0):
    """Join arrays of one shape along a new axis."""
    cdef vector[na.array] v = _arrays(arrays)
    return wrap_new((nops.stack(v, _int(axis, "axis"))))


def split(a, indices_or_sections, axis=0):
    """Split a along axis into `n` equal parts (an int) or at the given
    indices (a sequence); returns a list."""
    cdef Array x = _arr(a)
    cdef int ax = _int(axis, "axis")
    if isinstance(indices_or_sections, int):
        return _list(nops.split(x.ptr[0], <int>indices_or_sections, ax))
    return _list(nops.split(x.ptr[0], _shape(indices_or_sections, "indices_or_sections"), ax))


def tile(a, reps):
    """a repeated reps times along each axis (numpy.tile)."""
    cdef Array x = _arr(a)
    return wrap_new((nops.tile(x.ptr[0], _ints(reps, "reps"))))


def repeat(a, repeats, axis=None):
    """Each element repeated `repeats` times along axis (None: flattened)."""
    cdef Array x = _arr(a)
    cdef int r = _int(repeats, "repeats")
    if axis is None:
        return wrap_new((nops.repeat(x.ptr[0], r)))
    return wrap_new((nops.repeat(x.ptr[0], r, _int(axis, "axis"))))


cdef tuple _pad_widths(object pad_width, int ndim):
    """Normalize pad_width to (low, high) lists with one entry per axis."""
    if isinstance(pad_width, int):
        return [pad_width] * ndim, [pad_width] * ndim
    pw = list(pad_width)
    if len(pw) == 1 and isinstance(pw[0], int):
        return pw * ndim, pw * ndim
    if len(pw) == 2 and isinstance(pw[0], int) and isinstance(pw[1], int):
        return [pw[0]] * ndim, [pw[1]] * ndim
    if len(pw) == 1 and len(pw[0]) == 2:
        pw = pw * ndim
    if len(pw) != ndim or not _b.all(len(p) == 2 for p in pw):
        raise ValueError(f"pad: pad_width must be an int, a pair, or {ndim} (before, "
                         f"after) pairs, got {pad_width!r}")
    return [p[0] for p in pw], [p[1] for p in pw]


def pad(a, pad_width, mode="constant", constant_values=0):
    """Pad each axis of a.  pad_width is an int, a (before, after) pair, or one
    pair per axis; mode is "constant", "edge", "reflect" or "symmetric"."""
    cdef Array x = _arr(a)
    cdef int nd = x.ptr.ndim(), i
    cdef vector[int] axes = vector[int]()
    for i in range(nd):
        axes.push_back(i)
    lo, hi = _pad_widths(pad_width, nd)
    cdef Array v = operand(constant_values, x.ptr)
    return wrap_new((nops.pad(x.ptr[0], axes, _shape(lo, "pad_width"), _shape(hi, "pad_width"),
                              v.ptr[0], _str(mode, "mode"))))


def slice(a, start_indices, axes, slice_size):
    """Dynamic slice (mx.slice): a block of size slice_size whose start along
    each of `axes` is read from the array start_indices (other axes start at 0)."""
    cdef Array x = _arr(a)
    cdef Array st = _arr(start_indices)
    return wrap_new((nops.slice(x.ptr[0], st.ptr[0], _ints(axes, "axes"),
                                _shape(slice_size, "slice_size"))))


def slice_update(a, update, start_indices, axes):
    """a with the block at start_indices (along `axes`) replaced by update."""
    cdef Array x = _arr(a)
    cdef Array u = operand(update, x.ptr)
    cdef Array st = _arr(start_indices)
    return wrap_new((nops.slice_update(x.ptr[0], u.ptr[0], st.ptr[0], _ints(axes, "axes"))))


def take(a, indices, axis=None):
    """Elements (axis=None: of the flattened array) or slices along axis at
    the given indices."""
    cdef Array x = _arr(a)
    cdef int ax, n, k
    if isinstance(indices, int):
        if axis is None:
            x = wrap_new((nops.reshape(x.ptr[0], _shape(-1))))
            axis = 0
        ax = _int(axis, "axis")
        if ax < -<int>x.ptr.ndim() or ax >= <int>x.ptr.ndim():
            raise ValueError(f"take: axis {axis} is out of bounds for an array of "
                             f"{x.ptr.ndim()} dimensions")
        n = x.ptr.shape(ax)
        k = _int(indices, "indices")
        if k < -n or k >= n:
            raise IndexError(f"take: index {indices} is out of bounds for axis {axis} "
                             f"of size {n}")
        return wrap_new((nops.take(x.ptr[0], k + n if k < 0 else k, ax)))
    cdef Array i = _arr(indices)
    if axis is None:
        _check_index_bounds(i, x.ptr.size(), None, "take")
        return wrap_new((nops.take(x.ptr[0], i.ptr[0])))
    ax = _int(axis, "axis")
    if ax < -<int>x.ptr.ndim() or ax >= <int>x.ptr.ndim():
        raise ValueError(f"take: axis {axis} is out of bounds for an array of "
                         f"{x.ptr.ndim()} dimensions")
    _check_index_bounds(i, x.ptr.shape(ax), axis, "take")
    return wrap_new((nops.take(x.ptr[0], i.ptr[0], ax)))


def take_along_axis(a, indices, axis):
    """numpy.take_along_axis (axis=None: over the flattened array)."""
    cdef Array x = _arr(a)
    cdef Array i = _arr(indices)
    cdef int ax
    if axis is None:
        _check_index_bounds(i, x.ptr.size(), None, "take_along_axis")
        return wrap_new((nops.take_along_axis(nops.reshape(x.ptr[0], _shape(-1)),
                                              nops.reshape(i.ptr[0], _shape(-1)), 0)))
    ax = _int(axis, "axis")
    if -<int>x.ptr.ndim() <= ax < <int>x.ptr.ndim():
        _check_index_bounds(i, x.ptr.shape(ax), axis, "take_along_axis")
    return wrap_new((nops.take_along_axis(x.ptr[0], i.ptr[0], ax)))


def put_along_axis(a, indices, values, axis):
    """A copy of a with values written at indices along axis
    (numpy.put_along_axis, not in place)."""
    cdef Array x = _arr(a)
    cdef Array i = _arr(indices)
    cdef Array v = operand(values, x.ptr)
    cdef int ax
    if axis is None:
        _check_index_bounds(i, x.ptr.size(), None, "put_along_axis")
    else:
        ax = _int(axis, "axis")
        if -<int>x.ptr.ndim() <= ax < <int>x.ptr.ndim():
            _check_index_bounds(i, x.ptr.shape(ax), axis, "put_along_axis")
    if axis is None:
        flat = wrap_new((nops.put_along_axis(nops.reshape(x.ptr[0], _shape(-1)),
                                             nops.reshape(i.ptr[0], _shape(-1)),
                                             nops.reshape(v.ptr[0], _shape(-1)), 0)))
        return reshape(flat, x.shape)
    return wrap_new((nops.put_along_axis(x.ptr[0], i.ptr[0], v.ptr[0], _int(axis, "axis"))))


def scatter_add(a, indices, updates, axes):
    """MLX's scatter_add: indices is an array or a list of arrays (one per
    entry of axes); updates has shape indices.shape + slice shape, with the
    slice shape having a.ndim dimensions (size 1 on the indexed axes)."""
    cdef Array x = _arr(a)
    cdef Array u = operand(updates, x.ptr)
    idx = [indices] if not isinstance(indices, (list, tuple)) else indices
    cdef vector[na.array] iv = _arrays(idx, "indices")
    out = wrap_new((nops.scatter_add(x.ptr[0], iv, u.ptr[0], _ints(axes, "axes"))))   # (checks)
    if u.ptr.size() == 0:   # nothing to add; MLX's CPU kernel divides by the empty slice's size
        return wrap_new((nops.copy(x.ptr[0])))
    return out


def add_at(a, indices, updates, axis=0):
    """A copy of a with updates added at indices along axis, accumulating
    repeated indices (numpy.add.at(a, (:,)*axis + (indices,), updates)).
    updates must broadcast to take(a, indices, axis).shape."""
    cdef Array x = _arr(a)
    cdef Array i = _arr(indices)
    cdef int ax = _int(axis, "axis"), nd = x.ptr.ndim()
    if ax < -nd or ax >= nd:
        raise ValueError(f"add_at: axis {axis} is out of bounds for an array of {nd} dimensions")
    ax = ax + nd if ax < 0 else ax
    # Work on a with `axis` first: updates (n, 1, *rest) scatter along axis 0.
    moved = moveaxis(x, ax, 0)
    rest = list(moved.shape[1:])
    flat_i = reshape(i, -1)
    upd = broadcast_to(astype(updates, x.dtype), take(x, i, ax).shape)
    upd = moveaxis(reshape(upd, x.shape[:ax] + (flat_i.size,) + x.shape[ax + 1:]), ax, 0)
    upd = reshape(upd, [flat_i.size, 1] + rest)
    return moveaxis(scatter_add(moved, flat_i, upd, 0), 0, ax)


def flip(a, axis=None):
    """a with the order of elements reversed along axis (None: all axes)."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.flip(x.ptr[0])))
    return wrap_new((nops.flip(x.ptr[0], _ints(axis, "axis"))))


def roll(a, shift, axis=None):
    """Elements shifted by `shift` along axis, wrapping around (numpy.roll).
    With axis=None the array is rolled flattened and keeps its shape."""
    x = _arr(a)
    if axis is None:
        return reshape(roll(reshape(x, -1), shift, 0), x.shape)
    shifts = [shift] if isinstance(shift, int) else list(shift)
    axes = [axis] if isinstance(axis, int) else list(axis)
    if len(shifts) == 1:
        shifts = shifts * len(axes)
    if len(shifts) != len(axes):
        raise ValueError("roll: shift and axis must have the same length")
    for s, ax in zip(shifts, axes):
        n = x.shape[_int(ax, "axis")]
        if n == 0:
            continue
        s = _int(s, "shift") % n
        if s:
            head, tail = split(x, [n - s], ax)
            x = concatenate([tail, head], ax)
    return x


def diag(a, k=0):
    """The k-th diagonal of a 2-d array, or a 2-d array with the 1-d a on its
    k-th diagonal."""
    cdef Array x = _arr(a)
    return wrap_new((nops.diag(x.ptr[0], _int(k, "k"))))


def diagonal(a, offset=0, axis1=0, axis2=1):
    """The diagonal at `offset` of the 2-d planes given by axis1 and axis2;
    it becomes the last axis of the result."""
    cdef Array x = _arr(a)
    return wrap_new((nops.diagonal(x.ptr[0], _int(offset, "offset"), _int(axis1, "axis1"),
                                   _int(axis2, "axis2"))))


# -------------------------------------------------------------- reductions

cdef enum:
    R_SUM, R_MEAN, R_PROD, R_MAX, R_MIN, R_ALL, R_ANY, R_LSE, R_VAR, R_STD


cdef na.array* _red(const na.array& x, const vector[int]& ax, bint keep, int op,
                    int ddof) except NULL:
    if op == R_SUM: return heap(nops.sum(x, ax, keep))
    if op == R_MEAN: return heap(nops.mean(x, ax, keep))
    if op == R_PROD: return heap(nops.prod(x, ax, keep))
    if op == R_MAX: return heap(nops.max(x, ax, keep))
    if op == R_MIN: return heap(nops.min(x, ax, keep))
    if op == R_ALL: return heap(nops.all(x, ax, keep))
    if op == R_ANY: return heap(nops.any(x, ax, keep))
    if op == R_LSE: return heap(nops.logsumexp(x, ax, keep))
    if op == R_VAR: return heap(nops.var(x, ax, keep, ddof))
    return heap(nops.std_(x, ax, keep, ddof))


cdef Array _reduce(object a, object axis, bint keepdims, int op, int ddof=0):
    cdef Array x = _arr(a)
    return wrap(_red(x.ptr[0], _axes(axis, x.ptr.ndim()), keepdims, op, ddof))


def sum(a, axis=None, keepdims=False):
    """Sum over axis (an int, a sequence of ints, or None for all axes)."""
    return _reduce(a, axis, keepdims, R_SUM)

def mean(a, axis=None, keepdims=False):
    """Mean over axis (None: all axes)."""
    return _reduce(a, axis, keepdims, R_MEAN)

def prod(a, axis=None, keepdims=False):
    """Product over axis (None: all axes)."""
    return _reduce(a, axis, keepdims, R_PROD)

def max(a, axis=None, keepdims=False):
    """Maximum over axis (None: all axes)."""
    return _reduce(a, axis, keepdims, R_MAX)

def min(a, axis=None, keepdims=False):
    """Minimum over axis (None: all axes)."""
    return _reduce(a, axis, keepdims, R_MIN)

def all(a, axis=None, keepdims=False):
    """True where every element over axis is true (non-zero)."""
    return _reduce(a, axis, keepdims, R_ALL)

def any(a, axis=None, keepdims=False):
    """True where some element over axis is true (non-zero)."""
    return _reduce(a, axis, keepdims, R_ANY)

def logsumexp(a, axis=None, keepdims=False):
    """log(sum(exp(a))) over axis, computed stably."""
    return _reduce(a, axis, keepdims, R_LSE)

def var(a, axis=None, keepdims=False, ddof=0):
    """Variance over axis, dividing by N - ddof."""
    return _reduce(a, axis, keepdims, R_VAR, _int(ddof, "ddof"))

def std(a, axis=None, keepdims=False, ddof=0):
    """Standard deviation over axis, dividing by N - ddof."""
    return _reduce(a, axis, keepdims, R_STD, _int(ddof, "ddof"))


def argmax(a, axis=None, keepdims=False):
    """Index of the maximum along axis (None: of the flattened array)."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.argmax(x.ptr[0], <bool>keepdims)))
    return wrap_new((nops.argmax(x.ptr[0], _int(axis, "axis"), <bool>keepdims)))


def argmin(a, axis=None, keepdims=False):
    """Index of the minimum along axis (None: of the flattened array)."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.argmin(x.ptr[0], <bool>keepdims)))
    return wrap_new((nops.argmin(x.ptr[0], _int(axis, "axis"), <bool>keepdims)))


cdef enum:
    C_SUM, C_PROD, C_MAX, C_MIN


cdef Array _scan(object a, object axis, bint reverse, bint inclusive, int op):
    """Cumulative op along axis; axis=None scans the flattened array."""
    cdef Array x = _arr(a)
    cdef int ax = 0
    if axis is None:
        x = wrap_new((nops.reshape(x.ptr[0], _shape(-1))))
    else:
        ax = _int(axis, "axis")
    if op == C_SUM:
        return wrap_new((nops.cumsum(x.ptr[0], ax, <bool>reverse, <bool>inclusive)))
    if op == C_PROD:
        return wrap_new((nops.cumprod(x.ptr[0], ax, <bool>reverse, <bool>inclusive)))
    if op == C_MAX:
        return wrap_new((nops.cummax(x.ptr[0], ax, <bool>reverse, <bool>inclusive)))
    return wrap_new((nops.cummin(x.ptr[0], ax, <bool>reverse, <bool>inclusive)))


def cumsum(a, axis=None, reverse=False, inclusive=True):
    """Cumulative sum along axis (None: flattened); reverse scans from the
    end; inclusive=False shifts by one (starting from 0)."""
    return _scan(a, axis, reverse, inclusive, C_SUM)

def cumprod(a, axis=None, reverse=False, inclusive=True):
    """Cumulative product along axis (see cumsum)."""
    return _scan(a, axis, reverse, inclusive, C_PROD)

def cummax(a, axis=None, reverse=False, inclusive=True):
    """Cumulative maximum along axis (see cumsum)."""
    return _scan(a, axis, reverse, inclusive, C_MAX)

def cummin(a, axis=None, reverse=False, inclusive=True):
    """Cumulative minimum along axis (see cumsum)."""
    return _scan(a, axis, reverse, inclusive, C_MIN)


# ---------------------------------------------------------- linear algebra

def addmm(c, a, b, alpha=1.0, beta=1.0):
    """beta * c + alpha * (a @ b)."""
    cdef Array x = _arr(a), y = _arr(b), z = _arr(c)
    return wrap_new((nops.addmm(z.ptr[0], x.ptr[0], y.ptr[0], <float>alpha, <float>beta)))


def tensordot(a, b, axes=2):
    """Sum of products over the last `axes` axes of a and the first of b, or
    over the axis lists of axes=(axes_a, axes_b)."""
    cdef Array x = _arr(a), y = _arr(b)
    if isinstance(axes, int):
        return wrap_new((nops.tensordot(x.ptr[0], y.ptr[0], <int>axes)))
    if len(axes) != 2:
        raise ValueError(f"tensordot: axes must be an int or a pair of axis lists, got {axes!r}")
    return wrap_new((nops.tensordot(x.ptr[0], y.ptr[0], _ints(axes[0], "axes"),
                                    _ints(axes[1], "axes"))))


def einsum(subscripts, *operands):
    """Einstein summation, e.g. einsum("ij,jk->ik", a, b)."""
    cdef vector[na.array] v = _arrays(operands, "operands")
    return wrap_new((nops.einsum(_str(subscripts, "subscripts"), v)))


# --------------------------------------------------------- sort and select

def sort(a, axis=-1):
    """Sorted copy along axis (None: of the flattened array); NaNs last."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.sort(x.ptr[0])))
    return wrap_new((nops.sort(x.ptr[0], _int(axis, "axis"))))


def argsort(a, axis=-1):
    """Indices that sort a along axis (a stable sort)."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.argsort(x.ptr[0])))
    return wrap_new((nops.argsort(x.ptr[0], _int(axis, "axis"))))


def partition(a, kth, axis=-1):
    """Copy of a where the element at kth is in sorted position, smaller
    ones before it and larger ones after (in no given order)."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.partition(x.ptr[0], _int(kth, "kth"))))
    return wrap_new((nops.partition(x.ptr[0], _int(kth, "kth"), _int(axis, "axis"))))


def argpartition(a, kth, axis=-1):
    """Indices that partition a at kth along axis (see partition)."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.argpartition(x.ptr[0], _int(kth, "kth"))))
    return wrap_new((nops.argpartition(x.ptr[0], _int(kth, "kth"), _int(axis, "axis"))))


def topk(a, k, axis=-1):
    """The k largest elements along axis, in no particular order."""
    cdef Array x = _arr(a)
    if axis is None:
        return wrap_new((nops.topk(x.ptr[0], _int(k, "k"))))
    return wrap_new((nops.topk(x.ptr[0], _int(k, "k"), _int(axis, "axis"))))


# ------------------------------------------------------------ quantization
# group_size / bits of None mean the mode's defaults (affine: 64 and 4).

cdef int _opt_int(object v, str name) except? -1:
    if v is None:
        return 0
    cdef int r = _int(v, name)
    if r <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return r




def quantize(w, group_size=None, bits=None, mode="affine"):
    """Quantize w along its last axis in groups of group_size.  Returns
    (w_q, scales, biases) for mode "affine", (w_q, scales) otherwise."""
    cdef Array x = _arr(w)
    return tuple(_list(nops.quantize_(x.ptr[0], _opt_int(group_size, "group_size"),
                                      _opt_int(bits, "bits"), _str(mode, "mode"))))


def dequantize(w, scales, biases=None, group_size=None, bits=None, mode="affine",
               dtype=None):
    """Undo quantize(): w_q, scales (and biases for "affine") back to floats."""
    cdef Array q = _arr(w), s = _arr(scales)
    cdef Array b = None if biases is None else _arr(biases)
    cdef Dtype d = None if dtype is None else as_dtype(dtype)
    return wrap_new((nops.dequantize_(q.ptr[0], s.ptr[0], _ptr(b),
                                      _opt_int(group_size, "group_size"), _opt_int(bits, "bits"),
                                      _str(mode, "mode"), -1 if d is None else d.code)))


def quantized_matmul(x, w, scales, biases=None, transpose=True, group_size=None,
                     bits=None, mode="affine"):
    """x @ dequantize(w).T (or without .T when transpose=False), computed on
    the quantized weights."""
    cdef Array a = _arr(x), q = _arr(w), s = _arr(scales)
    cdef Array b = None if biases is None else _arr(biases)
    return wrap_new((nops.quantized_matmul_(a.ptr[0], q.ptr[0], s.ptr[0], _ptr(b),
                                            transpose, _opt_int(group_size, "group_size"),
                                            _opt_int(bits, "bits"), _str(mode, "mode"))))


def gather_mm(a, b, lhs_indices=None, rhs_indices=None, sorted_indices=False):
    """Matmuls of the matrices of a and b picked by flat indices into their
    batch dimensions (a[lhs_indices] @ b[rhs_indices])."""
    cdef Array x = _arr(a), y = _arr(b)
    cdef Array li = None if lhs_indices is None else _arr(lhs_indices)
    cdef Array ri = None if rhs_indices is None else _arr(rhs_indices)
    return wrap_new((nops.gather_mm_(x.ptr[0], y.ptr[0], _ptr(li), _ptr(ri), sorted_indices)))


def gather_qmm(x, w, scales, biases=None, lhs_indices=None, rhs_indices=None,
               transpose=True, group_size=None, bits=None, mode="affine",
               sorted_indices=False):
    """gather_mm with quantized w: x[lhs_indices] @ dequantize(w[rhs_indices]).T."""
    cdef Array a = _arr(x), q = _arr(w), s = _arr(scales)
    cdef Array b = None if biases is None else _arr(biases)
    cdef Array li = None if lhs_indices is None else _arr(lhs_indices)
    cdef Array ri = None if rhs_indices is None else _arr(rhs_indices)
    return wrap_new((nops.gather_qmm_(a.ptr[0], q.ptr[0], s.ptr[0], _ptr(b), _ptr(li), _ptr(ri),
                                      transpose, _opt_int(group_size, "group_size"),
                                      _opt_int(bits, "bits"), _str(mode, "mode"),
                                      sorted_indices)))


__all__ = [
    # elementwise binary
    "add", "subtract", "multiply", "divide", "floor_divide", "remainder", "power",
    "maximum", "minimum", "equal", "not_equal", "less", "less_equal", "greater",
    "greater_equal", "logical_and", "logical_or", "logical_xor", "bitwise_and",
    "bitwise_or", "bitwise_xor", "left_shift", "right_shift", "logaddexp", "arctan2",
    "array_equal", "allclose", "isclose", "where", "clip",
    # elementwise unary
    "negative", "abs", "sign", "exp", "expm1", "log", "log1p", "log2", "log10", "sqrt",
    "rsqrt", "square", "reciprocal", "sin", "cos", "tan", "arcsin", "arccos", "arctan",
    "sinh", "cosh", "tanh", "arcsinh", "arccosh", "arctanh", "sigmoid", "erf", "erfinv",
    "floor", "ceil", "trunc", "round", "logical_not", "bitwise_invert", "isnan", "isinf",
    "isfinite", "nan_to_num", "stop_gradient",
    # activations
    "relu", "silu", "gelu", "gelu_approx", "softplus", "log_sigmoid", "softmax",
    "log_softmax",
    # creation
    "zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "arange", "linspace",
    "eye", "identity", "tri", "tril", "triu", "astype", "view",
    # shape
    "reshape", "flatten", "transpose", "swapaxes", "moveaxis", "expand_dims", "squeeze",
    "broadcast_to", "broadcast_arrays", "concatenate", "stack", "split", "tile", "repeat",
    "pad", "slice", "slice_update", "take", "take_along_axis", "put_along_axis",
    "scatter_add", "add_at", "flip", "roll", "diag", "diagonal",
    # reductions
    "sum", "mean", "prod", "max", "min", "all", "any", "logsumexp", "var", "std",
    "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin",
    # linear algebra
    "matmul", "addmm", "inner", "outer", "tensordot", "einsum",
    # sort and select
    "sort", "argsort", "partition", "argpartition", "topk",
    # quantization
    "quantize", "dequantize", "quantized_matmul", "gather_mm", "gather_qmm",
]


# The ops that are also Array methods (a.sum(axis=0), a.transpose(1, 0), ...).
_register_methods({name: globals()[name] for name in """
abs all any argmax argmin argsort cummax cummin cumprod cumsum diag diagonal
exp flatten log log1p logsumexp max mean min moveaxis prod reciprocal round
rsqrt sin cos sqrt square squeeze std sum swapaxes split transpose var
""".split()})
