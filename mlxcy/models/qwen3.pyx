# cython: language_level=3, cpp_locals=True
"""Qwen3: per-head RMSNorm of queries and keys (q_norm/k_norm over head_dim)
before RoPE, explicit head_dim, optional attention bias."""
from mlxcy.models.base cimport Model, Block
from mlxcy.models.base import build_attention, build_mlp


cdef class Qwen3Model(Model):
    family = "qwen3"

    def build_block(self, W, cfg, int i):
        window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else 0
        p = f"model.layers.{i}."
        return Block(
            build_attention(W, cfg, i, qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias,
                            qk_norm_offset=0.0, window=window),
            build_mlp(W, cfg, i),
            W.norm(p + "input_layernorm", cfg.hidden_size, cfg.rms_norm_eps),
            W.norm(p + "post_attention_layernorm", cfg.hidden_size, cfg.rms_norm_eps))
