"""The Array handle: construction, numpy export, operators, indexing, lifetime.
References are numpy throughout."""
import gc

import ml_dtypes
import numpy as np
import pytest

import mlxcy as mx

ALL_DTYPES = [
    (mx.bool_, np.bool_), (mx.uint8, np.uint8), (mx.uint16, np.uint16),
    (mx.uint32, np.uint32), (mx.uint64, np.uint64), (mx.int8, np.int8),
    (mx.int16, np.int16), (mx.int32, np.int32), (mx.int64, np.int64),
    (mx.float16, np.float16), (mx.float32, np.float32), (mx.float64, np.float64),
    (mx.bfloat16, ml_dtypes.bfloat16), (mx.complex64, np.complex64),
]


def sample(npdt, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10
    if npdt == np.complex64:
        return (x + 1j * rng.standard_normal(shape)).astype(np.complex64)
    if npdt == np.bool_:
        return x > 0
    if np.issubdtype(np.dtype(npdt), np.unsignedinteger):
        return np.abs(x).astype(npdt)
    return x.astype(npdt)


# ------------------------------------------------------------- construction --

@pytest.mark.parametrize("mdt,npdt", ALL_DTYPES, ids=[d[0].name for d in ALL_DTYPES])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)])
def test_numpy_roundtrip_every_dtype(mdt, npdt, shape):
    x = sample(npdt, shape)
    a = mx.array(x, dtype=mdt) if mdt == mx.float64 else mx.array(x)
    assert a.dtype == mdt
    assert a.shape == shape and a.ndim == len(shape) and a.size == x.size
    assert a.nbytes == x.nbytes and a.itemsize == x.itemsize
    out = a.numpy()
    assert out.dtype == np.dtype(npdt)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(np.asarray(a), x)


def test_python_scalars_and_lists_follow_mlx_rules():
    assert mx.array(1).dtype == mx.int32
    assert mx.array(2**40).dtype == mx.int64
    assert mx.array(1.5).dtype == mx.float32
    assert mx.array(True).dtype == mx.bool_
    assert mx.array([1, 2, 3]).dtype == mx.int32
    assert mx.array([1.0, 2]).dtype == mx.float32
    assert mx.array([[True, False]]).dtype == mx.bool_
    assert mx.array(np.zeros(3)).dtype == mx.float32       # float64 -> float32 by default
    assert mx.array(np.zeros(3), dtype=mx.float64).dtype == mx.float64
    assert mx.array([1, 2], dtype="float16").dtype == mx.float16
    assert mx.array([1, 2], dtype=np.int8).dtype == mx.int8
    assert mx.array(1 + 2j).dtype == mx.complex64
    np.testing.assert_array_equal(mx.array([[1, 2], [3, 4]]).numpy(), [[1, 2], [3, 4]])
    assert mx.array(3.25).item() == 3.25
    assert mx.array(7).item() == 7 and isinstance(mx.array(7).item(), int)


