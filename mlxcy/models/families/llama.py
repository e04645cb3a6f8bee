"""Llama 1/2/3/3.1/3.2 (and SmolLM2, the same architecture): pre-norm blocks,
SiLU MLP, optional attention and MLP biases, RoPE with llama3 / linear /
dynamic scaling, tied or separate output head.  The forward is the shared
decoder (mlxcy/models/base.pyx).  GGUF: llama.cpp permuted the q/k rows for
its interleaved RoPE; the reader undoes it."""
from mlxcy.models.spec import ArchSpec, BASE_FIELDS, Field, fields

SPEC = ArchSpec(
    name="llama",
    model_types=("llama",),
    hf_architecture="LlamaForCausalLM",
    fields=fields(BASE_FIELDS,
                  attention_bias=Field("attention_bias", "bool", default=False),
                  mlp_bias=Field("mlp_bias", "bool", default=False)),
    qkv_bias="attention_bias",
    o_bias="attention_bias",
    mlp_bias="mlp_bias",
    gguf_architectures=("llama",),
    gguf_permute_qk=True,
    # no chat_template: the architecture does not tell (SmolLM2 chats in ChatML,
    # Llama 3 in its own)
)
