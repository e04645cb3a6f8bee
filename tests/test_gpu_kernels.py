"""mlxcy's own CUDA decode kernels (include/mlxcy/gpu_gemv.h, mlxcy.fast.gemv):
each against the unfused MLX path on odd shapes, and whole models with the
kernels on and off.  They run only where the default device is a CUDA GPU
(tools/gpu_tests.sh on the GPU machine); elsewhere this file checks that the
kernels say so instead of running."""
import numpy as np
import pytest

import mlxcy as mx
from mlxcy import fast, ops
from mlxcy.models import build_model
from mlxcy import tuning
from mlxcy.models.base import gpu_block_steps

_REASON = fast.gemv_unsupported_reason(mx.zeros((1, 64), dtype=mx.bfloat16),
                                       mx.zeros((8, 64), dtype=mx.bfloat16))
cuda = pytest.mark.skipif(_REASON is not None, reason=f"no CUDA GPU: {_REASON}")


def test_off_gpu_says_why():
    if _REASON is None:
        pytest.skip("a CUDA GPU is the default device")
    assert "CUDA" in _REASON
    with pytest.raises(ValueError, match="gemv: .*CUDA"):
        fast.gemv(mx.zeros((1, 64)), mx.zeros((8, 64)))


def _layer(rng, n, k, dtype, bits, gs):
    w = mx.array((rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)).astype(dtype)
    if not bits:
        return dict(w=w)
    q, s, b = ops.quantize(w, group_size=gs, bits=bits)
    return dict(w=q, scales=s, biases=b, bits=bits, group_size=gs)


def _reference(x, lay, bias=None, norm_weight=None, eps=1e-5, residual=None, act=None):
    """The unfused MLX path of the decoder: rms_norm, (quantized) matmul, bias
    add, activation, residual add -- each op in x's dtype."""
    h = fast.rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    if lay.get("bits"):
        y = ops.quantized_matmul(h, lay["w"], lay["scales"], lay["biases"], transpose=True,
                                 group_size=lay["group_size"], bits=lay["bits"])
    else:
        y = ops.matmul(h, ops.transpose(lay["w"]))
    if bias is not None:
        y = y + bias
    if act is not None:
        g, u = ops.split(y, 2, axis=-1)
        if act == "silu":
            y = g * ops.sigmoid(g) * u
        else:
            c = 0.7978845608028654
            y = 0.5 * g * (1 + ops.tanh(c * (g + 0.044715 * g * g * g))) * u
    if residual is not None:
        y = residual + y
    return y


def _f32(a):
    return np.asarray(a.astype(mx.float32), dtype=np.float64)


def _check(got, want, dtype):
    got, want = _f32(got), _f32(want)
    assert got.shape == want.shape
    # bf16: the fused kernel skips some intermediate roundings of the MLX path
    # (one bf16 ulp is 2^-8 relative); float32: summation order only
    tol = {mx.bfloat16: 2e-2, mx.float16: 4e-3, mx.float32: 2e-5}[dtype]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= tol * scale, (np.abs(got - want).max(), scale)


WEIGHTS = [(mx.bfloat16, 0, 0), (mx.float16, 0, 0), (mx.float32, 0, 0),
           (mx.bfloat16, 4, 64), (mx.bfloat16, 4, 32), (mx.bfloat16, 4, 128),
           (mx.bfloat16, 8, 64), (mx.float16, 4, 64)]


@cuda
@pytest.mark.parametrize("dtype,bits,gs", WEIGHTS)
@pytest.mark.parametrize("rows", [1, 3, 13])
@pytest.mark.parametrize("n,k", [(37, 128), (1000, 640), (577, 2304)])
def test_plain_product(dtype, bits, gs, rows, n, k):
    rng = np.random.default_rng(rows * 1000 + n + k)
    lay = _layer(rng, n, k, dtype, bits, gs)
    x = mx.array(rng.standard_normal((rows, 1, k)).astype(np.float32)).astype(dtype)
    kw = {a: lay[a] for a in ("scales", "biases", "bits", "group_size") if a in lay}
    got = fast.gemv(x, lay["w"], **kw)
    assert got.shape == (rows, 1, n) and got.dtype == dtype
    _check(got, _reference(x, lay), dtype)


