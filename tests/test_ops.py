"""mlxcy.ops against numpy (the independent reference)."""
import math

import ml_dtypes
import numpy as np
import pytest

import mlxcy as mx
from mlxcy import ops

BF16 = np.dtype(ml_dtypes.bfloat16)
NP = {"float32": np.float32, "float16": np.float16, "bfloat16": BF16,
      "int32": np.int32, "bool_": np.bool_}
# (rtol, atol) per dtype: half precision results are compared loosely.
TOL = {"float32": (1e-5, 1e-6), "float16": (1e-2, 1e-3), "bfloat16": (2e-2, 1e-2),
       "int32": (0, 0), "bool_": (0, 0)}
FLOATS = ["float32", "float16", "bfloat16"]

rng = np.random.default_rng(0)


def make(shape, dtype, lo=-2.0, hi=2.0):
    """(mlxcy Array, numpy reference input) with the reference already rounded
    to dtype, so both sides see the same numbers."""
    if dtype == "bool_":
        v = rng.random(shape) > 0.5
    elif dtype == "int32":
        v = rng.integers(int(lo), int(hi) + 1, size=shape).astype(np.int32)
    else:
        v = rng.uniform(lo, hi, size=shape).astype(np.float32).astype(NP[dtype])
    ref = v.astype(np.float32) if v.dtype == BF16 else v
    return mx.array(v), ref


def npy(a):
    """An Array as numpy; bfloat16 and float16 as float32 for comparisons."""
    out = a.numpy() if isinstance(a, mx.Array) else np.asarray(a)
    return out.astype(np.float32) if out.dtype in (BF16, np.float16) else out


def close(got, want, dtype="float32", rtol=None, atol=None):
    r, t = TOL[dtype]
    got_np = npy(got)
    assert got_np.shape == np.shape(want), (got_np.shape, np.shape(want))
    np.testing.assert_allclose(got_np, np.asarray(want, dtype=got_np.dtype if got_np.dtype.kind
                                                  in "biu" else np.float64),
                               rtol=r if rtol is None else rtol, atol=t if atol is None else atol)


# ----------------------------------------------------------- elementwise ----

SHAPE_PAIRS = [((3, 4), (4,)), ((2, 1, 3), (1, 5, 1)), ((0, 3), (3,)), ((), ()), ((4,), ())]

ARITH = {
    "add": np.add, "subtract": np.subtract, "multiply": np.multiply,
    "maximum": np.maximum, "minimum": np.minimum,
}
COMPARE = {
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
}


