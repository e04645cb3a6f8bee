"""LoRA training: gradients against PyTorch (same model in transformers, the
same LoRA math attached by hooks), checkpointing, memorization, adapter
save/load (ours and mlx-lm's), merge/fuse, resume, bf16 vs fp32, and a few
steps on SmolLM2-135M."""
import gc
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import mlxcy  # noqa: E402
from mlxcy.models.load import load_model  # noqa: E402
from mlxcy.train.lora import LoRA, TrainStep, make_batch_arrays  # noqa: E402
from mlxcy.train.optim import AdamW, SGD  # noqa: E402
from mlxcy.train.adapters import save_adapters, fuse_model  # noqa: E402

from tiny_models import save_tokenizer, rel, VOCAB  # noqa: E402
from lora_refs import KEYS3, batch as _batch, central_difference, logits_with_adapters, \
    lora as lora_math, save_mlx_lm_adapters, torch_grads  # noqa: E402



def _hf(path, layers=2, seed=0, **kw):
    """A random tiny llama (with non-trivial norms) saved to path; returns it."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, **kw)
    m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn_like(p) * 0.1 + 1.0)
    m.eval()
    m.save_pretrained(str(path))
    save_tokenizer(path)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_tiny")
    return d, _hf(d)


def _rand_params(lora, seed=3, scale_b=0.05):
    rng = np.random.default_rng(seed)
    w = {}
    for k, a in lora.parameters().items():
        s = 0.1 if k.endswith("lora_a") else scale_b
        w[k] = mlxcy.array((rng.standard_normal(a.shape) * s).astype(np.float32))
    lora.set_parameters(w)
    return {k: np.array(v) for k, v in w.items()}


@pytest.mark.parametrize("checkpoint", [False, True])
def test_grads_match_pytorch(tiny, checkpoint):
    d, hf = tiny
    model = load_model(d)
    lora = LoRA(model, rank=4, scale=2.0, keys=KEYS3, num_layers=2)
    params = _rand_params(lora)
    ids, off, ln = _batch()
    loss, ntoks, grads = TrainStep(lora, None, grad_checkpoint=checkpoint).value_and_grad(
        ids, off, ln)
    tl, tg = torch_grads(hf, params, lora_math(2.0), KEYS3, ids, off, ln, 2)
    assert int(ntoks.item()) == int(make_batch_arrays(ids, off, ln)[2].sum())
    assert abs(loss.item() - tl) / abs(tl) < 1e-5
    for name, g in zip(lora.parameter_names(), grads):
        assert np.abs(tg[name]).max() > 0
        assert rel(np.array(g), tg[name]) < 1e-4, name
    model.close()


def test_grads_match_finite_differences(tiny):
    d, _ = tiny
    model = load_model(d)
    lora = LoRA(model, rank=2, scale=1.0, keys=["v_proj"], num_layers=1)
    params = _rand_params(lora, scale_b=0.2)
    ids, off, ln = _batch(B=2, T=8)
    step = TrainStep(lora, None)
    _, _, grads = step.value_and_grad(ids, off, ln)
    name = lora.parameter_names()[1]          # lora_b of the top layer
    g = np.array(grads[1])
    base = params[name].astype(np.float64)
    rng = np.random.default_rng(0)
    for _ in range(4):
        idx = tuple(rng.integers(0, s) for s in base.shape)
        fd = central_difference(step, lora, name, base, idx, ids, off, ln)
        assert abs(fd - g[idx]) <= 2e-3 * max(1.0, abs(fd)), (idx, fd, g[idx])
    model.close()


def test_checkpoint_same_grads_lower_peak(tmp_path):
    from mlxcy.memory import reset_peak_memory, get_peak_memory, clear_cache
    _hf(tmp_path, layers=6)
    model = load_model(tmp_path)
    lora = LoRA(model, rank=4, keys=["q_proj", "v_proj"], num_layers=-1)
    _rand_params(lora)
    ids = np.random.default_rng(0).integers(0, VOCAB, (8, 129)).astype(np.int32)
    out = {}
    for ck in (False, True):
        step = TrainStep(lora, None, grad_checkpoint=ck)
        step.value_and_grad(ids)          # warm-up
        gc.collect()
        clear_cache()
        reset_peak_memory()
        loss, _, g = step.value_and_grad(ids)
        out[ck] = (get_peak_memory(), loss.item(), [np.array(x) for x in g])
    assert out[True][1] == pytest.approx(out[False][1], rel=1e-6)
    for a, b in zip(out[False][2], out[True][2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # On the CPU buffers return to the pool as soon as their last user ran.
    # MLX's CUDA backend returns them when the GPU has finished the batch of
    # kernels holding them, so with activations this small the peak there
    # mostly measures those batches: checkpointing must still lower it.
    # (Larger models on the GPU: benchmarks/bench_lora.py --grad-checkpoint.)
    from mlxcy.device import default_device
    factor = 0.8 if default_device().type == "cpu" else 1.0
    assert out[True][0] < out[False][0] * factor, (out[True][0], out[False][0])
    model.close()


def test_lora_forward_matches_manual_and_dropout(tiny):
    d, _ = tiny
    model = load_model(d)
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 10)).astype(np.int32)
    base = np.array(model(ids))
    lora = LoRA(model, rank=4, keys=["q_proj"], num_layers=1, dropout=0.5)
    np.testing.assert_array_equal(np.array(model(ids)), base)        # B = 0 at init
    _rand_params(lora)
    ev = np.array(model(ids))
    assert rel(ev, base) > 1e-4
    np.testing.assert_array_equal(np.array(model(ids)), ev)           # eval: no dropout
    lora.train(True)
    assert rel(np.array(model(ids)), ev) > 1e-6                       # dropout active
    lora.eval()
    lora.remove()
    np.testing.assert_array_equal(np.array(model(ids)), base)
    model.close()


def test_errors(tiny):
    d, _ = tiny
    model = load_model(d)
    with pytest.raises(ValueError, match="unknown target module 'qq_proj'"):
        LoRA(model, keys=["qq_proj"])
    with pytest.raises(ValueError, match="num_layers 5 exceeds"):
        LoRA(model, num_layers=5)
    with pytest.raises(ValueError, match="rank"):
        LoRA(model, rank=0)
    lora = LoRA(model, num_layers=1, dropout=0.1)
    with pytest.raises(ValueError, match="already has an adapter"):
        LoRA(model, num_layers=1)
    with pytest.raises(ValueError, match="dropout"):
        TrainStep(lora, None, grad_checkpoint=True)
    with pytest.raises(ValueError, match="not an adapter parameter"):
        lora.set_parameters({"model.layers.0.self_attn.q_proj.lora_a": mlxcy.zeros((64, 8))})
    with pytest.raises(ValueError, match="shape"):
        lora.set_parameters({"model.layers.1.self_attn.q_proj.lora_a": mlxcy.zeros((64, 3))},
                            strict=False)
    with pytest.raises(ValueError, match="vocabulary"):
        TrainStep(lora, AdamW(1e-3)).step(np.array([[1, 2, VOCAB + 5]]))
    model.close()


def _greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.array(model(np.array([ids], np.int32)))[0, -1].argmax()))
    return ids


def test_memorization(tmp_path):
    # wider init than HF's 0.02: a 64-wide head with tiny weights cannot reach
    # confident logits whatever the adapters do
    _hf(tmp_path, initializer_range=0.3)
    model = load_model(tmp_path)
    text = [2, 17, 40, 33, 5, 60, 81, 9, 12, 71, 44, 3, 90, 27]
    assert _greedy(model, text[:2], len(text) - 2) != text
    lora = LoRA(model, rank=8, scale=2.0, keys=["q_proj", "k_proj", "v_proj", "o_proj",
                                                "gate_proj", "up_proj", "down_proj"],
                num_layers=-1)
    step = TrainStep(lora, AdamW(2e-2, weight_decay=0.0))
    losses = [step.step(np.array([text], np.int32))[0] for _ in range(60)]
    assert losses[-1] < 0.01 * losses[0]
    lora.eval()
    assert _greedy(model, text[:2], len(text) - 2) == text
    model.close()


def test_grad_accum_equals_mean_of_grads(tiny):
    d, _ = tiny
    ids1, off1, ln1 = _batch(seed=4)
    ids2, off2, ln2 = _batch(seed=5)
    res = []
    for mode in ("accum", "manual"):
        model = load_model(d)
        lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2)
        _rand_params(lora)
        if mode == "accum":
            st = TrainStep(lora, SGD(0.5), grad_accum=2)
            assert st.step(ids1, off1, ln1)[2] is False
            assert st.step(ids2, off2, ln2)[2] is True
        else:
            st = TrainStep(lora, None)
            g1 = st.value_and_grad(ids1, off1, ln1)[2]
            g2 = st.value_and_grad(ids2, off2, ln2)[2]
            p = lora.parameter_list()
            new = [np.array(a) - 0.5 * (np.array(x) + np.array(y)) / 2
                   for a, x, y in zip(p, g1, g2)]
            lora.set_parameters(dict(zip(lora.parameter_names(),
                                         [mlxcy.array(x.astype(np.float32)) for x in new])))
        res.append([np.array(a) for a in lora.parameter_list()])
        model.close()
    for a, b in zip(*res):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_clip_in_step_scales_by_the_global_norm(tiny):
    d, _ = tiny
    model = load_model(d)
    lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2)
    _rand_params(lora)
    ids, off, ln = _batch()
    g = [np.array(x) for x in TrainStep(lora, None).value_and_grad(ids, off, ln)[2]]
    p0 = [np.array(a) for a in lora.parameter_list()]
    st = TrainStep(lora, SGD(1.0), clip_grad_norm=1e-3)
    st.step(ids, off, ln)
    norm = math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g))
    assert st.last_grad_norm == pytest.approx(norm, rel=1e-4)
    coef = min(1.0, 1e-3 / (norm + 1e-6))
    for a, b, x in zip(lora.parameter_list(), p0, g):
        np.testing.assert_allclose(np.array(a), b - coef * x, rtol=1e-5, atol=1e-7)
    model.close()


def test_save_load_identical_logits(tiny, tmp_path):
    d, _ = tiny
    ids = np.random.default_rng(7).integers(0, VOCAB, (2, 9)).astype(np.int32)
    model = load_model(d)
    lora = LoRA(model, rank=4, keys=KEYS3, num_layers=1)
    _rand_params(lora)
    want = np.array(model(ids))
    save_adapters(lora, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 1
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj",
                                              "mlp.down_proj"]
    model.close()
    np.testing.assert_array_equal(logits_with_adapters(d, tmp_path / "ad", ids), want)


def test_mlx_lm_loads_ours_and_we_load_theirs(tiny, tmp_path):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.utils import linear_to_lora_layers
    d, _ = tiny
    ids = np.random.default_rng(8).integers(0, VOCAB, (1, 11)).astype(np.int32)
    model = load_model(d)
    lora = LoRA(model, rank=4, scale=3.0, keys=KEYS3, num_layers=1)
    _rand_params(lora)
    ours = np.array(model(ids))
    save_adapters(lora, tmp_path / "ours")
    model.close()
    ref, _ = mlx_lm.load(str(d), adapter_path=str(tmp_path / "ours"))
    theirs = np.array(ref(mx.array(ids)).astype(mx.float32))
    assert rel(ours, theirs) < 1e-4

    # mlx-lm's adapters (its own init + random B) -> ours
    ref, _ = mlx_lm.load(str(d))
    ref.freeze()
    linear_to_lora_layers(ref, 2, {"rank": 2, "scale": 5.0, "dropout": 0.0,
                                   "keys": ["self_attn.k_proj", "mlp.up_proj"]})
    from mlx.utils import tree_flatten
    rng = np.random.default_rng(9)
    upd = []
    for k, v in tree_flatten(ref.trainable_parameters()):
        upd.append((k, mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.05)))
    ref.load_weights(upd, strict=False)
    save_mlx_lm_adapters(tmp_path / "theirs", upd, {
        "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": 2, "scale": 5.0, "dropout": 0.0,
                            "keys": ["self_attn.k_proj", "mlp.up_proj"]}})
    want = np.array(ref(mx.array(ids)).astype(mx.float32))
    assert rel(logits_with_adapters(d, tmp_path / "theirs", ids), want) < 1e-4


def test_merge_unmerge_and_fuse_float(tiny, tmp_path):
    d, _ = tiny
    ids = np.random.default_rng(10).integers(0, VOCAB, (1, 10)).astype(np.int32)
    model = load_model(d)
    base = np.array(model(ids))
    lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2)
    _rand_params(lora)
    want = np.array(model(ids))
    lora.merge()
    assert rel(np.array(model(ids)), want) < 1e-5
    lora.unmerge()
    np.testing.assert_array_equal(np.array(model(ids)), want)
    save_adapters(lora, tmp_path / "ad")
    model.close()
    fuse_model(d, tmp_path / "ad", tmp_path / "fused")
    fused = load_model(tmp_path / "fused")
    assert rel(np.array(fused(ids)), want) < 1e-5
    assert rel(np.array(fused(ids)), base) > 1e-3
    fused.close()


def test_fuse_quantized_base(tiny, tmp_path):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert
    d, _ = tiny
    q = tmp_path / "q"
    convert(str(d), str(q), quantize=True, q_group_size=32, q_bits=8)
    ids = np.random.default_rng(11).integers(0, VOCAB, (1, 10)).astype(np.int32)
    model = load_model(q)
    lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2)
    _rand_params(lora)
    want = np.array(model(ids))
    save_adapters(lora, tmp_path / "ad")
    # mlx-lm reads our adapters on its quantized model too
    ref, _ = mlx_lm.load(str(q), adapter_path=str(tmp_path / "ad"))
    assert rel(want, np.array(ref(mx.array(ids)).astype(mx.float32))) < 1e-4
    model.close()
    fuse_model(q, tmp_path / "ad", tmp_path / "fq")
    cfg = json.loads((tmp_path / "fq" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8
    fq = load_model(tmp_path / "fq")
    assert fq.info()["quantization"]["bits"] == 8
    assert rel(np.array(fq(ids)), want) < 2e-2          # requantized: 8-bit error only
    fq.close()
    fuse_model(q, tmp_path / "ad", tmp_path / "fd", dequantize=True)
    fd = load_model(tmp_path / "fd")
    assert fd.info()["quantization"] is None
    assert rel(np.array(fd(ids)), want) < 1e-4
    fd.close()


def _run(d, dtype, steps, seed=0):
    model = load_model(d, dtype=dtype)
    lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2, seed=seed)
    step = TrainStep(lora, AdamW(5e-3))
    rng = np.random.default_rng(0)
    data = rng.integers(0, VOCAB, (4, 2, 16)).astype(np.int32)
    losses = [step.step(data[i % 4])[0] for i in range(steps)]
    model.close()
    return losses


def test_bf16_tracks_fp32(tiny):
    d, _ = tiny
    f32 = _run(d, None, 12)
    b16 = _run(d, "bfloat16", 12)
    assert b16[-1] < b16[0]
    np.testing.assert_allclose(b16, f32, rtol=3e-2)


def test_resume_gives_identical_adapters(tiny, tmp_path):
    from mlxcy.train.data import Dataset
    from mlxcy.train.trainer import TrainConfig, train
    d, _ = tiny

    class Tok:
        eos_id, bos_id = 1, 2

        def encode(self, text, add_special_tokens=True):
            return [int(w[1:]) for w in text.split()]
    rng = np.random.default_rng(0)
    rows = [(i + 1, {"text": " ".join(f"t{x}" for x in rng.integers(3, VOCAB, rng.integers(5, 20)))})
            for i in range(12)]
    ds = Dataset(rows, Tok())
    logs = []

    def run(path, iters, resume=False):
        model = load_model(d)
        lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2)
        cfg = TrainConfig(iters=iters, batch_size=2, learning_rate=1e-2, save_every=3,
                          steps_per_eval=0, steps_per_report=1, adapter_path=str(path))
        train(model, lora, ds, ds, cfg, report=logs.append, resume=resume)
        out = [np.array(a) for a in lora.parameter_list()]
        model.close()
        return out
    full = run(tmp_path / "a", 6)
    run(tmp_path / "b", 3)
    resumed = run(tmp_path / "b", 6, resume=True)
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a, b)
    assert (tmp_path / "a" / "0000003_adapters.safetensors").is_file()
    assert any("val loss" in s for s in logs) and any("tokens/s" in s for s in logs)


@pytest.mark.slow
def test_smollm2_loss_falls():
    from mlxcy.assets import smollm2_gguf
    from mlxcy.tokenizer import Tokenizer
    path = smollm2_gguf()     # a missing asset skips (tests/conftest.py)
    model = load_model(path)
    tok = Tokenizer.load(path)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = np.array([tok.encode(text)[:32]], np.int32)
    lora = LoRA(model, rank=8, keys=["q_proj", "v_proj"], num_layers=8)
    step = TrainStep(lora, AdamW(1e-3))
    losses = [step.step(ids)[0] for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses
    model.close()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_compiled_step_equals_uncompiled(tiny, checkpoint):
    """The compiled loss/gradient function (the default) traces once per batch
    shape and gives the uncompiled step's loss, gradients and AdamW updates."""
    d, _ = tiny
    model = load_model(d)
    lora = LoRA(model, rank=4, scale=2.0, keys=KEYS3, num_layers=2)
    params = _rand_params(lora)
    steps = {c: TrainStep(lora, AdamW(1e-2), grad_checkpoint=checkpoint, compile=c)
             for c in (True, False)}
    assert steps[True].compile and not steps[False].compile
    for seed, T in ((1, 14), (2, 9), (3, 14)):        # a new shape, then the first again
        ids, off, ln = _batch(seed, T=T)
        res = {c: s.value_and_grad(ids, off, ln) for c, s in steps.items()}
        assert abs(res[True][0].item() - res[False][0].item()) <= 1e-6 * abs(res[False][0].item())
        assert res[True][1].item() == res[False][1].item()
        for g1, g0 in zip(res[True][2], res[False][2]):
            assert rel(np.array(g1), np.array(g0)) < 1e-5
    # The update through step(): eps large enough that Adam's update is smooth in
    # the gradient.  With eps=1e-8 the first update is ~lr * sign(g), and the
    # elements whose gradient is ~1e-8 turn the ~1e-6 relative rounding
    # differences between compiled and separate GPU kernels into 2.6e-5
    # relative differences of the parameters (an H200).
    steps = {c: TrainStep(lora, AdamW(1e-2, eps=1e-3), grad_checkpoint=checkpoint, compile=c)
             for c in (True, False)}
    after = {}
    for c, s in steps.items():
        lora.set_parameters({k: mlxcy.array(v) for k, v in params.items()})
        s.step(*_batch(4))
        after[c] = {k: np.array(v) for k, v in lora.parameters().items()}
    for k in after[True]:
        assert rel(after[True][k], after[False][k]) < 1e-5, k
    lora.remove()
    assert TrainStep(LoRA(model, rank=2, dropout=0.1, keys=KEYS3, num_layers=1),
                     AdamW(1e-3)).compile is False         # dropout: never compiled
    model.close()


