"""Types of mlxcy.models.gemma3 (gemma3.pyx): Gemma 3's forward."""
from typing import Any

from typing_extensions import disjoint_base

from mlxcy.core import _DtypeLike
from mlxcy.models.base import Block, Model, Weights
from mlxcy.models.config import ModelConfig

class GemmaBlock(Block):
    """h = x + post_attn(attn(input(x))); out = h + post_ff(mlp(pre_ff(h)))"""

@disjoint_base
class Gemma3Model(Model):
    """Gemma 3's forward; its tensors, config and GGUF names are declared in
    mlxcy/models/families/gemma3.py."""

    def __init__(
        self,
        config: ModelConfig | dict[str, Any],
        weights: dict[str, Any],
        quantization: dict[str, Any] | None = None,
        dtype: _DtypeLike | None = None,
    ) -> None: ...
    def build_block(self, W: Weights, cfg: ModelConfig, i: int) -> Block: ...
