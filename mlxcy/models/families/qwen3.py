"""Qwen3: per-head RMSNorm of queries and keys (q_norm/k_norm over head_dim)
before RoPE, explicit head_dim (default 128), optional attention biases
(q/k/v and o_proj)."""
from mlxcy.models.spec import BASE_FIELDS, Field, fields
from mlxcy.models.families.qwen2 import Qwen2Spec

SPEC = Qwen2Spec(
    name="qwen3",
    model_types=("qwen3",),
    hf_architecture="Qwen3ForCausalLM",
    fields=fields(BASE_FIELDS, max_position_embeddings=dict(default=32768),
                  head_dim=dict(default=128),
                  attention_bias=Field("attention_bias", "bool", default=False)),
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    qk_norm=True,
    gguf_architectures=("qwen3",),
    chat_template="chatml",
)
