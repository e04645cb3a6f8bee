"""mlxcy.cpu_kernels (include/mlxcy/cpu_quant.h) against independent references:
numpy for the products (the packed weights unpacked by numpy, float64 math),
MLX's own ops for gradients and for the whole model (the path the kernels
replace)."""
import numpy as np
import pytest

import mlxcy
from mlxcy import cpu_kernels as ck
from mlxcy import nn

RNG = np.random.default_rng(1234)
ISAS = ["scalar"] + (["avx2"] if ck.has_avx2() else [])


@pytest.fixture(params=ISAS)
def isa(request):
    ck.set_isa(request.param)
    yield request.param
    ck.set_isa("avx2")


def unpack_np(wq, scales, biases, gs, bits):
    """numpy's own unpacking of MLX's affine layout -> float64 [N, K]."""
    w = np.asarray(wq).astype(np.uint64)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint64) * bits)
    q = ((w[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1)
    s = np.asarray(scales.astype(mlxcy.float32)).astype(np.float64)
    b = np.asarray(biases.astype(mlxcy.float32)).astype(np.float64)
    return q * np.repeat(s, gs, axis=1) + np.repeat(b, gs, axis=1)


def f64(a):
    return np.asarray(a.astype(mlxcy.float32)).astype(np.float64)


def close(y, r, tol):
    err = np.abs(y - r).max() / max(np.abs(r).max(), 1e-30)
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 3, 4, 17, 40])
def test_quantized_matches_numpy(isa, bits, gs, M):
    N, K = 67, gs * 5          # N odd: not a multiple of the 2- or 6-row blocks
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    x = mlxcy.array(RNG.standard_normal((M, K)).astype(np.float32))
    y = ck.linear(x, wq, s, b, gs, bits)
    assert y.shape == [M, N] or tuple(y.shape) == (M, N)
    assert y.dtype == mlxcy.float32
    close(f64(y), f64(x) @ unpack_np(wq, s, b, gs, bits).T, 2e-6)


@pytest.mark.parametrize("sdtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("M", [1, 9])
def test_quantized_half_scales_and_bias(isa, sdtype, M):
    gs, bits, N, K = 64, 4, 31, 192
    dt = getattr(mlxcy, sdtype)
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W.astype(dt), gs, bits)
    assert s.dtype == dt
    bias = mlxcy.array(RNG.standard_normal(N).astype(np.float32))
    x = mlxcy.array(RNG.standard_normal((2, M, K)).astype(np.float32)).astype(dt)
    y = ck.linear(x, wq, s, b, gs, bits, bias=bias)
    assert tuple(y.shape) == (2, M, N)
    assert y.dtype == mlxcy.float32        # promoted with the float32 bias
    ref = f64(x) @ unpack_np(wq, s, b, gs, bits).T + f64(bias)
    close(f64(y), ref, 2e-6)
    y2 = ck.linear(x, wq, s, b, gs, bits)  # no bias: output in the half dtype
    assert y2.dtype == dt
    close(f64(y2), f64(x) @ unpack_np(wq, s, b, gs, bits).T, 1e-2 if sdtype == "bfloat16" else 2e-3)


@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("M", [1, 2, 6, 23])
@pytest.mark.parametrize("K", [1, 15, 100])
def test_float_weights_match_numpy(isa, wdtype, M, K):
    N = 13
    dt = getattr(mlxcy, wdtype)
    w = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32)).astype(dt)
    bias = mlxcy.array(RNG.standard_normal(N).astype(np.float32)).astype(dt)
    x = mlxcy.array(RNG.standard_normal((M, K)).astype(np.float32))
    y = ck.linear(x, w, bias=bias)
    assert y.dtype == mlxcy.float32
    close(f64(y), f64(x) @ f64(w).T + f64(bias), 2e-6)


def test_strided_operands(isa):
    """A transposed x and a row slice of the weight (views, not copies)."""
    gs, bits, N, K = 32, 4, 40, 96
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    xt = mlxcy.array(RNG.standard_normal((K, 5)).astype(np.float32)).T      # strided
    y = ck.linear(xt, wq[8:29], s[8:29], b[8:29], gs, bits)
    ref = f64(xt) @ unpack_np(wq, s, b, gs, bits)[8:29].T
    close(f64(y), ref, 2e-6)
    wf = mlxcy.array(RNG.standard_normal((K, N)).astype(np.float32)).T      # strided weight
    close(f64(ck.linear(xt, wf)), f64(xt) @ f64(wf).T, 2e-6)


def test_threads_give_identical_results():
    gs, bits, N, K = 32, 4, 1000, 576
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    old = ck.num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            ck.set_num_threads(t)
            for M in (1, 30):
                x = mlxcy.array(np.linspace(-1, 1, M * K, dtype=np.float32).reshape(M, K))
                outs.append((t, M, np.asarray(ck.linear(x, wq, s, b, gs, bits))))
    finally:
        ck.set_num_threads(old)
    for t, M, y in outs:
        same = [y2 for t2, M2, y2 in outs if M2 == M]
        for y2 in same:
            np.testing.assert_array_equal(y, y2)


