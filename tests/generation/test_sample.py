"""mlxcy.generation.sample against numpy reference implementations."""
import numpy as np
import pytest
from scipy import stats

import mlxcy
from mlxcy.generation.sample import Sampler, apply_min_p, apply_penalties, apply_top_k, apply_top_p

NEG = -np.inf


# ------------------------------------------------------- numpy references ----

def np_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=-1, keepdims=True)


def np_top_k(x, k):
    x = np.array(x, np.float64)
    if k <= 0 or k >= x.shape[-1]:
        return x
    kth = -np.sort(-x, axis=-1)[..., k - 1:k]
    return np.where(x < kth, NEG, x)


def np_top_p(x, p):
    """Smallest set of most likely tokens with cumulative probability >= p."""
    x = np.array(x, np.float64)
    out = np.full_like(x, NEG)
    for r in range(x.shape[0]):
        probs = np_softmax(x[r])
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        n = int(np.searchsorted(cum, p - 1e-12)) + 1   # first prefix reaching p
        keep = order[:min(n, len(order))]
        out[r, keep] = x[r, keep]
    return out


def np_min_p(x, min_p, keep=1):
    x = np.array(x, np.float64)
    probs = np_softmax(x)
    out = x.copy()
    for r in range(x.shape[0]):
        remove = probs[r] < min_p * probs[r].max()
        top = np.argsort(-x[r])[:keep]
        remove[top] = False
        out[r, remove] = NEG
    return out


def np_penalties(x, hist, rep=None, rep_ctx=20, pres=None, pres_ctx=20, freq=None,
                 freq_ctx=20, bias=None):
    x = np.array(x, np.float64)
    hist = np.asarray(hist)
    if hist.ndim == 1:
        hist = np.broadcast_to(hist, (x.shape[0], hist.shape[0]))
    V = x.shape[-1]
    for r in range(x.shape[0]):
        if bias:
            for t, b in bias.items():
                x[r, t] += b

        def window(c):
            return [int(t) for t in hist[r][-c:] if 0 <= t < V]
        if rep is not None:
            for t in set(window(rep_ctx)):
                x[r, t] = x[r, t] * rep if x[r, t] < 0 else x[r, t] / rep
        if pres is not None:
            for t in set(window(pres_ctx)):
                x[r, t] -= pres
        if freq is not None:
            for t in window(freq_ctx):
                x[r, t] -= freq
    return x


def kept(a):
    return np.isfinite(np.asarray(a))


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(1234)
    # distinct values (no ties at thresholds), a spread like a real model's
    return (rng.standard_normal((4, 300)) * 2.5).astype(np.float32)


# ----------------------------------------------------------------- filters ----

@pytest.mark.parametrize("k", [1, 2, 7, 50, 299])
def test_top_k_kept_set(logits, k):
    got = np.asarray(apply_top_k(mlxcy.array(logits), k))
    ref = np_top_k(logits, k)
    assert (kept(got) == kept(ref)).all()
    assert kept(got).sum(axis=-1).tolist() == [k] * 4
    np.testing.assert_array_equal(got[kept(got)], logits[kept(got)])


def test_top_k_off(logits):
    np.testing.assert_array_equal(np.asarray(apply_top_k(logits, 0)), logits)
    np.testing.assert_array_equal(np.asarray(apply_top_k(logits, 300)), logits)


def _p_away_from_boundaries(x, p):
    """p such that no prefix sum lies within 1e-4 of it (so float32 and float64
    agree on the set); returns the nudged p."""
    for _ in range(100):
        ok = True
        for r in range(x.shape[0]):
            cum = np.cumsum(np.sort(np_softmax(x[r]))[::-1])
            if np.min(np.abs(cum - p)) < 1e-4:
                ok = False
        if ok:
            return p
        p = p - 3e-4
    raise AssertionError("could not find a clean p")


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_kept_set(logits, p):
    p = _p_away_from_boundaries(logits, p)
    got = np.asarray(apply_top_p(mlxcy.array(logits), p))
    ref = np_top_p(logits, p)
    assert (kept(got) == kept(ref)).all(), (kept(got).sum(-1), kept(ref).sum(-1))
    np.testing.assert_array_equal(got[kept(got)], logits[kept(got)])


