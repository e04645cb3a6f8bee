"""ModelConfig: the fields mlxcy's decoders need, parsed and validated from a
Hugging Face config.json dict by the family's spec (mlxcy/models/families/):
each key typed and bounded, old `rope_theta`/`rope_scaling` keys and
transformers 5's `rope_parameters` both read, the multimodal `gemma3`
checkpoint's nested `text_config` read as its language model."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlxcy.models.spec import ConfigError


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    # Gemma 3
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    layer_types: list = field(default_factory=list)
    rope_local_base_freq: float | None = None
    local_rope_scaling: dict | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def spec(self):
        """The family's ArchSpec (mlxcy/models/families/)."""
        from mlxcy.models.families import spec_for
        return spec_for(self.model_type)

    @property
    def family(self) -> str:
        return self.spec.name

    def window(self, i) -> int:
        """Layer i's sliding window (0: full attention)."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else 0

    @classmethod
    def from_dict(cls, hf: dict) -> "ModelConfig":
        """Parse and validate a config.json dict by its family's spec; raises
        mlxcy.errors.ModelFormatError (a ValueError) naming the key."""
        if isinstance(hf, ModelConfig):
            return hf
        if not isinstance(hf, dict):
            raise TypeError(f"config: expected a dict (config.json), got {type(hf).__name__}")
        from mlxcy.models.families import spec_for
        mt = hf.get("model_type")
        if mt is None:
            raise ConfigError("config: missing 'model_type'")
        v = spec_for(mt).parse(hf)
        return cls(**{f.name: v[f.name] for f in dataclasses.fields(cls) if f.name in v})

    def to_dict(self) -> dict[str, Any]:
        """A config.json-style dict that from_dict reads back to this config."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in (
            "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings",
            "attention_bias", "mlp_bias", "max_position_embeddings", "layer_types")}
        out["sliding_window"] = self.sliding_window
        out.update(self.spec.to_dict(self))
        return out

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
