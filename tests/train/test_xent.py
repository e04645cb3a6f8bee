"""The training loss (mlxcy.train.lora.cross_entropy, include/mlxcy/xent.h):
masked next-token cross-entropy and its hand-written gradient against a
float64 numpy reference, in float32 and bfloat16, with a vocabulary large
enough that the float32 log-sum-exp runs in row chunks."""
import numpy as np
import pytest

import mlxcy as mx
from mlxcy.train.lora import cross_entropy


def _ref(logits, targets, mask):
    """(loss, d loss / d logits) in float64."""
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    tgt = np.take_along_axis(z, targets[..., None], -1)[..., 0]
    n = max(mask.sum(), 1.0)
    loss = ((lse - tgt) * mask).sum() / n
    p = np.exp(z - lse[..., None])
    np.put_along_axis(p, targets[..., None], np.take_along_axis(p, targets[..., None], -1) - 1, -1)
    return loss, p * (mask / n)[..., None]


def _case(B, L, V, seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, L, V)) * 3).astype(np.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    mask = (rng.random((B, L)) < 0.8).astype(np.float32)
    return logits, targets, mask


def _ours(logits, targets, mask, dtype):
    lg = mx.array(logits).astype(dtype)
    t, m = mx.array(targets), mx.array(mask)
    loss, n = cross_entropy(lg, t, m)
    g = mx.grad(lambda z: cross_entropy(z, t, m)[0])(lg)
    return float(loss.item()), int(n.item()), np.asarray(g.astype(mx.float32))


# MLX's float32 log-sum-exp over 65,536 terms is itself only ~1e-4 accurate
# (a float32 running sum); over 11 terms it is exact to rounding.
@pytest.mark.parametrize("shape,tol", [((2, 5, 11), 1e-5), ((1, 300, 65536), 3e-4)])
def test_float32_matches_numpy(shape, tol):
    logits, targets, mask = _case(*shape)
    loss, n, g = _ours(logits, targets, mask, mx.float32)
    rloss, rg = _ref(logits, targets, mask)
    assert n == int(mask.sum())
    assert abs(loss - rloss) <= tol * abs(rloss)
    assert np.abs(g - rg).max() <= tol * np.abs(rg).max()


def test_bfloat16_chunked_lse_is_float32_accurate():
    # 300 rows x 65,536 columns: the float32 log-sum-exp runs in chunks of 256 rows.
    logits, targets, mask = _case(1, 300, 65536, seed=1)
    as_bf16 = np.asarray(mx.array(logits).astype(mx.bfloat16).astype(mx.float32))
    loss, n, g = _ours(logits, targets, mask, mx.bfloat16)
    rloss, rg = _ref(as_bf16, targets, mask)     # the same bf16 inputs, float64 math
    assert n == int(mask.sum())
    # The loss is float32 arithmetic on exact bf16 inputs: no bf16 rounding of the
    # log-sum-exp (that alone would be off by up to 0.03 at these magnitudes).
    assert abs(loss - rloss) <= 3e-4 * abs(rloss)
    # The gradient is rounded to bf16 once, at the end.
    assert np.abs(g - rg).max() <= 2 ** -8 * np.abs(rg).max()
    # Single tokens (one in each chunk): the per-token loss itself is float32-exact.
    lg, t = mx.array(logits).astype(mx.bfloat16), mx.array(targets)
    for row in (3, 255, 299):
        one = np.zeros_like(mask)
        one[0, row] = 1
        ours = float(cross_entropy(lg, t, mx.array(one))[0].item())
        assert abs(ours - _ref(as_bf16, targets, one)[0]) < 2e-4


def test_gradient_dtype_and_masked_rows():
    logits, targets, mask = _case(2, 4, 7, seed=2)
    mask[0] = 0
    lg = mx.array(logits).astype(mx.bfloat16)
    t, m = mx.array(targets), mx.array(mask)
    g = mx.grad(lambda z: cross_entropy(z, t, m)[0])(lg)
    assert g.dtype == mx.bfloat16 and g.shape == (2, 4, 7)
    gn = np.asarray(g.astype(mx.float32))
    assert not gn[0].any()                       # masked positions get no gradient
    assert np.allclose(gn[1].sum(-1), 0, atol=1e-2)   # softmax - onehot sums to 0


def test_all_masked_gives_zero_loss():
    logits, targets, mask = _case(1, 3, 5)
    loss, n, g = _ours(logits, targets, np.zeros_like(mask), mx.float32)
    assert loss == 0.0 and n == 0 and not g.any()


def test_bad_shapes_raise():
    with pytest.raises(Exception, match="token_xent"):
        cross_entropy(mx.zeros((2, 3, 5)), mx.zeros((2, 4), dtype=mx.int32), mx.ones((2, 4)))
