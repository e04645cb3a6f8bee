"""Architecture specs (mlxcy/models/families/): each family's tensor table
against transformers' own state_dict, the builder against the table, config
validation naming the key (directories and GGUF), and the checks that run
before any tensor is read."""
import json

import numpy as np
import pytest

import mlxcy
from mlxcy.errors import LoadError, GGUFError, ModelFormatError
from mlxcy.models import build_model, ModelConfig
from mlxcy.models import load as L
from mlxcy.models.families import FAMILIES, MODEL_TYPES, spec_for
from mlxcy.memory import get_active_memory

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from tiny_models import make_tiny  # noqa: E402

SMALL = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

# (transformers config class, model class, extra settings): every layout
# variant a spec declares (biases, tied head, q/k norms, sandwich norms)
VARIANTS = {
    "llama-bias-untied": (tf.LlamaConfig, tf.LlamaForCausalLM,
                          dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "llama-tied": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "qwen2-tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3-bias": (tf.Qwen3Config, tf.Qwen3ForCausalLM,
                   dict(head_dim=16, attention_bias=True, tie_word_embeddings=False)),
    "gemma3-bias": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                    dict(head_dim=8, attention_bias=True, query_pre_attn_scalar=8,
                         sliding_window=4)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM,
                dict(sliding_window=4, tie_word_embeddings=False)),
    "ministral-tied": (tf.MinistralConfig, tf.MinistralForCausalLM,
                       dict(sliding_window=4, tie_word_embeddings=True, head_dim=12)),
}


def hf_model(variant):
    cfg_cls, model_cls, kw = VARIANTS[variant]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**SMALL, **kw)).eval()


def weights_of(model, tied):
    w = {k: mlxcy.array(v.detach().numpy()) for k, v in model.state_dict().items()}
    if tied:
        w.pop("lm_head.weight", None)
    return w


