"""The KV caches (mlxcy.models.cache) against numpy references: what a layer
cache hands attention after each update (every held position, oldest first),
its offset, trimming, a sliding-window ring wrapping past its window, the
quantized cache's stored words decoded by numpy, the engine's row surgery
(take_cache_rows, merge_cache_rows), nbytes, the save/load round trip of
mlxcy.generation.cache_io, and the errors bad arguments raise."""
from types import SimpleNamespace

import numpy as np
import pytest

import mlxcy as mx
from mlxcy import tuning
from mlxcy.errors import SessionError
from mlxcy.generation.cache_io import load_cache, save_cache
from mlxcy.generation.engine import merge_cache_rows, take_cache_rows
from mlxcy.models.cache import (Cache, KVCache, QuantizedKVCache, RotatingKVCache,
                                kv_quantization, quantized_cache)

B, H, D = 2, 3, 8


def _kv(rng, L, b=B, h=H, d=D, dtype=np.float32):
    return (rng.standard_normal((b, h, L, d)).astype(dtype),
            rng.standard_normal((b, h, L, d)).astype(dtype))


def _fetch(c, k, v, ordered=True):
    ok, ov = c.update_and_fetch(mx.array(k), mx.array(v), ordered)
    return ok.numpy(), ov.numpy()


def _held(c):
    """The positions a layer holds, oldest first (numpy, from state())."""
    st = c.state()
    if st["keys"] is None:
        return None
    k, v = st["keys"].numpy(), st["values"].numpy()
    if c.window == 0:
        return k[:, :, :st["offset"]], v[:, :, :st["offset"]]
    n, i = st["filled"], st["idx"]
    if n < c.window:
        return k[:, :, :n], v[:, :, :n]
    return (np.roll(k[:, :, :c.window], -i, axis=2), np.roll(v[:, :, :c.window], -i, axis=2))


# ------------------------------------------------------------------ KVCache --

@pytest.mark.parametrize("step", [1, 4, 256])
@pytest.mark.parametrize("pad", [0, 8])
def test_kvcache_hands_attention_every_position(step, pad):
    rng = np.random.default_rng(step)
    hk = np.zeros((B, H, 0, D), np.float32)
    hv = hk.copy()
    with tuning.override(cache_pad=pad):
        c = KVCache(step=step)
        assert c.offset == 0 and c.nbytes() == 0 and c.state()["keys"] is None
        for L in (5, 1, 1, 7, 1, 3, 300):
            k, v = _kv(rng, L)
            hk, hv = np.concatenate([hk, k], 2), np.concatenate([hv, v], 2)
            ok, ov = _fetch(c, k, v)
            np.testing.assert_array_equal(ok, hk)
            np.testing.assert_array_equal(ov, hv)
            assert c.offset == hk.shape[2]
            cap = c.state()["keys"].shape[2]
            # the buffer: pad spare positions plus whole steps, never less than offset
            assert cap >= c.offset and (cap - pad) % step == 0
            assert c.nbytes() == 2 * B * H * cap * D * 4


def test_kvcache_trim_forgets_the_last_positions():
    rng = np.random.default_rng(1)
    c = KVCache(step=4)
    k, v = _kv(rng, 9)
    _fetch(c, k, v)
    assert c.trim(3) == 3 and c.offset == 6
    k2, v2 = _kv(rng, 2)
    ok, ov = _fetch(c, k2, v2)                 # the new positions overwrite the trimmed ones
    np.testing.assert_array_equal(ok, np.concatenate([k[:, :, :6], k2], 2))
    np.testing.assert_array_equal(ov, np.concatenate([v[:, :, :6], v2], 2))
    assert c.trim(100) == 8 and c.offset == 0   # at most what it holds
    c.free()
    assert c.offset == 0 and c.state()["keys"] is None and c.nbytes() == 0


# --------------------------------------------------------- RotatingKVCache --

@pytest.mark.parametrize("W,step", [(5, 2), (4, 256)])
def test_rotating_cache_keeps_the_window_through_the_ring_wrap(W, step):
    rng = np.random.default_rng(W)
    c = RotatingKVCache(W, step=step)
    hk = np.zeros((B, H, 0, D), np.float32)
    hv = hk.copy()
    # a prompt chunk, single steps past two wraps of the ring, a chunk, more steps
    for L in [3] + [1] * (2 * W + 3) + [4] + [1] * (W + 1):
        prev = hk.shape[2]
        k, v = _kv(rng, L)
        hk, hv = np.concatenate([hk, k], 2), np.concatenate([hv, v], 2)
        ok, ov = _fetch(c, k, v)
        T = hk.shape[2]
        # one position: the last W; a chunk: the held positions (up to W) and the chunk
        lo = T - W if L == 1 else prev - W
        np.testing.assert_array_equal(ok, hk[:, :, max(0, lo):])
        np.testing.assert_array_equal(ov, hv[:, :, max(0, lo):])
        assert c.offset == T
        st = c.state()
        assert st["filled"] == min(W, T)
        hold_k, hold_v = _held(c)
        np.testing.assert_array_equal(hold_k, hk[:, :, max(0, T - W):])
        np.testing.assert_array_equal(hold_v, hv[:, :, max(0, T - W):])


