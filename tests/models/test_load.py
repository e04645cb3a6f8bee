"""Loading Hugging Face checkpoint directories (mlxcy.models.load) against
transformers' own forward on the same files; error handling; discover()."""
import json
import shutil
import struct

import numpy as np
import pytest

import mlxcy
from mlxcy.models import load as L
from mlxcy.models.discover import discover, describe

from tiny_models import make_tiny, torch_logits, ids_for, rel, CONFIGS

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for mt in CONFIGS:
        d = root / mt
        model = make_tiny(mt, d, tokenizer=False)
        out[mt] = (d, model)
    return out


def _logits(model, ids):
    lg = model(mlxcy.array(ids))
    return lg.astype(mlxcy.float32).numpy()


@pytest.mark.parametrize("mt", list(CONFIGS))
def test_hf_dir_matches_transformers(tiny_dirs, mt):
    d, ref_model = tiny_dirs[mt]
    ids = ids_for()
    model = L.load_model(d, dtype="float32")
    try:
        assert rel(_logits(model, ids), torch_logits(ref_model, ids)) < 1e-4
    finally:
        model.close()


def test_load_returns_tokenizer_source(tiny_dirs):
    d, _ = tiny_dirs["llama"]
    model, src = L.load(d)
    model.close()
    assert src == {"kind": "hf", "path": str(d)}


def test_load_config(tiny_dirs):
    d, ref = tiny_dirs["qwen3"]
    cfg = L.load_config(d)
    assert cfg["model_type"] == "qwen3"
    assert cfg["hidden_size"] == ref.config.hidden_size


def test_bf16_safetensors_kept_exact(tmp_path):
    model = make_tiny("llama", tmp_path, dtype="bfloat16", tokenizer=False)
    for native in (True, False):
        w, meta = L.read_safetensors(tmp_path / "model.safetensors", native=native)
        try:
            ref = {k: v.float().numpy() for k, v in model.state_dict().items()}
            for k, a in w.items():
                assert a.dtype == mlxcy.bfloat16, k
                np.testing.assert_array_equal(a.astype(mlxcy.float32).numpy(), ref[k])
        finally:
            L._free(w)
    m = L.load_model(tmp_path)           # as stored: bf16
    try:
        ids = ids_for(length=8)
        ours = _logits(m, ids)
        assert rel(ours, torch_logits(model.float(), ids)) < 3e-2
    finally:
        m.close()


def test_save_safetensors_roundtrip_is_read_by_safetensors(tmp_path):
    from safetensors.numpy import load_file
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    arrs = {"a": mlxcy.array(x), "b": mlxcy.array(x).astype(mlxcy.bfloat16),
            "c": mlxcy.array(np.arange(5, dtype=np.uint32))}
    for native in (True, False):
        p = tmp_path / f"t{native}.safetensors"
        L.save_safetensors(p, arrs, {"format": "mlx"}, native=native)
        for rnative in (True, False):
            back, meta = L.read_safetensors(p, native=rnative)
            assert meta == {"format": "mlx"}
            np.testing.assert_array_equal(back["b"].astype(mlxcy.float32).numpy(), x)
            np.testing.assert_array_equal(back["c"].numpy(), np.arange(5, dtype=np.uint32))
        ref = load_file(str(p))   # the safetensors package's numpy loader (no bf16)
        np.testing.assert_array_equal(ref["a"], x)
        np.testing.assert_array_equal(ref["c"], np.arange(5, dtype=np.uint32))


