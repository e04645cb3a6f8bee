"""Decoder parity: mlxcy's llama / qwen2 / qwen3 / gemma3 against transformers
(torch CPU, fp32, random weights) and, for quantized weights, against mlx-lm.

Tolerance: ||mlxcy - ref|| / ||ref|| <= 1e-4 for fp32 logits.
"""
import gc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

import mlxcy  # noqa: E402
from mlxcy.models import build_model, ModelConfig  # noqa: E402
from mlxcy.memory import get_active_memory  # noqa: E402

TOL = 1e-4

# transformers' Gemma 3 ignores attn_logit_softcapping; its eager attention
# function supports it, so the reference for soft-capped attention registers
# an implementation that passes the config's value through.
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward  # noqa: E402


def _softcap_attention(module, q, k, v, mask, **kw):
    kw["softcap"] = module.config.attn_logit_softcapping
    return eager_attention_forward(module, q, k, v, mask, **kw)


AttentionInterface.register("eager_softcap", _softcap_attention)
AttentionMaskInterface.register("eager_softcap", eager_mask)

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    # GQA 2, head_dim != hidden/heads, q/k/v/o + MLP biases, llama3 RoPE, untied
    "llama-gqa2-bias-llama3": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        num_key_value_heads=2, head_dim=24, attention_bias=True, mlp_bias=True,
        rope_scaling=LLAMA3, tie_word_embeddings=False)),
    # GQA 1 (MHA), tied head, linear RoPE scaling
    "llama-mha-tied-linear": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        num_key_value_heads=4, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # GQA 4, dynamic NTK RoPE active beyond 64 positions
    "llama-gqa4-dynamic": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "qwen2-gqa2-tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-mha-untied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(
        num_key_value_heads=4, tie_word_embeddings=False, rope_theta=50000.0)),
    # q/k norms, explicit head_dim (32 != 64/4), GQA 4
    "qwen3-gqa4-headdim": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(
        num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)),
    "qwen3-gqa2-tied": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    # sliding window 8 every other layer (pattern 2), local vs global RoPE with
    # linear scaling on the global layers, attention and final soft-capping
    "gemma3-sliding-softcap": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(
        num_hidden_layers=3, num_key_value_heads=2, head_dim=16, sliding_window=8,
        sliding_window_pattern=2, query_pre_attn_scalar=32, attn_logit_softcapping=0.5,
        final_logit_softcapping=2.0, rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # explicit layer_types, fused attention path (no soft-capping), MHA
    "gemma3-layertypes": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, dict(
        num_hidden_layers=3, num_key_value_heads=4, head_dim=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=24)),
    # Mistral: every layer slides (window 8), GQA 2, head_dim from hidden/heads
    "mistral-sliding": (tf.MistralConfig, tf.MistralForCausalLM, dict(
        num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False)),
    # Ministral: layer_types choose the sliding layers, explicit head_dim, tied
    "ministral-layertypes": (tf.MinistralConfig, tf.MinistralForCausalLM, dict(
        num_hidden_layers=3, num_key_value_heads=1, head_dim=24, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        tie_word_embeddings=True)),
}

_MODELS = {}


def hf_case(name):
    """(transformers model, its config) for a case, built once per session."""
    if name not in _MODELS:
        cfg_cls, model_cls, kw = CASES[name]
        cfg = cfg_cls(**{**BASE, **kw})
        impl = "eager_softcap" if getattr(cfg, "attn_logit_softcapping", None) else "eager"
        torch.manual_seed(0)
        model = model_cls._from_config(cfg, attn_implementation=impl).eval()
        # nonzero Gemma norm weights and bigger activations make every path count
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.normal_(0.0, 0.3)
        _MODELS[name] = (model, cfg)
    return _MODELS[name]


def torch_weights(model):
    return {k: mlxcy.array(v.detach().float().numpy()) for k, v in model.state_dict().items()}


def ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def ids_for(n, vocab, batch=1, seed=0):
    return np.random.RandomState(seed + n).randint(0, vocab, (batch, n))


