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
# "avx2": float32 activations (exact); "avx2-int16": the default, rows of x
# meeting 4/5/8-bit weights rounded to int16 per block of 32 (see `expected`);
# "vnni-int16": the same with AVX-512 VNNI for several rows of x
ISAS = ["scalar"] + (["avx2", "avx2-int16"] if ck.has_avx2() else []) + (
    ["vnni-int16"] if ck.has_vnni() else [])


@pytest.fixture(params=ISAS)
def isa(request):
    p = request.param
    ck.set_isa("scalar" if p == "scalar" else "avx512vnni" if p.startswith("vnni") else "avx2")
    old = ck.set_activations("int16" if p.endswith("int16") else "float32")
    yield p
    ck.set_isa("avx512vnni")
    ck.set_activations(old)


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


def round_i16(x, bits):
    """numpy's rounding of rows of x to int16 per block of 32, as the int16
    kernels do it in float32 (scale amax / 32767, round half to even)."""
    xb = np.asarray(x.astype(mlxcy.float32)).reshape(-1, 32)
    amax = np.abs(xb).max(1, keepdims=True)
    inv = np.where(amax > 0, np.float32(32767) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint((xb * inv).astype(np.float32))
    return (q.astype(np.float64) * (amax / np.float32(32767)).astype(np.float64)).reshape(
        x.shape)


def block_tol(isa):
    """The block primitives against float64 numpy: float32 math, or (the
    int16 mode) every 4/5/8-bit product's x rounded to int16 per block of 32."""
    return 3e-4 if isa.endswith("int16") else 1e-5


def expected(x, wq, s, b, gs, bits):
    """x @ W.T as the kernels compute it: exact, except that under the int16
    mode a product of at most int16_max_rows() rows of x, or of at most
    step_positions() positions per sequence (x [..., L, K]), with 4-, 5- or
    8-bit weights first rounds x to int16 per block of 32 for the q * scale
    term (the bias term b * sum(x) uses x itself)."""
    unpack = unpack_np if 32 % bits == 0 else unpack_bits_np
    xf = f64(x)
    rows = int(np.prod(xf.shape[:-1]))
    positions = xf.shape[-2] if xf.ndim >= 3 else rows
    if not (ck.isa() != "scalar" and ck.activations() == "int16" and bits in (4, 5, 8)
            and (rows <= ck.int16_max_rows() or positions <= ck.step_positions())):
        return xf @ unpack(wq, s, b, gs, bits).T
    zero = mlxcy.array(np.zeros(tuple(s.shape), np.float32)).astype(s.dtype)
    qs = unpack(wq, s, zero, gs, bits)                     # q * scale
    bias = unpack(wq, zero, b, gs, bits)                   # the groups' biases
    return round_i16(x, bits) @ qs.T + xf @ bias.T


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
    close(f64(y), expected(x, wq, s, b, gs, bits), 2e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("gs,K", [(32, 576), (32, 416), (64, 704)])
@pytest.mark.parametrize("N", [37, 38])
def test_quantized_group_tails(isa, bits, gs, K, N):
    """More than 8 groups, not a multiple of 8 (SmolLM2's K = 576: 18 groups of
    32): the last groups' scales and biases are read as a partial vector, on
    the first rows of the array too, in float16 as GGUF files load them.  K =
    416 (13 blocks): the array's last row ends half-way through a pair of
    blocks, alone (N odd) or in a pair of rows (N even)."""
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    s, b = s.astype(mlxcy.float16), b.astype(mlxcy.float16)
    x = mlxcy.array(RNG.standard_normal((1, K)).astype(np.float32))
    close(f64(ck.linear(x, wq, s, b, gs, bits)), expected(x, wq, s, b, gs, bits), 2e-6)


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
    ref = expected(x, wq, s, b, gs, bits) + f64(bias)
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
    ref = expected(xt, wq[8:29], s[8:29], b[8:29], gs, bits)
    close(f64(y), ref, 2e-6)
    wf = mlxcy.array(RNG.standard_normal((K, N)).astype(np.float32)).T      # strided weight
    close(f64(ck.linear(xt, wf)), f64(xt) @ f64(wf).T, 2e-6)


@pytest.mark.parametrize("bits", [4, 0])
def test_gemm_runs_of_x_give_identical_results(isa, bits):
    """The GEMM meets x's 16-row blocks in runs of set_gemm_run_bytes (each
    weight panel unpacked once per run): runs of one block, of two, and all of
    x at once give the same bits, and numpy's product."""
    gs, N, K, M = 32, 67, 96, 61            # 4 blocks of x, the last partial
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    x = mlxcy.array(RNG.standard_normal((M, K)).astype(np.float32))
    if bits:
        wq, s, b = nn.quantize(W, gs, bits)
        run = lambda: np.asarray(ck.linear(x, wq, s, b, gs, bits))
        ref = expected(x, wq, s, b, gs, bits)
    else:
        run = lambda: np.asarray(ck.linear(x, W))
        ref = f64(x) @ f64(W).T
    outs = []
    old = ck.set_gemm_run_bytes(1)
    try:
        for blocks in (1, 2, 1 << 20):
            ck.set_gemm_run_bytes(blocks * K * 16 * 4)
            outs.append(run())
    finally:
        ck.set_gemm_run_bytes(old)
    assert old == 512 << 10
    for y in outs[1:]:
        np.testing.assert_array_equal(y, outs[0])
    close(outs[0].astype(np.float64), ref, 2e-6)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ck.set_gemm_run_bytes(0)


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("rows_isa", [i for i in ("avx2", "avx512vnni")
                                      if ck.has_avx2() and (i == "avx2" or ck.has_vnni())])
def test_rows_tiles_give_identical_results(bits, rows_isa):
    """The int16 passes over several rows of x meet the weight rows in tiles
    of set_rows_tile_bytes: tiles of 1, 2 and 5 rows and the whole weight give
    the same bits, each row that row's one-row product (N = 23: tiles that do
    not divide it)."""
    gs, N, K = 32, 23, 416
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    row_bytes = wq.shape[1] * 4
    old_mode = ck.set_activations("int16")
    ck.set_isa(rows_isa)
    old = ck.set_rows_tile_bytes(1)
    try:
        for M in (2, 3, 5, 7):
            xn = RNG.standard_normal((M, K)).astype(np.float32)
            one = np.concatenate([np.asarray(ck.linear(mlxcy.array(xn[i:i + 1]), wq, s, b, gs,
                                                       bits)) for i in range(M)])
            for rows in (1, 2, 5, N):
                ck.set_rows_tile_bytes(rows * row_bytes)
                y = np.asarray(ck.linear(mlxcy.array(xn), wq, s, b, gs, bits))
                assert np.array_equal(y, one), f"M = {M}, tiles of {rows} rows"
    finally:
        ck.set_rows_tile_bytes(old)
        ck.set_activations(old_mode)
        ck.set_isa("avx512vnni")
    assert old == 64 << 10
    with pytest.raises(ValueError, match="n must be >= 1"):
        ck.set_rows_tile_bytes(0)


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
    """nn.Linear gives the product through the kernels (as `expected` computes
    it) and through MLX's ops (set_enabled(False)) when switched."""
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
    close(ref, f64(x) @ unpack_np(wq, s, b, gs, bits).T, 1e-5)
    close(y, expected(x, wq, s, b, gs, bits), 1e-5)


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
    old = ck.set_enabled(False), ck.activations()
    try:
        ref = f64(model(ids))
        ref_ids = [t.id for t in smollm2.stream_ids(ids, max_tokens=12)]
        ck.set_enabled(True)
        out = f64(model(ids))           # 6 positions: int16 products (the default)
        out_ids = [t.id for t in smollm2.stream_ids(ids, max_tokens=12)]
        ck.set_activations("float32")
        exact = f64(model(ids))
    finally:
        ck.set_enabled(old[0])
        ck.set_activations(old[1])
    close(exact, ref, 1e-4)
    close(out, ref, 1e-3)
    assert out_ids == ref_ids


def attention_np(q, k, v, scale, causal=False):
    """numpy's attention in float64; causal: the L queries are the last L of
    the T positions (query i sees keys 0 .. T - L + i)."""
    q, k, v = f64(q), f64(k), f64(v)
    B, H, L, D = q.shape
    T = k.shape[2]
    rep = H // k.shape[1]
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2)
    if causal:
        s = np.where(np.arange(T)[None, :] <= np.arange(T - L, T)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("B,H,Hkv,L,T,D", [(1, 9, 3, 1, 1, 64), (2, 4, 4, 1, 37, 64),
                                           (1, 6, 2, 1, 130, 12), (1, 9, 3, 7, 7, 64),
                                           (2, 4, 2, 33, 40, 16), (1, 3, 1, 70, 70, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_numpy(isa, dtype, B, H, Hkv, L, T, D, causal):
    dt = getattr(mlxcy, dtype)
    q = mlxcy.array(RNG.standard_normal((B, H, L, D)).astype(np.float32)).astype(dt)
    # the cache's view: the first T positions of a longer buffer (strided)
    kb = mlxcy.array(RNG.standard_normal((B, Hkv, T + 5, D)).astype(np.float32)).astype(dt)
    vb = mlxcy.array(RNG.standard_normal((B, Hkv, T + 5, D)).astype(np.float32)).astype(dt)
    k, v = kb[:, :, :T], vb[:, :, :T]
    y = ck.attention(q, k, v, 0.125, causal)
    assert y.dtype == dt and tuple(y.shape) == (B, H, L, D)
    close(f64(y), attention_np(q, k, v, 0.125, causal), 1e-5 if dtype == "float32" else 1e-2)


def masked_attention_np(q, k, v, scale, mask):
    """numpy's attention with a boolean (False hides) or additive mask."""
    q, k, v = f64(q), f64(k), f64(v)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = scale * q @ np.swapaxes(k, -1, -2)
    m = np.asarray(mask.astype(mlxcy.float32) if mask.dtype != mlxcy.bool_ else mask)
    s = np.where(m, s, np.finfo(np.float32).min) if m.dtype == bool else s + m.astype(np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("kind,mshape", [("bool", (2, 1, 5, 12)), ("bool", (5, 12)),
                                         ("float32", (2, 6, 5, 12)), ("bfloat16", (1, 5, 12)),
                                         ("bool", (2, 1, 1, 12))])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_mask_matches_numpy(isa, kind, mshape, causal):
    B, H, Hkv, T, D = 2, 6, 3, 12, 16
    L = mshape[-2]
    q = mlxcy.array(RNG.standard_normal((B, H, L, D)).astype(np.float32))
    k = mlxcy.array(RNG.standard_normal((B, Hkv, T, D)).astype(np.float32))
    v = mlxcy.array(RNG.standard_normal((B, Hkv, T, D)).astype(np.float32))
    if kind == "bool":
        m = RNG.random(mshape) < 0.6
        m[..., -1] = True                      # every query sees its own (last) key
        mask = mlxcy.array(m)
    else:
        mask = mlxcy.array(RNG.standard_normal(mshape).astype(np.float32)).astype(
            getattr(mlxcy, kind))
    y = ck.attention(q, k, v, 0.25, causal, mask)
    full = np.asarray(mask.astype(mlxcy.float32) if kind != "bool" else mask)
    if causal:   # the causal rule and the mask together, as one boolean/additive mask
        seen = np.arange(T)[None, :] <= np.arange(T - L, T)[:, None]
        full = full & seen if kind == "bool" else np.where(seen, full, -np.inf)
    close(f64(y), masked_attention_np(q, k, v, 0.25, mlxcy.array(full)), 1e-5)


def test_attention_hidden_keys_never_reach_the_output(isa):
    """Keys the mask hides weigh exactly 0 even where the softmax runs eight
    scores at a time, so their values (NaN here, as a padded or unwritten
    cache position may hold anything) never reach the output; the other
    keys give numpy's attention over the visible keys alone.  40 keys: four
    full vectors of eight scores and a tail."""
    B, H, Hkv, L, T, D = 1, 4, 2, 3, 40, 16
    q = RNG.standard_normal((B, H, L, D)).astype(np.float32)
    k = RNG.standard_normal((B, Hkv, T, D)).astype(np.float32)
    v = RNG.standard_normal((B, Hkv, T, D)).astype(np.float32)
    m = np.ones((B, 1, 1, T), dtype=bool)
    m[..., 3:21] = False
    m[..., 37] = False
    v[:, :, ~m[0, 0, 0]] = np.nan
    y = ck.attention(mlxcy.array(q), mlxcy.array(k), mlxcy.array(v), 0.25, False, mlxcy.array(m))
    keep = m[0, 0, 0]
    want = masked_attention_np(mlxcy.array(q), mlxcy.array(k[:, :, keep]),
                               mlxcy.array(v[:, :, keep]), 0.25,
                               mlxcy.array(np.ones((1, int(keep.sum())), dtype=bool)))
    assert np.isfinite(np.asarray(y)).all()
    close(f64(y), want, 1e-5)


def test_attention_mask_grad_matches_mlx_ops():
    from mlxcy import fast
    from mlxcy.transforms import grad
    q = mlxcy.array(RNG.standard_normal((1, 4, 3, 16)).astype(np.float32))
    k = mlxcy.array(RNG.standard_normal((1, 2, 9, 16)).astype(np.float32))
    v = mlxcy.array(RNG.standard_normal((1, 2, 9, 16)).astype(np.float32))
    c = mlxcy.array(RNG.standard_normal((1, 4, 3, 16)).astype(np.float32))
    m = RNG.random((3, 9)) < 0.7
    m[:, 0] = True
    mask = mlxcy.array(m)

    def ours(q, k, v):
        return (ck.attention(q, k, v, 0.25, False, mask) * c).sum()

    def theirs(q, k, v):
        return (fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask) * c).sum()

    for a, r in zip(grad(ours, argnums=(0, 1, 2))(q, k, v),
                    grad(theirs, argnums=(0, 1, 2))(q, k, v)):
        close(f64(a), f64(r), 1e-5)


def test_attention_refuses_a_mask_that_does_not_broadcast():
    q = mlxcy.zeros((1, 2, 3, 8))
    k = mlxcy.zeros((1, 2, 4, 8))
    with pytest.raises(ValueError, match="broadcast to"):
        ck.attention(q, k, k, 1.0, False, mlxcy.zeros((3, 5)))
    with pytest.raises(ValueError, match="boolean or float"):
        ck.attention(q, k, k, 1.0, False, mlxcy.zeros((3, 4), dtype=mlxcy.int32))


def test_attention_refuses_more_queries_than_keys():
    q = mlxcy.zeros((1, 2, 5, 8))
    k = mlxcy.zeros((1, 2, 4, 8))
    with pytest.raises(ValueError, match="L <= T"):
        ck.attention(q, k, k, 1.0, True)


def act_np(g, u, act):
    """numpy's act(g) * u in float64 (SiLU, or GELU with the tanh approximation)."""
    g, u = f64(g), f64(u)
    if act == "silu":
        return g / (1 + np.exp(-g)) * u
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * u


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 3, 37), (1, 130, 1536), (4, 64)])
def test_activation_matches_numpy(isa, act, dtype, shape):
    dt = getattr(mlxcy, dtype)
    g = RNG.standard_normal(shape).astype(np.float32) * 4
    g.flat[:4] = [-100.0, 100.0, 0.0, -30.0][:g.size]   # e^x's clamps and zero
    g = mlxcy.array(g).astype(dt)
    u = mlxcy.array(RNG.standard_normal(shape).astype(np.float32)).astype(dt)
    y = ck.activation(g, u, act)
    assert y.dtype == dt and tuple(y.shape) == shape
    r = act_np(g, u, act)
    # float32: within a few ulp of float64's value; half types: one rounding.
    # GELU's 1 + tanh(z) cancels for very negative g: float32's absolute error
    # there is an ulp of 1 times |g u| / 2.
    rel = 2e-6 if dtype == "float32" else 1e-2
    tiny = 6e-8 if dtype == "float16" else 0.0     # float16's subnormals
    assert np.all(np.abs(f64(y) - r) <= rel * np.abs(r) + 2e-7 * np.abs(f64(g) * f64(u)) + tiny)


@pytest.mark.parametrize("layout", ["column slices", "transposed"])
def test_activation_reads_strided_operands(layout):
    """g and u as the two halves of a fused gate/up product's output (rows
    2 x 19 apart), or transposed (no contiguous axis)."""
    if layout == "column slices":
        gu = mlxcy.array(RNG.standard_normal((2, 3, 2 * 19)).astype(np.float32))
        g, u = gu[:, :, :19], gu[:, :, 19:]
    else:
        g = mlxcy.array(RNG.standard_normal((19, 6)).astype(np.float32)).T
        u = mlxcy.array(RNG.standard_normal((19, 6)).astype(np.float32)).T
    r = act_np(g, u, "silu")
    assert np.all(np.abs(f64(ck.activation(g, u, "silu")) - r) <= 2e-6 * np.abs(r))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_activation_grad_matches_mlx_ops(act):
    from mlxcy import nn as mnn
    from mlxcy.transforms import grad
    g = mlxcy.array(RNG.standard_normal((2, 5, 24)).astype(np.float32))
    u = mlxcy.array(RNG.standard_normal((2, 5, 24)).astype(np.float32))
    c = mlxcy.array(RNG.standard_normal((2, 5, 24)).astype(np.float32))

    def ours(g, u):
        return (ck.activation(g, u, act) * c).sum()

    def theirs(g, u):
        if act == "silu":
            a = g * mlxcy.sigmoid(g)
        else:
            a = 0.5 * g * (1 + mlxcy.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g * g * g)))
        return (a * u * c).sum()

    for a, r in zip(grad(ours, argnums=(0, 1))(g, u), grad(theirs, argnums=(0, 1))(g, u)):
        close(f64(a), f64(r), 1e-5)