@cuda
@pytest.mark.parametrize("dtype,bits,gs", WEIGHTS)
@pytest.mark.parametrize("rows", [1, 16])
def test_fused_prologue_and_epilogues(dtype, bits, gs, rows):
    rng = np.random.default_rng(rows + bits + gs)
    k, n = 640, 2 * 321
    lay = _layer(rng, n, k, dtype, bits, gs)
    kw = {a: lay[a] for a in ("scales", "biases", "bits", "group_size") if a in lay}
    x = mx.array((3 * rng.standard_normal((rows, k))).astype(np.float32)).astype(dtype)
    nw = mx.array(rng.uniform(0.5, 1.5, k).astype(np.float32)).astype(dtype)
    bias = mx.array(rng.standard_normal(n).astype(np.float32)).astype(dtype)
    res = mx.array(rng.standard_normal((rows, n)).astype(np.float32)).astype(dtype)
    res_half = mx.array(rng.standard_normal((rows, n // 2)).astype(np.float32)).astype(dtype)
    cases = [dict(norm_weight=nw, eps=1e-6), dict(bias=bias), dict(residual=res),
             dict(norm_weight=nw, bias=bias),
             dict(norm_weight=nw, act="silu"), dict(norm_weight=nw, act="gelu_tanh"),
             dict(act="silu", residual=res_half), dict(norm_weight=nw, bias=bias, act="silu")]
    for c in cases:
        got = fast.gemv(x, lay["w"], **kw, **c)
        _check(got, _reference(x, lay, **c), dtype)


@cuda
def test_bad_arguments_name_the_reason():
    x = mx.zeros((1, 64), dtype=mx.bfloat16)
    with pytest.raises(ValueError, match="w does not match"):
        fast.gemv(x, mx.zeros((8, 96), dtype=mx.bfloat16))
    with pytest.raises(ValueError, match="w must have x's dtype"):
        fast.gemv(x, mx.zeros((8, 64), dtype=mx.float16))
    with pytest.raises(ValueError, match="more rows"):
        fast.gemv(mx.zeros((17, 64), dtype=mx.bfloat16), mx.zeros((8, 64), dtype=mx.bfloat16))
    with pytest.raises(ValueError, match="act must be"):
        fast.gemv(x, mx.zeros((8, 64), dtype=mx.bfloat16), act="relu")
    with pytest.raises(ValueError, match="scales and biases"):
        fast.gemv(x, mx.zeros((8, 8), dtype=mx.uint32), bits=4)
    old = fast.set_gemv_max_rows(32)
    try:
        assert fast.gemv_unsupported_reason(mx.zeros((17, 64), dtype=mx.bfloat16),
                                            mx.zeros((8, 64), dtype=mx.bfloat16)) is None
    finally:
        fast.set_gemv_max_rows(old)


# ------------------------------------------------------------ whole models ---

CFG = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=704,
           num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
           max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
           tie_word_embeddings=False)
QWEN3 = dict(CFG, model_type="qwen3", tie_word_embeddings=True)
QWEN2 = dict(CFG, model_type="qwen2", tie_word_embeddings=True)   # q/k/v biases


def _weights(cfg, seed=0):
    from mlxcy.models.load import expected_shapes
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, _) in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            a = rng.uniform(0.5, 1.5, shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = mx.array(a.astype(np.float32))
    return out


def _decode(model, ids, steps, greedy=True):
    """Prefill ids, then `steps` single-position steps; returns (logits of each
    step [B, steps, V] as float64, the ids fed)."""
    cache = model.make_cache()
    logits = model(ids, cache)
    outs, fed = [], []
    nxt = np.asarray(ops.argmax(logits[:, -1, :], axis=-1)).reshape(-1, 1)
    for _ in range(steps):
        fed.append(nxt)
        logits = model(nxt.astype(np.int32), cache)
        outs.append(_f32(logits[:, -1, :]))
        nxt = np.asarray(ops.argmax(logits[:, -1, :], axis=-1)).reshape(-1, 1)
    return np.stack(outs, 1), np.concatenate(fed, 1)


def _both(cfg, dtype, quantization=None, batch=2, steps=12):
    from mlxcy.ops import quantize
    w = _weights(cfg)
    if dtype is not None:
        w = {k: v.astype(dtype) for k, v in w.items()}
    if quantization:
        qw = {}
        for k, v in w.items():
            if k.endswith("proj.weight") or k.endswith("embed_tokens.weight"):
                q, s, b = quantize(v, group_size=quantization["group_size"],
                                   bits=quantization["bits"])
                base = k[:-len(".weight")]
                qw[k], qw[base + ".scales"], qw[base + ".biases"] = q, s, b
            else:
                qw[k] = v
        w = qw
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], (batch, 9)).astype(np.int32)
    with build_model(cfg, w, quantization) as model:
        model.fuse()
        n0 = gpu_block_steps()
        with tuning.override(gpu_kernels=False):
            ref, ref_ids = _decode(model, ids, steps)
        assert gpu_block_steps() == n0
        with tuning.override(gpu_kernels=True):
            got, got_ids = _decode(model, ids, steps)
        # every decode step of every block went through the fused kernels
        assert gpu_block_steps() - n0 == steps * cfg["num_hidden_layers"]
    return ref, ref_ids, got, got_ids


@cuda
@pytest.mark.parametrize("cfg", [CFG, QWEN3, QWEN2], ids=["llama", "qwen3", "qwen2"])
def test_model_float32_greedy_ids_equal(cfg):
    ref, ref_ids, got, got_ids = _both(cfg, None, steps=24)
    np.testing.assert_array_equal(got_ids, ref_ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@cuda
@pytest.mark.parametrize("cfg", [CFG, QWEN3], ids=["llama", "qwen3"])
@pytest.mark.parametrize("quant", [None, {"group_size": 64, "bits": 4},
                                   {"group_size": 32, "bits": 8}], ids=["bf16", "q4", "q8"])
def test_model_bfloat16_logits_close(cfg, quant):
    ref, ref_ids, got, got_ids = _both(cfg, mx.bfloat16, quant, steps=6)
    # the same fed ids keep the comparison step by step: greedy picks can flip
    # on near-ties in bf16, after which the two runs see different tokens
    n = next((i for i in range(ref_ids.shape[1]) if (ref_ids[:, i] != got_ids[:, i]).any()),
             ref_ids.shape[1])
    assert n >= 1
    d = np.abs(got[:, :n] - ref[:, :n]).max()
    assert d <= 3e-2 * np.abs(ref[:, :n]).max(), d
