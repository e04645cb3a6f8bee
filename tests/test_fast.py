"""mlxcy.fast against plain numpy compositions (float64 references)."""
import numpy as np
import pytest

import mlxcy
from mlxcy import fast

RNG = np.random.default_rng(1234)
TIGHT = dict(rtol=1e-5, atol=1e-5)
LOOSE = {"bfloat16": dict(rtol=3e-2, atol=3e-2), "float16": dict(rtol=5e-3, atol=5e-3)}


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def as_np(a):
    return np.asarray(a.numpy()).astype(np.float64)


def lowp(x, dtype):
    """x in a low-precision dtype, plus the float64 values it actually holds."""
    a = mlxcy.array(x, dtype=dtype)
    return a, as_np(a)


# ------------------------------------------------------------- norms --------

def ref_rms_norm(x, w, eps):
    x = x.astype(np.float64)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * w


def ref_layer_norm(x, w, b, eps):
    x = x.astype(np.float64)
    mu = x.mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * w
    return y if b is None else y + b


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_float32(with_weight):
    x, w = randn(3, 5, 64), randn(64) if with_weight else None
    out = fast.rms_norm(mlxcy.array(x), None if w is None else mlxcy.array(w), 1e-5)
    np.testing.assert_allclose(as_np(out), ref_rms_norm(x, w, 1e-5), **TIGHT)


@pytest.mark.parametrize("with_weight,with_bias", [(True, True), (True, False),
                                                   (False, True), (False, False)])
def test_layer_norm_float32(with_weight, with_bias):
    x = randn(4, 48) * 3 + 1
    w = randn(48) if with_weight else None
    b = randn(48) if with_bias else None
    out = fast.layer_norm(mlxcy.array(x), w, b, 1e-4)   # numpy inputs are converted
    np.testing.assert_allclose(as_np(out), ref_layer_norm(x, w, b, 1e-4), **TIGHT)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_norms_low_precision(dtype):
    (x, xv), (w, wv), (b, bv) = lowp(randn(2, 3, 32), dtype), lowp(randn(32), dtype), \
        lowp(randn(32), dtype)
    out = fast.rms_norm(x, w, 1e-5)
    assert out.dtype == mlxcy.dtype(dtype)
    np.testing.assert_allclose(as_np(out), ref_rms_norm(xv, wv, 1e-5), **LOOSE[dtype])
    out = fast.layer_norm(x, w, b, 1e-5)
    np.testing.assert_allclose(as_np(out), ref_layer_norm(xv, wv, bv, 1e-5), **LOOSE[dtype])


def test_norm_errors():
    x = mlxcy.array(randn(2, 8))
    with pytest.raises(ValueError, match="weight"):
        fast.rms_norm(x, mlxcy.array(randn(5)), 1e-5)
    freed = mlxcy.array(randn(8))
    freed.free()
    with pytest.raises(ValueError, match="freed"):
        fast.layer_norm(x, freed, None, 1e-5)


# ------------------------------------------------------------- rope ---------

def ref_rope(x, dims, traditional, base, scale, offset, freqs=None):
    x = x.astype(np.float64)
    L, half = x.shape[-2], dims // 2
    inv = 1.0 / freqs.astype(np.float64) if freqs is not None \
        else base ** (-2.0 * np.arange(half) / dims)
    if np.ndim(offset) == 0:
        pos = offset + np.arange(L, dtype=np.float64)                    # (L,)
    else:  # one offset per leading (batch) index
        off = np.asarray(offset, np.float64).reshape((-1,) + (1,) * (x.ndim - 2))
        pos = off + np.arange(L, dtype=np.float64)                         # (B,1..,L)
    theta = pos[..., None] * scale * inv
    cos, sin = np.cos(theta), np.sin(theta)
    out = x.copy()
    if traditional:
        x1, x2 = x[..., 0:dims:2], x[..., 1:dims:2]
        out[..., 0:dims:2] = x1 * cos - x2 * sin
        out[..., 1:dims:2] = x1 * sin + x2 * cos
    else:
        x1, x2 = x[..., :half], x[..., half:dims]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:dims] = x1 * sin + x2 * cos
    return out


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dims", [32, 16])      # 16 < head_dim: partial rotation
@pytest.mark.parametrize("offset", [0, 7])
def test_rope_base(traditional, dims, offset):
    x = randn(2, 3, 5, 32)
    out = fast.rope(mlxcy.array(x), dims, traditional=traditional, base=10000.0,
                    scale=0.5, offset=offset)
    ref = ref_rope(x, dims, traditional, 10000.0, 0.5, offset)
    np.testing.assert_allclose(as_np(out), ref, **TIGHT)
    if dims < 32:   # the features past `dims` pass through untouched
        np.testing.assert_array_equal(out.numpy()[..., dims:], x[..., dims:])


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_custom_freqs(traditional):
    x, freqs = randn(1, 2, 6, 16), np.exp(RNG.uniform(0, 6, 8)).astype(np.float32)
    out = fast.rope(mlxcy.array(x), 16, traditional=traditional, base=None, scale=1.0,
                    offset=3, freqs=mlxcy.array(freqs))
    ref = ref_rope(x, 16, traditional, None, 1.0, 3, freqs)
    np.testing.assert_allclose(as_np(out), ref, **TIGHT)


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_array_offsets(traditional):
    x, offs = randn(3, 2, 4, 16), np.array([0, 5, 11], np.int32)
    out = fast.rope(mlxcy.array(x), 16, traditional=traditional, base=500.0, scale=1.0,
                    offset=mlxcy.array(offs))
    np.testing.assert_allclose(as_np(out), ref_rope(x, 16, traditional, 500.0, 1.0, offs),
                               **TIGHT)
    # A scalar array offset acts like the int.
    out = fast.rope(mlxcy.array(x), 16, traditional=traditional, base=500.0, scale=1.0,
                    offset=mlxcy.array(4))
    np.testing.assert_allclose(as_np(out), ref_rope(x, 16, traditional, 500.0, 1.0, 4),
                               **TIGHT)


