"""Types of mlxcy.train.lora (lora.pyx): LoRA / DoRA / full fine-tuning of a
Model and the native training step."""
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

from mlxcy.core import Array, _ArrayLike, _DtypeLike
from mlxcy.models.base import Model
from mlxcy.train.optim import Optimizer

__all__ = ["LoRA", "TrainStep", "KEYS", "DEFAULT_KEYS", "normalize_keys", "cross_entropy",
           "make_batch_arrays", "FINE_TUNE_TYPES"]

FINE_TUNE_TYPES: tuple[str, ...]
KEYS: tuple[str, ...]
DEFAULT_KEYS: tuple[str, ...]
AUTO_ON_CPU: bool

def normalize_keys(keys: str | Iterable[str] | None) -> tuple[str, ...]:
    """('q_proj', 'mlp.up_proj', ...) -> mlx-lm's layer-relative paths, checked."""
def cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """(mean masked next-token cross-entropy, number of counted tokens)."""
def make_batch_arrays(
    ids: _ArrayLike, offsets: _ArrayLike | None = None, lengths: _ArrayLike | None = None
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """(inputs, targets, mask) numpy arrays from padded ids [B, T]."""

@disjoint_base
class LoRA:
    """LoRA adapters on some Linear layers of a Model."""

    def __init__(
        self,
        model: Model,
        rank: int = 8,
        scale: float = 20.0,
        dropout: float = 0.0,
        keys: str | Iterable[str] | None = None,
        num_layers: int = 16,
        seed: int | None = 0,
        dtype: _DtypeLike = "float32",
        compute_dtype: _DtypeLike | None = None,
        alpha: float | None = None,
        fine_tune_type: Literal["lora", "dora", "full"] = "lora",
    ) -> None: ...
    @property
    def model(self) -> Model: ...
    @property
    def names(self) -> list[str]:
        """Module paths: model.layers.N.self_attn.q_proj ..."""
    @property
    def rank(self) -> int: ...
    @property
    def scale(self) -> float: ...
    @property
    def dropout(self) -> float: ...
    @property
    def keys(self) -> tuple[str, ...]: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def merged(self) -> bool: ...
    @property
    def fine_tune_type(self) -> str: ...
    @property
    def per(self) -> int:
        """Arrays in the parameters per adapted unit (2 LoRA, 3 DoRA, 1 full)."""
    def __len__(self) -> int: ...
    def install(self) -> None:
        """(Re)attach the current adapter arrays to the layers."""
    def remove(self) -> None:
        """Detach the adapters from the layers (the model is its base again)."""
    def train(self, mode: bool = True) -> None:
        """Dropout on (training) or off (evaluation)."""
    def eval(self) -> None: ...
    def nparams(self) -> int: ...
    def parameter_names(self) -> list[str]: ...
    def parameters(self) -> dict[str, Array]:
        """Adapter (or, for full fine-tuning, block) tensors by mlx-lm's names."""
    def parameter_list(self) -> list[Array]: ...
    def set_parameters(self, weights: dict[str, Array], strict: bool = True) -> None: ...
    def config(self) -> dict[str, Any]:
        """mlx-lm's adapter_config.json fields for these adapters."""
    def delta(self, j: int) -> Array:
        """scale * (A @ B).T for adapter j, float32 [out, in]."""
    def fused_weights(self, dequantize: bool = False) -> dict[str, Array]:
        """Base weights with the adapters folded in, by checkpoint name."""
    def dora_weight(self, j: int) -> Array: ...
    def merge(self) -> None:
        """Fold the adapters into the base weights (unmerge() restores them)."""
    def unmerge(self) -> None: ...
    def fuse(self) -> Model:
        """merge() for good; returns the model."""

@disjoint_base
class TrainStep:
    """One optimizer step per call (or per `grad_accum` calls)."""

    def __init__(
        self,
        lora: LoRA,
        optimizer: Optimizer | None = None,
        grad_checkpoint: bool = False,
        clip_grad_norm: float = 0.0,
        grad_accum: int = 1,
        compile: bool = True,
        memory_limit: Literal["auto"] | int | None = "auto",
        memory_margin: float = 0.0,
    ) -> None: ...
    @property
    def lora(self) -> LoRA: ...
    @property
    def optimizer(self) -> Optimizer | None: ...
    @property
    def grad_checkpoint(self) -> bool: ...
    @property
    def clip(self) -> float: ...
    @property
    def grad_accum(self) -> int: ...
    @property
    def last_grad_norm(self) -> float | None: ...
    @property
    def compile(self) -> bool: ...
    @property
    def memory_limit(self) -> Literal["auto"] | int | None: ...
    @property
    def memory_margin(self) -> float: ...
    @property
    def live_bytes(self) -> dict[Any, int]: ...
    def __call__(
        self, ids: _ArrayLike, offsets: _ArrayLike | None = None, lengths: _ArrayLike | None = None
    ) -> tuple[float, int, bool]:
        """step(ids, offsets, lengths)."""
    def step(
        self, ids: _ArrayLike, offsets: _ArrayLike | None = None, lengths: _ArrayLike | None = None
    ) -> tuple[float, int, bool]:
        """Forward + backward on one batch: (loss, ntoks, updated)."""
    def value_and_grad(
        self, ids: _ArrayLike, offsets: _ArrayLike | None = None, lengths: _ArrayLike | None = None
    ) -> tuple[Array, Array, list[Array]]:
        """(loss, ntoks, grads) without an update; grads in parameter_names() order."""
    def evaluate(
        self, ids: _ArrayLike, offsets: _ArrayLike | None = None, lengths: _ArrayLike | None = None
    ) -> tuple[float, int]:
        """(sum of the counted tokens' losses, their number) without gradients."""