def test_bfloat16_from_float_and_uint16_view():
    x = np.array([1.0, -2.5, 3.140625], np.float32)
    a = mx.array(x, dtype=mx.bfloat16)
    np.testing.assert_array_equal(a.numpy().astype(np.float32), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    # The documented raw route: uint16 bits viewed as bfloat16.
    bits = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    b = mx.array(bits).view(mx.bfloat16)
    np.testing.assert_array_equal(b.numpy().view(np.uint16), bits)
    assert a.tolist() == [1.0, -2.5, 3.140625]


def test_array_from_arrays_and_bad_input():
    a = mx.array([1.0, 2.0])
    b = mx.array([a, a * 2])
    np.testing.assert_array_equal(b.numpy(), [[1, 2], [2, 4]])
    with pytest.raises(TypeError, match="cannot convert"):
        mx.array(object())
    with pytest.raises(TypeError):
        mx.array(np.array(["a", "b"]))
    with pytest.raises(TypeError, match="not a dtype"):
        mx.array([1], dtype=object())


# ------------------------------------------------------------ export views --

def test_export_of_non_contiguous_views_is_correct():
    x = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    a = mx.array(x)
    cases = {
        "transpose": (a.T, x.T),
        "swap": (mx.transpose(a, (1, 0, 2)), x.transpose(1, 0, 2)),
        "strided": (a[::2, 1::2, ::3], x[::2, 1::2, ::3]),
        "reversed": (a[:, ::-1], x[:, ::-1]),
        "broadcast": (mx.broadcast_to(mx.array(x[:, :1, :]), (3, 4, 5)), np.broadcast_to(x[:, :1, :], (3, 4, 5))),
        "row": (a[1], x[1]),
        "column": (a[:, :, 2], x[:, :, 2]),
    }
    for name, (view, ref) in cases.items():
        np.testing.assert_array_equal(view.numpy(), ref, err_msg=name)
        np.testing.assert_array_equal(np.asarray(view), ref, err_msg=name)
        np.testing.assert_array_equal(np.array(memoryview(view)), ref, err_msg=name)
        assert view.tolist() == ref.tolist(), name


def test_buffer_protocol_keeps_array_alive_and_blocks_free():
    a = mx.array(np.arange(6, dtype=np.int32).reshape(2, 3))
    m = memoryview(a)
    assert m.format == "i" and m.shape == (2, 3) and m.readonly
    with pytest.raises(BufferError):
        a.free()
    assert m.tolist() == [[0, 1, 2], [3, 4, 5]]
    m.release()
    a.free()
    assert a.freed


# --------------------------------------------------------------- metadata --

def test_len_iter_repr_item_bool():
    x = np.arange(6, dtype=np.int32).reshape(3, 2)
    a = mx.array(x)
    assert len(a) == 3
    assert [r.tolist() for r in a] == x.tolist()
    assert "array(" in repr(a) and "int32" in repr(a)
    assert bool(mx.array(1)) and not bool(mx.array(0.0))
    with pytest.raises(ValueError, match="ambiguous"):
        bool(a)
    with pytest.raises(TypeError):
        len(mx.array(1))
    with pytest.raises(ValueError, match="size 1"):
        a.item()
    assert int(mx.array(5)) == 5 and float(mx.array(2.5)) == 2.5
    assert [10, 20, 30][mx.array(1)] == 20


# -------------------------------------------------------------- operators --

BIN = [
    ("+", np.add), ("-", np.subtract), ("*", np.multiply), ("/", np.true_divide),
    ("//", np.floor_divide), ("%", np.mod), ("**", np.power),
]


@pytest.mark.parametrize("op,ref", BIN, ids=[b[0] for b in BIN])
def test_arithmetic_with_broadcasting_scalars_and_reflection(op, ref):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.5, 3, (3, 4)).astype(np.float32)
    y = rng.uniform(0.5, 3, (4,)).astype(np.float32)
    a, b = mx.array(x), mx.array(y)
    f = eval(f"lambda p, q: p {op} q")
    np.testing.assert_allclose(f(a, b).numpy(), ref(x, y), rtol=1e-5)
    np.testing.assert_allclose(f(a, 2).numpy(), ref(x, np.float32(2)), rtol=1e-5)
    np.testing.assert_allclose(f(2.0, a).numpy(), ref(np.float32(2), x), rtol=1e-5)
    np.testing.assert_allclose(f(x, b).numpy(), ref(x, y), rtol=1e-5)  # numpy operand
    assert f(a, 2).dtype == mx.float32


def test_integer_arithmetic_matches_numpy():
    x = np.array([[7, -7, 5], [-5, 9, 1]], np.int32)
    y = np.array([2, 3, -4], np.int32)
    a, b = mx.array(x), mx.array(y)
    np.testing.assert_array_equal((a // b).numpy(), x // y)
    np.testing.assert_array_equal((a % b).numpy(), x % y)
    np.testing.assert_array_equal((a + 1).numpy(), x + 1)
    assert (a + 1).dtype == mx.int32
    assert (a + 1.5).dtype == mx.float32
    np.testing.assert_array_equal((a & b).numpy(), x & y)
    np.testing.assert_array_equal((a | b).numpy(), x | y)
    np.testing.assert_array_equal((a ^ b).numpy(), x ^ y)
    np.testing.assert_array_equal((~a).numpy(), ~x)
    np.testing.assert_array_equal((a << 2).numpy(), x << 2)
    np.testing.assert_array_equal((a >> 1).numpy(), x >> 1)
    np.testing.assert_array_equal((-a).numpy(), -x)
    np.testing.assert_array_equal(abs(a).numpy(), np.abs(x))


def test_weak_scalar_promotion_keeps_half_types():
    a = mx.array(np.ones(3, np.float16))
    assert (a + 1).dtype == mx.float16 and (a * 1.5).dtype == mx.float16
    b = mx.array(np.ones(3), dtype=mx.bfloat16)
    assert (2 * b).dtype == mx.bfloat16


def test_comparisons_logic_and_matmul():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, (3, 4)).astype(np.float32)
    y = rng.integers(0, 4, (3, 4)).astype(np.float32)
    a, b = mx.array(x), mx.array(y)
    for op in ("<", "<=", "==", "!=", ">", ">="):
        f = eval(f"lambda p, q: p {op} q")
        r = f(a, b)
        assert r.dtype == mx.bool_
        np.testing.assert_array_equal(r.numpy(), f(x, y))
        np.testing.assert_array_equal(f(a, 2).numpy(), f(x, 2))
    m, n = a < b, a > 1
    np.testing.assert_array_equal((m & n).numpy(), (x < y) & (x > 1))
    np.testing.assert_array_equal((m | n).numpy(), (x < y) | (x > 1))
    np.testing.assert_array_equal((~m).numpy(), ~(x < y))
    np.testing.assert_allclose((a @ b.T).numpy(), x @ y.T, rtol=1e-5)
    np.testing.assert_allclose((x @ b.T).numpy(), x @ y.T, rtol=1e-5)
    c = mx.array(x)
    c += 1
    np.testing.assert_array_equal(c.numpy(), x + 1)


def test_operator_errors_carry_mlx_message():
    with pytest.raises(ValueError, match=r"[Ss]hape"):
        mx.array(np.ones((2, 3))) + mx.array(np.ones((4,)))
    with pytest.raises(ValueError):
        mx.array(np.ones((2, 3))) @ mx.array(np.ones((2, 3)))


# --------------------------------------------------------------- indexing --

X = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
INDEXES = [
    1, -1, (1, 2), (0, -1, 2, 3), slice(None), slice(1, None), slice(None, None, -1),
    (slice(None), slice(0, 3, 2)), (Ellipsis, 1), (1, Ellipsis, slice(1, 4, 2)),
    (None, 0), (slice(None), None, 1), (Ellipsis, None), (slice(-3, None), slice(None, None, -2)),
    (0, slice(10, 20)), (slice(None), slice(None), slice(3, 0, -1)),
    np.array([1, 0]), (slice(None), np.array([2, 0, 2])), (0, np.array([[1], [2]]), 1),
    (np.array([0, 1]), np.array([2, 0])), (slice(None), np.array([0, 2]), np.array([1, 3])),
    (np.array([0, 1]), slice(None), np.array([1, 3])), [1, 0],
]


@pytest.mark.parametrize("key", INDEXES, ids=[repr(k) for k in INDEXES])
def test_getitem_matches_numpy(key):
    a = mx.array(X)
    k = tuple(mx.array(i) if isinstance(i, np.ndarray) else i for i in key) if isinstance(key, tuple) else (
        mx.array(key) if isinstance(key, np.ndarray) else key)
    ref = X[key]
    out = a[k]
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.numpy(), ref)


