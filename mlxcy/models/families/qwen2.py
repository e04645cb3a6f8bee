"""Qwen2 / Qwen2.5: the Llama block with q/k/v biases (always; o_proj has
none), optional sliding-window layers from max_window_layers on (only with
use_sliding_window)."""
from mlxcy.models.spec import ArchSpec, BASE_FIELDS, Field, fields


class Qwen2Spec(ArchSpec):
    def layer_types(self, d, v):
        n = v["num_hidden_layers"]
        if not self.use_sliding(d):
            return ["full_attention"] * n
        if d.get("layer_types") is not None:
            return d["layer_types"]
        mwl = Field("max_window_layers", "int", default=28, minimum=0).read(d)   # transformers' default
        return ["sliding_attention" if i >= mwl else "full_attention" for i in range(n)]

    def use_sliding(self, d):
        return Field("use_sliding_window", "bool", default=False).read(d)

    def to_dict(self, cfg):
        return {"use_sliding_window": True} if "sliding_attention" in cfg.layer_types else {}

    def gguf_extra(self, arch, meta, cfg):
        return {"hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": cfg["num_hidden_layers"]}


SPEC = Qwen2Spec(
    name="qwen2",
    model_types=("qwen2",),
    hf_architecture="Qwen2ForCausalLM",
    fields=fields(BASE_FIELDS, max_position_embeddings=dict(default=32768)),
    qkv_bias=True,
    gguf_architectures=("qwen2",),
    chat_template="chatml",
)