@pytest.fixture(scope="module")
def built():
    """mlxcy models for every case (built once)."""
    out = {}
    yield lambda name: out.setdefault(name, build_model(hf_case(name)[1].to_dict(),
                                                        torch_weights(hf_case(name)[0])))
    for m in out.values():
        m.close()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("n", [1, 7, 300])
def test_logits_match_transformers(built, name, n):
    hf, cfg = hf_case(name)
    model = built(name)
    batch = 2 if n == 7 else 1
    ids = ids_for(n, cfg.vocab_size, batch)
    ref = ref_logits(hf, ids)
    out = model(ids).numpy()
    assert out.shape == ref.shape == (batch, n, cfg.vocab_size)
    assert rel(out, ref) <= TOL, name
    assert rel(out[:, -1], ref[:, -1]) <= TOL
    last = model(ids, last_only=True).numpy()
    assert last.shape == (batch, 1, cfg.vocab_size)
    assert rel(last[:, 0], ref[:, -1]) <= TOL


def test_reference_sensitivity():
    """The references are not trivially close: attention soft-capping and the
    sliding window change the logits well beyond the tolerance."""
    hf, cfg = hf_case("gemma3-sliding-softcap")
    ids = ids_for(40, cfg.vocab_size)
    w = torch_weights(hf)
    d = cfg.to_dict()
    plain = build_model({**d, "attn_logit_softcapping": None}, w)
    ref = ref_logits(hf, ids)
    assert rel(plain(ids).numpy(), ref) > 100 * TOL
    d2 = dict(d)
    d2["layer_types"] = ["full_attention"] * cfg.num_hidden_layers
    nowin = build_model(d2, w)
    assert rel(nowin(ids).numpy(), ref) > 100 * TOL
    plain.close()
    nowin.close()


@pytest.mark.parametrize("name", ["llama-gqa2-bias-llama3", "qwen3-gqa4-headdim",
                                  "gemma3-sliding-softcap", "gemma3-layertypes",
                                  "llama-gqa4-dynamic", "mistral-sliding",
                                  "ministral-layertypes"])
def test_incremental_decoding(built, name):
    hf, cfg = hf_case(name)
    model = built(name)
    ids = ids_for(12, cfg.vocab_size, batch=2, seed=5)
    full = model(ids).numpy()
    cache = model.make_cache()
    outs = [model(ids[:, :7], cache).numpy()]
    for t in range(7, 12):
        outs.append(model(ids[:, t:t + 1], cache).numpy())
    assert cache.offset == 12
    assert rel(np.concatenate(outs, 1), full) <= TOL
    assert rel(full, ref_logits(hf, ids)) <= TOL


def test_mistral_window_matters():
    """The Mistral references depend on the window: the same weights without
    it (sliding_window null: full attention) are far from them."""
    for name in ("mistral-sliding", "ministral-layertypes"):
        hf, cfg = hf_case(name)
        ids = ids_for(40, cfg.vocab_size)
        d = {**cfg.to_dict(), "sliding_window": None, "layer_types": None}
        with build_model(d, torch_weights(hf)) as full:
            assert set(full.config.layer_types) == {"full_attention"}
            assert rel(full(ids).numpy(), ref_logits(hf, ids)) > 100 * TOL, name


@pytest.mark.parametrize("name", ["gemma3-sliding-softcap", "mistral-sliding"])
def test_sliding_cache_wraps(name):
    """Rotating caches: prefill past the window, single steps around the ring,
    then multi-token chunks over a wrapped ring."""
    hf, cfg = hf_case(name)
    with build_model(cfg.to_dict(), torch_weights(hf)) as model:
        ids = ids_for(48, cfg.vocab_size, batch=1, seed=9)
        ref = ref_logits(hf, ids)
        for chunks in ([20] + [1] * 12 + [5, 3], [1] * 11 + [9, 1, 2, 25]):
            cache = model.make_cache()
            pos, outs = 0, []
            for n in chunks:
                outs.append(model(ids[:, pos:pos + n], cache).numpy())
                pos += n
            assert rel(np.concatenate(outs, 1), ref[:, :pos]) <= TOL, chunks