def test_rotating_cache_unordered_fetch_is_the_ring_as_stored():
    rng = np.random.default_rng(3)
    W = 4
    c = RotatingKVCache(W, step=2)
    hk = np.zeros((B, H, 0, D), np.float32)
    for _ in range(W + 2):           # full and wrapped: the oldest slot is not the first
        k, v = _kv(rng, 1)
        hk = np.concatenate([hk, k], 2)
        ok, _ = _fetch(c, k, v, ordered=False)
    idx = c.state()["idx"]
    assert idx == (W + 2) % W != 0
    np.testing.assert_array_equal(np.roll(ok, -idx, axis=2), hk[:, :, -W:])


def test_rotating_cache_trims_only_before_positions_leave_the_window():
    rng = np.random.default_rng(4)
    c = RotatingKVCache(6, step=2)
    k, v = _kv(rng, 4)
    _fetch(c, k, v)
    assert c.trim(1) == 1 and c.offset == 3 and c.state()["filled"] == 3
    k2, v2 = _kv(rng, 1)
    ok, _ = _fetch(c, k2, v2)
    np.testing.assert_array_equal(ok, np.concatenate([k[:, :, :3], k2], 2))
    k3, v3 = _kv(rng, 5)             # 9 positions through a window of 6
    _fetch(c, k3, v3)
    with pytest.raises(ValueError, match="cannot trim after positions left the window"):
        c.trim(1)
    assert c.trim(0) == 0
    cache = Cache([KVCache(), c])
    with pytest.raises(ValueError, match="sliding-window layer already dropped positions"):
        cache.trim(1)


# -------------------------------------------------------- QuantizedKVCache --

def _unpack(words, bits, d):
    """MLX's packed values: a little-endian bit stream, `bits` per element."""
    b = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    b = b.reshape(*words.shape[:-1], d, bits).astype(np.int64)
    return (b << np.arange(bits)).sum(-1)


def _decode(buf, bits, g, d):
    """numpy's reading of a QuantizedKVCache buffer: per position the packed
    values, then float32 scales and biases (bit-cast to uint32)."""
    nw, ng = d * bits // 32, d // g
    q = _unpack(buf[..., :nw], bits, d)
    scales = np.ascontiguousarray(buf[..., nw:nw + ng]).view(np.float32)
    biases = np.ascontiguousarray(buf[..., nw + ng:nw + 2 * ng]).view(np.float32)
    return q * np.repeat(scales, g, -1) + np.repeat(biases, g, -1)


