"""The fast paths for basic indexing (ints and positive-step slices, see
core.pyx `_getitem_basic`) and for tuple shapes (ops.pyx `_shape`) give the
same results and errors as the general code they short-cut."""
import itertools

import numpy as np
import pytest

import mlxcy as mx

X = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)


def _parts(dim):
    ints = [0, 1, dim - 1, -1, -dim]
    slices = [slice(None), slice(1, None), slice(None, 3), slice(2, 10, 2), slice(-4, -1),
              slice(None, None, 3), slice(3, 3), slice(5, 1), slice(-100, 100, 4),
              slice(0, dim, dim + 7), slice(np.int64(1), None, np.int32(2))]
    return ints + slices


KEYS = []
for i, j in itertools.product(_parts(4), _parts(5)):
    KEYS += [(i, j), (i,), i, (i, j, slice(1, 5, 2))]


@pytest.mark.parametrize("key", KEYS, ids=[repr(k) for k in KEYS])
def test_basic_index_matches_numpy_and_general_path(key):
    a = mx.array(X)
    out = a[key]
    ref = X[key]
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.numpy(), ref)
    # A trailing Ellipsis sends the same index through the general path.
    general = a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
    assert general.shape == out.shape
    np.testing.assert_array_equal(general.numpy(), out.numpy())


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and message are compared
        return type(e), str(e)
    return None


@pytest.mark.parametrize("key", [
    4, -5, (0, 5), (0, -6), (0, 0, 6), (0, 0, 0, 0), 2**70, (0, 2**70),
    slice(None, None, 0), (0, slice(0, 1, 0)), slice("a"), (slice(1.5),),
    True, (0, "x"), slice(None, None, 10**30), (0, slice(2, None, -10**30)),
])
def test_basic_index_errors_match_general_path(key):
    a = mx.array(X)
    fast = _error(lambda: a[key])
    general = _error(lambda: a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)])
    assert fast == general
    assert fast is not None


def test_basic_index_negative_and_huge_steps_take_general_path():
    a = mx.array(X)
    for key in [(slice(None, None, -1),), (0, slice(4, 0, -2)), (slice(None), slice(None, None, -3))]:
        np.testing.assert_array_equal(a[key].numpy(), X[key])
    out = a[:, 1:3, ::2**40]
    assert out.shape == X[:, 1:3, ::2**40].shape


def test_basic_index_on_0d_and_1d():
    s = mx.array(np.float32(3.0))
    assert s[()].shape == ()
    assert float(s[()]) == 3.0
    v = mx.array(np.arange(7, dtype=np.int32))
    np.testing.assert_array_equal(v[1:6:2].numpy(), np.arange(7)[1:6:2])
    assert int(v[-2]) == 5
    assert v[3].shape == ()


@pytest.mark.parametrize("shape", [
    (120,), (4, 30), (-1, 6), (2, -1, 3), [6, 20], (np.int64(6), 20), 120,
    (2, np.int16(60)), (),
])
def test_reshape_shapes(shape):
    a = mx.array(np.arange(120, dtype=np.float32)) if shape != () else mx.array(np.float32(1))
    ref = np.reshape(np.asarray(a.numpy()), shape if not isinstance(shape, list) else tuple(shape))
    out = mx.reshape(a, shape)
    assert out.shape == ref.shape
    np.testing.assert_array_equal(out.numpy(), ref)


@pytest.mark.parametrize("shape, exc, match", [
    ((2**31, 1), ValueError, "shape: dimensions of .* must fit in int32"),
    ((2.0, 60), TypeError, "shape: expected an int or a sequence of ints"),
    ((2, "60"), TypeError, "shape: expected an int or a sequence of ints"),
    ((7, 7), ValueError, None),
])
def test_reshape_shape_errors(shape, exc, match):
    a = mx.array(np.arange(120, dtype=np.float32))
    with pytest.raises(exc, match=match):
        mx.reshape(a, shape)
    # The list form takes the general loop: same error type.
    with pytest.raises(exc, match=match):
        mx.reshape(a, list(shape))