@pytest.mark.parametrize("dtype", FLOATS + ["int32"])
@pytest.mark.parametrize("shapes", SHAPE_PAIRS)
def test_binary_arith_and_compare(dtype, shapes):
    a, an = make(shapes[0], dtype, -5, 5)
    b, bn = make(shapes[1], dtype, -5, 5)
    for name, ref in {**ARITH, **COMPARE}.items():
        out = getattr(mx, name)(a, b)
        if name in COMPARE:
            assert out.dtype == mx.bool_
        else:
            assert out.dtype == a.dtype
        close(out, ref(an, bn), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_division_family(dtype):
    a, an = make((4, 5), dtype, -9, 9)
    b, bn = make((5,), dtype, 1, 4)
    close(mx.divide(a, b), an.astype(np.float32) / bn, "float32" if dtype != "float16" else dtype)
    if dtype != "float16":   # floor of half-precision quotients is too rounding-sensitive
        close(mx.floor_divide(a, b), np.floor_divide(an, bn), dtype)
        close(mx.remainder(a, -b), np.remainder(an, -bn), dtype, atol=1e-5)
    p, pn = make((3, 4), dtype, 0, 3)
    close(mx.power(p, mx.array(np.array([0, 1, 2, 3], NP[dtype]))),
          np.power(pn, np.array([0, 1, 2, 3], np.float32 if dtype != "int32" else np.int32)),
          dtype)


def test_scalar_operands_take_array_dtype():
    a, an = make((3,), "float16")
    out = mx.add(a, 2.5)
    assert out.dtype == mx.float16
    close(out, an.astype(np.float32) + 2.5, "float16")
    i = mx.array(np.array([1, 2, 3], np.int16))
    assert mx.multiply(3, i).dtype == mx.int16
    close(mx.subtract(10, i), np.array([9, 8, 7]), "int32")
    close(mx.power(2, mx.array([1, 2, 3])), [2, 4, 8], "int32")
    assert mx.add(1, 2.0).dtype == mx.float32
    # lists and numpy arrays are accepted anywhere
    close(mx.maximum([1, 5, 2], np.array([3, 3, 3], np.int32)), [3, 5, 3], "int32")


def test_logical_and_bitwise():
    p, pn = make((4, 3), "bool_")
    q, qn = make((3,), "bool_")
    close(mx.logical_and(p, q), pn & qn, "bool_")
    close(mx.logical_or(p, q), pn | qn, "bool_")
    close(mx.logical_xor(p, q), pn ^ qn, "bool_")
    close(mx.logical_not(p), ~pn, "bool_")
    close(mx.logical_and(mx.array([0.0, 2.0, 3.0]), [1, 0, 5]), [False, False, True], "bool_")
    a, an = make((2, 5), "int32", -100, 100)
    b, bn = make((5,), "int32", 0, 100)
    for name, ref in [("bitwise_and", np.bitwise_and), ("bitwise_or", np.bitwise_or),
                      ("bitwise_xor", np.bitwise_xor)]:
        close(getattr(mx, name)(a, b), ref(an, bn), "int32")
    close(mx.bitwise_invert(a), np.invert(an), "int32")
    s, sn = make((5,), "int32", 0, 4)
    close(mx.left_shift(b, s), np.left_shift(bn, sn), "int32")
    close(mx.right_shift(b, s), np.right_shift(bn, sn), "int32")


verf = np.vectorize(math.erf, otypes=[np.float64])

UNARY = [
    # name, numpy reference, input range
    ("negative", np.negative, (-3, 3)), ("abs", np.abs, (-3, 3)), ("sign", np.sign, (-3, 3)),
    ("exp", np.exp, (-3, 3)), ("expm1", np.expm1, (-1, 1)), ("log", np.log, (0.1, 5)),
    ("log1p", np.log1p, (-0.5, 3)), ("log2", np.log2, (0.1, 5)), ("log10", np.log10, (0.1, 5)),
    ("sqrt", np.sqrt, (0, 5)), ("rsqrt", lambda x: 1 / np.sqrt(x), (0.1, 5)),
    ("square", np.square, (-3, 3)), ("reciprocal", np.reciprocal, (0.5, 3)),
    ("sin", np.sin, (-3, 3)), ("cos", np.cos, (-3, 3)), ("tan", np.tan, (-1, 1)),
    ("arcsin", np.arcsin, (-0.9, 0.9)), ("arccos", np.arccos, (-0.9, 0.9)),
    ("arctan", np.arctan, (-3, 3)), ("sinh", np.sinh, (-2, 2)), ("cosh", np.cosh, (-2, 2)),
    ("tanh", np.tanh, (-3, 3)), ("sigmoid", lambda x: 1 / (1 + np.exp(-x)), (-5, 5)),
    ("erf", verf, (-2, 2)), ("floor", np.floor, (-3, 3)), ("ceil", np.ceil, (-3, 3)),
]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", [(3, 4), (0,), ()])
def test_unary(dtype, shape):
    for name, ref, (lo, hi) in UNARY:
        a, an = make(shape, dtype, lo, hi)
        out = getattr(mx, name)(a)
        assert out.dtype == a.dtype, name
        try:
            close(out, ref(an.astype(np.float64)), dtype)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_unary_int_and_erfinv_round():
    a, an = make((6,), "int32", -5, 5)
    close(mx.abs(a), np.abs(an), "int32")
    close(mx.negative(a), -an, "int32")
    close(mx.sign(a), np.sign(an), "int32")
    close(mx.square(a), an * an, "int32")
    y, yn = make((50,), "float32", -0.95, 0.95)
    close(verf(mx.erfinv(y).numpy().astype(np.float64)), yn, rtol=1e-4, atol=1e-5)
    x, xn = make((20,), "float32", -50, 50)
    for d in (0, 1, 2):
        close(mx.round(x, d), np.round(xn, d), atol=1e-4)
    close(x.round(1), np.round(xn, 1), atol=1e-4)


def test_nan_inf_checks():
    v = np.array([0.0, np.nan, np.inf, -np.inf, -1.5], np.float32)
    a = mx.array(v)
    close(mx.isnan(a), np.isnan(v), "bool_")
    close(mx.isinf(a), np.isinf(v), "bool_")
    close(mx.isfinite(a), np.isfinite(v), "bool_")
    close(mx.nan_to_num(a), np.nan_to_num(v))
    close(mx.nan_to_num(a, nan=7.0, posinf=100.0, neginf=-100.0),
          np.nan_to_num(v, nan=7.0, posinf=100.0, neginf=-100.0))
    h = mx.array(v.astype(np.float16))
    close(mx.nan_to_num(h, posinf=1.0), np.nan_to_num(v, posinf=1.0,
                                                      neginf=np.finfo(np.float16).min), "float16")


def test_closeness():
    a = np.array([1.0, 2.0, np.nan, 4.0], np.float32)
    b = a + np.array([1e-7, 1e-3, 0, 0], np.float32)
    assert not mx.allclose(a, b).item()
    assert mx.allclose(a[[0, 3]], b[[0, 3]]).item()
    assert mx.allclose(a, b, rtol=1e-2, equal_nan=True).item()
    close(mx.isclose(a, b), np.isclose(a, b), "bool_")
    close(mx.isclose(a, b, rtol=0, atol=1e-2, equal_nan=True),
          np.isclose(a, b, rtol=0, atol=1e-2, equal_nan=True), "bool_")
    assert mx.array_equal([1, 2, 3], mx.array([1.0, 2.0, 3.0])).item()
    assert not mx.array_equal([1, 2, 3], [1, 2]).item()
    assert not mx.array_equal(a, a).item()
    assert mx.array_equal(a, a, equal_nan=True).item()


@pytest.mark.parametrize("dtype", FLOATS + ["int32"])
def test_where_and_clip(dtype):
    a, an = make((3, 4), dtype, -5, 5)
    b, bn = make((4,), dtype, -5, 5)
    c, cn = make((3, 1), "bool_")
    close(mx.where(c, a, b), np.where(cn, an, bn), dtype)
    close(mx.where(cn, a, 0), np.where(cn, an, 0), dtype)
    assert mx.where(cn, a, 0).dtype == a.dtype
    close(mx.clip(a, -1, 2), np.clip(an, -1, 2), dtype)
    close(mx.clip(a, None, b), np.minimum(an, bn), dtype)
    close(mx.clip(a, b, None), np.maximum(an, bn), dtype)
    with pytest.raises(ValueError, match="a_min"):
        mx.clip(a, None, None)


# ---------------------------------------------------------- activations ----

def gelu_ref(x):
    return 0.5 * x * (1 + verf(x / math.sqrt(2)))


def gelu_tanh_ref(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("dtype", FLOATS)
def test_activations(dtype):
    a, an = make((4, 7), dtype, -6, 6)
    x = an.astype(np.float64)
    refs = {
        "silu": x / (1 + np.exp(-x)), "gelu": gelu_ref(x), "gelu_approx": gelu_tanh_ref(x),
        "relu": np.maximum(x, 0), "softplus": np.logaddexp(x, 0),
        "log_sigmoid": -np.logaddexp(-x, 0),
    }
    for name, want in refs.items():
        out = getattr(mx, name)(a)
        assert out.dtype == a.dtype, name
        close(out, want, dtype)
    close(mx.gelu(a, approximate="tanh"), gelu_tanh_ref(x), dtype)
    with pytest.raises(ValueError, match="approximate"):
        mx.gelu(a, approximate="fast")
    # gelu and its approximation really differ
    assert not np.allclose(gelu_ref(x), gelu_tanh_ref(x), rtol=0, atol=1e-5)


def test_activations_of_ints():
    close(mx.relu([-2, 0, 3]), [0, 0, 3], "int32")
    close(mx.silu([0, 1]), [0.0, 1 / (1 + math.exp(-1))])


def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax(dtype):
    a, an = make((3, 4, 5), dtype, -4, 4)
    x = an.astype(np.float64)
    close(mx.softmax(a, axis=-1), softmax_ref(x, -1), dtype)
    close(mx.softmax(a, axis=(0, 2), precise=True), softmax_ref(x, (0, 2)), dtype)
    close(mx.softmax(a), softmax_ref(x, None), dtype)
    lse = np.log(np.exp(x).sum(axis=1, keepdims=True))
    close(mx.log_softmax(a, axis=1), x - lse, dtype, atol=3e-2 if dtype != "float32" else None)


# -------------------------------------------------------------- creation ----

@pytest.mark.parametrize("dtype", FLOATS + ["int32", "bool_"])
def test_creation(dtype):
    d = getattr(mx, dtype)
    z = mx.zeros((2, 3), d)
    assert z.dtype == d
    close(z, np.zeros((2, 3)), dtype)
    close(mx.ones(4, dtype=d), np.ones(4), dtype)
    close(mx.full((2, 2), 1, d), np.ones((2, 2)), dtype)
    close(mx.eye(3, 4, k=1, dtype=d), np.eye(3, 4, k=1), dtype)
    close(mx.identity(3, d), np.eye(3), dtype)
    close(mx.tri(4, 3, k=-1, dtype=d), np.tri(4, 3, k=-1), dtype)
    a, an = make((2, 3), dtype)
    for fn, want in [(mx.zeros_like, np.zeros_like(an)), (mx.ones_like, np.ones_like(an))]:
        out = fn(a)
        assert out.dtype == d and out.shape == (2, 3)
        close(out, want, dtype)
    assert mx.zeros(()).shape == () and mx.zeros((0, 2)).shape == (0, 2)


def test_full_arange_linspace():
    close(mx.full((2, 3), [1.0, 2.0, 3.0]), np.full((2, 3), [1.0, 2.0, 3.0]))
    assert mx.full((2,), 3).dtype == mx.int32
    assert mx.full((2,), 3, mx.float16).dtype == mx.float16
    a = mx.array(np.zeros((2, 2), np.float16))
    f = mx.full_like(a, 2.5)
    assert f.dtype == mx.float16
    close(f, np.full((2, 2), 2.5), "float16")
    assert mx.full_like(a, 1, dtype=mx.int32).dtype == mx.int32
    r = mx.arange(5)
    assert r.dtype == mx.int32
    close(r, np.arange(5), "int32")
    close(mx.arange(2, 11, 3), np.arange(2, 11, 3), "int32")
    close(mx.arange(-1, 1, 0.25), np.arange(-1, 1, 0.25))
    assert mx.arange(0, 1, 0.5).dtype == mx.float32
    assert mx.arange(5, dtype=mx.float16).dtype == mx.float16
    assert mx.arange(3, 3).shape == (0,)
    close(mx.linspace(0, 1, 7), np.linspace(0, 1, 7))
    close(mx.linspace(-2, 3, 5, endpoint=False), np.linspace(-2, 3, 5, endpoint=False))
    with pytest.raises(TypeError, match="stop"):
        mx.arange("3")
    with pytest.raises(TypeError, match="step"):
        mx.arange(0, 3, None or "1")


def test_astype_view():
    a, an = make((3, 4), "float32", -100, 100)
    for dt in ["int32", "float16", "bfloat16", "bool_"]:
        out = mx.astype(a, dt)
        assert out.dtype == getattr(mx, dt)
    close(mx.astype(a, mx.int32), an.astype(np.int32), "int32")
    close(mx.astype(a, "float16"), an.astype(np.float16).astype(np.float32), "float16", 0, 0)
    v = mx.view(a, mx.int32)
    np.testing.assert_array_equal(v.numpy(), an.view(np.int32))
    v8 = mx.view(a, mx.uint8)
    assert v8.shape == (3, 16)
    np.testing.assert_array_equal(v8.numpy(), an.view(np.uint8))
    h = mx.view(mx.array(an.astype(np.float16)), mx.uint16)
    np.testing.assert_array_equal(h.numpy(), an.astype(np.float16).view(np.uint16))


# ----------------------------------------------------------------- shape ----

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "bool_"])
def test_shape_ops(dtype):
    a, an = make((2, 3, 4), dtype)
    close(mx.reshape(a, (4, -1)), an.reshape(4, -1), dtype)
    close(mx.flatten(a), an.reshape(-1), dtype)
    close(mx.flatten(a, 1, 2), an.reshape(2, 12), dtype)
    close(mx.transpose(a), an.T, dtype)
    close(mx.transpose(a, (1, 0, 2)), an.transpose(1, 0, 2), dtype)
    close(mx.transpose(a, 2, 0, 1), an.transpose(2, 0, 1), dtype)
    close(a.transpose(1, 2, 0), an.transpose(1, 2, 0), dtype)
    close(mx.swapaxes(a, 0, 2), np.swapaxes(an, 0, 2), dtype)
    close(mx.moveaxis(a, 0, -1), np.moveaxis(an, 0, -1), dtype)
    close(mx.expand_dims(a, (0, 2)), np.expand_dims(an, (0, 2)), dtype)
    s = mx.expand_dims(a, 1)
    close(mx.squeeze(s), an, dtype)
    close(mx.squeeze(s, 1), an, dtype)
    close(mx.broadcast_to(a[:, :1], (2, 3, 4)), np.broadcast_to(an[:, :1], (2, 3, 4)), dtype)
    x, y = mx.broadcast_arrays(a, mx.ones((5, 1, 1, 1), a.dtype))
    assert x.shape == y.shape == (5, 2, 3, 4)
    close(x, np.broadcast_to(an, (5, 2, 3, 4)), dtype)
    b, bn = make((2, 1, 4), dtype)
    close(mx.concatenate([a, b], axis=1), np.concatenate([an, bn], axis=1), dtype)
    close(mx.concatenate([a, b], axis=None), np.concatenate([an, bn], axis=None), dtype)
    close(mx.stack([a, a], axis=-1), np.stack([an, an], axis=-1), dtype)
    close(mx.tile(a, (2, 1, 2)), np.tile(an, (2, 1, 2)), dtype)
    close(mx.repeat(a, 2, axis=1), np.repeat(an, 2, axis=1), dtype)
    close(mx.repeat(a, 3), np.repeat(an, 3), dtype)
    close(mx.flip(a, 1), np.flip(an, 1), dtype)
    close(mx.flip(a), np.flip(an), dtype)
    close(mx.roll(a, 2, axis=2), np.roll(an, 2, axis=2), dtype)
    close(mx.roll(a, -5), np.roll(an, -5), dtype)
    close(mx.roll(a, (1, 2), axis=(0, 1)), np.roll(an, (1, 2), axis=(0, 1)), dtype)