def test_every_model_type_has_a_variant():
    covered = {VARIANTS[v][0].model_type for v in VARIANTS}
    assert covered | {"gemma3"} == set(MODEL_TYPES)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tensor_table_is_transformers_state_dict(variant):
    """The spec's names and shapes are exactly transformers' parameters (the
    tied head aside: transformers lists lm_head.weight, the checkpoint does not)."""
    model = hf_model(variant)
    cfg = ModelConfig.from_dict(model.config.to_dict())
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        ref.pop("lm_head.weight")
    assert L.expected_shapes(cfg) == {k: (s, "float") for k, s in ref.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_builder_reads_exactly_the_table(variant):
    """build_model reads every tensor of the table (dropping any one fails,
    naming it) and nothing else (the table alone builds the model)."""
    model = hf_model(variant)
    d = model.config.to_dict()
    cfg = ModelConfig.from_dict(d)
    w = weights_of(model, cfg.tie_word_embeddings)
    names = set(L.expected_shapes(cfg))
    assert set(w) == names
    with build_model(d, w) as m:
        assert m.nparams() == sum(int(np.prod(a.shape)) for a in w.values())
    for name in sorted(names):
        partial = {k: v for k, v in w.items() if k != name}
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            build_model(d, partial)


def test_spec_registry():
    assert spec_for("gemma3") is spec_for("gemma3_text") is FAMILIES["gemma3"]
    assert spec_for("ministral") is FAMILIES["mistral"]
    with pytest.raises(ModelFormatError, match="mamba.*supported: .*mistral"):
        spec_for("mamba")
    # GGUF: llama.cpp writes Mistral as "llama"; gemma3 norms are (1 + w)
    from mlxcy.models.families import GGUF_ARCHITECTURES
    assert set(GGUF_ARCHITECTURES) == {"llama", "qwen2", "qwen3", "gemma3"}
    assert FAMILIES["gemma3"].gguf_plus_one("model.layers.0.self_attn.q_norm.weight")
    assert FAMILIES["llama"].gguf_permute_heads("model.layers.0.self_attn.k_proj.weight",
                                                {"num_attention_heads": 8,
                                                 "num_key_value_heads": 2}) == 2
    assert FAMILIES["qwen2"].gguf_permute_heads("model.layers.0.self_attn.k_proj.weight",
                                                {"num_key_value_heads": 2}) is None


def test_chat_template_by_model_type():
    from mlxcy.chat import builtin
    for mt, src in (("qwen3", "chatml"), ("qwen2", "chatml"), ("gemma3_text", "gemma3")):
        msgs = [{"role": "user", "content": "hi"}]
        assert builtin(mt).render(msgs) == builtin(src).render(msgs)
    with pytest.raises(ValueError, match="family"):
        builtin("llama")        # SmolLM2 chats in ChatML, Llama 3 in its own


# ------------------------------------------------------- config validation ---

BAD = [
    ({"hidden_size": "64"}, "hidden_size"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"intermediate_size": -128}, "intermediate_size"),
    ({"head_dim": None, "num_attention_heads": 3, "num_key_value_heads": 1},
     "hidden_size.*num_attention_heads"),
    ({"num_key_value_heads": 3}, "num_attention_heads.*num_key_value_heads"),
    ({"num_hidden_layers": 10 ** 8}, "num_hidden_layers"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"sliding_window": -1}, "sliding_window"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2", "rope_theta": 1e4}},
     "rope_parameters.factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}},
     "rope_parameters.rope_theta"),
    ({"max_position_embeddings": 1.5}, "max_position_embeddings"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec") / "mistral"
    make_tiny("mistral", d, tokenizer=False)
    return d


def with_config(src, dst, **changes):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,key", BAD, ids=[k for _, k in BAD])
def test_bad_config_names_file_and_key(tiny_dir, tmp_path, changes, key):
    d = with_config(tiny_dir, tmp_path / "m", **changes)
    for fn in (L.load_config, L.load_model):
        with pytest.raises(LoadError, match=rf"config\.json.*{key}"):
            fn(d)
    with pytest.raises(ModelFormatError, match=key):
        ModelConfig.from_dict({**json.loads((d / "config.json").read_text())})


@pytest.mark.parametrize("layers", [1, 3, 4096])
def test_layer_count_checked_before_reading(tiny_dir, tmp_path, layers):
    """num_hidden_layers that the weights do not hold: named, before any
    tensor is read (nothing allocated)."""
    d = with_config(tiny_dir, tmp_path / "m", num_hidden_layers=layers)
    before = get_active_memory()
    with pytest.raises(LoadError, match=rf"config\.json: num_hidden_layers is {layers} but "
                                        r"the weights hold 2"):
        L.load_weights(d)
    assert get_active_memory() == before


def test_shape_mismatch_names_config_keys(tiny_dir, tmp_path):
    d = with_config(tiny_dir, tmp_path / "m", intermediate_size=64)
    before = get_active_memory()
    with pytest.raises(LoadError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\."
                                        r"gate_proj\.weight has shape \(128, 64\), expected "
                                        r"\(64, 64\) \(config .*intermediate_size=64"):
        L.load_weights(d)
    assert get_active_memory() == before


def _tiny_llama_gguf(path, **meta_changes):
    from gguf_files import write_gguf
    rng = np.random.default_rng(0)
    h, hd, ffn, vocab = 32, 8, 48, 40
    t = {"token_embd.weight": rng.standard_normal((vocab, h)).astype(np.float32),
         "output_norm.weight": np.ones(h, np.float32)}
    for i in range(2):
        p = f"blk.{i}."
        t.update({p + "attn_q.weight": rng.standard_normal((4 * hd, h)).astype(np.float32),
                  p + "attn_k.weight": rng.standard_normal((2 * hd, h)).astype(np.float32),
                  p + "attn_v.weight": rng.standard_normal((2 * hd, h)).astype(np.float32),
                  p + "attn_output.weight": rng.standard_normal((h, 4 * hd)).astype(np.float32),
                  p + "ffn_gate.weight": rng.standard_normal((ffn, h)).astype(np.float32),
                  p + "ffn_up.weight": rng.standard_normal((ffn, h)).astype(np.float32),
                  p + "ffn_down.weight": rng.standard_normal((h, ffn)).astype(np.float32),
                  p + "attn_norm.weight": np.ones(h, np.float32),
                  p + "ffn_norm.weight": np.ones(h, np.float32)})
    meta = {"llama.context_length": 64, "llama.embedding_length": h, "llama.block_count": 2,
            "llama.feed_forward_length": ffn, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.rope.freq_base": 10000.0}
    meta.update(meta_changes)
    write_gguf(path, "llama", t, meta)
    return path


def test_gguf_config_errors_name_metadata_key(tmp_path):
    pytest.importorskip("gguf")
    ok = _tiny_llama_gguf(tmp_path / "ok.gguf")
    with L.load_model(ok) as m:
        assert m.config.num_hidden_layers == 2 and m.config.head_dim == 8
    for i, (key, value, msg) in enumerate((
            ("llama.block_count", 4294967295, "num_hidden_layers"),
            ("llama.attention.head_count", 0, "num_attention_heads"),
            ("llama.attention.head_count_kv", 3, "num_key_value_heads"),
            ("llama.block_count", 3, "num_hidden_layers is 3"))):
        p = _tiny_llama_gguf(tmp_path / f"bad{i}.gguf", **{key: value})
        before = get_active_memory()
        with pytest.raises((GGUFError, LoadError), match=rf"bad{i}\.gguf: .*{msg}"):
            L.load_model(p)
        assert get_active_memory() == before
        if "is 3" not in msg:
            with pytest.raises(GGUFError, match=rf"{msg}.*GGUF metadata .*{key}"):
                L.load_config(p)