def test_activation_refuses_bad_operands():
    g = mlxcy.zeros((2, 8))
    with pytest.raises(ValueError, match="act must be"):
        ck.activation(g, g, "relu")
    with pytest.raises(ValueError, match="one shape and float dtype"):
        ck.activation(g, mlxcy.zeros((2, 7)))
    with pytest.raises(ValueError, match="one shape and float dtype"):
        ck.activation(g, mlxcy.zeros((2, 8), dtype=mlxcy.int32))


@pytest.mark.parametrize("L,causal", [(1, False), (6, True), (9, False)])
def test_attention_grad_matches_mlx_ops(L, causal):
    from mlxcy import fast
    from mlxcy.transforms import grad
    q = mlxcy.array(RNG.standard_normal((1, 4, L, 16)).astype(np.float32))
    k = mlxcy.array(RNG.standard_normal((1, 2, 9, 16)).astype(np.float32))
    v = mlxcy.array(RNG.standard_normal((1, 2, 9, 16)).astype(np.float32))
    c = mlxcy.array(RNG.standard_normal((1, 4, L, 16)).astype(np.float32))

    def ours(q, k, v):
        return (ck.attention(q, k, v, 0.25, causal) * c).sum()

    def theirs(q, k, v):
        mask = "causal" if causal else None
        return (fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask) * c).sum()

    for a, r in zip(grad(ours, argnums=(0, 1, 2))(q, k, v),
                    grad(theirs, argnums=(0, 1, 2))(q, k, v)):
        close(f64(a), f64(r), 1e-5)