@pytest.mark.parametrize("offset", ["int", "rows", "scalar array"])
def test_rope_one_position_many_rows(offset):
    # A decode step of 200 rows with a head dimension of 16: on a CUDA GPU
    # MLX 0.32.4's rope cannot launch this shape, and mlxcy splits the rows.
    x, offs = randn(200, 4, 1, 16), RNG.integers(0, 64, 200).astype(np.int32)
    o = {"int": 9, "rows": mlxcy.array(offs), "scalar array": mlxcy.array(9)}[offset]
    out = fast.rope(mlxcy.array(x), 16, traditional=False, base=10000.0, scale=1.0, offset=o)
    ref = ref_rope(x, 16, False, 10000.0, 1.0, offs if offset == "rows" else 9)
    np.testing.assert_allclose(as_np(out), ref, **TIGHT)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rope_low_precision(dtype):
    x, xv = lowp(randn(1, 2, 8, 32), dtype)
    out = fast.rope(x, 32, traditional=False, base=10000.0, scale=1.0, offset=2)
    assert out.dtype == mlxcy.dtype(dtype)
    np.testing.assert_allclose(as_np(out), ref_rope(xv, 32, False, 10000.0, 1.0, 2),
                               **LOOSE[dtype])


def test_rope_errors():
    x = mlxcy.array(randn(1, 1, 4, 8))
    kw = dict(traditional=False, scale=1.0, offset=0)
    with pytest.raises(ValueError, match="base and freqs"):
        fast.rope(x, 8, base=None, **kw)
    with pytest.raises(ValueError, match="base and freqs"):
        fast.rope(x, 8, base=10.0, freqs=mlxcy.array(np.ones(4, np.float32)), **kw)
    with pytest.raises(ValueError, match="base"):
        fast.rope(x, 8, base=-1.0, **kw)
    with pytest.raises(ValueError, match="offset"):   # MLX: wrong number of offsets
        fast.rope(x, 8, base=10.0, traditional=False, scale=1.0,
                  offset=mlxcy.array(np.zeros(3, np.int32)))
    with pytest.raises(TypeError, match="offset"):
        fast.rope(x, 8, base=10.0, traditional=False, scale=1.0, offset=None)


# ------------------------------------------------------------- attention ----

def ref_sdpa(q, k, v, scale, mask=None, sinks=None):
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # head h -> kv h // rep
    s = q @ k.swapaxes(-1, -2) * scale
    Lq, Lk = s.shape[-2:]
    if isinstance(mask, str):  # causal, queries aligned to the last key positions
        keep = np.arange(Lk)[None, :] <= np.arange(Lq)[:, None] + (Lk - Lq)
        s = np.where(keep, s, -np.inf)
    elif mask is not None and mask.dtype == np.bool_:
        s = np.where(mask, s, -np.inf)
    elif mask is not None:
        s = s + mask.astype(np.float64)
    if sinks is not None:   # an extra logit column per head, with no value
        sk = np.broadcast_to(sinks.astype(np.float64)[None, :, None, None],
                             s.shape[:-1] + (1,))
        s = np.concatenate([sk, s], axis=-1)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if sinks is not None:
        p = p[..., 1:]
    return p @ v


def qkv(B, Hq, Hkv, Lq, Lk, D, Dv=None):
    return randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, Dv or D)