def test_memory_limit_gives_the_same_step_and_restores_mlx_limit(tiny, monkeypatch):
    """TrainStep's memory_limit only changes how far MLX encodes ahead of the
    device: the same losses and gradients bit for bit, MLX's own limit as it
    was after each call, and "auto" measures each (call, batch shape) once."""
    import mlxcy.train.lora as lora_mod
    from mlxcy.memory import get_memory_limit
    monkeypatch.setattr(lora_mod, "AUTO_ON_CPU", True)     # "auto" is GPU-only otherwise
    d, _ = tiny
    model = load_model(d)
    lora = LoRA(model, rank=4, scale=2.0, keys=KEYS3, num_layers=2)
    _rand_params(lora)
    before = get_memory_limit()
    steps = {m: TrainStep(lora, AdamW(1e-2), memory_limit=m) for m in (None, "auto", 1)}
    assert TrainStep(lora, None, memory_limit=np.int64(5)).memory_limit == 5
    res = {}
    for m, s in steps.items():
        res[m] = [s.value_and_grad(*_batch(seed, T=T)) for seed, T in ((1, 14), (2, 9), (3, 14))]
        assert get_memory_limit() == before
    for m in ("auto", 1):
        for (l1, n1, g1), (l0, n0, g0) in zip(res[m], res[None]):
            assert l1.item() == l0.item() and n1.item() == n0.item()
            for a, b in zip(g1, g0):
                assert np.array_equal(np.array(a), np.array(b))
    live = steps["auto"].live_bytes
    assert sorted(live) == [("grad", (3, 8)), ("grad", (3, 13))]
    assert all(v > 0 for v in live.values())
    assert steps[None].live_bytes == {} and steps[1].live_bytes == {}
    steps["auto"].step(*_batch(4))
    assert ("step", (3, 13)) in live and get_memory_limit() == before
    monkeypatch.setattr(lora_mod, "AUTO_ON_CPU", False)
    dflt = TrainStep(lora, AdamW(1e-2))
    dflt.value_and_grad(*_batch(1))
    assert dflt.memory_limit == "auto" and dflt.memory_margin == 0.0
    on_gpu = mlxcy.default_device().type != "cpu"
    assert bool(dflt.live_bytes) == on_gpu          # "auto" leaves the CPU alone
    for bad in ("big", 0, -5, 1.5, True):
        with pytest.raises(ValueError, match="memory_limit"):
            TrainStep(lora, AdamW(1e-2), memory_limit=bad)
    with pytest.raises(ValueError, match="memory_margin"):
        TrainStep(lora, AdamW(1e-2), memory_margin=-0.1)
    model.close()


@pytest.mark.parametrize("field,value", [
    ("iters", 0), ("batch_size", 0), ("batch_size", 2.0), ("steps_per_report", 0),
    ("steps_per_eval", -1), ("save_every", -1), ("val_batches", -2), ("max_seq_length", 1),
    ("learning_rate", float("nan")), ("learning_rate", -1e-3), ("min_lr", float("inf")),
    ("clip_grad_norm", -1.0), ("momentum", float("nan")), ("betas", (0.9, 1.0)),
    ("grad_accum", 0), ("warmup", -1), ("pad_to", 0), ("weight_decay", -0.1)])
def test_train_config_checks_each_field(field, value):
    from mlxcy.train.trainer import TrainConfig
    TrainConfig().check()
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{field: value}).check()


def test_lora_scale_must_be_finite(tiny):
    with load_model(tiny[0]) as model, pytest.raises(ValueError, match="scale must be finite"):
        LoRA(model, rank=2, scale=float("inf"), num_layers=1)