# ---------------------------------------------------------- 2, 3, 5, 6 bits ---

def unpack_bits_np(wq, scales, biases, gs, bits):
    """numpy's unpacking of MLX's affine layout for any width: the packed words
    as one little-endian bit stream, value k at bits [k*bits, (k+1)*bits)."""
    w = np.asarray(wq)
    N = w.shape[0]
    bitstream = np.unpackbits(w.view(np.uint8).reshape(N, -1), axis=1, bitorder="little")
    K = bitstream.shape[1] // bits
    q = (bitstream[:, :K * bits].reshape(N, K, bits).astype(np.uint64)
         << np.arange(bits, dtype=np.uint64)).sum(-1)
    s = np.asarray(scales.astype(mlxcy.float32)).astype(np.float64)
    b = np.asarray(biases.astype(mlxcy.float32)).astype(np.float64)
    return q * np.repeat(s, gs, axis=1) + np.repeat(b, gs, axis=1)


def test_bitstream_reference_agrees_with_mlx_dequantize():
    """The numpy reference above reads MLX's layout as MLX itself does."""
    for bits in (2, 3, 4, 5, 6, 8):
        W = mlxcy.array(RNG.standard_normal((5, 128)).astype(np.float32))
        wq, s, b = nn.quantize(W, 32, bits)
        np.testing.assert_allclose(unpack_bits_np(wq, s, b, 32, bits),
                                   f64(nn.dequantize(wq, s, b, 32, bits)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 2, 5, 33])
def test_odd_bit_widths_match_numpy(isa, bits, gs, M):
    N, K = 29, gs * 3
    W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
    wq, s, b = nn.quantize(W, gs, bits)
    x = mlxcy.array(RNG.standard_normal((M, K)).astype(np.float32))
    y = ck.linear(x, wq, s, b, gs, bits)
    close(f64(y), expected(x, wq, s, b, gs, bits), 4e-6)
    # float16 scales/biases (F16C loads on the AVX2 path)
    s16, b16 = s.astype(mlxcy.float16), b.astype(mlxcy.float16)
    y16 = ck.linear(x, wq, s16, b16, gs, bits)
    assert y16.dtype == mlxcy.float32
    close(f64(y16), expected(x, wq, s16, b16, gs, bits), 4e-6)