@pytest.mark.parametrize("bits,g", [(8, 64), (4, 32), (3, 32), (6, 64), (2, 128)])
def test_quantized_cache_words_decode_to_what_attention_gets(bits, g):
    rng = np.random.default_rng(bits)
    d = 128
    c = QuantizedKVCache(bits, g, step=4)
    hk = np.zeros((1, 2, 0, d), np.float32)
    for L in (6, 1, 1, 5):
        k, v = _kv(rng, L, b=1, h=2, d=d)
        k *= 3.0
        hk = np.concatenate([hk, k], 2)
        ok, ov = _fetch(c, k, v)
        T = hk.shape[2]
        assert ok.shape == (1, 2, T, d) and ok.dtype == np.float32 and c.offset == T
        st = c.state()
        words = d * bits // 32 + 2 * (d // g)
        assert st["keys"].shape[3] == words and "uint32" in str(st["keys"].dtype)
        assert c.nbytes() == 2 * 2 * st["keys"].shape[2] * words * 4
        np.testing.assert_allclose(ok, _decode(st["keys"].numpy()[:, :, :T], bits, g, d),
                                   rtol=0, atol=1e-5)
        np.testing.assert_allclose(ov, _decode(st["values"].numpy()[:, :, :T], bits, g, d),
                                   rtol=0, atol=1e-5)
        # within one quantization step of the input (measured: at most 0.91 of a step)
        err = np.abs(ok - hk).reshape(1, 2, T, d // g, g).max(-1)
        span = hk.reshape(1, 2, T, d // g, g)
        step = (span.max(-1) - span.min(-1)) / (2 ** bits - 1)
        assert (err <= step * 1.0001 + 1e-6).all()
    kk, _ = c.dequantized()
    np.testing.assert_array_equal(kk.numpy(), ok)


def test_quantized_cache_helpers():
    cache = Cache([KVCache(step=4), RotatingKVCache(8)])
    q = quantized_cache(cache, 4, 32)
    assert kv_quantization(q) == (4, 32) and kv_quantization(cache) is None
    assert isinstance(q.layers[0], QuantizedKVCache) and q.layers[1] is cache.layers[1]
    assert quantized_cache(cache, None) is cache
    rng = np.random.default_rng(5)
    _fetch(q.layers[0], *_kv(rng, 2, d=64))
    with pytest.raises(ValueError, match="already holds positions"):
        quantized_cache(q, 8)


# ------------------------------------------------------ the engine's surgery --

def _filled(caches_rows, rng, L):
    """A Cache of [KVCache, RotatingKVCache(4)] holding L random positions of
    len(caches_rows) rows; returns (cache, per-layer numpy histories)."""
    cache = Cache([KVCache(step=4), RotatingKVCache(4, step=2)])
    hist = []
    for layer in cache.layers:
        k, v = _kv(rng, L, b=caches_rows)
        _fetch(layer, k, v)
        hist.append((k, v))
    return cache, hist


def test_take_cache_rows_keeps_rows_in_the_order_given():
    rng = np.random.default_rng(6)
    cache, hist = _filled(3, rng, 6)
    take_cache_rows(cache, [2, 0])
    for layer, (k, v), keep in zip(cache.layers, hist, (6, 4)):
        hk, hv = _held(layer)
        np.testing.assert_array_equal(hk, k[[2, 0], :, -keep:])
        np.testing.assert_array_equal(hv, v[[2, 0], :, -keep:])
    assert cache.offset == 6
    with pytest.raises(IndexError, match="out of range"):
        take_cache_rows(cache, [2])


def test_merge_cache_rows_left_pads_the_shorter_side():
    rng = np.random.default_rng(7)
    a, ha = _filled(2, rng, 6)            # rows at position 6
    b, hb = _filled(1, rng, 3)            # a row at position 3, padded by 3 to align
    merge_cache_rows(a, b, 0, 3)
    assert a.offset == 6 and b.offset == 0 and all(x.state()["keys"] is None for x in b.layers)
    for layer, (ka, va), (kb, vb), n in zip(a.layers, ha, hb, (6, 4)):
        hk, hv = _held(layer)
        zeros = np.zeros((1, H, n - 3, D), np.float32)
        np.testing.assert_array_equal(hk, np.concatenate(
            [ka[:, :, -n:], np.concatenate([zeros, kb], 2)], 0))
        np.testing.assert_array_equal(hv, np.concatenate(
            [va[:, :, -n:], np.concatenate([zeros, vb], 2)], 0))
    # the merged batch goes on: a next position is appended to every row
    k, v = _kv(rng, 1, b=3)
    ok, _ = _fetch(a.layers[1], k, v)
    np.testing.assert_array_equal(ok[:2], np.concatenate([ha[1][0][:, :, -3:], k[:2]], 2))
    np.testing.assert_array_equal(ok[2:], np.concatenate([hb[1][0], k[2:]], 2))


def test_merge_cache_rows_refuses_caches_that_do_not_fit():
    rng = np.random.default_rng(8)
    a, _ = _filled(1, rng, 5)
    b, _ = _filled(1, rng, 3)
    with pytest.raises(ValueError, match=r"a.offset \+ pad_a \(5 \+ 0\) must equal"):
        merge_cache_rows(a, b, 0, 1)
    with pytest.raises(ValueError, match="pads must be >= 0"):
        merge_cache_rows(a, b, -1, 1)
    with pytest.raises(ValueError, match="layers"):
        merge_cache_rows(a, Cache([KVCache()]), 0, 2)
    with pytest.raises(ValueError, match="holds no positions"):
        merge_cache_rows(a, Cache([KVCache(), RotatingKVCache(4)]), 0, 5)
    c = Cache([KVCache(), RotatingKVCache(4)])
    for layer in c.layers:
        _fetch(layer, *_kv(rng, 3, d=D * 2))
    with pytest.raises(ValueError, match="heads, head_dim or dtype differ"):
        merge_cache_rows(a, c, 0, 2)


# ------------------------------------------------------------------ nbytes --

def test_cache_nbytes_and_offset_sum_the_layers():
    rng = np.random.default_rng(9)
    cache, _ = _filled(2, rng, 5)
    assert cache.nbytes == sum(layer.nbytes() for layer in cache.layers) > 0
    assert cache.offset == 5 and len(cache) == 2 and cache[1].window == 4
    with cache:
        pass
    assert cache.nbytes == 0 and cache.offset == 0


# ------------------------------------------------------------ save and load --

class _Model:
    """What cache_io needs of a model: its config and make_cache()."""

    def __init__(self, windows, heads=2, head_dim=64, vocab=100):
        self.windows = windows
        self.config = SimpleNamespace(vocab_size=vocab, num_key_value_heads=heads,
                                      head_dim=head_dim)

    def make_cache(self):
        return Cache([RotatingKVCache(w, step=2) if w else KVCache(step=4) for w in self.windows])


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_save_and_load_round_trip(tmp_path, kv_bits):
    rng = np.random.default_rng(10)
    model = _Model([0, 4, 0])
    cache = quantized_cache(model.make_cache(), kv_bits, 32)
    for L in (5, 1, 1):                       # the window-4 ring wraps
        for layer in cache.layers:
            _fetch(layer, *_kv(rng, L, b=1, h=2, d=64))
    ids = [int(i) for i in rng.integers(0, 100, cache.offset)]
    path = tmp_path / "session.safetensors"
    save_cache(path, cache, ids)
    loaded, got_ids = load_cache(path, model)
    assert got_ids == ids and kv_quantization(loaded) == kv_quantization(cache)
    for a, b in zip(cache.layers, loaded.layers):
        sa, sb = a.state(), b.state()
        assert type(a) is type(b) and {k: sa[k] for k in ("offset", "filled", "idx")} == \
            {k: sb[k] for k in ("offset", "filled", "idx")}
        np.testing.assert_array_equal(sa["keys"].numpy(), sb["keys"].numpy())
        np.testing.assert_array_equal(sa["values"].numpy(), sb["values"].numpy())
        k, v = _kv(rng, 1, b=1, h=2, d=64)     # both go on alike
        np.testing.assert_array_equal(_fetch(a, k, v)[0], _fetch(b, k, v)[0])


def test_load_refuses_a_session_of_another_model(tmp_path):
    rng = np.random.default_rng(11)
    model = _Model([0, 4])
    cache = model.make_cache()
    for layer in cache.layers:
        _fetch(layer, *_kv(rng, 3, b=1, h=2, d=64))
    path = tmp_path / "s.safetensors"
    save_cache(path, cache, [1, 2, 3])
    with pytest.raises(SessionError, match=r"s\.safetensors: layer 1: window 4 differs from "
                                           r"the model's 8"):
        load_cache(path, _Model([0, 8]))
    with pytest.raises(SessionError, match="cache has 2 layers, the model 3"):
        load_cache(path, _Model([0, 4, 0]))
    with pytest.raises(SessionError, match=r"does not fit the model's \(kv heads, head_dim\)"):
        load_cache(path, _Model([0, 4], head_dim=32))
    with pytest.raises(SessionError, match=r"ids\[2\] = 3 is not a token id of this model"):
        load_cache(path, _Model([0, 4], vocab=3))


# ------------------------------------------------------------- bad arguments --

def test_bad_arguments_raise_clear_errors():
    rng = np.random.default_rng(12)
    with pytest.raises(ValueError, match="step must be positive"):
        KVCache(step=0)
    with pytest.raises(ValueError, match="window must be positive"):
        RotatingKVCache(0)
    with pytest.raises(ValueError, match="kv_bits must be one of 2, 3, 4, 5, 6, 8"):
        QuantizedKVCache(7)
    with pytest.raises(ValueError, match="kv_group_size must be one of 32, 64, 128"):
        QuantizedKVCache(4, 48)
    with pytest.raises(TypeError, match="every layer cache must be"):
        Cache([KVCache(), "not a cache"])
    c = KVCache()
    k, v = _kv(rng, 2)
    with pytest.raises(ValueError, match=r"\[B, heads, T, head_dim\]"):
        c.update_and_fetch(mx.array(k[0]), mx.array(v[0]))
    with pytest.raises(ValueError, match="differ in shape"):
        c.update_and_fetch(mx.array(k), mx.array(v[:, :, :1]))
    with pytest.raises(TypeError):
        c.update_and_fetch(k, v)                          # numpy, not mlxcy Arrays
    _fetch(c, k, v)
    k2, v2 = _kv(rng, 1, h=H + 1)
    with pytest.raises(ValueError, match=f"heads={H + 1}.*do not match the cached.*heads={H}"):
        _fetch(c, k2, v2)
    k3, v3 = _kv(rng, 1, dtype=np.float16)
    with pytest.raises(ValueError, match="dtype differs from the cached keys'"):
        _fetch(c, k3, v3)
    assert c.offset == 2                                   # refused updates change nothing
    with pytest.raises(ValueError, match="n must be >= 0"):
        c.trim(-1)
    with pytest.raises(ValueError, match="head dimension 40 must be a multiple of it"):
        _fetch(QuantizedKVCache(4, 32), *_kv(rng, 1, d=40))
    with pytest.raises(ValueError, match=r"set_state: keys and values must be \[B, heads, T"):
        KVCache().set_state(mx.array(k[0]), mx.array(v[0]), 2)
