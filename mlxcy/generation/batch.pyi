"""Types of mlxcy.generation.batch (batch.pyx): many prompts through one model."""
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from mlxcy.generation.inference import MlxTextModel

__all__ = ["classify", "batch_generate", "ClassifyResult", "BatchGeneration", "BatchMetrics"]

# A prompt: a string (encoded with the tokenizer's special tokens) or token ids.
_Prompt = str | Sequence[int]

# classify computes a prefix of at least this many tokens that every prompt of
# a batch starts with once for the batch.
SHARED_PREFIX_MIN: int
# On a CPU, classify ends a batch early rather than pad more than this share of
# its positions.
CPU_PAD_SHARE: float

class ClassifyResult(NamedTuple):
    """The last-position distribution of one prompt."""

    top_ids: npt.NDArray[np.int64]
    top_probs: npt.NDArray[np.float64]
    label: str | None
    scores: dict[str, float] | None
    logits: npt.NDArray[np.float32] | None

class BatchMetrics:
    """Figures of one batch_generate call."""

    prompts: int
    prompt_tokens: int
    generated_tokens: int
    prefill_time: float
    total_time: float
    prompts_per_second: float
    prefill_tokens_per_second: float
    tokens_per_second: float
    decode_tokens_per_second: float
    peak_memory: int
    acceptance_rate: float
    tokens_per_step: float
    def __init__(self) -> None: ...
    def as_dict(self) -> dict[str, int | float]: ...
    def format(self) -> str: ...

class BatchGeneration:
    """Results of batch_generate, in the prompts' order."""

    texts: list[str]
    token_ids: list[list[int]]
    stop_reasons: list[str]
    logprobs: list[list[float]] | None
    metrics: BatchMetrics
    def __init__(
        self,
        texts: list[str],
        token_ids: list[list[int]],
        stop_reasons: list[str],
        logprobs: list[list[float]] | None,
        metrics: BatchMetrics,
    ) -> None: ...
    def __len__(self) -> int: ...

def classify(
    text_model: MlxTextModel,
    prompts: Sequence[_Prompt],
    *,
    labels: Sequence[str] | None = None,
    top_k: int = 5,
    return_logits: bool = False,
    batch_size: int | None = None,
) -> list[ClassifyResult]:
    """The next-token distribution after each prompt, in batches."""
def batch_generate(
    text_model: MlxTextModel,
    prompts: Sequence[_Prompt],
    *,
    options: Sequence[Mapping[str, Any] | None] | None = None,
    batch_size: int | None = None,
    **opts: Any,
) -> BatchGeneration:
    """Generate a continuation for every prompt, decoding them together
    (opts: GenerationOptions fields shared by every prompt)."""