def test_last_row_of_odd_widths_reads_no_further():
    """The last group of the last row ends the allocation: its values are read
    with exact-size copies (the 5-bit int16 kernel: from a padded copy of the
    row; valgrind/ASan would flag an over-read; here the values must still be
    right), in both activation modes."""
    for mode in ("float32", "int16"):
        old = ck.set_activations(mode)
        try:
            for bits in (3, 5, 6):
                W = mlxcy.array(RNG.standard_normal((3, 32)).astype(np.float32))
                wq, s, b = nn.quantize(W, 32, bits)
                x = mlxcy.array(np.linspace(0.5, 1.5, 32, dtype=np.float32).reshape(1, 32))
                close(f64(ck.linear(x, wq, s, b, 32, bits)), expected(x, wq, s, b, 32, bits),
                      1e-5)
        finally:
            ck.set_activations(old)


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("sdtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("rows_isa", [i for i in ("avx2", "avx512vnni")
                                      if ck.has_avx2() and (i == "avx2" or ck.has_vnni())])
def test_several_rows_equal_one_row_at_a_time(bits, gs, sdtype, rows_isa):
    """The int16 products of 2 to int16_max_rows() rows of x (a speculative
    step's verification, a small batch) share each pass over the weights
    between rows (four rows a pass), yet every row's y is bit-identical to
    that row's product alone, so verification sees the logits plain
    decoding would.  K = 416: 13 blocks (a half pair of 4-bit blocks at the
    end); N odd; the array's last row included.  numpy checks the values
    themselves (expected())."""
    old = ck.set_activations("int16")
    ck.set_isa(rows_isa)
    try:
        dt = getattr(mlxcy, sdtype)
        K = 416 if gs == 32 else gs * 5
        N = 37
        W = mlxcy.array(RNG.standard_normal((N, K)).astype(np.float32))
        wq, s, b = nn.quantize(W, gs, bits)
        s, b = s.astype(dt), b.astype(dt)
        bias = mlxcy.array(RNG.standard_normal(N).astype(np.float32))
        for M in range(2, ck.int16_max_rows() + 1):
            xn = RNG.standard_normal((M, K)).astype(np.float32)
            y = np.asarray(ck.linear(mlxcy.array(xn), wq, s, b, gs, bits, bias=bias))
            one = np.concatenate([np.asarray(ck.linear(mlxcy.array(xn[i:i + 1]), wq, s, b, gs,
                                                       bits, bias=bias)) for i in range(M)])
            assert np.array_equal(y, one), f"M = {M}: rows differ from one-row products"
            if M in (2, ck.int16_max_rows()):
                close(y.astype(np.float64),
                      expected(mlxcy.array(xn), wq, s, b, gs, bits) + f64(bias), 2e-6)
    finally:
        ck.set_activations(old)
        ck.set_isa("avx512vnni")


# ------------------------------------------------------ block primitives ---