def test_split():
    a, an = make((6, 4), "float32")
    parts = mx.split(a, 3)
    assert isinstance(parts, list) and len(parts) == 3
    for got, want in zip(parts, np.split(an, 3)):
        close(got, want)
    for got, want in zip(mx.split(a, [1, 3], axis=1), np.split(an, [1, 3], axis=1)):
        close(got, want)
    for got, want in zip(a.split(2, 1), np.split(an, 2, 1)):
        close(got, want)
    with pytest.raises(ValueError):
        mx.split(a, 4)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_pad(dtype):
    a, an = make((2, 3), dtype)
    close(mx.pad(a, 1), np.pad(an, 1), dtype)
    close(mx.pad(a, (1, 2)), np.pad(an, (1, 2)), dtype)
    close(mx.pad(a, [(0, 1), (2, 0)], constant_values=3),
          np.pad(an, [(0, 1), (2, 0)], constant_values=3), dtype)
    close(mx.pad(a, ((1, 1), (1, 2)), mode="edge"), np.pad(an, ((1, 1), (1, 2)), mode="edge"),
          dtype)
    assert mx.pad(a, 1, constant_values=2).dtype == a.dtype
    with pytest.raises(ValueError, match="pad_width"):
        mx.pad(a, [(1, 1)] * 3)


