# cython: language_level=3, cpp_locals=True
"""Qwen2 / Qwen2.5: the Llama block with q/k/v biases (o_proj has none)."""
from mlxcy.models.base cimport Model, Block
from mlxcy.models.base import build_attention, build_mlp


cdef class Qwen2Model(Model):
    family = "qwen2"

    def build_block(self, W, cfg, int i):
        window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else 0
        p = f"model.layers.{i}."
        return Block(
            build_attention(W, cfg, i, qkv_bias=True, o_bias=False, window=window),
            build_mlp(W, cfg, i),
            W.norm(p + "input_layernorm", cfg.hidden_size, cfg.rms_norm_eps),
            W.norm(p + "post_attention_layernorm", cfg.hidden_size, cfg.rms_norm_eps))