def test_cache_pad_changes_no_logit():
    """Cache buffers carry tuning.cache_pad spare positions (so that MLX's CUDA backend
    attends one-token queries with its vector kernel, not cuDNN's): the logits
    over prefill, single steps around the ring and chunks are exactly those of
    unpadded buffers, and no buffer's length is a multiple of 256."""
    from mlxcy import tuning
    hf, cfg = hf_case("gemma3-sliding-softcap")
    with build_model(cfg.to_dict(), torch_weights(hf)) as model:
        ids = ids_for(48, cfg.vocab_size, batch=1, seed=9)
        runs = {}
        for pad in (0, 8):
            with tuning.override(cache_pad=pad):
                cache = model.make_cache()
                pos, outs = 0, []
                for n in [20] + [1] * 12 + [5, 3]:
                    outs.append(model(ids[:, pos:pos + n], cache).numpy())
                    pos += n
                lengths = [c.state()["keys"].shape[2] for c in cache.layers]
                kinds = {type(c).__name__ for c in cache.layers}
            runs[pad] = np.concatenate(outs, 1)
            assert kinds == {"KVCache", "RotatingKVCache"}
            if pad:
                assert all(n % 256 for n in lengths), lengths
        np.testing.assert_array_equal(runs[8], runs[0])
    with pytest.raises(ValueError, match="cache_pad"):
        tuning.set(cache_pad=-1)


@pytest.mark.parametrize("pad", [0, 2, 8])
def test_small_step_caches_grow_and_wrap(pad):
    """Caches whose step is smaller than the window: a ring that grows in
    several steps (each with `pad` spare positions) before it wraps, and a
    plain cache grown step by step, give the reference logits, one token at a
    time from an empty cache and then in chunks."""
    from mlxcy.models import cache as C
    from mlxcy import tuning
    hf, cfg = hf_case("gemma3-sliding-softcap")     # sliding window 8
    with build_model(cfg.to_dict(), torch_weights(hf)) as model:
        ids = ids_for(40, cfg.vocab_size, batch=1, seed=4)
        ref = ref_logits(hf, ids)
        with tuning.override(cache_pad=pad):
            cache = C.Cache([C.RotatingKVCache(c.window, step=3) if c.window else
                             C.KVCache(step=4) for c in model.make_cache().layers])
            pos, outs = 0, []
            for n in [1] * 19 + [6, 1, 1, 13]:
                outs.append(model(ids[:, pos:pos + n], cache).numpy())
                pos += n
        assert rel(np.concatenate(outs, 1), ref[:, :pos]) <= TOL


def test_cache_trim():
    hf, cfg = hf_case("qwen3-gqa2-tied")
    with build_model(cfg.to_dict(), torch_weights(hf)) as model:
        ids = ids_for(10, cfg.vocab_size, seed=3)
        full = model(ids).numpy()
        cache = model.make_cache()
        model(ids[:, :8], cache)
        assert cache.trim(3) == 3 and cache.offset == 5
        out = model(ids[:, 5:10], cache).numpy()
        assert rel(out, full[:, 5:10]) <= TOL


@pytest.mark.parametrize("name", ["llama-gqa2-bias-llama3", "gemma3-layertypes"])
def test_left_padded_batch(built, name):
    """A left-padded batch with a key mask and per-sequence RoPE offsets gives
    each sequence's own logits, in prefill and in a decode step."""
    hf, cfg = hf_case(name)
    model = built(name)
    a = ids_for(9, cfg.vocab_size, seed=11)[0]
    b = ids_for(5, cfg.vocab_size, seed=12)[0]
    pad = 9 - 5
    batch = np.stack([a, np.concatenate([np.zeros(pad, int), b])])
    valid = np.ones((2, 10), bool)
    valid[1, :pad] = False
    cache = model.make_cache()
    out = model(batch, cache, mask=valid[:, None, None, :9], offsets=[0, -pad]).numpy()
    assert rel(out[0], ref_logits(hf, a[None])[0]) <= TOL
    assert rel(out[1, pad:], ref_logits(hf, b[None])[0]) <= TOL
    nxt = np.array([[3], [7]])
    step = model(nxt, cache, mask=valid[:, None, None, :10], offsets=[9, 9 - pad]).numpy()
    ra = ref_logits(hf, np.concatenate([a, [3]])[None])[0, -1]
    rb = ref_logits(hf, np.concatenate([b, [7]])[None])[0, -1]
    assert rel(step[0, 0], ra) <= TOL
    assert rel(step[1, 0], rb) <= TOL


