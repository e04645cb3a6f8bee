"""DoRA and full fine-tuning (mlxcy.train.lora.LoRA(fine_tune_type=...)):
gradients against PyTorch (the same math on the Hugging Face model) and finite
differences, adapters read and written in mlx-lm's format (logits against
mlx_lm.load(adapter_path=...) both ways), fusing, and `mlxcy lora
--fine-tune-type dora|full` end to end."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import mlxcy  # noqa: E402
from mlxcy.models.load import load_model  # noqa: E402
from mlxcy.train.lora import LoRA, TrainStep, make_batch_arrays  # noqa: E402
from mlxcy.train.optim import AdamW  # noqa: E402
from mlxcy.train.adapters import save_adapters, load_adapters, fuse_model  # noqa: E402

from tiny_models import make_tiny, rel, VOCAB  # noqa: E402

KEYS3 = ["q_proj", "v_proj", "down_proj"]
FULL = {"q_proj": "self_attn.q_proj", "v_proj": "self_attn.v_proj", "down_proj": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dora_tiny")
    return d, make_tiny("llama", d)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    d = tmp_path_factory.mktemp("full_gemma")
    return d, make_tiny("gemma3_text", d)


def _perturb(lora, seed=3, s=0.05):
    """Every parameter moved by N(0, s): B != 0 and m != ||W|| for DoRA."""
    rng = np.random.default_rng(seed)
    w = {k: mlxcy.array((np.array(v) + rng.standard_normal(v.shape) * s).astype(np.float32))
         for k, v in lora.parameters().items()}
    lora.set_parameters(w)
    return {k: np.array(v) for k, v in w.items()}


def _batch(seed=1, B=3, T=14):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (B, T)).astype(np.int32)
    off = np.array([0, 3, 5][:B], np.int32)
    ln = np.array([T, T - 4, T - 2][:B], np.int32)
    return ids, off, ln


def _torch_loss(hf, ids, off, ln):
    x, y, mask = make_batch_arrays(ids, off, ln)
    logits = hf(torch.tensor(x, dtype=torch.long)).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(y, dtype=torch.long).reshape(-1),
                                           reduction="none").reshape(y.shape)
    m = torch.tensor(mask)
    return (ce * m).sum() / m.sum()


def _torch_dora_grads(hf, params, scale, ids, off, ln, nlayers):
    """DoRA written out in PyTorch as mlx-lm's DoRALinear (hooks on the HF layers):
    out = m / ||W + s (A B).T||_row (no gradient through the norm) * (W x + s x A B)."""
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    hooks = []
    L = hf.config.num_hidden_layers
    for i in range(L - nlayers, L):
        for key in KEYS3:
            mod = hf.model.layers[i].get_submodule(FULL[key])
            p = f"model.layers.{i}.{FULL[key]}."
            a, b, m = tp[p + "lora_a"], tp[p + "lora_b"], tp[p + "m"]

            def hook(mod, inp, out, a=a, b=b, m=m):
                adapted = mod.weight + scale * (a @ b).T
                g = m / torch.linalg.norm(adapted, dim=1).detach()
                return g * (out + scale * ((inp[0] @ a) @ b))
            hooks.append(mod.register_forward_hook(hook))
    try:
        loss = _torch_loss(hf, ids, off, ln)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return loss.item(), {k: v.grad.numpy() for k, v in tp.items()}


@pytest.mark.parametrize("checkpoint", [False, True])
def test_dora_grads_match_pytorch(tiny, checkpoint):
    d, hf = tiny
    model = load_model(d)
    lora = LoRA(model, rank=4, scale=2.0, keys=KEYS3, num_layers=2, fine_tune_type="dora")
    assert lora.parameter_names()[:3] == ["model.layers.0.self_attn.q_proj.lora_a",
                                          "model.layers.0.self_attn.q_proj.lora_b",
                                          "model.layers.0.self_attn.q_proj.m"]
    params = _perturb(lora)
    ids, off, ln = _batch()
    loss, _, grads = TrainStep(lora, None, grad_checkpoint=checkpoint).value_and_grad(
        ids, off, ln)
    tl, tg = _torch_dora_grads(hf, params, 2.0, ids, off, ln, 2)
    assert abs(loss.item() - tl) / abs(tl) < 1e-5
    for name, g in zip(lora.parameter_names(), grads):
        assert np.abs(tg[name]).max() > 0, name
        assert rel(np.array(g), tg[name]) < 1e-4, name
    model.close()


def test_dora_grad_of_m_matches_finite_differences(tiny):
    d, _ = tiny
    model = load_model(d)
    lora = LoRA(model, rank=2, scale=1.0, keys=["v_proj"], num_layers=1, fine_tune_type="dora")
    params = _perturb(lora, s=0.1)
    ids, off, ln = _batch(B=2, T=8)
    step = TrainStep(lora, None)
    _, _, grads = step.value_and_grad(ids, off, ln)
    # m only: the norm is held constant in DoRA's gradient (stop_gradient), so
    # A's and B's gradients are not the loss's derivative (PyTorch checks those)
    for which in (2,):
        name = lora.parameter_names()[which]
        g = np.array(grads[which])
        base = params[name].astype(np.float64)
        rng = np.random.default_rng(which)
        for _ in range(3):
            idx = tuple(rng.integers(0, s) for s in base.shape)
            vals = []
            for sgn in (1, -1):
                p = base.copy()
                p[idx] += sgn * 1e-2
                lora.set_parameters({name: mlxcy.array(p.astype(np.float32))}, strict=False)
                vals.append(step.evaluate(ids, off, ln))
            lora.set_parameters({name: mlxcy.array(base.astype(np.float32))}, strict=False)
            fd = (vals[0][0] / vals[0][1] - vals[1][0] / vals[1][1]) / 2e-2
            assert abs(fd - g[idx]) <= 3e-3 * max(1.0, abs(fd)), (name, idx, fd, g[idx])
    model.close()


def test_full_grads_match_pytorch(tiny):
    d, hf = tiny
    model = load_model(d)
    lora = LoRA(model, num_layers=1, fine_tune_type="full")
    names = lora.parameter_names()
    hf_params = dict(hf.named_parameters())
    assert set(names) == {k for k in hf_params if k.startswith("model.layers.1.")}
    ids, off, ln = _batch()
    loss, _, grads = TrainStep(lora, None).value_and_grad(ids, off, ln)
    hf.zero_grad()
    tl = _torch_loss(hf, ids, off, ln)
    tl.backward()
    assert abs(loss.item() - tl.item()) / tl.item() < 1e-5
    for name, g in zip(names, grads):
        assert rel(np.array(g), hf_params[name].grad.numpy()) < 1e-4, name
    hf.zero_grad()
    model.close()


@pytest.mark.parametrize("ft", ["dora", "full"])
def test_training_lowers_the_loss(tiny, ft):
    d, _ = tiny
    model = load_model(d)
    lora = LoRA(model, rank=4, scale=2.0, keys=KEYS3, num_layers=2, fine_tune_type=ft)
    step = TrainStep(lora, AdamW(1e-2))
    ids = np.tile(np.arange(16, dtype=np.int32) % VOCAB, (2, 1))
    first = step.evaluate(ids)
    for _ in range(15):
        step(ids)
    last = step.evaluate(ids)
    assert last[0] / last[1] < first[0] / first[1] - 0.3      # nats per token
    model.close()


def _mlx_lm_logits(d, adapter_path, ids):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    ref, _ = mlx_lm.load(str(d), adapter_path=str(adapter_path) if adapter_path else None)
    return np.array(ref(mx.array(ids)).astype(mx.float32))


@pytest.mark.parametrize("ft", ["dora", "full"])
def test_mlx_lm_loads_ours(tiny, tmp_path, ft):
    d, _ = tiny
    ids = np.random.default_rng(8).integers(0, VOCAB, (1, 11)).astype(np.int32)
    model = load_model(d)
    base = np.array(model(ids))
    lora = LoRA(model, rank=4, scale=3.0, keys=KEYS3, num_layers=1, fine_tune_type=ft)
    np.testing.assert_array_equal(np.array(model(ids)), base)    # B = 0, m = ||W||
    _perturb(lora)
    ours = np.array(model(ids))
    assert rel(ours, base) > 1e-2
    save_adapters(lora, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == ft and cfg["num_layers"] == 1
    model.close()
    assert rel(ours, _mlx_lm_logits(d, tmp_path / "ad", ids)) < 1e-5
    m2 = load_model(d)
    l2 = load_adapters(m2, tmp_path / "ad")
    assert l2.fine_tune_type == ft
    np.testing.assert_array_equal(np.array(m2(ids)), ours)
    m2.close()


def test_we_load_mlx_lm_dora(tiny, tmp_path):
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    d, _ = tiny
    ids = np.random.default_rng(9).integers(0, VOCAB, (1, 11)).astype(np.int32)
    ref, _ = mlx_lm.load(str(d))
    ref.freeze()
    lp = {"rank": 2, "scale": 5.0, "dropout": 0.0, "keys": ["self_attn.k_proj", "mlp.up_proj"]}
    linear_to_lora_layers(ref, 2, lp, use_dora=True)
    rng = np.random.default_rng(9)
    upd = [(k, mx.array((np.array(v) + rng.standard_normal(v.shape) * 0.05).astype(np.float32)))
           for k, v in tree_flatten(ref.trainable_parameters())]
    assert any(k.endswith(".m") for k, _ in upd)
    ref.load_weights(upd, strict=False)
    want = np.array(ref(mx.array(ids)).astype(mx.float32))
    (tmp_path / "theirs").mkdir()
    mx.save_safetensors(str(tmp_path / "theirs" / "adapters.safetensors"), dict(upd))
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": lp}))
    m2 = load_model(d)
    load_adapters(m2, tmp_path / "theirs")
    assert rel(np.array(m2(ids)), want) < 1e-5
    m2.close()


def test_dora_merge_remove_and_fuse(tiny, tmp_path):
    d, _ = tiny
    ids = np.random.default_rng(10).integers(0, VOCAB, (1, 10)).astype(np.int32)
    model = load_model(d)
    base = np.array(model(ids))
    lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2, fine_tune_type="dora")
    _perturb(lora)
    want = np.array(model(ids))
    lora.merge()
    assert rel(np.array(model(ids)), want) < 1e-5
    lora.unmerge()
    np.testing.assert_array_equal(np.array(model(ids)), want)
    save_adapters(lora, tmp_path / "ad")
    lora.remove()
    np.testing.assert_array_equal(np.array(model(ids)), base)
    model.close()
    fuse_model(d, tmp_path / "ad", tmp_path / "fused")
    fused = load_model(tmp_path / "fused")
    assert rel(np.array(fused(ids)), want) < 1e-5
    fused.close()
    # mlx-lm's fuse of the same adapters gives the same weights
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    ref, _ = mlx_lm.load(str(d), adapter_path=str(tmp_path / "ad"))
    fused_ref = dict(ref.model.layers[1].mlp.down_proj.fuse().parameters())
    from mlxcy.models.load import read_safetensors
    ours, _ = read_safetensors(tmp_path / "fused" / "model.safetensors")
    assert rel(np.array(ours["model.layers.1.mlp.down_proj.weight"]),
               np.array(fused_ref["weight"])) < 1e-6


def test_dora_on_quantized_base_matches_mlx_lm(tiny, tmp_path):
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert
    d, _ = tiny
    q = tmp_path / "q"
    convert(str(d), str(q), quantize=True, q_group_size=32, q_bits=8)
    ids = np.random.default_rng(11).integers(0, VOCAB, (1, 10)).astype(np.int32)
    model = load_model(q)
    base = np.array(model(ids))
    lora = LoRA(model, rank=4, keys=KEYS3, num_layers=2, fine_tune_type="dora")
    _perturb(lora)
    want = np.array(model(ids))
    save_adapters(lora, tmp_path / "ad")
    assert rel(want, _mlx_lm_logits(q, tmp_path / "ad", ids)) < 1e-4
    lora.remove()                                  # the quantized layers are back
    np.testing.assert_array_equal(np.array(model(ids)), base)
    model.close()
    fuse_model(q, tmp_path / "ad", tmp_path / "fq")
    fq = load_model(tmp_path / "fq")
    assert fq.info()["quantization"]["bits"] == 8
    assert rel(np.array(fq(ids)), want) < 2e-2     # requantized: 8-bit error only
    fq.close()


def test_full_on_gemma_norms_round_trip_mlx_lm(tiny_gemma, tmp_path):
    """Gemma's RMSNorm weights are (1 + w) inside, w in checkpoints and adapters."""
    d, hf = tiny_gemma
    ids = np.random.default_rng(12).integers(0, VOCAB, (1, 7)).astype(np.int32)
    model = load_model(d)
    lora = LoRA(model, num_layers=1, fine_tune_type="full")
    p = lora.parameters()
    w_hf = hf.model.layers[1].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(np.array(p["model.layers.1.input_layernorm.weight"]), w_hf,
                               atol=1e-6)
    _perturb(lora, s=0.02)
    ours = np.array(model(ids))
    save_adapters(lora, tmp_path / "ad")
    model.close()
    assert rel(ours, _mlx_lm_logits(d, tmp_path / "ad", ids)) < 1e-4