def test_dynamic_slice_and_update():
    a, an = make((4, 5), "float32")
    close(mx.slice(a, mx.array([1, 2]), (0, 1), (2, 3)), an[1:3, 2:5])
    close(mx.slice(a, mx.array(2), [1], [4, 2]), an[:, 2:4])
    u, un = make((2, 2), "float32")
    want = an.copy()
    want[2:4, 1:3] = un
    close(mx.slice_update(a, u, mx.array([2, 1]), [0, 1]), want)
    close(a, an)   # the input is untouched


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_take_family(dtype):
    a, an = make((3, 4), dtype, -10, 10)
    idx = np.array([[2, 0], [1, 1]], np.int32)
    close(mx.take(a, mx.array(idx), axis=1), np.take(an, idx, axis=1), dtype)
    close(mx.take(a, idx), np.take(an, idx), dtype)
    close(mx.take(a, 5), np.take(an, 5), dtype)
    close(mx.take(a, -1, axis=0), an[-1], dtype)
    order = np.argsort(an, axis=1).astype(np.int32)
    close(mx.take_along_axis(a, order, axis=1), np.take_along_axis(an, order, axis=1), dtype)
    close(mx.take_along_axis(a, mx.array([0, 11]), None), an.reshape(-1)[[0, 11]], dtype)
    vals, vn = make((3, 1), dtype, -10, 10)
    col = np.array([[3], [0], [1]], np.int32)
    want = an.copy()
    np.put_along_axis(want, col, vn, axis=1)
    close(mx.put_along_axis(a, col, vals, axis=1), want, dtype)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_add_at_and_scatter_add(axis):
    a, an = make((4, 5, 3), "float32")
    ax = axis % 3
    n = an.shape[ax]
    idx = np.array([0, n - 1, 0, 1, 0], np.int32)   # repeated indices accumulate
    upd_shape = list(an.shape)
    upd_shape[ax] = len(idx)
    u, un = make(tuple(upd_shape), "float32")
    want = an.copy()
    np.add.at(want, (slice(None),) * ax + (idx,), un)
    close(mx.add_at(a, idx, u, axis=axis), want)
    # scalar updates broadcast
    want = an.copy()
    np.add.at(want, (slice(None),) * ax + (idx,), 1.0)
    close(mx.add_at(a, mx.array(idx), 1.0, axis), want)
    # raw scatter_add on axis 0: updates are (n, 1, 5, 3)
    want = an.copy()
    u0, u0n = make((3, 1, 5, 3), "float32")
    np.add.at(want, np.array([3, 3, 1]), u0n[:, 0])
    close(mx.scatter_add(a, mx.array([3, 3, 1]), u0, 0), want)


