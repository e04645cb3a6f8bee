# cython: language_level=3, cpp_locals=True
"""Llama 1/2/3/3.1/3.2 (and SmolLM2, same architecture): pre-norm blocks,
SiLU MLP, optional attention/MLP biases, RoPE with llama3 / linear /
dynamic scaling, tied or separate output head."""
from mlxcy.models.base cimport Model, Block
from mlxcy.models.base import build_attention, build_mlp


cdef class LlamaModel(Model):
    family = "llama"

    def build_block(self, W, cfg, int i):
        window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else 0
        p = f"model.layers.{i}."
        return Block(
            build_attention(W, cfg, i, qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias,
                            window=window),
            build_mlp(W, cfg, i, bias=cfg.mlp_bias),
            W.norm(p + "input_layernorm", cfg.hidden_size, cfg.rms_norm_eps),
            W.norm(p + "post_attention_layernorm", cfg.hidden_size, cfg.rms_norm_eps))
