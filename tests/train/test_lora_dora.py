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
from mlxcy.train.lora import LoRA, TrainStep  # noqa: E402
from mlxcy.train.optim import AdamW  # noqa: E402
from mlxcy.train.adapters import save_adapters, load_adapters, fuse_model  # noqa: E402

from tiny_models import make_tiny, rel, VOCAB  # noqa: E402
from lora_refs import KEYS3, batch as _batch, central_difference, dora as dora_math, \
    logits_with_adapters, save_mlx_lm_adapters, torch_grads, torch_loss  # noqa: E402



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
    tl, tg = torch_grads(hf, params, dora_math(2.0), KEYS3, ids, off, ln, 2)
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
            fd = central_difference(step, lora, name, base, idx, ids, off, ln)
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
    tl = torch_loss(hf, ids, off, ln)
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
    save_mlx_lm_adapters(tmp_path / "theirs", upd,
                         {"fine_tune_type": "dora", "num_layers": 2, "lora_parameters": lp})
    assert rel(logits_with_adapters(d, tmp_path / "theirs", ids), want) < 1e-5


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
    pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    ref, _ = mlx_lm.load(str(d), adapter_path=str(tmp_path / "ad"))
    fused_ref = dict(ref.model.layers[1].mlp.down_proj.fuse().parameters())
    from mlxcy.models.load import read_safetensors
    ours, _ = read_safetensors(tmp_path / "fused" / "model.safetensors")
    assert rel(np.array(ours["model.layers.1.mlp.down_proj.weight"]),
               np.array(fused_ref["weight"])) < 1e-6


def test_dora_on_quantized_base_matches_mlx_lm(tiny, tmp_path):
    pytest.importorskip("mlx.core")
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
    from cli_models import make_model, TEXT
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