def test_scatters_into_arrays_with_an_empty_axis():
    # nothing to add or write: MLX's CPU scatter divided by the empty slice's
    # size (SIGFPE, found by random calls on 2026-12-07)
    an = np.zeros((2, 0, 3), np.float32)
    close(mx.add_at(mx.array(an), 1, 1.0), an)
    close(mx.add_at(mx.array(an), mx.array([1, 0, 1]), 1.0, axis=0), an)
    close(mx.scatter_add(mx.array(an), mx.array([1]), mx.ones((1, 1, 0, 3)), 0), an)
    a = mx.array(an)
    a[mx.array([1])] = 5.0
    close(a, an)


def test_diag_tri():
    a, an = make((4, 5), "float32")
    close(mx.diag(a), np.diag(an))
    close(mx.diag(a, 1), np.diag(an, 1))
    close(mx.diag(mx.array([1.0, 2.0])), np.diag([1.0, 2.0]))
    close(a.diagonal(), np.diagonal(an))
    b, bn = make((2, 3, 4), "int32")
    close(mx.diagonal(b, 1, 1, 2), np.diagonal(bn, 1, 1, 2), "int32")
    close(mx.tril(a, -1), np.tril(an, -1))
    close(mx.triu(a, 2), np.triu(an, 2))


# ------------------------------------------------------------ reductions ----

RED = [("sum", np.sum), ("mean", np.mean), ("prod", np.prod), ("max", np.max),
       ("min", np.min), ("logsumexp", None)]