def test_top_p_invariant_to_shift_and_logprobs(logits):
    p = _p_away_from_boundaries(logits, 0.8)
    lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    a = kept(apply_top_p(logits, p))
    b = kept(apply_top_p(lp.astype(np.float32), p))
    c = kept(apply_top_p(logits + 80.0, p))   # large logits: no overflow
    assert (a == b).all() and (a == c).all()


def test_top_p_one_keeps_all(logits):
    np.testing.assert_array_equal(np.asarray(apply_top_p(logits, 1.0)), logits)


def test_top_p_matches_mlx_lm(logits):
    mx = pytest.importorskip("mlx.core")
    su = pytest.importorskip("mlx_lm.sample_utils")
    p = _p_away_from_boundaries(logits, 0.7)
    ref = np.array(su.apply_top_p(mx.array(logits), p))
    assert (kept(apply_top_p(logits, p)) == kept(ref)).all()


@pytest.mark.parametrize("min_p,keep", [(0.05, 1), (0.2, 1), (0.5, 1), (1.0, 1), (0.9, 5)])
def test_min_p_kept_set(logits, min_p, keep):
    got = np.asarray(apply_min_p(mlxcy.array(logits), min_p, keep))
    ref = np_min_p(logits, min_p, keep)
    assert (kept(got) == kept(ref)).all()
    assert (kept(got).sum(-1) >= keep).all()


def test_min_p_zero_is_off(logits):
    np.testing.assert_array_equal(np.asarray(apply_min_p(logits, 0.0)), logits)


def test_filter_combination(logits):
    """Sampler order: top-p, then min-p, then top-k."""
    p = _p_away_from_boundaries(logits, 0.95)
    got = apply_top_k(apply_min_p(apply_top_p(logits, p), 0.02), 20)
    ref = np_top_k(np_min_p(np_top_p(logits, p), 0.02), 20)
    assert (kept(got) == kept(ref)).all()
    # top-k binding on some rows, min-p on others
    n = kept(ref).sum(-1)
    assert n.min() >= 1 and n.max() <= 20


def test_filters_1d_and_dtypes(logits):
    row = logits[0]
    assert (kept(apply_top_k(row, 5)) == kept(np_top_k(row[None], 5)[0])).all()
    bf = mlxcy.array(logits).astype(mlxcy.bfloat16)
    got = apply_top_k(bf, 5)
    assert got.dtype == mlxcy.bfloat16
    assert (kept(got.astype(mlxcy.float32)).sum(-1) >= 5).all()


# --------------------------------------------------------------- penalties ----

@pytest.fixture(scope="module")
def history():
    rng = np.random.default_rng(7)
    return rng.integers(0, 300, size=40).astype(np.int32)


def test_repetition_penalty(logits, history):
    got = np.asarray(apply_penalties(logits, history, repetition_penalty=1.3,
                                     repetition_context_size=10))
    ref = np_penalties(logits, history, rep=1.3, rep_ctx=10)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, logits)
    # tokens only outside the window are untouched
    outside = set(history[:-10].tolist()) - set(history[-10:].tolist())
    for t in outside:
        assert got[0, t] == logits[0, t]


def test_presence_and_frequency_penalty(logits):
    hist = np.array([5, 5, 5, 9, 9, 17, 250], np.int32)
    got = np.asarray(apply_penalties(logits, hist, presence_penalty=0.7,
                                     frequency_penalty=0.25))
    ref = np_penalties(logits, hist, pres=0.7, freq=0.25)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[:, 5], logits[:, 5] - 0.7 - 3 * 0.25, rtol=1e-6)