def test_errors(tiny, tmp_path):
    from mlxcy.errors import AdapterError
    d, _ = tiny
    model = load_model(d)
    with pytest.raises(ValueError, match="fine_tune_type"):
        LoRA(model, fine_tune_type="qlora")
    lora = LoRA(model, num_layers=1, fine_tune_type="full")
    with pytest.raises(ValueError, match="no adapter to remove"):
        lora.remove()
    model.close()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "ia3", "num_layers": 1}))
    with pytest.raises(AdapterError, match="ia3"):
        load_adapters(load_model(d), tmp_path / "bad")


def test_full_rejects_quantized_model(tiny, tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert
    d, _ = tiny
    convert(str(d), str(tmp_path / "q"), quantize=True, q_group_size=32, q_bits=8)
    model = load_model(tmp_path / "q")
    with pytest.raises(ValueError, match="quantized"):
        LoRA(model, num_layers=1, fine_tune_type="full")
    model.close()


@pytest.mark.parametrize("ft", ["dora", "full"])
def test_cli_fine_tune_type_trains_and_fuses(tmp_path, capsys, ft):
    from test_lora_cli import make_model, TEXT
    from mlxcy.cli.train import main
    make_model(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 8), ("valid", 4)):
        (data / f"{split}.jsonl").write_text((json.dumps({"text": TEXT}) + "\n") * n)
    assert main(["lora", "--model", str(tmp_path / "model"), "--data", str(data),
                 "--fine-tune-type", ft, "--iters", "6", "--batch-size", "4",
                 "--learning-rate", "1e-2" if ft == "dora" else "2e-3", "--num-layers", "2",
                 "--steps-per-report", "3", "--steps-per-eval", "3", "--val-batches", "1",
                 "--adapter-path", str(tmp_path / "ad")]) == 0
    out = capsys.readouterr().out
    val = [float(line.split("val loss")[1].split(",")[0])
           for line in out.splitlines() if "val loss" in line]
    assert len(val) == 3 and val[2] < val[0] - 0.1, out
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == ft
    model = load_model(tmp_path / "model")
    load_adapters(model, tmp_path / "ad")
    from tiny_models import ids_for
    ids = ids_for(length=10) % 200
    want = np.array(model(ids))
    model.close()
    assert main(["fuse", "--model", str(tmp_path / "model"), "--adapter-path",
                 str(tmp_path / "ad"), "--save-path", str(tmp_path / "fused")]) == 0
    fused = load_model(tmp_path / "fused")
    assert rel(np.array(fused(ids)), want) < 1e-5
    fused.close()