def rms_np(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_np(x, dims, base, scale, pos, freqs=None):
    """HF/MLX non-traditional RoPE at one position, float64."""
    half = dims // 2
    inv = 1.0 / freqs if freqs is not None else base ** (-np.arange(half) / half)
    th = pos * scale * inv
    c, s = np.cos(th), np.sin(th)
    out = x.copy()
    x1, x2 = x[..., :half], x[..., half:dims]
    out[..., :half] = x1 * c - x2 * s
    out[..., half:dims] = x1 * s + x2 * c
    return out


def make_linear(N, K, kind, seed, bias=False):
    """(operand tuple for ck.block_*, float64 dense weight, float64 bias)."""
    rng = np.random.default_rng(seed)
    W = mlxcy.array((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32))
    bv = mlxcy.array(rng.standard_normal(N).astype(np.float32) * 0.1) if bias else None
    if kind == "float32":
        return (W, None, None, bv, 0, 0), f64(W), (f64(bv) if bias else 0.0)
    if kind == "bfloat16":
        Wb = W.astype(mlxcy.bfloat16)
        return (Wb, None, None, bv, 0, 0), f64(Wb), (f64(bv) if bias else 0.0)
    bits = {"q4": 4, "q5": 5, "q8": 8}[kind]
    wq, s, b = nn.quantize(W, 32, bits)
    return (wq, s, b, bv, 32, bits), unpack_bits_np(wq, s, b, 32, bits), (f64(bv) if bias else 0.0)


def _qkv_layers(kind, H, Hkv, D, hidden):
    """(operands, float64 weight, bias, q_norm, k_norm) of one fused q/k/v layer,
    or (split) separate q (5-bit), k (8-bit) and v (float) layers, as in the
    Q4_K_M GGUFs, with per-head q/k norms."""
    if kind != "split":
        lin, Wd, bd = make_linear((H + 2 * Hkv) * D, hidden, kind, 7, bias=True)
        return [lin], Wd, bd, None, None
    parts = [make_linear(n * D, hidden, k_, 7 + i, bias=True)
             for i, (n, k_) in enumerate(((H, "q5"), (Hkv, "q8"), (Hkv, "float32")))]
    qn = mlxcy.array(RNG.uniform(0.5, 1.5, D).astype(np.float32))
    kn = mlxcy.array(RNG.uniform(0.5, 1.5, D).astype(np.float32))
    return ([p_[0] for p_ in parts], np.concatenate([p_[1] for p_ in parts]),
            np.concatenate([p_[2] for p_ in parts]), qn, kn)


def _qkv_np(x, nw, eps, Wd, bd, H, Hkv, D, qn, kn):
    """numpy's q/k/v heads of every row of x (before RoPE), [rows, heads, D]."""
    y = (rms_np(f64(x), f64(nw), eps) @ Wd.T + bd).reshape(-1, H + 2 * Hkv, D)
    if qn is not None:
        y[:, :H] = rms_np(y[:, :H], f64(qn), 1e-6)
        y[:, H:H + Hkv] = rms_np(y[:, H:H + Hkv], f64(kn), 1e-6)
    return y


@pytest.mark.parametrize("kind", ["q4", "q5", "float32", "split"])
@pytest.mark.parametrize("B,H,Hkv,D,dims,offset", [(1, 9, 3, 64, 64, 0), (1, 4, 2, 32, 32, 37),
                                                    (2, 6, 6, 16, 8, 300)])
def test_block_qkv_matches_numpy(isa, kind, B, H, Hkv, D, dims, offset):
    """One fused q/k/v layer, or (split) separate q (5-bit), k (8-bit) and v
    (float) layers as in the Q4_K_M GGUFs, optionally with per-head q/k norms."""
    hidden, eps, base = 96, 1e-5, 10000.0
    x = mlxcy.array(RNG.standard_normal((B, 1, hidden)).astype(np.float32))
    nw = mlxcy.array(RNG.uniform(0.5, 1.5, hidden).astype(np.float32))
    lins, Wd, bd, qn, kn = _qkv_layers(kind, H, Hkv, D, hidden)
    q, k, v = ck.block_qkv(x, nw, eps, lins, H, Hkv, D, dims, base, 1.0, None, qn, kn, 1e-6,
                           offset)
    assert tuple(q.shape) == (B, H, 1, D) and tuple(k.shape) == (B, Hkv, 1, D)
    y = _qkv_np(x, nw, eps, Wd, bd, H, Hkv, D, qn, kn)                # [B, heads, D]
    qk = rope_np(y[:, :H + Hkv], dims, base, 1.0, offset)
    tol = block_tol(isa)
    close(f64(q)[:, :, 0], qk[:, :H], tol)
    close(f64(k)[:, :, 0], qk[:, H:], tol)
    close(f64(v)[:, :, 0], y[:, H + Hkv:], tol)


@pytest.mark.parametrize("kind", ["q4", "split"])
def test_block_qkv_several_positions_match_numpy(isa, kind):
    """L = 5 new positions of one sequence (a speculative step's proposals):
    each row at its own position offset + l; outputs [1, heads, L, D]."""
    B, L, H, Hkv, D, dims, offset = 1, 5, 4, 2, 32, 32, 37
    hidden, eps, base = 96, 1e-5, 10000.0
    x = mlxcy.array(RNG.standard_normal((B, L, hidden)).astype(np.float32))
    nw = mlxcy.array(RNG.uniform(0.5, 1.5, hidden).astype(np.float32))
    lins, Wd, bd, qn, kn = _qkv_layers(kind, H, Hkv, D, hidden)
    q, k, v = ck.block_qkv(x, nw, eps, lins, H, Hkv, D, dims, base, 1.0, None, qn, kn, 1e-6,
                           offset)
    assert tuple(q.shape) == (B, H, L, D) and tuple(v.shape) == (B, Hkv, L, D)
    y = _qkv_np(x, nw, eps, Wd, bd, H, Hkv, D, qn, kn)                # [L, heads, D]
    tol = block_tol(isa)
    for i in range(L):
        qk = rope_np(y[i, :H + Hkv], dims, base, 1.0, offset + i)
        close(f64(q)[0, :, i], qk[:H], tol)
        close(f64(k)[0, :, i], qk[H:], tol)
        close(f64(v)[0, :, i], y[i, H + Hkv:], tol)


@pytest.mark.parametrize("kind", ["q4", "split"])
def test_block_qkv_rows_at_their_own_offsets(isa, kind):
    """A batch's rows at their own positions (offsets [B] int32, as a padded
    batch's RoPE takes them): row b rotated at offsets[b]."""
    B, H, Hkv, D, dims = 3, 4, 2, 32, 32
    hidden, eps, base = 96, 1e-5, 10000.0
    offs = [0, 37, 300]
    x = mlxcy.array(RNG.standard_normal((B, 1, hidden)).astype(np.float32))
    nw = mlxcy.array(RNG.uniform(0.5, 1.5, hidden).astype(np.float32))
    lins, Wd, bd, qn, kn = _qkv_layers(kind, H, Hkv, D, hidden)
    q, k, v = ck.block_qkv(x, nw, eps, lins, H, Hkv, D, dims, base, 1.0, None, qn, kn, 1e-6,
                           999, mlxcy.array(np.array(offs, np.int32)))
    y = _qkv_np(x, nw, eps, Wd, bd, H, Hkv, D, qn, kn)                # [B, heads, D]
    tol = block_tol(isa)
    for b, off in enumerate(offs):
        qk = rope_np(y[b:b + 1, :H + Hkv], dims, base, 1.0, off)[0]
        close(f64(q)[b, :, 0], qk[:H], tol)
        close(f64(k)[b, :, 0], qk[H:], tol)
        close(f64(v)[b, :, 0], y[b, H + Hkv:], tol)
    with pytest.raises(ValueError, match="offsets"):
        ck.block_qkv(x, nw, eps, lins, H, Hkv, D, dims, base, 1.0, None, qn, kn, 1e-6, 0,
                     mlxcy.array(np.array(offs[:2], np.int32)))


@pytest.mark.parametrize("rows_isa", [i for i in ("avx2", "avx512vnni")
                                      if ck.has_avx2() and (i == "avx2" or ck.has_vnni())])
def test_block_steps_of_many_rows_equal_their_rows_one_at_a_time(rows_isa):
    """A step of 20 rows (more than the int16 kernels take in one pass: a
    large batch, or a batch's verification) gives each row bit for bit what a
    step of that row alone gives, in the default int16 mode."""
    B, H, Hkv, D, T, hidden, inter = 20, 4, 2, 32, 9, 96, 160
    x, nw, q, k, v = _attn_mlp_inputs(B, H, Hkv, 1, T, D, hidden)
    lins, _, _, _, _ = _qkv_layers("q4", H, Hkv, D, hidden)
    o, _, _ = make_linear(hidden, H * D, "q4", 11)
    g_, _, _ = make_linear(2 * inter, hidden, "q4", 12)
    dn, _, _ = make_linear(hidden, inter, "q4", 13)
    offs = mlxcy.array(np.arange(B, dtype=np.int32) + 5)
    old = ck.activations()
    ck.set_activations("int16")
    ck.set_isa(rows_isa)
    try:
        together = [f64(a) for a in ck.block_qkv(x, nw, 1e-5, lins, H, Hkv, D, D, offsets=offs)]
        together.append(f64(ck.block_attn_mlp(q, k, v, x, 0.2, o, nw, 1e-5, [g_], dn)))
        for b in range(B):
            r = slice(b, b + 1)
            alone = [f64(a) for a in ck.block_qkv(x[r], nw, 1e-5, lins, H, Hkv, D, D,
                                                  offsets=offs[r])]
            alone.append(f64(ck.block_attn_mlp(q[r], k[r], v[r], x[r], 0.2, o, nw, 1e-5, [g_],
                                               dn)))
            for t, a in zip(together, alone):
                assert np.array_equal(t[r], a), (b, np.abs(t[r] - a).max())
    finally:
        ck.set_activations(old)
        ck.set_isa("avx512vnni")


def test_block_qkv_matches_mlx_rope_and_freqs():
    """Against MLX's own RoPE (mlxcy.fast.rope) with custom periods and scale."""
    from mlxcy import fast
    H, Hkv, D, hidden = 4, 2, 32, 64
    lin, Wd, _ = make_linear((H + 2 * Hkv) * D, hidden, "float32", 3)
    x = mlxcy.array(RNG.standard_normal((1, 1, hidden)).astype(np.float32))
    nw = mlxcy.array(np.ones(hidden, np.float32))
    freqs = mlxcy.array((10000.0 ** (np.arange(16) / 16) * RNG.uniform(1, 2, 16)).astype(np.float32))
    q, k, _v = ck.block_qkv(x, nw, 1e-6, [lin], H, Hkv, D, D, 0.0, 0.5, freqs, offset=123)
    y = fast.rms_norm(x, nw, 1e-6) @ lin[0].T
    heads = y.reshape(1, 1, H + 2 * Hkv, D).transpose(0, 2, 1, 3)
    r = fast.rope(heads[:, :H + Hkv], D, traditional=False, base=None, scale=0.5, offset=123,
                  freqs=freqs)
    close(f64(q), f64(r[:, :H]), 1e-5)
    close(f64(k), f64(r[:, H:]), 1e-5)


def _attn_mlp_inputs(B, H, Hkv, L, T, D, hidden):
    """BlockAttnMLP's activations: x [B, L, hidden], the norm weight, q [B, H,
    L, D] and k, v as views of the first T positions of longer cache buffers."""
    x = mlxcy.array(RNG.standard_normal((B, L, hidden)).astype(np.float32))
    nw = mlxcy.array(RNG.uniform(0.5, 1.5, hidden).astype(np.float32))
    q = mlxcy.array(RNG.standard_normal((B, H, L, D)).astype(np.float32))
    kb = mlxcy.array(RNG.standard_normal((B, Hkv, T + 3, D)).astype(np.float32))
    vb = mlxcy.array(RNG.standard_normal((B, Hkv, T + 3, D)).astype(np.float32))
    return x, nw, q, kb[:, :, :T], vb[:, :, :T]


@pytest.mark.parametrize("kind", ["q4", "q8", "bfloat16", "gemma"])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("B,H,Hkv,T,D", [(1, 9, 3, 1, 64), (2, 4, 2, 45, 32)])
def test_block_attn_mlp_matches_numpy(isa, kind, act, B, H, Hkv, T, D):
    """Llama's block (one fused gate/up layer), or (gemma) Gemma's sandwich norms
    with separate 5-bit gate and up layers, a 4-bit o_proj and an 8-bit down."""
    hidden, inter, eps, scale = 96, 160, 1e-5, D ** -0.5
    sandwich = kind == "gemma"
    o, Wo, _ = make_linear(hidden, H * D, "q4" if sandwich else kind, 11)
    if sandwich:
        g_, Wg, _ = make_linear(inter, hidden, "q5", 12)
        u_, Wu, _ = make_linear(inter, hidden, "q5", 14)
        gu, Wgu = [g_, u_], np.concatenate([Wg, Wu])
        no = mlxcy.array(RNG.uniform(0.5, 1.5, hidden).astype(np.float32))
        nm = mlxcy.array(RNG.uniform(0.5, 1.5, hidden).astype(np.float32))
    else:
        g_, Wgu, _ = make_linear(2 * inter, hidden, kind, 12)
        gu, no, nm = [g_], None, None
    dn, Wdn, _ = make_linear(hidden, inter, "q8" if sandwich else kind, 13)
    x, nw, q, k, v = _attn_mlp_inputs(B, H, Hkv, 1, T, D, hidden)
    out = ck.block_attn_mlp(q, k, v, x, scale, o, nw, eps, gu, dn, act, norm_o=no, norm_mlp=nm)
    assert tuple(out.shape) == (B, 1, hidden)
    att = attention_np(q, k, v, scale).transpose(0, 2, 1, 3).reshape(B, 1, H * D)
    t = att @ Wo.T
    h = f64(x) + (rms_np(t, f64(no), eps) if sandwich else t)
    g = rms_np(h, f64(nw), eps) @ Wgu.T
    gate, up = g[..., :inter], g[..., inter:]
    if act == "silu":
        a = gate / (1 + np.exp(-gate)) * up
    else:
        a = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate ** 3))) * up
    m = a @ Wdn.T
    ref = h + (rms_np(m, f64(nm), eps) if sandwich else m)
    close(f64(out), ref, block_tol(isa) if kind != "bfloat16" else 1e-2)


