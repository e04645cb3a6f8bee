"""Decoder models over native MLX arrays: llama, qwen2, qwen3, gemma3, mistral
(one spec per family in mlxcy/models/families/).

    from mlxcy.models import build_model
    model = build_model(config_json_dict, {"model.embed_tokens.weight": Array, ...})
    logits = model(ids)                        # [B, L, vocab]
    cache = model.make_cache(); model(prompt, cache); model([[next_id]], cache)
"""
from mlxcy.models.config import ModelConfig  # noqa: F401
from mlxcy.models.families import spec_for, MODEL_TYPES  # noqa: F401
from mlxcy.models.base import Model  # noqa: F401
from mlxcy.models.cache import Cache, KVCache, RotatingKVCache  # noqa: F401

# model_type -> family name
FAMILIES = {mt: s.name for mt, s in MODEL_TYPES.items()}


def build_model(config, weights, quantization=None, dtype=None):
    """Build a model from a config (ModelConfig or config.json dict) and
    Hugging Face-named weights (dict of name -> Array).

    quantization: MLX's layout, e.g. {"group_size": 64, "bits": 4,
    "<layer path>": {...} or False}; quantized layers are those with
    `<path>.scales` among the weights. dtype: cast float weights (bf16/f16/f32).
    Missing or misshapen tensors raise ValueError naming the tensor.
    """
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    return cfg.spec.build(cfg, weights, quantization, dtype)
