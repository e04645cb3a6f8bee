"""mlxcy.train.optim against torch.optim (AdamW, Adam, SGD), closed-form
schedules, and torch's clip_grad_norm_."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mlxcy  # noqa: E402
from mlxcy.train.optim import (AdamW, Adam, SGD, clip_grad_norm, global_norm,  # noqa: E402
                               make_schedule, cosine_schedule, linear_schedule)

RNG = np.random.default_rng(0)
SHAPES = [(5, 3), (3, 7), (4,)]


def _run(ours, theirs, steps=6, lr_fn=None):
    p0 = [RNG.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[RNG.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(steps)]
    tp = [torch.nn.Parameter(torch.tensor(p)) for p in p0]
    topt = theirs(tp)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lr_fn) if lr_fn else None
    params = [mlxcy.array(p) for p in p0]
    for g in grads:
        params = ours.update(params, [mlxcy.array(x) for x in g])
        for p, x in zip(tp, g):
            p.grad = torch.tensor(x)
        topt.step()
        if sched:
            sched.step()
    for a, b in zip(params, tp):
        np.testing.assert_allclose(np.array(a), b.detach().numpy(), rtol=2e-5, atol=2e-6)
    return params


def test_adamw_matches_torch():
    _run(AdamW(1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
         lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1))


def test_adam_matches_torch():
    _run(Adam(3e-2), lambda p: torch.optim.Adam(p, lr=3e-2))


def test_adam_without_bias_correction_is_mlx_rule():
    mx = pytest.importorskip("mlx.core")
    import mlx.optimizers as mo
    p0 = [RNG.standard_normal(s).astype(np.float32) for s in SHAPES]
    g = [[RNG.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(4)]
    opt = Adam(1e-2, bias_correction=False)
    ref = mo.Adam(1e-2, bias_correction=False)
    ours = [mlxcy.array(p) for p in p0]
    theirs = {str(i): mx.array(p) for i, p in enumerate(p0)}
    for gs in g:
        ours = opt.update(ours, [mlxcy.array(x) for x in gs])
        theirs = ref.apply_gradients({str(i): mx.array(x) for i, x in enumerate(gs)}, theirs)
    for i, a in enumerate(ours):
        np.testing.assert_allclose(np.array(a), np.array(theirs[str(i)]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.3, weight_decay=0.01)])
def test_sgd_matches_torch(kw):
    _run(SGD(0.1, **kw), lambda p: torch.optim.SGD(p, lr=0.1, **kw))


def test_cosine_warmup_schedule_in_adamw_matches_torch_lambda():
    sched = make_schedule("cosine", 1e-2, steps=6, warmup=2, end=1e-3)
    _run(AdamW(sched, weight_decay=0.0), lambda p: torch.optim.AdamW(p, lr=1.0, weight_decay=0.0),
         lr_fn=lambda s: sched(s))


def test_schedules_closed_form():
    c = cosine_schedule(1.0, 10, end=0.1)
    assert c(0) == pytest.approx(1.0) and c(10) == pytest.approx(0.1) and c(20) == pytest.approx(0.1)
    assert c(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    lin = linear_schedule(2.0, 4, end=0.0, warmup=2, warmup_init=0.0)
    assert [lin(s) for s in range(7)] == pytest.approx([1.0, 2.0, 2.0, 1.5, 1.0, 0.5, 0.0])
    assert make_schedule("constant", 3e-4)(100) == 3e-4
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("exp", 1.0, 10)


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    g = [RNG.standard_normal(s).astype(np.float32) for s in SHAPES]
    out, norm = clip_grad_norm([mlxcy.array(x) for x in g], max_norm)
    tp = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    for p, x in zip(tp, g):
        p.grad = torch.tensor(x)
    tn = torch.nn.utils.clip_grad_norm_(tp, max_norm)
    assert norm.item() == pytest.approx(tn.item(), rel=1e-5)
    assert global_norm([mlxcy.array(x) for x in g]).item() == pytest.approx(tn.item(), rel=1e-5)
    for a, p in zip(out, tp):
        np.testing.assert_allclose(np.array(a), p.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_bf16_params_fp32_state():
    opt = AdamW(1e-2)
    p = [mlxcy.array(np.ones((4, 4), np.float32)).astype(mlxcy.bfloat16)]
    out = opt.update(p, [mlxcy.array(np.ones((4, 4), np.float32))])
    assert out[0].dtype == mlxcy.bfloat16
    st = opt.state_dict()
    assert st["step"] == 1 and st["m"][0].dtype == mlxcy.float32


def test_state_roundtrip_and_errors():
    p = [mlxcy.array(np.ones(3, np.float32))]
    g = [mlxcy.array(np.full(3, 0.5, np.float32))]
    a = AdamW(1e-1)
    a.update(p, g)
    b = AdamW(1e-1)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(np.array(a.update(p, g)[0]), np.array(b.update(p, g)[0]))
    with pytest.raises(ValueError, match="gradients"):
        a.update(p, g + g)
    with pytest.raises(ValueError, match="shape"):
        a.update(p, [mlxcy.array(np.ones(4, np.float32))])
    with pytest.raises(ValueError, match="learning_rate"):
        AdamW(-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(0.1, nesterov=True)