@pytest.mark.parametrize("kind", ["q4", "float32"])
def test_block_attn_mlp_several_positions_match_numpy(isa, kind):
    """L = 5 new positions of one sequence, the cache's last 5 of T = 45: each
    attends causally (query i sees keys 0 .. T - L + i); the rest row-wise."""
    B, L, H, Hkv, T, D = 1, 5, 4, 2, 45, 32
    hidden, inter, eps, scale = 96, 160, 1e-5, D ** -0.5
    o, Wo, _ = make_linear(hidden, H * D, kind, 11)
    g_, Wgu, _ = make_linear(2 * inter, hidden, kind, 12)
    dn, Wdn, _ = make_linear(hidden, inter, kind, 13)
    x, nw, q, k, v = _attn_mlp_inputs(B, H, Hkv, L, T, D, hidden)
    out = ck.block_attn_mlp(q, k, v, x, scale, o, nw, eps, [g_], dn, "silu")
    assert tuple(out.shape) == (B, L, hidden)
    att = attention_np(q, k, v, scale, causal=True).transpose(0, 2, 1, 3).reshape(B, L, H * D)
    h = f64(x) + att @ Wo.T
    g = rms_np(h, f64(nw), eps) @ Wgu.T
    gate, up = g[..., :inter], g[..., inter:]
    ref = h + (gate / (1 + np.exp(-gate)) * up) @ Wdn.T
    close(f64(out), ref, block_tol(isa))


@pytest.mark.parametrize("kind", ["q4", "float32"])
def test_block_attn_mlp_with_a_padding_mask_matches_numpy(isa, kind):
    """A padded batch's decode step: row b hides its first pads[b] cache
    positions (the left padding) through a boolean mask [B, 1, 1, T]."""
    B, H, Hkv, T, D = 3, 4, 2, 45, 32
    hidden, inter, eps, scale = 96, 160, 1e-5, D ** -0.5
    o, Wo, _ = make_linear(hidden, H * D, kind, 11)
    g_, Wgu, _ = make_linear(2 * inter, hidden, kind, 12)
    dn, Wdn, _ = make_linear(hidden, inter, kind, 13)
    x, nw, q, k, v = _attn_mlp_inputs(B, H, Hkv, 1, T, D, hidden)
    m = np.ones((B, 1, 1, T), bool)
    for b, pad in enumerate((0, 7, 30)):
        m[b, ..., :pad] = False
    mask = mlxcy.array(m)
    out = ck.block_attn_mlp(q, k, v, x, scale, o, nw, eps, [g_], dn, "silu", mask=mask)
    att = masked_attention_np(q, k, v, scale, mask).transpose(0, 2, 1, 3).reshape(B, 1, H * D)
    h = f64(x) + att @ Wo.T
    g = rms_np(h, f64(nw), eps) @ Wgu.T
    gate, up = g[..., :inter], g[..., inter:]
    ref = h + (gate / (1 + np.exp(-gate)) * up) @ Wdn.T
    close(f64(out), ref, block_tol(isa))
    with pytest.raises(ValueError, match="mask"):
        ck.block_attn_mlp(q, k, v, x, scale, o, nw, eps, [g_], dn, "silu",
                          mask=mlxcy.array(np.ones((B, 1, 1, T + 1), bool)))