def test_multimodal_gemma3_config_and_prefix():
    hf, cfg = hf_case("gemma3-layertypes")
    ids = ids_for(20, cfg.vocab_size, seed=2)
    w = {("language_model." + k): v for k, v in torch_weights(hf).items()}
    w["vision_tower.patch.weight"] = mlxcy.array(np.zeros((2, 2), np.float32))
    mm_config = {"model_type": "gemma3", "text_config": cfg.to_dict(),
                 "vision_config": {"model_type": "siglip_vision_model"}}
    with build_model(mm_config, w) as model:
        assert model.config.model_type == "gemma3_text"
        assert rel(model(ids).numpy(), ref_logits(hf, ids)) <= TOL


# ------------------------------------------------------------ quantized ----

def _mlx_lm_model(family, cfg_dict, float_weights, qweights, quantization):
    import importlib
    import mlx.core as mx
    import mlx.nn as nn
    mod = importlib.import_module(f"mlx_lm.models.{family}")
    # mlx-lm reads rope_theta / rope_scaling / sliding_window_pattern
    args = mod.ModelArgs.from_dict({**ModelConfig.from_dict(cfg_dict).to_dict(),
                                    "sliding_window_pattern": 2})
    model = mod.Model(args)
    if family == "gemma3_text":
        model.sanitize({})       # no lm_head: tied
        model.tie_word_embeddings = True

    def pred(path, module):
        if path in quantization:
            return quantization[path] if quantization[path] is not False else False
        return f"{path}.scales" in qweights
    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                class_predicate=pred)
    model.load_weights([(k, mx.array(v.numpy())) for k, v in qweights.items()], strict=True)
    return model


def _quantized_weights(float_weights, quantization, skip=()):
    """Quantize every Linear/Embedding weight with mlxcy.ops.quantize."""
    gs0, bits0 = quantization["group_size"], quantization["bits"]
    out = {}
    for name, w in float_weights.items():
        path = name[:-len(".weight")]
        is_q = (name.endswith(".weight") and len(w.shape) == 2 and "norm" not in name
                and path not in skip)
        spec = quantization.get(path)
        if is_q and spec is not False:
            gs = spec["group_size"] if spec else gs0
            bits = spec["bits"] if spec else bits0
            wq, s, b = mlxcy.ops.quantize(w, group_size=gs, bits=bits)
            out[name], out[path + ".scales"], out[path + ".biases"] = wq, s, b
        else:
            out[name] = w
    return out


@pytest.mark.parametrize("name,family", [("llama-mha-tied-linear", "llama"),
                                         ("qwen3-gqa4-headdim", "qwen3"),
                                         ("gemma3-layertypes", "gemma3_text"),
                                         # mlx-lm runs Ministral as llama with layer_types
                                         ("ministral-layertypes", "llama")])
def test_quantized_matches_mlx_lm(name, family):
    import mlx.core as mx
    hf, cfg = hf_case(name)
    d = cfg.to_dict()
    fw = torch_weights(hf)
    if "lm_head.weight" in fw and d.get("tie_word_embeddings"):
        del fw["lm_head.weight"]
    quantization = {"group_size": 32, "bits": 4,
                    "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8},
                    "model.layers.1.self_attn.o_proj": False}
    qw = _quantized_weights(fw, quantization)
    # mlxcy's quantize agrees with MLX's own bit for bit
    w0 = fw["model.layers.0.self_attn.q_proj.weight"]
    ref = mx.quantize(mx.array(w0.numpy()), group_size=32, bits=4)
    for a, r in zip(mlxcy.ops.quantize(w0, group_size=32, bits=4), ref):
        np.testing.assert_array_equal(a.numpy(), np.array(r))
    ref_model = _mlx_lm_model(family, d, fw, qw, quantization)
    ids = ids_for(23, cfg.vocab_size, batch=2, seed=4)
    want = np.array(ref_model(mx.array(ids)).astype(mx.float32))
    with build_model(d, qw, quantization) as model:
        got = model(ids).numpy()
        info = model.info()
    assert rel(got, want) <= 1e-5
    assert info["quantization"] == {"bits": 4, "group_size": 32}
    # and quantization actually changed the model
    assert rel(got, ref_logits(hf, ids)) > 1e-3