def test_getitem_errors():
    a = mx.array(X)
    with pytest.raises(IndexError, match="out of bounds"):
        a[2]
    with pytest.raises(IndexError, match="too many indices"):
        a[0, 0, 0, 0, 0]
    with pytest.raises(IndexError, match="single ellipsis"):
        a[..., 0, ...]
    with pytest.raises(IndexError, match="boolean mask"):
        a[mx.array(X > 3)]
    with pytest.raises(IndexError, match="unsupported index"):
        a["x"]


SET_CASES = [
    (1, 7.0), ((0, 1), np.arange(20, dtype=np.float32).reshape(4, 5)), ((slice(None), 0, slice(1, 4)), -1.0),
    ((Ellipsis, slice(0, 5, 2)), np.array([1, 2, 3], np.float32)), ((1, slice(None), 2, 3), np.array([9, 8, 7], np.float32)),
    (np.array([1, 0]), 5.0),
    (slice(1, 4, 2**40), 3.0),      # a step past int32 (it took MLX's CPU kernel down: SIGFPE)
]


@pytest.mark.parametrize("key,value", SET_CASES, ids=[repr(k) for k, _ in SET_CASES])
def test_setitem_matches_numpy(key, value):
    ref = X.copy()
    ref[key] = value
    a = mx.array(X)
    a[mx.array(key) if isinstance(key, np.ndarray) else key] = mx.array(value) if isinstance(value, np.ndarray) else value
    np.testing.assert_array_equal(a.numpy(), ref)


def test_boolean_mask_assignment():
    ref = X.copy()
    ref[ref > 50] = 0
    a = mx.array(X)
    a[a > 50] = 0
    np.testing.assert_array_equal(a.numpy(), ref)


# --------------------------------------------------------------- lifetime --

def test_free_and_context_manager():
    a = mx.array(np.ones((4, 4), np.float32))
    b = a + 1                      # b's graph keeps its own reference to a's data
    a.free()
    assert a.freed
    a.free()                       # idempotent
    for use in (lambda: a + 1, lambda: a.shape, lambda: a.numpy(), lambda: a[0],
                lambda: mx.add(a, 1), lambda: 1 + a, lambda: b + a, lambda: len(a)):
        with pytest.raises(ValueError, match="freed"):
            use()
    assert "freed" in repr(a)
    np.testing.assert_array_equal(b.numpy(), np.full((4, 4), 2, np.float32))
    with mx.array([1, 2, 3]) as c:
        assert c.sum().item() == 6
    assert c.freed
    with pytest.raises(ValueError, match="freed"):
        with c:
            pass


def test_dealloc_frees_handles():
    for _ in range(1000):
        mx.array(np.ones(16, np.float32)) + 1
    gc.collect()