def test_sharded_checkpoint(tmp_path):
    model = make_tiny("qwen2", tmp_path, tokenizer=False, max_shard_size="60KB")
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    m = L.load_model(tmp_path, dtype="float32")
    try:
        ids = ids_for()
        assert rel(_logits(m, ids), torch_logits(model, ids)) < 1e-4
    finally:
        m.close()
    # a shard named by the index but absent
    shard = sorted(set(idx["weight_map"].values()))[-1]
    (tmp_path / shard).rename(tmp_path / "moved.bin")
    with pytest.raises(FileNotFoundError, match=shard):
        L.load_weights(tmp_path)
    (tmp_path / "moved.bin").rename(tmp_path / shard)
    # a tensor listed in the index but not in its shard
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = shard
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(L.LoadError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        L.load_weights(tmp_path)


def _rewrite(path, tensors):
    """Write a safetensors file from {name: numpy} (torch-free)."""
    L.save_safetensors(path, {k: mlxcy.array(v) for k, v in tensors.items()})


@pytest.fixture()
def llama_dir(tmp_path):
    make_tiny("llama", tmp_path, tokenizer=False)
    w, _ = L.read_safetensors(tmp_path / "model.safetensors")
    arrays = {k: v.numpy() for k, v in w.items()}
    L._free(w)
    return tmp_path, arrays


def test_missing_config(llama_dir):
    d, _ = llama_dir
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        L.load_model(d)


def test_unknown_model_type(llama_dir):
    d, _ = llama_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(L.LoadError, match=r"config\.json.*mamba"):
        L.load_model(d)


def test_truncated_safetensors(llama_dir):
    d, _ = llama_dir
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(L.LoadError, match=r"model\.safetensors.*truncated"):
        L.load_model(d)
    f.write_bytes(data[:5])
    with pytest.raises(L.LoadError, match=r"model\.safetensors"):
        L.load_model(d)
    f.write_bytes(struct.pack("<Q", 10) + b"{not json}")
    with pytest.raises(L.LoadError, match=r"model\.safetensors.*header"):
        L.load_model(d)


def test_missing_tensor(llama_dir):
    d, arrays = llama_dir
    arrays.pop("model.layers.1.self_attn.k_proj.weight")
    _rewrite(d / "model.safetensors", arrays)
    with pytest.raises(L.LoadError, match=r"model\.safetensors.*model\.layers\.1\.self_attn\.k_proj\.weight.*missing"):
        L.load_model(d)


def test_wrong_shape_and_dtype(llama_dir):
    d, arrays = llama_dir
    good = dict(arrays)
    arrays["model.layers.0.mlp.up_proj.weight"] = arrays["model.layers.0.mlp.up_proj.weight"][:, :32]
    _rewrite(d / "model.safetensors", arrays)
    with pytest.raises(L.LoadError, match=r"model\.safetensors.*up_proj\.weight.*shape"):
        L.load_model(d)
    good["model.norm.weight"] = np.ones(64, np.int32)
    _rewrite(d / "model.safetensors", good)
    with pytest.raises(L.LoadError, match=r"model\.norm\.weight.*dtype"):
        L.load_model(d)


def test_scan_refuses_two_names_for_one_tensor(tmp_path):
    """Gemma 3's multimodal prefix (model.language_model.) is renamed to the
    text model's: a checkpoint holding a tensor under both names is refused."""
    make_tiny("gemma3_text", tmp_path, tokenizer=False)
    w, _ = L.read_safetensors(tmp_path / "model.safetensors")
    arrays = {k: v.numpy() for k, v in w.items()}
    L._free(w)
    arrays["model.language_model.norm.weight"] = arrays["model.norm.weight"]
    _rewrite(tmp_path / "model.safetensors", arrays)
    with pytest.raises(L.LoadError, match=r"model\.safetensors: tensors .*norm\.weight and "
                                          r".*norm\.weight .* are both the model's "
                                          r"model\.norm\.weight"):
        L.load_model(tmp_path)


def test_scan_refuses_ambiguous_or_unsupported_checkpoints(llama_dir):
    """What the loader (and the tensor-/pipeline-parallel loaders, through
    scan_dir) refuses before reading a tensor, naming the file and tensor."""
    d, arrays = llama_dir
    config, cfg, quantization, files, tensors = L.scan_dir(d)
    assert files == [d / "model.safetensors"] and quantization is None
    assert tensors["model.norm.weight"] == (d / "model.safetensors", "model.norm.weight",
                                            ([64], "F32"))
    assert set(tensors) == set(arrays)
    # one tensor in two shards (no index: every model*.safetensors is read)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    _rewrite(d / "model-00002-of-00002.safetensors", {"model.norm.weight": arrays["model.norm.weight"]})
    with pytest.raises(L.LoadError, match=r"model-00002-of-00002\.safetensors: tensor "
                                          r"model\.norm\.weight also in .*model-00001-of"):
        L.load_model(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    (d / "model-00001-of-00002.safetensors").rename(d / "model.safetensors")
    cfg_json = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg_json, quantization=4)))
    with pytest.raises(L.LoadError, match=r"config\.json: 'quantization' must be an object"):
        L.load_model(d)
    (d / "config.json").write_text(json.dumps(dict(cfg_json, quantization_config={
        "quant_method": "gptq"})))
    with pytest.raises(L.LoadError, match=r"config\.json: quantization method 'gptq' is not "
                                          r"supported"):
        L.load_model(d)