# --------------------------------------------------------- lifetime / API ---

def test_close_frees_memory_and_info():
    gc.collect()
    before = get_active_memory()
    hf, cfg = hf_case("llama-gqa2-bias-llama3")
    weights = torch_weights(hf)
    model = build_model(cfg.to_dict(), weights, dtype="float16")
    del weights
    gc.collect()
    info = model.info()
    assert info["dtype"] == "float16" and info["layers"] == 2 and info["kv_heads"] == 2
    assert info["head_dim"] == 24 and not info["tied_embeddings"]
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["bytes"] == 2 * info["parameters"]
    assert get_active_memory() - before >= info["bytes"]
    logits = model(ids_for(9, cfg.vocab_size))
    assert logits.dtype == mlxcy.float16
    del logits
    model.close()
    gc.collect()
    assert get_active_memory() == before
    with pytest.raises(ValueError, match="closed"):
        model([1, 2, 3])
    with pytest.raises(ValueError, match="closed"):
        model.info()
    model.close()  # idempotent


def test_half_precision_dtype():
    hf, cfg = hf_case("gemma3-sliding-softcap")
    w = torch_weights(hf)
    ids = ids_for(30, cfg.vocab_size)
    ref = ref_logits(hf, ids)
    for dt, tol in (("bfloat16", 5e-2), ("float16", 1e-2)):
        with build_model(cfg.to_dict(), w, dtype=dt) as model:
            out = model(ids)
            assert out.dtype == mlxcy.dtype(dt) and model.info()["dtype"] == dt
            assert rel(out.astype(mlxcy.float32).numpy(), ref) <= tol


def test_tied_model_close_frees_once():
    hf, cfg = hf_case("qwen2-gqa2-tied")
    gc.collect()
    before = get_active_memory()
    model = build_model(cfg.to_dict(), torch_weights(hf))
    assert model.info()["tied_embeddings"]
    with model:
        model([[1, 2, 3]]).eval()
    gc.collect()
    assert get_active_memory() == before


def test_bad_inputs():
    hf, cfg = hf_case("qwen2-mha-untied")
    d = cfg.to_dict()
    w = torch_weights(hf)
    missing = dict(w)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        build_model(d, missing)
    bad = dict(w)
    bad["model.layers.0.self_attn.k_proj.bias"] = mlxcy.array(np.zeros(7, np.float32))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias.*\(7,\)"):
        build_model(d, bad)
    nohead = dict(w)
    del nohead["lm_head.weight"]
    with pytest.raises(ValueError, match="lm_head.weight"):
        build_model(d, nohead)
    with pytest.raises(ValueError, match="mamba"):
        build_model({**d, "model_type": "mamba"}, w)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        build_model({**d, "num_key_value_heads": 3}, w)
    q = _quantized_weights({"model.embed_tokens.weight": w["model.embed_tokens.weight"]},
                           {"group_size": 32, "bits": 4})
    with pytest.raises(ValueError, match="model.embed_tokens.scales"):
        build_model(d, {**w, **q})          # quantized tensors, no quantization config
    with build_model(d, w) as model:
        with pytest.raises(ValueError, match="vocabulary"):
            model([[1, cfg.vocab_size]])
        with pytest.raises(TypeError, match="integers"):
            model([[0.5, 1.0]])
        with pytest.raises(ValueError, match="shape"):
            model(np.zeros((1, 1, 2), np.int32))
        with pytest.raises(ValueError, match="key positions"):
            model([[1, 2]], mask=np.ones((1, 1, 2, 5), bool))
        cache = model.make_cache()
        model([[1, 2]], cache)
        with pytest.raises(ValueError, match="B=2"):
            model([[1], [2]], cache)