def test_all_penalties_and_bias_different_windows(logits, history):
    kw = dict(rep=1.5, rep_ctx=30, pres=0.4, pres_ctx=5, freq=0.1, freq_ctx=12,
              bias={3: 2.0, 299: -1.5, 17: 0.25})
    ref = np_penalties(logits, history, **kw)
    got = np.asarray(apply_penalties(
        logits, history, repetition_penalty=1.5, repetition_context_size=30,
        presence_penalty=0.4, presence_context_size=5, frequency_penalty=0.1,
        frequency_context_size=12, logit_bias={3: 2.0, 299: -1.5, 17: 0.25}))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_batched_history_with_padding(logits):
    hist = np.array([[1, 2, 3, -1], [4, 4, -1, -1], [-1, -1, -1, -1], [299, 0, 0, 7]],
                    np.int32)
    got = np.asarray(apply_penalties(logits, hist, repetition_penalty=2.0,
                                     frequency_penalty=0.5))
    ref = np_penalties(logits, hist, rep=2.0, freq=0.5)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[2], logits[2])


def test_logit_bias(logits):
    got = np.asarray(apply_penalties(logits, logit_bias={0: 100.0, 5: -3.0}))
    ref = np_penalties(logits, [], bias={0: 100.0, 5: -3.0})
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    toks = Sampler(logit_bias={11: 1000.0})(logits)
    assert np.asarray(toks).tolist() == [11] * 4
    toks = Sampler(temperature=1.0, seed=3, logit_bias={42: 1000.0})(logits)
    assert np.asarray(toks).tolist() == [42] * 4


def test_empty_history_is_noop(logits):
    got = np.asarray(apply_penalties(logits, np.zeros(0, np.int32), repetition_penalty=2.0))
    np.testing.assert_array_equal(got, logits)


# ----------------------------------------------------------------- sampling ----

def test_greedy_is_argmax(logits, history):
    s = Sampler()
    toks = s(logits)
    assert toks.dtype == mlxcy.int32 and toks.shape == (4,)
    np.testing.assert_array_equal(np.asarray(toks), logits.argmax(-1))
    # greedy ignores filters, but not penalties
    s = Sampler(temperature=0.0, top_k=3, repetition_penalty=3.0, frequency_penalty=2.0)
    ref = np_penalties(logits, history, rep=3.0, freq=2.0).argmax(-1)
    np.testing.assert_array_equal(np.asarray(s(logits, history)), ref)
    # one row [V] gives a scalar
    t = Sampler()(logits[1])
    assert t.shape == () and int(t) == logits[1].argmax()


def _draw_counts(sampler, row, n):
    big = mlxcy.array(np.broadcast_to(row, (n, row.shape[0])).copy())
    toks = np.asarray(sampler(big))
    return np.bincount(toks, minlength=row.shape[0])


def _check_frequencies(counts, probs):
    """Chi-square goodness of fit over the kept set (fixed seed: deterministic)."""
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "drew a filtered-out token"
    support = probs > 0
    exp = probs[support] * n
    obs = counts[support]
    # pool categories with small expected counts
    small = exp < 5
    if small.any():
        exp = np.append(exp[~small], exp[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    if len(exp) > 1:
        stat = ((obs - exp) ** 2 / exp).sum()
        assert stat < stats.chi2.ppf(1 - 1e-4, len(exp) - 1), stat


@pytest.mark.parametrize("cfg", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=12),
    dict(temperature=1.3, top_p=0.6),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.8, top_p=0.9, min_p=0.05, top_k=8),
    # top-k path with top-p binding inside the k best (nucleus of 4 < 30):
    # mass must be measured against the whole row, not the k best
    dict(temperature=1.0, top_p=0.1, top_k=30),
    dict(temperature=0.9, top_p=0.3, top_k=12),   # nucleus of 18 > 12
    dict(temperature=1.0, top_p=0.3, min_p=0.2, top_k=100, min_tokens_to_keep=6),
])
def test_sampled_frequencies(logits, cfg):
    row = logits[0] / 2.5  # flatter: more tokens survive the filters
    x = row[None].astype(np.float64)
    if "top_p" in cfg:
        cfg = dict(cfg, top_p=_p_away_from_boundaries(x, cfg["top_p"]))
        x = np_top_p(x, cfg["top_p"])
    if "min_p" in cfg:
        x = np_min_p(x, cfg["min_p"], cfg.get("min_tokens_to_keep", 1))
    if "top_k" in cfg:
        x = np_top_k(x, cfg["top_k"])
    probs = np_softmax(x[0] / cfg["temperature"])
    counts = _draw_counts(Sampler(seed=2024, **cfg), row.astype(np.float32), 20000)
    _check_frequencies(counts, probs)