def run_sdpa(q, k, v, scale, mask=None, **kw):
    m = mask if mask is None or isinstance(mask, str) else mlxcy.array(mask)
    return as_np(fast.scaled_dot_product_attention(
        mlxcy.array(q), mlxcy.array(k), mlxcy.array(v), scale=scale, mask=m, **kw))


@pytest.mark.parametrize("ratio", [1, 2, 4])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_sdpa_gqa(ratio, mask):
    q, k, v = qkv(2, 4, 4 // ratio, 6, 6, 16)
    out = run_sdpa(q, k, v, 0.25, mask)
    np.testing.assert_allclose(out, ref_sdpa(q, k, v, 0.25, mask), **TIGHT)


@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("ratio", [1, 4])
def test_sdpa_causal_decode(Lq, ratio):
    # Fewer queries than keys: the queries are the last positions (KV-cache decode).
    q, k, v = qkv(1, 4, 4 // ratio, Lq, 9, 32)
    out = run_sdpa(q, k, v, 32 ** -0.5, "causal")
    ref = ref_sdpa(q, k, v, 32 ** -0.5, "causal")
    np.testing.assert_allclose(out, ref, **TIGHT)
    # With Lq=3 the first query ignores the last two keys, so the mask matters;
    # a single query sees every key, so causal equals no mask.
    assert np.allclose(ref, ref_sdpa(q, k, v, 32 ** -0.5)) == (Lq == 1)


@pytest.mark.parametrize("ratio", [1, 2])
def test_sdpa_additive_mask(ratio):
    q, k, v = qkv(2, 4, 4 // ratio, 5, 7, 8, Dv=12)
    mask = (RNG.standard_normal((2, 1, 5, 7)) * 2).astype(np.float32)  # broadcast heads
    out = run_sdpa(q, k, v, 0.3, mask)
    np.testing.assert_allclose(out, ref_sdpa(q, k, v, 0.3, mask), **TIGHT)


@pytest.mark.parametrize("ratio", [1, 4])
def test_sdpa_bool_mask(ratio):
    q, k, v = qkv(1, 4, 4 // ratio, 4, 6, 8)
    mask = RNG.random((4, 6)) < 0.6
    mask[:, 0] = True   # every query keeps at least one key
    out = run_sdpa(q, k, v, 0.5, mask)
    np.testing.assert_allclose(out, ref_sdpa(q, k, v, 0.5, mask), **TIGHT)


def test_sdpa_sinks():
    q, k, v = qkv(1, 4, 2, 3, 5, 8)
    sinks = randn(4)
    out = run_sdpa(q, k, v, 0.4, "causal", sinks=mlxcy.array(sinks))
    np.testing.assert_allclose(out, ref_sdpa(q, k, v, 0.4, "causal", sinks=sinks), **TIGHT)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mask", [None, "causal", "additive"])
def test_sdpa_low_precision(dtype, mask):
    (q, qv), (k, kv), (v, vv) = (lowp(t, dtype) for t in qkv(1, 4, 2, 4, 6, 16))
    m = mv = mask
    if mask == "additive":   # MLX wants the mask in the output's type
        m, mv = lowp(randn(4, 6), dtype)
    out = fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
    assert out.dtype == mlxcy.dtype(dtype)
    np.testing.assert_allclose(as_np(out), ref_sdpa(qv, kv, vv, 0.25, mv), **LOOSE[dtype])


def test_sdpa_errors():
    q, k, v = (mlxcy.array(t) for t in qkv(1, 4, 3, 2, 2, 8))
    with pytest.raises(ValueError, match="multiple"):      # 4 heads over 3 kv heads
        fast.scaled_dot_product_attention(q, k, v, scale=1.0)
    q, k, v = (mlxcy.array(t) for t in qkv(1, 2, 2, 2, 2, 8))
    with pytest.raises(ValueError, match="mask"):
        fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask="causl")
    with pytest.raises(ValueError):                        # mask does not broadcast
        fast.scaled_dot_product_attention(q, k, v, scale=1.0,
                                          mask=mlxcy.array(np.zeros((3, 3), np.float32)))
    with pytest.raises(TypeError):
        fast.scaled_dot_product_attention(q, k, v)       # scale is required


def test_unconvertible_arguments_are_named():
    x = mlxcy.array(randn(2, 8))
    with pytest.raises(TypeError, match="weight"):
        fast.rms_norm(x, "abc", 1e-5)
    with pytest.raises(TypeError, match="mask"):
        fast.scaled_dot_product_attention(*(mlxcy.array(t) for t in qkv(1, 2, 2, 2, 2, 8)),
                                          scale=1.0, mask=object())