def test_config_parsing():
    old = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
           "rope_scaling": {"type": "linear", "factor": 4}}
    new = dict(old)
    del new["rope_theta"], new["rope_scaling"]
    new["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a == b and a.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert a.num_key_value_heads == 2 and a.head_dim == 4
    assert ModelConfig.from_dict(a.to_dict()) == a
    g = {"model_type": "gemma3", "text_config": {"hidden_size": 32, "num_hidden_layers": 7,
                                                 "sliding_window_pattern": 3,
                                                 "rope_scaling": {"rope_type": "linear",
                                                                  "factor": 8.0}}}
    c = ModelConfig.from_dict(g)
    assert c.model_type == "gemma3_text" and c.vocab_size == 262208 and c.head_dim == 256
    assert c.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2 + [
        "sliding_attention"]
    assert c.rope_scaling["factor"] == 8.0 and c.rope_local_base_freq == 10000.0
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({**old, "rope_scaling": {"rope_type": "yarn", "factor": 2}})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({k: v for k, v in old.items() if k != "hidden_size"})


# ------------------------------------------------------------ fused weights ---

@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_projections_match_transformers(name):
    """Model.fuse() (q/k/v and gate/up concatenated) changes no logits, with
    float and quantized weights, in prefill and in cached decoding."""
    hf, cfg = hf_case(name)
    d = cfg.to_dict()
    ids = ids_for(9, cfg.vocab_size, batch=2, seed=5)
    want = ref_logits(hf, ids)
    with build_model(d, torch_weights(hf)) as m:
        n_before = m.nparams()
        m.fuse()
        assert m.nparams() == n_before
        assert rel(m(ids).numpy(), want) <= 1e-4
        cache = m.make_cache()
        steps = [m(ids[:, :6], cache).numpy()[:, -1]]
        for t in range(6, 9):
            steps.append(m(ids[:, t:t + 1], cache).numpy()[:, -1])
        assert rel(np.stack(steps[1:], 1), want[:, 6:9]) <= 1e-4
    fw = torch_weights(hf)
    if "lm_head.weight" in fw and d.get("tie_word_embeddings"):
        del fw["lm_head.weight"]
    q = {"group_size": 32, "bits": 4}
    qw = _quantized_weights(fw, q)
    with build_model(d, qw, q) as plain, build_model(d, qw, q) as fused:
        fused.fuse()
        assert rel(fused(ids).numpy(), plain(ids).numpy()) <= 1e-5


@pytest.mark.skipif(mlxcy.default_device().type != "cpu",
                    reason="CUDA frees buffers when their command batch completes, not at once")
def test_fused_prefill_peak_memory_as_unfused():
    """A cached prefill with fused q/k/v must not keep every layer's fused
    output alive (keys/values written to the cache as views of it would): its
    transient peak stays within 10% of the unfused model's, which holds less
    than one fused output per layer."""
    from mlxcy.memory import get_peak_memory, reset_peak_memory, clear_cache
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    w = torch_weights(tf.LlamaForCausalLM(cfg).eval())
    ids = ids_for(256, 256)

    def peak(fuse):
        with build_model(cfg.to_dict(), w) as m:
            if fuse:
                m.fuse()
            m(ids, m.make_cache(), last_only=True).numpy()      # warm-up
            cache = m.make_cache()
            clear_cache()
            gc.collect()
            before = get_active_memory()
            reset_peak_memory()
            m(ids, cache, last_only=True).numpy()
            return get_peak_memory() - before

    plain, fused = peak(False), peak(True)
    # q/k/v output: 256 x 512 float32 = 0.5 MB per layer, 4 MB over the 8 layers
    assert fused <= 1.1 * plain, (fused, plain)
