"""mlxcy.random: reproducibility from keys and seeds, and statistics of the
samplers against their distributions' known moments (fixed keys, generous
tolerances of several standard errors)."""
import math

import numpy as np
import pytest

import mlxcy
from mlxcy import random as mr

N = 100_000


def np_(a):
    return np.asarray(a.numpy())


def chi2(counts, probs):
    """Pearson's statistic, and a generous bound: mean + 6 std of chi2(k-1)."""
    counts = np.asarray(counts, np.float64)
    expected = counts.sum() * np.asarray(probs, np.float64)
    df = len(counts) - 1
    return ((counts - expected) ** 2 / expected).sum(), df + 6 * math.sqrt(2 * df)


# ------------------------------------------------------------ keys ----------

def test_key_is_deterministic_uint32_pair():
    k = mr.key(42)
    assert k.dtype == mlxcy.uint32 and k.shape == (2,)
    np.testing.assert_array_equal(np_(k), np_(mr.key(42)))
    assert not np.array_equal(np_(k), np_(mr.key(43)))


def test_key_matches_mlx_core():
    # Secondary reference: MLX's own Python bindings derive the same key bits.
    mx = pytest.importorskip("mlx.core")
    for s in (0, 7, 2**40 + 3):
        np.testing.assert_array_equal(np_(mr.key(s)), np.array(mx.random.key(s)))
    k = mx.random.key(5)
    np.testing.assert_array_equal(np_(mr.uniform(shape=(8,), key=mr.key(5))),
                                  np.array(mx.random.uniform(shape=(8,), key=k)))


def test_split_gives_distinct_reproducible_keys():
    k = mr.key(0)
    two = np_(mr.split(k))
    assert two.shape == (2, 2) and two.dtype == np.uint32
    five = np_(mr.split(k, num=5))
    assert five.shape == (5, 2)
    rows = {tuple(r) for r in five} | {tuple(np_(k))}
    assert len(rows) == 6                      # all children differ from each other and k
    np.testing.assert_array_equal(five, np_(mr.split(k, 5)))
    # Children give independent streams.
    a, b = (mr.uniform(shape=(16,), key=mlxcy.array(r)) for r in five[:2])
    assert not np.array_equal(np_(a), np_(b))


