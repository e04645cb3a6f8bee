"""Conversion: our mlx-lm-layout output read by mlx-lm, mlx-lm's read by us,
and GGUF → Hugging Face directories read by transformers."""
import json

import numpy as np
import pytest

import mlxcy
from mlxcy import cpu_kernels
from mlxcy.models import convert as C
from mlxcy import device as D
from mlxcy.models import load as L

from tiny_models import make_tiny, torch_logits, ids_for, rel

mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")


ON_GPU = D.default_device().type == "gpu"


def skip_cuda_single_group(gs):
    """MLX 0.32.4's CUDA quantized_matmul returns zeros for several rows when
    in_features == group_size (mlx.core alike; benchmarks/gpu_probe.py): the
    tiny models are 64 wide, so mlx-lm's reference logits are zeros there."""
    if ON_GPU and gs >= 64:
        pytest.skip("MLX CUDA quantized_matmul bug for in_features == group_size")


def mlx_lm_logits(path, ids):
    model, _ = mlx_utils.load_model(path)
    return np.array(model(mx.array(ids)).astype(mx.float32))


def our_logits(path, ids, dtype=None):
    """A prompt's logits with exact CPU products: short prompts would otherwise
    take the int16 kernels (~1e-4 relative), and these tests compare readers
    of the same files at 1e-5."""
    m = L.load_model(path, dtype=dtype)
    old = cpu_kernels.set_activations("float32")
    try:
        return m(mlxcy.array(ids)).astype(mlxcy.float32).numpy()
    finally:
        cpu_kernels.set_activations(old)
        m.close()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {mt: (root / mt, make_tiny(mt, root / mt, seed=i))
            for i, mt in enumerate(("llama", "qwen2", "qwen3", "gemma3_text"))}


@pytest.mark.parametrize("bits,gs", [(4, 64), (8, 32), (4, 128)])
def test_numpy_quantizer_matches_mlx(bits, gs):
    x = np.random.default_rng(bits + gs).standard_normal((16, 256)).astype(np.float32)
    ours = C.quantize_affine(mlxcy.array(x), gs, bits, native=False)
    ref = mx.quantize(mx.array(x), group_size=gs, bits=bits)
    np.testing.assert_allclose(ours[1].numpy(), np.array(ref[1]), rtol=1e-6)
    np.testing.assert_allclose(ours[2].numpy(), np.array(ref[2]), rtol=1e-6, atol=1e-7)
    deq = lambda t: np.array(mx.dequantize(mx.array(t[0].numpy()), mx.array(t[1].numpy()),
                                           mx.array(t[2].numpy()), group_size=gs, bits=bits))
    d_ours, d_ref = deq(ours), np.array(mx.dequantize(*ref, group_size=gs, bits=bits))
    assert np.mean(d_ours == d_ref) > 0.999           # round-half ties may differ


@pytest.mark.parametrize("mt,bits,gs", [("llama", 4, 64), ("gemma3_text", 8, 32),
                                        ("qwen2", 4, 32)])
