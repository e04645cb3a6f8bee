"""GGUF reading (mlxcy.models.gguf) against the `gguf` package, mlx.core's own
GGUF loader, and llama.cpp's documented conversions."""
import numpy as np
import pytest

import mlxcy
from mlxcy import assets
from mlxcy.models import gguf as G
from mlxcy.models import load as L

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from gguf_files import tiny_gemma, write_gguf  # noqa: E402


def llamacpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rows → llama.cpp rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.fixture(scope="module")
def smol():
    return assets.smollm2_gguf()     # a missing asset skips (tests/conftest.py)


@pytest.fixture(scope="module")
def smol_reader(smol):
    return gguf.GGUFReader(str(smol))


def test_header_matches_gguf_reader(smol, smol_reader):
    h = G.read_header(smol)
    ref = {t.name: t for t in smol_reader.tensors}
    assert set(h.tensors) == set(ref)
    for name, t in h.tensors.items():
        r = ref[name]
        assert t["shape"] == tuple(int(x) for x in reversed(r.shape.tolist())), name
        assert t["type"] == int(r.tensor_type), name
        assert t["offset"] == int(r.data_offset), name
        assert t["nbytes"] == int(r.n_bytes), name
    f = smol_reader.fields
    assert h.metadata["llama.block_count"] == int(f["llama.block_count"].parts[-1][0])
    assert h.metadata["general.architecture"] == "llama"
    assert len(h.metadata["tokenizer.ggml.tokens"]) == 49152     # skipped, length known
    assert h.type_counts() == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


def test_config_from_metadata(smol):
    cfg = G.gguf_config(G.read_header(smol))
    assert {k: cfg[k] for k in ("model_type", "hidden_size", "intermediate_size",
                                "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "vocab_size", "rope_theta",
                                "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
                                "eos_token_id")} == dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)
    assert L.load_config(smol) == cfg


@pytest.mark.parametrize("gname,arch,hf", [
    ("token_embd.weight", "llama", "model.embed_tokens.weight"),
    ("output_norm.weight", "gemma3", "model.norm.weight"),
    ("output.weight", "qwen2", "lm_head.weight"),
    ("blk.3.attn_q.weight", "llama", "model.layers.3.self_attn.q_proj.weight"),
    ("blk.3.attn_k.bias", "qwen2", "model.layers.3.self_attn.k_proj.bias"),
    ("blk.0.attn_output.weight", "llama", "model.layers.0.self_attn.o_proj.weight"),
    ("blk.1.ffn_norm.weight", "llama", "model.layers.1.post_attention_layernorm.weight"),
    ("blk.1.ffn_norm.weight", "gemma3", "model.layers.1.pre_feedforward_layernorm.weight"),
    ("blk.1.post_attention_norm.weight", "gemma3", "model.layers.1.post_attention_layernorm.weight"),
    ("blk.1.post_ffw_norm.weight", "gemma3", "model.layers.1.post_feedforward_layernorm.weight"),
    ("blk.2.attn_q_norm.weight", "gemma3", "model.layers.2.self_attn.q_norm.weight"),
    ("blk.2.attn_k_norm.weight", "qwen3", "model.layers.2.self_attn.k_norm.weight"),
    ("blk.2.ffn_down.weight", "qwen2", "model.layers.2.mlp.down_proj.weight"),
    ("rope_freqs.weight", "llama", None),
])
def test_names(gname, arch, hf):
    assert G.hf_name(gname, arch) == hf


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llamacpp(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 64, 7)).astype(np.float32)
    np.testing.assert_array_equal(G._unpermute_rows(llamacpp_permute(w, n_head), n_head), w)


@pytest.mark.parametrize("qt", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0])
def test_fast_dequantizers_match_gguf(qt):
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    raw = quantize(x, qt)
    t = {"type": int(qt), "shape": (8, 256)}
    np.testing.assert_array_equal(G._dequantize(raw.reshape(-1), t), dequantize(raw, qt))


