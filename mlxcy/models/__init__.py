"""Decoder models over native MLX arrays: llama, qwen2, qwen3, gemma3.

    from mlxcy.models import build_model
    model = build_model(config_json_dict, {"model.embed_tokens.weight": Array, ...})
    logits = model(ids)                        # [B, L, vocab]
    cache = model.make_cache(); model(prompt, cache); model([[next_id]], cache)
"""
from mlxcy.models.config import ModelConfig, FAMILIES  # noqa: F401
from mlxcy.models.base import Model  # noqa: F401
from mlxcy.cache import Cache, KVCache, RotatingKVCache  # noqa: F401


def model_class(family):
    if family == "llama":
        from mlxcy.models.llama import LlamaModel
        return LlamaModel
    if family == "qwen2":
        from mlxcy.models.qwen2 import Qwen2Model
        return Qwen2Model
    if family == "qwen3":
        from mlxcy.models.qwen3 import Qwen3Model
        return Qwen3Model
    if family == "gemma3":
        from mlxcy.models.gemma3 import Gemma3Model
        return Gemma3Model
    raise ValueError(f"unknown model family {family!r}")


def build_model(config, weights, quantization=None, dtype=None):
    """Build a model from a config (ModelConfig or config.json dict) and
    Hugging Face-named weights (dict of name -> Array).

    quantization: MLX's layout, e.g. {"group_size": 64, "bits": 4,
    "<layer path>": {...} or False}; quantized layers are those with
    `<path>.scales` among the weights. dtype: cast float weights (bf16/f16/f32).
    Missing or misshapen tensors raise ValueError naming the tensor.
    """
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    return model_class(cfg.family)(cfg, weights, quantization, dtype)