def test_same_seed_same_tokens(logits):
    big = mlxcy.array(np.tile(logits / 3, (16, 1)))
    a, b = Sampler(temperature=1.0, seed=11), Sampler(temperature=1.0, seed=11)
    seq_a = [np.asarray(a(big)) for _ in range(5)]
    seq_b = [np.asarray(b(big)) for _ in range(5)]
    for x, y in zip(seq_a, seq_b):
        np.testing.assert_array_equal(x, y)
    # successive steps use different keys
    assert not all((seq_a[0] == s).all() for s in seq_a[1:])
    c = Sampler(temperature=1.0, seed=12)
    assert not (np.asarray(c(big)) == seq_a[0]).all()
    a.reset()
    np.testing.assert_array_equal(np.asarray(a(big)), seq_a[0])


def test_batched_rows_are_independent_distributions(logits):
    # row r strongly prefers token r
    x = np.full((3, 50), -5.0, np.float32)
    for r in range(3):
        x[r, r] = 10.0
    toks = np.asarray(Sampler(temperature=1.0, seed=0)(x))
    assert toks.tolist() == [0, 1, 2]


def test_batched_history_changes_per_row_draw():
    x = np.zeros((2, 4), np.float32)
    x[:, 1] = 2.0
    x[:, 2] = 1.9
    hist = np.array([[1], [2]], np.int32)
    toks = np.asarray(Sampler(repetition_penalty=10.0)(x, hist))
    assert toks.tolist() == [2, 1]


# --------------------------------------------------------------- bad input ----

@pytest.mark.parametrize("kw,exc,word", [
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=-0.1), ValueError, "top_p"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(min_p=1.5), ValueError, "min_p"),
    (dict(min_tokens_to_keep=0), ValueError, "min_tokens_to_keep"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
    (dict(repetition_context_size=0), ValueError, "repetition_context_size"),
    (dict(logit_bias=[1, 2]), TypeError, "logit_bias"),
    (dict(logit_bias={-1: 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={1: "x"}), TypeError, "logit_bias"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed="a"), TypeError, "seed"),
])
def test_bad_sampler_args(kw, exc, word):
    with pytest.raises(exc, match=word):
        Sampler(**kw)


def test_bad_call_args(logits):
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler(logit_bias={300: 1.0})(logits)
    with pytest.raises(TypeError, match="logits"):
        Sampler()(np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match="logits"):
        Sampler()(mlxcy.array(1.0))
    with pytest.raises(ValueError, match="logits"):
        Sampler()(np.zeros((2, 0), np.float32))
    with pytest.raises(TypeError, match="history"):
        Sampler(repetition_penalty=1.2)(logits, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="history"):
        Sampler(repetition_penalty=1.2)(logits, np.zeros((3, 2), np.int32))
    with pytest.raises(TypeError, match="history"):
        Sampler(repetition_penalty=1.2)(logits, "abc")
    with pytest.raises(ValueError, match="p"):
        apply_top_p(logits, 0.0)
    with pytest.raises(ValueError, match="k"):
        apply_top_k(logits, -2)
    with pytest.raises(ValueError, match="min_p"):
        apply_min_p(logits, -0.1)