def lse_ref(x, axis=None, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


@pytest.mark.parametrize("dtype", FLOATS + ["int32"])
@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(dtype, axis, keepdims):
    a, an = make((3, 4, 2), dtype, -2, 2)
    x = an.astype(np.float64)
    for name, ref in RED:
        if name == "logsumexp" and dtype == "int32":
            continue
        want = (lse_ref if ref is None else ref)(x, axis=axis, keepdims=keepdims)
        out = getattr(mx, name)(a, axis=axis, keepdims=keepdims)
        close(out, want, "float32" if dtype == "int32" and name == "mean" else dtype,
              rtol=5e-5 if dtype == "float32" else None)
    # Absolute slack near zero: a half-precision variance of nearly equal
    # values cancels, and the square root magnifies that (GPU sums reorder).
    atol = {"bfloat16": 3e-2, "float16": 1e-3}.get(dtype, 1e-5)
    for ddof in (0, 1):
        close(mx.var(a, axis, keepdims, ddof), np.var(x, axis=axis, keepdims=keepdims, ddof=ddof),
              dtype if dtype != "int32" else "float32", atol=atol)
        close(mx.std(a, axis, keepdims, ddof=ddof),
              np.std(x, axis=axis, keepdims=keepdims, ddof=ddof),
              dtype if dtype != "int32" else "float32", atol=atol)
    b, bn = make((3, 4, 2), "bool_")
    close(mx.all(b, axis=axis, keepdims=keepdims), np.all(bn, axis=axis, keepdims=keepdims), "bool_")
    close(mx.any(b, axis=axis, keepdims=keepdims), np.any(bn, axis=axis, keepdims=keepdims), "bool_")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_arg_reductions_and_methods(dtype):
    # distinct values so argmax/argmin are unambiguous
    vals = rng.permutation(24).reshape(2, 3, 4).astype(np.float32) - 12
    a = mx.array(vals.astype(NP[dtype]))
    for fn, ref in [(mx.argmax, np.argmax), (mx.argmin, np.argmin)]:
        close(fn(a), ref(vals), "int32")
        close(fn(a, axis=1), ref(vals, axis=1), "int32")
        close(fn(a, axis=-1, keepdims=True), ref(vals, axis=-1, keepdims=True), "int32")
    close(a.sum(axis=0), vals.sum(axis=0), dtype)
    close(a.max(), vals.max(), dtype)
    close(a.argmax(axis=2), vals.argmax(axis=2), "int32")


def test_empty_and_scalar_reductions():
    e = mx.zeros((0, 3))
    close(mx.sum(e), 0.0)
    close(mx.sum(e, axis=0), np.zeros(3))
    close(mx.prod(e, axis=0), np.ones(3))
    assert mx.all(mx.zeros((0,), mx.bool_)).item() is True
    assert mx.any(mx.zeros((0,), mx.bool_)).item() is False
    s = mx.array(2.5)
    close(mx.sum(s), 2.5)
    close(mx.mean(s), 2.5)


def scan_ref(fn, x, axis, reverse, inclusive, identity):
    if axis is None:
        x, axis = x.reshape(-1), 0
    if reverse:
        x = np.flip(x, axis)
    out = fn(x, axis=axis)
    if not inclusive:
        pad_shape = list(x.shape)
        pad_shape[axis] = 1
        out = np.concatenate([np.full(pad_shape, identity, out.dtype),
                              np.delete(out, -1, axis=axis)], axis=axis)
    return np.flip(out, axis) if reverse else out


@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("reverse,inclusive", [(False, True), (True, True), (False, False),
                                               (True, False)])
def test_scans(dtype, axis, reverse, inclusive):
    a, an = make((3, 5), dtype, -3, 3)
    info = np.finfo(np.float32) if dtype == "float32" else np.iinfo(np.int32)
    cases = [("cumsum", np.cumsum, 0), ("cumprod", np.cumprod, 1),
             ("cummax", np.maximum.accumulate, info.min),
             ("cummin", np.minimum.accumulate, info.max)]
    for name, fn, ident in cases:
        f = (lambda x, axis, fn=fn: fn(x, axis=axis))
        want = scan_ref(f, an, axis, reverse, inclusive, ident)
        out = getattr(mx, name)(a, axis=axis, reverse=reverse, inclusive=inclusive)
        if name in ("cummax", "cummin") and not inclusive:
            # the exclusive first element is the dtype's identity: compare the rest
            sl = (slice(None),) * (0 if axis is None else axis) + (
                slice(0, -1) if reverse else slice(1, None),)
            close(out[sl], want[sl], dtype)
        else:
            close(out, want, dtype, rtol=1e-5)
    close(a.cumsum(1), np.cumsum(an, 1), dtype)


# -------------------------------------------------------- linear algebra ----

@pytest.mark.parametrize("dtype", FLOATS)
def test_matmul_family(dtype):
    r, t = {"float32": (1e-4, 1e-4), "float16": (1e-2, 2e-2), "bfloat16": (3e-2, 5e-2)}[dtype]
    a, an = make((2, 3, 4), dtype)
    b, bn = make((4, 5), dtype)
    close(mx.matmul(a, b), an @ bn, dtype, r, t)
    v, vn = make((4,), dtype)
    close(mx.matmul(a, v), an @ vn, dtype, r, t)
    close(mx.matmul(vn, b), vn @ bn, dtype, r, t)
    c, cn = make((5,), dtype)
    close(mx.addmm(c, a, b), cn + an @ bn, dtype, r, t)
    close(mx.addmm(c, a, b, alpha=0.5, beta=2.0), 2 * cn + 0.5 * (an @ bn), dtype, r, t)
    close(mx.inner(a, v), np.inner(an, vn), dtype, r, t)
    close(mx.outer(v, c), np.outer(vn, cn), dtype, r, t)
    close(mx.tensordot(a, b, axes=1), np.tensordot(an, bn, axes=1), dtype, r, t)
    d, dn = make((3, 2, 6), dtype)
    close(mx.tensordot(a, d, axes=([0, 1], [1, 0])),
          np.tensordot(an, dn, axes=([0, 1], [1, 0])), dtype, r, t)
    close(mx.einsum("bij,jk->bki", a, b), np.einsum("bij,jk->bki", an, bn), dtype, r, t)
    close(mx.einsum("ii->i", mx.eye(3, dtype=a.dtype)), np.ones(3), dtype)
    close(mx.einsum("bij,bij->b", a, a), np.einsum("bij,bij->b", an, an), dtype, r, t)


# ------------------------------------------------------ sort and select ----

@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
def test_sort_family(dtype):
    vals = (rng.permutation(30).reshape(5, 6) - 15).astype(NP[dtype])
    a = mx.array(vals)
    close(mx.sort(a), np.sort(vals), dtype)
    close(mx.sort(a, axis=0), np.sort(vals, axis=0), dtype)
    close(mx.sort(a, axis=None), np.sort(vals, axis=None), dtype)
    close(mx.argsort(a, axis=1), np.argsort(vals, axis=1), "int32")
    close(a.argsort(), np.argsort(vals), "int32")
    kth = 2
    p = mx.partition(a, kth, axis=1).numpy()
    s = np.sort(vals, axis=1)
    np.testing.assert_array_equal(p[:, kth], s[:, kth])
    assert (p[:, :kth] <= p[:, kth:kth + 1]).all() and (p[:, kth + 1:] >= p[:, kth:kth + 1]).all()
    np.testing.assert_array_equal(np.sort(p, axis=1), s)
    ip = mx.argpartition(a, kth, axis=1).numpy()
    np.testing.assert_array_equal(np.take_along_axis(vals, ip, axis=1)[:, kth], s[:, kth])
    tk = mx.topk(a, 3, axis=1).numpy()
    np.testing.assert_array_equal(np.sort(tk, axis=1), s[:, -3:])
    tk0 = mx.topk(a, 2, axis=None).numpy()
    np.testing.assert_array_equal(np.sort(tk0), np.sort(vals, axis=None)[-2:])


# ---------------------------------------------------------- quantization ----

def unpack(wq, bits, k):
    """Unpack MLX's little-endian bit stream of `bits`-bit values."""
    raw = np.ascontiguousarray(wq).view(np.uint8)
    bitstream = np.unpackbits(raw, axis=-1, bitorder="little")
    bitstream = bitstream[..., :k * bits].reshape(*wq.shape[:-1], k, bits).astype(np.int64)
    return (bitstream << np.arange(bits)).sum(-1)


def dequant_ref(wq, scales, biases, gs, bits, k):
    q = unpack(wq, bits, k).astype(np.float64)
    q = q.reshape(*q.shape[:-1], k // gs, gs)
    out = q * scales[..., None].astype(np.float64) + biases[..., None].astype(np.float64)
    return out.reshape(*out.shape[:-2], k)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_roundtrip_and_matmul(bits, group_size):
    k, n = 256, 16
    w, wn = make((n, k), "float32", -1, 1)
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    assert wq.dtype == mx.uint32 and wq.shape == (n, k * bits // 32)
    assert scales.shape == biases.shape == (n, k // group_size)
    deq = mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits)
    ref = dequant_ref(wq.numpy(), scales.numpy(), biases.numpy(), group_size, bits, k)
    close(deq, ref, rtol=1e-5, atol=1e-5)
    # within one quantization step of the original: MLX shifts the grid so one
    # edge of each group is exact, so the error may reach a full step
    g = wn.reshape(n, k // group_size, group_size)
    step = (g.max(-1) - g.min(-1)) / (2 ** bits - 1)
    err = np.abs(deq.numpy() - wn).reshape(n, k // group_size, group_size)
    assert (err <= step[..., None] + 1e-6).all()
    assert (err <= np.abs(scales.numpy())[..., None] * 1.001 + 1e-6).all()
    x, xn = make((3, k), "float32")
    close(mx.quantized_matmul(x, wq, scales, biases, True, group_size, bits),
          xn.astype(np.float64) @ ref.T, rtol=1e-4, atol=1e-3)
    # transpose=False: w is (k, n) quantized along n
    if group_size <= n * 4:
        w2, w2n = make((k, 64), "float32", -1, 1)
        q2, s2, b2 = mx.quantize(w2, group_size=group_size if group_size <= 64 else 64, bits=bits)
        gs2 = group_size if group_size <= 64 else 64
        ref2 = dequant_ref(q2.numpy(), s2.numpy(), b2.numpy(), gs2, bits, 64)
        close(mx.quantized_matmul(x, q2, s2, b2, transpose=False, group_size=gs2, bits=bits),
              xn.astype(np.float64) @ ref2, rtol=1e-4, atol=1e-3)


def test_quantize_defaults_and_dtypes():
    w, wn = make((8, 128), "bfloat16", -1, 1)
    wq, s, b = mx.quantize(w)      # affine, group 64, 4 bits
    assert s.dtype == mx.bfloat16 and s.shape == (8, 2) and wq.shape == (8, 16)
    out = mx.dequantize(wq, s, b)
    assert out.dtype == mx.bfloat16
    assert mx.dequantize(wq, s, b, dtype=mx.float32).dtype == mx.float32
    with pytest.raises(ValueError):
        mx.quantize(mx.zeros((4, 48)), group_size=64)
    with pytest.raises(ValueError, match="bits"):
        mx.quantize(w, bits=0)


def test_gather_mm():
    from mlxcy import device
    if device.default_device().type == "gpu":
        # mlx.core.gather_mm fails alike there and leaves the CUDA context
        # broken for every later test (benchmarks/gpu_probe.py, mx_gather_mm)
        pytest.skip("MLX 0.32.4 CUDA gather_mm: 'misaligned address'")
    a, an = make((3, 2, 8), "float32")
    b, bn = make((4, 8, 5), "float32")
    li = np.array([0, 2, 1, 2], np.int32)
    ri = np.array([3, 0, 0, 1], np.int32)
    want = np.stack([an[i] @ bn[j] for i, j in zip(li, ri)])
    close(mx.gather_mm(a, b, li, ri), want, rtol=1e-4, atol=1e-5)
    close(mx.gather_mm(a, b, None, mx.array([1, 2, 3])),
          np.stack([an[i] @ bn[j] for i, j in zip(range(3), [1, 2, 3])]), rtol=1e-4, atol=1e-5)


def test_gather_qmm():
    k, n, e, gs, bits = 64, 16, 3, 32, 4
    w, wn = make((e, n, k), "float32", -1, 1)
    wq, s, bias = mx.quantize(w, group_size=gs, bits=bits)
    ref = dequant_ref(wq.numpy(), s.numpy(), bias.numpy(), gs, bits, k)
    x, xn = make((2, 1, k), "float32")
    li = np.array([1, 0, 1], np.int32)
    ri = np.array([2, 2, 0], np.int32)
    want = np.stack([xn[i] @ ref[j].T for i, j in zip(li, ri)])
    close(mx.gather_qmm(x, wq, s, bias, li, ri, group_size=gs, bits=bits), want,
          rtol=1e-4, atol=1e-3)


# -------------------------------------------------------- errors and API ----

def test_errors_carry_messages():
    a = mx.zeros((2, 3))
    with pytest.raises(ValueError, match="reshape"):
        mx.reshape(a, (4, 2))
    with pytest.raises(ValueError, match="[Ss]hapes"):
        mx.add(a, mx.zeros((4,)))
    with pytest.raises((ValueError, IndexError), match="axis"):
        mx.sum(a, axis=3)
    with pytest.raises(IndexError, match="out of bounds"):
        mx.take(a, 7, axis=1)
    with pytest.raises(ValueError):
        mx.concatenate([a, mx.zeros((2, 4))], axis=0)
    with pytest.raises(ValueError):
        mx.matmul(a, a)
    with pytest.raises((TypeError, ValueError)):
        mx.astype(a, "float128")
    with pytest.raises(TypeError, match="axis"):
        mx.sum(a, axis="x")
    with pytest.raises(TypeError, match="k"):
        mx.topk(a, 1.5)
    with pytest.raises(TypeError, match="arrays"):
        mx.concatenate(a)
    with pytest.raises(TypeError, match="mode"):
        mx.quantize(mx.zeros((2, 64)), mode=3)
    f = mx.zeros((2,))
    f.free()
    with pytest.raises(ValueError, match="freed"):
        mx.exp(f)
    with pytest.raises(ValueError, match="freed"):
        mx.add(1, f)


def test_converted_inputs_stay_alive():
    # a list argument becomes a temporary Array: its data must outlive the op
    for _ in range(3):
        close(mx.reshape([1, 2, 3, 4, 5, 6], (3, 2)), np.arange(1, 7).reshape(3, 2), "int32")
        close(mx.concatenate([[1.0, 2.0], np.array([3.0], np.float32)]), [1.0, 2.0, 3.0])
        close(mx.exp([0.0, 1.0]), np.exp([0.0, 1.0]))


def test_array_arguments_are_not_retained():
    import sys
    a = mx.ones((2, 3))
    b = mx.ones((3,))
    before = sys.getrefcount(a), sys.getrefcount(b)
    outs = [mx.add(a, b), mx.where(mx.greater(a, 0), a, b), mx.sum(a, axis=0),
            mx.exp(a), mx.matmul(a, mx.transpose(a))]
    assert (sys.getrefcount(a), sys.getrefcount(b)) == before
    assert all(type(o) is mx.Array and o is not a for o in outs)


def test_namespace_and_methods():
    from mlxcy import core
    missing = [n for n in core._METHODS if not hasattr(ops, n)]
    assert not missing, missing
    for name in ops.__all__:
        assert callable(getattr(mx, name)), name
    assert "where" in ops.__all__ and "quantize" in ops.__all__