SAMPLERS = {
    "uniform": lambda key: mr.uniform(-2, 3, (64,), key=key),
    "normal": lambda key: mr.normal((64,), loc=1.0, scale=2.0, key=key),
    "randint": lambda key: mr.randint(0, 1000, (64,), key=key),
    "bernoulli": lambda key: mr.bernoulli(0.5, (64,), key=key),
    "categorical": lambda key: mr.categorical(mlxcy.array(np.zeros((64, 50), np.float32)),
                                              key=key),
    "gumbel": lambda key: mr.gumbel((64,), key=key),
    "truncated_normal": lambda key: mr.truncated_normal(-1.0, 1.0, (64,), key=key),
    "laplace": lambda key: mr.laplace((64,), key=key),
    "permutation": lambda key: mr.permutation(64, key=key),
    "bits": lambda key: mr.bits((64,), key=key),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_key_same_values(name):
    draw = SAMPLERS[name]
    a, b, c = np_(draw(mr.key(3))), np_(draw(mr.key(3))), np_(draw(mr.key(4)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seed_reproducibility(name):
    draw = SAMPLERS[name]
    mr.seed(11)
    first, second = np_(draw(None)), np_(draw(None))
    assert not np.array_equal(first, second)   # the global sequence advances
    mr.seed(11)
    np.testing.assert_array_equal(np_(draw(None)), first)
    np.testing.assert_array_equal(np_(draw(None)), second)


# ------------------------------------------------------------ statistics ----

def test_uniform_moments_and_range():
    x = np_(mr.uniform(low=-1.0, high=3.0, shape=(N,), key=mr.key(1)))
    assert x.dtype == np.float32 and x.min() >= -1.0 and x.max() < 3.0
    x = x.astype(np.float64)
    assert abs(x.mean() - 1.0) < 5 * 4 / math.sqrt(12 * N)
    assert abs(x.std() - 4 / math.sqrt(12)) < 0.01
    counts, _ = np.histogram(x, bins=20, range=(-1, 3))
    stat, bound = chi2(counts, np.full(20, 1 / 20))
    assert stat < bound


def test_uniform_broadcast_bounds_and_dtypes():
    lo = np.array([0, 10, 100], np.float32)
    x = np_(mr.uniform(lo, lo + 1, (N // 10, 3), key=mr.key(2)))
    assert x.shape == (N // 10, 3)
    assert np.all(x >= lo) and np.all(x < lo + 1)
    np.testing.assert_allclose(x.mean(axis=0), lo + 0.5, atol=0.02)
    for dt in ("float16", "bfloat16"):
        y = mr.uniform(shape=(1000,), dtype=dt, key=mr.key(3))
        assert y.dtype == mlxcy.dtype(dt)
        y = np_(y).astype(np.float32)
        assert y.min() >= 0 and y.max() <= 1 and abs(y.mean() - 0.5) < 0.05


def test_normal_moments():
    x = np_(mr.normal((N,), key=mr.key(5))).astype(np.float64)
    assert abs(x.mean()) < 5 / math.sqrt(N)
    assert abs(x.std() - 1) < 0.01
    assert abs(np.mean(np.abs(x) < 1) - 0.6827) < 0.006          # one-sigma mass
    y = np_(mr.normal((N,), loc=3.0, scale=0.5, key=mr.key(5))).astype(np.float64)
    np.testing.assert_allclose(y, 3.0 + 0.5 * x, rtol=1e-5, atol=1e-5)   # same draws
    loc = np.array([-5, 0, 5], np.float32)
    z = np_(mr.normal((N // 10, 3), loc=mlxcy.array(loc), scale=2.0, key=mr.key(6)))
    np.testing.assert_allclose(z.mean(axis=0), loc, atol=0.1)
    np.testing.assert_allclose(z.std(axis=0), 2.0, atol=0.06)
    assert mr.normal((4,), dtype="bfloat16").dtype == mlxcy.bfloat16


def test_randint_range_and_uniformity():
    x = np_(mr.randint(-3, 7, (N,), key=mr.key(7)))
    assert x.dtype == np.int32 and x.min() == -3 and x.max() == 6
    stat, bound = chi2(np.bincount(x + 3, minlength=10), np.full(10, 0.1))
    assert stat < bound
    assert np_(mr.randint(0, 5, (10,), dtype="int16", key=mr.key(0))).dtype == np.int16


def test_bernoulli_frequency():
    x = np_(mr.bernoulli(0.3, (N,), key=mr.key(8)))
    assert x.dtype == np.bool_
    assert abs(x.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / N)
    p = np.array([0.05, 0.5, 0.9], np.float32)
    y = np_(mr.bernoulli(mlxcy.array(p), (N // 10, 3), key=mr.key(9)))
    np.testing.assert_allclose(y.mean(axis=0), p, atol=0.02)
    assert mr.bernoulli(mlxcy.array(p)).shape == (3,)     # shape defaults to p's


def softmax(z, axis=-1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_categorical_frequencies_match_softmax():
    logits = np.array([[0.0, 1.0, -1.0, 2.0, 0.5, -3.0],
                       [3.0, 0.0, 0.0, 0.0, 1.0, 1.0]], np.float32)
    draws = np_(mr.categorical(mlxcy.array(logits), num_samples=N // 2, key=mr.key(10)))
    assert draws.shape == (2, N // 2)
    for row, lg in zip(draws, logits):
        stat, bound = chi2(np.bincount(row, minlength=6), softmax(lg))
        assert stat < bound


def test_categorical_axis_and_shape_forms():
    logits = np.log(np.array([[0.7, 0.1], [0.2, 0.1], [0.1, 0.8]], np.float32))
    # axis=0: one distribution per column, drawn over the 3 rows.
    draws = np_(mr.categorical(mlxcy.array(logits), axis=0, shape=(N // 4, 2),
                               key=mr.key(11)))
    assert draws.shape == (N // 4, 2)
    for col in range(2):
        stat, bound = chi2(np.bincount(draws[:, col], minlength=3),
                           softmax(logits[:, col]))
        assert stat < bound
    assert mr.categorical(mlxcy.array(logits)).shape == (3,)


def truncnorm_mean(a, b):
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))
    return (pdf(a) - pdf(b)) / (cdf(b) - cdf(a))


def test_truncated_normal_bounds_and_mean():
    x = np_(mr.truncated_normal(-1.0, 2.0, (N,), key=mr.key(12))).astype(np.float64)
    assert x.min() >= -1.0 and x.max() <= 2.0
    assert abs(x.mean() - truncnorm_mean(-1.0, 2.0)) < 0.01
    lo = np.array([-0.5, 1.0], np.float32)
    hi = np.array([0.5, 3.0], np.float32)
    y = np_(mr.truncated_normal(mlxcy.array(lo), mlxcy.array(hi), key=mr.key(13)))
    assert y.shape == (2,)                                   # shape from the bounds
    z = np_(mr.truncated_normal(lo, hi, (N // 10, 2), key=mr.key(14)))
    assert np.all(z >= lo) and np.all(z <= hi)
    np.testing.assert_allclose(z.mean(axis=0), [truncnorm_mean(-0.5, 0.5),
                                                truncnorm_mean(1.0, 3.0)], atol=0.02)


def test_gumbel_moments():
    x = np_(mr.gumbel((N,), key=mr.key(15))).astype(np.float64)
    assert abs(x.mean() - 0.5772156649) < 0.02
    assert abs(x.var() - math.pi ** 2 / 6) < 0.05


def test_laplace_moments():
    x = np_(mr.laplace((N,), loc=1.0, scale=2.0, key=mr.key(16))).astype(np.float64)
    assert abs(np.median(x) - 1.0) < 0.05
    assert abs(x.var() - 8.0) < 0.3


def test_permutation():
    p = np_(mr.permutation(50, key=mr.key(17)))
    np.testing.assert_array_equal(np.sort(p), np.arange(50))
    assert not np.array_equal(p, np.arange(50))
    rows = np.arange(12, dtype=np.int32).reshape(6, 2)
    q = np_(mr.permutation(mlxcy.array(rows), key=mr.key(17)))
    np.testing.assert_array_equal(q[np.argsort(q[:, 0])], rows)   # rows kept intact


def test_bits_widths():
    for width, dt in ((1, np.uint8), (2, np.uint16), (4, np.uint32)):
        b = np_(mr.bits((N // 10,), width=width, key=mr.key(18)))
        assert b.dtype == dt
        # Each bit is set half the time.
        ones = np.unpackbits(b.view(np.uint8)).mean()
        assert abs(ones - 0.5) < 0.01


# ------------------------------------------------------------ errors --------

def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="seed"):
        mr.key(-1)
    with pytest.raises(TypeError, match="seed"):
        mr.seed("x")
    with pytest.raises(ValueError, match="shape"):
        mr.uniform(shape=(3, -1))
    with pytest.raises(TypeError, match="shape"):
        mr.normal(shape=(2.5,))
    with pytest.raises(ValueError, match="num"):
        mr.split(mr.key(0), -1)
    with pytest.raises(ValueError, match="shape and num_samples"):
        mr.categorical(mlxcy.array(np.zeros(3, np.float32)), shape=(2,), num_samples=2)
    with pytest.raises(ValueError, match="width"):
        mr.bits((2,), width=3)
    # MLX's own checks surface with its messages.
    with pytest.raises(ValueError, match="key"):
        mr.uniform(shape=(2,), key=mlxcy.array(np.zeros(2, np.int32)))
    with pytest.raises(ValueError, match="floating"):
        mr.uniform(shape=(2,), dtype="int32")
    with pytest.raises(ValueError, match="integer"):
        mr.randint(0, 3, (2,), dtype="float32")
    with pytest.raises(TypeError, match="logits"):
        mr.categorical("abc")
    with pytest.raises(TypeError, match="loc"):
        mr.normal((2,), loc=object())
    freed = mr.key(0)
    freed.free()
    with pytest.raises(ValueError, match="freed"):
        mr.normal((2,), key=freed)
