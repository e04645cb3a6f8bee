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