def test_block_errors():
    lin, _, _ = make_linear(8 * 16, 64, "q4", 1)
    x = mlxcy.array(np.ones((1, 1, 64), np.float32))
    with pytest.raises(ValueError, match="block_qkv: unsupported"):
        ck.block_qkv(x, mlxcy.array(np.ones(63, np.float32)), 1e-5, [lin], 4, 2, 16, 16)
    with pytest.raises(ValueError, match="block_qkv: unsupported"):
        ck.block_qkv(x, mlxcy.array(np.ones(64, np.float32)), 1e-5, [lin], 4, 2, 16, 17)
    with pytest.raises(ValueError, match="block_qkv: unsupported"):     # q/k/v as 2 parts
        ck.block_qkv(x, mlxcy.array(np.ones(64, np.float32)), 1e-5, [lin, lin], 4, 2, 16, 16)
    q = mlxcy.array(np.ones((1, 4, 1, 16), np.float32))
    k = mlxcy.array(np.ones((1, 2, 5, 16), np.float32))
    o, _, _ = make_linear(64, 64, "q4", 2)
    gu, _, _ = make_linear(2 * 96, 64, "q4", 3)
    dn, _, _ = make_linear(64, 96, "q4", 4)
    nw = mlxcy.array(np.ones(64, np.float32))
    with pytest.raises(ValueError, match="act must be"):
        ck.block_attn_mlp(q, k, k, x, 0.25, o, nw, 1e-5, [gu], dn, "relu")
    with pytest.raises(ValueError, match="block_attn_mlp: unsupported"):
        ck.block_attn_mlp(q, k, k, x, 0.25, o, nw, 1e-5, [dn], dn, "silu")


def _decode_logits(model, ids, steps):
    """Logits of a prefill and then `steps` one-token steps over a cache (the
    greedy token fed back), float64."""
    cache = model.make_cache()
    out = [f64(model(ids, cache=cache))[:, -1]]
    for _ in range(steps):
        tok = int(out[-1].argmax())
        out.append(f64(model([tok], cache=cache))[:, -1])
    cache.free()
    return np.stack(out)


def _fused_unfused_mlx_agree(run):
    """run() (logits, float64) with the block primitives, with the blocks
    unfused and with MLX's own ops: within 1e-4 of each other with float32
    activations, within 1e-3 of MLX's with the int16 default; the same
    greedy ids."""
    old = ck.set_enabled(None), ck.set_block_fusion(True), ck.activations()
    try:
        fast = run()                                           # the default: int16
        ck.set_activations("float32")
        fused = run()
        ck.set_block_fusion(False)
        unfused = run()
        ck.set_enabled(False)
        mlx = run()
    finally:
        ck.set_enabled(old[0])
        ck.set_block_fusion(old[1])
        ck.set_activations(old[2])
    close(fused, unfused, 1e-4)
    close(fused, mlx, 1e-4)
    close(fast, mlx, 1e-3)
    assert (fused.argmax(-1) == mlx.argmax(-1)).all()
    assert (fast.argmax(-1) == mlx.argmax(-1)).all()


def test_smollm2_verification_chunks_match_unfused_and_mlx(smollm2):
    """Chunks of 2-9 tokens in one forward over the cache (a speculative step's
    verification, through the block primitives when fused) against the same
    with the blocks unfused and with MLX's own ops."""
    model = smollm2.model
    ids = smollm2.tokenizer.encode("The sea is a vast", add_special_tokens=True)
    chunks = [[28, 1123, 30], [314, 2, 77, 1890, 4, 9, 11, 600, 42], [5, 6]]

    def run():
        cache = model.make_cache()
        model(ids, cache=cache)
        out = [f64(model(c, cache=cache))[0] for c in chunks]
        cache.free()
        return np.concatenate(out)

    _fused_unfused_mlx_agree(run)


@pytest.mark.parametrize("rows_isa", [i for i in ("avx2", "avx512vnni")
                                      if ck.has_avx2() and (i == "avx2" or ck.has_vnni())])
def test_smollm2_verification_logits_equal_one_token_steps(smollm2, rows_isa):
    """In the default (int16) mode a chunk of k + 1 positions over the cache
    (a speculative step's verification) gives bit for bit the logits of k + 1
    one-token steps, so greedy verification accepts exactly what plain
    decoding would emit."""
    model = smollm2.model
    ids = [smollm2.tokenizer.encode("The sea is a vast and mysterious realm",
                                    add_special_tokens=True)]
    chunk = [28, 1123, 30, 314, 2, 77, 1890, 4, 9]
    old = ck.activations()
    ck.set_activations("int16")
    ck.set_isa(rows_isa)
    try:
        c1, c2 = model.make_cache(), model.make_cache()
        model(ids, cache=c1)
        model(ids, cache=c2)
        together = f64(model([chunk], cache=c1))[0]
        one_by_one = np.stack([f64(model([[t]], cache=c2))[0, -1] for t in chunk])
        c1.free()
        c2.free()
    finally:
        ck.set_activations(old)
        ck.set_isa("avx512vnni")
    assert np.array_equal(together, one_by_one), np.abs(together - one_by_one).max()


class _PaddedBatch:
    """Prompts (lists of ids) as a left-padded batch, as the engine runs one:
    ids padded with 0, each row's padding hidden by the attention mask and its
    RoPE positions shifted back by its padding."""

    def __init__(self, prompts):
        self.n = max(map(len, prompts))
        self.pads = np.array([self.n - len(p) for p in prompts])
        self.ids = [[0] * (self.n - len(p)) + p for p in prompts]

    def mask(self, T):
        """[B, 1, 1, T]: False on each row's padding."""
        return np.arange(T)[None, None, None, :] >= self.pads[:, None, None, None]

    def prefill(self, model, cache):
        """The prompts' logits (float64), causal within the padding mask."""
        n = self.n
        causal = np.arange(n)[:, None] >= np.arange(n)[None, :]
        return f64(model(self.ids, cache=cache, offsets=-self.pads,
                         mask=np.broadcast_to(self.mask(n) & causal, (len(self.ids), 1, n, n))))

    def step(self, model, cache, tokens, T):
        """Logits (float64) of tokens [B, L] at padded positions T .. T + L - 1."""
        return f64(model(tokens, cache=cache, mask=self.mask(T + len(tokens[0])),
                         offsets=T - self.pads))


SMOL_BATCH = ("The sea is", "Write a story about a dragon who", "1, 2, 3,")


@pytest.mark.parametrize("caches", ["the model's", "KVCache"])
@pytest.mark.parametrize("model_type", ["gemma3_text", "mistral"])
def test_sliding_window_padded_batch_steps_match_unfused_and_mlx(tmp_path, model_type, caches):
    """A padded batch decoding past its sliding window (8 positions; Gemma 3:
    its sliding layers, Mistral: every layer) through the block primitives,
    against the same steps unfused and with MLX's ops; over the model's caches
    (rotating ones for the sliding layers) or a KVCache per layer (the window
    then a mask)."""
    pytest.importorskip("transformers")
    from tiny_models import make_tiny
    from mlxcy.models.cache import Cache, KVCache
    from mlxcy.models.load import load_model
    make_tiny(model_type, tmp_path, tokenizer=False)
    model = load_model(str(tmp_path))
    batch = _PaddedBatch([[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]])

    def run():
        cache = model.make_cache() if caches == "the model's" else \
            Cache([KVCache() for _ in range(len(model.make_cache()))])
        out = [batch.prefill(model, cache)[:, -1]]
        for T in range(batch.n, batch.n + 14):
            nxt = out[-1].argmax(-1)
            out.append(batch.step(model, cache, [[int(t)] for t in nxt], T)[:, -1])
        cache.free()
        return np.stack(out, 1)

    try:
        _fused_unfused_mlx_agree(run)
    finally:
        model.close()


