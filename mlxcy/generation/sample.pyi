"""Types of mlxcy.generation.sample (sample.pyx): the token sampler and the
logit filters it applies."""
from collections.abc import Mapping

from typing_extensions import disjoint_base

from mlxcy.core import Array, _ArrayLike

__all__ = ["Sampler", "apply_top_k", "apply_top_p", "apply_min_p", "apply_penalties"]

@disjoint_base
class Sampler:
    """Turns logits into token ids; configured once, called every step.

    temperature 0 means greedy (argmax); top_k 0, top_p 1 and min_p 0 turn
    those filters off; the same seed gives the same tokens."""

    def __init__(
        self,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = 1.0,
        min_p: float | None = 0.0,
        min_tokens_to_keep: int = 1,
        repetition_penalty: float | None = None,
        repetition_context_size: int = 20,
        presence_penalty: float | None = None,
        presence_context_size: int = 20,
        frequency_penalty: float | None = None,
        frequency_context_size: int = 20,
        logit_bias: Mapping[int, float] | None = None,
        seed: int | None = None,
    ) -> None: ...
    def __call__(self, logits: _ArrayLike, history: _ArrayLike | None = None) -> Array:
        """Token ids (int32, shape logits.shape[:-1]) for `logits`, lazily."""
    def process_logits(self, logits: _ArrayLike, history: _ArrayLike | None = None) -> Array:
        """The logits after logit bias and penalties (no filtering or draw)."""
    def reset(self, seed: int | None = None) -> None:
        """Restart the random stream from `seed` (or the construction seed)."""
    @property
    def logit_bias(self) -> dict[int, float]: ...
    @property
    def greedy(self) -> bool: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def top_p(self) -> float: ...
    @property
    def min_p(self) -> float: ...
    @property
    def min_tokens_to_keep(self) -> int: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def repetition_context_size(self) -> int: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def presence_context_size(self) -> int: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def frequency_context_size(self) -> int: ...
    @property
    def seed(self) -> int | None: ...

def apply_top_k(logprobs: _ArrayLike, k: int) -> Array:
    """Keep the k largest entries along the last axis; the rest become -inf."""
def apply_top_p(logprobs: _ArrayLike, p: float) -> Array:
    """Keep the smallest most likely set with probability mass >= p; the rest become -inf."""
def apply_min_p(logprobs: _ArrayLike, min_p: float, min_tokens_to_keep: int = 1) -> Array: ...
def apply_penalties(
    logits: _ArrayLike,
    history: _ArrayLike | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    presence_penalty: float | None = None,
    presence_context_size: int = 20,
    frequency_penalty: float | None = None,
    frequency_context_size: int = 20,
    logit_bias: Mapping[int, float] | None = None,
) -> Array: ...