def test_ours_read_by_mlx_lm(hf, tmp_path, mt, bits, gs):
    skip_cuda_single_group(gs)
    src, ref_model = hf[mt]
    dst = C.convert_hf_to_mlx(src, tmp_path / "q", bits=bits, group_size=gs)
    cfg = json.loads((dst / "config.json").read_text())
    q = {"group_size": gs, "bits": bits, "mode": "affine"}
    assert cfg["quantization"] == q and cfg["quantization_config"] == q
    assert (dst / "tokenizer.json").is_file()
    w, meta = L.read_safetensors(dst / "model.safetensors")
    assert meta.get("format") == "mlx"
    assert w["model.layers.0.mlp.up_proj.weight"].dtype == mlxcy.uint32
    assert w["model.embed_tokens.scales"].shape == (96, 64 // gs)
    L._free(w)
    ids = ids_for()
    theirs, ours = mlx_lm_logits(dst, ids), our_logits(dst, ids)
    assert rel(ours, theirs) < 1e-5
    # and quantization really happened (close to, but not equal to, the float model)
    err = rel(ours, torch_logits(ref_model, ids))
    assert 0 < err < (0.35 if bits == 4 else 0.05)


def test_same_bits_as_mlx_lm_convert(hf, tmp_path):
    from mlx_lm import convert
    src, _ = hf["qwen3"]
    C.convert_hf_to_mlx(src, tmp_path / "ours", bits=4, group_size=64)
    convert(str(src), str(tmp_path / "theirs"), quantize=True, q_bits=4, q_group_size=64)
    a, _ = L.read_safetensors(tmp_path / "ours" / "model.safetensors")
    b = mx.load(str(tmp_path / "theirs" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), np.array(b[k]), err_msg=k)
    L._free(a)


@pytest.mark.parametrize("mt,bits", [("qwen3", 4), ("gemma3_text", 8), ("llama", 8)])
def test_mlx_lm_convert_read_by_ours(hf, tmp_path, mt, bits):
    from mlx_lm import convert
    skip_cuda_single_group(64)      # mlx-lm's default group size
    src, _ = hf[mt]
    dst = tmp_path / "mlx"
    convert(str(src), str(dst), quantize=True, q_bits=bits)
    ids = ids_for(batch=2)
    assert rel(our_logits(dst, ids), mlx_lm_logits(dst, ids)) < 1e-5


def test_sharded_output(hf, tmp_path):
    src, _ = hf["llama"]
    dst = C.convert_hf_to_mlx(src, tmp_path / "q", bits=4, group_size=32, max_shard_bytes=20000)
    idx = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    assert not (dst / "model.safetensors").exists()
    ids = ids_for()
    assert rel(our_logits(dst, ids), mlx_lm_logits(dst, ids)) < 1e-5


def test_dtype_and_errors(hf, tmp_path):
    src, _ = hf["llama"]
    dst = C.convert_hf_to_mlx(src, tmp_path / "bf", bits=4, group_size=64, dtype="bfloat16")
    w, _ = L.read_safetensors(dst / "model.safetensors")
    assert w["model.norm.weight"].dtype == mlxcy.bfloat16
    assert w["lm_head.scales"].dtype == mlxcy.bfloat16
    L._free(w)
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(L.LoadError, match="already quantized"):
        C.convert_hf_to_mlx(dst, tmp_path / "again")
    with pytest.raises(ValueError, match="bits"):
        C.convert_hf_to_mlx(src, tmp_path / "x", bits=7)
    with pytest.raises(ValueError, match="group_size"):
        C.convert_hf_to_mlx(src, tmp_path / "x", group_size=48)


def test_gguf_to_hf_synthetic(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from gguf_files import tiny_gemma, write_gguf
    from mlxcy.models import gguf as G
    t, meta = tiny_gemma(np.random.default_rng(5))
    p = tmp_path / "g.gguf"
    write_gguf(p, "gemma3", t, meta)
    d = C.convert_gguf_to_hf(p, tmp_path / "hf", dtype="float32", tokenizer=False)
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    w, _, _ = G.load_gguf(p, dtype="float32")
    sd = ref.state_dict()
    for k, a in w.items():
        np.testing.assert_array_equal(a.numpy(), sd[k].numpy(), err_msg=k)
    L._free(w)
    assert ref.config.query_pre_attn_scalar == 256
    assert ref.config.layer_types == ["sliding_attention"] * 2    # 5 local, then 1 global
    ids = np.array([[1, 5, 7, 9, 11, 3]], np.int32)
    assert rel(our_logits(d, ids, "float32"), torch_logits(ref, ids)) < 1e-4


def test_mistral_round_trip(tmp_path):
    """Mistral through the converter: the quantized checkpoint keeps the window
    (config and logits past it, against transformers on the float weights),
    and mlx-lm reads it (it runs Mistral as llama without a window: compared
    within the window)."""
    skip_cuda_single_group(32)
    src = tmp_path / "hf"
    ref = make_tiny("mistral", src)
    dst = C.convert_hf_to_mlx(src, tmp_path / "q", bits=8, group_size=32)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == 8
    m = L.load_model(dst)
    try:
        assert m.config.layer_types == ["sliding_attention"] * 2
        assert m.info()["sliding_window"] == 8
    finally:
        m.close()
    ids = ids_for(length=24)
    ours = our_logits(dst, ids)
    assert 0 < rel(ours, torch_logits(ref, ids)) < 0.05
    assert rel(our_logits(src, ids, "float32"), torch_logits(ref, ids)) < 1e-4
    short = ids[:, :8]
    assert rel(our_logits(dst, short), mlx_lm_logits(dst, short)) < 1e-5