def test_smollm2_padded_batch_verification_equals_one_token_steps(smollm2):
    """The same for a left-padded batch of three rows: a chunk of 9 positions
    per row (27 rows of x, more than one pass of the int16 kernels takes) gives
    bit for bit the logits of 9 one-token steps of the batch."""
    model = smollm2.model
    batch = _PaddedBatch([smollm2.tokenizer.encode(t, add_special_tokens=True)
                          for t in SMOL_BATCH])
    chunk = np.array([[28, 1123, 30, 314, 2, 77, 1890, 4, 9],
                      [5, 6, 7, 8, 9, 10, 11, 12, 13],
                      [600, 42, 11, 28, 30, 2, 4, 77, 9]])
    old = ck.activations()
    ck.set_activations("int16")
    try:
        c1, c2 = model.make_cache(), model.make_cache()
        batch.prefill(model, c1)
        batch.prefill(model, c2)
        together = batch.step(model, c1, chunk, batch.n)
        steps = [batch.step(model, c2, chunk[:, i:i + 1], batch.n + i)[:, 0] for i in range(9)]
        c1.free()
        c2.free()
    finally:
        ck.set_activations(old)
    one_by_one = np.stack(steps, 1)
    assert np.array_equal(together, one_by_one), np.abs(together - one_by_one).max()


def test_smollm2_fused_decode_steps_match_unfused_and_mlx(smollm2):
    """Real SmolLM2 decode steps (the block primitives) against the same steps
    with the blocks unfused and against MLX's own ops: logits within 1e-4."""
    ids = smollm2.tokenizer.encode("The sea is", add_special_tokens=True)
    model = smollm2.model
    _fused_unfused_mlx_agree(lambda: _decode_logits(model, ids, 8))


def test_smollm2_padded_batch_decode_steps_match_unfused_and_mlx(smollm2):
    """A left-padded batch of three prompts decoded step by step, then a chunk
    of 4 positions per row (a batched speculative verification); rows at their
    own RoPE offsets behind a padding mask: the block primitives when fused.
    Against the same steps unfused and with MLX's own ops."""
    model = smollm2.model
    batch = _PaddedBatch([smollm2.tokenizer.encode(t, add_special_tokens=True)
                          for t in SMOL_BATCH])

    def run():
        cache = model.make_cache()
        out = [batch.prefill(model, cache)[:, -1]]
        for T in range(batch.n, batch.n + 6):
            nxt = out[-1].argmax(-1)
            out.append(batch.step(model, cache, [[int(t)] for t in nxt], T)[:, -1])
        chunk = [[int(t), 28, 1123, 30] for t in out[-1].argmax(-1)]
        last = batch.step(model, cache, chunk, batch.n + 6)
        cache.free()
        return np.concatenate([np.stack(out, 1), last], 1)

    _fused_unfused_mlx_agree(run)


# ------------------------------------------------- K-quant GGUFs, repacked ---

KQUANT = {"gemma3": "gemma3_gguf", "qwen25": "qwen25_gguf"}


def _asset(name):
    from mlxcy import assets
    try:
        return str(getattr(assets, KQUANT[name])())
    except assets.AssetMissing as e:
        pytest.skip(f"asset not installed: {e}")


@pytest.mark.parametrize("name", list(KQUANT))
def test_kquant_repack_matches_gguf_dequantize(name):
    """Every K-quant type of the real Q4_K_M files, repacked into MLX's affine
    layout, against the `gguf` package's own dequantization (float32): exact
    for Q4_K and Q5_0, Q6_K (re-quantized to 8 bits) within 1/510 of its
    32-value groups' range."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize
    from mlxcy.models import gguf as G
    path = _asset(name)
    h = G.read_header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    seen = set()
    for tname, t in h.tensors.items():
        if t["type"] not in G.REPACK_TYPES or t["type"] in seen:
            continue
        seen.add(t["type"])
        rows = 48
        raw = np.asarray(G._tensor_bytes(mm, h, tname))
        raw = raw[: raw.size * rows // t["shape"][0]]
        w, s, b, bits = G._repack_kquant(raw, t["type"], (rows, t["shape"][1]))
        assert bits == G.REPACK_TYPES[t["type"]]
        # repacked in row chunks (as big tensors are): the same bits
        for x, y in zip((w, s, b), G._repack_kquant(raw, t["type"], (rows, t["shape"][1]),
                                                    chunk_rows=7)):
            np.testing.assert_array_equal(x, y)
        ours = unpack_bits_np(w, mlxcy.array(s), mlxcy.array(b), 32, bits)
        ref = np.asarray(dequantize(raw.reshape(rows, -1), GGMLQuantizationType(t["type"])),
                         np.float64)
        if t["type"] in G.REPACK_EXACT:
            np.testing.assert_array_equal(ours.astype(np.float32), ref.astype(np.float32))
        else:
            grp = ref.reshape(rows, -1, 32)
            span = (grp.max(-1) - grp.min(-1))[..., None]
            assert (np.abs(ours.reshape(rows, -1, 32) - grp) <= span / 510 + 1e-7).all()
    assert seen == {6, 12, 14}


@pytest.fixture(scope="module", params=list(KQUANT))
def kquant_model(request):
    from mlxcy.models.load import load_model
    path = _asset(request.param)
    old = mlxcy.default_device()
    mlxcy.set_default_device(mlxcy.cpu)
    try:
        model = load_model(path)
    finally:
        mlxcy.set_default_device(old)
    yield request.param, model
    model.close()


def test_kquant_model_loads_quantized_and_decodes_like_mlx(kquant_model):
    """Gemma-3 / Qwen2.5 Q4_K_M load in 4/5/8-bit layouts (not bf16), and their
    decode steps through the block primitives match the unfused kernels and
    MLX's own ops on the same weights: logits within 1e-4, same greedy ids."""
    name, model = kquant_model
    info = model.info()
    assert info["quantization"]["bits"] == 5 and info["dtype"] == "float32"
    ids = [2, 818, 5279, 529, 7001, 563] if name == "gemma3" else [750, 75698, 1445, 982, 262]
    _fused_unfused_mlx_agree(lambda: _decode_logits(model, ids, 6))


@pytest.mark.parametrize("value,ok", [("float32", True), ("int8", True), ("int4", False)])
def test_activations_from_the_environment(value, ok):
    """MLXCY_CPU_ACTIVATIONS sets the mode at import; a bad value is a
    ValueError naming the variable."""
    import subprocess
    import sys

    import subproc
    p = subprocess.run([sys.executable, "-c",
                        "import mlxcy.cpu_kernels as c; print(c.activations())"],
                       env=subproc.env(MLXCY_CPU_ACTIVATIONS=value), cwd=subproc.CWD,
                       capture_output=True, text=True, timeout=120, check=False)
    if ok:
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == value
    else:
        assert p.returncode != 0
        assert "MLXCY_CPU_ACTIVATIONS" in p.stderr and "'int4'" in p.stderr


def test_set_activations_rejects_unknown_modes():
    with pytest.raises(ValueError, match="set_activations: mode must be one of"):
        ck.set_activations("fp8")
    assert ck.activations() == "int16"