def test_native_layout_bit_equal_to_mlx_core(smol):
    mx = pytest.importorskip("mlx.core")
    ref = mx.load(str(smol))
    h = G.read_header(smol)
    mm = np.memmap(smol, dtype=np.uint8, mode="r")
    for g in ("blk.0.attn_v.weight", "token_embd.weight", "blk.7.ffn_down.weight"):
        t = h.tensors[g]
        w, s, b = G._repack_native(G._tensor_bytes(mm, h, g), t["type"], t["shape"])
        base = g[: -len(".weight")]
        np.testing.assert_array_equal(w, np.array(ref[g]))
        np.testing.assert_array_equal(s, np.array(ref[base + ".scales"]))
        np.testing.assert_array_equal(b, np.array(ref[base + ".biases"]))


def test_native_reader_equals_numpy_path(smol):
    a, ca, qa = G.load_gguf(smol)
    b, cb, qb = G.load_gguf(smol, native_reader=False)
    try:
        assert qa == qb == {"group_size": 32, "bits": 4, "mode": "affine",
                            "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
        assert a["model.layers.0.self_attn.q_proj.weight"].dtype == mlxcy.uint32
        # Loading float32 for the CPU keeps GGUF's float16 scales/biases of
        # linear layers (exact; less weight traffic for mlxcy.cpu_kernels).
        want = mlxcy.float16 if mlxcy.default_device().type == "cpu" else mlxcy.float32
        assert a["model.layers.0.self_attn.q_proj.scales"].dtype == want
        assert a["model.embed_tokens.scales"].dtype == mlxcy.float32
    finally:
        L._free(a)
        L._free(b)


def test_quantized_triplets_dequantize_to_gguf_values(smol, smol_reader):
    """MLX triplets (un-permuted) dequantize to gguf's dequantization, un-permuted
    with an independent formula (inverse of llama.cpp's permute by argsort)."""
    w, cfg, _ = G.load_gguf(smol)
    ref = {t.name: t for t in smol_reader.tensors}
    try:
        for g, hf, nh in (("blk.2.attn_q.weight", "model.layers.2.self_attn.q_proj", 9),
                          ("blk.2.attn_k.weight", "model.layers.2.self_attn.k_proj", 3),
                          ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj", None)):
            r = ref[g]
            deq = dequantize(r.data, r.tensor_type).reshape(tuple(reversed(r.shape.tolist())))
            if nh:
                order = llamacpp_permute(np.arange(deq.shape[0]), nh)
                deq = deq[np.argsort(order)]
            # float16 scales/biases (loaded for the CPU) are GGUF's exact values;
            # dequantize in float32 as gguf does
            f32 = [w[hf + k].astype(mlxcy.float32) for k in (".scales", ".biases")]
            ours = mlxcy.dequantize(w[hf + ".weight"], *f32, group_size=32, bits=4).numpy()
            np.testing.assert_allclose(ours, deq, rtol=1e-6, atol=1e-6, err_msg=g)
    finally:
        L._free(w)


def test_dequantized_and_bf16_paths(smol, smol_reader):
    w, _, q = G.load_gguf(smol, dtype="float32", dequantize=True)
    try:
        assert q is None and w["model.embed_tokens.weight"].dtype == mlxcy.float32
        r = next(t for t in smol_reader.tensors if t.name == "token_embd.weight")
        deq = dequantize(r.data, r.tensor_type)
        np.testing.assert_array_equal(w["model.embed_tokens.weight"].numpy(), deq)
        norm = next(t for t in smol_reader.tensors if t.name == "blk.4.ffn_norm.weight")
        np.testing.assert_array_equal(
            w["model.layers.4.post_attention_layernorm.weight"].numpy(), norm.data)
    finally:
        L._free(w)
    w, _, q = G.load_gguf(smol, dtype="bfloat16")      # bf16 scales are too coarse: dequantized
    try:
        assert q is None and w["model.layers.0.mlp.up_proj.weight"].dtype == mlxcy.bfloat16
    finally:
        L._free(w)


def test_gemma_synthetic(tmp_path):
    t, meta = tiny_gemma(np.random.default_rng(2))
    p = tmp_path / "g.gguf"
    write_gguf(p, "gemma3", t, meta)
    w, cfg, q = G.load_gguf(p, dtype="float32")
    try:
        assert q is None
        assert cfg["model_type"] == "gemma3_text" and cfg["query_pre_attn_scalar"] == 256
        assert cfg["rope_local_base_freq"] == 10000.0 and cfg["sliding_window"] == 16
        assert cfg["sliding_window_pattern"] == 6 and cfg["tie_word_embeddings"]
        np.testing.assert_allclose(w["model.layers.1.pre_feedforward_layernorm.weight"].numpy(),
                                   t["blk.1.ffn_norm.weight"] - 1, rtol=0, atol=1e-7)
        np.testing.assert_allclose(w["model.layers.0.self_attn.k_norm.weight"].numpy(),
                                   t["blk.0.attn_k_norm.weight"] - 1, rtol=0, atol=1e-7)
        np.testing.assert_allclose(w["model.norm.weight"].numpy(), t["output_norm.weight"] - 1,
                                   rtol=0, atol=1e-7)
        # gemma q/k rows are not permuted by llama.cpp
        np.testing.assert_array_equal(w["model.layers.0.self_attn.q_proj.weight"].numpy(),
                                      t["blk.0.attn_q.weight"].astype(np.float32))
    finally:
        L._free(w)
    w, _, _ = L.load_weights(p)         # default: bf16, shapes checked
    assert w["model.embed_tokens.weight"].dtype == mlxcy.bfloat16
    L._free(w)


def test_gguf_errors(tmp_path):
    rng = np.random.default_rng(3)
    t, meta = tiny_gemma(rng)
    p = tmp_path / "trunc.gguf"
    write_gguf(p, "gemma3", t, meta, truncate=64)
    with pytest.raises(G.GGUFError, match=r"trunc\.gguf.*truncated"):
        L.load_model(p)
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(G.GGUFError, match=r"magic\.gguf.*not a GGUF"):
        L.load_config(p)
    p = tmp_path / "arch.gguf"
    write_gguf(p, "mamba", {"x": np.zeros(4, np.float32)}, {})
    with pytest.raises(G.GGUFError, match=r"arch\.gguf.*mamba"):
        L.load_model(p)
    # a tensor of the wrong shape: named, and the loaded arrays are freed
    memory = pytest.importorskip("mlxcy.memory")
    t2 = dict(t)
    t2["blk.1.ffn_up.weight"] = t["blk.1.ffn_up.weight"][:32]
    p = tmp_path / "shape.gguf"
    write_gguf(p, "gemma3", t2, meta)
    # Twice: the first load on a GPU may leave one-time backend state (64 bytes
    # seen on an H200); a failed load must not leave anything of its own.
    for _ in range(2):
        before = memory.get_active_memory()
        with pytest.raises(L.LoadError,
                           match=r"shape\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight.*shape"):
            L.load_model(p)
    assert memory.get_active_memory() <= before
    t3 = dict(t)
    del t3["blk.0.attn_v.weight"]
    p = tmp_path / "missing.gguf"
    write_gguf(p, "gemma3", t3, meta)
    with pytest.raises(L.LoadError, match=r"missing\.gguf.*v_proj\.weight.*missing"):
        L.load_model(p)


def test_describe_gguf_reads_header_only(smol, tmp_path):
    from mlxcy.models.discover import discover, describe
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "smol.gguf").symlink_to(smol)
    e = describe(smol)
    assert (e["format"], e["architecture"], e["vocab_size"], e["num_layers"], e["hidden_size"],
            e["num_heads"], e["num_kv_heads"], e["head_dim"], e["context_length"],
            e["dtype"]) == ("gguf", "llama", 49152, 30, 576, 9, 3, 64, 8192, "Q4_1")
    assert e["quantization"]["types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert [x["path"] for x in discover(tmp_path)] == [str(tmp_path / "m" / "smol.gguf")]