def test_error_frees_loaded_arrays(llama_dir):
    memory = pytest.importorskip("mlxcy.memory")
    d, arrays = llama_dir
    arrays.pop("model.norm.weight")
    _rewrite(d / "model.safetensors", arrays)
    before = memory.get_active_memory()
    for native in (False, True):
        orig = L.read_safetensors
        L.read_safetensors = lambda p, names=None, native=native: orig(p, names, native)
        try:
            with pytest.raises(L.LoadError):
                L.load_model(d)
        finally:
            L.read_safetensors = orig
    assert memory.get_active_memory() <= before


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        L.load_model(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(L.LoadError, match="x.txt"):
        L.load_model(tmp_path / "x.txt")


def test_discover(tiny_dirs, tmp_path):
    d, ref = tiny_dirs["gemma3_text"]
    shutil.copytree(d, tmp_path / "models" / "g")
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    (broken / "model.safetensors").write_bytes(b"")
    (tmp_path / "models" / "junk.gguf").write_bytes(b"NOPE" + b"\0" * 40)
    found = {e["name"]: e for e in discover(tmp_path)}
    g = found["g"]
    c = ref.config
    assert (g["architecture"], g["format"], g["vocab_size"], g["num_layers"], g["hidden_size"],
            g["num_heads"], g["num_kv_heads"], g["head_dim"], g["context_length"], g["dtype"],
            g["quantization"]) == ("gemma3_text", "hf", c.vocab_size, c.num_hidden_layers,
                                   c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
                                   c.head_dim, c.max_position_embeddings, "float32", None)
    assert "error" in found["broken"] and "error" in found["junk.gguf"]
    assert describe(tmp_path / "models" / "g")["hidden_size"] == c.hidden_size


def test_cast_on_load_peak_memory(tmp_path):
    """load_model(dir, dtype=bfloat16) of a float32 checkpoint reads and casts
    one tensor at a time: the load's peak stays near the bfloat16 model plus
    the largest float32 tensor, not the whole float32 model on top of it."""
    memory = pytest.importorskip("mlxcy.memory")
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path))
    sizes = [int(np.prod(info["shape"])) * 4
             for info in L.safetensors_header(tmp_path / "model.safetensors")[0].values()]
    memory.clear_cache()
    before = memory.get_active_memory()
    memory.reset_peak_memory()
    with L.load_model(tmp_path, dtype="bfloat16"):
        held = memory.get_active_memory() - before
        peak = memory.get_peak_memory() - before
        assert held <= sum(sizes) // 2 + 4096
    # float32 sum = 4.2 MB, bfloat16 2.1 MB, largest tensor (float32) 0.5 MB
    assert peak <= sum(sizes) // 2 + max(sizes) + 4096, (peak, sum(sizes), max(sizes))
