"""Mistral / Ministral: the Llama block (no biases) with sliding-window
attention.  Mistral slides every layer when sliding_window is set (null:
none); Ministral's layer_types chooses per layer.  GGUF: llama.cpp converts
these checkpoints to its "llama" architecture (read by families/llama.py,
without the window, as llama.cpp runs them)."""
from mlxcy.models.spec import ArchSpec, BASE_FIELDS, fields


class MistralSpec(ArchSpec):
    def layer_types(self, d, v):
        if d.get("layer_types") is not None:
            return d["layer_types"]
        kind = "full_attention" if v["sliding_window"] is None else "sliding_attention"
        return [kind] * v["num_hidden_layers"]


SPEC = MistralSpec(
    name="mistral",
    model_types=("mistral", "ministral"),
    hf_architecture="MistralForCausalLM",
    # MistralConfig's defaults
    fields=fields(BASE_FIELDS, sliding_window=dict(default=4096),
                  max_position_embeddings=dict(default=4096 * 32)),
)