def test_grad_through_quantized_layer_matches_mlx_ops():
    """The vjp (x's gradient through the dequantized weight) against the
    gradient of MLX's own dequantize + matmul."""
    from mlxcy.transforms import grad
    gs, bits, N, K = 64, 4, 48, 128
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    bias = mlxcy.array(RNG.standard_normal(N).astype(np.float32))
    c = mlxcy.array(RNG.standard_normal((3, N)).astype(np.float32))
    x = mlxcy.array(RNG.standard_normal((3, K)).astype(np.float32))
    wd = nn.dequantize(wq, s, b, gs, bits)

    def ours(x, bias):
        return (ck.linear(x, wq, s, b, gs, bits, bias=bias) * c).sum()

    def theirs(x, bias):
        return ((x @ wd.T + bias) * c).sum()

    g1 = grad(ours, argnums=(0, 1))(x, bias)
    g2 = grad(theirs, argnums=(0, 1))(x, bias)
    for a, r in zip(g1, g2):
        close(f64(a), f64(r), 1e-5)


def test_errors():
    gs, bits = 32, 4
    W = mlxcy.array(RNG.standard_normal((8, 64)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    x = mlxcy.array(np.ones((1, 63), np.float32))
    with pytest.raises(ValueError, match="unsupported layer"):
        ck.linear(x, wq, s, b, gs, bits)
    with pytest.raises(ValueError, match="biases"):
        ck.linear(mlxcy.array(np.ones((1, 64), np.float32)), wq, s, None, gs, bits)
    with pytest.raises(ValueError, match="n must be"):
        ck.set_num_threads(0)
    with pytest.raises(ValueError, match="set_isa"):
        ck.set_isa("sse9")


def test_layers_use_kernels_only_when_enabled():
    """nn.Linear gives the same product through the kernels and through MLX's
    ops (set_enabled(False)), and switching is local to the CPU setting."""
    gs, bits, N, K = 32, 4, 50, 96
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    layer = nn.Linear(wq, scales=s, biases=b, group_size=gs, bits=bits)
    x = mlxcy.array(RNG.standard_normal((1, 2, K)).astype(np.float32))
    old = ck.set_enabled(False)
    try:
        ref = f64(layer(x))
        ck.set_enabled(True)
        y = f64(layer(x))
    finally:
        ck.set_enabled(old)
    close(y, ref, 1e-5)


@pytest.fixture(scope="module")
def smollm2():
    from mlxcy import assets
    from mlxcy.generation.inference import MlxTextModel
    try:
        path = assets.smollm2_gguf()
    except assets.AssetMissing as e:
        pytest.skip(f"asset not installed: {e}")
    tm = MlxTextModel(str(path))
    yield tm
    tm.close()


def test_smollm2_logits_and_greedy_ids_match_mlx_path(smollm2):
    ids = smollm2.tokenizer.encode("The capital of France is", add_special_tokens=True)
    model = smollm2.model
    old = ck.set_enabled(False)
    try:
        ref = f64(model(ids))
        ref_ids = [t.id for t in smollm2.stream_ids(ids, max_tokens=12)]
        ck.set_enabled(True)
        out = f64(model(ids))
        out_ids = [t.id for t in smollm2.stream_ids(ids, max_tokens=12)]
    finally:
        ck.set_enabled(old)
    close(out, ref, 1e-4)
    assert out_ids == ref_ids


def attention_np(q, k, v, scale):
    q, k, v = f64(q), f64(k), f64(v)
    B, H, L, D = q.shape
    rep = H // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,H,Hkv,T,D", [(1, 9, 3, 1, 64), (2, 4, 4, 37, 64), (1, 6, 2, 130, 12)])
def test_decode_attention_matches_numpy(isa, dtype, B, H, Hkv, T, D):
    dt = getattr(mlxcy, dtype)
    q = mlxcy.array(RNG.standard_normal((B, H, 1, D)).astype(np.float32)).astype(dt)
    # the cache's view: the first T positions of a longer buffer (strided)
    kb = mlxcy.array(RNG.standard_normal((B, Hkv, T + 5, D)).astype(np.float32)).astype(dt)
    vb = mlxcy.array(RNG.standard_normal((B, Hkv, T + 5, D)).astype(np.float32)).astype(dt)
    k, v = kb[:, :, :T], vb[:, :, :T]
    y = ck.decode_attention(q, k, v, 0.125)
    assert y.dtype == dt and tuple(y.shape) == (B, H, 1, D)
    close(f64(y), attention_np(q, k, v, 0.125), 1e-5 if dtype == "float32" else 1e-2)


def test_decode_attention_grad_matches_mlx_ops():
    from mlxcy import fast
    from mlxcy.transforms import grad
    q = mlxcy.array(RNG.standard_normal((1, 4, 1, 16)).astype(np.float32))
    k = mlxcy.array(RNG.standard_normal((1, 2, 9, 16)).astype(np.float32))
    v = mlxcy.array(RNG.standard_normal((1, 2, 9, 16)).astype(np.float32))
    c = mlxcy.array(RNG.standard_normal((1, 4, 1, 16)).astype(np.float32))

    def ours(q, k, v):
        return (ck.decode_attention(q, k, v, 0.25) * c).sum()

    def theirs(q, k, v):
        return (fast.scaled_dot_product_attention(q, k, v, scale=0.25) * c).sum()

    for a, r in zip(grad(ours, argnums=(0, 1, 2))(q, k, v),
                    grad(theirs, argnums=(0, 1, 2))(q, k, v)):
        close(f64(a), f64(r), 1e-5)
